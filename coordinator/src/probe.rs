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
    spawn(host, &job_id, workspace, script, timeout)
        .await
        .map_err(|s| anyhow::anyhow!("{}: cannot start a probe: {}", host.name(), s.message()))?;
    let result = tokio::time::timeout(timeout, follow(host, &job_id)).await;
    // Stopped in every case: a job holds its workspace until stopped, even once its process
    // has exited, and a launch may follow into the same workspace.
    stop(host, job_id).await;
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

/// Starts the probe as a job of its own, its lease outliving the timeout.
async fn spawn(
    host: &Host,
    job_id: &str,
    workspace: &str,
    script: &str,
    timeout: Duration,
) -> Result<(), tonic::Status> {
    let spec = pb::ProcessSpec {
        label: "probe".into(),
        role: "probe".into(),
        command: Some(pb::process_spec::Command::Shell(script.to_string())),
        env: Default::default(),
        cwd: String::new(),
    };
    host.client
        .clone()
        .spawn(pb::SpawnRequest {
            job_id: job_id.to_string(),
            workspace: workspace.to_string(),
            processes: vec![spec],
            lease_ms: (timeout + Duration::from_secs(5)).as_millis() as u32,
            restart: false,
        })
        .await?;
    Ok(())
}

/// The probe's output, watched until it exits.
async fn follow(host: &Host, job_id: &str) -> Result<ProbeOutput, tonic::Status> {
    let mut stream = host
        .client
        .clone()
        .watch(pb::WatchRequest {
            job_id: job_id.to_string(),
            after_seq: 0,
        })
        .await?
        .into_inner();
    let mut out = ProbeOutput::default();
    while let Some(ev) = stream.message().await? {
        if out.add(ev.event) {
            return Ok(out);
        }
    }
    Err(tonic::Status::aborted(
        "the probe's events ended before it exited",
    ))
}

async fn stop(host: &Host, job_id: String) {
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
}

impl ProbeOutput {
    /// Takes in one of the probe's events: a line (up to [`MAX_LINES`] a stream), or its exit;
    /// true once it exited.
    fn add(&mut self, event: Option<Event>) -> bool {
        match event {
            Some(Event::Line(l)) => {
                let to = if l.stream == pb::OutputStream::Stderr as i32 {
                    &mut self.stderr
                } else {
                    &mut self.stdout
                };
                if to.len() < MAX_LINES {
                    to.push(String::from_utf8_lossy(&l.text).to_string());
                }
                false
            }
            Some(Event::Exited(e)) => {
                self.code = e.code;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(stream: pb::OutputStream, text: &str) -> Option<Event> {
        Some(Event::Line(pb::OutputLine {
            stream: stream as i32,
            text: text.as_bytes().to_vec(),
            ..Default::default()
        }))
    }

    #[test]
    fn a_probe_keeps_its_lines_by_stream_until_it_exits() {
        use pb::OutputStream::{Stderr, Stdout};
        let exit = Some(Event::Exited(pb::ProcessExited {
            code: 3,
            ..Default::default()
        }));
        // (event, whether it ends the probe)
        let cases = [
            (line(Stdout, "a"), false),
            (line(Stderr, "oops"), false),
            (None, false),
            (line(Stdout, "b"), false),
            (exit, true),
        ];
        let mut out = ProbeOutput::default();
        for (event, ends) in cases {
            assert_eq!(out.add(event.clone()), ends, "{event:?}");
        }
        assert_eq!(
            (out.stdout, out.stderr, out.code),
            (
                vec!["a".to_string(), "b".into()],
                vec!["oops".to_string()],
                3
            )
        );
    }

    #[test]
    fn a_stream_keeps_at_most_its_bound_of_lines() {
        let mut out = ProbeOutput::default();
        for i in 0..MAX_LINES + 5 {
            assert!(!out.add(line(pb::OutputStream::Stdout, &i.to_string())));
        }
        assert_eq!(out.stdout.len(), MAX_LINES);
        assert_eq!(out.stdout.last().map(String::as_str), Some("999"));
    }
}
