//! Losing a host during a launch: which failures are final at once, and what to tell the user.
//!
//! The rule: a refused connection means nothing listens at the agent's address any more (the
//! agent process is gone; when it comes back it stops what its previous run left), and an
//! agent that answers but no longer knows the job was restarted (and has stopped the job's
//! processes already). Neither can get better by waiting, so the job fails at once. A call
//! that gets no answer may be a blip on the link: it is retried until the lease would have run
//! out, because only then is the job known to be dead on that host.

use std::time::Duration;

use tonic::{Code, Status};

use crate::cluster::error_chain;

#[derive(Clone, Debug)]
pub enum Loss {
    /// Connection refused: the agent process is gone.
    Gone,
    /// The agent no longer knows the job: it was restarted.
    Forgot,
    /// The agent ended the job's event stream without a word: it no longer keeps the job.
    StreamEnded,
    /// The agent said it is shutting down (and stops the job as it goes).
    ShuttingDown,
    /// The agent said the job's lease ran out: it heard no renewal for a whole lease.
    LeaseExpired,
    /// No answer for a whole lease: a link or the host is down, or the agent hangs.
    Silent {
        what: &'static str,
        after: Duration,
        last_error: String,
    },
}

impl Loss {
    pub fn reason(&self) -> String {
        match self {
            Loss::Gone => "the agent is not running (connection refused)".to_string(),
            Loss::Forgot => "the agent no longer knows the job (it was restarted)".to_string(),
            Loss::StreamEnded => {
                "the agent ended the job's event stream (it no longer keeps the job)".to_string()
            }
            Loss::ShuttingDown => "the agent is shutting down".to_string(),
            Loss::LeaseExpired => {
                "the agent stopped the job: no lease renewal reached it in time".to_string()
            }
            Loss::Silent {
                what,
                after,
                last_error,
            } => format!(
                "no answer to {what} for {:.1} s ({last_error})",
                after.as_secs_f64()
            ),
        }
    }

    /// What became of the job's processes on that host.
    pub fn aftermath(&self, lease: Duration) -> String {
        match self {
            Loss::Gone => "the processes it started there run until that agent starts \
                                  again: it stops them before it serves"
                .to_string(),
            Loss::Forgot => {
                "the restarted agent stopped what its previous run left there".to_string()
            }
            Loss::StreamEnded => "nothing of the job is left there to stop".to_string(),
            Loss::ShuttingDown => "the agent stops its processes as it shuts down".to_string(),
            Loss::LeaseExpired => "that agent stopped the job's processes there".to_string(),
            Loss::Silent { .. } => format!(
                "that agent stops the job's processes by itself when the lease runs out ({} s)",
                lease.as_secs_f64()
            ),
        }
    }
}

/// The failure as one line, with the causes tonic's own message leaves out.
pub fn describe(s: &Status) -> String {
    match std::error::Error::source(s) {
        Some(src) => format!("{}: {}", s.message(), error_chain(src)),
        None => s.message().to_string(),
    }
}

/// `Some` when `s` means the host is lost for good (see the module docs).
pub fn fatal(s: &Status) -> Option<Loss> {
    if s.code() == Code::NotFound {
        return Some(Loss::Forgot);
    }
    connection_refused(s).then_some(Loss::Gone)
}

/// True when the call failed because the agent's address refused the TCP connection.
pub fn connection_refused(s: &Status) -> bool {
    if s.code() != Code::Unavailable && s.code() != Code::Unknown {
        return false;
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use dglrun_proto::pb::agent_client::AgentClient;
    use dglrun_proto::pb::HelloRequest;

    #[tokio::test]
    async fn a_closed_port_is_refused_and_final() {
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_lazy();
        let err = AgentClient::new(channel)
            .hello(HelloRequest::default())
            .await
            .unwrap_err();
        assert!(connection_refused(&err), "{err:?}");
        let l = fatal(&err).expect("final");
        assert!(l.reason().contains("connection refused"), "{}", l.reason());
    }

    #[test]
    fn other_failures_are_not_final() {
        assert!(fatal(&Status::unavailable("timeout")).is_none());
        assert!(fatal(&Status::deadline_exceeded("slow")).is_none());
        assert!(matches!(
            fatal(&Status::not_found("job")),
            Some(Loss::Forgot)
        ));
    }
}
