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
    /// A running job or another copy holds the workspace.
    #[error(transparent)]
    Held(#[from] crate::workspace::Held),
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
