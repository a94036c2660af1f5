//! Retention of finished jobs' logs and records (`.dglrun/jobs/<id>/`): oldest first, a job
//! goes once it ended longer ago than the age bound, while all jobs' files take more than the
//! size bound, or while more than [`MAX_RECORDS`] finished jobs are kept. A running job is
//! never deleted (its size still counts). Each deletion is logged with its reason.

use std::ffi::OsStr;
use std::time::Duration;

use super::history::{now_ms, History};
use crate::confine::Dir;

/// Finished jobs kept at most, whatever their size.
pub const MAX_RECORDS: usize = 1000;

/// The bounds on finished jobs' logs and records.
#[derive(Clone, Debug, PartialEq)]
pub struct Retention {
    /// Finished jobs are deleted, oldest first, while all jobs' files take more.
    pub max_total_bytes: u64,
    /// Finished jobs older than this are deleted.
    pub max_age: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_total_bytes: 4 << 30,
            max_age: Duration::from_secs(14 * 24 * 3600),
        }
    }
}

/// A job as retention sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Kept {
    job: String,
    /// None while it runs.
    ended_ms: Option<u64>,
    bytes: u64,
}

/// Deletes what the rules say from `jobs` (the jobs directory) and `history`; returns the ids
/// deleted. Blocking.
pub(super) fn enforce(jobs: &Dir, history: &History, config: &Retention) -> Vec<String> {
    let kept: Vec<Kept> = history
        .all()
        .into_iter()
        .map(|r| Kept {
            bytes: dir_bytes(jobs, &r.job_id),
            job: r.job_id,
            ended_ms: r.ended_unix_ms,
        })
        .collect();
    let mut deleted = Vec::new();
    for (k, reason) in choose(now_ms(), kept, config) {
        match remove_job_dir(jobs, &k.job) {
            Ok(()) => {
                tracing::info!(job = %k.job, bytes = k.bytes, ended_unix_ms = k.ended_ms.unwrap_or(0), "retention: deleted the finished job's logs and record: {reason}");
                history.remove(&k.job);
                deleted.push(k.job);
            }
            Err(e) => {
                tracing::warn!(job = %k.job, "retention: cannot delete the finished job's logs: {e}")
            }
        }
    }
    deleted
}

/// The jobs to delete, oldest first, each with why.
fn choose(now_ms: u64, kept: Vec<Kept>, config: &Retention) -> Vec<(Kept, String)> {
    let mut total: u64 = kept.iter().map(|k| k.bytes).sum();
    let mut finished: Vec<Kept> = kept.into_iter().filter(|k| k.ended_ms.is_some()).collect();
    finished.sort_by_key(|k| (k.ended_ms, k.job.clone()));
    let max_age_ms = config.max_age.as_millis() as u64;
    let mut count = finished.len();
    let mut out = Vec::new();
    for k in finished {
        let ended = k.ended_ms.unwrap_or(now_ms);
        let reason = if now_ms.saturating_sub(ended) > max_age_ms {
            format!("ended more than {} s ago", config.max_age.as_secs())
        } else if total > config.max_total_bytes {
            format!(
                "the jobs' logs take {total} bytes, more than the {} allowed",
                config.max_total_bytes
            )
        } else if count > MAX_RECORDS {
            format!("more than {MAX_RECORDS} finished jobs are kept")
        } else {
            continue;
        };
        total = total.saturating_sub(k.bytes);
        count -= 1;
        out.push((k, reason));
    }
    out
}

/// Bytes of the files in a job's directory.
fn dir_bytes(jobs: &Dir, job: &str) -> u64 {
    let Ok(d) = jobs.open_subdir(OsStr::new(job)) else {
        return 0;
    };
    let names = d.names().unwrap_or_default();
    names
        .iter()
        .filter_map(|n| d.stat_entry(n).ok().flatten())
        .map(|st| st.st_size.max(0) as u64)
        .sum()
}

fn remove_job_dir(jobs: &Dir, job: &str) -> std::io::Result<()> {
    match jobs.open_subdir(OsStr::new(job)) {
        Ok(d) => {
            for n in d.names()? {
                d.unlink(&n)?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    jobs.remove_dir(OsStr::new(job))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(job: &str, ended_ms: Option<u64>, bytes: u64) -> Kept {
        Kept {
            job: job.into(),
            ended_ms,
            bytes,
        }
    }

    fn chosen(now: u64, kept: Vec<Kept>, config: &Retention) -> Vec<String> {
        choose(now, kept, config)
            .into_iter()
            .map(|(k, _)| k.job)
            .collect()
    }

    #[test]
    fn oldest_finished_jobs_go_first_and_running_ones_never() {
        let config = Retention {
            max_total_bytes: 100,
            max_age: Duration::from_secs(10),
        };
        // Over the size: the oldest finished goes first, the running one stays however big.
        let kept = vec![
            k("new", Some(9_000), 40),
            k("old", Some(8_000), 40),
            k("running", None, 60),
        ];
        assert_eq!(chosen(10_000, kept, &config), ["old"]);
        let huge = vec![k("new", Some(9_000), 40), k("running", None, 200)];
        assert_eq!(chosen(10_000, huge, &config), ["new"]);
        let small = vec![k("new", Some(9_000), 10), k("old", Some(8_000), 10)];
        assert!(chosen(10_000, small.clone(), &config).is_empty());
        // Past the age.
        assert_eq!(chosen(18_500, small, &config), ["old"]);
    }
}
