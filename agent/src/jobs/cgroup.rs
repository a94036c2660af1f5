//! cgroup v2 containment: each job's processes in a cgroup of their own.
//!
//! A process can scrub its environment (losing the marker) and double-fork (leaving the
//! process tree the agent can follow); it cannot leave its cgroup without write access to
//! the hierarchy above it. So where the agent may create cgroups (root on the unified
//! hierarchy, a systemd unit with `Delegate=yes`, a Slurm job cgroup), each job gets
//! `<agent's cgroup>/dglrun-<root hash>/job-<id>`; a session's command is born in it
//! (`fork_into`), a launch's process moves itself in between fork and exec (it writes `0` to
//! the job's `cgroup.procs`), and Stop ends with `cgroup.kill`. The marker scan stays as the
//! fallback and runs in both modes: a process may also leave the cgroup (a tmux server moved
//! into a systemd scope keeps the marker).
//!
//! No controller is enabled anywhere, so the cgroup "no internal processes" rule does not
//! apply: the agent stays where it was started and creates its cgroups beside itself. The
//! directory is named for the agent's root (one agent per root), so a restarted agent finds
//! what its previous run left and kills it. A running agent holds an flock on its directory:
//! a starting agent removes the empty job cgroups of every sibling directory it can lock (its
//! agent is gone, killed and never restarted on that root) and leaves the others alone.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The agent's cgroups, one per job, under one directory of its own.
#[derive(Debug)]
pub struct Cgroups {
    base: PathBuf,
    /// The base directory, flocked while this agent lives (the kernel drops it however the
    /// agent dies).
    _alive: File,
}

/// Opens and flocks the agent's base directory, making it again if a sweeping agent removed it
/// between its mkdir and the lock (it was empty and unlocked then).
fn lock_base(base: &Path) -> io::Result<File> {
    for _ in 0..8 {
        let dir = File::open(base)?;
        // A sweeping agent holds it for a moment; a second `Jobs` on the same root in one
        // process would hold it for good, so never wait without bound.
        let mut tries = 0;
        while let Err(e) =
            rustix::fs::flock(&dir, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        {
            tries += 1;
            if tries == 200 {
                return Err(e.into());
            }
            // Once, at start, before the agent serves: another agent ends its flock soon.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(10));
        }
        let same = match std::fs::metadata(base) {
            Ok(m) => {
                use std::os::unix::fs::MetadataExt;
                let held = dir.metadata()?;
                m.ino() == held.ino() && m.dev() == held.dev()
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        if same {
            return Ok(dir);
        }
        match std::fs::create_dir(base) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    Err(io::Error::other(
        "its directory keeps being removed by other agents",
    ))
}

/// Why the agent falls back to the marker scan.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("the agent's cgroup v2 path is not in /proc/self/cgroup")]
    NoUnifiedPath,
    #[error("no cgroup2 file system is mounted")]
    NotMounted,
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create {path}")]
    NotWritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} has no cgroup.kill (Linux 5.14 or later is needed)")]
    NoKill { path: PathBuf },
}

impl Cgroups {
    /// A writable cgroup v2 directory for the agent owning `agent_root`; the reason when
    /// there is none. Kills and removes whatever a previous run of the agent left in it.
    pub fn detect(agent_root: &Path) -> Result<Self, Unavailable> {
        let read = |path: &str| {
            std::fs::read_to_string(path).map_err(|source| Unavailable::Read {
                path: path.into(),
                source,
            })
        };
        let cgroup_file = read("/proc/self/cgroup")?;
        let own = own_path(&cgroup_file).ok_or(Unavailable::NoUnifiedPath)?;
        let mount = unified_mount(&read("/proc/self/mountinfo")?).ok_or(Unavailable::NotMounted)?;
        let own_dir = mount.join(own.trim_start_matches('/'));
        let hash = Sha256::digest(agent_root.as_os_str().as_encoded_bytes());
        let base = own_dir.join(format!("dglrun-{}", hex::encode(&hash[..8])));
        match std::fs::create_dir(&base) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(Unavailable::NotWritable { path: base, source }),
        }
        if !base.join("cgroup.kill").exists() {
            let _ = std::fs::remove_dir(&base);
            return Err(Unavailable::NoKill { path: base });
        }
        let alive = lock_base(&base).map_err(|source| Unavailable::NotWritable {
            path: base.clone(),
            source,
        })?;
        let cgroups = Self {
            base,
            _alive: alive,
        };
        cgroups.remove_leftovers();
        cgroups.remove_empty_siblings();
        Ok(cgroups)
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Creates (or reuses) the cgroup of job `id`. `id` is a checked job id (no `/`, never
    /// `.` or `..`).
    pub fn create_job(&self, id: &str) -> io::Result<JobCgroup> {
        let dir = self.base.join(format!("job-{id}"));
        let mkdir = |d: &Path| match std::fs::create_dir(d) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        };
        // The base is made again if it went (another agent's start removes empty ones), and
        // once more if it went between the two mkdirs.
        let made = mkdir(&self.base).and_then(|()| mkdir(&dir));
        match made {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                mkdir(&self.base)?;
                mkdir(&dir)?;
            }
            other => other?,
        }
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))?;
        let dir_fd = open_dir(&dir)?;
        Ok(JobCgroup { dir, dir_fd, procs })
    }

    /// Removes the agent's directory and every job cgroup in it that is empty (at exit).
    pub fn remove_empty(&self) {
        if let Ok(dir) = std::fs::read_dir(&self.base) {
            for entry in dir.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&self.base);
    }

    /// Directories of agents that ended without removing theirs (killed agents, other roots):
    /// only those nobody holds locked, their empty job cgroups first. rmdir only removes a
    /// cgroup without processes and without children, so a job cgroup with processes left
    /// stays for its own agent's restart to kill.
    fn remove_empty_siblings(&self) {
        let Some(parent) = self.base.parent() else {
            return;
        };
        let Ok(dir) = std::fs::read_dir(parent) else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name();
            let is_agent_dir = name.to_str().is_some_and(|n| n.starts_with("dglrun-"));
            if !is_agent_dir || entry.path() == self.base {
                continue;
            }
            let Ok(held) = File::open(entry.path()) else {
                continue;
            };
            let flock = rustix::fs::FlockOperation::NonBlockingLockExclusive;
            if rustix::fs::flock(&held, flock).is_err() {
                continue; // its agent runs
            }
            if let Ok(jobs) = std::fs::read_dir(entry.path()) {
                for job in jobs.flatten() {
                    if job.file_type().is_ok_and(|t| t.is_dir()) {
                        let _ = std::fs::remove_dir(job.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(entry.path());
        }
    }

    /// A previous run's job cgroups: killed, emptied, removed.
    fn remove_leftovers(&self) {
        let Ok(dir) = std::fs::read_dir(&self.base) else {
            return;
        };
        for entry in dir.flatten() {
            let path = entry.path();
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let cg = JobCgroup {
                procs: match File::options().write(true).open(path.join("cgroup.procs")) {
                    Ok(f) => f,
                    Err(_) => continue,
                },
                dir_fd: match open_dir(&path) {
                    Ok(fd) => fd,
                    Err(_) => continue,
                },
                dir: path,
            };
            match cg.pids() {
                Ok(p) if !p.is_empty() => {
                    tracing::warn!(cgroup = %cg.dir.display(), pids = ?p, "killing what a previous run of the agent left in its job cgroup");
                    if let Err(e) = cg.kill() {
                        tracing::error!(cgroup = %cg.dir.display(), "cannot kill the cgroup: {e}");
                    }
                    cg.wait_empty(Duration::from_secs(5));
                }
                _ => {}
            }
            // Dropping `cg` removes the cgroup once empty.
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        // Only succeeds once every job cgroup is gone (rmdir refuses a cgroup with children).
        let _ = std::fs::remove_dir(&self.base);
    }
}

/// One job's cgroup. The directory stays open for `CLONE_INTO_CGROUP` (see `fork_into`), and
/// `cgroup.procs` so that a child forked the other way can move itself in between fork and
/// exec without allocating or opening anything.
#[derive(Debug)]
pub struct JobCgroup {
    dir: PathBuf,
    dir_fd: OwnedFd,
    procs: File,
}

fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    Ok(rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

impl JobCgroup {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cgroup's directory, for clone3's `CLONE_INTO_CGROUP`.
    pub fn dir_fd(&self) -> BorrowedFd<'_> {
        self.dir_fd.as_fd()
    }

    /// The descriptor a child writes `0` to, between fork and exec, to enter the cgroup.
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    pub fn procs_path(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// The pids in the cgroup now.
    pub fn pids(&self) -> io::Result<Vec<i32>> {
        let text = std::fs::read_to_string(self.procs_path())?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// SIGKILL to every process in the cgroup, including those forked meanwhile.
    pub fn kill(&self) -> io::Result<()> {
        File::options()
            .write(true)
            .open(self.dir.join("cgroup.kill"))?
            .write_all(b"1")
    }

    /// Waits (blocking, polling) until no process is left, at most `timeout`.
    pub fn wait_empty(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.pids().is_ok_and(|p| p.is_empty()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            // on the blocking pool: a stop waits for the cgroup to empty
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Removes the cgroup; fails (and is left for the next run) while a process is in it.
    fn remove(&self) {
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::debug!(cgroup = %self.dir.display(), "cannot remove the job cgroup: {e}");
            }
        }
    }
}

impl Drop for JobCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is open as `fd`.
/// Async-signal-safe: it runs between fork and exec.
pub fn enter(fd: RawFd) -> io::Result<()> {
    // SAFETY: writes one byte from a static buffer to a descriptor the caller keeps open.
    let n = unsafe { nix::libc::write(fd, b"0".as_ptr().cast(), 1) };
    if n == 1 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The unified-hierarchy path in a `/proc/<pid>/cgroup` text (the `0::<path>` line).
fn own_path(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim)
        .filter(|p| p.starts_with('/'))
}

/// Mount point of the first cgroup2 file system in a `/proc/<pid>/mountinfo` text whose
/// root is `/` (inside a cgroup namespace the root is the namespace's own).
fn unified_mount(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|l| {
        // <id> <parent> <major:minor> <root> <mount point> <options> [optional...] - <fstype> ...
        let (pre, post) = l.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        let mut f = pre.split_whitespace();
        let root = f.nth(3)?;
        let point = f.next()?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(unescape(point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// For tests: the cgroups of an agent rooted at `root`, or `None` (said on stderr) where this
/// host lets the agent make none. Under `CI` that fails the test instead: CI runs where the
/// agent may make cgroups.
#[cfg(test)]
pub(crate) fn detect_or_skip(root: &Path) -> Option<Cgroups> {
    match Cgroups::detect(root) {
        Ok(c) => Some(c),
        Err(e) => {
            assert!(std::env::var_os("CI").is_none(), "no cgroup here: {e}");
            eprintln!("skipped: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unified_path_and_mount_are_found_on_hybrid_and_unified_hosts() {
        let hybrid = "9:name=systemd:/\n4:memory:/x\n0::/user.slice/a b\n";
        assert_eq!(own_path(hybrid), Some("/user.slice/a b"));
        assert_eq!(own_path("4:memory:/x\n"), None);
        let mi = "30 23 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw\n\
                  40 30 0:35 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            unified_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let odd = "40 30 0:35 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(unified_mount(odd), Some(PathBuf::from("/mnt/my cg")));
        let nested = "40 30 0:35 /sub /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(unified_mount(nested), None);
    }

    #[test]
    fn a_dead_agents_empty_job_cgroups_go_and_a_live_agents_stay() {
        let roots = tempfile::tempdir().unwrap();
        let Some(live) = detect_or_skip(&roots.path().join("live")) else {
            return;
        };
        let live_job = live.create_job("held-empty").unwrap();
        let parent = live.base().parent().unwrap().to_path_buf();
        // What an agent killed with SIGKILL leaves: its directory with empty job cgroups.
        let dead = parent.join(format!("dglrun-dead{:012x}", rand_suffix()));
        std::fs::create_dir(&dead).unwrap();
        std::fs::create_dir(dead.join("job-a")).unwrap();
        std::fs::create_dir(dead.join("job-b")).unwrap();
        let other = Cgroups::detect(&roots.path().join("other")).unwrap();
        let dead_gone = !dead.exists();
        let live_kept = live_job.dir().exists();
        if !dead_gone {
            let _ = std::fs::remove_dir(dead.join("job-a"));
            let _ = std::fs::remove_dir(dead.join("job-b"));
            let _ = std::fs::remove_dir(&dead);
        }
        drop(live_job);
        drop((live, other));
        assert!(dead_gone, "{} is left", dead.display());
        assert!(live_kept, "a live agent's empty job cgroup was removed");
    }

    fn rand_suffix() -> u64 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        t.as_nanos() as u64 ^ u64::from(std::process::id())
    }
}
