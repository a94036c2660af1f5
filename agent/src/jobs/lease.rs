//! Leases: a job whose coordinator stopped renewing is stopped by the agent itself.
//!
//! Renewal is an explicit Renew (the coordinator sends one every lease/4) or a Spawn or Watch
//! call naming the job. An open Watch stream alone does not count: a cut link may leave it
//! open on this side for a long time. The same monitor forgets finished jobs after a while.

use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::{job::Job, stop_job, tree, Jobs};

/// How often leases are checked.
const TICK: Duration = Duration::from_millis(100);
/// How often an agent without jobs looks: an idle agent should cost next to no CPU. A job
/// spawned meanwhile is checked at the next look, at most this much later.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// A finished job stays listed (and its events replayable) this long.
const KEEP_FINISHED: Duration = Duration::from_secs(60);

pub fn spawn_monitor(jobs: Weak<Jobs>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        tracing::error!("no async runtime: leases will not be enforced");
        return;
    };
    handle.spawn(async move {
        let mut idle = false;
        loop {
            tokio::time::sleep(if idle { IDLE_TICK } else { TICK }).await;
            let Some(jobs) = jobs.upgrade() else { return };
            check(&jobs, Instant::now());
            idle = jobs.all().is_empty();
        }
    });
}

fn check(jobs: &Arc<Jobs>, now: Instant) {
    for job in jobs.all() {
        let expired = job.lease_expired(now);
        let (start_stop, forget) = {
            let mut st = job.state();
            let start_stop = expired && !st.lease_stopped && !st.gone;
            if start_stop {
                st.lease_stopped = true;
            }
            let done_since = match st.finished_at {
                Some(t) => Some(t),
                None if st.procs.is_empty() => Some(st.renewed),
                None => None,
            };
            let forget = done_since.is_some_and(|t| now.duration_since(t) >= KEEP_FINISHED)
                && (st.exits_seen || expired)
                && !start_stop;
            (start_stop, forget)
        };
        if start_stop {
            let grace = jobs.config.grace;
            tokio::spawn(expire(job.clone(), grace));
        } else if forget {
            jobs.remove(&job.id);
        }
    }
}

/// Stops a job whose lease ran out, if anything of it still runs, and says so in the log.
async fn expire(job: Arc<Job>, grace: Duration) {
    if job.state().clean {
        return;
    }
    let query = job.member_query();
    let pids: Vec<i32> = tokio::task::spawn_blocking(move || {
        tree::members(Path::new("/proc"), &query)
            .iter()
            .map(|p| p.pid)
            .collect()
    })
    .await
    .unwrap_or_default();
    if pids.is_empty() {
        return;
    }
    let lease = job.state().lease;
    tracing::warn!(job = %job.id, ?pids, lease_ms = lease.as_millis() as u64,
        "lease expired: no word from the coordinator; stopping the job's processes");
    let outcome = stop_job(&job, grace, false).await;
    tracing::warn!(job = %job.id, signalled = outcome.signalled, remaining = outcome.remaining,
        "job stopped after its lease expired");
}
