//! What a previous run of the agent may have left under its root, dealt with before serving.
//!
//! * The root lock (`<root>/.dglrun/agent.lock`, flock): one agent per root. Jobs are
//!   recognised by the root in their marker, so a second agent on the same root would take the
//!   first one's processes for leftovers. The kernel drops the lock when its holder dies,
//!   however it dies, so a restart after SIGKILL is never refused.
//! * Processes of the previous run's jobs: stopped (`jobs::recover`).
//! * Temporary files: the agent's own in `<root>/.dglrun/` (an interrupted write of the job
//!   record or the hash cache) are deleted. Partial files of interrupted copies
//!   (`.<name>.dglrun-partial` beside their target) are kept on purpose: the next copy of
//!   the same file verifies them chunk by chunk and resumes (see `files::partial`).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};

use crate::confine::Root;
use crate::jobs::{recover, state_file};

pub const LOCK_NAME: &str = "agent.lock";

/// Held for as long as the agent runs.
pub struct RootLock {
    _lock: Flock<File>,
}

/// Takes the root lock, stops the previous run's leftovers, removes stale temporaries.
/// Blocking (may wait `grace` for leftovers to exit).
pub fn take_over(root: &Root, grace: Duration) -> anyhow::Result<RootLock> {
    let dir = root.state_dir();
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let lock = lock_root(&dir)?;
    let recovered = recover::stop_leftovers(root.path(), &dir, grace);
    if recovered.all_stopped() {
        // Dealt with; this run writes its own record when it starts a job. (Kept otherwise, so
        // the next run tries again.)
        let record = dir.join(state_file::FILE_NAME);
        if let Err(e) = fs::remove_file(&record) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(file = %record.display(), "cannot remove the previous job record: {e}");
            }
        }
    }
    remove_temporaries(&dir);
    Ok(lock)
}

fn lock_root(dir: &Path) -> anyhow::Result<RootLock> {
    let path = dir.join(LOCK_NAME);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            anyhow::bail!(
                "another dgl-agent (pid {}) already uses the root {}: one agent per root",
                holder.trim(),
                dir.parent().unwrap_or(dir).display()
            );
        }
        Err((_, e)) => anyhow::bail!("cannot lock {}: {e}", path.display()),
    };
    // The holder's pid, for the message above; failing to write it costs only the message.
    let f: &mut File = &mut lock;
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = writeln!(f, "{}", std::process::id());
    Ok(RootLock { _lock: lock })
}

/// True for the names of the agent's own temporary files in its state directory: the job
/// record's, and the hash cache's (`tempfile`'s default `.tmpXXXXXX`).
fn is_temporary(name: &str) -> bool {
    name == state_file::TMP_NAME || name.starts_with(".tmp")
}

fn remove_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !is_temporary(name) || !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        match fs::remove_file(e.path()) {
            Ok(()) => {
                tracing::info!(file = %e.path().display(), "removed a temporary file of an interrupted write")
            }
            Err(err) => {
                tracing::warn!(file = %e.path().display(), "cannot remove a stale temporary file: {err}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_agent_per_root_and_stale_temporaries_go_but_partials_stay() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path()).unwrap();
        let dir = root.state_dir();
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join(".tmpAb12Cd"), b"half a cache").unwrap();
        fs::write(dir.join(state_file::TMP_NAME), b"half a record").unwrap();
        fs::write(dir.join("hashes.json"), b"{}").unwrap();
        let partial = root.path().join("ws/.graph.dgl.dglrun-partial");
        fs::create_dir_all(partial.parent().unwrap()).unwrap();
        fs::write(&partial, b"verified prefix").unwrap();

        let lock = take_over(&root, Duration::from_millis(100)).unwrap();
        assert!(!dir.join(".tmpAb12Cd").exists());
        assert!(!dir.join(state_file::TMP_NAME).exists());
        assert!(dir.join("hashes.json").exists());
        assert!(dir.join("sub").is_dir());
        assert!(partial.exists(), "partials are kept for resume");

        let err = take_over(&root, Duration::from_millis(100))
            .err()
            .expect("a second agent on the same root is refused")
            .to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(lock);
        assert!(take_over(&root, Duration::from_millis(100)).is_ok());
    }
}
