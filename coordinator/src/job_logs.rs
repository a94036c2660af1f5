//! `dgl-coord logs`: a job's output as the hosts kept it (the agent's `ReadLogs`), labelled
//! exactly as an attached launch labels it (`launch::sink`), or as the same JSON events.
//!
//! Every host is read at once; lines of one process and stream come in order, hosts and
//! processes interleave as their lines arrive. With `follow` each host's stream ends once the
//! job has ended there, so the command ends when it has ended on every host; a stream that
//! breaks (a link down, the agent restarting) is taken up again for up to a minute, resumed
//! after the lines already printed, so none is printed twice.

use std::time::Instant;

use dglrun_proto::pb::{self, OutputStream};
use tokio::sync::mpsc;

use crate::cluster::AgentAccess;
use crate::config::IpConfig;
use crate::job_history;
use crate::launch::events::Who;
use crate::launch::sink::Sink;

#[derive(Clone, Debug, Default)]
pub struct LogsOptions {
    pub job: String,
    /// Only this machine (its ip_config line, from 0).
    pub machine: Option<usize>,
    /// Only processes with these labels (`server0`, `trainer1`, `trainers`).
    pub labels: Vec<String>,
    /// Only this stream.
    pub stream: Option<OutputStream>,
    /// The last N lines of each process's stream.
    pub tail: u64,
    pub follow: bool,
    pub json: bool,
}

/// What the per-host tasks tell the printer.
enum HostMsg {
    Lines {
        machine: usize,
        ip: String,
        lines: pb::LogLines,
    },
    End {
        machine: usize,
        address: String,
        record: pb::JobRecord,
    },
    /// The host does not know the job.
    Unknown,
    Failed {
        machine: usize,
        address: String,
        error: String,
    },
}

/// Messages waiting for the printer, from all hosts.
const CHANNEL: usize = 64;

/// Prints the job's kept output; returns the exit code: 0, or 1 when a host could not be
/// read or no host knows the job.
pub async fn logs(ips: &IpConfig, access: &AgentAccess, opts: &LogsOptions) -> anyhow::Result<u8> {
    if let Some(m) = opts.machine {
        anyhow::ensure!(
            m < ips.machines.len(),
            "--machine {m}: the ip_config lists machines 0 to {}",
            ips.machines.len().saturating_sub(1)
        );
    }
    let (tx, mut rx) = mpsc::channel(CHANNEL);
    let mut asked = 0;
    for m in &ips.machines {
        if opts.machine.is_some_and(|only| only != m.rank) {
            continue;
        }
        asked += 1;
        let (tx, access, opts, rank, ip) = (tx.clone(), access.clone(), opts.clone(), m.rank, m.ip);
        tokio::spawn(async move { read_host(rank, ip, &access, &opts, tx).await });
    }
    drop(tx);
    let mut sink = Sink::new(opts.json, Instant::now(), None).with_agent_port(access.port);
    let (mut failed, mut unknown, mut lost) = (Vec::new(), 0, Vec::new());
    while let Some(msg) = rx.recv().await {
        match msg {
            HostMsg::Lines { machine, ip, lines } => {
                let who = Who {
                    machine,
                    host: ip,
                    label: lines.label.clone(),
                    role: String::new(),
                };
                let stream = OutputStream::try_from(lines.stream).unwrap_or(OutputStream::Stdout);
                for l in &lines.lines {
                    sink.line(&who, stream, l);
                }
            }
            HostMsg::End {
                machine,
                address,
                record,
            } => {
                if record.lost_lines > 0 {
                    lost.push(format!(
                        "m{machine} ({address}): {} output lines of the job were not kept on the host ({})",
                        record.lost_lines, record.log_error
                    ));
                }
            }
            HostMsg::Unknown => unknown += 1,
            HostMsg::Failed {
                machine,
                address,
                error,
            } => failed.push(format!("m{machine} ({address}): {error}")),
        }
    }
    for l in &lost {
        sink.note(l);
    }
    for f in &failed {
        sink.note(&format!("cannot read the logs of job {} on {f}", opts.job));
    }
    if unknown == asked {
        sink.note(&format!(
            "no host keeps a record of job {} (never run there, or deleted by the agents' log retention); `dgl-coord jobs` lists the jobs kept",
            opts.job
        ));
        return Ok(1);
    }
    Ok(if failed.is_empty() { 0 } else { 1 })
}

/// How long a follow tries to reach a host again after its stream broke.
const RECONNECT_FOR: std::time::Duration = std::time::Duration::from_secs(60);
/// Pause between two tries.
const RECONNECT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// How one read of a host ended.
enum Read {
    /// Sent its end (or the printer went away): nothing more to do.
    Done,
    /// The stream broke; a follow may try again.
    Broken(String),
}

async fn read_host(
    machine: usize,
    ip: std::net::IpAddr,
    access: &AgentAccess,
    opts: &LogsOptions,
    tx: mpsc::Sender<HostMsg>,
) {
    let address = format!("{ip}:{}", access.port);
    let failed = |error: String| HostMsg::Failed {
        machine,
        address: address.clone(),
        error,
    };
    // Lines delivered per (label, stream), so that a follow that reconnects skips them.
    let mut delivered: std::collections::BTreeMap<(String, i32), u64> = Default::default();
    let mut broken_since: Option<Instant> = None;
    loop {
        let error = match read_once(machine, ip, access, opts, &tx, &mut delivered).await {
            Ok(Read::Done) => return,
            Ok(Read::Broken(e)) => e,
            Err(e) if broken_since.is_none() => {
                let _ = tx.send(failed(e.to_string())).await;
                return;
            }
            Err(e) => e.to_string(),
        };
        let resumable = opts.follow && opts.tail == 0;
        let since = *broken_since.get_or_insert_with(Instant::now);
        if !resumable || since.elapsed() >= RECONNECT_FOR {
            let _ = tx.send(failed(error)).await;
            return;
        }
        tokio::time::sleep(RECONNECT_EVERY).await;
    }
}

/// Why a host could not be asked for its logs at all.
#[derive(Debug, thiserror::Error)]
enum AskError {
    #[error(transparent)]
    Records(#[from] job_history::RecordsError),
    #[error("{}", .0.message())]
    Refused(Box<tonic::Status>),
}

/// One ReadLogs call, resumed after what `delivered` counts. Err: the host could not be
/// asked at all.
async fn read_once(
    machine: usize,
    ip: std::net::IpAddr,
    access: &AgentAccess,
    opts: &LogsOptions,
    tx: &mpsc::Sender<HostMsg>,
    delivered: &mut std::collections::BTreeMap<(String, i32), u64>,
) -> Result<Read, AskError> {
    let address = format!("{ip}:{}", access.port);
    let mut host = match job_history::records(machine, ip, access, &opts.job).await {
        Ok((_, r)) if r.is_empty() => {
            let _ = tx.send(HostMsg::Unknown).await;
            return Ok(Read::Done);
        }
        Ok((host, _)) => host,
        Err(e) => return Err(e.into()),
    };
    let req = pb::ReadLogsRequest {
        job_id: opts.job.clone(),
        labels: opts.labels.clone(),
        stream: opts.stream.map_or(0, |s| s as i32),
        tail: opts.tail,
        follow: opts.follow,
        resume: delivered
            .iter()
            .map(|((label, stream), lines)| pb::LogResume {
                label: label.clone(),
                stream: *stream,
                lines: *lines,
            })
            .collect(),
    };
    let mut stream = match host.client.read_logs(req).await {
        Ok(s) => s.into_inner(),
        Err(s) if s.code() == tonic::Code::NotFound => {
            let _ = tx.send(HostMsg::Unknown).await;
            return Ok(Read::Done);
        }
        Err(s) => return Err(AskError::Refused(Box::new(s))),
    };
    loop {
        match stream.message().await {
            Ok(Some(pb::LogChunk {
                msg: Some(pb::log_chunk::Msg::Lines(lines)),
            })) => {
                *delivered
                    .entry((lines.label.clone(), lines.stream))
                    .or_default() += lines.lines.len() as u64;
                let msg = HostMsg::Lines {
                    machine,
                    ip: ip.to_string(),
                    lines,
                };
                if tx.send(msg).await.is_err() {
                    return Ok(Read::Done);
                }
            }
            Ok(Some(pb::LogChunk {
                msg: Some(pb::log_chunk::Msg::End(record)),
            })) => {
                let _ = tx
                    .send(HostMsg::End {
                        machine,
                        address,
                        record,
                    })
                    .await;
                return Ok(Read::Done);
            }
            Ok(Some(_)) => {}
            Ok(None) => return Ok(Read::Broken("the agent ended the stream early".into())),
            Err(s) => return Ok(Read::Broken(format!("reading stopped: {}", s.message()))),
        }
    }
}
