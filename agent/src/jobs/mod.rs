//! Jobs: supervised process trees, their output, their leases.
//!
//! * `process` builds a command from a spec; `reaper` spawns it and is the only place that
//!   waits for children (the agent is a child subreaper and adopts orphaned descendants).
//! * Each spawned process gets a supervisor task (`supervise`): its two pipe readers
//!   (`output`) turn output into line events, and its exit becomes an `exited` event once the
//!   pipes were drained, so a process's last lines precede its exit.
//! * `job` holds one job's state and event `log`; Watch replays the log and follows it.
//! * `tree` finds a job's processes in /proc (direct children, marker variable, descendants);
//!   `stop` terminates them all; `lease` stops jobs whose coordinator went silent.
//! * `state_file` records the running jobs under the root; `recover` reads it when the agent
//!   starts and stops whatever a previous run of the agent left behind.
//! * `session` runs one command the way ssh does, as a job of its own with byte streams,
//!   forked straight into the job's cgroup by `fork_into`.
//! * `stacks` dumps the Python stack of every Python process of a job (py-spy).

pub mod cgroup;
pub mod cpu;
pub mod error;
pub mod fork_into;
pub mod history;
pub mod host_log;
pub mod job;
pub(crate) mod lease;
pub mod lines;
pub mod listening;
pub mod log;
pub mod log_read;
pub mod output;
pub mod pidfd;
pub mod preflight;
pub mod proc_stat;
pub mod process;
pub mod reaper;
pub mod recover;
pub mod retention;
pub mod session;
pub mod slots;
pub mod sockets;
pub mod spec;
pub mod stacks;
pub mod state_file;
pub mod stop;
mod stopped;
pub mod tree;

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dglrun_proto::pb::{self, OutputStream};
use tokio::sync::{oneshot, watch};
use tonic::Status;

pub(crate) use dglrun_proto::error_chain;

use crate::confine::{Root, Workdir};
use crate::limits::MAX_JOBS;
pub use error::JobError;
use job::Job;
use reaper::{Exit, Reaper};
use slots::{AggregateLimits, Counter};
use spec::{JobId, ProcessSpec, SpawnSpec, StopSpec, WatchSpec};
use state_file::StateFile;

/// A job's events as Watch streams them.
pub type EventStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[derive(Clone, Debug)]
pub struct JobsConfig {
    /// Lease of a job whose Spawn named none (`lease_ms` = 0).
    pub lease_timeout: Duration,
    /// Time between SIGTERM and SIGKILL when the agent stops a job on its own.
    pub grace: Duration,
    /// Where launch processes' output is kept on this host, and for how long.
    pub host_logs: host_log::HostLogConfig,
}

/// How long a shutting-down agent waits for the job records to be written.
const HOST_LOG_FLUSH: Duration = Duration::from_secs(2);
/// Events sent to a watcher per read of the log.
const WATCH_BATCH: usize = 512;
/// How long after its exit a process's pipes may still be drained before the exit is
/// published anyway (a grandchild holding the pipe open cannot delay it longer).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Jobs {
    root: Root,
    config: JobsConfig,
    reaper: Arc<Reaper>,
    jobs: Mutex<HashMap<JobId, Arc<Job>>>,
    shutting_down: AtomicBool,
    state_file: Arc<StateFile>,
    /// Tells the lease monitor that a deadline may have moved earlier.
    lease_wake: Arc<tokio::sync::Notify>,
    /// Where jobs get cgroups of their own; None: found by markers only.
    cgroups: Option<Arc<cgroup::Cgroups>>,
    limits: AggregateLimits,
    /// Direct children not yet reaped, across all jobs.
    processes: Arc<Counter>,
    /// Open Watch streams, across all jobs.
    watches: Arc<Counter>,
    /// Open sessions.
    sessions: Arc<Counter>,
    /// Which job or copy holds each workspace (shared with `files`).
    workspaces: Arc<crate::workspace::Workspaces>,
    /// Output files and job records under the root.
    host_logs: Arc<host_log::HostLogs>,
    /// Open ReadLogs streams.
    log_reads: Arc<Counter>,
}

impl Jobs {
    /// Makes the agent a child subreaper, starts the reaper and the lease monitor.
    /// Must be called within a tokio runtime.
    pub fn start(root: Root, config: JobsConfig) -> anyhow::Result<Arc<Self>> {
        Self::start_with(root, config, AggregateLimits::default())
    }

    /// [`start`](Self::start) with other aggregate bounds (tests use small ones).
    pub fn start_with(
        root: Root,
        config: JobsConfig,
        limits: AggregateLimits,
    ) -> anyhow::Result<Arc<Self>> {
        let state_file = Arc::new(StateFile::new(root.state_dir()));
        let cgroups = match cgroup::Cgroups::detect(root.path()) {
            Ok(c) => {
                tracing::info!(cgroup = %c.base().display(), "job containment: a cgroup v2 per job (cgroup.kill), and the environment marker scan");
                Some(Arc::new(c))
            }
            Err(e) => {
                tracing::warn!(
                    "job containment: environment marker scan only; no writable cgroup v2: {}",
                    error_chain(&e)
                );
                None
            }
        };
        let host_logs = host_log::HostLogs::start(root.clone(), config.host_logs.clone())?;
        let jobs = Arc::new(Self {
            root,
            config,
            reaper: Reaper::get()?,
            jobs: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
            state_file,
            lease_wake: Arc::new(tokio::sync::Notify::new()),
            cgroups,
            limits,
            processes: Counter::new(limits.live_processes),
            watches: Counter::new(limits.watches),
            sessions: Counter::new(crate::limits::MAX_SESSIONS),
            workspaces: Arc::default(),
            host_logs,
            log_reads: Counter::new(crate::limits::MAX_LOG_READS),
        });
        lease::spawn_monitor(Arc::downgrade(&jobs), jobs.lease_wake.clone());
        Ok(jobs)
    }

    /// The cgroup directory jobs are contained in; None when the agent could not make one.
    pub fn cgroup_base(&self) -> Option<&Path> {
        self.cgroups.as_deref().map(cgroup::Cgroups::base)
    }

    /// The workspace leases, for `files` to share.
    pub fn workspaces(&self) -> &Arc<crate::workspace::Workspaces> {
        &self.workspaces
    }

    /// What the state file should say now: every job not known to be over, with its direct
    /// children that still run.
    fn record(&self) -> state_file::Record {
        let mut jobs: Vec<state_file::JobRecord> = self
            .all()
            .iter()
            .filter_map(|j| {
                let st = j.state();
                let processes: Vec<state_file::ProcRecord> = st
                    .procs
                    .iter()
                    .filter(|p| p.exit.is_none())
                    .filter_map(|p| {
                        Some(state_file::ProcRecord {
                            label: p.label.clone(),
                            pid: p.pid as i32,
                            start: p.start_ticks?,
                        })
                    })
                    .collect();
                (!st.clean || !processes.is_empty()).then(|| state_file::JobRecord {
                    id: j.id.to_string(),
                    workspace: j.workspace.clone(),
                    processes,
                })
            })
            .collect();
        jobs.sort_by(|a, b| a.id.cmp(&b.id));
        state_file::Record {
            agent_pid: std::process::id(),
            jobs,
        }
    }

    /// Writes the state file in the background. Must be called within a tokio runtime.
    fn save_state_soon(&self) -> tokio::task::JoinHandle<()> {
        let pending = self.state_file.snapshot(|| self.record());
        let file = self.state_file.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = file.write(pending) {
                // The marker scan still finds the jobs after a restart; only seeds are lost.
                tracing::warn!(path = %file.path().display(), "cannot write the job record: {e}");
            }
        })
    }

    fn map(&self) -> MutexGuard<'_, HashMap<JobId, Arc<Job>>> {
        self.jobs.lock()
    }

    fn get(&self, id: &JobId) -> Result<Arc<Job>, JobError> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| JobError::NotFound(id.clone()))
    }

    fn all(&self) -> Vec<Arc<Job>> {
        self.map().values().cloned().collect()
    }

    /// The directory `p` relative to `base` (or absolute inside the root), opened beneath the
    /// root.
    fn workdir(&self, base: &Path, p: &str) -> Result<Workdir, JobError> {
        let joined = base.join(p);
        let joined = joined
            .to_str()
            .ok_or_else(|| JobError::NotUtf8(joined.clone()))?;
        Ok(self.root.open_workdir(joined)?)
    }

    pub async fn preflight(&self, req: preflight::Preflight) -> Result<pb::PreflightReply, Status> {
        let workspace = self.root.path().join(req.workspace.rel());
        self.workspaces.check_launch(&workspace)?;
        let mut reply = preflight::check(&self.root, req).await?;
        let candidates: Vec<Arc<Job>> = self
            .all()
            .into_iter()
            .filter(|j| j.workspace == workspace)
            .collect();
        for job in candidates {
            let live = live_members(&job).await.map_err(|e| {
                Status::unavailable(format!(
                    "cannot tell whether job {} still runs: {}",
                    job.id,
                    error_chain(&e)
                ))
            })?;
            if live > 0 {
                reply.live_jobs.push(job.info(live));
            }
        }
        Ok(reply)
    }

    pub async fn spawn(&self, req: SpawnSpec) -> Result<pb::SpawnReply, JobError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(JobError::ShuttingDown);
        }
        let (workspace, commands) = self.prepare_commands(&req)?;
        let asked = commands.len();
        let slots = self
            .processes
            .take(asked)
            .ok_or_else(|| JobError::TooManyProcesses {
                running: self.processes.used(),
                asked,
                limit: self.processes.limit(),
            })?;
        let job = self.admit(&req, workspace)?;
        self.lease_wake.notify_one();

        // Forking and registering happen in one blocking task that runs to completion even if
        // the caller goes away mid-call: a started process is always in the job (supervised,
        // stoppable), never orphaned by a cancelled request.
        let start = StartAll {
            job: job.clone(),
            commands,
            slots,
            cgroups: self.cgroups.clone(),
            reaper: self.reaper.clone(),
            runtime: tokio::runtime::Handle::current(),
        };
        let (started, failure) = tokio::task::spawn_blocking(move || start.run())
            .await
            .map_err(|e| JobError::Task("spawn", e))?;
        // Recorded before the reply: once the coordinator knows of a process, so does the disk.
        let _ = self.save_state_soon().await;
        if let Some(e) = failure {
            return Err(e);
        }
        if job.state().stopping {
            // A Stop began while these were forked: it may have scanned before they existed.
            let (j, grace) = (job.clone(), self.config.grace);
            tokio::spawn(async move { stop_job(&j, grace, false).await });
            return Err(JobError::StoppedWhileStarting(job.id.clone()));
        }
        Ok(pb::SpawnReply { processes: started })
    }

    /// The workspace, and each process's command with its working directory resolved in it.
    fn prepare_commands(&self, req: &SpawnSpec) -> Result<(PathBuf, Vec<Prepared>), JobError> {
        let workspace = match self.root.open_workdir(&req.workspace) {
            Ok(w) => w.path,
            Err(e) if e.is_not_found() || e.is_not_a_directory() => {
                let rel = self.root.parse(&req.workspace)?;
                return Err(JobError::NoWorkspace(self.root.path().join(rel.rel())));
            }
            Err(e) => return Err(e.into()),
        };
        let mut commands = Vec::with_capacity(req.processes.len());
        for spec in &req.processes {
            let cwd = self.workdir(&workspace, &spec.cwd)?;
            let cmd = process::command(spec, cwd, &req.job_id, self.root.path());
            commands.push(Prepared {
                label: spec.label.clone(),
                what: describe(spec),
                command: command_text(spec),
                cmd,
            });
        }
        Ok((workspace, commands))
    }

    /// The job the Spawn adds to, registered (with its workspace lease) if it is new, and its
    /// lease renewed; refused while the job cannot take more processes.
    fn admit(&self, req: &SpawnSpec, workspace: PathBuf) -> Result<Arc<Job>, JobError> {
        let mut map = self.map();
        // Open sessions have a bound of their own and take none of the launches' jobs.
        let launches = map.len().saturating_sub(self.sessions.used());
        if launches >= MAX_JOBS && !map.contains_key(&req.job_id) {
            // A finished job stays a minute for its watchers (its record and logs stay on
            // disk): a new job takes the place of the one that finished first, and only jobs
            // still running make the agent refuse.
            let oldest = map
                .iter()
                .filter_map(|(id, j)| {
                    // What the lease monitor would forget after its minute: every process
                    // exited, a watcher saw every exit, no stop still looking for leftovers.
                    let st = j.state();
                    let done = st.finished_at?;
                    (st.exits_seen && (st.clean || !st.stopping)).then(|| (done, id.clone()))
                })
                .min()
                .map(|(_, id)| id);
            match oldest.and_then(|id| map.remove(&id)) {
                Some(old) => {
                    tracing::debug!(job = %old.id, "finished job forgotten for a new one");
                    old.forget();
                }
                None => return Err(JobError::TooManyJobs(MAX_JOBS)),
            }
        }
        // A restart replaces the job it follows once nothing of that one is left; its
        // watchers' streams end with it.
        let replaced = match map.get(&req.job_id) {
            Some(old) if req.restart && old.is_over() => {
                old.forget();
                map.remove(&req.job_id)
            }
            _ => None,
        };
        let job = match map.get(&req.job_id) {
            Some(job) => job.clone(),
            None => {
                let job = Arc::new(Job::new(
                    req.job_id.clone(),
                    workspace.clone(),
                    self.root.path(),
                    req.lease.unwrap_or(self.config.lease_timeout),
                    self.limits.watches_per_job,
                ));
                if let Some(old) = &replaced {
                    job.inherit_cgroup(old);
                }
                self.workspaces.claim_for_job(&workspace, &job)?;
                job.keep_output(self.host_logs.job(&req.job_id));
                map.insert(req.job_id.clone(), job.clone());
                job
            }
        };
        if job.workspace != workspace {
            return Err(JobError::OtherWorkspace {
                job: job.id.clone(),
                workspace: job.workspace.clone(),
            });
        }
        let mut st = job.state();
        may_add_processes(&job.id, &st)?;
        // Renewed under the same lock as the check: the lease cannot run out in between.
        st.renewed = Instant::now();
        drop(st);
        Ok(job)
    }

    pub fn watch(&self, req: WatchSpec) -> Result<EventStream, JobError> {
        let job = self.get(&req.job_id)?;
        let agent_slot = self.watches.take(1).ok_or(JobError::TooManyWatches {
            limit: self.watches.limit(),
        })?;
        let job_slot = job
            .watches
            .take(1)
            .ok_or_else(|| JobError::TooManyJobWatches {
                job: job.id.clone(),
                limit: job.watches.limit(),
            })?;
        job.renew();
        let rx = job.subscribe();
        // The slots live in the stream's state: dropping the stream gives them back.
        let held = (agent_slot, job_slot);
        let state = (job, req.after_seq, rx, VecDeque::new(), held);
        let stream = futures::stream::unfold(
            state,
            |(job, mut cursor, mut rx, mut pending, held)| async move {
                loop {
                    if let Some(ev) = pending.pop_front() {
                        return Some((Ok(ev), (job, cursor, rx, pending, held)));
                    }
                    // Marked seen before reading the log: a push after the read wakes `changed`.
                    rx.borrow_and_update();
                    let (events, gone) = job.events_after(cursor, WATCH_BATCH);
                    if let Some(last) = events.last() {
                        cursor = last.seq;
                        pending.extend(events);
                        continue;
                    }
                    if gone || rx.changed().await.is_err() {
                        return None;
                    }
                }
            },
        );
        Ok(Box::pin(stream))
    }

    pub fn renew(&self, id: &JobId) -> pb::RenewReply {
        match self.map().get(id) {
            Some(job) => {
                job.renew();
                pb::RenewReply { known: true }
            }
            None => pb::RenewReply { known: false },
        }
    }

    /// CPU time of each running process of the job, its descendants included.
    pub async fn cpu(&self, id: &JobId) -> Result<pb::JobCpuReply, JobError> {
        let job = self.get(id)?;
        let seeds: Vec<(u32, i32, Option<u64>)> = job
            .state()
            .procs
            .iter()
            .enumerate()
            .filter(|(_, p)| p.exit.is_none() && !p.reaped)
            .map(|(i, p)| (i as u32, p.pid as i32, p.start_ticks))
            .collect();
        if seeds.is_empty() {
            return Ok(pb::JobCpuReply::default());
        }
        let hz = rustix::param::clock_ticks_per_second();
        // A bounded slot of the blocking pool: a client asking in a loop takes no more.
        let per = crate::blocking::run("reading /proc", crate::blocking::FS_TIMEOUT, move || {
            cpu::snapshot(Path::new("/proc")).map(|all| cpu::per_tree(&all, &seeds, hz))
        })
        .await?
        .map_err(JobError::Scan)?;
        Ok(pb::JobCpuReply {
            processes: per
                .into_iter()
                .map(|(index, cpu_ms)| pb::ProcessCpu { index, cpu_ms })
                .collect(),
        })
    }

    pub async fn stop(&self, req: StopSpec) -> Result<pb::StopReply, JobError> {
        let job = self.get(&req.job_id)?;
        let was_running = stopped::announce(&job, pb::StopCause::Requested, &req.requester);
        // In a task of its own: a coordinator that gives up waiting must not cut a stop short
        // between SIGTERM and SIGKILL.
        let j = job.clone();
        let (grace, force) = (req.grace, req.force);
        let outcome = tokio::spawn(async move { stop_job(&j, grace, force).await })
            .await
            .map_err(|e| JobError::Task("stop", e))?
            .map_err(|source| {
                tracing::error!(job = %job.id, "stop failed: {}", error_chain(&source));
                JobError::StopBlind {
                    job: job.id.clone(),
                    source,
                }
            })?;
        tracing::info!(job = %job.id, signalled = outcome.signalled, remaining = outcome.remaining, force, "job stopped on request");
        Ok(pb::StopReply {
            signalled: outcome.signalled,
            remaining: outcome.remaining,
            already_finished: !was_running && outcome.signalled == 0,
        })
    }

    /// The metrics' gauges, read from the known jobs at each scrape.
    pub fn gauges(self: &Arc<Self>) -> crate::metrics::ReadGauges {
        let jobs = Arc::downgrade(self);
        Arc::new(move || {
            let Some(jobs) = jobs.upgrade() else {
                return crate::metrics::Gauges::default();
            };
            let list = jobs.list_known().jobs;
            crate::metrics::Gauges {
                processes_running: list
                    .iter()
                    .map(|j| j.processes.iter().filter(|p| p.running).count())
                    .sum(),
                jobs_running: list
                    .iter()
                    .filter(|j| j.processes.iter().any(|p| p.running))
                    .count(),
            }
        })
    }

    /// Every job and its direct children, without counting descendants (no /proc scan).
    pub fn list_known(&self) -> pb::ListJobsReply {
        let mut jobs: Vec<pb::JobInfo> = self.all().iter().map(|j| j.info(0)).collect();
        jobs.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        pb::ListJobsReply { jobs }
    }

    pub async fn list(&self) -> Result<pb::ListJobsReply, JobError> {
        let jobs = self.all();
        // Off the runtime: a scan reads many small files.
        let listed = tokio::task::spawn_blocking(move || {
            let proc_root = Path::new("/proc");
            let all = tree::snapshot(proc_root)?;
            jobs.iter()
                .map(|j| {
                    if j.state().clean {
                        return Ok(j.info(0));
                    }
                    let live = tree::members_in(&all, &j.member_query(), |pid| {
                        tree::read_environ(proc_root, pid)
                    })?;
                    Ok(j.info(live.len() as u32))
                })
                .collect::<Result<Vec<_>, tree::ScanError>>()
        })
        .await
        .map_err(|e| JobError::Task("job list", e))?;
        let mut jobs = listed.map_err(JobError::Scan)?;
        jobs.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        Ok(pb::ListJobsReply { jobs })
    }

    /// The records kept of launch jobs (see `history`), running and finished: every one, or
    /// the one named.
    pub fn job_records(&self, job: Option<&JobId>) -> pb::JobRecordsReply {
        let history = self.host_logs.history();
        let jobs = match job {
            Some(id) => history.get(id.as_str()).into_iter().collect(),
            None => history.all(),
        };
        pb::JobRecordsReply {
            jobs: jobs.iter().map(history::JobRecord::to_pb).collect(),
        }
    }

    /// The kept output of a job as lines (see `log_read`).
    pub fn read_logs(&self, spec: log_read::ReadSpec) -> Result<log_read::LogStream, JobError> {
        if self.host_logs.history().get(spec.job_id.as_str()).is_none() {
            return Err(JobError::NotFound(spec.job_id));
        }
        let slot = self.log_reads.take(1).ok_or(JobError::TooManyLogReads {
            limit: self.log_reads.limit(),
        })?;
        Ok(log_read::start(
            self.root.clone(),
            self.host_logs.history().clone(),
            spec,
            slot,
        ))
    }

    /// Stops every job; called when the agent itself is asked to exit.
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let jobs = self.all();
        let grace = self.config.grace;
        let stops = jobs.iter().map(|j| async move {
            stopped::announce(j, pb::StopCause::AgentShutdown, "the agent shutting down");
            match stop_job(j, grace, false).await {
                Ok(outcome) if outcome.signalled > 0 => {
                    tracing::info!(job = %j.id, signalled = outcome.signalled, remaining = outcome.remaining, "job stopped: agent shutting down");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(job = %j.id, "cannot stop the job before exiting: {}; the next run of the agent stops what is left", error_chain(&e));
                }
            }
        });
        futures::future::join_all(stops).await;
        // The exits just recorded reach the job records before the agent exits.
        let logs = self.host_logs.clone();
        let _ = tokio::task::spawn_blocking(move || logs.flush(HOST_LOG_FLUSH)).await;
        // Anything that survived the stop stays on record for the next run to find.
        let _ = self.save_state_soon().await;
        for j in &jobs {
            j.forget();
        }
        self.map().clear();
        if let Some(c) = self.cgroups.clone() {
            let _ = tokio::task::spawn_blocking(move || c.remove_empty()).await;
        }
    }

    /// Removes a job from the agent (its watchers' streams end).
    fn remove(&self, id: &str) {
        // The map's guard must be gone before saving: the snapshot locks the map again.
        let removed = self.map().remove(id);
        if let Some(job) = removed {
            job.forget();
            tracing::debug!(job = %id, "job forgotten");
            drop(self.save_state_soon());
        }
    }
}

/// A command ready to fork, with what names it in messages.
struct Prepared {
    label: String,
    what: String,
    /// The whole command, for the job's record.
    command: String,
    cmd: std::process::Command,
}

/// Whether a Spawn may add processes to a job in this state.
fn may_add_processes(id: &JobId, st: &job::JobState) -> Result<(), JobError> {
    may_add_to(id, st.lease_stopped, st.stopping, st.lease)
}

fn may_add_to(
    id: &JobId,
    lease_stopped: bool,
    stopping: bool,
    lease: Duration,
) -> Result<(), JobError> {
    // Closed for good: its coordinator went silent once, so nothing would renew (or stop)
    // what a later Spawn starts in it.
    if lease_stopped {
        return Err(JobError::Closed {
            job: id.clone(),
            lease_ms: lease.as_millis(),
        });
    }
    if stopping {
        return Err(JobError::Stopping(id.clone()));
    }
    Ok(())
}

/// The blocking half of a Spawn: forks every command into the job, in order, stopping at
/// the first failure. Processes started before it stay in the job: the coordinator stops
/// the whole job when a Spawn fails.
struct StartAll {
    job: Arc<Job>,
    commands: Vec<Prepared>,
    slots: slots::Slots,
    cgroups: Option<Arc<cgroup::Cgroups>>,
    reaper: Arc<Reaper>,
    runtime: tokio::runtime::Handle,
}

impl StartAll {
    fn run(mut self) -> (Vec<pb::ProcessStarted>, Option<JobError>) {
        let job = self.job.clone();
        let mut started = Vec::new();
        let cgroup = match self.cgroups.as_ref().map(|c| job.cgroup_in(c)).transpose() {
            Ok(cg) => cg,
            Err(source) => {
                let job = job.id.clone();
                return (started, Some(JobError::Cgroup { job, source }));
            }
        };
        for Prepared {
            label,
            what,
            command,
            mut cmd,
        } in std::mem::take(&mut self.commands)
        {
            // One per command, taken by the Spawn; given back when its supervisor ends.
            let slot = self.slots.split_one();
            if let Some(cg) = &cgroup {
                let fd = cg.procs_fd();
                // SAFETY: `enter` only calls write(2) on a descriptor `cgroup` keeps open
                // until this loop ends; it allocates nothing (async-signal-safe).
                unsafe { cmd.pre_exec(move || cgroup::enter(fd)) };
            }
            let reaper::Spawned {
                mut child,
                exit,
                start,
                pidfd,
            } = match self.reaper.spawn(&mut cmd) {
                Ok(x) => x,
                Err(source) => {
                    let e = JobError::Start {
                        label,
                        what,
                        source,
                    };
                    return (started, Some(e));
                }
            };
            let pid = child.id();
            let index = job.add_process(&label, pid, start, pidfd, Instant::now());
            if let Some(log) = job.output_log() {
                log.started(&job.workspace, index, &label, &command, pid);
            }
            crate::metrics::add(&crate::metrics::COUNTERS.processes_started, 1);
            let stdout = child.stdout.take().map(OwnedFd::from);
            let stderr = child.stderr.take().map(OwnedFd::from);
            self.runtime
                .spawn(supervise(job.clone(), index, exit, stdout, stderr, slot));
            tracing::debug!(job = %job.id, index, pid, %label, "started");
            started.push(pb::ProcessStarted { index, label, pid });
        }
        (started, None)
    }
}

/// How a command is named in error messages.
fn describe(spec: &ProcessSpec) -> String {
    match &spec.command {
        spec::Command::Argv(a) => a.first().cloned().unwrap_or_default(),
        spec::Command::Shell(_) => "/bin/sh".to_string(),
    }
}

/// A process's command as its record shows it: the shell text, or the argv quoted for a
/// shell where a word needs it.
fn command_text(spec: &ProcessSpec) -> String {
    match &spec.command {
        spec::Command::Shell(s) => s.clone(),
        spec::Command::Argv(a) => a
            .iter()
            .map(|w| dglrun_coordinator::launch::command::quote(w))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// How long after a stop that could not finish the lease monitor tries again.
const STOP_RETRY: Duration = Duration::from_secs(2);

/// Marks the job as being stopped and stops its whole tree. A stop that could not see every
/// process, or left some alive, leaves the job stopping and not clean, with a retry due.
async fn stop_job(
    job: &Arc<Job>,
    grace: Duration,
    force: bool,
) -> Result<stop::StopOutcome, tree::ScanError> {
    job.state().stopping = true;
    let j = job.clone();
    let result = stop::stop_tree(move || j.member_query(), grace, force).await;
    let mut st = job.state();
    match &result {
        Ok(outcome) if outcome.remaining == 0 => {
            st.clean = true;
            st.retry_stop_at = None;
        }
        _ => st.retry_stop_at = Some(Instant::now() + STOP_RETRY),
    }
    drop(st);
    result
}

/// Live processes of `job`, descendants included.
async fn live_members(job: &Arc<Job>) -> Result<u32, tree::ScanError> {
    if job.state().clean {
        return Ok(0);
    }
    let query = job.member_query();
    tokio::task::spawn_blocking(move || {
        tree::members(Path::new("/proc"), &query).map(|m| m.len() as u32)
    })
    .await
    .unwrap_or_else(|e| {
        Err(tree::ScanError::List {
            path: "/proc".into(),
            source: std::io::Error::other(e),
        })
    })
}

/// Watches one process: reads its output, waits for its exit, publishes both.
async fn supervise(
    job: Arc<Job>,
    index: u32,
    exit: oneshot::Receiver<Exit>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    // Counts the process against the agent's bound until it is reaped and recorded.
    _slot: Option<slots::Slots>,
) {
    let (exited_tx, exited_rx) = watch::channel(false);
    let mut drained = Vec::new();
    for (fd, stream) in [
        (stdout, OutputStream::Stdout),
        (stderr, OutputStream::Stderr),
    ] {
        if let Some(fd) = fd {
            let (tx, rx) = oneshot::channel();
            tokio::spawn(output::read_pipe(
                fd,
                stream,
                index,
                job.clone(),
                exited_rx.clone(),
                tx,
            ));
            drained.push(rx);
        }
    }
    // The reaper never drops a registered sender; if it did, the status is unknown.
    let exit = exit.await.unwrap_or(Exit::Code(-1));
    job.mark_reaped(index);
    let _ = exited_tx.send(true);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, futures::future::join_all(drained)).await;
    job.record_exit(index, exit);
}

#[cfg(test)]
mod tests;
