//! Blocking work (file systems, /proc) runs off the async runtime, bounded in time.
//!
//! A FIFO, a hung NFS mount or a slow disk can block a system call for as long as it likes; on
//! a runtime worker that would stall Hello and lease renewals on every connection. On the
//! blocking pool it stalls one thread, and the request gets an answer when the timeout ends
//! (the thread itself finishes whenever the kernel lets it).

use std::time::Duration;

/// How long a request waits for the file-system work it started.
pub const FS_TIMEOUT: Duration = Duration::from_secs(30);

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
    match tokio::time::timeout(timeout, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(BlockingError::Failed { what, source }),
        Err(_) => Err(BlockingError::TimedOut {
            what,
            after: timeout,
        }),
    }
}
