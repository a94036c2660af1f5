//! The shared token: where it lives, how it is read, and what makes it acceptable.
//!
//! Both sides apply the same rules, so a token one side accepts the other accepts too:
//! - a token file must not be accessible to group or others, must belong to the user reading
//!   it, and its directory must belong to that user (or root) and not be writable by group or
//!   others, so nobody else can have planted or swapped it (as ssh treats private keys);
//! - a token carries at least 128 bits: 32 hex digits, or 22 characters of any other
//!   printable ASCII (base64 and the like carry 6 bits each);
//! - surrounding whitespace is not part of the token.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The fewest bits a token must carry.
pub const MIN_TOKEN_BITS: usize = 128;
/// A token file larger than this is not a token file.
const MAX_TOKEN_FILE_BYTES: u64 = 4096;
/// Random bytes in a token the agent makes itself (hex-encoded: 64 characters).
const GENERATED_TOKEN_BYTES: usize = 32;

/// Environment variable with the token itself.
pub const TOKEN_ENV: &str = "DGL_AGENT_TOKEN";
/// Environment variable naming the token file.
pub const TOKEN_FILE_ENV: &str = "DGL_AGENT_TOKEN_FILE";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read token file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error(
        "token file {path} is accessible by group or others (mode {mode:04o}); \
         restrict it with: chmod 600 {path}"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error(
        "token file {path} belongs to uid {owner}, not to uid {me} who reads it; \
         make it yours with: chown {me} {path}"
    )]
    NotOwned { path: PathBuf, owner: u32, me: u32 },
    #[error(
        "the directory {dir} of token file {path} can be changed by another user \
         (owner uid {owner}, mode {mode:04o}); keep the token in a directory only you \
         (or root) can write, e.g. chmod go-w {dir}"
    )]
    DirTooOpen {
        path: PathBuf,
        dir: PathBuf,
        owner: u32,
        mode: u32,
    },
    #[error("token file {path} is larger than {MAX_TOKEN_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("the token {origin} is empty")]
    Empty { origin: String },
    #[error(
        "the token {origin} is too short: {bits} bits, at least {MIN_TOKEN_BITS} are required \
         (32 hex digits or 22 base64 characters; make one with `openssl rand -hex 32`)"
    )]
    TooShort { origin: String, bits: usize },
    #[error("the token {origin} must be printable ASCII without spaces")]
    NotPrintable { origin: String },
    #[error(
        "no token: neither --token-file, {TOKEN_FILE_ENV} nor {TOKEN_ENV} is set, and neither \
         $XDG_CONFIG_HOME nor $HOME names the default location"
    )]
    NoDefaultLocation,
    #[error("cannot create the token file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A token that met the rules above.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// Checks a token given directly (`origin` says where from, for messages).
    pub fn parse(text: &str, origin: &str) -> Result<Self, TokenError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(TokenError::Empty {
                origin: origin.into(),
            });
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::NotPrintable {
                origin: origin.into(),
            });
        }
        let bits = token_bits(t);
        if bits < MIN_TOKEN_BITS {
            return Err(TokenError::TooShort {
                origin: origin.into(),
                bits,
            });
        }
        Ok(Self(t.to_string()))
    }

    /// Reads and checks a token file.
    pub fn read_file(path: &Path) -> Result<Self, TokenError> {
        let read = |source| TokenError::Read {
            path: path.into(),
            source,
        };
        // O_NONBLOCK: a FIFO put in its place must not hang the start.
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(read)?;
        let meta = f.metadata().map_err(read)?;
        if !meta.is_file() {
            return Err(TokenError::NotAFile { path: path.into() });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(TokenError::TooOpen {
                path: path.into(),
                mode,
            });
        }
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me {
            return Err(TokenError::NotOwned {
                path: path.into(),
                owner: meta.uid(),
                me,
            });
        }
        check_dir(path, me)?;
        if meta.len() > MAX_TOKEN_FILE_BYTES {
            return Err(TokenError::TooLarge { path: path.into() });
        }
        let mut text = String::new();
        (&mut f)
            .take(MAX_TOKEN_FILE_BYTES)
            .read_to_string(&mut text)
            .map_err(read)?;
        Self::parse(&text, &format!("in {}", path.display()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// The token file's directory: whoever can write it can replace the file. Owned by the
/// reader or root, not writable by group or others (a sticky bit is no excuse: it does not stop
/// the first user to create a missing name).
fn check_dir(path: &Path, me: u32) -> Result<(), TokenError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let meta = std::fs::metadata(dir).map_err(|source| TokenError::Read {
        path: dir.into(),
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    if (meta.uid() != me && meta.uid() != 0) || mode & 0o022 != 0 {
        return Err(TokenError::DirTooOpen {
            path: path.into(),
            dir: dir.into(),
            owner: meta.uid(),
            mode,
        });
    }
    Ok(())
}

/// Bits a token carries, counted generously by its alphabet: 4 a character when every
/// character is a hex digit, 6 otherwise.
fn token_bits(t: &str) -> usize {
    let per_char = if t.bytes().all(|b| b.is_ascii_hexdigit()) {
        4
    } else {
        6
    };
    t.len() * per_char
}

/// The per-user token file used when none is named: `$XDG_CONFIG_HOME/dglrun/token`, else
/// `$HOME/.config/dglrun/token`.
pub fn default_token_path() -> Result<PathBuf, TokenError> {
    let xdg = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = match xdg {
        Some(p) => p,
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .ok_or(TokenError::NoDefaultLocation)?
            .join(".config"),
    };
    Ok(base.join("dglrun").join("token"))
}

/// Reads the token file at `path`, creating it first (256 random bits, hex, mode 0600, its
/// directory 0700) when it does not exist. The file appears whole or not at all, and of two
/// agents starting at once one creates it and both use its token.
pub fn read_or_create(path: &Path) -> Result<(Token, bool), TokenError> {
    match Token::read_file(path) {
        Ok(t) => return Ok((t, false)),
        Err(TokenError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let create = |source| TokenError::Create {
        path: path.into(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(create)?;
    let mut bytes = [0u8; GENERATED_TOKEN_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| create(std::io::Error::other("the system random source failed")))?;
    // Written in full under a temporary name (0600), then linked to its name, which fails if
    // another agent got there first: no reader ever sees a half-written token.
    let mut tmp = tempfile::Builder::new()
        .prefix(".token.")
        .tempfile_in(dir)
        .map_err(create)?;
    tmp.write_all(format!("{}\n", hex::encode(bytes)).as_bytes())
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(create)?;
    let created = match tmp.persist_noclobber(path) {
        Ok(_) => true,
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(create(e.error)),
    };
    if created {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok((Token::read_file(path)?, created))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_tokens_are_refused_by_their_alphabet() {
        assert!(Token::parse(&"a".repeat(31), "x").is_err());
        assert!(Token::parse(&"a".repeat(32), "x").is_ok());
        assert!(Token::parse(&"z".repeat(21), "x").is_err());
        assert!(Token::parse(&"z".repeat(22), "x").is_ok());
        assert!(Token::parse("abc", "x").is_err());
        assert!(Token::parse("   ", "x").is_err());
        assert!(Token::parse(&format!("{} {}", "z".repeat(22), "z"), "x").is_err());
        let t = Token::parse(&format!("  {}\n", "f".repeat(40)), "x").unwrap();
        assert_eq!(t.as_str(), "f".repeat(40));
    }

    #[test]
    fn open_token_files_are_refused_naming_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("token");
        std::fs::write(&p, "0123456789abcdef0123456789abcdef\n").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = Token::read_file(&p).unwrap_err().to_string();
            assert!(
                e.contains(&p.display().to_string()) && e.contains("chmod 600"),
                "{e}"
            );
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Token::read_file(&p).is_ok());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(Token::read_file(&p).is_ok());
    }

    #[test]
    fn token_files_of_another_user_or_in_an_open_directory_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cfg");
        std::fs::create_dir(&dir).unwrap();
        let p = dir.join("token");
        std::fs::write(&p, "0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Token::read_file(&p).is_ok());
        for mode in [0o770, 0o707, 0o1777] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = Token::read_file(&p).unwrap_err().to_string();
            assert!(
                e.contains(&dir.display().to_string()) && e.contains("chmod go-w"),
                "{mode:o}: {e}"
            );
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(Token::read_file(&p).is_ok());
        if !rustix::process::geteuid().is_root() {
            // Giving a file away needs root; CI runs as root, so there this check always runs.
            assert!(std::env::var_os("CI").is_none(), "chown needs root");
            return;
        }
        std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
        let e = Token::read_file(&p).unwrap_err().to_string();
        assert!(e.contains("uid 65534") && e.contains("chown 0"), "{e}");
        std::os::unix::fs::chown(&p, Some(0), None).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        let e = Token::read_file(&p).unwrap_err().to_string();
        assert!(e.contains("owner uid 65534"), "{e}");
    }

    #[test]
    fn created_token_file_is_private_and_stable() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cfg/dglrun/token");
        let (a, created) = read_or_create(&p).unwrap();
        assert!(created);
        assert_eq!(a.as_str().len(), 64);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(p.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        let (b, created) = read_or_create(&p).unwrap();
        assert!(!created);
        assert_eq!(a.as_str(), b.as_str());
    }

    #[test]
    fn concurrent_creators_agree() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dglrun/token");
        let tokens: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| read_or_create(&p).unwrap().0.as_str().to_string()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(tokens.iter().all(|t| t == &tokens[0]), "{tokens:?}");
    }
}
