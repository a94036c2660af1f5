//! Stopping a job's whole process tree: SIGTERM, grace, SIGKILL, until nothing is left.
//!
//! Members are rescanned on every round (see `tree`): a process may fork while it is being
//! stopped, and a child that left the group (setsid) is still found by its marker, or by the
//! job's cgroup where it has one (whose `cgroup.kill` also ends every SIGKILL round).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::pidfd;
use super::proc_stat::ProcEntry;
use super::tree::{self, MemberQuery, ScanError, Seed};

/// How often /proc is rescanned while waiting for processes to go: first after
/// [`FIRST_POLL`] (most processes die at once on SIGTERM), then ever less often up to [`POLL`].
const POLL: Duration = Duration::from_millis(20);
const FIRST_POLL: Duration = Duration::from_millis(1);
/// How long SIGKILL is repeated before the agent gives up and reports what is left
/// (a process stuck in uninterruptible sleep cannot be killed sooner).
const KILL_PATIENCE: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StopOutcome {
    /// Distinct processes that were signalled.
    pub signalled: u32,
    /// Still alive when the agent gave up.
    pub remaining: u32,
}

async fn scan(query: MemberQuery) -> Result<(Vec<ProcEntry>, Vec<ProcEntry>), ScanError> {
    tokio::task::spawn_blocking(move || {
        let root = Path::new("/proc");
        let all = tree::snapshot(root)?;
        let members = tree::job_members(root, &all, &query)?;
        Ok((members, all))
    })
    .await
    .unwrap_or_else(|e| {
        Err(ScanError::List {
            path: "/proc".into(),
            source: std::io::Error::other(e),
        })
    })
}

/// Signals one member: a direct child through the pidfd held since its spawn, anything else
/// through a pidfd checked against the start time the scan read.
fn signal_member(m: &ProcEntry, seeds: &HashMap<i32, &Seed>, sig: Signal) {
    if let Some(fd) = seeds.get(&m.pid).and_then(|s| s.pidfd.as_ref()) {
        let _ = fd.signal(sig);
        return;
    }
    match m.start {
        Some(start) => {
            pidfd::signal_exact(m.pid, start, sig);
        }
        // A stat line without a start time cannot tell this process from a later one that got
        // its pid: it is not signalled, and stays among the remaining until a scan reads it whole.
        None => {
            tracing::warn!(
                pid = m.pid,
                "no start time in /proc/{}/stat: not signalled",
                m.pid
            );
        }
    }
}

fn send(
    sig: Signal,
    members: &[ProcEntry],
    all: &[ProcEntry],
    query: &MemberQuery,
    signalled: &mut HashSet<i32>,
) {
    let own_pgid = nix::unistd::getpgrp().as_raw();
    // A group id is only safe to signal while it cannot have been reused: its leader is a
    // child the agent has not reaped. Other groups' members are reached one by one below.
    let reaper = super::reaper::Reaper::get().ok();
    // A stopped process would not act on SIGTERM until continued.
    let sigs: &[Signal] = if sig == Signal::SIGTERM {
        &[Signal::SIGTERM, Signal::SIGCONT]
    } else {
        &[sig]
    };
    for g in tree::whole_groups(members, all, own_pgid) {
        if let Some(r) = &reaper {
            r.signal_unreaped_group(g, sigs);
        }
    }
    let seeds: HashMap<i32, &Seed> = query.seeds.iter().map(|s| (s.pid, s)).collect();
    for m in members {
        signal_member(m, &seeds, sig);
        if sig == Signal::SIGTERM && m.state == 'T' {
            signal_member(m, &seeds, Signal::SIGCONT);
        }
        signalled.insert(m.pid);
    }
}

/// When /proc cannot be read, the direct children can still be reached through their pidfds.
fn send_to_seeds(sig: Signal, query: &MemberQuery) {
    for fd in query.seeds.iter().filter_map(|s| s.pidfd.as_ref()) {
        let _ = fd.signal(sig);
    }
}

/// Stops every member `query` finds; returns when none is left (or after [`KILL_PATIENCE`]
/// of SIGKILL). `force` skips SIGTERM and the grace period. A failed scan of /proc ends the
/// stop with an error (after signalling the direct children): nothing may be called stopped
/// that could not be seen.
pub async fn stop_tree(
    query: impl Fn() -> MemberQuery,
    grace: Duration,
    force: bool,
) -> Result<StopOutcome, ScanError> {
    let mut signalled = HashSet::new();
    let mut poll = FIRST_POLL;
    let outcome = |signalled: &HashSet<i32>, remaining: usize| StopOutcome {
        signalled: signalled.len() as u32,
        remaining: remaining as u32,
    };
    if !force {
        let deadline = Instant::now() + grace;
        loop {
            let q = query();
            let (members, all) = match scan(q.clone()).await {
                Ok(x) => x,
                Err(e) => {
                    send_to_seeds(Signal::SIGTERM, &q);
                    return Err(e);
                }
            };
            if members.is_empty() {
                return Ok(outcome(&signalled, 0));
            }
            if Instant::now() >= deadline {
                break;
            }
            // Only processes not yet asked: repeating SIGTERM could cut a clean shutdown short
            // in programs that treat a second SIGTERM as "now".
            let fresh: Vec<ProcEntry> = members
                .iter()
                .filter(|m| !signalled.contains(&m.pid))
                .copied()
                .collect();
            if !fresh.is_empty() {
                send(Signal::SIGTERM, &fresh, &all, &q, &mut signalled);
            }
            tokio::time::sleep(poll.min(deadline.saturating_duration_since(Instant::now()))).await;
            poll = (poll * 2).min(POLL);
        }
    }
    let deadline = Instant::now() + KILL_PATIENCE;
    poll = FIRST_POLL;
    loop {
        let q = query();
        let (members, all) = match scan(q.clone()).await {
            Ok(x) => x,
            Err(e) => {
                send_to_seeds(Signal::SIGKILL, &q);
                return Err(e);
            }
        };
        if members.is_empty() {
            return Ok(outcome(&signalled, 0));
        }
        // Every scan that found something is followed by SIGKILL, however late it came back.
        let give_up = Instant::now() >= deadline;
        if let Some(cg) = q.cgroup.clone() {
            // Everything in the cgroup, including what forks between the scan and the signal.
            let killed = tokio::task::spawn_blocking(move || {
                cg.kill().map_err(|e| (cg.dir().to_path_buf(), e))
            })
            .await;
            if let Ok(Err((dir, e))) = killed {
                tracing::warn!(cgroup = %dir.display(), "cgroup.kill failed: {e}");
            }
        }
        send(Signal::SIGKILL, &members, &all, &q, &mut signalled);
        if give_up {
            return Ok(outcome(&signalled, members.len()));
        }
        tokio::time::sleep(poll).await;
        poll = (poll * 2).min(POLL);
    }
}
