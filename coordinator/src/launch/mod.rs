//! dgl-coord launch: DGL's process graph on every host, supervised, without ssh.
//!
//! `plan` turns the options and the cluster into the list of processes (pure, tested against
//! DGL's own behaviour); `command` handles the user command (argv or `sh -c`, the torchrun
//! wrap); `preflight` checks the hosts; `driver` runs the plan (`loss` decides when a host is
//! lost; `internal_events` is what its per-host tasks tell it); `sink` takes everything the
//! user sees: `output` (labelled text) or `events` (JSON lines), `logdir` (files), `summary`
//! (the table and exit codes).

pub mod command;
pub mod cpus;
pub mod driver;
pub mod events;
#[allow(unreachable_pub)] // follow.rs is being changed elsewhere; narrow its items then
mod follow;
pub mod gpus;
pub mod host_checks;
pub mod host_env;
mod internal_events;
pub mod logdir;
pub mod loss;
pub mod output;
pub mod plan;
pub mod preflight;
pub mod python_env;
pub mod servers_ready;
pub mod sink;
pub mod summary;
pub mod supervised;
pub mod torchrun_failure;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cluster::{self, AgentAccess};
use crate::config::IpConfig;
pub use plan::{ClusterFacts, LaunchOptions, PlannedProcess, Role, TrainerMode};

/// How dgl-coord itself behaves, beyond launch.py's options.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub access: AgentAccess,
    pub grace: Duration,
    pub lease: Duration,
    pub kill_stale: bool,
    pub dry_run: bool,
    /// With `dry_run`: contact no agent.
    pub offline: bool,
    /// The plan as JSON (with `dry_run`), else the event stream on stdout.
    pub json: bool,
    /// `--log-dir`: per-process files, the merged log, the events and the summary.
    pub log_dir: Option<PathBuf>,
    /// Where ip_config is on this machine when it is not `LaunchOptions::ip_config` (which
    /// is its path in the workspace): `dgl-coord run` knows the file it copied.
    pub local_ip_config: Option<PathBuf>,
    /// When the command started.
    pub started: Instant,
    /// Start the trainers only once every server port listens (`--wait-servers`).
    pub wait_servers: bool,
    /// Hand the job to machine 0's agent once planned and checked (`--detach`).
    pub detach: bool,
    /// Restarts, stall and start timeouts.
    pub policy: driver::JobPolicy,
}

/// A fresh job id: unique enough that two launches never share one.
pub fn new_job_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("dglrun-{secs}-{:08x}", rand::random::<u32>())
}

/// Finds ip_config on this machine, as DGL's launch.py reads it: the path as given (relative
/// to the current directory), else inside the workspace path if that exists here too.
pub fn local_ip_config(o: &LaunchOptions) -> anyhow::Result<(PathBuf, IpConfig)> {
    let given = PathBuf::from(&o.ip_config);
    let mut candidates = vec![given.clone()];
    if given.is_relative() {
        candidates.push(Path::new(&o.workspace).join(&given));
    }
    for c in &candidates {
        if c.is_file() {
            let cfg = IpConfig::load(c)?;
            return Ok((c.clone(), cfg));
        }
    }
    let looked: Vec<String> = candidates
        .iter()
        .map(|c| format!("{}", c.display()))
        .collect();
    anyhow::bail!(
        "cannot find ip_config {:?} on this machine (looked at {}). dgl-coord reads it here to \
         learn the machines and reach their agents: run from the directory that holds it, or \
         give its path",
        o.ip_config,
        looked.join(" and ")
    )
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The facts of this launching machine; `master_port` is filled in after preflight.
pub fn facts(machines: &IpConfig, job_id: &str) -> ClusterFacts {
    ClusterFacts {
        machines: machines.machines.clone(),
        master_port: None,
        pythonpath: env_nonempty("PYTHONPATH"),
        omp_num_threads_env: std::env::var("OMP_NUM_THREADS").ok(),
        cpu_count: std::thread::available_parallelism().map_or(1, |n| n.get()),
        job_id: job_id.to_string(),
        hosts: Vec::new(),
    }
}

/// Each machine's facts from its agent's Hello; a warning for each machine whose processes
/// get no interface variables.
fn host_facts(hosts: &[cluster::Host], out: &mut sink::Sink) -> Vec<host_env::HostFacts> {
    hosts
        .iter()
        .map(|h| {
            if let Some(w) = host_env::unset_reason(&h.name(), &h.hello, h.ip) {
                out.note(&w);
            }
            host_env::from_hello(&h.hello, h.ip)
        })
        .collect()
}

#[derive(Serialize)]
struct DryRun<'a> {
    job_id: &'a str,
    workspace: &'a str,
    machines: Vec<String>,
    master_port: &'a str,
    processes: &'a [PlannedProcess],
}

fn print_plan(
    o: &LaunchOptions,
    f: &ClusterFacts,
    plan: &[PlannedProcess],
    json: bool,
) -> anyhow::Result<()> {
    let text = if json {
        let doc = DryRun {
            job_id: &f.job_id,
            workspace: &o.workspace,
            machines: f
                .machines
                .iter()
                .map(|m| format!("{}:{}", m.ip, m.port))
                .collect(),
            master_port: "<PORT>",
            processes: plan,
        };
        serde_json::to_string_pretty(&doc)? + "\n"
    } else {
        plan_text(o, f, plan)
    };
    // A closed pipe (`| head`) is not an error worth a panic.
    match std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn plan_text(o: &LaunchOptions, f: &ClusterFacts, plan: &[PlannedProcess]) -> String {
    let mut out = format!(
        "{} machines, {} processes, workspace {} (the master port is chosen by machine 0's \
         agent at launch; shown as <PORT>)\n",
        f.machines.len(),
        plan.len(),
        o.workspace
    );
    for p in plan {
        let how = match p.command {
            command::CommandLine::Argv(_) => "argv",
            command::CommandLine::Shell(_) => "sh -c",
        };
        let env: Vec<String> = p.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!(
            "[m{} {}] {} on {}\n  {how}: {}\n  env: {}\n",
            p.machine,
            p.label,
            p.role.as_str(),
            f.machines[p.machine].ip,
            p.command.display(),
            env.join(" ")
        ));
    }
    out
}

/// The whole command: returns the exit code. With `--json` (and in `--log-dir`) a launch
/// that fails before anything started still ends with a `summary` event (outcome `error`).
pub async fn run(o: LaunchOptions, r: RunOptions) -> anyhow::Result<u8> {
    let job_id = new_job_id();
    let log = match &r.log_dir {
        Some(dir) if !r.dry_run => Some(logdir::LogDir::create(dir)?),
        _ => None,
    };
    // Made before preflight, so what it reports (stale jobs stopped) reaches the log dir too.
    let mut out = sink::Sink::new(r.json, r.started, log).with_agent_port(r.access.port);
    let rank_exit = out.rank_exit_code();
    let result = start(&o, &r, &job_id, &mut out).await;
    match result {
        Ok(Started::DryRun) => Ok(0),
        Ok(Started::Running {
            hosts,
            planned,
            servers,
        }) if r.detach => {
            let req = supervised::request(
                &hosts,
                &planned,
                supervised::Terms {
                    job_id: &job_id,
                    workspace: &o.workspace,
                    lease: r.lease,
                    grace: r.grace,
                    servers: servers.as_ref(),
                    policy: &r.policy,
                },
            );
            detach(&hosts, req, &r).await
        }
        Ok(Started::Running {
            hosts,
            planned,
            servers,
        }) => {
            let signals = driver::Signals::os()?;
            let code = driver::run(
                hosts,
                planned,
                driver::DriverOptions {
                    job_id,
                    workspace: o.workspace.clone(),
                    grace: r.grace,
                    lease: r.lease,
                    started: r.started,
                    access: r.access.clone(),
                    servers_ready: servers,
                    policy: r.policy.clone(),
                },
                out,
                signals,
            )
            .await?;
            // torchrun exits 1 whatever its rank did; the sink read the rank's own code.
            Ok(rank_exit.get().copied().unwrap_or(code))
        }
        Err(e) => {
            error_summary(&job_id, &mut out, r.started, &e);
            Err(e)
        }
    }
}

/// `--detach`: machine 0's agent takes the job; its id on stdout once every process started.
async fn detach(
    hosts: &[cluster::Host],
    req: dglrun_proto::pb::SuperviseRequest,
    r: &RunOptions,
) -> anyhow::Result<u8> {
    let Some(leader) = hosts.first() else {
        anyhow::bail!("no machines in ip_config");
    };
    let job_id = req.job_id.clone();
    let reply = match leader.client.clone().supervise(req).await {
        Ok(reply) => reply.into_inner(),
        Err(s) if s.code() == tonic::Code::Unimplemented => anyhow::bail!(
            "the agent of {} cannot supervise detached jobs (it is older than this dgl-coord): \
             upgrade it, or launch without --detach",
            leader.name()
        ),
        Err(s) => anyhow::bail!(
            "the agent of {} did not take the job: {}",
            leader.name(),
            s.message()
        ),
    };
    if !reply.started {
        let shown = output::escape_controls(reply.text.as_bytes(), true);
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), &shown);
        return Ok(u8::try_from(reply.exit_code).unwrap_or(1).max(1));
    }
    if r.json {
        println!(
            "{}",
            serde_json::json!({"event": "detached", "job_id": job_id, "supervisor": leader.addr.to_string()})
        );
    } else {
        println!("{job_id}");
    }
    output::note(&format!(
        "job {job_id} started; the agent of {} supervises it. Follow it with `dgl-coord \
         attach|wait|stop --ip_config FILE {job_id}`",
        leader.name()
    ));
    Ok(0)
}

/// The `summary` event (outcome `error`) of a launch that failed before it started anything,
/// on stdout with `--json` and into the log dir if there is one. The error itself is still
/// printed on stderr by the caller.
fn error_summary(job_id: &str, out: &mut sink::Sink, started: Instant, e: &anyhow::Error) {
    let s = events::Summary::error(
        job_id,
        format!("{e:#}"),
        started.elapsed().as_millis() as u64,
    );
    let text = format!("dgl-coord: error: {e:#}\n");
    out.error_summary(&s, &text);
}

/// For `--json`: the `summary` event of a launch whose arguments were refused before a job id
/// was made (its `job_id` is empty).
pub fn print_error_summary(started: Instant, e: &anyhow::Error) {
    error_summary("", &mut sink::Sink::new(true, started, None), started, e);
}

/// The agents' side of a dry run: Preflight (read-only: no port is bound, nothing stopped) on
/// every host, each host's findings as a note; a failed check fails the dry run as it would
/// fail the launch. Offline, or with an agent out of reach, it says nothing remote was checked.
async fn dry_run_checks(
    o: &LaunchOptions,
    r: &RunOptions,
    machines: &IpConfig,
    hosts: Result<&[cluster::Host], &str>,
    out: &mut sink::Sink,
) -> anyhow::Result<()> {
    let hosts = match hosts {
        Ok(h) => h,
        Err(why) => {
            out.note(why);
            return Ok(());
        }
    };
    let checked = preflight::check_all(hosts, o, machines, None, r.grace, true).await?;
    for line in &checked.findings {
        out.note(&format!("dry run: {line}"));
    }
    Ok(())
}

/// A dry run: the agents are asked first (unless offline), so the plan shows what each host's
/// processes would get; where none was asked, placeholders stand for what the agents report.
async fn dry_run(
    o: &LaunchOptions,
    r: &RunOptions,
    machines: &IpConfig,
    mut f: ClusterFacts,
    out: &mut sink::Sink,
) -> anyhow::Result<()> {
    let hosts = if r.offline {
        Err("dry run: nothing remote was checked (--offline): no agent was contacted".to_string())
    } else {
        cluster::connect_all(machines, &r.access)
            .await
            .map_err(|e| {
                format!("dry run: nothing remote was checked: cannot reach the agents: {e:#}")
            })
    };
    f.hosts = match &hosts {
        Ok(h) => host_facts(h, out),
        Err(_) => machines
            .machines
            .iter()
            .map(|m| host_env::placeholder(m.ip))
            .collect(),
    };
    let mut o = o.clone();
    match &hosts {
        Ok(h) if gpus::needed(&o) => {
            let counts = gpus::count_all(h).await?;
            gpus::apply(&mut o, h, &counts)?;
        }
        Err(_) if o.trainers_from_gpus => {
            o.num_trainers = 1;
            out.note(
                "dry run: --trainers-per-host gpus is shown as one trainer per host: no agent \
                 was asked for its GPUs",
            );
        }
        _ => {}
    }
    let o = &o;
    if let (Ok(h), true) = (&hosts, o.omp_per_host) {
        for (facts, n) in f.hosts.iter_mut().zip(cpus::count_all(h).await?) {
            facts.cpus = Some(n);
        }
    }
    let planned = plan::plan(o, &f)?;
    print_plan(o, &f, &planned, r.json)?;
    let hosts = hosts.as_deref().map_err(String::as_str);
    dry_run_checks(o, r, machines, hosts, out).await
}

enum Started {
    DryRun,
    Running {
        hosts: Vec<cluster::Host>,
        planned: Vec<PlannedProcess>,
        /// What the trainers wait for; None without `--wait-servers`.
        servers: Option<servers_ready::ServerPorts>,
    },
}

/// Everything before the first process: the plan, the agents, preflight.
async fn start(
    o: &LaunchOptions,
    r: &RunOptions,
    job_id: &str,
    out: &mut sink::Sink,
) -> anyhow::Result<Started> {
    let machines = match &r.local_ip_config {
        Some(p) => IpConfig::load(p)?,
        None => local_ip_config(o)?.1,
    };
    let mut f = facts(&machines, job_id);
    // Planned once without the port, so a bad command fails before any agent is contacted
    // (with one trainer a host where the GPUs will decide).
    let mut pre = o.clone();
    if o.trainers_from_gpus {
        pre.num_trainers = 1;
    }
    let dry = plan::plan(&pre, &f)?;
    let overridden = plan::overridden_extra_envs(o, &dry);
    if !overridden.is_empty() {
        out.note(&format!(
            "warning: --extra_envs {} ignored: dglrun sets {} itself for DGL (as launch.py does, \
             its value wins)",
            overridden.join(", "),
            if overridden.len() == 1 { "it" } else { "them" }
        ));
    }
    if r.dry_run {
        dry_run(o, r, &machines, f, out).await?;
        return Ok(Started::DryRun);
    }
    let hosts = cluster::connect_all(&machines, &r.access).await?;
    f.hosts = host_facts(&hosts, out);
    let mut o = o.clone();
    if gpus::needed(&o) {
        let counts = gpus::count_all(&hosts).await?;
        gpus::apply(&mut o, &hosts, &counts)?;
    }
    let o = &o;
    if o.omp_per_host {
        for (h, n) in f.hosts.iter_mut().zip(cpus::count_all(&hosts).await?) {
            h.cpus = Some(n);
        }
    }
    let kill_stale = r.kill_stale.then_some(out);
    let checked = preflight::check_all(&hosts, o, &machines, kill_stale, r.grace, false).await?;
    f.master_port = Some(checked.master_port);
    python_env::check_all(&hosts, o).await?;
    let planned = plan::plan(o, &f)?;
    let servers = r
        .wait_servers
        .then(|| servers_ready::ServerPorts::of(&machines.machines, o.num_servers))
        .transpose()?;
    Ok(Started::Running {
        hosts,
        planned,
        servers,
    })
}
