//! One job: its processes, its event log and its lease.
//!
//! State sits behind one short-held mutex; watchers wait on a `watch` channel that carries the
//! newest seq, so a wake-up is never missed between reading the log and waiting.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dglrun_proto::pb::{self, job_event::Event, OutputStream};
use tokio::sync::watch;

use super::cgroup::{Cgroups, JobCgroup};
use super::host_log::JobLog;
use super::lines::Piece;
use super::log::EventLog;
use super::pidfd::PidFd;
use super::process::{AGENT_VAR, JOB_ID_VAR};
use super::reaper::Exit;
use super::slots::Counter;
use super::spec::JobId;
use super::tree::{MemberQuery, Seed};

#[derive(Debug)]
pub struct Proc {
    pub label: String,
    pub pid: u32,
    /// Start time in clock ticks after boot (see `proc_stat::ProcEntry::start`).
    pub start_ticks: Option<u64>,
    pub started: Instant,
    pub exit: Option<pb::ProcessExited>,
    /// Held from the spawn until the child is reaped; every signal to it goes through this.
    pub pidfd: Option<Arc<PidFd>>,
    /// Reaped: its pid may already name another process, so it is no member seed any more.
    pub reaped: bool,
}

#[derive(Debug)]
pub struct JobState {
    pub log: EventLog,
    pub procs: Vec<Proc>,
    pub lease: Duration,
    pub renewed: Instant,
    /// Set by Stop (or lease expiry, or shutdown): exits from then on were caused by the agent.
    pub stopping: bool,
    /// The lease ran out and the agent stopped the job on its own.
    pub lease_stopped: bool,
    /// When the last process exited.
    pub finished_at: Option<Instant>,
    /// A watcher has been sent every exit event.
    pub exits_seen: bool,
    /// Forgotten by the agent: watchers end their streams.
    pub gone: bool,
    /// A stop found nothing left: no process of the job can exist any more (nothing is left
    /// to fork one, and Spawn refuses a stopped job), so scans can be skipped.
    pub clean: bool,
    /// A stop could not finish (/proc unreadable, or processes survived SIGKILL): the lease
    /// monitor stops the job again from this time on, until one finds nothing left.
    pub retry_stop_at: Option<Instant>,
}

pub struct Job {
    pub id: JobId,
    pub workspace: PathBuf,
    marker: Vec<Vec<u8>>,
    state: Mutex<JobState>,
    seq_tx: watch::Sender<u64>,
    /// The job's cgroup, made by its first Spawn where the agent has cgroups.
    cgroup: OnceLock<Arc<JobCgroup>>,
    /// Open Watch streams of this job.
    pub watches: Arc<Counter>,
    /// Where its output is kept on this host (launch jobs; sessions keep none).
    output_log: OnceLock<JobLog>,
}

impl Job {
    pub fn new(
        id: JobId,
        workspace: PathBuf,
        agent_root: &std::path::Path,
        lease: Duration,
        max_watches: usize,
    ) -> Self {
        let marker = vec![
            format!("{JOB_ID_VAR}={id}").into_bytes(),
            format!("{AGENT_VAR}={}", agent_root.display()).into_bytes(),
        ];
        Self {
            id,
            workspace,
            marker,
            state: Mutex::new(JobState {
                log: EventLog::default(),
                procs: Vec::new(),
                lease,
                renewed: Instant::now(),
                stopping: false,
                lease_stopped: false,
                finished_at: None,
                exits_seen: false,
                gone: false,
                clean: false,
                retry_stop_at: None,
            }),
            seq_tx: watch::Sender::new(0),
            cgroup: OnceLock::new(),
            watches: Counter::new(max_watches),
            output_log: OnceLock::new(),
        }
    }

    /// Keeps the job's output and record on this host from now on (see `host_log`).
    pub fn keep_output(&self, log: JobLog) {
        let _ = self.output_log.set(log);
    }

    pub fn output_log(&self) -> Option<&JobLog> {
        self.output_log.get()
    }

    /// The job's cgroup, created on first use. Blocking (mkdir in the cgroup file system).
    pub fn cgroup_in(&self, cgroups: &Cgroups) -> std::io::Result<Arc<JobCgroup>> {
        if let Some(cg) = self.cgroup.get() {
            return Ok(cg.clone());
        }
        let cg = Arc::new(cgroups.create_job(self.id.as_str())?);
        Ok(self.cgroup.get_or_init(|| cg).clone())
    }

    /// A job started again under the same id keeps the cgroup of the one it replaces, so
    /// the old one's removal cannot take the directory from under the new processes.
    pub fn inherit_cgroup(&self, from: &Job) {
        if let Some(cg) = from.cgroup.get() {
            let _ = self.cgroup.set(cg.clone());
        }
    }

    /// Nothing of the job is left: every process exited and a stop found no descendant.
    pub fn is_over(&self) -> bool {
        let st = self.state();
        st.clean && st.procs.iter().all(|p| p.exit.is_some())
    }

    pub fn state(&self) -> MutexGuard<'_, JobState> {
        // The state stays consistent across a panicking holder (every update is one step).
        self.state.lock()
    }

    fn publish(&self, seq: u64) {
        self.seq_tx.send_replace(seq);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.seq_tx.subscribe()
    }

    pub fn renew(&self) {
        self.state().renewed = Instant::now();
    }

    /// Registers a spawned process, publishes its `started` event and returns its index.
    pub fn add_process(
        &self,
        label: &str,
        pid: u32,
        start_ticks: Option<u64>,
        pidfd: Option<PidFd>,
        started: Instant,
    ) -> u32 {
        let mut st = self.state();
        let index = st.procs.len() as u32;
        st.procs.push(Proc {
            label: label.to_string(),
            pid,
            start_ticks,
            started,
            exit: None,
            pidfd: pidfd.map(Arc::new),
            reaped: false,
        });
        st.finished_at = None;
        st.exits_seen = false;
        let seq = st.log.push(Event::Started(pb::ProcessStarted {
            index,
            label: label.to_string(),
            pid,
        }));
        drop(st);
        self.publish(seq);
        index
    }

    pub fn push_lines(
        &self,
        index: u32,
        stream: OutputStream,
        pieces: impl Iterator<Item = Piece>,
    ) {
        let pieces: Vec<Piece> = pieces.collect();
        // Sent first, so the writer has every line before the exit that follows them.
        if let Some(log) = self.output_log.get() {
            log.lines(index, stream, &pieces);
        }
        let mut st = self.state();
        let mut last = None;
        for p in pieces {
            last = Some(st.log.push(Event::Line(pb::OutputLine {
                index,
                stream: stream as i32,
                text: p.text,
                partial: p.partial,
            })));
        }
        drop(st);
        if let Some(seq) = last {
            self.publish(seq);
        }
    }

    /// Process `index` was reaped: from now on its pid is no member seed, and its pidfd is
    /// closed (an agent running thousands of processes must not hold a descriptor per dead one).
    pub fn mark_reaped(&self, index: u32) {
        if let Some(p) = self.state().procs.get_mut(index as usize) {
            p.reaped = true;
            p.pidfd = None;
        }
    }

    /// Records how process `index` ended and publishes the `exited` event.
    pub fn record_exit(&self, index: u32, exit: Exit) {
        let mut st = self.state();
        let stopped_by_agent = st.stopping;
        let Some(p) = st.procs.get_mut(index as usize) else {
            return;
        };
        let (code, signal) = match exit {
            Exit::Code(c) => (c, 0),
            Exit::Signal(s) => (-1, s),
        };
        let ev = pb::ProcessExited {
            index,
            code,
            signal,
            runtime_ms: p.started.elapsed().as_millis() as u64,
            stopped_by_agent,
        };
        p.exit = Some(ev);
        crate::metrics::process_exited(code, signal, stopped_by_agent);
        if st.procs.iter().all(|p| p.exit.is_some()) {
            st.finished_at = Some(Instant::now());
        }
        let seq = st.log.push(Event::Exited(ev));
        drop(st);
        self.publish(seq);
        if let Some(log) = self.output_log.get() {
            log.exited(index, code, signal, stopped_by_agent);
        }
    }

    /// Publishes that the job is being stopped and by whom, before any signal is sent, so a
    /// watcher knows why the exits that follow came.
    pub fn record_stopped(&self, cause: pb::StopCause, by: &str) {
        let mut st = self.state();
        let seq = st.log.push(Event::Stopped(pb::JobStopped {
            cause: cause as i32,
            by: by.to_string(),
        }));
        drop(st);
        self.publish(seq);
        if let Some(log) = self.output_log.get() {
            log.stopped(by);
        }
    }

    /// Ends every watcher's stream.
    pub fn forget(&self) {
        self.state().gone = true;
        // Wakes every receiver even though the seq did not change.
        self.seq_tx.send_modify(|_| {});
    }

    /// Up to `max` events after `after`; also notes when a watcher has seen every exit.
    pub fn events_after(&self, after: u64, max: usize) -> (Vec<pb::JobEvent>, bool) {
        let mut st = self.state();
        let events = st.log.after(after, max);
        let upto = events.last().map_or(after, |e| e.seq);
        if st.finished_at.is_some() && upto >= st.log.last_seq() {
            st.exits_seen = true;
        }
        (events, st.gone)
    }

    /// What identifies this job's processes right now.
    pub fn member_query(&self) -> MemberQuery {
        let st = self.state();
        MemberQuery {
            seeds: st
                .procs
                .iter()
                .filter(|p| p.exit.is_none() && !p.reaped)
                // Exited but not yet reaped: it only waits for the reaper, nothing to signal.
                .filter(|p| !p.pidfd.as_ref().is_some_and(|fd| fd.has_exited()))
                .map(|p| Seed {
                    pid: p.pid as i32,
                    start: p.start_ticks,
                    pidfd: p.pidfd.clone(),
                })
                .collect(),
            marker: self.marker.clone(),
            exclude: std::process::id() as i32,
            within: Some(std::process::id() as i32),
            cgroup: self.cgroup.get().cloned(),
        }
    }

    pub fn info(&self, live_pids: u32) -> pb::JobInfo {
        let st = self.state();
        pb::JobInfo {
            job_id: self.id.to_string(),
            workspace: self.workspace.display().to_string(),
            processes: st
                .procs
                .iter()
                .enumerate()
                .map(|(i, p)| pb::ProcessInfo {
                    index: i as u32,
                    label: p.label.clone(),
                    pid: p.pid,
                    running: p.exit.is_none(),
                    code: p.exit.map_or(0, |e| e.code),
                    signal: p.exit.map_or(0, |e| e.signal),
                })
                .collect(),
            live_pids,
            last_seq: st.log.last_seq(),
        }
    }
}
