//! Operator commands: `status` (what every agent has) and `kill` (stop jobs by hand).

use std::time::Duration;

use dglrun_proto::pb;
use serde::Serialize;

use crate::cluster::{self, AgentAccess, Host};
use crate::config::IpConfig;

/// How long an operator command waits for an agent to connect and say hello: a host whose
/// packets are dropped (down, firewalled) never refuses, and `kill` must not wait on it long.
/// Under the transport's 3 s connect timeout, so this bound (and its message) always decides.
pub const ANSWER_TIMEOUT: Duration = Duration::from_millis(2500);
/// How long `ListJobs` may take on an agent that did answer Hello.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// `cluster::connect` bounded by [`ANSWER_TIMEOUT`], the silence reported naming the host.
pub(crate) async fn connect(
    rank: usize,
    ip: std::net::IpAddr,
    access: &AgentAccess,
) -> Result<Host, cluster::ConnectError> {
    match tokio::time::timeout(ANSWER_TIMEOUT, cluster::connect(rank, ip, access)).await {
        Ok(r) => r,
        Err(_) => Err(cluster::ConnectError::Unreachable {
            rank,
            addr: std::net::SocketAddr::new(ip, access.port),
            reason: format!(
                "no answer within {:.1} s (host down, or its packets dropped on the way)",
                ANSWER_TIMEOUT.as_secs_f64()
            ),
        }),
    }
}

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
    let call = host.client.list_jobs(pb::ListJobsRequest {});
    Ok(tokio::time::timeout(LIST_TIMEOUT, call)
        .await
        .map_err(|_| {
            tonic::Status::deadline_exceeded(format!(
                "no answer within {} s",
                LIST_TIMEOUT.as_secs()
            ))
        })??
        .into_inner()
        .jobs)
}

/// Asks every agent at once; an unreachable agent is reported, not fatal.
pub async fn status(ips: &IpConfig, access: &AgentAccess) -> Vec<HostStatus> {
    let probes = ips.machines.iter().map(|m| async move {
        let address = format!("{}:{}", m.ip, access.port);
        match connect(m.rank, m.ip, access).await {
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
                match &h.error {
                    Some(e) => out.push_str(&format!("    {e}\n")),
                    // Only a listing that worked can say there are none.
                    None if h.jobs.is_empty() => out.push_str("    no jobs\n"),
                    None => {}
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

/// Who is asking, as an agent names it in a job's `stopped` event: the command, the host,
/// the user and the process.
pub fn requester(command: &str) -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "an unnamed host".to_string());
    let uid = nix::unistd::getuid();
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {uid}"), |u| u.name);
    format!(
        "{command} from {host} (user {user}, pid {})",
        std::process::id()
    )
}

/// What `kill` did to one job on one host.
#[derive(Debug, Serialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum KillState {
    /// It was running and is stopped now.
    Stopped,
    /// Nothing of it was running any more: nothing was signalled.
    AlreadyFinished,
    /// Some of its processes outlived SIGKILL.
    Survived,
}

#[derive(Debug, Serialize)]
pub struct Killed {
    pub machine: usize,
    pub address: String,
    pub job_id: String,
    pub state: KillState,
    pub signalled: u32,
    pub remaining: u32,
}

/// A host `kill` could not act on.
#[derive(Debug, Serialize)]
pub struct KillFailure {
    pub machine: usize,
    pub address: String,
    /// False when the agent could not be reached at all.
    pub reachable: bool,
    pub error: String,
}

/// Everything `kill` did and could not do; it succeeded when `errors` is empty.
#[derive(Debug, Serialize)]
pub struct KillReport {
    pub jobs: Vec<Killed>,
    pub failures: Vec<KillFailure>,
    /// One line per problem: unreachable hosts, failed stops, survivors, an unknown job.
    pub errors: Vec<String>,
}

impl KillReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// One line per job and host, then the problems.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for k in &self.jobs {
            let what = match k.state {
                KillState::Stopped => format!(
                    "stopped job {} ({} processes signalled)",
                    k.job_id, k.signalled
                ),
                KillState::AlreadyFinished => {
                    format!("job {} had already finished: nothing to stop", k.job_id)
                }
                KillState::Survived => format!(
                    "job {}: {} of its processes survived SIGKILL",
                    k.job_id, k.remaining
                ),
            };
            out.push_str(&format!("m{} ({}): {what}\n", k.machine, k.address));
        }
        if self.jobs.is_empty() && self.errors.is_empty() {
            out.push_str("no jobs to stop\n");
        }
        out
    }
}

/// What one reachable host reported, or why it could not be asked.
type HostKill = Result<Vec<Killed>, KillFailure>;

/// Stops `job` (or every job) on every host it can reach, each host on its own: an
/// unreachable host is reported and never keeps the others from being stopped. A job that
/// is already over is reported as such, not stopped again; `job` known to no reachable host
/// is an error naming the hosts asked.
pub async fn kill(
    ips: &IpConfig,
    access: &AgentAccess,
    job: Option<&str>,
    grace: Duration,
    force: bool,
) -> KillReport {
    let requester = requester("dgl-coord kill");
    let per_host = ips.machines.iter().map(|m| {
        let requester = requester.clone();
        async move { kill_on(m.rank, m.ip, access, job, grace, force, &requester).await }
    });
    let mut report = KillReport {
        jobs: Vec::new(),
        failures: Vec::new(),
        errors: Vec::new(),
    };
    let mut asked = Vec::new();
    for (m, r) in ips
        .machines
        .iter()
        .zip(futures::future::join_all(per_host).await)
    {
        match r {
            Ok(killed) => {
                asked.push(format!("m{} ({}:{})", m.rank, m.ip, access.port));
                report.jobs.extend(killed);
            }
            Err(f) => {
                if f.reachable {
                    asked.push(format!("m{} ({})", f.machine, f.address));
                }
                report
                    .errors
                    .push(format!("m{} ({}): {}", f.machine, f.address, f.error));
                report.failures.push(f);
            }
        }
    }
    for k in report
        .jobs
        .iter()
        .filter(|k| k.state == KillState::Survived)
    {
        report.errors.push(format!(
            "m{} ({}): job {}: {} processes survived SIGKILL",
            k.machine, k.address, k.job_id, k.remaining
        ));
    }
    if let Some(id) = job {
        if !report.jobs.iter().any(|k| k.job_id == id) {
            let asked = if asked.is_empty() {
                "no agent could be asked".to_string()
            } else {
                format!("asked {}", asked.join(", "))
            };
            report
                .errors
                .push(format!("no agent knows job {id:?} ({asked})"));
        }
    }
    report
}

async fn kill_on(
    rank: usize,
    ip: std::net::IpAddr,
    access: &AgentAccess,
    job: Option<&str>,
    grace: Duration,
    force: bool,
    requester: &str,
) -> HostKill {
    let address = format!("{ip}:{}", access.port);
    let fail = |reachable: bool, error: String| KillFailure {
        machine: rank,
        address: address.clone(),
        reachable,
        error,
    };
    let mut host = connect(rank, ip, access).await.map_err(|e| match e {
        cluster::ConnectError::Unreachable { reason, .. } => fail(
            false,
            format!("unreachable, nothing stopped there: {reason}"),
        ),
        cluster::ConnectError::Refused { reason, .. } => {
            fail(true, format!("the agent refused dgl-coord: {reason}"))
        }
    })?;
    let jobs = list_jobs(&mut host)
        .await
        .map_err(|s| fail(true, format!("cannot list jobs: {}", s.message())))?;
    let mut done = Vec::new();
    for j in jobs
        .into_iter()
        .filter(|j| job.is_none_or(|id| id == j.job_id))
    {
        let running = j.live_pids > 0 || j.processes.iter().any(|p| p.running);
        if !running {
            done.push(Killed {
                machine: rank,
                address: address.clone(),
                job_id: j.job_id,
                state: KillState::AlreadyFinished,
                signalled: 0,
                remaining: 0,
            });
            continue;
        }
        let reply = host
            .client
            .stop(pb::StopRequest {
                job_id: j.job_id.clone(),
                grace_ms: grace.as_millis().min(u32::MAX as u128) as u32,
                force,
                requester: requester.to_string(),
            })
            .await
            .map_err(|s| {
                fail(
                    true,
                    format!("cannot stop job {}: {}", j.job_id, s.message()),
                )
            })?
            .into_inner();
        let state = if reply.remaining > 0 {
            KillState::Survived
        } else if reply.already_finished {
            KillState::AlreadyFinished
        } else {
            KillState::Stopped
        };
        done.push(Killed {
            machine: rank,
            address: address.clone(),
            job_id: j.job_id,
            state,
            signalled: reply.signalled,
            remaining: reply.remaining,
        });
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn killed(job: &str, state: KillState, signalled: u32) -> Killed {
        Killed {
            machine: 0,
            address: "10.0.0.1:47001".into(),
            job_id: job.into(),
            state,
            signalled,
            remaining: 0,
        }
    }

    #[test]
    fn a_kill_report_says_what_was_stopped_and_what_was_over() {
        let report = KillReport {
            jobs: vec![
                killed("a", KillState::Stopped, 3),
                killed("b", KillState::AlreadyFinished, 0),
            ],
            failures: Vec::new(),
            errors: Vec::new(),
        };
        assert!(report.ok());
        assert_eq!(
            report.render(),
            "m0 (10.0.0.1:47001): stopped job a (3 processes signalled)\n\
             m0 (10.0.0.1:47001): job b had already finished: nothing to stop\n"
        );
        let empty = KillReport {
            jobs: Vec::new(),
            failures: Vec::new(),
            errors: Vec::new(),
        };
        assert_eq!(empty.render(), "no jobs to stop\n");
    }

    #[test]
    fn the_requester_names_command_host_user_and_pid() {
        let r = requester("dgl-coord kill");
        assert!(r.starts_with("dgl-coord kill from "), "{r}");
        assert!(
            r.contains(" (user ") && r.ends_with(&format!(", pid {})", std::process::id())),
            "{r}"
        );
    }

    #[test]
    fn bytes_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    /// `dgl-coord status` as a user reads it: a host with jobs, an idle one, one whose jobs
    /// cannot be listed, an unreachable one.
    #[test]
    fn status_snapshot() {
        let agent = |host: &str| AgentFacts {
            version: "0.1.0".into(),
            protocol: 3,
            hostname: host.into(),
            root: "/home/u/dglrun".into(),
            free_bytes: 123 << 30,
            pid: 4000,
        };
        let proc_ = |label: &str, pid, running, exit: &str| ProcessStatus {
            label: label.into(),
            pid,
            running,
            exit: exit.into(),
        };
        let hosts = vec![
            HostStatus {
                machine: 0,
                address: "10.0.0.1:47001".into(),
                reachable: true,
                error: None,
                agent: Some(agent("node0")),
                jobs: vec![JobStatus {
                    job_id: "graphsage-1733040000".into(),
                    workspace: "/home/u/dglrun/graphsage".into(),
                    live_pids: 3,
                    processes: vec![
                        proc_("server0", 4101, true, "running"),
                        proc_("trainer0", 4102, false, "exit 0"),
                        proc_("trainer1", 4103, false, "signal 9"),
                    ],
                }],
            },
            HostStatus {
                machine: 1,
                address: "10.0.0.2:47001".into(),
                reachable: true,
                error: None,
                agent: Some(agent("node1")),
                jobs: Vec::new(),
            },
            HostStatus {
                machine: 2,
                address: "10.0.0.3:47001".into(),
                reachable: true,
                error: Some("cannot list jobs: deadline exceeded".into()),
                agent: Some(agent("node2")),
                jobs: Vec::new(),
            },
            HostStatus {
                machine: 3,
                address: "10.0.0.4:47001".into(),
                reachable: false,
                error: Some("connection refused".into()),
                agent: None,
                jobs: Vec::new(),
            },
        ];
        insta::assert_snapshot!(render_status(&hosts));
    }
}
