//! The job as a state machine, without IO: what the job is (starting, running, stopping
//! because of what), fed one `Input` at a time with the time it happened, answering with
//! `Action`s for the driver's loop to carry out. It knows no terminal, no gRPC client and no
//! clock, so it runs in-process in tests.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use dglrun_proto::pb::{self, job_event::Event, OutputStream};

use super::super::events::Who;
use super::super::internal_events::Msg;
use super::super::loss::Loss;
use super::super::plan::{PlannedProcess, Role};
use super::super::summary;
use super::stall::{self, Progress, Verdict, Watchdog};

/// stderr lines kept per process for the failure report.
const TAIL_LINES: usize = 10;
/// Longest tail line kept (characters).
const TAIL_LINE_CHARS: usize = 500;
/// After every agent confirmed the stop, how long to wait for the last exit events.
pub(super) const DRAIN: Duration = Duration::from_secs(3);

/// Who stopped a job whose Spawn the agent aborted, until its `stopped` event says.
pub(super) const STOPPED_WHILE_STARTING: &str = "another client while it was starting";

/// How a host is named: in messages (`m0 (IP:port)`) and in events (its IP).
#[derive(Clone, Debug)]
pub(crate) struct HostName {
    pub(crate) name: String,
    pub(crate) ip: String,
}

/// What the job's own facts are, fixed for its life.
#[derive(Clone, Debug)]
pub(crate) struct JobFacts {
    pub(crate) job_id: String,
    pub(crate) lease: Duration,
    /// How this command names itself in its Stop requests.
    pub(crate) requester: String,
    /// When the command started (for the start-up figure and the elapsed time).
    pub(crate) started: Instant,
    /// Restarts before this attempt (0 for the first).
    pub(crate) restarts: u32,
    /// When this attempt began spawning.
    pub(crate) attempt_started: Instant,
    pub(crate) watchdog: Watchdog,
}

/// Why the job is being stopped.
#[derive(Clone, Debug)]
pub(crate) enum Reason {
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
    /// No trainer wrote a line or used CPU time for `after` (`--stall-timeout`).
    Stalled {
        after: Duration,
    },
    /// These trainers printed nothing within `after` of the start (`--start-timeout`).
    StartTimeout {
        after: Duration,
        silent: Vec<String>,
    },
}

/// Why a host's Spawn failed.
#[derive(Clone, Debug)]
pub(crate) enum SpawnError {
    /// A Stop from elsewhere reached the job first: a stop, not a failure.
    StoppedElsewhere,
    Failed(String),
}

/// Something that happened to the job.
pub(crate) enum Input {
    /// A host's Spawn started these processes.
    Spawned {
        host: usize,
        processes: Vec<pb::ProcessStarted>,
    },
    SpawnFailed {
        host: usize,
        error: SpawnError,
    },
    /// `--wait-servers`: a server exited (or never listened) before every port listened.
    ServersNotReady {
        host: usize,
        /// The whole message, as the user reads it.
        text: String,
        message: String,
    },
    /// Every process of the plan was spawned.
    AllStarted,
    /// From a host's tasks.
    Msg(Msg),
    Signal(i32),
    /// The time `wakeup` asked for came.
    Tick,
}

/// What the loop must do.
#[derive(Clone, Debug)]
pub(crate) enum Action {
    /// A message of dgl-coord itself.
    Note(String),
    Started {
        who: Who,
        pid: u32,
    },
    Line {
        who: Who,
        stream: OutputStream,
        text: Vec<u8>,
    },
    LostLines {
        machine: usize,
        ip: String,
        count: u64,
        name: String,
    },
    Exited {
        who: Who,
        pid: Option<u32>,
        exit: pb::ProcessExited,
    },
    /// Send Stop to these hosts (`force`: SIGKILL at once).
    Stop {
        hosts: Vec<usize>,
        force: bool,
    },
    /// The job stalled: take the stack of every process before it is stopped.
    DumpStacks,
}

pub(crate) struct Proc {
    pub(crate) role: Role,
    pub(crate) who: Who,
    pub(crate) pid: Option<u32>,
    pub(crate) exit: Option<pb::ProcessExited>,
    pub(crate) stderr_tail: VecDeque<String>,
}

pub(crate) struct Stopping {
    pub(crate) reason: Reason,
    pub(crate) since: Instant,
    /// Hosts whose Stop has not come back yet.
    pending: BTreeSet<usize>,
    forced: bool,
    /// When the last host confirmed the stop.
    pub(crate) confirmed: Option<Instant>,
}

pub(crate) struct Job {
    pub(crate) hosts: Vec<HostName>,
    pub(crate) facts: JobFacts,
    /// (host rank, label) in the plan's order: the table's rows.
    pub(crate) order: Vec<(usize, String)>,
    /// (host rank, label) -> state; labels are unique per machine.
    pub(crate) procs: HashMap<(usize, String), Proc>,
    /// (host rank, agent index) -> label.
    index: HashMap<(usize, u32), String>,
    trainers_left: usize,
    pub(crate) stopping: Option<Stopping>,
    /// Hosts whose events can no longer arrive.
    silent: HashSet<usize>,
    pub(crate) all_started: Option<Instant>,
    signals: u32,
    /// The third signal: leave without waiting for the agents.
    abandoned: bool,
    /// What the trainers last did, for the stall and start timeouts.
    progress: Progress,
}

impl Job {
    pub(crate) fn new(plan: &[PlannedProcess], hosts: Vec<HostName>, facts: JobFacts) -> Self {
        let procs = plan
            .iter()
            .map(|p| {
                let who = Who {
                    machine: p.machine,
                    host: hosts
                        .get(p.machine)
                        .map_or_else(String::new, |h| h.ip.clone()),
                    label: p.label.clone(),
                    role: p.role.as_str().to_string(),
                };
                let proc = Proc {
                    role: p.role,
                    who,
                    pid: None,
                    exit: None,
                    stderr_tail: VecDeque::new(),
                };
                ((p.machine, p.label.clone()), proc)
            })
            .collect();
        let trainers = plan.iter().filter(|p| p.role.is_trainer()).map(|p| {
            let host = hosts
                .get(p.machine)
                .map_or_else(|| format!("m{}", p.machine), |h| h.name.clone());
            ((p.machine, p.label.clone()), format!("{host} {}", p.label))
        });
        let progress = Progress::new(facts.watchdog.clone(), facts.attempt_started, trainers);
        Self {
            progress,
            trainers_left: plan.iter().filter(|p| p.role.is_trainer()).count(),
            order: plan.iter().map(|p| (p.machine, p.label.clone())).collect(),
            hosts,
            facts,
            procs,
            index: HashMap::new(),
            stopping: None,
            silent: HashSet::new(),
            all_started: None,
            signals: 0,
            abandoned: false,
        }
    }

    /// Takes in what happened at `now`; appends what to do to `out`.
    pub(crate) fn handle(&mut self, input: Input, now: Instant, out: &mut Vec<Action>) {
        match input {
            Input::Spawned { host, processes } => {
                for p in processes {
                    self.note_started(host, p.index, &p.label, p.pid, out);
                }
            }
            Input::SpawnFailed { host, error } => self.spawn_failed(host, error, now, out),
            Input::ServersNotReady {
                host,
                text,
                message,
            } => {
                out.push(Action::Note(text));
                self.begin_stop(Reason::SpawnFailed { host, message }, now, out);
            }
            Input::AllStarted => {
                self.all_started = Some(now);
                self.progress.all_started(now);
            }
            Input::Msg(m) => self.on_msg(m, now, out),
            Input::Signal(sig) => self.on_signal(sig, now, out),
            Input::Tick => self.check_progress(now, out),
        }
    }

    /// When the loop must feed a `Tick`: a stall or start timeout may be due.
    pub(crate) fn wakeup(&self) -> Option<Instant> {
        if self.stopping.is_some() {
            return None;
        }
        self.progress.deadline()
    }

    /// A job without progress is failed: first who is waiting where and the stacks, then
    /// the stop.
    fn check_progress(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.stopping.is_some() {
            return;
        }
        let reason = match self.progress.check(now) {
            None => return,
            Some(Verdict::Stalled) => {
                let after = self.facts.watchdog.stall_timeout.unwrap_or_default();
                out.push(Action::Note(format!(
                    "stalled: no progress for {}; where the trainers are:\n{}",
                    stall::human(after),
                    self.progress.report(now).join("\n")
                )));
                Reason::Stalled { after }
            }
            Some(Verdict::StartTimeout { silent }) => {
                let after = self.facts.watchdog.start_timeout.unwrap_or_default();
                out.push(Action::Note(format!(
                    "start timeout: {} printed nothing within {} of the start",
                    silent.join(", "),
                    stall::human(after)
                )));
                Reason::StartTimeout { after, silent }
            }
        };
        out.push(Action::DumpStacks);
        self.begin_stop(reason, now, out);
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.is_some()
    }

    /// Stopped everywhere and every started process's exit is known (or cannot come); or
    /// the user asked three times to leave.
    pub(crate) fn is_finished(&self) -> bool {
        let Some(s) = &self.stopping else {
            return false;
        };
        self.abandoned
            || s.confirmed.is_some()
                && self.procs.iter().all(|((host, _), p)| {
                    p.exit.is_some() || p.pid.is_none() || self.silent.contains(host)
                })
    }

    /// When to stop waiting for the last exit events: a while after every host confirmed
    /// the stop.
    pub(crate) fn drain_deadline(&self) -> Option<Instant> {
        self.stopping.as_ref()?.confirmed.map(|t| t + DRAIN)
    }

    fn name(&self, host: usize) -> String {
        self.hosts
            .get(host)
            .map_or_else(|| format!("m{host}"), |h| h.name.clone())
    }

    /// From the Spawn reply and again from the replayed Started event: reported once.
    fn note_started(
        &mut self,
        host: usize,
        index: u32,
        label: &str,
        pid: u32,
        out: &mut Vec<Action>,
    ) {
        self.index.insert((host, index), label.to_string());
        if let Some(p) = self.procs.get_mut(&(host, label.to_string())) {
            if p.pid.replace(pid).is_none() {
                out.push(Action::Started {
                    who: p.who.clone(),
                    pid,
                });
            }
        }
    }

    fn spawn_failed(
        &mut self,
        host: usize,
        error: SpawnError,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if self.stopping.is_some() {
            return;
        }
        let name = self.name(host);
        let reason = match error {
            SpawnError::StoppedElsewhere => {
                out.push(Action::Note(format!(
                    "{name}: the job was stopped by {STOPPED_WHILE_STARTING}; \
                     stopping it on every host"
                )));
                Reason::StoppedBy {
                    host,
                    by: STOPPED_WHILE_STARTING.to_string(),
                    named: false,
                }
            }
            SpawnError::Failed(message) => {
                out.push(Action::Note(format!("{name}: {message}")));
                Reason::SpawnFailed { host, message }
            }
        };
        self.begin_stop(reason, now, out);
    }

    /// Who an event is about; an index the plan does not know is named `#index`.
    fn who(&self, host: usize, label: &str) -> Who {
        match self.procs.get(&(host, label.to_string())) {
            Some(p) => p.who.clone(),
            None => Who {
                machine: host,
                host: self
                    .hosts
                    .get(host)
                    .map_or_else(String::new, |h| h.ip.clone()),
                label: label.to_string(),
                role: String::new(),
            },
        }
    }

    fn on_msg(&mut self, m: Msg, now: Instant, out: &mut Vec<Action>) {
        match m {
            Msg::Event { host, ev } => self.on_event(host, ev, now, out),
            Msg::StreamEnded { host } => {
                self.silent.insert(host);
                if self.stopping.is_none() {
                    self.lost(host, Loss::StreamEnded, now, out);
                }
            }
            Msg::Lost { host, loss } => {
                if !self.silent.contains(&host) {
                    self.lost(host, loss, now, out);
                }
            }
            Msg::Stopped { host, result } => self.stop_returned(host, result, now, out),
            Msg::Cpu { host, processes } => {
                for p in processes {
                    if let Some(label) = self.index.get(&(host, p.index)) {
                        self.progress.cpu(&(host, label.clone()), now, p.cpu_ms);
                    }
                }
            }
        }
    }

    fn stop_returned(
        &mut self,
        host: usize,
        result: Result<pb::StopReply, String>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        match result {
            Ok(r) if r.remaining > 0 => out.push(Action::Note(format!(
                "{}: {} processes survived SIGKILL",
                self.name(host),
                r.remaining
            ))),
            Ok(_) => {}
            Err(e) => {
                self.silent.insert(host);
                out.push(Action::Note(format!(
                    "{}: stop failed: {e}",
                    self.name(host)
                )));
            }
        }
        self.confirm(host, now);
    }

    /// `host` has nothing more to say about the stop.
    fn confirm(&mut self, host: usize, now: Instant) {
        if let Some(s) = &mut self.stopping {
            s.pending.remove(&host);
            if s.pending.is_empty() && s.confirmed.is_none() {
                s.confirmed = Some(now);
            }
        }
    }

    fn lost(&mut self, host: usize, loss: Loss, now: Instant, out: &mut Vec<Action>) {
        self.silent.insert(host);
        if self.stopping.is_none() {
            out.push(Action::Note(format!(
                "lost the agent of {}: {}; stopping the job on every other host",
                self.name(host),
                loss.reason()
            )));
            self.begin_stop(Reason::Lost { host, loss }, now, out);
        } else {
            // Its Stop may never return; don't wait for it.
            self.confirm(host, now);
        }
    }

    fn on_event(&mut self, host: usize, ev: pb::JobEvent, now: Instant, out: &mut Vec<Action>) {
        match ev.event {
            Some(Event::Started(s)) => self.note_started(host, s.index, &s.label, s.pid, out),
            Some(Event::Line(l)) => self.on_line(host, l, now, out),
            Some(Event::LostLines(count)) => out.push(Action::LostLines {
                machine: host,
                ip: self
                    .hosts
                    .get(host)
                    .map_or_else(String::new, |h| h.ip.clone()),
                count,
                name: self.name(host),
            }),
            Some(Event::Exited(x)) => self.on_exit(host, x, now, out),
            Some(Event::Stopped(s)) => self.on_stopped(host, s, now, out),
            None => {}
        }
    }

    fn on_line(&mut self, host: usize, l: pb::OutputLine, now: Instant, out: &mut Vec<Action>) {
        let label = self
            .index
            .get(&(host, l.index))
            .cloned()
            .unwrap_or_else(|| format!("#{}", l.index));
        let stream = OutputStream::try_from(l.stream).unwrap_or(OutputStream::Stdout);
        let who = self.who(host, &label);
        self.progress.line(&(host, label.clone()), now, &l.text);
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
        out.push(Action::Line {
            who,
            stream,
            text: l.text,
        });
    }

    fn on_exit(&mut self, host: usize, x: pb::ProcessExited, now: Instant, out: &mut Vec<Action>) {
        let Some(label) = self.index.get(&(host, x.index)).cloned() else {
            return;
        };
        let Some(p) = self.procs.get_mut(&(host, label.clone())) else {
            return;
        };
        if p.exit.is_some() {
            return;
        }
        p.exit = Some(x);
        let role = p.role;
        self.progress.exited(&(host, label.clone()));
        out.push(Action::Exited {
            who: p.who.clone(),
            pid: p.pid,
            exit: x,
        });
        if summary::is_failure(&x) {
            if self.stopping.is_none() {
                out.push(Action::Note(format!(
                    "{} {label} {}; stopping the job on every host",
                    self.name(host),
                    summary::status_text(&x)
                )));
                self.begin_stop(Reason::Failed { host, label }, now, out);
            }
        } else if role.is_trainer() && x.code == 0 && x.signal == 0 {
            self.trainers_left = self.trainers_left.saturating_sub(1);
            if self.trainers_left == 0 && self.stopping.is_none() {
                self.begin_stop(Reason::Success, now, out);
            }
        }
    }

    /// The agent of `host` began stopping the job. Our own Stops are announced too; they
    /// come while `stopping` is already set and change nothing.
    fn on_stopped(&mut self, host: usize, s: pb::JobStopped, now: Instant, out: &mut Vec<Action>) {
        if let Some(stopping) = &mut self.stopping {
            // Only someone else's Stop names the stopper.
            let requested =
                s.cause == pb::StopCause::Requested as i32 && s.by != self.facts.requester;
            if let Reason::StoppedBy { by, named, .. } = &mut stopping.reason {
                if requested && !*named {
                    (*by, *named) = (s.by, true);
                }
            }
            return;
        }
        let name = self.name(host);
        let lost = |loss: Loss| {
            let note = format!(
                "lost the agent of {name}: {}; stopping the job on every other host",
                loss.reason()
            );
            (Reason::Lost { host, loss }, note)
        };
        let (reason, note) = match pb::StopCause::try_from(s.cause) {
            Ok(pb::StopCause::LeaseExpired) => lost(Loss::LeaseExpired),
            Ok(pb::StopCause::AgentShutdown) => lost(Loss::ShuttingDown),
            _ => {
                let note = format!(
                    "{name}: the job was stopped by {}; stopping it on every host",
                    s.by
                );
                let by = s.by;
                (
                    Reason::StoppedBy {
                        host,
                        by,
                        named: true,
                    },
                    note,
                )
            }
        };
        out.push(Action::Note(note));
        self.begin_stop(reason, now, out);
    }

    fn on_signal(&mut self, sig: i32, now: Instant, out: &mut Vec<Action>) {
        self.signals += 1;
        let name = summary::signal_name(sig);
        match &mut self.stopping {
            None => {
                out.push(Action::Note(format!(
                    "{name}: stopping the job on every host (again to kill at once)"
                )));
                self.begin_stop(Reason::Signal(sig), now, out);
            }
            Some(s) if !s.forced => {
                out.push(Action::Note(format!(
                    "{name} again: killing every process now"
                )));
                s.forced = true;
                out.push(Action::Stop {
                    hosts: s.pending.iter().copied().collect(),
                    force: true,
                });
            }
            Some(_) => {}
        }
        if self.signals >= 3 {
            out.push(Action::Note(
                "third signal: leaving without waiting; the agents stop what is left when the \
                 lease runs out"
                    .to_string(),
            ));
            self.abandoned = true;
        }
    }

    fn begin_stop(&mut self, reason: Reason, now: Instant, out: &mut Vec<Action>) {
        let pending: BTreeSet<usize> = (0..self.hosts.len())
            .filter(|h| !self.silent.contains(h))
            .collect();
        out.push(Action::Stop {
            hosts: pending.iter().copied().collect(),
            force: false,
        });
        self.stopping = Some(Stopping {
            reason,
            since: now,
            confirmed: pending.is_empty().then_some(now),
            pending,
            forced: false,
        });
    }
}
