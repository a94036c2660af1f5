//! Carrying out a plan: spawn servers then trainers on every host, follow every host's events,
//! keep the leases, and tear the whole job down on the first failure, a lost agent, or a
//! signal.
//!
//! One loop owns all state. Per host, a watch task forwards the job's events (reconnecting
//! from the last seq it saw) and a renew task keeps the lease; both report a lost agent. Stops
//! run as tasks too, so output keeps flowing while the agents stop the job.
//!
//! When a host's calls fail, the kind of failure decides how long to wait (`loss`): a refused
//! connection (the agent process is gone) or an agent that no longer knows the job (it was
//! restarted) fail the job at once; a call that gets no answer (a link down) is retried until
//! the lease would have expired, since a blip shorter than that must not kill a healthy job.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use dglrun_proto::pb::{self, job_event::Event, OutputStream};
use futures::FutureExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::events::{ExitInfo, Outcome, ProcessSummary, Summary, Who};
use super::follow::{renew_host, watch_host, Reconnect};
use super::loss::Loss;
use super::plan::{PlannedProcess, Role};
use super::servers_ready::{self, ServerPorts};
use super::sink::Sink;
use super::summary::{self, Row};
use crate::cluster::{AgentAccess, Host};

/// stderr lines kept per process for the failure report.
const TAIL_LINES: usize = 10;
/// Longest tail line kept (characters).
const TAIL_LINE_CHARS: usize = 500;
/// After every agent confirmed the stop, how long to wait for the last exit events.
const DRAIN: Duration = Duration::from_secs(3);
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
}

pub(super) enum Msg {
    Event {
        host: usize,
        ev: pb::JobEvent,
    },
    /// The agent ended the event stream without saying why the job stopped (it forgot the
    /// job); an agent that shuts down says so first in a `stopped` event.
    StreamEnded {
        host: usize,
    },
    Lost {
        host: usize,
        loss: Loss,
    },
    Stopped {
        host: usize,
        result: Result<pb::StopReply, String>,
    },
}

/// Why the job is being stopped.
#[derive(Clone, Debug)]
enum Reason {
    Success,
    Failed {
        host: usize,
        label: String,
    },
    SpawnFailed {
        host: usize,
        message: String,
    },
    Lost {
        host: usize,
        loss: Loss,
    },
    Signal(i32),
    /// Someone else stopped the job on `host` (`dgl-coord kill`, another client's Stop).
    /// `by` is a placeholder until the job's `stopped` event names them (`named`).
    StoppedBy {
        host: usize,
        by: String,
        named: bool,
    },
}

/// Who stopped a job whose Spawn the agent aborted, until its `stopped` event says.
const STOPPED_WHILE_STARTING: &str = "another client while it was starting";

/// dgl-coord's exit code when someone else stopped the job and no process had failed before:
/// that of a SIGTERM, which is what such a stop sends.
pub const STOPPED_BY_OTHER_EXIT: u8 = 143;

struct Proc {
    role: Role,
    who: Who,
    pid: Option<u32>,
    exit: Option<pb::ProcessExited>,
    stderr_tail: VecDeque<String>,
}

struct Stopping {
    reason: Reason,
    since: Instant,
    pending: HashSet<usize>,
    forced: bool,
    confirmed: Option<Instant>,
}

struct Driver {
    hosts: Vec<Host>,
    o: DriverOptions,
    plan: Vec<PlannedProcess>,
    /// (host rank, label) -> state; labels are unique per machine.
    procs: HashMap<(usize, String), Proc>,
    /// (host rank, agent index) -> label.
    index: HashMap<(usize, u32), String>,
    trainers_left: usize,
    stopping: Option<Stopping>,
    /// Hosts whose events can no longer arrive.
    silent: HashSet<usize>,
    tx: mpsc::Sender<Msg>,
    tasks: JoinSet<()>,
    all_started: Option<Instant>,
    signals: u32,
    out: Sink,
    /// How this command names itself in its Stop requests.
    requester: String,
}

pub async fn run(
    hosts: Vec<Host>,
    plan: Vec<PlannedProcess>,
    o: DriverOptions,
    out: Sink,
) -> anyhow::Result<u8> {
    let (tx, mut rx) = mpsc::channel(4096);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let procs = plan
        .iter()
        .map(|p| {
            (
                (p.machine, p.label.clone()),
                Proc {
                    role: p.role,
                    who: Who {
                        machine: p.machine,
                        host: hosts
                            .get(p.machine)
                            .map_or_else(String::new, |h| h.ip.to_string()),
                        label: p.label.clone(),
                        role: p.role.as_str().to_string(),
                    },
                    pid: None,
                    exit: None,
                    stderr_tail: VecDeque::new(),
                },
            )
        })
        .collect();
    let mut d = Driver {
        trainers_left: plan.iter().filter(|p| p.role.is_trainer()).count(),
        hosts,
        o,
        plan,
        procs,
        index: HashMap::new(),
        stopping: None,
        silent: HashSet::new(),
        tx,
        tasks: JoinSet::new(),
        all_started: None,
        signals: 0,
        out,
        requester: crate::ops::requester("dgl-coord launch"),
    };

    // Leases are renewed from the first Spawn on: a host whose Spawn is slow must not let the
    // others' leases run out while the rest of the phase waits for it.
    for h in 0..d.hosts.len() {
        d.start_renewal(h);
    }
    // Servers everywhere first, then trainers: DGL's clients expect their servers up.
    for trainers in [false, true] {
        d.spawn_phase(trainers).await;
        if !trainers {
            // The job now exists on every host: follow its events.
            for h in 0..d.hosts.len() {
                d.start_watch(h);
            }
            if let (None, Some(ports)) = (&d.stopping, d.o.servers_ready.clone()) {
                tokio::select! {
                    r = servers_ready::wait_all(&d.hosts, &d.o.job_id, &ports) => if let Err(e) = r {
                        d.out.note(&e.to_string());
                        d.begin_stop(Reason::SpawnFailed { host: e.host, message: e.message });
                    },
                    _ = sigint.recv() => d.on_signal(2),
                    _ = sigterm.recv() => d.on_signal(15),
                }
            }
        }
        // A signal that arrived while spawning is handled before the next phase.
        if sigint.recv().now_or_never().is_some() {
            d.on_signal(2);
        }
        if sigterm.recv().now_or_never().is_some() {
            d.on_signal(15);
        }
        if d.stopping.is_some() {
            break;
        }
    }
    if d.stopping.is_none() {
        d.all_started = Some(Instant::now());
    }

    let mut flush = tokio::time::interval(LOG_FLUSH);
    loop {
        if d.finished() {
            break;
        }
        let drain_deadline = d
            .stopping
            .as_ref()
            .and_then(|s| s.confirmed)
            .map(|t| tokio::time::Instant::from_std(t + DRAIN));
        tokio::select! {
            m = rx.recv() => match m {
                Some(m) => d.handle(m),
                None => break,
            },
            _ = sigint.recv() => d.on_signal(2),
            _ = sigterm.recv() => d.on_signal(15),
            _ = sleep_until(drain_deadline) => break,
            _ = flush.tick() => d.out.flush(),
        }
        if d.signals >= 3 {
            d.out.note("third signal: leaving without waiting; the agents stop what is left when the lease runs out");
            break;
        }
    }
    d.tasks.abort_all();
    Ok(d.finish())
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn millis(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

impl Driver {
    /// Spawns the servers (`trainers` false) or the trainers of every host at once.
    async fn spawn_phase(&mut self, trainers: bool) {
        let calls = self.hosts.iter().map(|h| {
            let specs: Vec<pb::ProcessSpec> = self
                .plan
                .iter()
                .filter(|p| p.machine == h.rank && p.role.is_trainer() == trainers)
                .map(to_spec)
                .collect();
            let req = pb::SpawnRequest {
                job_id: self.o.job_id.clone(),
                workspace: self.o.workspace.clone(),
                processes: specs,
                lease_ms: millis(self.o.lease),
            };
            let mut client = h.client.clone();
            let rank = h.rank;
            async move {
                if req.processes.is_empty() {
                    return (rank, Ok(pb::SpawnReply::default()));
                }
                let r = tokio::time::timeout(SPAWN_TIMEOUT, client.spawn(req)).await;
                let r = match r {
                    Ok(Ok(reply)) => Ok(reply.into_inner()),
                    Ok(Err(s)) => Err((s.code(), s.message().to_string())),
                    Err(_) => Err((
                        tonic::Code::DeadlineExceeded,
                        "the agent did not answer Spawn in time".to_string(),
                    )),
                };
                (rank, r)
            }
        });
        for (rank, r) in futures::future::join_all(calls).await {
            match r {
                Ok(reply) => {
                    for p in reply.processes {
                        self.note_started(rank, p.index, &p.label, p.pid);
                    }
                }
                Err((code, message)) => {
                    if self.stopping.is_some() {
                        continue;
                    }
                    let name = self.hosts[rank].name();
                    if code == tonic::Code::Aborted {
                        // A Stop from elsewhere reached the job first: a stop, not a failure.
                        self.out.note(&format!(
                            "{name}: the job was stopped by {STOPPED_WHILE_STARTING}; \
                             stopping it on every host"
                        ));
                        self.begin_stop(Reason::StoppedBy {
                            host: rank,
                            by: STOPPED_WHILE_STARTING.to_string(),
                            named: false,
                        });
                    } else {
                        self.out.note(&format!("{name}: {message}"));
                        self.begin_stop(Reason::SpawnFailed {
                            host: rank,
                            message,
                        });
                    }
                }
            }
        }
    }

    /// From the Spawn reply and again from the replayed Started event: reported once.
    fn note_started(&mut self, host: usize, index: u32, label: &str, pid: u32) {
        self.index.insert((host, index), label.to_string());
        if let Some(p) = self.procs.get_mut(&(host, label.to_string())) {
            if p.pid.replace(pid).is_none() {
                self.out.started(&p.who, pid);
            }
        }
    }

    /// Who an event is about; an index the plan does not know is named `#index`.
    fn who(&self, host: usize, label: &str) -> Who {
        match self.procs.get(&(host, label.to_string())) {
            Some(p) => p.who.clone(),
            None => Who {
                machine: host,
                host: self.hosts[host].ip.to_string(),
                label: label.to_string(),
                role: String::new(),
            },
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

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Event { host, ev } => self.on_event(host, ev),
            Msg::StreamEnded { host } => {
                self.silent.insert(host);
                if self.stopping.is_none() {
                    self.lost(host, Loss::StreamEnded);
                }
            }
            Msg::Lost { host, loss } => {
                if !self.silent.contains(&host) {
                    self.lost(host, loss);
                }
            }
            Msg::Stopped { host, result } => {
                match result {
                    Ok(r) if r.remaining > 0 => {
                        let msg = format!(
                            "{}: {} processes survived SIGKILL",
                            self.hosts[host].name(),
                            r.remaining
                        );
                        self.out.note(&msg);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.silent.insert(host);
                        let msg = format!("{}: stop failed: {e}", self.hosts[host].name());
                        self.out.note(&msg);
                    }
                }
                if let Some(s) = &mut self.stopping {
                    s.pending.remove(&host);
                    if s.pending.is_empty() && s.confirmed.is_none() {
                        s.confirmed = Some(Instant::now());
                    }
                }
            }
        }
    }

    fn lost(&mut self, host: usize, loss: Loss) {
        self.silent.insert(host);
        if self.stopping.is_none() {
            let name = self.hosts[host].name();
            self.out.note(&format!(
                "lost the agent of {name}: {}; stopping the job on every other host",
                loss.reason()
            ));
            self.begin_stop(Reason::Lost { host, loss });
        } else if let Some(s) = &mut self.stopping {
            // Its Stop may never return; don't wait for it.
            s.pending.remove(&host);
            if s.pending.is_empty() && s.confirmed.is_none() {
                s.confirmed = Some(Instant::now());
            }
        }
    }

    fn on_event(&mut self, host: usize, ev: pb::JobEvent) {
        match ev.event {
            Some(Event::Started(s)) => self.note_started(host, s.index, &s.label, s.pid),
            Some(Event::Line(l)) => {
                let label = self
                    .index
                    .get(&(host, l.index))
                    .cloned()
                    .unwrap_or_else(|| format!("#{}", l.index));
                let stream = OutputStream::try_from(l.stream).unwrap_or(OutputStream::Stdout);
                let who = self.who(host, &label);
                self.out.line(&who, stream, &l.text);
                if stream == OutputStream::Stderr {
                    if let Some(p) = self.procs.get_mut(&(host, label)) {
                        if p.stderr_tail.len() == TAIL_LINES {
                            p.stderr_tail.pop_front();
                        }
                        let text = String::from_utf8_lossy(&l.text);
                        p.stderr_tail
                            .push_back(text.chars().take(TAIL_LINE_CHARS).collect());
                    }
                }
            }
            Some(Event::LostLines(n)) => {
                let (ip, name) = (self.hosts[host].ip.to_string(), self.hosts[host].name());
                self.out.lost_lines(host, &ip, n, &name);
            }
            Some(Event::Exited(x)) => self.on_exit(host, x),
            Some(Event::Stopped(s)) => self.on_stopped(host, s),
            None => {}
        }
    }

    fn on_exit(&mut self, host: usize, x: pb::ProcessExited) {
        let Some(label) = self.index.get(&(host, x.index)).cloned() else {
            return;
        };
        let key = (host, label.clone());
        let Some(p) = self.procs.get_mut(&key) else {
            return;
        };
        if p.exit.is_some() {
            return;
        }
        p.exit = Some(x);
        let role = p.role;
        self.out.exited(&p.who, p.pid, &x);
        if summary::is_failure(&x) {
            if self.stopping.is_none() {
                self.out.note(&format!(
                    "{} {label} {}; stopping the job on every host",
                    self.hosts[host].name(),
                    summary::status_text(&x)
                ));
                self.begin_stop(Reason::Failed { host, label });
            }
        } else if role.is_trainer() && x.code == 0 && x.signal == 0 {
            self.trainers_left = self.trainers_left.saturating_sub(1);
            if self.trainers_left == 0 && self.stopping.is_none() {
                self.begin_stop(Reason::Success);
            }
        }
    }

    /// The agent of `host` began stopping the job. Our own Stops are announced too; they
    /// come while `stopping` is already set and change nothing.
    fn on_stopped(&mut self, host: usize, s: pb::JobStopped) {
        if let Some(stopping) = &mut self.stopping {
            // Our own Stops are announced as well: only someone else's names the stopper.
            let requested = s.cause == pb::StopCause::Requested as i32 && s.by != self.requester;
            if let Reason::StoppedBy { by, named, .. } = &mut stopping.reason {
                if requested && !*named {
                    (*by, *named) = (s.by, true);
                }
            }
            return;
        }
        let name = self.hosts[host].name();
        let reason = match pb::StopCause::try_from(s.cause) {
            Ok(pb::StopCause::LeaseExpired) => Reason::Lost {
                host,
                loss: Loss::LeaseExpired,
            },
            Ok(pb::StopCause::AgentShutdown) => Reason::Lost {
                host,
                loss: Loss::ShuttingDown,
            },
            _ => Reason::StoppedBy {
                host,
                by: s.by,
                named: true,
            },
        };
        match &reason {
            Reason::Lost { loss, .. } => self.out.note(&format!(
                "lost the agent of {name}: {}; stopping the job on every other host",
                loss.reason()
            )),
            Reason::StoppedBy { by, .. } => self.out.note(&format!(
                "{name}: the job was stopped by {by}; stopping it on every host"
            )),
            _ => {}
        }
        self.begin_stop(reason);
    }

    fn on_signal(&mut self, sig: i32) {
        self.signals += 1;
        let name = summary::signal_name(sig);
        match &self.stopping {
            None => {
                self.out.note(&format!(
                    "{name}: stopping the job on every host (again to kill at once)"
                ));
                self.begin_stop(Reason::Signal(sig));
            }
            Some(s) if !s.forced => {
                self.out
                    .note(&format!("{name} again: killing every process now"));
                self.send_stops(true);
            }
            Some(_) => {}
        }
    }

    fn begin_stop(&mut self, reason: Reason) {
        self.stopping = Some(Stopping {
            reason,
            since: Instant::now(),
            pending: (0..self.hosts.len())
                .filter(|h| !self.silent.contains(h))
                .collect(),
            forced: false,
            confirmed: None,
        });
        if let Some(s) = &mut self.stopping {
            if s.pending.is_empty() {
                s.confirmed = Some(Instant::now());
            }
        }
        self.send_stops(false);
    }

    fn send_stops(&mut self, force: bool) {
        let Some(s) = &mut self.stopping else { return };
        s.forced |= force;
        let targets: Vec<usize> = s.pending.iter().copied().collect();
        for host in targets {
            let mut client = self.hosts[host].client.clone();
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

    /// Stopped everywhere and every started process's exit is known (or cannot come).
    fn finished(&self) -> bool {
        let Some(s) = &self.stopping else {
            return false;
        };
        s.confirmed.is_some()
            && self.procs.iter().all(|((host, _), p)| {
                p.exit.is_some() || p.pid.is_none() || self.silent.contains(host)
            })
    }

    fn finish(mut self) -> u8 {
        let worst = self
            .procs
            .values()
            .filter_map(|p| p.exit.as_ref())
            .filter(|e| summary::is_failure(e))
            .map(summary::exit_code)
            .max()
            .unwrap_or(0);
        let reason = self.stopping.as_ref().map(|s| s.reason.clone());
        let code = match &reason {
            Some(Reason::Success) | None => worst,
            Some(Reason::Failed { .. }) => worst.max(1),
            Some(Reason::Signal(sig)) if worst == 0 => (128 + sig) as u8,
            Some(Reason::Signal(_)) => worst,
            Some(Reason::StoppedBy { .. }) if worst == 0 => STOPPED_BY_OTHER_EXIT,
            Some(Reason::StoppedBy { .. }) => worst,
            Some(Reason::SpawnFailed { .. } | Reason::Lost { .. }) => worst.max(1),
        };
        let error = match &reason {
            Some(Reason::Failed { host, label }) => self.failure_text(*host, label),
            Some(Reason::SpawnFailed { host, message }) => Some(format!(
                "job failed: {}: {message}",
                self.hosts[*host].name()
            )),
            Some(Reason::Lost { host, loss }) => Some(format!(
                "job failed: lost the agent of {}: {}; {}",
                self.hosts[*host].name(),
                loss.reason(),
                loss.aftermath(self.o.lease)
            )),
            Some(Reason::Signal(sig)) => {
                Some(format!("job stopped by {}", summary::signal_name(*sig)))
            }
            Some(Reason::StoppedBy { host, by, .. }) => Some(format!(
                "job stopped by {by} (seen by the agent of {})",
                self.hosts[*host].name()
            )),
            _ => None,
        };
        // The signal was already announced when it came; the other reasons are told here.
        if let Some(e) = error
            .as_ref()
            .filter(|_| !matches!(reason, Some(Reason::Signal(_))))
        {
            self.out.note(e);
        }
        let rows: Vec<Row> = self
            .plan
            .iter()
            .map(|pp| {
                let p = &self.procs[&(pp.machine, pp.label.clone())];
                Row {
                    host: self.hosts[pp.machine].name(),
                    process: pp.label.clone(),
                    pid: p.pid,
                    exit: p.exit,
                    started: p.pid.is_some(),
                }
            })
            .collect();
        let table = summary::render(&rows);
        let mut text = format!("\n{table}");
        let all_started_ms = self
            .all_started
            .map(|t| t.duration_since(self.o.started).as_millis() as u64);
        if let Some(ms) = all_started_ms {
            text.push_str(&format!(
                "all {} processes started {ms} ms after the command\n",
                self.plan.len(),
            ));
        }
        let mut teardown_ms = None;
        if let Some(s) = &self.stopping {
            if let Some(c) = s.confirmed {
                let what = match s.reason {
                    Reason::Success => "servers stopped",
                    _ => "job torn down",
                };
                let ms = c.duration_since(s.since).as_millis() as u64;
                teardown_ms = Some(ms);
                text.push_str(&format!("{what} {ms} ms after the stop began\n"));
            }
        }
        text.push_str(&format!("exit code {code}\n"));
        let (failed_process, failed_stderr_tail) = match &reason {
            Some(Reason::Failed { host, label }) => match self.procs.get(&(*host, label.clone())) {
                Some(p) => (Some(p.who.clone()), p.stderr_tail.iter().cloned().collect()),
                None => (None, Vec::new()),
            },
            _ => (None, Vec::new()),
        };
        let processes = self
            .plan
            .iter()
            .zip(&rows)
            .map(|(pp, row)| {
                let p = &self.procs[&(pp.machine, pp.label.clone())];
                ProcessSummary {
                    who: p.who.clone(),
                    pid: p.pid,
                    started: p.pid.is_some(),
                    exit: p.exit.as_ref().map(ExitInfo::from_pb),
                    status: summary::row_status(row),
                }
            })
            .collect();
        let doc = Summary {
            job_id: self.o.job_id.clone(),
            outcome: match reason {
                Some(Reason::Success) | None => Outcome::Success,
                Some(Reason::Failed { .. }) => Outcome::Failed,
                Some(Reason::SpawnFailed { .. }) => Outcome::SpawnFailed,
                Some(Reason::Lost { .. }) => Outcome::Lost,
                Some(Reason::Signal(_)) => Outcome::Signal,
                Some(Reason::StoppedBy { .. }) => Outcome::Stopped,
            },
            exit_code: code,
            error,
            failed_process,
            failed_stderr_tail,
            all_started_ms,
            teardown_ms,
            elapsed_ms: self.o.started.elapsed().as_millis() as u64,
            processes,
        };
        self.out.summary(&doc, &text);
        code
    }

    /// `job failed: <host> <label> (pid N): <status>` and the last lines of its stderr.
    fn failure_text(&self, host: usize, label: &str) -> Option<String> {
        let p = self.procs.get(&(host, label.to_string()))?;
        let status = p
            .exit
            .as_ref()
            .map_or("failed".to_string(), summary::status_text);
        let pid = p.pid.map_or(String::new(), |pid| format!(" (pid {pid})"));
        let mut msg = format!(
            "job failed: {} {label}{pid}: {status}\n",
            self.hosts[host].name()
        );
        if p.stderr_tail.is_empty() {
            msg.push_str("  (it wrote nothing to stderr)");
        } else {
            msg.push_str("  last lines of its stderr:");
            for l in &p.stderr_tail {
                msg.push_str(&format!("\n  | {l}"));
            }
        }
        Some(msg)
    }
}

fn to_spec(p: &PlannedProcess) -> pb::ProcessSpec {
    use super::command::CommandLine;
    pb::ProcessSpec {
        label: p.label.clone(),
        role: p.role.as_str().to_string(),
        command: Some(match &p.command {
            CommandLine::Argv(a) => pb::process_spec::Command::Argv(pb::Argv { args: a.clone() }),
            CommandLine::Shell(s) => pb::process_spec::Command::Shell(s.clone()),
        }),
        env: p.env.clone().into_iter().collect(),
        cwd: p.cwd.clone(),
    }
}
