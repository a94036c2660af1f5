//! A short probe process on a host, through its agent (Spawn, Watch until it exits): what the
//! agent cannot know by itself (the GPUs on its PATH, the Python a job would use and whether it
//! imports dgl and torch, /dev/shm, who holds a port) is asked of the host as a job would see it.
//!
//! A probe is an ordinary job of its own (id `dglrun-probe-...`): it gets the agent's bounds,
//! confinement and lease, and is stopped if it outlives its timeout.

use std::time::Duration;

use dglrun_proto::pb::{self, job_event::Event};

use crate::cluster::Host;

/// Lines of output a probe may return (the rest is dropped).
const MAX_LINES: usize = 1000;

/// What a probe printed and how it ended.
#[derive(Clone, Debug, Default)]
pub struct ProbeOutput {
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    /// Exit code; -1 for a signal.
    pub code: i32,
}

/// Runs `script` with `sh -c` in `workspace` on `host`; fails naming the host when it cannot
/// be started or does not finish within `timeout` (then it is stopped).
pub async fn run(
    host: &Host,
    workspace: &str,
    script: &str,
    timeout: Duration,
) -> anyhow::Result<ProbeOutput> {
    let job_id = format!("dglrun-probe-m{}-{:08x}", host.rank, rand::random::<u32>());
    let mut client = host.client.clone();
    let spec = pb::ProcessSpec {
        label: "probe".into(),
        role: "probe".into(),
        command: Some(pb::process_spec::Command::Shell(script.to_string())),
        env: Default::default(),
        cwd: String::new(),
    };
    client
        .spawn(pb::SpawnRequest {
            job_id: job_id.clone(),
            workspace: workspace.to_string(),
            processes: vec![spec],
            lease_ms: (timeout + Duration::from_secs(5)).as_millis() as u32,
            restart: false,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}: cannot start a probe: {}", host.name(), s.message()))?;
    let follow = async {
        let mut stream = client
            .watch(pb::WatchRequest {
                job_id: job_id.clone(),
                after_seq: 0,
            })
            .await?
            .into_inner();
        let mut out = ProbeOutput::default();
        while let Some(ev) = stream.message().await? {
            match ev.event {
                Some(Event::Line(l)) => {
                    let text = String::from_utf8_lossy(&l.text).to_string();
                    let to = if l.stream == pb::OutputStream::Stderr as i32 {
                        &mut out.stderr
                    } else {
                        &mut out.stdout
                    };
                    if to.len() < MAX_LINES {
                        to.push(text);
                    }
                }
                Some(Event::Exited(e)) => {
                    out.code = e.code;
                    return Ok(out);
                }
                _ => {}
            }
        }
        Err(tonic::Status::aborted(
            "the probe's events ended before it exited",
        ))
    };
    let result = tokio::time::timeout(timeout, follow).await;
    // Stopped in every case: a job holds its workspace until stopped, even once its process
    // has exited, and a launch may follow into the same workspace.
    let _ = host
        .client
        .clone()
        .stop(pb::StopRequest {
            job_id,
            grace_ms: 500,
            force: false,
            requester: crate::ops::requester("dgl-coord probe"),
        })
        .await;
    match result {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(s)) => anyhow::bail!("{}: probe failed: {}", host.name(), s.message()),
        Err(_) => anyhow::bail!(
            "{}: probe did not finish within {} s",
            host.name(),
            timeout.as_secs()
        ),
    }
}
