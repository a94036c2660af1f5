//! WaitListening: tells when the DGL servers of a job listen, from the kernel's socket tables
//! (`/proc/net/tcp` and `tcp6` of the agent's network namespace), never by connecting: a DGL
//! server counts every connection as one of its clients, and a probe makes the job hang.
//!
//! DGL 2.1's trainers sleep 3 s after each refused connect, so trainers that start before
//! their servers listen lose seconds; the coordinator starts them once every agent answers.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dglrun_proto::pb;
use tokio::sync::Semaphore;
use tonic::Status;

use super::error::JobError;
use super::job::Job;
use super::spec::{InvalidRequest, JobId};
use super::Jobs;
use crate::blocking::{self, BlockingError};

/// Ports per request: DGL's `--num_servers` of one machine is a handful.
pub const MAX_PORTS: usize = 256;
/// Longest wait a request may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// Waits served at once across all jobs; each reads the tables every [`POLL`].
pub const MAX_WAITS: usize = 64;
/// How often the tables are read: far below DGL's 3 s retry, a fraction of a ms of CPU each.
const POLL: Duration = Duration::from_millis(20);

static WAITS: Semaphore = Semaphore::const_new(MAX_WAITS);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitSpec {
    pub job_id: JobId,
    /// Not empty, at most [`MAX_PORTS`], each 1..=65535.
    pub ports: BTreeSet<u16>,
    /// At most [`MAX_WAIT`].
    pub timeout: Duration,
    /// The servers' address; None: a socket on any address counts.
    pub ip: Option<IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ListeningError {
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    #[error("WaitListening needs 1 to {MAX_PORTS} ports, each 1..=65535; got {0}")]
    Ports(String),
    #[error("WaitListening timeout_ms {0} is past the limit of {limit} ms", limit = MAX_WAIT.as_millis())]
    Timeout(u32),
    #[error("WaitListening ip {0:?} is not an IP address")]
    Ip(String),
    #[error("the agent already serves {MAX_WAITS} WaitListening calls, its limit")]
    TooManyWaits,
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("{label} (pid {pid}) {status} before it listened (not listening: port {ports})")]
    Exited {
        label: String,
        pid: u32,
        status: String,
        ports: String,
    },
    #[error("port {ports} not listening after {:.1}s", .after.as_secs_f64())]
    TimedOut { ports: String, after: Duration },
    #[error(transparent)]
    Table(#[from] super::sockets::TableError),
    #[error(transparent)]
    Blocking(#[from] BlockingError),
}

impl From<ListeningError> for Status {
    fn from(e: ListeningError) -> Self {
        let msg = crate::jobs::error_chain(&e);
        match e {
            ListeningError::Invalid(i) => i.into(),
            ListeningError::Job(j) => j.into(),
            ListeningError::Ports(_) | ListeningError::Timeout(_) | ListeningError::Ip(_) => {
                Status::invalid_argument(msg)
            }
            ListeningError::TooManyWaits => Status::resource_exhausted(msg),
            ListeningError::Exited { .. } => Status::failed_precondition(msg),
            ListeningError::TimedOut { .. } => Status::deadline_exceeded(msg),
            ListeningError::Table(_) | ListeningError::Blocking(_) => Status::internal(msg),
        }
    }
}

impl TryFrom<pb::WaitListeningRequest> for WaitSpec {
    type Error = ListeningError;

    fn try_from(r: pb::WaitListeningRequest) -> Result<Self, ListeningError> {
        let job_id = JobId::parse(r.job_id)?;
        if r.ports.is_empty() || r.ports.len() > MAX_PORTS {
            return Err(ListeningError::Ports(format!("{} ports", r.ports.len())));
        }
        let ports = r
            .ports
            .iter()
            .map(|&p| match u16::try_from(p) {
                Ok(p) if p != 0 => Ok(p),
                _ => Err(ListeningError::Ports(format!("port {p}"))),
            })
            .collect::<Result<BTreeSet<u16>, _>>()?;
        let timeout = Duration::from_millis(u64::from(r.timeout_ms));
        if timeout > MAX_WAIT {
            return Err(ListeningError::Timeout(r.timeout_ms));
        }
        let ip = match r.ip.as_str() {
            "" => None,
            s => Some(s.parse().map_err(|_| ListeningError::Ip(r.ip.clone()))?),
        };
        Ok(Self {
            job_id,
            ports,
            timeout,
            ip,
        })
    }
}

impl Jobs {
    /// Returns once every port of `spec` listens; fails as soon as a process of the job has
    /// exited (at this point of a launch only servers run), or after the timeout.
    pub async fn wait_listening(
        &self,
        spec: WaitSpec,
    ) -> Result<pb::WaitListeningReply, ListeningError> {
        let _slot = WAITS
            .try_acquire()
            .map_err(|_| ListeningError::TooManyWaits)?;
        let job = self.get(&spec.job_id)?;
        let started = Instant::now();
        let deadline = started + spec.timeout;
        loop {
            if job.state().stopping {
                return Err(JobError::Stopping(job.id.clone()).into());
            }
            let ip = spec.ip;
            let listening =
                blocking::run("reading /proc/net/tcp", blocking::FS_TIMEOUT, move || {
                    listening_ports(ip)
                })
                .await??;
            let missing: Vec<u16> = spec.ports.difference(&listening).copied().collect();
            if missing.is_empty() {
                let waited = started.elapsed().as_millis().min(u32::MAX as u128) as u32;
                return Ok(pb::WaitListeningReply { waited_ms: waited });
            }
            if let Some(e) = exited(&job, &missing) {
                return Err(e);
            }
            if Instant::now() >= deadline {
                return Err(ListeningError::TimedOut {
                    ports: port_list(&missing),
                    after: spec.timeout,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The first process of `job` that has exited, as the error that names it.
fn exited(job: &Arc<Job>, missing: &[u16]) -> Option<ListeningError> {
    let state = job.state();
    let (p, x) = state
        .procs
        .iter()
        .find_map(|p| p.exit.as_ref().map(|x| (p, x)))?;
    let status = if x.signal != 0 {
        format!("was killed by signal {}", x.signal)
    } else {
        format!("exited with code {}", x.code)
    };
    Some(ListeningError::Exited {
        label: p.label.clone(),
        pid: p.pid,
        status,
        ports: port_list(missing),
    })
}

fn port_list(ports: &[u16]) -> String {
    let v: Vec<String> = ports.iter().map(u16::to_string).collect();
    v.join(", ")
}

/// Ports with a socket in LISTEN state in either table, on `ip` or the wildcard address.
fn listening_ports(ip: Option<IpAddr>) -> Result<BTreeSet<u16>, ListeningError> {
    Ok(super::sockets::listeners()?
        .into_iter()
        .filter(|l| ip.is_none() || l.blocks(ip))
        .map(|l| l.port)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_bounded() {
        let req = |ports: Vec<u32>, timeout_ms| pb::WaitListeningRequest {
            job_id: "j".into(),
            ports,
            timeout_ms,
            ip: String::new(),
        };
        assert!(WaitSpec::try_from(req(vec![30050, 30051], 1000)).is_ok());
        assert!(WaitSpec::try_from(req(vec![], 1000)).is_err());
        assert!(WaitSpec::try_from(req(vec![0], 1000)).is_err());
        assert!(WaitSpec::try_from(req(vec![70000], 1000)).is_err());
        assert!(WaitSpec::try_from(req(vec![1; MAX_PORTS + 1], 1000)).is_err());
        assert!(WaitSpec::try_from(req(vec![1], u32::MAX)).is_err());
    }
}
