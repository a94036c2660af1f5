//! Every host's further connections (streams are spread over them), opened alongside the first
//! one: each takes round trips of its own (TCP, TLS), which on a link 50 ms away came after
//! Hello and PrepareFiles when they were opened only once those had answered.

use std::net::SocketAddr;

use tokio::task::JoinHandle;

use crate::cluster::{self, AgentAccess, Client, Service};

/// Further connections being opened, per machine in ip_config order.
pub struct Further {
    tasks: Vec<JoinHandle<Vec<(Client, Service)>>>,
}

impl Further {
    /// Starts `per_host - 1` more connections to each of `addrs`, all at once.
    pub fn open(addrs: &[SocketAddr], access: &AgentAccess, per_host: usize) -> Self {
        let tasks = addrs
            .iter()
            .map(|&addr| {
                let access = access.clone();
                tokio::spawn(async move {
                    let opened =
                        futures::future::join_all((1..per_host).map(|_| connection(addr, &access)))
                            .await;
                    opened.into_iter().flatten().collect()
                })
            })
            .collect();
        Self { tasks }
    }

    /// Per machine, the connections that could be made (those that could not are simply not
    /// used: the host's first connection works).
    pub async fn take(mut self) -> Vec<Vec<(Client, Service)>> {
        let tasks = std::mem::take(&mut self.tasks);
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.unwrap_or_default());
        }
        out
    }
}

impl Drop for Further {
    /// A copy that fails before sending leaves no handshake running.
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn connection(addr: SocketAddr, access: &AgentAccess) -> Option<(Client, Service)> {
    let ch = access.channel(addr).await.ok()?;
    let c = cluster::client(ch.clone(), access).ok()?;
    let s = cluster::service(ch, access).ok()?;
    Some((c, s))
}
