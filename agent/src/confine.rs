//! Every path a coordinator names stays inside the agent's root.
//!
//! A path from the wire is first parsed into a [`WirePath`] (relative, no `..`, bounded). It
//! is then only ever resolved by the kernel, beneath the root's directory fd: `openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS` opens the parent directory, and every create,
//! rename, chmod, truncate, unlink and stat is a `*at` call relative to that directory fd on a
//! single name, never following a symlink. A directory swapped for a symlink between two
//! calls can therefore not lead outside the root: there is no string check followed by a
//! later open.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Stat};

/// Longest path the agent accepts, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;

/// The agent's own state directory under the root: never a target of a request.
pub const STATE_DIR: &str = ".dglrun";

/// Suffix of partial files (`.<name>.dglrun-partial`): reserved for the agent's transfers.
pub const PARTIAL_SUFFIX: &str = ".dglrun-partial";

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("empty path")]
    Empty,
    #[error("path is longer than {MAX_PATH_BYTES} bytes")]
    TooLong,
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    #[error("path {0:?} contains `..`")]
    DotDot(String),
    #[error("path {path:?} lies outside the agent root {root}")]
    Outside { path: String, root: String },
    #[error("path {0:?} leads out of the agent root through a symlink")]
    Escapes(String),
    #[error("path {0:?} is reserved for the agent (its state directory or a partial file)")]
    Reserved(String),
    #[error("path {0:?} names the agent root itself, not a file in it")]
    IsRoot(String),
    #[error("cannot resolve {path:?}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl ConfineError {
    fn io(path: &str, e: impl Into<io::Error>) -> Self {
        let source: io::Error = e.into();
        match source.raw_os_error() {
            // RESOLVE_BENEATH refuses with EXDEV; a magic link or a symlink where none may be
            // followed gives ELOOP.
            Some(libc::EXDEV) | Some(libc::ELOOP) => Self::Escapes(path.to_string()),
            _ => Self::Io {
                path: path.to_string(),
                source,
            },
        }
    }

    /// True when the path (or one of its directories) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    /// True when the path (or one of its directories) is not a directory.
    pub fn is_not_a_directory(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.raw_os_error() == Some(libc::ENOTDIR))
    }
}

/// A path from the wire, checked without touching the disk: relative to the root, made of
/// plain names only. `shown` is what the coordinator wrote, for messages.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WirePath {
    shown: String,
    rel: PathBuf,
}

impl WirePath {
    /// The path as the coordinator wrote it.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The path relative to the root (empty for the root itself).
    pub fn rel(&self) -> &Path {
        &self.rel
    }

    /// The directory part and the last name; refuses the root itself.
    pub fn split(&self) -> Result<(&Path, &OsStr), ConfineError> {
        let name = self
            .rel
            .file_name()
            .ok_or_else(|| ConfineError::IsRoot(self.shown.clone()))?;
        Ok((self.rel.parent().unwrap_or(Path::new("")), name))
    }

    /// `p` taken relative to this directory (or, when absolute, inside the root).
    pub fn join(&self, root: &Root, p: &str) -> Result<WirePath, ConfineError> {
        let sub = root.parse(p)?;
        if Path::new(p).is_absolute() {
            return Ok(sub);
        }
        let rel = self.rel.join(&sub.rel);
        if rel.as_os_str().len() > MAX_PATH_BYTES {
            return Err(ConfineError::TooLong);
        }
        Ok(WirePath {
            shown: p.to_string(),
            rel,
        })
    }

    /// Refuses the agent's own names: the state directory (first component) and partial
    /// files (last component). What a symlink inside the root leads to is checked on the
    /// opened directory ([`Root::is_state_dir`]).
    pub fn check_not_reserved(&self) -> Result<(), ConfineError> {
        let mut names = self.rel.components();
        if names.next() == Some(Component::Normal(OsStr::new(STATE_DIR))) {
            return Err(ConfineError::Reserved(self.shown.clone()));
        }
        if let Some(name) = self.rel.file_name() {
            if is_partial_name(name) {
                return Err(ConfineError::Reserved(self.shown.clone()));
            }
        }
        Ok(())
    }
}

/// True for `.<something>.dglrun-partial`.
pub fn is_partial_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.len() > PARTIAL_SUFFIX.len() + 1 && b[0] == b'.' && b.ends_with(PARTIAL_SUFFIX.as_bytes())
}

/// `.<name>.dglrun-partial` for `<name>`.
pub fn partial_name(name: &OsStr) -> std::ffi::OsString {
    let mut out = std::ffi::OsString::from(".");
    out.push(name);
    out.push(PARTIAL_SUFFIX);
    out
}

/// The agent's root: its canonical path (for messages and child processes) and an open
/// directory fd that every request's path is resolved beneath.
#[derive(Clone, Debug)]
pub struct Root {
    path: PathBuf,
    dir: Arc<OwnedFd>,
}

fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS
}

/// Flags of a directory opened to work in: readable (so it can be fsynced), never a tty.
fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOCTTY
}

impl Root {
    pub fn new(path: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(path)?;
        let path = path.canonicalize()?;
        let dir = rustix::fs::open(&path, dir_flags(), Mode::empty())?;
        Ok(Self {
            path,
            dir: Arc::new(dir),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the agent keeps its own state (hash cache, job records).
    pub fn state_dir(&self) -> PathBuf {
        self.path.join(STATE_DIR)
    }

    /// Checks a path from the wire without touching the disk.
    ///
    /// Relative paths are taken under the root; absolute ones must already lie inside it.
    /// `..` is refused outright rather than normalised: nothing legitimate needs it.
    pub fn parse(&self, p: &str) -> Result<WirePath, ConfineError> {
        if p.is_empty() {
            return Err(ConfineError::Empty);
        }
        if p.len() > MAX_PATH_BYTES {
            return Err(ConfineError::TooLong);
        }
        if p.contains('\0') {
            return Err(ConfineError::Nul(p.to_string()));
        }
        let path = Path::new(p);
        let outside = || ConfineError::Outside {
            path: p.to_string(),
            root: self.path.display().to_string(),
        };
        let rel = if path.is_absolute() {
            path.strip_prefix(&self.path).map_err(|_| outside())?
        } else {
            path
        };
        let mut out = PathBuf::new();
        for c in rel.components() {
            match c {
                Component::Normal(n) => out.push(n),
                Component::CurDir => {}
                Component::ParentDir => return Err(ConfineError::DotDot(p.to_string())),
                Component::RootDir | Component::Prefix(_) => return Err(outside()),
            }
        }
        Ok(WirePath {
            shown: p.to_string(),
            rel: out,
        })
    }

    /// Opens the existing directory `p` beneath the root's fd, for a child process to
    /// `fchdir` into: the directory checked is the one the child works in, whatever happens
    /// to its name between the check and the exec. `O_PATH`: the agent needs no read
    /// permission on it, only the child's search permission at `fchdir`.
    pub fn open_workdir(&self, p: &str) -> Result<Workdir, ConfineError> {
        let wire = self.parse(p)?;
        let target = if wire.rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            wire.rel.as_path()
        };
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = rustix::fs::openat2(self.dir.as_fd(), target, flags, Mode::empty(), beneath())
            .map_err(|e| ConfineError::io(p, e))?;
        Ok(Workdir {
            path: self.path.join(&wire.rel),
            fd,
        })
    }

    /// Opens the directory `rel` (relative to the root) beneath the root's fd, creating what
    /// is missing of it when `create` is set: each new directory is made with `mkdirat` in
    /// its opened parent (mode 0777 less the umask) and the parent is fsynced.
    pub fn open_dir(&self, shown: &str, rel: &Path, create: bool) -> Result<Dir, ConfineError> {
        let whole = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        match rustix::fs::openat2(
            self.dir.as_fd(),
            whole,
            dir_flags(),
            Mode::empty(),
            beneath(),
        ) {
            Ok(fd) => return Ok(Dir { fd }),
            Err(rustix::io::Errno::NOENT) if create => {}
            Err(e) => return Err(ConfineError::io(shown, e)),
        }
        let mut cur = Dir {
            fd: self
                .dir
                .try_clone()
                .map_err(|e| ConfineError::io(shown, e))?,
        };
        let mut prefix = PathBuf::new();
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return Err(ConfineError::DotDot(shown.to_string()));
            };
            prefix.push(name);
            // An existing prefix is resolved from the root (a symlink inside the root is
            // fine); a missing one is made in the directory opened just before.
            match rustix::fs::openat2(
                self.dir.as_fd(),
                &prefix,
                dir_flags(),
                Mode::empty(),
                beneath(),
            ) {
                Ok(fd) => cur = Dir { fd },
                Err(rustix::io::Errno::NOENT) => {
                    match rustix::fs::mkdirat(cur.fd.as_fd(), name, Mode::from_raw_mode(0o777)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(ConfineError::io(shown, e)),
                    }
                    // Makes the new directory's name durable.
                    cur.sync().map_err(|e| ConfineError::io(shown, e))?;
                    cur = cur
                        .open_subdir(name)
                        .map_err(|e| ConfineError::io(shown, e))?;
                }
                Err(e) => return Err(ConfineError::io(shown, e)),
            }
        }
        Ok(cur)
    }

    /// Free bytes on the file system of the root. Blocking (a hung mount blocks it).
    pub fn free_bytes(&self) -> u64 {
        rustix::fs::fstatvfs(self.dir.as_fd())
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            .unwrap_or(0)
    }

    /// True when `dir` is the agent's state directory or lies beneath it, reached through any
    /// name (a symlink inside the root): walks `..` from `dir` up to the root.
    pub fn is_state_dir(&self, dir: &Dir) -> io::Result<bool> {
        let st = rustix::fs::statat(self.dir.as_fd(), STATE_DIR, AtFlags::SYMLINK_NOFOLLOW);
        let state = match st {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let root = rustix::fs::fstat(&*self.dir)?;
        let same = |a: &Stat, b: &Stat| a.st_dev == b.st_dev && a.st_ino == b.st_ino;
        let mut cur = rustix::fs::fstat(&dir.fd)?;
        let mut up: Option<OwnedFd> = None;
        // A wire path has at most this many components; symlinks inside the root can lead
        // deeper, but not usefully so.
        for _ in 0..MAX_PATH_BYTES / 2 {
            if same(&cur, &state) {
                return Ok(true);
            }
            if same(&cur, &root) {
                return Ok(false);
            }
            let from = up.as_ref().map_or(dir.fd.as_fd(), |f| f.as_fd());
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
            let parent = rustix::fs::openat(from, "..", flags, Mode::empty())?;
            let pst = rustix::fs::fstat(&parent)?;
            if same(&pst, &cur) {
                // `/`: the directory was moved out of the root meanwhile; it is not the state.
                return Ok(false);
            }
            cur = pst;
            up = Some(parent);
        }
        Err(io::Error::other(
            "directory nested too deep below the root to check",
        ))
    }

    /// True when the opened file `st` is one of the agent's own files in its state directory
    /// (reached through any name, e.g. a symlink inside the root).
    pub fn is_state_file(&self, st: &Stat) -> io::Result<bool> {
        let flags = dir_flags();
        let fd =
            match rustix::fs::openat2(self.dir.as_fd(), STATE_DIR, flags, Mode::empty(), beneath())
            {
                Ok(fd) => fd,
                Err(rustix::io::Errno::NOENT) => return Ok(false),
                Err(e) => return Err(e.into()),
            };
        if rustix::fs::fstat(&fd)?.st_dev != st.st_dev {
            return Ok(false);
        }
        // The state directory holds a handful of files; the bound only guards the loop.
        for entry in rustix::fs::Dir::new(fd)?.take(4096) {
            if entry?.ino() == st.st_ino {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Opens the file `rel` beneath the root's fd to read it: O_NONBLOCK so a FIFO or a
    /// device cannot block the open, then refused unless it is a regular file or one of the
    /// agent's own state files.
    pub fn open_regular(&self, shown: &str, rel: &Path) -> Result<std::fs::File, ConfineError> {
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        let fd = rustix::fs::openat2(self.dir.as_fd(), rel, flags, Mode::empty(), beneath())
            .map_err(|e| ConfineError::io(shown, e))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| ConfineError::io(shown, e))?;
        // A symlink inside the root may lead to a partial file: never read as a whole file.
        let opened = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|e| ConfineError::io(shown, e))?;
        if opened.file_name().is_some_and(is_partial_name) {
            return Err(ConfineError::Reserved(shown.to_string()));
        }
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(ConfineError::Io {
                path: shown.to_string(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        if self
            .is_state_file(&st)
            .map_err(|e| ConfineError::io(shown, e))?
        {
            return Err(ConfineError::Reserved(shown.to_string()));
        }
        Ok(std::fs::File::from(fd))
    }
}

/// A directory inside the root, opened for a child to work in: its path (for messages and
/// `PWD`-like uses) and the fd the child changes into.
#[derive(Debug)]
pub struct Workdir {
    pub path: PathBuf,
    pub fd: OwnedFd,
}

/// An open directory inside the root. Every call names one entry of it and never follows a
/// symlink in that name.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

impl Dir {
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens the directory `name` in this one, never through a symlink.
    pub fn open_subdir(&self, name: &OsStr) -> io::Result<Dir> {
        let resolve = beneath() | ResolveFlags::NO_SYMLINKS;
        let fd = rustix::fs::openat2(self.fd.as_fd(), name, dir_flags(), Mode::empty(), resolve)?;
        Ok(Dir { fd })
    }

    /// Opens `name` in this directory, never through a symlink. `O_NONBLOCK` is always set
    /// (a FIFO must not block the open); callers check the type with `fstat`.
    pub fn open(&self, name: &OsStr, flags: OFlags, mode: u32) -> io::Result<std::fs::File> {
        let flags = flags | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        let resolve = beneath() | ResolveFlags::NO_SYMLINKS;
        let fd = rustix::fs::openat2(
            self.fd.as_fd(),
            name,
            flags,
            Mode::from_raw_mode(mode),
            resolve,
        )?;
        Ok(std::fs::File::from(fd))
    }

    /// `lstat` of an entry; None when it does not exist.
    pub fn stat_entry(&self, name: &OsStr) -> io::Result<Option<Stat>> {
        match rustix::fs::statat(self.fd.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn stat(&self) -> io::Result<Stat> {
        Ok(rustix::fs::fstat(&self.fd)?)
    }

    pub fn rename(&self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        Ok(rustix::fs::renameat(
            self.fd.as_fd(),
            from,
            self.fd.as_fd(),
            to,
        )?)
    }

    /// Removes a file entry (never a directory); a missing one is not an error.
    pub fn unlink(&self, name: &OsStr) -> io::Result<()> {
        match rustix::fs::unlinkat(self.fd.as_fd(), name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn sync(&self) -> io::Result<()> {
        Ok(rustix::fs::fsync(&self.fd)?)
    }

    /// Makes the directory `name` here (mode 0777 less the umask); an existing one is fine.
    pub fn mkdir(&self, name: &OsStr) -> io::Result<()> {
        match rustix::fs::mkdirat(self.fd.as_fd(), name, Mode::from_raw_mode(0o777)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the empty directory `name`; a missing one is not an error.
    pub fn remove_dir(&self, name: &OsStr) -> io::Result<()> {
        match rustix::fs::unlinkat(self.fd.as_fd(), name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The names in this directory, `.` and `..` left out.
    pub fn names(&self) -> io::Result<Vec<std::ffi::OsString>> {
        let mut dir = rustix::fs::Dir::read_from(self.fd.as_fd())?;
        let mut out = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                out.push(OsStr::from_bytes(name).to_os_string());
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> (tempfile::TempDir, Root) {
        let d = tempfile::tempdir().unwrap();
        let r = Root::new(&d.path().join("root")).unwrap();
        (d, r)
    }

    #[test]
    fn relative_and_inside_absolute_paths_resolve() {
        let (_d, r) = root();
        std::fs::create_dir_all(r.path().join("ws/a")).unwrap();
        std::fs::create_dir_all(r.path().join("ws/b")).unwrap();
        assert_eq!(r.open_workdir("ws/a").unwrap().path, r.path().join("ws/a"));
        assert_eq!(
            r.open_workdir("./ws//a").unwrap().path,
            r.path().join("ws/a")
        );
        let abs = r.path().join("ws/b").display().to_string();
        assert_eq!(r.open_workdir(&abs).unwrap().path, r.path().join("ws/b"));
        assert!(r.open_workdir("ws/missing").unwrap_err().is_not_found());
    }

    #[test]
    fn escapes_are_refused() {
        let (d, r) = root();
        for bad in ["../x", "ws/../../x", "/etc/passwd", "", "a\0b"] {
            assert!(r.open_workdir(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(r.open_workdir(&"a/".repeat(3000)).is_err());
        std::fs::create_dir_all(d.path().join("x")).unwrap();
        std::os::unix::fs::symlink(d.path(), r.path().join("out")).unwrap();
        let err = r.open_workdir("out/x").unwrap_err();
        assert!(matches!(err, ConfineError::Escapes(_)), "{err}");
        let wire = r.parse("out/y/z").unwrap();
        assert!(r.open_dir("out/y/z", wire.rel(), true).is_err());
        assert!(!d.path().join("y").exists());
    }

    #[test]
    fn symlinks_that_stay_inside_are_fine() {
        let (_d, r) = root();
        std::fs::create_dir_all(r.path().join("real")).unwrap();
        std::os::unix::fs::symlink("real", r.path().join("link")).unwrap();
        assert!(r.open_workdir("link").is_ok());
        assert!(r.open_dir("link", Path::new("link"), false).is_ok());
        // New directories under a symlinked directory inside the root are made where it leads.
        r.open_dir("link/a/b", Path::new("link/a/b"), true).unwrap();
        assert!(r.path().join("real/a/b").is_dir());
    }

    #[test]
    fn reserved_names_are_recognised() {
        let (_d, r) = root();
        for p in [".dglrun/jobs.json", "./.dglrun", "ws/.a.dglrun-partial"] {
            let err = r.parse(p).unwrap().check_not_reserved().unwrap_err();
            assert!(matches!(err, ConfineError::Reserved(_)), "{p}: {err}");
        }
        for p in ["ws/.dglrun/x", "ws/a.dglrun-partial", "ws/.dglrun-partial"] {
            assert!(r.parse(p).unwrap().check_not_reserved().is_ok(), "{p}");
        }
        assert_eq!(partial_name(OsStr::new("f.txt")), ".f.txt.dglrun-partial");
    }

    #[test]
    fn fifos_and_devices_are_not_opened_as_regular_files() {
        let (_d, r) = root();
        nix::unistd::mkfifo(&r.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = r.open_regular("fifo", Path::new("fifo")).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        std::os::unix::fs::symlink("/dev/zero", r.path().join("dev")).unwrap();
        assert!(r.open_regular("dev", Path::new("dev")).is_err());
    }

    #[test]
    fn a_partial_file_is_not_read_through_a_symlink() {
        let (_d, r) = root();
        std::fs::create_dir_all(r.path().join("ws/d")).unwrap();
        std::fs::write(r.path().join("ws/d/.ip.txt.dglrun-partial"), "10.0.0.").unwrap();
        std::os::unix::fs::symlink("d/.ip.txt.dglrun-partial", r.path().join("ws/ip.txt")).unwrap();
        let err = r
            .open_regular("ws/ip.txt", Path::new("ws/ip.txt"))
            .unwrap_err();
        assert!(matches!(err, ConfineError::Reserved(_)), "{err}");
        std::fs::write(r.path().join("ws/d/real.txt"), "10.0.0.1\n").unwrap();
        std::fs::remove_file(r.path().join("ws/ip.txt")).unwrap();
        std::os::unix::fs::symlink("d/real.txt", r.path().join("ws/ip.txt")).unwrap();
        assert!(r.open_regular("ws/ip.txt", Path::new("ws/ip.txt")).is_ok());
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("..".to_string()),
            Just(".".to_string()),
            Just("".to_string()),
            Just("/".to_string()),
            Just(".dglrun".to_string()),
            Just(".x.dglrun-partial".to_string()),
            "[a-z]{1,8}",
            "[\\PC]{1,6}",
            Just("a\0b".to_string()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever the input, an accepted path lies inside the root and has no `..`.
        #[test]
        fn parse_never_escapes(parts in proptest::collection::vec(segment(), 0..8), absolute in any::<bool>()) {
            let d = tempfile::tempdir().unwrap();
            let root = Root::new(d.path()).unwrap();
            let mut p = parts.join("/");
            if absolute {
                p = format!("/{p}");
            }
            if let Ok(wire) = root.parse(&p) {
                prop_assert!(wire.rel().is_relative(), "{p:?} -> {:?}", wire.rel());
                prop_assert!(wire.rel().components().all(|c| matches!(c, Component::Normal(_))));
                prop_assert!(!p.contains('\0'));
                if wire.check_not_reserved().is_ok() {
                    prop_assert!(wire.rel().components().next() != Some(Component::Normal(OsStr::new(STATE_DIR))));
                    prop_assert!(!wire.rel().file_name().is_some_and(is_partial_name));
                }
            }
        }
    }
}
