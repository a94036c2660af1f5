//! Doctor's cheap checks (`doctor::cheap`) as refusals of a launch, on every host at once once
//! the stale jobs are gone: a timed Hello (the clock) and a second Preflight (who listens on
//! the machine's DGL server ports; /dev/shm against the partition files the host's part_config
//! names, which the first Preflight returned). Two round trips, no process started.

use std::path::Path;

use dglrun_proto::pb;

use super::plan::LaunchOptions;
use crate::cluster::Host;
use crate::config::{IpConfig, PartConfig};
use crate::doctor::cheap::{self, CLOCK_FAIL_MS};
use crate::doctor::Status;

/// Files whose sizes one Preflight may ask (the agent's bound).
const MAX_SIZES: usize = 64;

/// The partition files (relative to the workspace) machine `rank` loads, from the part_config
/// its host holds (its text, as the first Preflight read it); empty when there is none.
pub fn partition_paths(reply: &pb::PreflightReply, o: &LaunchOptions, rank: usize) -> Vec<String> {
    let Some(text) = reply
        .files
        .iter()
        .find(|f| f.path == o.part_config && f.exists)
        .and_then(|f| std::str::from_utf8(&f.content).ok())
    else {
        return Vec::new();
    };
    let Ok(pc) = PartConfig::parse(text, Path::new(&o.part_config)) else {
        return Vec::new();
    };
    cheap::partition_files(&pc, rank)
        .into_iter()
        .map(|f| f.local.display().to_string())
        .take(MAX_SIZES)
        .collect()
}

/// Runs the checks on every host; every problem of every host in one error.
pub async fn check_all(
    hosts: &[Host],
    o: &LaunchOptions,
    local: &IpConfig,
    partitions: &[Vec<String>],
) -> anyhow::Result<()> {
    let calls = hosts.iter().zip(partitions).map(|(h, files)| {
        let ports = local
            .machines
            .get(h.rank)
            .map(|m| cheap::server_ports(m.port, o.num_servers))
            .unwrap_or_default();
        async move { check_host(h, o, ports, files).await }
    });
    let problems: Vec<String> = futures::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect();
    if !problems.is_empty() {
        anyhow::bail!("cannot launch:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

async fn check_host(h: &Host, o: &LaunchOptions, ports: Vec<u16>, files: &[String]) -> Vec<String> {
    let name = h.name();
    let mut client = h.client.clone();
    let req = pb::PreflightRequest {
        workspace: o.workspace.clone(),
        listening_ports: ports.iter().map(|&p| p.into()).collect(),
        listening_ip: h.ip.to_string(),
        sizes_of: files.to_vec(),
        ..Default::default()
    };
    let (hello, reply) = tokio::join!(cheap::timed_hello(h), cheap::bounded(client.preflight(req)));
    let mut problems = Vec::new();
    match hello {
        Err(e) => problems.push(format!("{name}: no answer to Hello: {e}")),
        Ok((_, Some(offset))) => {
            let c = cheap::clock_check(offset);
            if c.status == Status::Fail {
                problems.push(format!(
                    "{name}: its clock is {offset:+} ms off this host's (more than {} s): {}",
                    CLOCK_FAIL_MS / 1000,
                    c.fix.unwrap_or_default()
                ));
            }
        }
        Ok((_, None)) => {}
    }
    let reply = match reply {
        Ok(r) => r,
        Err(e) => {
            problems.push(format!("{name}: preflight failed: {e}"));
            return problems;
        }
    };
    let c = cheap::ports_check(&reply.listening, &ports);
    if c.status == Status::Fail {
        problems.push(format!(
            "{name}: DGL server port {}: {}",
            c.detail,
            c.fix.unwrap_or_default()
        ));
    }
    let need: u64 = reply.sizes.iter().map(|s| s.size).sum();
    if let Some(c) = cheap::shm_short(reply.shm_free_bytes, Some(need).filter(|&n| n > 0)) {
        problems.push(format!(
            "{name}: {}: {}",
            c.detail,
            c.fix.unwrap_or_default()
        ));
    }
    problems
}
