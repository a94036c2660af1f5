//! Between spawning the servers and spawning the trainers: every host's agent is asked, all at
//! once, to answer when its own servers' ports (`PORT_m + j` for j < num_servers, from
//! ip_config) are in LISTEN state. The agents read their kernel's socket tables: a DGL server
//! counts any connection as one of its clients, so nobody may probe it by connecting.
//!
//! Why: a DGL 2.1 trainer whose server does not listen yet sleeps 3 s before it tries again,
//! per failed connect; trainers started with their servers lose those seconds at every start.

use std::time::Duration;

use dglrun_proto::pb;
use futures::future::try_join_all;

use crate::cluster::Host;
use crate::config::ip_config::Machine;

/// How long the servers may take to listen (loading a large partition takes minutes).
pub const TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Beyond the agent's own timeout, how long to wait for its answer.
const ANSWER_SLACK: Duration = Duration::from_secs(10);

/// The ports each machine's servers listen on, by machine rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerPorts {
    pub per_machine: Vec<Vec<u16>>,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("machine {machine}: server {server} would listen on port {port} + {server}, past 65535")]
pub struct PortOverflow {
    pub machine: usize,
    pub server: u32,
    pub port: u16,
}

impl ServerPorts {
    /// As DGL: server j of machine m listens on `PORT_m + j`.
    pub fn of(machines: &[Machine], num_servers: u32) -> Result<Self, PortOverflow> {
        let per_machine = machines
            .iter()
            .map(|m| {
                (0..num_servers)
                    .map(|j| {
                        u16::try_from(j)
                            .ok()
                            .and_then(|j| m.port.checked_add(j))
                            .ok_or(PortOverflow {
                                machine: m.rank,
                                server: j,
                                port: m.port,
                            })
                    })
                    .collect()
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            per_machine,
            timeout: TIMEOUT,
        })
    }
}

/// A host whose servers did not come up: the agent's words (which server exited, or which
/// ports did not listen in time).
#[derive(Debug, thiserror::Error)]
#[error("{name}: {message}")]
pub struct NotReady {
    pub host: usize,
    pub name: String,
    pub message: String,
}

/// Returns once every host's servers listen, or with the first host that fails.
pub async fn wait_all(hosts: &[Host], job_id: &str, ports: &ServerPorts) -> Result<(), NotReady> {
    let calls = hosts.iter().map(|h| {
        let req = pb::WaitListeningRequest {
            job_id: job_id.to_string(),
            ports: ports
                .per_machine
                .get(h.rank)
                .map_or_else(Vec::new, |p| p.iter().copied().map(u32::from).collect()),
            timeout_ms: ports.timeout.as_millis().min(u32::MAX as u128) as u32,
            // DGL's servers bind the ip_config address, which is where dgl-coord reaches the
            // agent.
            ip: h.addr.ip().to_string(),
        };
        let mut client = h.client.clone();
        let (host, name) = (h.rank, h.name());
        async move {
            if req.ports.is_empty() {
                return Ok(());
            }
            let fail = |message: String| NotReady {
                host,
                name: name.clone(),
                message,
            };
            match tokio::time::timeout(ports.timeout + ANSWER_SLACK, client.wait_listening(req))
                .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(s)) => Err(fail(s.message().to_string())),
                Err(_) => Err(fail(format!(
                    "the agent did not say within {}s whether the servers listen",
                    (ports.timeout + ANSWER_SLACK).as_secs()
                ))),
            }
        }
    });
    try_join_all(calls).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(rank: usize, port: u16) -> Machine {
        Machine {
            rank,
            ip: [10, 0, 0, rank as u8 + 1].into(),
            port,
        }
    }

    #[test]
    fn each_machine_gets_its_own_port_plus_j() {
        let p = ServerPorts::of(&[machine(0, 30050), machine(1, 40000)], 2).unwrap();
        assert_eq!(p.per_machine, vec![vec![30050, 30051], vec![40000, 40001]]);
        assert_eq!(
            ServerPorts::of(&[machine(0, 65535)], 2),
            Err(PortOverflow {
                machine: 0,
                server: 1,
                port: 65535
            })
        );
    }
}
