//! Operator commands: `status` (what every agent has) and `kill` (stop jobs by hand).

use std::time::Duration;

use dglrun_proto::pb;
use serde::Serialize;

use crate::cluster::{self, AgentAccess, Host};
use crate::config::IpConfig;

#[derive(Debug, Serialize)]
pub struct HostStatus {
    pub machine: usize,
    pub address: String,
    pub reachable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentFacts>,
    pub jobs: Vec<JobStatus>,
}

#[derive(Debug, Serialize)]
pub struct AgentFacts {
    pub version: String,
    pub protocol: u32,
    pub hostname: String,
    pub root: String,
    pub free_bytes: u64,
    pub pid: u32,
}

#[derive(Debug, Serialize)]
pub struct JobStatus {
    pub job_id: String,
    pub workspace: String,
    pub live_pids: u32,
    pub processes: Vec<ProcessStatus>,
}

#[derive(Debug, Serialize)]
pub struct ProcessStatus {
    pub label: String,
    pub pid: u32,
    pub running: bool,
    pub exit: String,
}

fn exit_text(p: &pb::ProcessInfo) -> String {
    if p.running {
        "running".into()
    } else if p.signal != 0 {
        format!("signal {}", p.signal)
    } else {
        format!("exit {}", p.code)
    }
}

fn job_status(j: pb::JobInfo) -> JobStatus {
    JobStatus {
        processes: j
            .processes
            .iter()
            .map(|p| ProcessStatus {
                label: p.label.clone(),
                pid: p.pid,
                running: p.running,
                exit: exit_text(p),
            })
            .collect(),
        job_id: j.job_id,
        workspace: j.workspace,
        live_pids: j.live_pids,
    }
}

async fn list_jobs(host: &mut Host) -> Result<Vec<pb::JobInfo>, tonic::Status> {
    Ok(host
        .client
        .list_jobs(pb::ListJobsRequest {})
        .await?
        .into_inner()
        .jobs)
}

/// Asks every agent at once; an unreachable agent is reported, not fatal.
pub async fn status(ips: &IpConfig, access: &AgentAccess) -> Vec<HostStatus> {
    let probes = ips.machines.iter().map(|m| async move {
        let address = format!("{}:{}", m.ip, access.port);
        match cluster::connect(m.rank, m.ip, access).await {
            Err(e) => HostStatus {
                machine: m.rank,
                address,
                reachable: false,
                error: Some(e.to_string()),
                agent: None,
                jobs: Vec::new(),
            },
            Ok(mut host) => {
                let jobs = list_jobs(&mut host).await;
                let h = &host.hello;
                let agent = Some(AgentFacts {
                    version: h.agent_version.clone(),
                    protocol: h.protocol_version,
                    hostname: h.hostname.clone(),
                    root: h.root.clone(),
                    free_bytes: h.free_bytes,
                    pid: h.pid,
                });
                match jobs {
                    Ok(jobs) => HostStatus {
                        machine: m.rank,
                        address,
                        reachable: true,
                        error: None,
                        agent,
                        jobs: jobs.into_iter().map(job_status).collect(),
                    },
                    Err(s) => HostStatus {
                        machine: m.rank,
                        address,
                        reachable: true,
                        error: Some(format!("cannot list jobs: {}", s.message())),
                        agent,
                        jobs: Vec::new(),
                    },
                }
            }
        }
    });
    futures::future::join_all(probes).await
}

/// Human-readable status, one block per host.
pub fn render_status(hosts: &[HostStatus]) -> String {
    let mut out = String::new();
    for h in hosts {
        match &h.agent {
            None => out.push_str(&format!(
                "m{} {}  UNREACHABLE  {}\n",
                h.machine,
                h.address,
                h.error.as_deref().unwrap_or("")
            )),
            Some(a) => {
                out.push_str(&format!(
                    "m{} {}  dgl-agent {} (protocol {}) on {}  pid {}  root {}  free {}\n",
                    h.machine,
                    h.address,
                    a.version,
                    a.protocol,
                    a.hostname,
                    a.pid,
                    a.root,
                    human_bytes(a.free_bytes)
                ));
                if let Some(e) = &h.error {
                    out.push_str(&format!("    {e}\n"));
                }
                if h.jobs.is_empty() {
                    out.push_str("    no jobs\n");
                }
                for j in &h.jobs {
                    out.push_str(&format!(
                        "    job {}  workspace {}  {} live processes\n",
                        j.job_id, j.workspace, j.live_pids
                    ));
                    for p in &j.processes {
                        out.push_str(&format!(
                            "      {:<12} pid {:<8} {}\n",
                            p.label, p.pid, p.exit
                        ));
                    }
                }
            }
        }
    }
    out
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[derive(Debug, Serialize)]
pub struct Killed {
    pub machine: usize,
    pub job_id: String,
    pub signalled: u32,
    pub remaining: u32,
}

/// Stops `job` (or every job) on every host. Fails naming each host it could not reach or
/// where processes survived.
pub async fn kill(
    ips: &IpConfig,
    access: &AgentAccess,
    job: Option<&str>,
    grace: Duration,
    force: bool,
) -> anyhow::Result<Vec<Killed>> {
    let hosts = cluster::connect_all(ips, access).await?;
    let stops = hosts.into_iter().map(|mut host| async move {
        let jobs = list_jobs(&mut host)
            .await
            .map_err(|s| format!("{}: cannot list jobs: {}", host.name(), s.message()))?;
        let mut done = Vec::new();
        for j in jobs
            .into_iter()
            .filter(|j| job.is_none_or(|id| id == j.job_id))
        {
            let reply = host
                .client
                .stop(pb::StopRequest {
                    job_id: j.job_id.clone(),
                    grace_ms: grace.as_millis().min(u32::MAX as u128) as u32,
                    force,
                })
                .await
                .map_err(|s| {
                    format!(
                        "{}: cannot stop job {}: {}",
                        host.name(),
                        j.job_id,
                        s.message()
                    )
                })?
                .into_inner();
            done.push(Killed {
                machine: host.rank,
                job_id: j.job_id,
                signalled: reply.signalled,
                remaining: reply.remaining,
            });
        }
        Ok::<_, String>(done)
    });
    let mut all = Vec::new();
    let mut errors = Vec::new();
    for r in futures::future::join_all(stops).await {
        match r {
            Ok(k) => all.extend(k),
            Err(e) => errors.push(e),
        }
    }
    for k in &all {
        if k.remaining > 0 {
            errors.push(format!(
                "m{}: job {}: {} processes survived SIGKILL",
                k.machine, k.job_id, k.remaining
            ));
        }
    }
    if !errors.is_empty() {
        anyhow::bail!("{}", errors.join("\n"));
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
