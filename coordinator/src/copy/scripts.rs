//! Lists the script folder on the master host.
//!
//! Symlinks are followed and what they point to is copied as regular files and directories,
//! as `scp -r` (what DGL's copy_files.py runs) does. A dangling link, a link loop or a
//! special file (fifo, socket, device) is refused, naming it. Empty directories are not
//! recreated: only files are sent.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::plan::{ScriptFile, ScriptFolder};

#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("--script_folder {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("--script_folder: {path} is not a directory")]
    NotADir { path: String },
    #[error("--script_folder: {path} is a symlink to nothing ({target})")]
    Dangling { path: String, target: String },
    #[error("--script_folder: {path} leads back into {ancestor} (a symlink loop)")]
    Loop { path: String, ancestor: String },
    #[error("--script_folder: {path} is neither a file nor a directory (fifo, socket or device)")]
    Special { path: String },
    #[error("--script_folder: {path}: the name is not valid UTF-8")]
    NotUtf8 { path: String },
}

pub fn scan(folder: &Path) -> Result<ScriptFolder, ScriptError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| ScriptError::Io { path, source }
    };
    // Canonical, so `.` or a trailing slash still gives the folder its real name.
    let real = folder.canonicalize().map_err(io(folder))?;
    if !real.is_dir() {
        return Err(ScriptError::NotADir {
            path: folder.display().to_string(),
        });
    }
    let name = real
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ScriptError::NotUtf8 {
            path: folder.display().to_string(),
        })?
        .to_string();
    let mut files = Vec::new();
    let mut stack = Vec::new();
    walk(folder, "", &mut stack, &mut files)?;
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(ScriptFolder { name, files })
}

/// `ancestors`: (dev, ino) of the directories on the current path, to catch link loops; a
/// directory reached twice by different links (not a loop) is simply listed twice.
fn walk(
    dir: &Path,
    rel: &str,
    ancestors: &mut Vec<(u64, u64, PathBuf)>,
    out: &mut Vec<ScriptFile>,
) -> Result<(), ScriptError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| ScriptError::Io { path, source }
    };
    let meta = fs::metadata(dir).map_err(io(dir))?;
    let id = (meta.dev(), meta.ino());
    if let Some((_, _, ancestor)) = ancestors.iter().find(|(d, i, _)| (*d, *i) == id) {
        return Err(ScriptError::Loop {
            path: dir.display().to_string(),
            ancestor: ancestor.display().to_string(),
        });
    }
    ancestors.push((id.0, id.1, dir.to_path_buf()));
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(io(dir))?
        .collect::<Result<_, _>>()
        .map_err(io(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_str().ok_or_else(|| ScriptError::NotUtf8 {
            path: path.display().to_string(),
        })?;
        let child_rel = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        // Follows symlinks; a dangling one fails here and is named as such.
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let target = fs::read_link(&path)
                    .map(|t| t.display().to_string())
                    .unwrap_or_default();
                return Err(ScriptError::Dangling {
                    path: path.display().to_string(),
                    target,
                });
            }
            Err(e) => return Err(io(&path)(e)),
        };
        if meta.is_dir() {
            walk(&path, &child_rel, ancestors, out)?;
        } else if meta.is_file() {
            out.push(ScriptFile {
                rel: child_rel,
                local: path,
                mode: meta.permissions().mode() & 0o777,
            });
        } else {
            return Err(ScriptError::Special {
                path: path.display().to_string(),
            });
        }
    }
    ancestors.pop();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn listing(f: &ScriptFolder) -> Vec<(String, u32)> {
        f.files.iter().map(|f| (f.rel.clone(), f.mode)).collect()
    }

    #[test]
    fn lists_files_recursively_with_modes_and_follows_links() {
        let d = tempfile::tempdir().unwrap();
        let code = d.path().join("code");
        fs::create_dir_all(code.join("lib/deep")).unwrap();
        fs::create_dir_all(code.join("empty")).unwrap();
        fs::write(code.join("train.py"), "x").unwrap();
        fs::set_permissions(code.join("train.py"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(code.join("lib/deep/u.py"), "y").unwrap();
        fs::set_permissions(
            code.join("lib/deep/u.py"),
            fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        fs::write(d.path().join("outside.txt"), "z").unwrap();
        symlink(d.path().join("outside.txt"), code.join("link.txt")).unwrap();
        symlink(code.join("lib"), code.join("lib2")).unwrap();
        let f = scan(&code.join(".")).unwrap();
        assert_eq!(f.name, "code");
        let mode_of = |p: &str| fs::metadata(code.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            listing(&f),
            [
                ("lib/deep/u.py".to_string(), 0o640),
                ("lib2/deep/u.py".to_string(), 0o640),
                ("link.txt".to_string(), mode_of("link.txt")),
                ("train.py".to_string(), 0o755),
            ]
        );
    }

    #[test]
    fn refuses_dangling_links_loops_and_special_files() {
        let d = tempfile::tempdir().unwrap();
        let code = d.path().join("code");
        fs::create_dir_all(code.join("sub")).unwrap();
        symlink(d.path().join("nope"), code.join("sub/dead")).unwrap();
        let err = scan(&code).unwrap_err().to_string();
        assert!(
            err.contains("sub/dead") && err.contains("symlink to nothing"),
            "{err}"
        );

        fs::remove_file(code.join("sub/dead")).unwrap();
        symlink(&code, code.join("sub/up")).unwrap();
        let err = scan(&code).unwrap_err().to_string();
        assert!(err.contains("sub/up") && err.contains("loop"), "{err}");

        fs::remove_file(code.join("sub/up")).unwrap();
        nix::unistd::mkfifo(&code.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = scan(&code).unwrap_err().to_string();
        assert!(
            err.contains("fifo") && err.contains("neither a file"),
            "{err}"
        );

        let err = scan(&d.path().join("missing")).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }
}
