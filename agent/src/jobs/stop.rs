//! Stopping a job's whole process tree: SIGTERM, grace, SIGKILL, until nothing is left.
//!
//! Members are rescanned on every round (see `tree`): a process may fork while it is being
//! stopped, and a child that left the group (setsid) is still found by its marker.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use super::tree::{self, MemberQuery, ProcEntry};

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

async fn scan(query: MemberQuery) -> (Vec<ProcEntry>, Vec<ProcEntry>) {
    tokio::task::spawn_blocking(move || {
        let root = Path::new("/proc");
        let all = tree::snapshot(root);
        let members = tree::members_in(&all, &query, |pid| tree::read_environ(root, pid));
        (members, all)
    })
    .await
    .unwrap_or_default()
}

fn send(sig: Signal, members: &[ProcEntry], all: &[ProcEntry], signalled: &mut HashSet<i32>) {
    let own_pgid = nix::unistd::getpgrp().as_raw();
    for g in tree::whole_groups(members, all, own_pgid) {
        let _ = killpg(Pid::from_raw(g), sig);
        if sig == Signal::SIGTERM {
            // A stopped process would not act on SIGTERM until continued.
            let _ = killpg(Pid::from_raw(g), Signal::SIGCONT);
        }
    }
    for m in members {
        let _ = kill(Pid::from_raw(m.pid), sig);
        if sig == Signal::SIGTERM && m.state == 'T' {
            let _ = kill(Pid::from_raw(m.pid), Signal::SIGCONT);
        }
        signalled.insert(m.pid);
    }
}

/// Stops every member `query` finds; returns when none is left (or after [`KILL_PATIENCE`]
/// of SIGKILL). `force` skips SIGTERM and the grace period.
pub async fn stop_tree(
    query: impl Fn() -> MemberQuery,
    grace: Duration,
    force: bool,
) -> StopOutcome {
    let mut signalled = HashSet::new();
    let mut poll = FIRST_POLL;
    let outcome = |signalled: &HashSet<i32>, remaining: usize| StopOutcome {
        signalled: signalled.len() as u32,
        remaining: remaining as u32,
    };
    if !force {
        let deadline = Instant::now() + grace;
        loop {
            let (members, all) = scan(query()).await;
            if members.is_empty() {
                return outcome(&signalled, 0);
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
                send(Signal::SIGTERM, &fresh, &all, &mut signalled);
            }
            tokio::time::sleep(poll.min(deadline.saturating_duration_since(Instant::now()))).await;
            poll = (poll * 2).min(POLL);
        }
    }
    let deadline = Instant::now() + KILL_PATIENCE;
    poll = FIRST_POLL;
    loop {
        let (members, all) = scan(query()).await;
        if members.is_empty() {
            return outcome(&signalled, 0);
        }
        if Instant::now() >= deadline {
            return outcome(&signalled, members.len());
        }
        send(Signal::SIGKILL, &members, &all, &mut signalled);
        tokio::time::sleep(poll).await;
        poll = (poll * 2).min(POLL);
    }
}
