//! What can go wrong with a job request once it is parsed, and the one place it becomes a
//! gRPC status.

use std::path::PathBuf;

use tonic::{Code, Status};

use super::spec::JobId;
use super::tree::ScanError;
use crate::confine::ConfineError;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job {0} is not known to this agent")]
    NotFound(JobId),
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error("the agent already holds {0} jobs, its limit")]
    TooManyJobs(usize),
    #[error(
        "the agent already runs {running} processes; {asked} more would pass its limit of {limit}"
    )]
    TooManyProcesses {
        running: usize,
        asked: usize,
        limit: usize,
    },
    #[error("the agent already runs {limit} sessions, its limit")]
    TooManySessions { limit: usize },
    #[error("the agent already serves {limit} Watch streams, its limit")]
    TooManyWatches { limit: usize },
    #[error("the agent already serves {limit} ReadLogs streams, its limit")]
    TooManyLogReads { limit: usize },
    #[error("job {job} already has {limit} Watch streams open, the limit per job")]
    TooManyJobWatches { job: JobId, limit: usize },
    #[error("workspace {} does not exist on this host", .0.display())]
    NoWorkspace(PathBuf),
    #[error("job {job} already runs in workspace {}", .workspace.display())]
    OtherWorkspace { job: JobId, workspace: PathBuf },
    #[error("job {job} is closed: its lease of {lease_ms} ms expired; start a new job")]
    Closed { job: JobId, lease_ms: u128 },
    #[error("job {0} is being stopped; start a new job")]
    Stopping(JobId),
    #[error("path {0:?} is not valid UTF-8")]
    NotUtf8(PathBuf),
    #[error(transparent)]
    Confine(#[from] ConfineError),
    /// Another job or a copy holds the workspace.
    #[error(transparent)]
    Held(#[from] crate::workspace::Held),
    #[error("cannot start {label} ({what})")]
    Start {
        label: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the cgroup of job {job}")]
    Cgroup {
        job: JobId,
        #[source]
        source: std::io::Error,
    },
    #[error("job {0} was stopped while its processes started")]
    StoppedWhileStarting(JobId),
    #[error("job {job}: the stop could not see every process of the job, so the job stays stopping and the agent retries")]
    StopBlind {
        job: JobId,
        #[source]
        source: ScanError,
    },
    #[error("cannot tell which processes of the agent's jobs still run")]
    Scan(#[source] ScanError),
    #[error("the agent's {0} task failed")]
    Task(&'static str, #[source] tokio::task::JoinError),
    #[error(transparent)]
    Blocking(#[from] crate::blocking::BlockingError),
}

impl From<JobError> for Status {
    fn from(e: JobError) -> Self {
        let e = match e {
            // Confinement has its own mapping (PermissionDenied).
            JobError::Confine(c) => return c.into(),
            JobError::Held(h) => return h.into(),
            e => e,
        };
        let code = match &e {
            JobError::NotFound(_) => Code::NotFound,
            JobError::ShuttingDown | JobError::StopBlind { .. } | JobError::Scan(_) => {
                Code::Unavailable
            }
            JobError::TooManyJobs(_)
            | JobError::TooManyProcesses { .. }
            | JobError::TooManySessions { .. }
            | JobError::TooManyWatches { .. }
            | JobError::TooManyLogReads { .. }
            | JobError::TooManyJobWatches { .. } => Code::ResourceExhausted,
            JobError::NoWorkspace(_)
            | JobError::OtherWorkspace { .. }
            | JobError::Closed { .. }
            | JobError::Start { .. }
            | JobError::Cgroup { .. } => Code::FailedPrecondition,
            // Aborted, like a stop that lands mid-Spawn: the coordinator tells a job stopped
            // under it from one that failed to start.
            JobError::Stopping(_) | JobError::StoppedWhileStarting(_) => Code::Aborted,
            JobError::NotUtf8(_) => Code::InvalidArgument,
            JobError::Confine(_) => Code::PermissionDenied,
            JobError::Held(_) => Code::FailedPrecondition,
            JobError::Task(..) | JobError::Blocking(_) => Code::Internal,
        };
        Status::new(code, super::error_chain(&e))
    }
}
