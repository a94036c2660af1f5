//! The one place where the errors of the file, preflight and workspace checks become gRPC
//! statuses (job errors: `jobs/error.rs`): the handlers return their own error enums, and the
//! code a coordinator acts on (retry or not, refused or missing) is decided here.

use std::io;

use tonic::Status;

use dglrun_coordinator::launch::supervised::SuperviseError;

use crate::blocking::BlockingError;
use crate::confine::ConfineError;
use crate::files::FilesError;
use crate::jobs::preflight::PreflightError;
use crate::workspace::Held;

/// A detached job refused: the request's fault, or the other agents out of reach. (A function,
/// not `From`: both types are foreign to this crate.)
pub(crate) fn supervise(e: SuperviseError) -> Status {
    if e.is_bad_request() {
        Status::invalid_argument(e.to_string())
    } else {
        Status::failed_precondition(e.to_string())
    }
}

/// Another job or copy holds the workspace: the caller may try again once it is done.
impl From<Held> for Status {
    fn from(h: Held) -> Self {
        Status::failed_precondition(h.to_string())
    }
}

impl From<ConfineError> for Status {
    fn from(e: ConfineError) -> Self {
        match &e {
            ConfineError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                Status::not_found(e.to_string())
            }
            ConfineError::Io { .. } => Status::internal(e.to_string()),
            _ => Status::permission_denied(e.to_string()),
        }
    }
}

impl From<BlockingError> for Status {
    fn from(e: BlockingError) -> Self {
        match e {
            BlockingError::TimedOut { .. } => Status::deadline_exceeded(e.to_string()),
            BlockingError::Failed { .. } => Status::internal(e.to_string()),
        }
    }
}

impl From<FilesError> for Status {
    fn from(e: FilesError) -> Self {
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
            FilesError::Held(h) => h.into(),
            FilesError::Internal(_) => Status::internal(msg),
            FilesError::Stream(s) => s,
        }
    }
}

impl From<PreflightError> for Status {
    fn from(e: PreflightError) -> Self {
        let msg = e.to_string();
        match e {
            PreflightError::TooManyFiles(_)
            | PreflightError::TooManyPorts(_)
            | PreflightError::TooManySizes(_)
            | PreflightError::BadPort(_)
            | PreflightError::BadAddress { .. } => Status::invalid_argument(msg),
            PreflightError::Workspace(c) => Status::from(c),
            PreflightError::Bind { .. } => Status::failed_precondition(msg),
            PreflightError::Sockets(_) => Status::internal(crate::jobs::error_chain(&e)),
            PreflightError::Blocking(b) => b.into(),
        }
    }
}
