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

pub mod job;
pub(crate) mod lease;
pub mod log;
pub mod output;
mod preflight;
pub mod process;
pub mod reaper;
pub mod recover;
pub mod state_file;
pub mod stop;
mod stopped;
pub mod tree;

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dglrun_proto::pb::{self, OutputStream};
use tokio::sync::{oneshot, watch};
use tonic::Status;

use crate::confine::Root;
use crate::service::EventStream;
use job::Job;
use reaper::{Exit, Reaper};
use state_file::StateFile;

#[derive(Clone, Debug)]
pub struct JobsConfig {
    /// Lease of a job whose Spawn named none (`lease_ms` = 0).
    pub lease_timeout: Duration,
    /// Time between SIGTERM and SIGKILL when the agent stops a job on its own.
    pub grace: Duration,
}

/// Processes one Spawn call may start.
const MAX_PROCESSES: usize = 4096;
/// Longest lease a coordinator may ask for.
const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);
/// Shortest lease: below this a coordinator could not renew in time.
const MIN_LEASE: Duration = Duration::from_millis(200);
/// Longest grace a Stop may ask for.
const MAX_GRACE: Duration = Duration::from_secs(600);
/// Events sent to a watcher per read of the log.
const WATCH_BATCH: usize = 512;
/// How long after its exit a process's pipes may still be drained before the exit is
/// published anyway (a grandchild holding the pipe open cannot delay it longer).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Jobs {
    root: Root,
    config: JobsConfig,
    reaper: Arc<Reaper>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    shutting_down: AtomicBool,
    state_file: Arc<StateFile>,
    /// Tells the lease monitor that a deadline may have moved earlier.
    lease_wake: Arc<tokio::sync::Notify>,
    /// Which job or copy holds each workspace (shared with `files`).
    workspaces: Arc<crate::workspace::Workspaces>,
}

fn not_found(id: &str) -> Status {
    Status::not_found(format!("job {id:?} is not known to this agent"))
}

/// Job ids are chosen by the coordinator; they end up in environments and logs.
fn check_job_id(id: &str) -> Result<(), Status> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "job id {id:?} must be 1-128 characters of [A-Za-z0-9._:-]"
        )))
    }
}

impl Jobs {
    /// Makes the agent a child subreaper, starts the reaper and the lease monitor.
    /// Must be called within a tokio runtime.
    pub fn start(root: Root, config: JobsConfig) -> anyhow::Result<Arc<Self>> {
        let state_file = Arc::new(StateFile::new(root.state_dir()));
        let jobs = Arc::new(Self {
            root,
            config,
            reaper: Reaper::get()?,
            jobs: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
            state_file,
            lease_wake: Arc::new(tokio::sync::Notify::new()),
            workspaces: Arc::default(),
        });
        lease::spawn_monitor(Arc::downgrade(&jobs), jobs.lease_wake.clone());
        Ok(jobs)
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
                    id: j.id.clone(),
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

    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: &str) -> Result<Arc<Job>, Status> {
        self.map().get(id).cloned().ok_or_else(|| not_found(id))
    }

    fn all(&self) -> Vec<Arc<Job>> {
        self.map().values().cloned().collect()
    }

    /// `p` relative to `base` (or absolute inside the root), confined to the root.
    fn resolve_under(&self, base: &Path, p: &str) -> Result<PathBuf, Status> {
        if p.is_empty() {
            return Ok(base.to_path_buf());
        }
        if Path::new(p).is_absolute() {
            return Ok(self.root.resolve(p)?);
        }
        let joined = base.join(p);
        let joined = joined
            .to_str()
            .ok_or_else(|| Status::invalid_argument("path is not valid UTF-8"))?;
        Ok(self.root.resolve(joined)?)
    }

    pub async fn preflight(&self, req: pb::PreflightRequest) -> Result<pb::PreflightReply, Status> {
        let workspace = self.root.resolve(&req.workspace)?;
        self.workspaces.check_launch(&workspace)?;
        let mut reply = preflight::check(&workspace, &req, |base, p| self.resolve_under(base, p))?;
        let candidates: Vec<Arc<Job>> = self
            .all()
            .into_iter()
            .filter(|j| j.workspace == workspace)
            .collect();
        for job in candidates {
            let live = live_members(&job).await;
            if live > 0 {
                reply.live_jobs.push(job.info(live));
            }
        }
        Ok(reply)
    }

    pub async fn spawn(&self, req: pb::SpawnRequest) -> Result<pb::SpawnReply, Status> {
        check_job_id(&req.job_id)?;
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(Status::unavailable("the agent is shutting down"));
        }
        if req.processes.is_empty() || req.processes.len() > MAX_PROCESSES {
            return Err(Status::invalid_argument(format!(
                "a Spawn must name 1 to {MAX_PROCESSES} processes"
            )));
        }
        for spec in &req.processes {
            process::validate(spec).map_err(Status::invalid_argument)?;
        }
        let workspace = self.root.resolve(&req.workspace)?;
        if !workspace.is_dir() {
            return Err(Status::failed_precondition(format!(
                "workspace {} does not exist on this host",
                workspace.display()
            )));
        }
        let mut commands = Vec::with_capacity(req.processes.len());
        for spec in &req.processes {
            let cwd = self.resolve_under(&workspace, &spec.cwd)?;
            let cmd = process::command(spec, &cwd, &req.job_id, self.root.path());
            commands.push((spec.label.clone(), describe(spec), cmd));
        }
        let lease = match req.lease_ms {
            0 => self.config.lease_timeout,
            ms => Duration::from_millis(ms.into()).clamp(MIN_LEASE, MAX_LEASE),
        };
        let job = {
            let mut map = self.map();
            if map.len() >= crate::limits::MAX_JOBS && !map.contains_key(&req.job_id) {
                return Err(Status::resource_exhausted(format!(
                    "the agent already holds {} jobs",
                    crate::limits::MAX_JOBS
                )));
            }
            let job = match map.get(&req.job_id) {
                Some(job) => job.clone(),
                None => {
                    let job = Arc::new(Job::new(
                        req.job_id.clone(),
                        workspace.clone(),
                        self.root.path(),
                        lease,
                    ));
                    self.workspaces.claim_for_job(&workspace, &job)?;
                    map.insert(req.job_id.clone(), job.clone());
                    job
                }
            };
            if job.workspace != workspace {
                return Err(Status::failed_precondition(format!(
                    "job {} already runs in workspace {}",
                    job.id,
                    job.workspace.display()
                )));
            }
            if job.state().stopping {
                // Aborted, like a stop that lands mid-Spawn: the coordinator tells a job stopped
                // under it from one that failed to start.
                return Err(Status::aborted(format!(
                    "job {} is being stopped; start a new job",
                    job.id
                )));
            }
            job
        };
        job.renew();
        self.lease_wake.notify_one();

        // Forking and registering happen in one blocking task that runs to completion even if
        // the caller goes away mid-call: a started process is always in the job (supervised,
        // stoppable), never orphaned by a cancelled request.
        let reaper = self.reaper.clone();
        let runtime = tokio::runtime::Handle::current();
        let registering = job.clone();
        let (started, failure) = tokio::task::spawn_blocking(move || {
            let job = registering;
            let mut started = Vec::new();
            for (label, what, mut cmd) in commands {
                let reaper::Spawned {
                    mut child,
                    exit,
                    start,
                } = match reaper.spawn(&mut cmd) {
                    Ok(x) => x,
                    // Processes started before the failure stay in the job: the coordinator
                    // stops the whole job when a Spawn fails.
                    Err(e) => {
                        return (started, Some(format!("cannot start {label} ({what}): {e}")))
                    }
                };
                let pid = child.id();
                let index = job.add_process(&label, pid, start, Instant::now());
                crate::metrics::add(&crate::metrics::COUNTERS.processes_started, 1);
                let stdout = child.stdout.take().map(OwnedFd::from);
                let stderr = child.stderr.take().map(OwnedFd::from);
                runtime.spawn(supervise(job.clone(), index, exit, stdout, stderr));
                tracing::debug!(job = %job.id, index, pid, %label, "started");
                started.push(pb::ProcessStarted { index, label, pid });
            }
            (started, None)
        })
        .await
        .map_err(|e| Status::internal(format!("spawn task failed: {e}")))?;
        // Recorded before the reply: once the coordinator knows of a process, so does the disk.
        let _ = self.save_state_soon().await;
        if let Some(msg) = failure {
            return Err(Status::failed_precondition(msg));
        }
        let reply = pb::SpawnReply { processes: started };
        if job.state().stopping {
            // A Stop began while these were forked: it may have scanned before they existed.
            let (j, grace) = (job.clone(), self.config.grace);
            tokio::spawn(async move { stop_job(&j, grace, false).await });
            return Err(Status::aborted(format!(
                "job {} was stopped while its processes started",
                job.id
            )));
        }
        Ok(reply)
    }

    pub fn watch(&self, req: pb::WatchRequest) -> Result<EventStream, Status> {
        let job = self.get(&req.job_id)?;
        job.renew();
        let rx = job.subscribe();
        let state = (job, req.after_seq, rx, VecDeque::new());
        let stream =
            futures::stream::unfold(state, |(job, mut cursor, mut rx, mut pending)| async move {
                loop {
                    if let Some(ev) = pending.pop_front() {
                        return Some((Ok(ev), (job, cursor, rx, pending)));
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
            });
        Ok(Box::pin(stream))
    }

    pub fn renew(&self, req: pb::RenewRequest) -> Result<pb::RenewReply, Status> {
        match self.map().get(&req.job_id) {
            Some(job) => {
                job.renew();
                Ok(pb::RenewReply { known: true })
            }
            None => Ok(pb::RenewReply { known: false }),
        }
    }

    pub async fn stop(&self, req: pb::StopRequest) -> Result<pb::StopReply, Status> {
        let job = self.get(&req.job_id)?;
        let grace = Duration::from_millis(req.grace_ms.into()).min(MAX_GRACE);
        let was_running = stopped::announce(&job, pb::StopCause::Requested, &req.requester);
        // In a task of its own: a coordinator that gives up waiting must not cut a stop short
        // between SIGTERM and SIGKILL.
        let j = job.clone();
        let outcome = tokio::spawn(async move { stop_job(&j, grace, req.force).await })
            .await
            .map_err(|e| Status::internal(format!("stop task failed: {e}")))?;
        tracing::info!(job = %job.id, signalled = outcome.signalled, remaining = outcome.remaining, force = req.force, "job stopped on request");
        Ok(pb::StopReply {
            signalled: outcome.signalled,
            remaining: outcome.remaining,
            already_finished: !was_running && outcome.signalled == 0,
        })
    }

    pub fn list(&self) -> pb::ListJobsReply {
        let all = tree::snapshot(Path::new("/proc"));
        let mut jobs: Vec<pb::JobInfo> = self
            .all()
            .iter()
            .map(|j| {
                if j.state().clean {
                    return j.info(0);
                }
                let live = tree::members_in(&all, &j.member_query(), |pid| {
                    tree::read_environ(Path::new("/proc"), pid)
                });
                j.info(live.len() as u32)
            })
            .collect();
        jobs.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        pb::ListJobsReply { jobs }
    }

    /// Stops every job; called when the agent itself is asked to exit.
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let jobs = self.all();
        let grace = self.config.grace;
        let stops = jobs.iter().map(|j| async move {
            stopped::announce(j, pb::StopCause::AgentShutdown, "the agent shutting down");
            let outcome = stop_job(j, grace, false).await;
            if outcome.signalled > 0 {
                tracing::info!(job = %j.id, signalled = outcome.signalled, remaining = outcome.remaining, "job stopped: agent shutting down");
            }
        });
        futures::future::join_all(stops).await;
        // Anything that survived the stop stays on record for the next run to find.
        let _ = self.save_state_soon().await;
        for j in &jobs {
            j.forget();
        }
        self.map().clear();
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

/// How a command is named in error messages.
fn describe(spec: &pb::ProcessSpec) -> String {
    match &spec.command {
        Some(pb::process_spec::Command::Argv(a)) => a.args.first().cloned().unwrap_or_default(),
        Some(pb::process_spec::Command::Shell(_)) => "/bin/sh".to_string(),
        None => String::new(),
    }
}

/// Marks the job as being stopped and stops its whole tree.
async fn stop_job(job: &Arc<Job>, grace: Duration, force: bool) -> stop::StopOutcome {
    job.state().stopping = true;
    let j = job.clone();
    let outcome = stop::stop_tree(move || j.member_query(), grace, force).await;
    if outcome.remaining == 0 {
        job.state().clean = true;
    }
    outcome
}

/// Live processes of `job`, descendants included.
async fn live_members(job: &Arc<Job>) -> u32 {
    if job.state().clean {
        return 0;
    }
    let query = job.member_query();
    tokio::task::spawn_blocking(move || tree::members(Path::new("/proc"), &query).len() as u32)
        .await
        .unwrap_or(0)
}

/// Watches one process: reads its output, waits for its exit, publishes both.
async fn supervise(
    job: Arc<Job>,
    index: u32,
    exit: oneshot::Receiver<Exit>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
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
    let _ = exited_tx.send(true);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, futures::future::join_all(drained)).await;
    job.record_exit(index, exit);
}

#[cfg(test)]
mod tests;
