//! At start, before serving: stop every process a previous run of this agent left behind.
//!
//! An agent that dies without stopping its jobs (SIGKILL, crash, OOM kill) leaves their
//! processes running unowned, reparented to init or some subreaper: servers keep DGL's ports,
//! trainers hang. No lease can end them any more, so the next run of the agent does. It finds
//! them by
//!   * the state file: the direct children, by pid *and* start time (a reused pid never
//!     matches), and
//!   * a scan of all of /proc for the marker `DGLRUN_AGENT=<root>` (inherited by every
//!     descendant; the orphans no longer descend from any agent, so the scan cannot be limited
//!     to the agent's subtree), limited to processes of the agent's own uid,
//!
//! plus the descendants of both. The root lock (`crate::restart`) guarantees that no live
//! agent owns that marker while this runs. Each signal goes through a pidfd that is checked
//! against the start time first, so a process that exits and whose pid is reused meanwhile is
//! never signalled.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::pidfd::signal_exact;
use super::proc_stat::ProcEntry;
use super::process::{AGENT_VAR, JOB_ID_VAR};
use super::state_file::{self, Record};
use super::tree::{self, MemberQuery};

const PROC: &str = "/proc";
const POLL: Duration = Duration::from_millis(20);
/// SIGKILL is repeated this long before the agent reports what is left (a process in
/// uninterruptible sleep cannot die sooner).
const KILL_PATIENCE: Duration = Duration::from_secs(5);

/// What the previous run left and what became of it.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The record the previous run wrote, if any.
    pub record: Option<Record>,
    /// Processes signalled, by job id (`?` when the process carried no job id).
    pub stopped: BTreeMap<String, Vec<i32>>,
    /// Still alive after SIGKILL.
    pub remaining: usize,
    /// /proc could not be read: what is left is unknown, so the record is kept.
    pub scan_failed: Option<String>,
}

impl Recovered {
    /// Everything the previous run left is known to be gone.
    pub fn all_stopped(&self) -> bool {
        self.remaining == 0 && self.scan_failed.is_none()
    }
}

/// Finds and stops the leftovers of a previous run of the agent owning `root`, SIGTERM first,
/// SIGKILL after `grace`. Blocking; logs what it did.
pub fn stop_leftovers(root: &Path, state_dir: &Path, grace: Duration) -> Recovered {
    let record = match state_file::load(state_dir) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(dir = %state_dir.display(), "cannot read the previous job record ({e}); looking for leftovers by marker only");
            None
        }
    };
    let finder = Finder::new(root, record.as_ref());
    let mut out = Recovered {
        record,
        ..Recovered::default()
    };
    let mut signalled: HashSet<(i32, u64)> = HashSet::new();
    let deadline = Instant::now() + grace;
    loop {
        let found = match finder.find() {
            Ok(f) => f,
            Err(e) => {
                out.scan_failed = Some(super::error_chain(&e));
                break;
            }
        };
        if found.is_empty() {
            break;
        }
        let now = Instant::now();
        if now >= deadline + KILL_PATIENCE {
            out.remaining = found.len();
            break;
        }
        let term = now < deadline;
        for p in &found {
            let Some(start) = p.start else { continue };
            let first = signalled.insert((p.pid, start));
            if first {
                out.stopped
                    .entry(finder.job_of(p.pid))
                    .or_default()
                    .push(p.pid);
            }
            if term {
                // Only once: a second SIGTERM may cut a clean shutdown short.
                if first {
                    signal_exact(p.pid, start, Signal::SIGTERM);
                    signal_exact(p.pid, start, Signal::SIGCONT);
                }
            } else {
                signal_exact(p.pid, start, Signal::SIGKILL);
            }
        }
        // start-up clean-up, on the blocking pool before the agent listens
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(POLL);
    }
    report(&out);
    out
}

fn report(r: &Recovered) {
    if let Some(rec) = &r.record {
        if !rec.jobs.is_empty() {
            let ids: Vec<&str> = rec.jobs.iter().map(|j| j.id.as_str()).collect();
            tracing::info!(previous_agent_pid = rec.agent_pid, jobs = ?ids, "a previous run of this agent recorded running jobs");
        }
    }
    for (job, pids) in &r.stopped {
        tracing::warn!(job = %job, ?pids, "stopped {} processes a previous run of this agent left running", pids.len());
    }
    if let Some(e) = &r.scan_failed {
        tracing::error!("cannot look for processes left by a previous run ({e}); the job record is kept for the next start");
    } else if r.remaining > 0 {
        tracing::error!(
            remaining = r.remaining,
            "processes left by a previous run survived SIGKILL"
        );
    } else if r.stopped.is_empty() {
        tracing::debug!("no processes left by a previous run");
    }
}

struct Finder {
    marker: Vec<Vec<u8>>,
    /// (pid, start time) of the direct children the previous run recorded, with their job.
    seeds: HashMap<(i32, u64), String>,
    me: i32,
    uid: u32,
}

impl Finder {
    fn new(root: &Path, record: Option<&Record>) -> Self {
        let seeds = record
            .iter()
            .flat_map(|r| r.jobs.iter())
            .flat_map(|j| j.processes.iter().map(|p| ((p.pid, p.start), j.id.clone())))
            .collect();
        Self {
            marker: vec![format!("{AGENT_VAR}={}", root.display()).into_bytes()],
            seeds,
            me: std::process::id() as i32,
            uid: nix::unistd::geteuid().as_raw(),
        }
    }

    /// The leftovers alive right now.
    fn find(&self) -> Result<Vec<ProcEntry>, tree::ScanError> {
        let proc_root = Path::new(PROC);
        let all = tree::snapshot(proc_root)?;
        // The agent's own ancestors are never leftovers, whatever their environment says.
        let ancestors = ancestors(self.me, &all);
        let mine: Vec<ProcEntry> = all
            .into_iter()
            .filter(|p| !ancestors.contains(&p.pid) && owner(p.pid) == Some(self.uid))
            .collect();
        let seeds = mine
            .iter()
            .filter(|p| {
                p.start
                    .is_some_and(|s| self.seeds.contains_key(&(p.pid, s)))
            })
            .map(|p| tree::Seed {
                pid: p.pid,
                start: p.start,
                pidfd: None,
            })
            .collect();
        let query = MemberQuery {
            seeds,
            marker: self.marker.clone(),
            exclude: self.me,
            within: None,
            cgroup: None,
        };
        tree::members_in(&mine, &query, |pid| tree::read_environ(proc_root, pid))
    }

    /// The job a leftover belonged to, for the log.
    fn job_of(&self, pid: i32) -> String {
        let from_env = tree::read_environ(Path::new(PROC), pid)
            .ok()
            .flatten()
            .and_then(|env| {
                let prefix = format!("{JOB_ID_VAR}=");
                env.split(|&b| b == 0)
                    .find_map(|e| e.strip_prefix(prefix.as_bytes()))
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            });
        from_env
            .or_else(|| {
                self.seeds
                    .iter()
                    .find(|((p, _), _)| *p == pid)
                    .map(|(_, j)| j.clone())
            })
            .unwrap_or_else(|| "?".to_string())
    }
}

/// The effective uid a process runs as (the owner of its /proc directory).
fn owner(pid: i32) -> Option<u32> {
    std::fs::metadata(Path::new(PROC).join(pid.to_string()))
        .ok()
        .map(|m| m.uid())
}

fn ancestors(pid: i32, all: &[ProcEntry]) -> HashSet<i32> {
    let parent: HashMap<i32, i32> = all.iter().map(|p| (p.pid, p.ppid)).collect();
    let mut out = HashSet::new();
    let mut cur = parent.get(&pid).copied();
    while let Some(p) = cur {
        if p <= 0 || !out.insert(p) {
            break;
        }
        cur = parent.get(&p).copied();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::proc_stat;
    use std::io::Read;
    use std::process::{Command, Stdio};

    fn pid_alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| proc_stat::parse_stat(&s))
            .is_some_and(|p| p.is_alive())
    }

    #[test]
    fn a_pid_with_another_start_time_is_never_signalled() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        let start = proc_stat::start_time(Path::new(PROC), pid).unwrap();
        assert!(!signal_exact(pid, start + 1, Signal::SIGKILL));
        assert!(pid_alive(pid));
        assert!(signal_exact(pid, start, Signal::SIGKILL));
        let _ = child.wait();
    }

    #[test]
    fn orphans_carrying_the_root_marker_are_stopped_and_reported() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let state = root.join(".dglrun");
        std::fs::create_dir_all(&state).unwrap();
        // An orphan of a "previous run": setsid'd, ignores SIGTERM, parent gone at once.
        let mut sh = Command::new("sh")
            .arg("-c")
            .arg("setsid sh -c 'trap \"\" TERM; sleep 60' </dev/null >/dev/null 2>&1 & echo $!")
            .env(AGENT_VAR, &root)
            .env(JOB_ID_VAR, "old-job")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = String::new();
        sh.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        let _ = sh.wait();
        let orphan: i32 = out.trim().parse().unwrap();
        // Another root's marker is not ours to stop.
        let mut other = Command::new("sleep")
            .arg("60")
            .env(AGENT_VAR, d.path().join("elsewhere"))
            .spawn()
            .unwrap();
        let r = stop_leftovers(&root, &state, Duration::from_millis(200));
        let other_alive = pid_alive(other.id() as i32);
        let _ = other.kill();
        let _ = other.wait();
        assert_eq!(r.remaining, 0);
        assert!(
            r.stopped
                .get("old-job")
                .is_some_and(|p| p.contains(&orphan)),
            "{r:?}"
        );
        assert!(!pid_alive(orphan));
        assert!(other_alive);
        assert!(r.record.is_none());
    }
}
