//! One call to one agent under a time bound: its reply, or why there is none. Commands that
//! ask every host report a host's `CallError` next to the others' answers instead of failing.

use std::future::Future;
use std::time::Duration;

/// Why one agent gave no reply.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The agent answered with an error status; its message says why.
    #[error("{}", .0.message())]
    Refused(Box<tonic::Status>),
    /// Nothing came back within the bound (a cut link, a stopped agent).
    #[error("no answer within {} s", .0.as_secs())]
    Silent(Duration),
}

impl CallError {
    /// The agent's status, when it answered at all.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Self::Refused(s) => Some(s),
            Self::Silent(_) => None,
        }
    }
}

/// `call`'s reply, or why there is none within `limit`.
pub async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(CallError::Refused(Box::new(s))),
        Err(_) => Err(CallError::Silent(limit)),
    }
}
