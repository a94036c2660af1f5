//! The two tasks the driver runs per host while a job lives: one follows the job's events,
//! one keeps its lease. Both report a lost host to the driver; `loss` decides when.
//!
//! Lease renewals must get through as soon as a link is back: a renewal stuck on a TCP
//! connection that is backing off its retransmissions (0.2, 0.6, 1.4, 3, 6, 12 s after the
//! link went down) could arrive after the lease although the link came back well before. So
//! a renewal that gets no answer in time is retried on a fresh connection, whose first packet
//! goes out at once, and again on another one each time the deadline passes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dglrun_proto::pb;
use tokio::sync::mpsc;

use super::internal_events::Msg;
use super::loss::{self, Loss};
use crate::cluster::{self, AgentAccess, Client};

/// Pause before calling again after a call failed without a final answer.
const RETRY: Duration = Duration::from_millis(200);

/// A client that can be replaced by one on a new connection.
pub struct Reconnect {
    client: Client,
    access: AgentAccess,
    addr: SocketAddr,
}

impl Reconnect {
    pub fn new(client: Client, access: AgentAccess, addr: SocketAddr) -> Self {
        Self {
            client,
            access,
            addr,
        }
    }

    /// Drops the current connection for a new one (made on the next call). Keeps the old one
    /// if a new one cannot even be described (a TLS misconfiguration would have failed long
    /// before a job started).
    fn renew_connection(&mut self) {
        let fresh = self
            .access
            .lazy_channel(self.addr)
            .and_then(|ch| cluster::client(ch, &self.access));
        match fresh {
            Ok(c) => self.client = c,
            Err(e) => tracing::debug!(addr = %self.addr, "cannot make a new connection: {e:#}"),
        }
    }
}

/// Forwards one host's job events; on a broken stream, resumes from the last seq seen. Gives
/// up (reporting the host lost) at once when the agent is gone or forgot the job, and after a
/// whole lease of failed attempts otherwise: by then the agent has stopped the job anyway.
pub async fn watch_host(
    host: usize,
    mut client: Client,
    job_id: String,
    tx: mpsc::Sender<Msg>,
    give_up_after: Duration,
) {
    let mut after = 0;
    let mut failing_since: Option<Instant> = None;
    loop {
        let last_error: String;
        let req = pb::WatchRequest {
            job_id: job_id.clone(),
            after_seq: after,
        };
        match client.watch(req).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(ev)) => {
                            failing_since = None;
                            after = after.max(ev.seq);
                            if tx.send(Msg::Event { host, ev }).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => {
                            let _ = tx.send(Msg::StreamEnded { host }).await;
                            return;
                        }
                        Err(s) => {
                            // Reconnect almost at once: the new call is what tells the causes
                            // apart (refused, forgotten, no answer).
                            last_error = loss::describe(&s);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            break;
                        }
                    }
                }
            }
            Err(s) => {
                if let Some(l) = loss::fatal(&s) {
                    let _ = tx.send(Msg::Lost { host, loss: l }).await;
                    return;
                }
                last_error = loss::describe(&s);
                tokio::time::sleep(RETRY).await;
            }
        }
        let since = *failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= give_up_after {
            let l = Loss::Silent {
                what: "its event stream",
                after: give_up_after,
                last_error,
            };
            let _ = tx.send(Msg::Lost { host, loss: l }).await;
            return;
        }
    }
}

/// Renews the job's lease on one host every lease/4; reports the host lost when no renewal
/// succeeded for a whole lease, and at once when the agent is gone or no longer knows the job.
///
/// It starts with the first Spawn, before this host's own Spawn may have reached its agent:
/// until the agent once knew the job, "not known" means "not there yet", not "forgotten" (a
/// Spawn that never arrives fails the launch by itself).
///
/// After a renewal went unanswered, the next ones go out back to back on fresh connections
/// with a shorter deadline (lease/8), so one gets through within lease/8 of the link coming
/// back. The last renewal before a blip may be a quarter lease old, so a blip shorter than
/// 5/8 of the lease never costs the job.
pub async fn renew_host(
    host: usize,
    mut conn: Reconnect,
    job_id: String,
    tx: mpsc::Sender<Msg>,
    lease: Duration,
) {
    let period = lease / 4;
    let quick = lease / 8;
    let mut last_ok = Instant::now();
    let mut known_once = false;
    let (mut wait, mut limit) = (period, period);
    loop {
        tokio::time::sleep(wait).await;
        let req = pb::RenewRequest {
            job_id: job_id.clone(),
        };
        let last_error = match tokio::time::timeout(limit, conn.client.renew(req)).await {
            Ok(Ok(r)) if r.get_ref().known => {
                known_once = true;
                last_ok = Instant::now();
                (wait, limit) = (period, period);
                continue;
            }
            Ok(Ok(_)) if !known_once => {
                // The agent answers: that is all the lease needs until the job exists there.
                last_ok = Instant::now();
                (wait, limit) = (period, period);
                continue;
            }
            Ok(Ok(_)) => {
                let l = Loss::Forgot;
                let _ = tx.send(Msg::Lost { host, loss: l }).await;
                return;
            }
            Ok(Err(s)) => {
                if let Some(l) = loss::fatal(&s) {
                    let _ = tx.send(Msg::Lost { host, loss: l }).await;
                    return;
                }
                (wait, limit) = (RETRY.min(quick), quick);
                loss::describe(&s)
            }
            Err(_) => {
                let text = format!("no answer within {:.2} s", limit.as_secs_f64());
                // Its connection may be stuck in retransmission backoff: try a new one now.
                conn.renew_connection();
                (wait, limit) = (Duration::ZERO, quick);
                text
            }
        };
        if last_ok.elapsed() >= lease {
            let l = Loss::Silent {
                what: "lease renewals",
                after: lease,
                last_error,
            };
            let _ = tx.send(Msg::Lost { host, loss: l }).await;
            return;
        }
    }
}
