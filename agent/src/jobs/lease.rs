//! Leases: a job whose coordinator stopped renewing is stopped by the agent itself.
//!
//! Renewal is an explicit Renew (the coordinator sends one every lease/4) or a Spawn or Watch
//! call naming the job. An open Watch stream alone does not count: a cut link may leave it
//! open on this side for a long time. The same monitor forgets finished jobs after a while.
//! It wakes only when something is due, or when told a deadline moved earlier.

use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use dglrun_proto::pb;
use tokio::sync::Notify;

use super::{error_chain, job::Job, stop_job, tree, Jobs};

/// The monitor sleeps until the next lease expiry or forget time, so an idle agent costs no
/// CPU. This bounds a sleep all the same, in case a deadline moved earlier without a wake-up.
const MAX_SLEEP: Duration = Duration::from_secs(10);
/// Shortest sleep: a deadline that is due but not yet actionable is not polled in a busy loop.
const MIN_SLEEP: Duration = Duration::from_millis(50);
/// A finished job stays listed (and its events replayable) this long.
pub(super) const KEEP_FINISHED: Duration = Duration::from_secs(60);

/// Starts the monitor; `wake` makes it look again at once (a job was added or its lease
/// changed, so a deadline may have moved earlier).
pub(crate) fn spawn_monitor(jobs: Weak<Jobs>, wake: Arc<Notify>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        tracing::error!("no async runtime: leases will not be enforced");
        return;
    };
    handle.spawn(async move {
        loop {
            let now = Instant::now();
            let next = {
                let Some(jobs) = jobs.upgrade() else { return };
                check(&jobs, now)
            };
            let sleep = next
                .map_or(MAX_SLEEP, |t| t.saturating_duration_since(now))
                .clamp(MIN_SLEEP, MAX_SLEEP);
            // A wake-up sent while `check` ran is kept by the Notify and ends this at once.
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = wake.notified() => {}
            }
        }
    });
}

/// Stops expired jobs and forgets old finished ones; returns when something is next due.
pub(super) fn check(jobs: &Arc<Jobs>, now: Instant) -> Option<Instant> {
    let mut next: Option<Instant> = None;
    let mut due = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
    for job in jobs.all() {
        let (start_stop, forget) = {
            let mut st = job.state();
            if let Some(at) = st.retry_stop_at {
                if now >= at && !st.gone {
                    st.retry_stop_at = None;
                    let (j, grace) = (job.clone(), jobs.config.grace);
                    tokio::spawn(async move { retry_stop(j, grace).await });
                } else {
                    due(at);
                }
            }
            let expiry = st.renewed + st.lease;
            let expired = now > expiry;
            let start_stop = expired && !st.lease_stopped && !st.gone;
            if start_stop {
                st.lease_stopped = true;
            } else if !expired && !st.lease_stopped && !st.gone {
                due(expiry);
            }
            let done_since = match st.finished_at {
                Some(t) => Some(t),
                None if st.procs.is_empty() => Some(st.renewed),
                None => None,
            };
            // A job being stopped is kept until a stop found nothing left.
            let unfinished_stop = st.stopping && !st.clean;
            let forget = done_since.is_some_and(|t| now.duration_since(t) >= KEEP_FINISHED)
                && (st.exits_seen || expired)
                && !start_stop
                && !unfinished_stop;
            if let (Some(t), false) = (done_since, forget) {
                // Forgotten once kept long enough and either watched to the end or abandoned.
                let at = t + KEEP_FINISHED;
                due(if st.exits_seen { at } else { at.max(expiry) });
            }
            (start_stop, forget)
        };
        if start_stop {
            let grace = jobs.config.grace;
            tokio::spawn(expire(job.clone(), grace));
        } else if forget {
            jobs.remove(job.id.as_str());
        }
    }
    next
}

/// Stops a job whose lease ran out, if anything of it still runs, and says so in the log.
async fn expire(job: Arc<Job>, grace: Duration) {
    let first = {
        let mut st = job.state();
        let first = !st.stopping;
        // A Spawn forking right now sees this when it is done and stops what it started.
        st.stopping = true;
        if st.clean {
            return;
        }
        first
    };
    let query = job.member_query();
    let pids = tokio::task::spawn_blocking(move || {
        tree::members(Path::new("/proc"), &query)
            .map(|m| m.iter().map(|p| p.pid).collect::<Vec<i32>>())
    })
    .await
    .unwrap_or_else(|e| {
        Err(tree::ScanError::List {
            path: "/proc".into(),
            source: std::io::Error::other(e),
        })
    });
    // A failed scan stops the job all the same: it may well run.
    let pids: Vec<i32> = match pids {
        Ok(p) if p.is_empty() => return,
        Ok(p) => p,
        Err(e) => {
            tracing::error!(job = %job.id, "cannot see the job's processes: {}", error_chain(&e));
            Vec::new()
        }
    };
    let lease = job.state().lease;
    tracing::warn!(job = %job.id, ?pids, lease_ms = lease.as_millis() as u64,
        "lease expired: no word from the coordinator; stopping the job's processes");
    // Watchers (and the job's record) learn why before the first signal; a job that a Stop
    // was already stopping keeps that Stop's requester.
    if first {
        job.record_stopped(pb::StopCause::LeaseExpired, "lease expiry");
    }
    stop_and_log(&job, grace, "after its lease expired").await;
}

/// Stops again a job whose last stop could not finish.
async fn retry_stop(job: Arc<Job>, grace: Duration) {
    stop_and_log(&job, grace, "on a retry").await;
}

/// Stops `job`; a stop that cannot see every process is logged, and the monitor retries it.
async fn stop_and_log(job: &Arc<Job>, grace: Duration, when: &str) {
    match stop_job(job, grace, false).await {
        Ok(outcome) => {
            tracing::warn!(job = %job.id, signalled = outcome.signalled, remaining = outcome.remaining,
            "job stopped {when}")
        }
        Err(e) => {
            tracing::error!(job = %job.id, "cannot stop the job {when}: {}; retrying", error_chain(&e))
        }
    }
}
