//! Checks on every host before anything starts: the workspace, ip_config and part_config are
//! there and agree with each other and with the local ip_config; no process of an earlier job
//! of the same workspace is still alive; and machine 0's agent picks the master port. Then
//! doctor's cheap checks (`host_checks`): clock, server ports, /dev/shm.

use std::path::Path;
use std::time::Duration;

use dglrun_proto::pb;

use super::host_checks;
use super::plan::LaunchOptions;
use super::sink::Sink;
use crate::cluster::Host;
use crate::config::{IpConfig, PartConfig};

/// What the hosts said, once every check passed.
#[derive(Debug)]
pub struct Checked {
    /// 0 after a dry run (no port is picked then).
    pub master_port: u16,
    /// Per host, what was checked and found fine (`m0 (IP:port) checked: ...`).
    pub findings: Vec<String>,
}

/// Problems of one host, or None when it is fine. `live` collects jobs that still run.
fn check_host(
    host: &Host,
    reply: &pb::PreflightReply,
    o: &LaunchOptions,
    local: &IpConfig,
    live: &mut Vec<(usize, pb::JobInfo)>,
) -> Vec<String> {
    let name = host.name();
    let mut problems = Vec::new();
    if !reply.workspace_exists {
        problems.push(format!(
            "{name}: workspace {} does not exist (agent root {}); copy the job there first \
             (dgl-coord copy)",
            o.workspace, host.hello.root
        ));
        return problems;
    }
    let file = |p: &str| reply.files.iter().find(|f| f.path == p);
    let content = |p: &str, what: &str, problems: &mut Vec<String>| -> Option<String> {
        match file(p) {
            Some(f) if !f.error.is_empty() => {
                problems.push(format!("{name}: cannot read {what} {p}: {}", f.error));
                None
            }
            Some(f) if f.exists => match String::from_utf8(f.content.clone()) {
                Ok(s) => Some(s),
                Err(_) => {
                    problems.push(format!("{name}: {what} {p} is not UTF-8 text"));
                    None
                }
            },
            _ => {
                problems.push(format!(
                    "{name}: {what} {p} not found in the workspace {}",
                    reply.workspace
                ));
                None
            }
        }
    };
    if let Some(text) = content(&o.ip_config, "ip_config", &mut problems) {
        let origin = format!("{name}:{}", o.ip_config);
        match IpConfig::parse(&text, &origin) {
            Ok(theirs) if theirs == *local => {}
            Ok(_) => problems.push(format!(
                "{name}: its {} lists other machines than the local one; copy the current \
                 ip_config to every host",
                o.ip_config
            )),
            Err(e) => problems.push(e.to_string()),
        }
    }
    if let Some(text) = content(&o.part_config, "part_config", &mut problems) {
        match PartConfig::parse(&text, Path::new(&format!("{name}:{}", o.part_config))) {
            Ok(pc) if pc.num_parts == local.len() => {}
            Ok(pc) => problems.push(format!(
                "{name}: part_config {} has num_parts {} but ip_config lists {} machines",
                o.part_config,
                pc.num_parts,
                local.len()
            )),
            Err(e) => problems.push(e.to_string()),
        }
    }
    live.extend(reply.live_jobs.iter().cloned().map(|j| (host.rank, j)));
    problems
}

/// What a host passed, for a dry run's report.
fn finding(host: &Host, reply: &pb::PreflightReply, o: &LaunchOptions, local: &IpConfig) -> String {
    format!(
        "{} checked: workspace {} exists, its {} lists the same {} machines, its {} has one \
         partition each, {} stale job(s) of the workspace",
        host.name(),
        reply.workspace,
        o.ip_config,
        local.len(),
        o.part_config,
        reply.live_jobs.len()
    )
}

/// What the replies said, once every host passed its checks.
struct Reviewed {
    /// What machine 0's agent reported as free (0 when it picked none).
    free_port: u32,
    /// Jobs of the workspace that still run, by host rank.
    live: Vec<(usize, pb::JobInfo)>,
    findings: Vec<String>,
}

/// Runs Preflight on every host at once and checks the replies. With `kill_stale` (where to
/// report it), live jobs of the workspace are stopped (with `grace`); without, they are an
/// error. A `dry_run` picks no master port.
pub async fn check_all(
    hosts: &[Host],
    o: &LaunchOptions,
    local: &IpConfig,
    kill_stale: Option<&mut Sink>,
    grace: Duration,
    dry_run: bool,
) -> anyhow::Result<Checked> {
    let replies = preflight_all(hosts, o, dry_run).await;
    let partitions: Vec<Vec<String>> = hosts
        .iter()
        .zip(&replies)
        .map(|(h, r)| {
            r.as_ref()
                .map(|r| host_checks::partition_paths(r, o, h.rank))
                .unwrap_or_default()
        })
        .collect();
    let Reviewed {
        free_port,
        live,
        findings,
    } = review(hosts, replies, o, local)?;
    if dry_run && live.is_empty() {
        host_checks::check_all(hosts, o, local, &partitions).await?;
        return Ok(Checked {
            master_port: 0,
            findings,
        });
    }
    let master_port = if dry_run {
        0
    } else {
        u16::try_from(free_port)
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| anyhow::anyhow!("machine 0's agent reported no free port"))?
    };
    if !live.is_empty() {
        let listing = stale_listing(hosts, &live);
        let Some(out) = kill_stale else {
            anyhow::bail!(
                "processes of an earlier job in workspace {} are still running:\n  {}\n\
                 They may hold DGL's ports. Stop them with --kill-stale.",
                o.workspace,
                listing.join("\n  ")
            );
        };
        for l in &listing {
            out.note(&format!("stopping stale {l}"));
        }
        stop_stale(hosts, &live, grace).await?;
    }
    // After the stale jobs are gone: their servers held the ports.
    host_checks::check_all(hosts, o, local, &partitions).await?;
    Ok(Checked {
        master_port,
        findings,
    })
}

/// Preflight on every host at once; machine 0's agent also picks a free port, unless in a
/// dry run.
async fn preflight_all(
    hosts: &[Host],
    o: &LaunchOptions,
    dry_run: bool,
) -> Vec<Result<pb::PreflightReply, tonic::Status>> {
    let calls = hosts.iter().map(|h| {
        let mut client = h.client.clone();
        let req = pb::PreflightRequest {
            workspace: o.workspace.clone(),
            read_files: vec![o.ip_config.clone(), o.part_config.clone()],
            free_port_on: if h.rank == 0 && !dry_run {
                h.ip.to_string()
            } else {
                String::new()
            },
            ..Default::default()
        };
        async move { client.preflight(req).await.map(|r| r.into_inner()) }
    });
    futures::future::join_all(calls).await
}

/// Checks every host's reply; every problem of every host in one error.
fn review(
    hosts: &[Host],
    replies: Vec<Result<pb::PreflightReply, tonic::Status>>,
    o: &LaunchOptions,
    local: &IpConfig,
) -> anyhow::Result<Reviewed> {
    let mut problems = Vec::new();
    let mut r = Reviewed {
        free_port: 0,
        live: Vec::new(),
        findings: Vec::new(),
    };
    for (h, reply) in hosts.iter().zip(replies) {
        match reply {
            Err(s) => problems.push(format!("{}: preflight failed: {}", h.name(), s.message())),
            Ok(reply) => {
                if h.rank == 0 {
                    r.free_port = reply.free_port;
                }
                let found = check_host(h, &reply, o, local, &mut r.live);
                if found.is_empty() {
                    r.findings.push(finding(h, &reply, o, local));
                }
                problems.extend(found);
            }
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("cannot launch:\n  {}", problems.join("\n  "));
    }
    Ok(r)
}

/// One line per live job: host, job id, its live processes.
fn stale_listing(hosts: &[Host], live: &[(usize, pb::JobInfo)]) -> Vec<String> {
    live.iter()
        .map(|(rank, j)| {
            let pids: Vec<String> = j
                .processes
                .iter()
                .filter(|p| p.running)
                .map(|p| format!("{} pid {}", p.label, p.pid))
                .collect();
            let host = hosts
                .get(*rank)
                .map_or_else(|| format!("m{rank}"), Host::name);
            format!(
                "{host}: job {} ({} live processes: {})",
                j.job_id,
                j.live_pids,
                pids.join(", ")
            )
        })
        .collect()
}

async fn stop_stale(
    hosts: &[Host],
    live: &[(usize, pb::JobInfo)],
    grace: Duration,
) -> anyhow::Result<()> {
    let calls = live.iter().map(|(rank, j)| {
        let mut client = hosts[*rank].client.clone();
        let req = pb::StopRequest {
            job_id: j.job_id.clone(),
            grace_ms: grace.as_millis().min(u32::MAX as u128) as u32,
            force: false,
            requester: crate::ops::requester("dgl-coord launch --kill-stale"),
        };
        async move { (*rank, client.stop(req).await) }
    });
    for (rank, r) in futures::future::join_all(calls).await {
        match r {
            Ok(reply) if reply.get_ref().remaining == 0 => {}
            Ok(reply) => anyhow::bail!(
                "{}: {} processes of the stale job survived SIGKILL",
                hosts[rank].name(),
                reply.get_ref().remaining
            ),
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => anyhow::bail!(
                "{}: cannot stop the stale job: {}",
                hosts[rank].name(),
                s.message()
            ),
        }
    }
    Ok(())
}
