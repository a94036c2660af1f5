//! DumpStacks: the Python stack of every Python process of a job, from `py-spy dump`.
//!
//! A hung DistDGL job is a quiet terminal; its stacks say who waits where. The members come
//! from the same /proc scan a stop uses (`tree`), so torchrun workers and samplers are found
//! however they were started. Each is labelled from the launched process it descends from:
//! a server, a trainer, a torchrun (whose Python children are the trainers, by `LOCAL_RANK`),
//! and the Python processes below a trainer are its samplers.
//!
//! py-spy runs as the agent's user, started through the reaper (the only waitpid). It pauses
//! its target while it reads it; a dump that outlives its timeout is killed and its target
//! sent SIGCONT, so a py-spy killed while attached never leaves a trainer stopped.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use dglrun_proto::pb;
use futures::StreamExt;
use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use tonic::Status;

use super::error::JobError;
use super::proc_stat::ProcEntry;
use super::reaper::{Exit, Reaper, Spawned};
use super::spec::{InvalidRequest, JobId};
use super::tree;
use super::Jobs;
use crate::blocking::{self, BlockingError};

/// Python processes dumped by one call; the rest are counted, not dumped.
pub const MAX_PROCESSES: usize = 128;
/// Bytes of one process's stack kept (a reply stays far below the message limit).
pub const MAX_STACK_BYTES: usize = 64 << 10;
/// Bytes of py-spy's error output kept.
const MAX_ERROR_BYTES: usize = 4 << 10;
/// Bytes of a command line reported.
const MAX_COMMAND_BYTES: u64 = 1 << 10;
/// Bytes of `/proc/<pid>/maps` searched for libpython.
const MAX_MAPS_BYTES: u64 = 4 << 20;
/// How long one py-spy may take.
pub const DUMP_TIMEOUT: Duration = Duration::from_secs(20);
/// py-spy processes an agent runs at once, across all calls.
pub const MAX_CONCURRENT_DUMPS: usize = 8;
/// DumpStacks calls served at once; more are refused, not queued.
pub const MAX_CALLS: usize = 4;
/// The program looked for on the agent's PATH.
const PY_SPY: &str = "py-spy";

static DUMPS: Semaphore = Semaphore::const_new(MAX_CONCURRENT_DUMPS);
static CALLS: Semaphore = Semaphore::const_new(MAX_CALLS);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StacksSpec {
    pub job_id: JobId,
    /// `py-spy dump --native`.
    pub native: bool,
}

impl TryFrom<pb::DumpStacksRequest> for StacksSpec {
    type Error = InvalidRequest;

    fn try_from(r: pb::DumpStacksRequest) -> Result<Self, InvalidRequest> {
        Ok(Self {
            job_id: JobId::parse(r.job_id)?,
            native: r.native,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StacksError {
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(
        "py-spy is not installed on {host} (no {PY_SPY} on the dgl-agent's PATH): \
         pip install py-spy, where the agent's PATH finds it"
    )]
    NoPySpy { host: String },
    #[error("the agent already serves {MAX_CALLS} DumpStacks calls, its limit")]
    TooManyCalls,
    #[error("cannot tell which processes belong to job {job}")]
    Scan {
        job: JobId,
        #[source]
        source: tree::ScanError,
    },
    #[error(transparent)]
    Blocking(#[from] BlockingError),
}

impl From<StacksError> for Status {
    fn from(e: StacksError) -> Self {
        let msg = crate::jobs::error_chain(&e);
        match e {
            StacksError::Job(j) => j.into(),
            StacksError::NoPySpy { .. } => Status::failed_precondition(msg),
            StacksError::TooManyCalls => Status::resource_exhausted(msg),
            StacksError::Scan { .. } | StacksError::Blocking(_) => Status::unavailable(msg),
        }
    }
}

/// One process of the job as the scan saw it.
#[derive(Clone, Debug)]
pub struct Member {
    pub entry: ProcEntry,
    pub python: bool,
    /// Its command line, spaces for NULs, bounded.
    pub command: String,
    /// `LOCAL_RANK` from its initial environment (torchrun gives each worker one).
    pub local_rank: Option<String>,
}

/// A Python process to dump, with its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Labelled {
    pub pid: i32,
    pub start: Option<u64>,
    pub label: String,
    pub role: &'static str,
    pub command: String,
}

/// What a launched process is, from the label the launch gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Server,
    Trainer,
    Torchrun,
    Other,
}

fn kind(label: &str) -> Kind {
    if label == "trainers" {
        Kind::Torchrun
    } else if label.starts_with("server") {
        Kind::Server
    } else if label.starts_with("trainer") {
        Kind::Trainer
    } else {
        Kind::Other
    }
}

/// The multiprocessing helper a command line runs, if any: not a sampler of its trainer.
fn helper(command: &str) -> Option<&'static str> {
    ["resource_tracker", "forkserver"]
        .into_iter()
        .find(|h| command.contains(&format!("multiprocessing.{h}")))
}

/// A member on its way to a label.
struct Named<'a> {
    /// Launched process (its launch order), Python depth below it, start time, pid.
    key: (usize, usize, u64, i32),
    /// The label, before a number when `numbered`.
    base: String,
    member: &'a Member,
    role: &'static str,
    /// Samplers and children get `<k>`, by start time within their base.
    numbered: bool,
}

/// Names every Python member: `seeds` are the job's launched processes (pid, label) in launch
/// order, `parents` maps every pid of the scan to its parent. Servers, trainers and torchruns
/// keep their launch label; a torchrun's Python child is `trainer<LOCAL_RANK>`; Python
/// processes below a trainer are `<trainer> sampler<k>`, below anything else `<label>
/// child<k>`, numbered by start time. The result is in launch order, parents first.
pub fn label_members(
    members: &[Member],
    seeds: &[(i32, String)],
    parents: &HashMap<i32, i32>,
) -> Vec<Labelled> {
    let family = Family {
        by_pid: members.iter().map(|m| (m.entry.pid, m)).collect(),
        seeds,
        seed_index: seeds
            .iter()
            .enumerate()
            .map(|(i, (pid, _))| (*pid, i))
            .collect(),
        parents,
    };
    let mut named: Vec<Named<'_>> = members
        .iter()
        .filter(|m| m.python)
        .map(|m| family.name(m))
        .collect();
    named.sort_by_key(|n| n.key);
    let labels = numbered_labels(&named);
    named
        .iter()
        .zip(labels)
        .map(|(n, label)| Labelled {
            pid: n.member.entry.pid,
            start: n.member.entry.start,
            label,
            role: n.role,
            command: n.member.command.clone(),
        })
        .collect()
}

/// What a member's name is read from: the scan and the launched processes.
struct Family<'a> {
    by_pid: HashMap<i32, &'a Member>,
    seeds: &'a [(i32, String)],
    /// A launched process's pid to its launch order.
    seed_index: HashMap<i32, usize>,
    parents: &'a HashMap<i32, i32>,
}

impl<'a> Family<'a> {
    fn name(&self, m: &'a Member) -> Named<'a> {
        let start = m.entry.start.unwrap_or(0);
        let (seed, chain) = self.ancestry(m.entry.pid);
        let Some(si) = seed else {
            return Named {
                key: (usize::MAX, 0, start, m.entry.pid),
                base: "orphan".into(),
                member: m,
                role: "orphan",
                numbered: false,
            };
        };
        // Python processes from the launched one down to m's parent, outermost first.
        let above: Vec<i32> = chain
            .iter()
            .skip(1)
            .rev()
            .copied()
            .filter(|&p| self.by_pid.get(&p).is_some_and(|a| a.python))
            .collect();
        let depth = above.len();
        let seed_label = &self.seeds[si].1;
        let kind = kind(seed_label);
        // The rank process m belongs to (a trainer, a server...), for helpers and samplers.
        let owner = match (kind, depth) {
            (Kind::Torchrun, d) if d >= 2 => self.worker_label(above[1], seed_label),
            _ => seed_label.clone(),
        };
        let (base, role, numbered) = naming(kind, depth, helper(&m.command));
        let base = match base {
            Base::Launched => seed_label.clone(),
            Base::Worker => self.worker_label(m.entry.pid, seed_label),
            Base::Owned(word) => format!("{owner} {word}"),
        };
        Named {
            key: (si, depth, start, m.entry.pid),
            base,
            member: m,
            role,
            numbered,
        }
    }

    /// The launched process `pid` descends from (its launch order), if any, and the pids from
    /// `pid` up to it.
    fn ancestry(&self, pid: i32) -> (Option<usize>, Vec<i32>) {
        let mut chain = vec![pid];
        let mut at = pid;
        let mut seed = self.seed_index.get(&at).copied();
        while seed.is_none() {
            match self.parents.get(&at) {
                Some(&p) if p > 1 && !chain.contains(&p) => {
                    chain.push(p);
                    at = p;
                    seed = self.seed_index.get(&at).copied();
                }
                _ => break,
            }
        }
        (seed, chain)
    }

    /// A torchrun worker's name: `trainer<LOCAL_RANK>`, or `<torchrun's label> worker`.
    fn worker_label(&self, pid: i32, seed_label: &str) -> String {
        self.by_pid
            .get(&pid)
            .and_then(|w| w.local_rank.clone())
            .map_or_else(|| format!("{seed_label} worker"), |r| format!("trainer{r}"))
    }
}

/// Where a member's label comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Base {
    /// The launched process's own label.
    Launched,
    /// A torchrun worker's name (`Family::worker_label`).
    Worker,
    /// `<owner> <word>`: under the rank process it belongs to.
    Owned(&'static str),
}

/// How a Python member is named, from the kind of launched process it descends from, the
/// Python processes between them (`depth`) and the multiprocessing helper it runs: its
/// label's base, its role, and whether it is numbered.
fn naming(kind: Kind, depth: usize, helper: Option<&'static str>) -> (Base, &'static str, bool) {
    match (kind, depth, helper) {
        (_, d, Some(h)) if d > 0 => (Base::Owned(h), "helper", false),
        (Kind::Server, 0, _) => (Base::Launched, "server", false),
        (Kind::Trainer, 0, _) => (Base::Launched, "trainer", false),
        (Kind::Torchrun, 0, _) => (Base::Launched, "torchrun", false),
        (Kind::Torchrun, 1, _) => (Base::Worker, "trainer", false),
        (Kind::Trainer | Kind::Torchrun, _, _) => (Base::Owned("sampler"), "sampler", true),
        (Kind::Other, 0, _) => (Base::Launched, "process", false),
        (Kind::Server | Kind::Other, _, _) => (Base::Owned("child"), "child", true),
    }
}

/// Each member's label: its base, with a number by start time within the base (ties by pid)
/// when it is numbered.
fn numbered_labels(named: &[Named<'_>]) -> Vec<String> {
    let mut numbering: Vec<(u64, i32, usize)> = named
        .iter()
        .enumerate()
        .filter(|(_, n)| n.numbered)
        .map(|(i, n)| (n.member.entry.start.unwrap_or(0), n.member.entry.pid, i))
        .collect();
    numbering.sort_unstable();
    let mut next: HashMap<String, usize> = HashMap::new();
    let mut labels: Vec<String> = named.iter().map(|n| n.base.clone()).collect();
    for (_, _, i) in numbering {
        let k = next.entry(named[i].base.clone()).or_insert(0);
        labels[i] = format!("{}{k}", named[i].base);
        *k += 1;
    }
    labels
}

/// `py-spy` on `path` (the agent's PATH): the first executable file of that name.
pub fn find_on_path(path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path?)
        .map(|dir| dir.join(PY_SPY))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn read_bounded(path: &Path, limit: u64) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(limit)
        .read_to_end(&mut buf)
        .ok()?;
    Some(buf)
}

/// Python: its executable is named `python*`, or it maps a libpython (an embedding program).
fn is_python(proc_root: &Path, pid: i32) -> bool {
    let dir = proc_root.join(pid.to_string());
    let by_name = std::fs::read_link(dir.join("exe")).is_ok_and(|exe| {
        exe.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("python"))
    });
    by_name
        || read_bounded(&dir.join("maps"), MAX_MAPS_BYTES)
            .is_some_and(|m| m.windows(9).any(|w| w == b"libpython"))
}

fn command_line(proc_root: &Path, pid: i32) -> String {
    let raw = read_bounded(
        &proc_root.join(pid.to_string()).join("cmdline"),
        MAX_COMMAND_BYTES,
    )
    .unwrap_or_default();
    let words: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    words.join(" ")
}

fn local_rank(proc_root: &Path, pid: i32) -> Option<String> {
    let env = tree::read_environ(proc_root, pid).ok()??;
    env.split(|&b| b == 0).find_map(|kv| {
        let v = kv.strip_prefix(b"LOCAL_RANK=")?;
        let v = std::str::from_utf8(v).ok()?;
        (!v.is_empty() && v.len() <= 8 && v.bytes().all(|b| b.is_ascii_digit()))
            .then(|| v.to_string())
    })
}

/// The job's Python processes, labelled, and how many members are not Python. Blocking.
fn scan(
    query: &tree::MemberQuery,
    seeds: &[(i32, String)],
) -> Result<(Vec<Labelled>, u32), tree::ScanError> {
    let proc_root = Path::new("/proc");
    let procs = tree::snapshot(proc_root)?;
    let found = tree::job_members(proc_root, &procs, query)?;
    let parents: HashMap<i32, i32> = procs.iter().map(|p| (p.pid, p.ppid)).collect();
    let members: Vec<Member> = found
        .into_iter()
        .map(|entry| {
            let python = is_python(proc_root, entry.pid);
            Member {
                entry,
                python,
                command: if python {
                    command_line(proc_root, entry.pid)
                } else {
                    String::new()
                },
                local_rank: if python {
                    local_rank(proc_root, entry.pid)
                } else {
                    None
                },
            }
        })
        .collect();
    let not_python = members.iter().filter(|m| !m.python).count() as u32;
    Ok((label_members(&members, seeds, &parents), not_python))
}

/// py-spy's output of one process.
#[derive(Debug, Default)]
struct Dump {
    stack: String,
    truncated: bool,
    error: String,
}

/// Reads `fd` to its end, keeping the first `limit` bytes; true when more came.
async fn read_capped(fd: Option<OwnedFd>, limit: usize) -> (Vec<u8>, bool) {
    let Some(Ok(mut pipe)) = fd.map(tokio::net::unix::pipe::Receiver::from_owned_fd) else {
        return (Vec::new(), false);
    };
    let mut kept = Vec::new();
    let mut more = false;
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return (kept, more),
            Ok(n) => {
                let room = limit.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                // Read on to the end: py-spy must never block on a full pipe.
                more |= n > room;
            }
        }
    }
}

/// What the kernel's Yama module says about tracing, when it restricts it.
fn yama_note() -> Option<String> {
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok()?;
    let scope = scope.trim();
    (scope != "0").then(|| {
        format!(
            " (kernel.yama.ptrace_scope is {scope} on this host: py-spy, started by the agent, \
             is no ancestor of the process; `sudo setcap cap_sys_ptrace+ep $(command -v py-spy)` \
             or ptrace_scope 0 lets it read the process)"
        )
    })
}

/// Runs `py-spy dump --pid P` for one process.
async fn dump_one(py_spy: &Path, p: &Labelled, native: bool) -> Dump {
    let _slot = DUMPS.acquire().await.ok();
    let mut spawned = match start_py_spy(py_spy, p.pid, native).await {
        Ok(s) => s,
        Err(e) => {
            return Dump {
                error: format!("cannot start {}: {e:#}", py_spy.display()),
                ..Dump::default()
            }
        }
    };
    let stdout = spawned.child.stdout.take().map(OwnedFd::from);
    let stderr = spawned.child.stderr.take().map(OwnedFd::from);
    let mut guard = Unfinished {
        py_spy: spawned.pidfd.take(),
        target: p,
        finished: false,
    };
    let run = async {
        let ((out, truncated), (err, _)) = tokio::join!(
            read_capped(stdout, MAX_STACK_BYTES),
            read_capped(stderr, MAX_ERROR_BYTES)
        );
        // The reaper never drops a registered sender; if it did, the status is unknown.
        let exit = (&mut spawned.exit).await.unwrap_or(Exit::Code(-1));
        (out, truncated, err, exit)
    };
    let outcome = tokio::time::timeout(DUMP_TIMEOUT, run).await;
    guard.finished = outcome.is_ok();
    drop(guard);
    match outcome {
        Ok((out, truncated, _, Exit::Code(0))) => Dump {
            stack: String::from_utf8_lossy(&out).into_owned(),
            truncated,
            error: String::new(),
        },
        Ok((_, _, err, exit)) => Dump {
            error: format!(
                "{}{}",
                py_spy_failure(exit, &err),
                yama_note().unwrap_or_default()
            ),
            ..Dump::default()
        },
        Err(_) => Dump {
            error: format!(
                "py-spy did not finish within {} s; it was killed",
                DUMP_TIMEOUT.as_secs()
            ),
            ..Dump::default()
        },
    }
}

/// Starts py-spy on `pid` through the reaper, its output on pipes.
async fn start_py_spy(py_spy: &Path, pid: i32, native: bool) -> anyhow::Result<Spawned> {
    let mut cmd = Command::new(py_spy);
    cmd.arg("dump").arg("--pid").arg(pid.to_string());
    if native {
        cmd.arg("--native");
    }
    cmd.env_remove("DGL_AGENT_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || Ok(Reaper::get()?.spawn(&mut cmd)?)).await?
}

/// What a failed py-spy said: how it ended and its error output, on one line.
fn py_spy_failure(exit: Exit, stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    let status = match exit {
        Exit::Code(c) => format!("exit {c}"),
        Exit::Signal(s) => format!("signal {s}"),
    };
    let said = if text.is_empty() {
        "no message".to_string()
    } else {
        text.replace('\n', "; ")
    };
    format!("py-spy failed ({status}): {said}")
}

/// A py-spy still running when its dump ends (the timeout, or the call dropped with its
/// client): it is killed, and its target sent SIGCONT, since a py-spy killed while attached
/// may leave the process it paused stopped.
struct Unfinished<'a> {
    py_spy: Option<super::pidfd::PidFd>,
    target: &'a Labelled,
    finished: bool,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(fd) = &self.py_spy {
            let _ = fd.signal(Signal::SIGKILL);
        }
        if let Some(start) = self.target.start {
            super::pidfd::signal_exact(self.target.pid, start, Signal::SIGCONT);
        }
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "this host".to_string())
}

impl Jobs {
    /// The stacks of every Python process of the job (see the module's documentation).
    pub async fn dump_stacks(&self, spec: StacksSpec) -> Result<pb::DumpStacksReply, StacksError> {
        let _call = CALLS.try_acquire().map_err(|_| StacksError::TooManyCalls)?;
        let job = self.get(&spec.job_id)?;
        let host = hostname();
        let py_spy = find_on_path(std::env::var_os("PATH").as_deref())
            .ok_or_else(|| StacksError::NoPySpy { host: host.clone() })?;
        let seeds: Vec<(i32, String)> = job
            .state()
            .procs
            .iter()
            .filter(|p| p.exit.is_none() && !p.reaped)
            .map(|p| (p.pid as i32, p.label.clone()))
            .collect();
        let query = job.member_query();
        let (labelled, not_python) = blocking::run(
            format!("scanning /proc for job {}", job.id),
            blocking::FS_TIMEOUT,
            move || scan(&query, &seeds),
        )
        .await?
        .map_err(|source| StacksError::Scan {
            job: job.id.clone(),
            source,
        })?;
        let omitted = labelled.len().saturating_sub(MAX_PROCESSES) as u32;
        let native = spec.native;
        let py_spy = &py_spy;
        let processes: Vec<pb::ProcessStack> =
            futures::stream::iter(labelled.into_iter().take(MAX_PROCESSES))
                .map(|p| async move {
                    let d = dump_one(py_spy, &p, native).await;
                    pb::ProcessStack {
                        pid: p.pid as u32,
                        label: p.label,
                        role: p.role.to_string(),
                        command: p.command,
                        stack: d.stack,
                        truncated: d.truncated,
                        error: d.error,
                    }
                })
                .buffered(MAX_CONCURRENT_DUMPS)
                .collect()
                .await;
        tracing::info!(job = %job.id, processes = processes.len(), omitted, "stacks dumped");
        Ok(pb::DumpStacksReply {
            processes,
            omitted,
            not_python,
            hostname: host,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(pid: i32, ppid: i32, start: u64, python: bool, command: &str) -> Member {
        Member {
            entry: ProcEntry {
                pid,
                ppid,
                pgid: pid,
                state: 'S',
                start: Some(start),
            },
            python,
            command: command.into(),
            local_rank: None,
        }
    }

    fn names(members: &[Member], seeds: &[(i32, &str)]) -> Vec<(i32, String, &'static str)> {
        let parents = members
            .iter()
            .map(|m| (m.entry.pid, m.entry.ppid))
            .collect();
        let seeds: Vec<(i32, String)> = seeds.iter().map(|(p, l)| (*p, l.to_string())).collect();
        label_members(members, &seeds, &parents)
            .into_iter()
            .map(|l| (l.pid, l.label, l.role))
            .collect()
    }

    #[test]
    fn direct_mode_servers_trainers_and_their_samplers() {
        // 100 is the agent. trainer1 runs through `sh -c` (a --setup): the shell is no Python.
        let members = vec![
            member(200, 100, 1, true, "python3 train.py"),
            member(300, 100, 2, true, "python3 train.py"),
            member(400, 100, 3, false, "/bin/sh -c ..."),
            member(401, 400, 4, true, "python3 train.py"),
            member(302, 300, 9, true, "python3 train.py"),
            member(301, 300, 8, true, "python3 train.py"),
            member(
                303,
                300,
                7,
                true,
                "python3 -c from multiprocessing.resource_tracker import main;main(5)",
            ),
            member(402, 401, 5, true, "python3 train.py"),
        ];
        let got = names(
            &members,
            &[(200, "server0"), (300, "trainer0"), (400, "trainer1")],
        );
        assert_eq!(
            got,
            [
                (200, "server0".to_string(), "server"),
                (300, "trainer0".into(), "trainer"),
                (303, "trainer0 resource_tracker".into(), "helper"),
                (301, "trainer0 sampler0".into(), "sampler"),
                (302, "trainer0 sampler1".into(), "sampler"),
                (401, "trainer1".into(), "trainer"),
                (402, "trainer1 sampler0".into(), "sampler"),
            ]
        );
    }

    #[test]
    fn torchrun_workers_are_trainers_by_local_rank_and_their_children_samplers() {
        let mut w0 = member(210, 200, 2, true, "python3 train.py");
        w0.local_rank = Some("0".into());
        let mut w1 = member(220, 200, 3, true, "python3 train.py");
        w1.local_rank = Some("1".into());
        let members = vec![
            member(200, 100, 1, true, "python3 -m torch.distributed.run"),
            w1,
            w0,
            member(221, 220, 4, true, "python3 train.py"),
            member(500, 100, 0, true, "python3 server.py"),
            member(600, 1, 5, true, "python3 lost.py"),
        ];
        let got = names(&members, &[(500, "server0"), (200, "trainers")]);
        assert_eq!(
            got,
            [
                (500, "server0".to_string(), "server"),
                (200, "trainers".into(), "torchrun"),
                (210, "trainer0".into(), "trainer"),
                (220, "trainer1".into(), "trainer"),
                (221, "trainer1 sampler0".into(), "sampler"),
                (600, "orphan".into(), "orphan"),
            ]
        );
    }

    #[test]
    fn a_member_is_named_by_what_it_descends_from_and_how_deep() {
        use Base::{Launched, Owned, Worker};
        let cases = [
            // (kind, depth, helper) -> (base, role, numbered)
            ((Kind::Server, 0, None), (Launched, "server", false)),
            ((Kind::Trainer, 0, None), (Launched, "trainer", false)),
            ((Kind::Torchrun, 0, None), (Launched, "torchrun", false)),
            ((Kind::Other, 0, None), (Launched, "process", false)),
            ((Kind::Torchrun, 1, None), (Worker, "trainer", false)),
            (
                (Kind::Trainer, 1, None),
                (Owned("sampler"), "sampler", true),
            ),
            (
                (Kind::Torchrun, 2, None),
                (Owned("sampler"), "sampler", true),
            ),
            ((Kind::Server, 1, None), (Owned("child"), "child", true)),
            ((Kind::Other, 3, None), (Owned("child"), "child", true)),
            (
                (Kind::Trainer, 1, Some("forkserver")),
                (Owned("forkserver"), "helper", false),
            ),
            (
                (Kind::Torchrun, 2, Some("resource_tracker")),
                (Owned("resource_tracker"), "helper", false),
            ),
            // A launched process is itself whatever it runs.
            (
                (Kind::Trainer, 0, Some("forkserver")),
                (Launched, "trainer", false),
            ),
        ];
        for ((kind, depth, helper), want) in cases {
            assert_eq!(
                naming(kind, depth, helper),
                want,
                "{kind:?} {depth} {helper:?}"
            );
        }
    }

    #[test]
    fn a_failed_dump_says_how_py_spy_ended_and_what_it_said() {
        let cases = [
            (Exit::Code(1), "", "py-spy failed (exit 1): no message"),
            (
                Exit::Signal(9),
                " \n",
                "py-spy failed (signal 9): no message",
            ),
            (
                Exit::Code(1),
                "Error: Permission denied\nTry sudo\n",
                "py-spy failed (exit 1): Error: Permission denied; Try sudo",
            ),
        ];
        for (exit, stderr, want) in cases {
            assert_eq!(py_spy_failure(exit, stderr.as_bytes()), want, "{stderr:?}");
        }
    }

    #[test]
    fn py_spy_is_found_only_as_an_executable_file_on_path() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(a.join(PY_SPY)).unwrap(); // a directory: no
        std::fs::create_dir_all(&b).unwrap();
        let plain = b.join(PY_SPY);
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        let path = std::env::join_paths([&a, &b]).unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(find_on_path(Some(&path)), None);
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_on_path(Some(&path)), Some(plain));
        assert_eq!(find_on_path(None), None);
    }

    #[test]
    fn this_test_process_is_no_python_and_its_command_line_is_read() {
        let me = std::process::id() as i32;
        assert!(!is_python(Path::new("/proc"), me));
        assert!(!command_line(Path::new("/proc"), me).is_empty());
    }
}
