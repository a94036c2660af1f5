//! Which live processes belong to a job, read from `/proc`.
//!
//! A process group is not enough to find a job's processes: torchrun starts each worker in a
//! new session, DGL's samplers are children of the trainers, and a daemon may `setsid()` and
//! double-fork. So a job's members are
//!   * its direct children still running (the seeds),
//!   * every process whose initial environment carries the job's marker variables (inherited by
//!     all descendants unless one deliberately scrubs its environment, even across setsid), and
//!   * every descendant of either, by parent pid.
//!
//! Orphans are reparented to the agent (it is a child subreaper), so they never escape to init
//! and the marker still identifies them.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::cgroup::JobCgroup;
use super::pidfd::PidFd;
use super::proc_stat::{parse_stat, ProcEntry};

/// Largest `/proc/<pid>/environ` the scan reads; the marker is looked for in this prefix only.
const MAX_ENVIRON_BYTES: u64 = 4 << 20;

/// True when every entry of `marker` (each `NAME=value`) is one of the NUL-separated
/// entries of `environ`.
pub fn environ_has(environ: &[u8], marker: &[Vec<u8>]) -> bool {
    marker.iter().all(|m| {
        environ
            .split(|&b| b == 0)
            .any(|entry| entry == m.as_slice())
    })
}

/// A failed read of /proc. Never taken for "no processes": a scan that cannot see a process
/// must not report it gone.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot list {path}")]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A process that exited between listing and reading (or whose files the agent may not read,
/// for `environ` of another user's process) is simply not there; anything else (EMFILE,
/// ENOMEM, EIO) means the scan is blind.
fn vanished(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
    ) || e.raw_os_error() == Some(nix::libc::ESRCH)
}

/// All processes visible under `proc_root` (normally `/proc`). Processes that vanish while
/// being read are skipped; any other failure is an error.
pub fn snapshot(proc_root: &Path) -> Result<Vec<ProcEntry>, ScanError> {
    let list_err = |source| ScanError::List {
        path: proc_root.to_path_buf(),
        source,
    };
    let dir = std::fs::read_dir(proc_root).map_err(list_err)?;
    let mut out = Vec::new();
    let mut buf = Vec::with_capacity(STAT_BYTES);
    for entry in dir {
        let entry = entry.map_err(list_err)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.parse::<i32>().is_err() {
            continue;
        }
        let path = entry.path().join("stat");
        let text = match read_stat(&path, &mut buf) {
            Ok(t) => t,
            Err(e) if vanished(&e) => continue,
            Err(source) => return Err(ScanError::Read { path, source }),
        };
        if let Some(p) = parse_stat(text) {
            out.push(p);
        }
    }
    Ok(out)
}

/// One `/proc/<pid>/stat` into `buf`: a stop scans every process on the host after each
/// command, so one open, one read and one close each (procfs hands the whole line to the first
/// read when the buffer holds it), not the size probe and growing reads of `read_to_string`.
fn read_stat<'b>(path: &Path, buf: &'b mut Vec<u8>) -> io::Result<&'b str> {
    let mut f = std::fs::File::open(path)?;
    buf.clear();
    let mut filled = 0;
    loop {
        if filled == buf.capacity() {
            buf.reserve(STAT_BYTES);
        }
        buf.resize(buf.capacity(), 0);
        let n = f.read(&mut buf[filled..])?;
        filled += n;
        // A short read of a procfs file is its end.
        if n == 0 || filled < buf.len() {
            break;
        }
    }
    buf.truncate(filled);
    std::str::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Room for a stat line: 52 numbers and a name of at most 64 bytes.
const STAT_BYTES: usize = 1024;

/// A process's initial environment (bounded); None when it is gone or not readable.
pub fn read_environ(proc_root: &Path, pid: i32) -> Result<Option<Vec<u8>>, ScanError> {
    let path = proc_root.join(pid.to_string()).join("environ");
    let read = || -> io::Result<Vec<u8>> {
        let f = std::fs::File::open(&path)?;
        let mut buf = Vec::new();
        f.take(MAX_ENVIRON_BYTES).read_to_end(&mut buf)?;
        Ok(buf)
    };
    match read() {
        Ok(buf) => Ok(Some(buf)),
        Err(e) if vanished(&e) => Ok(None),
        Err(source) => Err(ScanError::Read { path, source }),
    }
}

/// A direct child of the agent, as spawned: pid, start time and, where the kernel has them,
/// a pidfd. Matched in /proc by pid *and* start time, so a reused pid is never a member.
#[derive(Clone, Debug)]
pub struct Seed {
    pub pid: i32,
    pub start: Option<u64>,
    pub pidfd: Option<Arc<PidFd>>,
}

impl Seed {
    /// A seed known by pid alone (no start time, no pidfd).
    pub fn pid(pid: i32) -> Self {
        Self {
            pid,
            start: None,
            pidfd: None,
        }
    }

    fn matches(&self, p: &ProcEntry) -> bool {
        self.pid == p.pid && (self.start.is_none() || self.start == p.start)
    }
}

/// What identifies a job's processes.
#[derive(Clone, Debug, Default)]
pub struct MemberQuery {
    /// Direct children not yet exited.
    pub seeds: Vec<Seed>,
    /// Environment entries (`NAME=value`) every process of the job inherited.
    pub marker: Vec<Vec<u8>>,
    /// Never reported as a member: the agent itself.
    pub exclude: i32,
    /// Only processes descending from this pid are checked for the marker. The agent is a
    /// child subreaper, so every orphan of its jobs is reparented into its own subtree; reading
    /// just those environments keeps a scan cheap on a busy host and keeps agents that share a
    /// host out of each other's jobs. None: every process is checked.
    pub within: Option<i32>,
    /// The job's cgroup, where the agent could make one: every live process in it is a member.
    pub cgroup: Option<Arc<JobCgroup>>,
}

/// The live members of a job among `procs`; `environ` reads a process's environment.
pub fn members_in(
    procs: &[ProcEntry],
    query: &MemberQuery,
    mut environ: impl FnMut(i32) -> Result<Option<Vec<u8>>, ScanError>,
) -> Result<Vec<ProcEntry>, ScanError> {
    let seeds: HashMap<i32, &Seed> = query.seeds.iter().map(|s| (s.pid, s)).collect();
    let is_seed = |p: &ProcEntry| seeds.get(&p.pid).is_some_and(|s| s.matches(p));
    let mut children: HashMap<i32, Vec<usize>> = HashMap::new();
    for (i, p) in procs.iter().enumerate() {
        children.entry(p.ppid).or_default().push(i);
    }
    let inside = match query.within {
        Some(top) => subtree(procs, &children, top),
        None => vec![true; procs.len()],
    };
    let mut chosen = vec![false; procs.len()];
    let mut queue = Vec::new();
    for (i, p) in procs.iter().enumerate() {
        if p.pid == query.exclude || p.pid <= 1 || !inside[i] {
            continue;
        }
        // Zombies have no environ to read and no children left; skipping them saves reads.
        let by_marker = is_seed(p)
            || (p.is_alive()
                && !query.marker.is_empty()
                && environ(p.pid)?.is_some_and(|e| environ_has(&e, &query.marker)));
        if by_marker {
            chosen[i] = true;
            queue.push(p.pid);
        }
    }
    while let Some(pid) = queue.pop() {
        for &c in children.get(&pid).map(Vec::as_slice).unwrap_or(&[]) {
            if !chosen[c] && procs[c].pid != query.exclude {
                chosen[c] = true;
                queue.push(procs[c].pid);
            }
        }
    }
    Ok(procs
        .iter()
        .zip(chosen)
        .filter(|(p, c)| *c && p.is_alive())
        .map(|(p, _)| *p)
        .collect())
}

/// Marks the processes below `top` (not `top` itself).
fn subtree(procs: &[ProcEntry], children: &HashMap<i32, Vec<usize>>, top: i32) -> Vec<bool> {
    let mut inside = vec![false; procs.len()];
    let mut queue = vec![top];
    while let Some(pid) = queue.pop() {
        for &c in children.get(&pid).map(Vec::as_slice).unwrap_or(&[]) {
            if !inside[c] {
                inside[c] = true;
                queue.push(procs[c].pid);
            }
        }
    }
    inside
}

/// The live members of a job right now, from `proc_root` (normally `/proc`).
/// Blocking: reads many small files.
pub fn members(proc_root: &Path, query: &MemberQuery) -> Result<Vec<ProcEntry>, ScanError> {
    let procs = snapshot(proc_root)?;
    job_members(proc_root, &procs, query)
}

/// [`members_in`] `procs`, plus every live process of the job's cgroup (which finds what
/// scrubbed its environment and left the tree). Blocking.
pub fn job_members(
    proc_root: &Path,
    procs: &[ProcEntry],
    query: &MemberQuery,
) -> Result<Vec<ProcEntry>, ScanError> {
    let mut found = members_in(procs, query, |pid| read_environ(proc_root, pid))?;
    if let Some(cg) = &query.cgroup {
        let pids: HashSet<i32> = cg
            .pids()
            .map_err(|source| ScanError::Read {
                path: cg.procs_path(),
                source,
            })?
            .into_iter()
            .collect();
        let known: HashSet<i32> = found.iter().map(|p| p.pid).collect();
        found.extend(procs.iter().filter(|p| {
            pids.contains(&p.pid)
                && p.is_alive()
                && p.pid != query.exclude
                && !known.contains(&p.pid)
        }));
    }
    Ok(found)
}

/// Process groups that may be signalled as a whole: every process of the group in `all`
/// is a member, and it is not the agent's own group. Signalling the group as well as each
/// pid catches a child forked between the scan and the signal.
pub fn whole_groups(members: &[ProcEntry], all: &[ProcEntry], own_pgid: i32) -> Vec<i32> {
    let member_pids: HashSet<i32> = members.iter().map(|p| p.pid).collect();
    let mut groups: Vec<i32> = members.iter().map(|p| p.pgid).collect();
    groups.sort_unstable();
    groups.dedup();
    groups.retain(|&g| {
        g > 1
            && g != own_pgid
            && all
                .iter()
                .filter(|p| p.pgid == g && p.is_alive())
                .all(|p| member_pids.contains(&p.pid))
    });
    groups
}

#[cfg(test)]
mod tests {
    use super::super::proc_stat::tests::p;
    use super::*;

    #[test]
    fn environ_marker_matches_whole_entries_only() {
        let env = b"A=1\0DGLRUN_JOB_ID=j1\0DGLRUN_AGENT=/r\0".to_vec();
        let m = |s: &[&str]| s.iter().map(|x| x.as_bytes().to_vec()).collect::<Vec<_>>();
        assert!(environ_has(
            &env,
            &m(&["DGLRUN_JOB_ID=j1", "DGLRUN_AGENT=/r"])
        ));
        assert!(!environ_has(&env, &m(&["DGLRUN_JOB_ID=j"])));
        assert!(!environ_has(
            &env,
            &m(&["DGLRUN_JOB_ID=j1", "DGLRUN_AGENT=/r2"])
        ));
        assert!(environ_has(b"X=1", &m(&["X=1"])));
    }

    #[test]
    fn members_are_seeds_marked_processes_and_their_descendants() {
        // 100 = agent. 200 direct child; 201 its child; 202 grandchild in its own session;
        // 300 an orphan adopted by the agent that still carries the marker; 301 its child
        // whose environment was scrubbed; 400 unrelated; 500 marked zombie; 600 marked but of
        // another job.
        let procs = vec![
            p(1, 0, 1, 'S'),
            p(100, 1, 100, 'S'),
            p(200, 100, 200, 'S'),
            p(201, 200, 200, 'R'),
            p(202, 201, 202, 'S'),
            p(300, 100, 300, 'S'),
            p(301, 300, 300, 'S'),
            p(400, 1, 400, 'S'),
            p(500, 100, 500, 'Z'),
            p(600, 100, 600, 'S'),
        ];
        let marker = vec![b"DGLRUN_JOB_ID=j".to_vec()];
        let envs = |pid: i32| -> Option<Vec<u8>> {
            match pid {
                300 | 500 => Some(b"DGLRUN_JOB_ID=j".to_vec()),
                600 => Some(b"DGLRUN_JOB_ID=other".to_vec()),
                _ => Some(Vec::new()),
            }
        };
        let mut q = MemberQuery {
            seeds: vec![Seed::pid(200)],
            marker,
            exclude: 100,
            within: Some(100),
            cgroup: None,
        };
        let mut got: Vec<i32> = members_in(&procs, &q, |pid| Ok(envs(pid)))
            .unwrap()
            .iter()
            .map(|p| p.pid)
            .collect();
        got.sort();
        assert_eq!(got, [200, 201, 202, 300, 301]);
        // A marked process outside the agent's subtree belongs to another agent's job.
        let mut procs = procs;
        procs.push(p(700, 1, 700, 'S'));
        let envs = |pid: i32| (pid == 700 || pid == 300).then(|| b"DGLRUN_JOB_ID=j".to_vec());
        let mut got: Vec<i32> = members_in(&procs, &q, |pid| Ok(envs(pid)))
            .unwrap()
            .iter()
            .map(|p| p.pid)
            .collect();
        got.sort();
        assert_eq!(got, [200, 201, 202, 300, 301]);
        q.within = None;
        let mut got: Vec<i32> = members_in(&procs, &q, |pid| Ok(envs(pid)))
            .unwrap()
            .iter()
            .map(|p| p.pid)
            .collect();
        got.sort();
        assert_eq!(got, [200, 201, 202, 300, 301, 700]);
    }

    #[test]
    fn a_seed_matches_its_pid_only_with_its_start_time() {
        let mut reused = p(200, 100, 200, 'S');
        reused.start = Some(9);
        let procs = vec![p(100, 1, 100, 'S'), reused];
        let mut q = MemberQuery {
            seeds: vec![Seed {
                pid: 200,
                start: Some(5),
                pidfd: None,
            }],
            marker: vec![],
            exclude: 100,
            within: None,
            cgroup: None,
        };
        assert!(members_in(&procs, &q, |_| Ok(None)).unwrap().is_empty());
        q.seeds[0].start = Some(9);
        assert_eq!(members_in(&procs, &q, |_| Ok(None)).unwrap().len(), 1);
    }

    #[test]
    fn an_unreadable_proc_is_an_error_not_an_empty_list() {
        let missing = Path::new("/nonexistent/dglrun-proc");
        assert!(matches!(snapshot(missing), Err(ScanError::List { .. })));
        let q = MemberQuery::default();
        assert!(members(missing, &q).is_err());
    }

    #[test]
    fn the_agent_itself_is_never_a_member() {
        let procs = vec![p(100, 1, 100, 'S'), p(200, 100, 200, 'S')];
        let q = MemberQuery {
            seeds: vec![Seed::pid(100), Seed::pid(200)],
            marker: vec![],
            exclude: 100,
            within: None,
            cgroup: None,
        };
        let got: Vec<i32> = members_in(&procs, &q, |_| Ok(None))
            .unwrap()
            .iter()
            .map(|p| p.pid)
            .collect();
        assert_eq!(got, [200]);
    }

    #[test]
    fn groups_are_signalled_whole_only_when_all_theirs() {
        let procs = vec![
            p(100, 1, 100, 'S'),
            p(200, 100, 200, 'S'),
            p(201, 200, 200, 'S'),
            p(300, 100, 300, 'S'),
            p(301, 1, 300, 'S'),   // not a member, same group
            p(400, 100, 100, 'S'), // in the agent's group
        ];
        let members = vec![procs[1], procs[2], procs[3], procs[5]];
        assert_eq!(whole_groups(&members, &procs, 100), [200]);
    }

    #[test]
    fn a_real_process_tree_is_found_by_marker_after_setsid() {
        use std::process::{Command, Stdio};
        let tag = format!("DGLRUN_TREE_TEST={}", std::process::id());
        let (name, value) = tag.split_once('=').unwrap();
        // The shell starts a setsid'd sleeper and exits at once; the sleeper keeps the marker.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("setsid sleep 30 </dev/null >/dev/null 2>&1 & echo $!")
            .env(name, value)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        // The agent's reaper may run in this test process and collect the status first.
        let _ = child.wait();
        let sleeper: i32 = out.trim().parse().unwrap();
        let q = MemberQuery {
            seeds: vec![],
            marker: vec![tag.into_bytes()],
            exclude: std::process::id() as i32,
            within: None,
            cgroup: None,
        };
        let mut found = Vec::new();
        for _ in 0..100 {
            found = members(Path::new("/proc"), &q).unwrap();
            if found.iter().any(|p| p.pid == sleeper) {
                break;
            }
            #[allow(clippy::disallowed_methods)] // a test
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(sleeper),
            nix::sys::signal::Signal::SIGKILL,
        );
        assert!(found.iter().any(|p| p.pid == sleeper), "{found:?}");
    }
}
