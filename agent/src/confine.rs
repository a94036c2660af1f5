//! Every path a coordinator names must stay inside the agent's root.

use std::path::{Component, Path, PathBuf};

/// Longest path the agent accepts, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;

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
    #[error("path {path:?} leads out of the agent root through a symlink ({resolved})")]
    Symlink { path: String, resolved: String },
    #[error("cannot resolve {path:?}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl From<ConfineError> for tonic::Status {
    fn from(e: ConfineError) -> Self {
        tonic::Status::permission_denied(e.to_string())
    }
}

/// The agent's root directory, canonical.
#[derive(Clone, Debug)]
pub struct Root {
    path: PathBuf,
}

impl Root {
    pub fn new(path: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(path)?;
        Ok(Self {
            path: path.canonicalize()?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the agent keeps its own state (hash cache, job records).
    pub fn state_dir(&self) -> PathBuf {
        self.path.join(".dglrun")
    }

    /// Maps a path from the wire to a path inside the root, without touching the disk.
    ///
    /// Relative paths are taken under the root; absolute ones must already lie inside it.
    /// `..` is refused outright rather than normalised: nothing legitimate needs it.
    pub fn lexical(&self, p: &str) -> Result<PathBuf, ConfineError> {
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
        let mut out = self.path.clone();
        let rel = if path.is_absolute() {
            path.strip_prefix(&self.path)
                .map_err(|_| ConfineError::Outside {
                    path: p.to_string(),
                    root: self.path.display().to_string(),
                })?
        } else {
            path
        };
        for c in rel.components() {
            match c {
                Component::Normal(n) => out.push(n),
                Component::CurDir => {}
                Component::ParentDir => return Err(ConfineError::DotDot(p.to_string())),
                Component::RootDir | Component::Prefix(_) => {
                    return Err(ConfineError::Outside {
                        path: p.to_string(),
                        root: self.path.display().to_string(),
                    })
                }
            }
        }
        Ok(out)
    }

    /// Resolves `p` and checks that what exists of it on disk, symlinks followed, is inside
    /// the root. Returns the lexical path (inside the root).
    pub fn resolve(&self, p: &str) -> Result<PathBuf, ConfineError> {
        let lexical = self.lexical(p)?;
        // The deepest existing ancestor decides: a symlink anywhere along it is followed here.
        let mut probe = lexical.as_path();
        loop {
            match probe.canonicalize() {
                Ok(real) => {
                    if !real.starts_with(&self.path) {
                        return Err(ConfineError::Symlink {
                            path: p.to_string(),
                            resolved: real.display().to_string(),
                        });
                    }
                    return Ok(lexical);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => match probe.parent() {
                    Some(parent) => probe = parent,
                    None => return Ok(lexical),
                },
                Err(source) => {
                    return Err(ConfineError::Io {
                        path: p.to_string(),
                        source,
                    })
                }
            }
        }
    }

    /// Creates the parent directories of `p` inside the root and returns the resolved path.
    pub fn prepare_parent(&self, p: &str) -> Result<PathBuf, ConfineError> {
        let path = self.resolve(p)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| ConfineError::Io {
                path: p.to_string(),
                source,
            })?;
            // Checked again after creation: a directory may have been swapped for a symlink.
            let real = parent.canonicalize().map_err(|source| ConfineError::Io {
                path: p.to_string(),
                source,
            })?;
            if !real.starts_with(&self.path) {
                return Err(ConfineError::Symlink {
                    path: p.to_string(),
                    resolved: real.display().to_string(),
                });
            }
        }
        Ok(path)
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
        assert_eq!(r.resolve("ws/a.txt").unwrap(), r.path().join("ws/a.txt"));
        assert_eq!(r.resolve("./ws//a").unwrap(), r.path().join("ws/a"));
        let abs = r.path().join("ws/b").display().to_string();
        assert_eq!(r.resolve(&abs).unwrap(), r.path().join("ws/b"));
    }

    #[test]
    fn escapes_are_refused() {
        let (d, r) = root();
        for bad in ["../x", "ws/../../x", "/etc/passwd", "", "a\0b"] {
            assert!(r.resolve(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(r.resolve(&"a/".repeat(3000)).is_err());
        std::os::unix::fs::symlink(d.path(), r.path().join("out")).unwrap();
        let err = r.resolve("out/x").unwrap_err();
        assert!(matches!(err, ConfineError::Symlink { .. }), "{err}");
        assert!(r.prepare_parent("out/y/z").is_err());
        assert!(!d.path().join("y").exists());
    }

    #[test]
    fn symlinks_that_stay_inside_are_fine() {
        let (_d, r) = root();
        std::fs::create_dir_all(r.path().join("real")).unwrap();
        std::os::unix::fs::symlink(r.path().join("real"), r.path().join("link")).unwrap();
        assert!(r.resolve("link/f").is_ok());
    }
}

/// Checks what an open file descriptor really refers to. A path checked before `open` can be
/// swapped for a symlink before the open happens; the kernel's own record of the opened file
/// cannot.
pub fn verify_opened(
    root: &Root,
    file: &std::fs::File,
    shown_as: &str,
) -> Result<(), ConfineError> {
    use std::os::fd::AsRawFd;
    let real =
        std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(|source| {
            ConfineError::Io {
                path: shown_as.to_string(),
                source,
            }
        })?;
    if real.starts_with(root.path()) {
        Ok(())
    } else {
        Err(ConfineError::Symlink {
            path: shown_as.to_string(),
            resolved: real.display().to_string(),
        })
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
            "[a-z]{1,8}",
            "[\\PC]{1,6}",
            Just("a\0b".to_string()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever the input, an accepted path lies inside the root and has no `..`.
        #[test]
        fn lexical_never_escapes(parts in proptest::collection::vec(segment(), 0..8), absolute in any::<bool>()) {
            let d = tempfile::tempdir().unwrap();
            let root = Root::new(d.path()).unwrap();
            let mut p = parts.join("/");
            if absolute {
                p = format!("/{p}");
            }
            if let Ok(resolved) = root.lexical(&p) {
                prop_assert!(resolved.starts_with(root.path()), "{p:?} -> {resolved:?}");
                prop_assert!(!resolved.components().any(|c| c == Component::ParentDir));
                prop_assert!(!p.contains('\0'));
            }
        }
    }

    #[test]
    fn opened_file_outside_the_root_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(&d.path().join("root")).unwrap();
        std::fs::write(d.path().join("outside"), b"x").unwrap();
        std::fs::write(root.path().join("inside"), b"x").unwrap();
        let inside = std::fs::File::open(root.path().join("inside")).unwrap();
        assert!(verify_opened(&root, &inside, "inside").is_ok());
        std::os::unix::fs::symlink(d.path().join("outside"), root.path().join("link")).unwrap();
        let via_link = std::fs::File::open(root.path().join("link")).unwrap();
        assert!(verify_opened(&root, &via_link, "link").is_err());
    }
}
