//! `dgl-coord attach JOB`: a detached job's output, labelled as an attached launch prints it,
//! from every host's agent (`Watch`, from the newest event on, or from the first with
//! `--from-start`), until machine 0's agent says the job is over (`WaitJob`); then the closing
//! text the supervising driver kept. Ctrl-C detaches; with `stop_on_interrupt` it stops the
//! job instead, as `dgl-coord stop` does, and the attach ends with the job.
//!
//! Any number of attaches may follow one job: each has its own Watch streams, and the agents
//! send every event to every stream.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use dglrun_proto::pb::{self, job_event::Event};
use tokio::sync::mpsc;

use crate::cluster::{self, AgentAccess, Client, Host};
use crate::config::IpConfig;
use crate::detached;
use crate::launch::driver::Signals;
use crate::launch::events::Who;
use crate::launch::output;
use crate::launch::sink::Sink;

/// Pause before a broken Watch stream is resumed from the last seq it delivered.
const RESUME_AFTER: Duration = Duration::from_millis(200);
/// After the job ended: lines still on their way are printed until the streams are this quiet.
const DRAIN_QUIET: Duration = Duration::from_millis(500);
/// And at most this long.
const DRAIN_MAX: Duration = Duration::from_secs(3);

#[derive(Clone, Debug)]
pub struct AttachOptions {
    pub job_id: String,
    /// Every line the agents still hold, not only the new ones.
    pub from_start: bool,
    /// Ctrl-C stops the job instead of detaching.
    pub stop_on_interrupt: bool,
    /// SIGTERM to SIGKILL when stopping.
    pub grace: Duration,
}

struct HostEvent {
    host: usize,
    ev: pb::JobEvent,
}

/// Each process's label by its index on one host.
type Labels = HashMap<u32, String>;

fn role_of(label: &str) -> &'static str {
    if label.starts_with("server") {
        "server"
    } else if label == "trainers" {
        "trainer-group"
    } else {
        "trainer"
    }
}

/// Where each host's stream starts and what its processes are called; None where the host
/// does not know the job (any more).
async fn job_on(h: &Host, job: &str) -> anyhow::Result<Option<(u64, Labels)>> {
    let reply = h
        .client
        .clone()
        .list_jobs(pb::ListJobsRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("the agent of {}: {}", h.name(), s.message()))?
        .into_inner();
    Ok(reply.jobs.into_iter().find(|j| j.job_id == job).map(|j| {
        let labels = j
            .processes
            .into_iter()
            .map(|p| (p.index, p.label))
            .collect();
        (j.last_seq, labels)
    }))
}

/// One host's events from `after` on, resumed after a broken stream; ends when the agent ends
/// the stream (the job is forgotten) or nobody listens any more.
async fn follow(
    host: usize,
    mut client: Client,
    job: String,
    mut after: u64,
    tx: mpsc::Sender<HostEvent>,
) {
    loop {
        let req = pb::WatchRequest {
            job_id: job.clone(),
            after_seq: after,
        };
        let resp = match client.watch(req).await {
            Ok(resp) => Some(resp),
            // Forgotten: the job is long over there.
            Err(s) if s.code() == tonic::Code::NotFound => return,
            Err(_) => None,
        };
        if let Some(resp) = resp {
            let mut stream = resp.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(ev)) => {
                        after = after.max(ev.seq);
                        if tx.send(HostEvent { host, ev }).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(RESUME_AFTER).await;
    }
}

struct Printer {
    out: Sink,
    ips: Vec<String>,
    labels: Vec<Labels>,
}

impl Printer {
    fn who(&self, host: usize, index: u32) -> Who {
        let label = self.labels[host]
            .get(&index)
            .cloned()
            .unwrap_or_else(|| format!("process{index}"));
        Who {
            machine: host,
            host: self.ips[host].clone(),
            role: role_of(&label).to_string(),
            label,
        }
    }

    fn show(&mut self, HostEvent { host, ev }: HostEvent) {
        match ev.event {
            Some(Event::Started(s)) => {
                self.labels[host].insert(s.index, s.label);
            }
            Some(Event::Line(l)) => {
                let who = self.who(host, l.index);
                self.out.line(&who, l.stream(), &l.text);
            }
            Some(Event::LostLines(n)) => {
                let name = format!("m{host} ({})", self.ips[host]);
                self.out.lost_lines(host, &self.ips[host], n, &name);
            }
            Some(Event::Exited(_) | Event::Stopped(_)) | None => {}
        }
    }
}

/// Follows the job to its end (its exit code) or to Ctrl-C (130, the job runs on).
pub async fn attach(ips: &IpConfig, access: &AgentAccess, o: AttachOptions) -> anyhow::Result<u8> {
    let hosts = cluster::connect_all(ips, access).await?;
    let mut signals = Signals::os()?;
    let (tx, mut rx) = mpsc::channel(4096);
    let mut labels = Vec::with_capacity(hosts.len());
    for h in &hosts {
        let Some((last, l)) = job_on(h, &o.job_id).await? else {
            labels.push(Labels::new());
            continue;
        };
        labels.push(l);
        let after = if o.from_start { 0 } else { last };
        tokio::spawn(follow(
            h.rank,
            h.client.clone(),
            o.job_id.clone(),
            after,
            tx.clone(),
        ));
    }
    drop(tx);
    let mut p = Printer {
        out: Sink::new(false, Instant::now(), None),
        ips: hosts.iter().map(|h| h.ip.to_string()).collect(),
        labels,
    };
    let wait = detached::wait(ips, access, &o.job_id);
    tokio::pin!(wait);
    let mut stopping = false;
    let ended = loop {
        tokio::select! {
            r = &mut wait => break r?,
            Some(ev) = rx.recv() => p.show(ev),
            _ = signals.recv() => {
                if !o.stop_on_interrupt {
                    output::note(&format!(
                        "detached from job {}: it runs on (dgl-coord attach|wait|stop \
                         --ip_config FILE {})",
                        o.job_id, o.job_id
                    ));
                    return Ok(130);
                }
                if !stopping {
                    stopping = true;
                    output::note(&format!("stopping job {}", o.job_id));
                    let report = crate::ops::kill(ips, access, Some(&o.job_id), o.grace, false).await;
                    for e in &report.errors {
                        output::note(e);
                    }
                }
            }
        }
    };
    // The job is over on every host: print what is still on its way.
    let deadline = tokio::time::Instant::now() + DRAIN_MAX;
    while let Ok(Some(ev)) = tokio::time::timeout_at(
        deadline.min(tokio::time::Instant::now() + DRAIN_QUIET),
        rx.recv(),
    )
    .await
    {
        p.show(ev);
    }
    let shown = output::escape_controls(ended.text.as_bytes(), true);
    let _ = std::io::stderr().lock().write_all(&shown);
    Ok(u8::try_from(ended.exit_code).unwrap_or(1))
}
