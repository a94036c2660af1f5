//! Everything that can go wrong in `files`, and the one place it becomes a gRPC status.

use std::io;

use crate::blocking::BlockingError;
use crate::confine::ConfineError;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The request itself is malformed or out of bounds.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Confine(#[from] ConfineError),
    #[error("{0}: a directory is in the way on this host")]
    InTheWay(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    /// Received bytes that do not match the manifest; nothing of them was written.
    #[error("{0}")]
    DataLoss(String),
    /// The transfer cannot go on from where it was asked to (prepare again).
    #[error("{0}")]
    Precondition(String),
    #[error(
        "{path}: transfer cut off at {at} of {size} bytes; the verified part is kept to resume"
    )]
    CutOff { path: String, at: u64, size: u64 },
    #[error("{path}: no message for {}s; the transfer is dropped and its verified part kept", .after.as_secs_f64())]
    Idle {
        path: String,
        after: std::time::Duration,
    },
    #[error("{path}: the partial file was replaced while it was written; nothing was renamed onto the target")]
    Replaced { path: String },
    #[error(transparent)]
    Blocking(#[from] BlockingError),
    #[error("{0}")]
    Internal(String),
    /// The stream itself failed (the coordinator went away, a decoding error).
    #[error(transparent)]
    Stream(#[from] tonic::Status),
}

impl FilesError {
    pub fn io(what: &'static str, path: &str, source: impl Into<io::Error>) -> Self {
        Self::Io {
            what,
            path: path.to_string(),
            source: source.into(),
        }
    }
}

impl From<FilesError> for tonic::Status {
    fn from(e: FilesError) -> Self {
        use tonic::Status;
        let msg = e.to_string();
        match e {
            FilesError::Invalid(_) => Status::invalid_argument(msg),
            FilesError::Confine(c) => c.into(),
            FilesError::InTheWay(_) => Status::already_exists(msg),
            FilesError::Io { source, .. } => {
                // A full disk is `resource_exhausted` so the coordinator does not retry it.
                let full = [libc::ENOSPC, libc::EDQUOT];
                if source.raw_os_error().is_some_and(|c| full.contains(&c)) {
                    return Status::resource_exhausted(msg);
                }
                match source.kind() {
                    io::ErrorKind::PermissionDenied => Status::permission_denied(msg),
                    io::ErrorKind::NotFound => Status::not_found(msg),
                    _ => Status::internal(msg),
                }
            }
            FilesError::DataLoss(_) => Status::data_loss(msg),
            FilesError::Precondition(_) => Status::failed_precondition(msg),
            FilesError::CutOff { .. } => Status::aborted(msg),
            FilesError::Idle { .. } => Status::deadline_exceeded(msg),
            FilesError::Replaced { .. } => Status::aborted(msg),
            FilesError::Blocking(b) => b.into(),
            FilesError::Internal(_) => Status::internal(msg),
            FilesError::Stream(s) => s,
        }
    }
}
