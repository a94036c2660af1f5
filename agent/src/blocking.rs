//! Blocking work (file systems, /proc) runs off the async runtime, bounded in time.
//!
//! A FIFO, a hung NFS mount or a slow disk can block a system call for as long as it likes; on
//! a runtime worker that would stall Hello and lease renewals on every connection. On the
//! blocking pool it stalls one thread, and the request gets an answer when the timeout ends
//! (the thread itself finishes whenever the kernel lets it).

use std::time::Duration;

/// How long a request waits for the file-system work it started.
pub const FS_TIMEOUT: Duration = Duration::from_secs(30);

/// Blocking jobs of requests running at once. A hung mount strands every thread that touches
/// it; this bound keeps them from taking the whole blocking pool (which the job supervision
/// needs too): beyond it, requests wait for a slot within their timeout, then fail.
pub const MAX_BLOCKING: usize = 64;

static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_BLOCKING);

#[derive(Debug, thiserror::Error)]
pub enum BlockingError {
    #[error("{what} did not finish within {}s (a hung file system?)", .after.as_secs_f64())]
    TimedOut { what: String, after: Duration },
    #[error("{what} failed: {source}")]
    Failed {
        what: String,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Runs `f` on the blocking pool and waits at most `timeout` for it. `what` names the work
/// in the error ("reading ws/ip_config.txt").
pub async fn run<T: Send + 'static>(
    what: impl Into<String>,
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BlockingError> {
    let what = what.into();
    let work = async {
        // Never closed: acquire cannot fail.
        let slot = SLOTS.acquire().await.ok();
        tokio::task::spawn_blocking(move || {
            // Held until the work ends, even when the request stopped waiting for it.
            let _slot = slot;
            f()
        })
        .await
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(BlockingError::Failed { what, source }),
        Err(_) => Err(BlockingError::TimedOut {
            what,
            after: timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Barrier};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hung_work_times_out_and_cannot_take_more_than_its_slots() {
        // Every slot held by work that hangs, as on a dead NFS mount.
        let release = Arc::new(Barrier::new(MAX_BLOCKING + 1));
        let hung: Vec<_> = (0..MAX_BLOCKING)
            .map(|_| {
                let release = release.clone();
                tokio::spawn(run("hung", Duration::from_millis(100), move || {
                    release.wait();
                }))
            })
            .collect();
        for h in hung {
            let err = h.await.unwrap().unwrap_err();
            assert!(matches!(err, BlockingError::TimedOut { .. }), "{err}");
            assert!(err.to_string().contains("hung"), "{err}");
        }
        // No slot left: more work waits, times out, and never starts a thread.
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        let err = run("one more", Duration::from_millis(100), move || {
            r.store(true, Ordering::SeqCst)
        })
        .await
        .unwrap_err();
        assert!(matches!(err, BlockingError::TimedOut { .. }), "{err}");
        assert!(!ran.load(Ordering::SeqCst));
        // The mount comes back: the slots are free again.
        tokio::task::spawn_blocking(move || release.wait())
            .await
            .unwrap();
        let v = run("after", Duration::from_secs(5), || 7).await.unwrap();
        assert_eq!(v, 7);
    }
}
