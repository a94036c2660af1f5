//! A job supervised by machine 0's agent instead of by dgl-coord (`launch --detach`).
//!
//! There is one driver: machine 0's agent runs `driver::run_reporting_start`, the same loop an
//! attached launch runs, with a sink that prints nothing and keeps the notes and the table
//! (`Sink::captured`) and with no signals. dgl-coord plans and checks as for any launch, then
//! hands the plan over in one `Supervise` call (`request`), which answers once every process
//! has started. The agent parses it back (`Supervision::parse`), reaches every other agent
//! with its own token (`connect`) and runs the driver (`run`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dglrun_proto::pb;

use super::command::CommandLine;
use super::driver::{self, DriverOptions, JobPolicy, RestartPolicy, Signals, Watchdog};
use super::plan::{PlannedProcess, Role};
use super::servers_ready::ServerPorts;
use super::sink::Sink;
use crate::cluster::{self, AgentAccess, Host};

/// Machines of one supervised job.
pub const MAX_HOSTS: usize = 1024;
/// Processes of one machine (as one Spawn takes).
pub const MAX_PROCESSES_PER_HOST: usize = 1024;
/// The longest grace a job may ask for.
pub const MAX_GRACE: Duration = Duration::from_secs(600);
/// The longest `--wait-servers` wait.
pub const MAX_WAIT_SERVERS: Duration = Duration::from_secs(3600);
/// Restarts of one supervised job: a bound on what a request can make an agent do.
pub const MAX_RESTARTS: u32 = 10_000;
/// How long the supervising agent waits for each other agent's Hello.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why machine 0's agent refuses a `Supervise` request. Every variant but `Unreachable` is a
/// request that breaks a bound or does not parse.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("a supervised job has 1 to {MAX_HOSTS} machines, not {0}")]
    Machines(usize),
    #[error("grace_ms {0} is over {secs} s", secs = MAX_GRACE.as_secs())]
    Grace(u32),
    #[error("wait_servers_ms {0} is over {secs} s", secs = MAX_WAIT_SERVERS.as_secs())]
    WaitServers(u32),
    #[error("max_restarts {0} is over {MAX_RESTARTS}")]
    MaxRestarts(u32),
    #[error("restart_on code {0} is over 255")]
    RestartOn(u32),
    #[error("machines must come in order: machine {machine} at position {rank}")]
    Order { machine: u32, rank: usize },
    #[error("machine {rank}: agent address {address:?} is not IP:PORT")]
    Address { rank: usize, address: String },
    #[error("machine {rank}: {count} processes, at most {MAX_PROCESSES_PER_HOST}")]
    Processes { rank: usize, count: usize },
    #[error("machine {rank}: server port {port} out of range")]
    ServerPort { rank: usize, port: u32 },
    #[error("machine {machine} {label}: role {role:?} is none of server, trainer, trainer-group")]
    Role {
        machine: usize,
        label: String,
        role: String,
    },
    #[error("machine {machine} {label}: no command")]
    NoCommand { machine: usize, label: String },
    /// Each unreachable agent, as `cluster::connect` or the timeout says it.
    #[error(
        "machine 0's agent cannot reach every other agent, so it cannot supervise a detached \
         job (the agents of one cluster must share a token and reach each other on the agent \
         port): {list}",
        list = .0.join("; ")
    )]
    Unreachable(Vec<String>),
}

impl SuperviseError {
    /// Whether the request itself is at fault (as against the cluster around it).
    pub fn is_bad_request(&self) -> bool {
        !matches!(self, Self::Unreachable(_))
    }
}

fn millis(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

/// What a supervising agent needs besides the hosts and the plan: the driver's options.
pub struct Terms<'a> {
    pub job_id: &'a str,
    pub workspace: &'a str,
    pub lease: Duration,
    pub grace: Duration,
    pub servers: Option<&'a ServerPorts>,
    pub policy: &'a JobPolicy,
}

/// dgl-coord's side: the plan and the driver's options as machine 0's agent takes them.
pub fn request(hosts: &[Host], plan: &[PlannedProcess], t: Terms<'_>) -> pb::SuperviseRequest {
    pb::SuperviseRequest {
        job_id: t.job_id.to_string(),
        workspace: t.workspace.to_string(),
        hosts: hosts
            .iter()
            .map(|h| pb::SupervisedHost {
                machine: h.rank as u32,
                address: h.addr.to_string(),
                // Servers first, as the driver starts them.
                processes: plan
                    .iter()
                    .filter(|p| p.machine == h.rank && !p.role.is_trainer())
                    .chain(
                        plan.iter()
                            .filter(|p| p.machine == h.rank && p.role.is_trainer()),
                    )
                    .map(|p| driver::to_spec(p, 0))
                    .collect(),
                server_ports: t
                    .servers
                    .and_then(|s| s.per_machine.get(h.rank))
                    .map(|ports| ports.iter().map(|&p| u32::from(p)).collect())
                    .unwrap_or_default(),
            })
            .collect(),
        lease_ms: millis(t.lease),
        grace_ms: millis(t.grace),
        wait_servers_ms: t.servers.map_or(0, |s| millis(s.timeout).max(1)),
        max_restarts: t.policy.restart.max_restarts,
        restart_backoff_ms: millis(t.policy.restart.first_backoff),
        restart_on: t
            .policy
            .restart
            .restart_on
            .iter()
            .flatten()
            .map(|&c| u32::from(c))
            .collect(),
        stall_timeout_ms: t.policy.watchdog.stall_timeout.map_or(0, millis),
        start_timeout_ms: t.policy.watchdog.start_timeout.map_or(0, millis),
    }
}

/// A `SuperviseRequest`, checked: what the agent of machine 0 runs.
#[derive(Clone, Debug)]
pub struct Supervision {
    pub job_id: String,
    pub workspace: String,
    /// Each machine's agent, by rank.
    pub agents: Vec<SocketAddr>,
    pub plan: Vec<PlannedProcess>,
    pub lease: Duration,
    pub grace: Duration,
    pub servers: Option<ServerPorts>,
    pub policy: JobPolicy,
}

fn role(name: &str) -> Option<Role> {
    [Role::Server, Role::Trainer, Role::TrainerGroup]
        .into_iter()
        .find(|r| r.as_str() == name)
}

impl Supervision {
    /// Checks the request's shape and bounds; the processes themselves are checked by the
    /// agent of their host when they are spawned.
    pub fn parse(r: pb::SuperviseRequest) -> Result<Self, SuperviseError> {
        if r.hosts.is_empty() || r.hosts.len() > MAX_HOSTS {
            return Err(SuperviseError::Machines(r.hosts.len()));
        }
        let grace = Duration::from_millis(u64::from(r.grace_ms));
        if grace > MAX_GRACE {
            return Err(SuperviseError::Grace(r.grace_ms));
        }
        let wait = Duration::from_millis(u64::from(r.wait_servers_ms));
        if wait > MAX_WAIT_SERVERS {
            return Err(SuperviseError::WaitServers(r.wait_servers_ms));
        }
        let policy = policy(&r)?;
        let mut agents = Vec::with_capacity(r.hosts.len());
        let mut plan = Vec::new();
        let mut ports = Vec::with_capacity(r.hosts.len());
        for (rank, h) in r.hosts.into_iter().enumerate() {
            if h.machine as usize != rank {
                return Err(SuperviseError::Order {
                    machine: h.machine,
                    rank,
                });
            }
            let addr: SocketAddr = h.address.parse().map_err(|_| SuperviseError::Address {
                rank,
                address: h.address.clone(),
            })?;
            agents.push(addr);
            if h.processes.len() > MAX_PROCESSES_PER_HOST {
                return Err(SuperviseError::Processes {
                    rank,
                    count: h.processes.len(),
                });
            }
            for p in h.processes {
                plan.push(planned(rank, p)?);
            }
            let machine_ports = h
                .server_ports
                .iter()
                .map(|&p| {
                    u16::try_from(p)
                        .ok()
                        .filter(|&p| p != 0)
                        .ok_or(SuperviseError::ServerPort { rank, port: p })
                })
                .collect::<Result<Vec<u16>, _>>()?;
            ports.push(machine_ports);
        }
        let servers = (!wait.is_zero()).then_some(ServerPorts {
            per_machine: ports,
            timeout: wait,
        });
        Ok(Self {
            job_id: r.job_id,
            workspace: r.workspace,
            agents,
            plan,
            lease: Duration::from_millis(u64::from(r.lease_ms)),
            grace,
            servers,
            policy,
        })
    }
}

/// Restart and watchdog settings as the attached driver takes them.
fn policy(r: &pb::SuperviseRequest) -> Result<JobPolicy, SuperviseError> {
    if r.max_restarts > MAX_RESTARTS {
        return Err(SuperviseError::MaxRestarts(r.max_restarts));
    }
    let restart_on = r
        .restart_on
        .iter()
        .map(|&c| u8::try_from(c).map_err(|_| SuperviseError::RestartOn(c)))
        .collect::<Result<Vec<u8>, _>>()?;
    let ms = |v: u32| (v > 0).then(|| Duration::from_millis(u64::from(v)));
    Ok(JobPolicy {
        restart: RestartPolicy {
            max_restarts: r.max_restarts,
            first_backoff: Duration::from_millis(u64::from(r.restart_backoff_ms)),
            restart_on: (!restart_on.is_empty()).then_some(restart_on),
        },
        watchdog: Watchdog {
            stall_timeout: ms(r.stall_timeout_ms),
            start_timeout: ms(r.start_timeout_ms),
        },
    })
}

fn planned(machine: usize, p: pb::ProcessSpec) -> Result<PlannedProcess, SuperviseError> {
    let Some(role) = role(&p.role) else {
        return Err(SuperviseError::Role {
            machine,
            label: p.label,
            role: p.role,
        });
    };
    let command = match p.command {
        Some(pb::process_spec::Command::Argv(a)) => CommandLine::Argv(a.args),
        Some(pb::process_spec::Command::Shell(s)) => CommandLine::Shell(s),
        None => {
            return Err(SuperviseError::NoCommand {
                machine,
                label: p.label,
            })
        }
    };
    Ok(PlannedProcess {
        machine,
        role,
        label: p.label,
        command,
        env: p.env.into_iter().collect(),
        cwd: p.cwd,
    })
}

/// The supervising agent's side: reaches every machine's agent (itself included). A host
/// it cannot reach refuses the detached launch before anything started.
pub async fn connect(s: &Supervision, access: &AgentAccess) -> Result<Vec<Host>, SuperviseError> {
    let attempts = s.agents.iter().enumerate().map(|(rank, addr)| async move {
        let access = access.with_port(addr.port());
        match tokio::time::timeout(CONNECT_TIMEOUT, cluster::connect(rank, addr.ip(), &access))
            .await
        {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "agent of machine {rank} at {addr} is unreachable: no answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            )),
        }
    });
    let mut hosts = Vec::new();
    let mut errors = Vec::new();
    for r in futures::future::join_all(attempts).await {
        match r {
            Ok(h) => hosts.push(h),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(SuperviseError::Unreachable(errors));
    }
    Ok(hosts)
}

/// How a supervised job ended.
#[derive(Clone, Debug)]
pub struct Finished {
    pub code: u8,
    /// The notes and the table an attached launch prints on stderr.
    pub text: String,
    /// As the summary event names it (`success`, `failed`, ...).
    pub outcome: String,
}

/// Runs the job to its end with the launch's own driver; `started` is told once every
/// process has started.
pub async fn run(
    s: Supervision,
    hosts: Vec<Host>,
    access: AgentAccess,
    started: tokio::sync::oneshot::Sender<()>,
) -> Finished {
    let (out, captured) = Sink::captured(Instant::now());
    let rank_exit = out.rank_exit_code();
    // Nothing signals a supervisor: a stop comes to the agents as a Stop from any client.
    let (_never, signals) = Signals::channel();
    let o = DriverOptions {
        job_id: s.job_id,
        workspace: s.workspace,
        grace: s.grace,
        lease: s.lease,
        started: Instant::now(),
        access,
        servers_ready: s.servers,
        policy: s.policy,
    };
    let code = driver::run_reporting_start(hosts, s.plan, o, out, signals, Some(started)).await;
    let c = captured.lock().clone();
    let outcome = c.outcome.map_or("failed".to_string(), |o| {
        serde_json::to_value(o)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    });
    match code {
        Ok(code) => Finished {
            code: rank_exit.get().copied().unwrap_or(code),
            text: c.text,
            outcome,
        },
        Err(e) => Finished {
            code: 1,
            text: format!("{}dgl-coord: error: {e:#}\n", c.text),
            outcome: "failed".to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(machine: u32, role: &str) -> pb::SupervisedHost {
        pb::SupervisedHost {
            machine,
            address: format!("10.0.0.{}:47001", machine + 1),
            processes: vec![pb::ProcessSpec {
                label: "server0".into(),
                role: role.into(),
                command: Some(pb::process_spec::Command::Shell("sleep 1".into())),
                env: [("A".to_string(), "1".to_string())].into(),
                cwd: String::new(),
            }],
            server_ports: vec![30050],
        }
    }

    fn req(hosts: Vec<pb::SupervisedHost>) -> pb::SuperviseRequest {
        pb::SuperviseRequest {
            job_id: "j".into(),
            workspace: "ws".into(),
            hosts,
            lease_ms: 3000,
            grace_ms: 1000,
            wait_servers_ms: 0,
            ..Default::default()
        }
    }

    #[test]
    fn a_request_becomes_the_plan_the_driver_runs() {
        let mut r = req(vec![host(0, "server"), host(1, "trainer-group")]);
        let s = Supervision::parse(r.clone()).unwrap();
        assert_eq!(s.agents[1], "10.0.0.2:47001".parse().unwrap());
        assert_eq!(s.plan.len(), 2);
        assert_eq!((s.plan[1].machine, s.plan[1].role), (1, Role::TrainerGroup));
        assert_eq!(s.plan[0].command, CommandLine::Shell("sleep 1".into()));
        assert_eq!(s.plan[0].env["A"], "1");
        assert!(s.servers.is_none(), "no --wait-servers");
        r.wait_servers_ms = 5000;
        let s = Supervision::parse(r).unwrap();
        let ports = s.servers.unwrap();
        assert_eq!(ports.per_machine, vec![vec![30050], vec![30050]]);
        assert_eq!(ports.timeout, Duration::from_secs(5));
    }

    #[test]
    fn restarts_and_timeouts_reach_the_supervising_driver() {
        let r = pb::SuperviseRequest {
            max_restarts: 3,
            restart_backoff_ms: 250,
            restart_on: vec![1, 137],
            stall_timeout_ms: 60_000,
            ..req(vec![host(0, "server")])
        };
        let p = Supervision::parse(r).unwrap().policy;
        assert_eq!(p.restart.max_restarts, 3);
        assert_eq!(p.restart.first_backoff, Duration::from_millis(250));
        assert_eq!(p.restart.restart_on, Some(vec![1, 137]));
        assert_eq!(p.watchdog.stall_timeout, Some(Duration::from_secs(60)));
        assert_eq!(p.watchdog.start_timeout, None);
    }

    #[test]
    fn a_bad_request_is_refused_naming_what() {
        let cases = [
            (req(vec![]), "1 to 1024 machines, not 0"),
            (req(vec![host(1, "server")]), "machine 1 at position 0"),
            (req(vec![host(0, "sampler")]), "role \"sampler\" is none of"),
            (
                pb::SuperviseRequest {
                    grace_ms: 3_600_000,
                    ..req(vec![host(0, "server")])
                },
                "grace_ms 3600000 is over 600 s",
            ),
            (
                req(vec![pb::SupervisedHost {
                    address: "nowhere".into(),
                    ..host(0, "server")
                }]),
                "agent address \"nowhere\" is not IP:PORT",
            ),
            (
                req((0..1025).map(|m| host(m, "server")).collect()),
                "not 1025",
            ),
            (
                pb::SuperviseRequest {
                    restart_on: vec![256],
                    ..req(vec![host(0, "server")])
                },
                "restart_on code 256 is over 255",
            ),
        ];
        for (r, want) in cases {
            let e = Supervision::parse(r).unwrap_err().to_string();
            assert!(e.contains(want), "{e} (wanted {want})");
        }
    }
}
