//! Carrying out a plan: spawn servers then trainers on every host, follow every host's events,
//! keep the leases, and tear the whole job down on the first failure, a lost agent, or a
//! signal.
//!
//! `state` is the job as a pure state machine (inputs in, actions out, time passed in);
//! `ending` decides the exit code, the error and the table from its final state; this module
//! is the IO around them: the calls, the tasks, the terminal. One loop owns all state. Per
//! host, a watch task forwards the job's events (reconnecting from the last seq it saw) and a
//! renew task keeps the lease; both report a lost agent. Stops run as tasks too, so output
//! keeps flowing while the agents stop the job.
//!
//! A job may run several times (`restart`: after a failure, a backoff, then the whole job
//! again under the same id, each attempt a fresh state machine); `stall` watches the
//! trainers' lines and CPU time (polled from the agents) for the stall and start timeouts.
//!
//! When a host's calls fail, the kind of failure decides how long to wait (`loss`): a refused
//! connection (the agent process is gone) or an agent that no longer knows the job (it was
//! restarted) fail the job at once; a call that gets no answer (a link down) is retried until
//! the lease would have expired, since a blip shorter than that must not kill a healthy job.

mod ending;
mod restart;
mod signals;
mod stall;
mod state;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

use dglrun_proto::pb;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::follow::{renew_host, watch_host, Reconnect};
use super::internal_events::Msg;
use super::plan::PlannedProcess;
use super::servers_ready::{self, ServerPorts};
use super::sink::Sink;
use crate::cluster::{AgentAccess, Host};
pub use ending::STOPPED_BY_OTHER_EXIT;
pub use restart::{RestartPolicy, USAGE_ERROR_EXIT};
pub use signals::Signals;
pub use stall::{human as human_duration, Watchdog, NO_PROGRESS_EXIT};
use state::{Action, HostName, Input, Job, JobFacts, SpawnError};

/// Every process's restart count: dglrun's own, and torchrun's name for it.
pub const RESTART_COUNT_VARS: [&str; 2] = ["DGLRUN_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"];

/// What the driver does beyond running the job once: restarts and the progress watch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobPolicy {
    pub restart: RestartPolicy,
    pub watchdog: Watchdog,
}

/// A Spawn is a fork per process; anything slower means the agent is in trouble.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(60);
/// How often buffered `--log-dir` files are flushed, so `tail -f` keeps up.
const LOG_FLUSH: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct DriverOptions {
    pub job_id: String,
    pub workspace: String,
    /// SIGTERM to SIGKILL when stopping.
    pub grace: Duration,
    /// Lease sent to the agents; renewed every lease/4.
    pub lease: Duration,
    /// When the command started (for the start-up figure).
    pub started: Instant,
    /// How to reach the agents: lease renewals open fresh connections when one stalls.
    pub access: AgentAccess,
    /// Trainers start once these ports listen; None: right after the servers.
    pub servers_ready: Option<ServerPorts>,
    pub policy: JobPolicy,
}

/// The IO around the state machine: the agents, the per-host tasks, the terminal.
struct Io {
    hosts: Vec<Host>,
    o: DriverOptions,
    plan: Vec<PlannedProcess>,
    tx: mpsc::Sender<Msg>,
    tasks: JoinSet<()>,
    out: Sink,
    /// How this command names itself in its Stop requests.
    requester: String,
    /// Actions of the last input, reused.
    actions: Vec<Action>,
    /// Restarts before the current attempt.
    restarts: u32,
}

/// Runs the job to its end; returns dgl-coord's exit code. `signals` is where SIGINT and
/// SIGTERM come from (`Signals::os()` for the process's own).
pub async fn run(
    hosts: Vec<Host>,
    plan: Vec<PlannedProcess>,
    o: DriverOptions,
    out: Sink,
    signals: Signals,
) -> anyhow::Result<u8> {
    run_reporting_start(hosts, plan, o, out, signals, None).await
}

/// As `run`; `started` is told once every process has started (dropped unsent when starting
/// failed), for a caller that answers as soon as the job runs (a detached launch).
pub async fn run_reporting_start(
    hosts: Vec<Host>,
    plan: Vec<PlannedProcess>,
    o: DriverOptions,
    out: Sink,
    mut signals: Signals,
    mut started: Option<tokio::sync::oneshot::Sender<()>>,
) -> anyhow::Result<u8> {
    let names: Vec<HostName> = hosts
        .iter()
        .map(|h| HostName {
            name: h.name(),
            ip: h.ip.to_string(),
        })
        .collect();
    let mut io = Io {
        hosts,
        o,
        plan,
        // Each attempt gets a channel of its own.
        tx: mpsc::channel(1).0,
        tasks: JoinSet::new(),
        out,
        requester: crate::ops::requester("dgl-coord launch"),
        actions: Vec::new(),
        restarts: 0,
    };
    let mut attempts = Vec::new();
    loop {
        let job = io.attempt(names.clone(), &mut signals, &mut started).await;
        if let Some(code) = io.after_attempt(&job, &mut attempts, &mut signals).await {
            return Ok(code);
        }
    }
}

impl Io {
    /// One run of the whole job, from its first spawn to its last exit.
    async fn attempt(
        &mut self,
        names: Vec<HostName>,
        signals: &mut Signals,
        started: &mut Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Job {
        let (tx, rx) = mpsc::channel(4096);
        self.tx = tx;
        let facts = JobFacts {
            job_id: self.o.job_id.clone(),
            lease: self.o.lease,
            requester: self.requester.clone(),
            started: self.o.started,
            restarts: self.restarts,
            attempt_started: Instant::now(),
            watchdog: self.o.policy.watchdog.clone(),
        };
        let mut job = Job::new(&self.plan, names, facts);
        self.start(&mut job, signals).await;
        // A detached launch returns once the first attempt has every process running.
        if let (false, Some(tx)) = (job.is_stopping(), started.take()) {
            let _ = tx.send(());
        }
        self.follow(&mut job, rx, signals).await;
        // The attempt's watch, renew and poll tasks end here; the next one starts its own.
        self.tasks = JoinSet::new();
        job
    }

    /// After an attempt: the exit code when the job is over, None when it starts again.
    async fn after_attempt(
        &mut self,
        job: &Job,
        attempts: &mut Vec<super::events::AttemptSummary>,
        signals: &mut Signals,
    ) -> Option<u8> {
        let policy = self.o.policy.restart.clone();
        let attempt = ending::attempt(job, Instant::now());
        let reason = job.stopping.as_ref().map(|s| &s.reason);
        let decision = restart::decide(
            &policy,
            reason,
            attempt.exit_code,
            self.restarts,
            rand::random(),
        );
        let failed = attempt.error.clone().unwrap_or_default();
        if policy.max_restarts > 0 {
            attempts.push(attempt);
        }
        match decision {
            restart::Decision::Restart(wait) => {
                self.out.note(&format!(
                    "attempt {} failed ({failed}); starting the whole job again in {} \
                     (restart {} of {})",
                    self.restarts + 1,
                    stall::human(wait),
                    self.restarts + 1,
                    policy.max_restarts
                ));
                self.out.flush();
                if let Some(sig) = self.pause(wait, signals).await {
                    self.out.note(&format!(
                        "{} during the wait: not starting the job again",
                        super::summary::signal_name(sig)
                    ));
                    return Some(self.finish(job, std::mem::take(attempts)));
                }
                self.restarts += 1;
                None
            }
            restart::Decision::Exhausted => {
                self.out.note(&format!(
                    "no restart left: the job failed {} times (--max-restarts {})",
                    self.restarts + 1,
                    policy.max_restarts
                ));
                Some(self.finish(job, std::mem::take(attempts)))
            }
            restart::Decision::Finish => Some(self.finish(job, std::mem::take(attempts))),
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

fn millis(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

impl Io {
    /// Feeds `input` to the state machine and carries out what it asks, in order: a stack dump
    /// is over before the stops that follow it go out.
    async fn apply(&mut self, job: &mut Job, input: Input) {
        let mut actions = std::mem::take(&mut self.actions);
        job.handle(input, Instant::now(), &mut actions);
        for a in actions.drain(..) {
            match a {
                Action::Note(text) => self.out.note(&text),
                Action::Started { who, pid } => self.out.started(&who, pid),
                Action::Line { who, stream, text } => self.out.line(&who, stream, &text),
                Action::LostLines {
                    machine,
                    ip,
                    count,
                    name,
                } => self.out.lost_lines(machine, &ip, count, &name),
                Action::Exited { who, pid, exit } => self.out.exited(&who, pid, &exit),
                Action::Stop { hosts, force } => self.send_stops(&hosts, force),
                Action::DumpStacks => self.dump_stacks().await,
            }
        }
        self.actions = actions;
    }

    /// Every process: servers everywhere, then (once they listen, with `--wait-servers`)
    /// trainers; leases are kept and events followed from the first Spawn on.
    async fn start(&mut self, job: &mut Job, signals: &mut Signals) {
        // Leases are renewed from the first Spawn on: a host whose Spawn is slow must not let
        // the others' leases run out while the rest of the phase waits for it.
        for h in 0..self.hosts.len() {
            self.start_renewal(h);
        }
        if self.o.policy.watchdog.cpu_needed() {
            for h in 0..self.hosts.len() {
                self.start_cpu_poll(h);
            }
        }
        // Servers everywhere first, then trainers: DGL's clients expect their servers up.
        for trainers in [false, true] {
            self.spawn_phase(job, trainers).await;
            if !trainers {
                // The job now exists on every host: follow its events.
                for h in 0..self.hosts.len() {
                    self.start_watch(h);
                }
                if let (false, Some(ports)) = (job.is_stopping(), self.o.servers_ready.clone()) {
                    self.wait_servers(job, &ports, signals).await;
                }
            }
            // A signal that arrived while spawning is handled before the next phase.
            for sig in signals.pending() {
                self.apply(job, Input::Signal(sig)).await;
            }
            if job.is_stopping() {
                return;
            }
        }
        self.apply(job, Input::AllStarted).await;
    }

    /// `--wait-servers`: until every server port listens, a server fails, or a signal.
    /// `--start-timeout` counts here too.
    async fn wait_servers(&mut self, job: &mut Job, ports: &ServerPorts, signals: &mut Signals) {
        let (hosts, job_id) = (self.hosts.clone(), self.o.job_id.clone());
        let wait = servers_ready::wait_all(&hosts, &job_id, ports);
        tokio::pin!(wait);
        while !job.is_stopping() {
            tokio::select! {
                r = &mut wait => {
                    if let Err(e) = r {
                        let input = Input::ServersNotReady {
                            host: e.host,
                            text: e.to_string(),
                            message: e.message,
                        };
                        self.apply(job, input).await;
                    }
                    return;
                },
                sig = signals.recv() => self.apply(job, Input::Signal(sig)).await,
                _ = sleep_until(job.wakeup()) => self.apply(job, Input::Tick).await,
            }
        }
    }

    /// Waits `wait` before the next attempt; a signal that comes first is returned.
    async fn pause(&mut self, wait: Duration, signals: &mut Signals) -> Option<i32> {
        tokio::select! {
            _ = tokio::time::sleep(wait) => None,
            sig = signals.recv() => Some(sig),
        }
    }

    /// The stalled job's processes still exist here: this is where their stacks are taken,
    /// as `dgl-coord stacks` takes them (py-spy on every host, bounded by its timeouts).
    async fn dump_stacks(&mut self) {
        let report = crate::stacks::dump(&self.hosts, &self.o.job_id, false).await;
        let mut text = format!(
            "the stack of every process of the stalled job:\n{}",
            report.render_text()
        );
        for e in &report.errors {
            text.push_str(&format!("\nno stacks from {e}"));
        }
        self.out.note(text.trim_end());
    }

    /// The running job: events, signals and stops until the state machine says it is over.
    async fn follow(&mut self, job: &mut Job, mut rx: mpsc::Receiver<Msg>, signals: &mut Signals) {
        let mut flush = tokio::time::interval(LOG_FLUSH);
        while !job.is_finished() {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => self.apply(job, Input::Msg(m)).await,
                    None => break,
                },
                sig = signals.recv() => self.apply(job, Input::Signal(sig)).await,
                _ = sleep_until(job.wakeup()) => self.apply(job, Input::Tick).await,
                _ = sleep_until(job.drain_deadline()) => break,
                _ = flush.tick() => self.out.flush(),
            }
        }
    }

    /// The error, the table and the summary; returns the exit code.
    fn finish(&mut self, job: &Job, attempts: Vec<super::events::AttemptSummary>) -> u8 {
        let end = ending::ending(job, Instant::now(), attempts);
        if let Some(note) = &end.note {
            self.out.note(note);
        }
        self.out.summary(&end.summary, &end.text);
        end.code
    }

    /// Spawns the servers (`trainers` false) or the trainers of every host at once.
    async fn spawn_phase(&mut self, job: &mut Job, trainers: bool) {
        let calls = self.hosts.iter().map(|h| {
            let req = pb::SpawnRequest {
                job_id: self.o.job_id.clone(),
                workspace: self.o.workspace.clone(),
                processes: self
                    .plan
                    .iter()
                    .filter(|p| p.machine == h.rank && p.role.is_trainer() == trainers)
                    .map(|p| to_spec(p, self.restarts))
                    .collect(),
                lease_ms: millis(self.o.lease),
                restart: self.restarts > 0,
            };
            spawn_on(h, req)
        });
        for (host, r) in futures::future::join_all(calls).await {
            let input = match r {
                Ok(reply) => Input::Spawned {
                    host,
                    processes: reply.processes,
                },
                Err(error) => Input::SpawnFailed { host, error },
            };
            self.apply(job, input).await;
        }
    }

    fn start_watch(&mut self, host: usize) {
        let h = &self.hosts[host];
        self.tasks.spawn(watch_host(
            host,
            h.client.clone(),
            self.o.job_id.clone(),
            self.tx.clone(),
            self.o.lease,
        ));
    }

    /// Asks the host's agent for the job's CPU times every `CPU_POLL`, for the stall watch.
    fn start_cpu_poll(&mut self, host: usize) {
        let (mut client, tx) = (self.hosts[host].client.clone(), self.tx.clone());
        let job_id = self.o.job_id.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(stall::CPU_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let req = pb::JobCpuRequest {
                    job_id: job_id.clone(),
                };
                match tokio::time::timeout(stall::CPU_POLL, client.job_cpu(req)).await {
                    Ok(Ok(r)) => {
                        let processes = r.into_inner().processes;
                        if tx.send(Msg::Cpu { host, processes }).await.is_err() {
                            return;
                        }
                    }
                    // An agent without the call: its trainers' lines alone tell progress.
                    Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => return,
                    // A lost agent is the watch and renew tasks' to report.
                    _ => {}
                }
            }
        });
    }

    fn start_renewal(&mut self, host: usize) {
        let h = &self.hosts[host];
        self.tasks.spawn(renew_host(
            host,
            Reconnect::new(h.client.clone(), self.o.access.clone(), h.addr),
            self.o.job_id.clone(),
            self.tx.clone(),
            self.o.lease,
        ));
    }

    /// Stop on each of `hosts`, as tasks: output keeps flowing while the agents stop the job.
    fn send_stops(&mut self, hosts: &[usize], force: bool) {
        for &host in hosts {
            let Some(h) = self.hosts.get(host) else {
                continue;
            };
            let mut client = h.client.clone();
            let tx = self.tx.clone();
            let req = pb::StopRequest {
                job_id: self.o.job_id.clone(),
                grace_ms: millis(self.o.grace),
                force,
                requester: self.requester.clone(),
            };
            // The agent gives up after grace plus a few seconds of SIGKILL.
            let limit = self.o.grace + Duration::from_secs(15);
            self.tasks.spawn(async move {
                let result = match tokio::time::timeout(limit, client.stop(req)).await {
                    Ok(Ok(r)) => Ok(r.into_inner()),
                    // The job never reached that host (or is long gone): nothing to stop.
                    Ok(Err(s)) if s.code() == tonic::Code::NotFound => Ok(pb::StopReply::default()),
                    Ok(Err(s)) => Err(s.message().to_string()),
                    Err(_) => Err("no answer".to_string()),
                };
                let _ = tx.send(Msg::Stopped { host, result }).await;
            });
        }
    }
}

/// One host's Spawn, bounded in time; a host with nothing to start is not called.
async fn spawn_on(h: &Host, req: pb::SpawnRequest) -> (usize, Result<pb::SpawnReply, SpawnError>) {
    if req.processes.is_empty() {
        return (h.rank, Ok(pb::SpawnReply::default()));
    }
    let mut client = h.client.clone();
    let r = match tokio::time::timeout(SPAWN_TIMEOUT, client.spawn(req)).await {
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        // A Stop from elsewhere reached the job first.
        Ok(Err(s)) if s.code() == tonic::Code::Aborted => Err(SpawnError::StoppedElsewhere),
        Ok(Err(s)) => Err(SpawnError::Failed(s.message().to_string())),
        Err(_) => Err(SpawnError::Failed(
            "the agent did not answer Spawn in time".to_string(),
        )),
    };
    (h.rank, r)
}

/// `p` as the agent takes it, with the attempt's restart count in its environment.
pub(crate) fn to_spec(p: &PlannedProcess, restarts: u32) -> pb::ProcessSpec {
    use super::command::CommandLine;
    let mut env = p.env.clone();
    for var in RESTART_COUNT_VARS {
        env.insert(var.to_string(), restarts.to_string());
    }
    pb::ProcessSpec {
        label: p.label.clone(),
        role: p.role.as_str().to_string(),
        command: Some(match &p.command {
            CommandLine::Argv(a) => pb::process_spec::Command::Argv(pb::Argv { args: a.clone() }),
            CommandLine::Shell(s) => pb::process_spec::Command::Shell(s.clone()),
        }),
        env: env.into_iter().collect(),
        cwd: p.cwd.clone(),
    }
}
