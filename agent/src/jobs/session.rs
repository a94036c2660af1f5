//! Sessions: one command run the way ssh runs it, as a job of its own.
//!
//! The command is `/bin/sh -c COMMAND` in the agent's root, forked like a launch's processes
//! (own process group, the job's cgroup and markers, reaped by the reaper), so stop, lease and
//! restart clean-up apply unchanged. What differs is the plumbing: stdin is a pipe fed from
//! the stream, and stdout and stderr go back as bytes instead of into the job's line log.
//!
//! Nothing queues without bound. An output reader waits for room in the outgoing channel
//! (a few messages), so a slow client leaves the command blocked on a full pipe; the next
//! stdin message is read off the stream only when the last one is written to the pipe, so a
//! command that does not read its stdin holds the client back through HTTP/2 flow control.
//!
//! A session ends when its command exits: the pipes are drained (until end of file, or until
//! they stay silent for [`DRAIN_IDLE`] after the exit), whatever the command left running is
//! stopped, and the exit goes out last. When the stream ends first (the client killed, the
//! link lost: the server's keepalive then closes the connection), the whole tree is stopped.
//! Either way the job is forgotten at once.

use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dglrun_proto::pb::{self, session_input, session_output};
use futures::{Stream, StreamExt};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

use super::fork_into::{self, ForkError};
use super::job::Job;
use super::reaper::{Exit, Reaper};
use super::spec::{self, InvalidRequest, JobId, ProcessProblem, ProcessSpec};
use super::{cgroup, error_chain, process, slots, stop_job, stopped, JobError, Jobs};
use crate::limits::{MAX_ARGV_BYTES, MAX_JOBS, MAX_SESSIONS};

/// The session's output as the gRPC stream sends it.
pub type OutputStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<pb::SessionOutput, Status>> + Send>>;

/// Output messages held for a slow client, per session (each at most [`READ_SIZE`] bytes).
const OUTPUT_MESSAGES: usize = 8;
const READ_SIZE: usize = 64 << 10;
/// After the command exited, a pipe that stays silent this long is no longer waited for (a
/// background process may hold it open forever; it is stopped next).
pub const DRAIN_IDLE: Duration = Duration::from_secs(2);
/// Silence from a client that ends its session, however short the agent's lease: three of
/// the client's 2 s keepalives.
const MIN_SILENCE: Duration = Duration::from_secs(6);
/// The label of a session's process in ListJobs.
const LABEL: &str = "rsh";

/// A SessionStart within the agent's bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionSpec {
    pub command: String,
    pub requester: String,
}

impl TryFrom<pb::SessionStart> for SessionSpec {
    type Error = InvalidRequest;

    fn try_from(s: pb::SessionStart) -> Result<Self, InvalidRequest> {
        let problem = if s.command.trim().is_empty() {
            Some(ProcessProblem::BlankShell)
        } else if s.command.len() + 1 > MAX_ARGV_BYTES {
            Some(ProcessProblem::CommandTooLarge(s.command.len() + 1))
        } else if s.command.contains('\0') {
            Some(ProcessProblem::Nul)
        } else {
            None
        };
        match problem {
            Some(p) => Err(InvalidRequest::Session(p)),
            None => Ok(Self {
                command: s.command,
                requester: stopped::printable(&s.requester),
            }),
        }
    }
}

/// The signals a client may forward: those ssh users send to a remote command.
pub fn forwardable(n: i32) -> Option<Signal> {
    let sig = Signal::try_from(n).ok()?;
    matches!(
        sig,
        Signal::SIGINT | Signal::SIGTERM | Signal::SIGHUP | Signal::SIGQUIT
    )
    .then_some(sig)
}

/// Numbers sessions within this run of the agent; the pid tells runs apart.
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// The forked command and what supervising it needs.
struct Forked {
    index: u32,
    pid: u32,
    exit: oneshot::Receiver<Exit>,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

/// What a running session holds against the agent's bounds: a session and a process.
type SessionSlots = (slots::Slots, slots::Slots);

impl Jobs {
    /// Starts `spec` as a session job fed by `input`; its output is the returned stream.
    pub async fn session<S>(
        self: &Arc<Self>,
        spec: SessionSpec,
        input: S,
    ) -> Result<OutputStream, JobError>
    where
        S: Stream<Item = Result<pb::SessionInput, Status>> + Send + Unpin + 'static,
    {
        let slots = self.session_slots()?;
        let (job, cmd, cwd) = self.session_job(&spec)?;
        let (j, cgroups, reaper) = (job.clone(), self.cgroups.clone(), self.reaper.clone());
        let forked = tokio::task::spawn_blocking(move || fork(&j, cmd, cwd, cgroups, &reaper))
            .await
            .map_err(|e| JobError::Task("session", e))
            .and_then(|r| r);
        let forked = match forked {
            Ok(f) => f,
            Err(e) => {
                self.remove(job.id.as_str());
                return Err(e);
            }
        };
        // Not waited for: the command already runs, and after a crash the marker scan finds it
        // without the record; a write on the way to the first byte would slow every rsh.
        drop(self.save_state_soon());
        tracing::info!(job = %job.id, pid = forked.pid, requester = %spec.requester, "session started");
        let (tx, rx) = mpsc::channel(OUTPUT_MESSAGES);
        let started = session_output::Msg::Started(pb::SessionStarted {
            job_id: job.id.to_string(),
            pid: forked.pid,
        });
        // The channel is new and has room: this cannot fail.
        let _ = tx.try_send(Ok(pb::SessionOutput { msg: Some(started) }));
        let run = Run {
            jobs: self.clone(),
            job,
            tx,
            slots,
        };
        tokio::spawn(run.supervise(forked, input));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    /// A session and a process off the agent's bounds, or the error naming the bound.
    fn session_slots(&self) -> Result<SessionSlots, JobError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(JobError::ShuttingDown);
        }
        let session_slot = self.sessions.take(1).ok_or(JobError::TooManySessions {
            limit: self.sessions.limit(),
        })?;
        let process_slot = self
            .processes
            .take(1)
            .ok_or_else(|| JobError::TooManyProcesses {
                running: self.processes.used(),
                asked: 1,
                limit: self.processes.limit(),
            })?;
        Ok((session_slot, process_slot))
    }

    /// The session's job, registered (sessions take no workspace lease: ssh holds none, and
    /// they have their own bound), its command and a copy of its working directory's fd.
    fn session_job(
        self: &Arc<Self>,
        spec: &SessionSpec,
    ) -> Result<(Arc<Job>, std::process::Command, OwnedFd), JobError> {
        let id = JobId::session(NEXT_SESSION.fetch_add(1, Ordering::Relaxed));
        let cwd = self.root.open_workdir(".")?;
        let cwd_fd = cwd.fd.try_clone().map_err(start_error)?;
        let process = ProcessSpec {
            label: LABEL.to_string(),
            role: "session".to_string(),
            command: spec::Command::Shell(spec.command.clone()),
            env: Vec::new(),
            cwd: String::new(),
        };
        let mut cmd = process::command(&process, cwd, &id, self.root.path());
        cmd.stdin(Stdio::piped());
        let job = Arc::new(Job::new(
            id.clone(),
            self.root.path().to_path_buf(),
            self.root.path(),
            self.config.lease_timeout,
            self.limits.watches_per_job,
        ));
        {
            let mut map = self.map();
            if map.len() >= MAX_JOBS + MAX_SESSIONS {
                return Err(JobError::TooManyJobs(MAX_JOBS));
            }
            map.insert(id, job.clone());
        }
        self.lease_wake.notify_one();
        Ok((job, cmd, cwd_fd))
    }
}

/// Forks the command into `job` (blocking: fork and exec): straight into the job's cgroup
/// where the kernel allows it (see `fork_into`), else as `cmd` says, the child moving itself
/// into the cgroup before its exec.
fn fork(
    job: &Arc<Job>,
    cmd: std::process::Command,
    cwd: OwnedFd,
    cgroups: Option<Arc<cgroup::Cgroups>>,
    reaper: &Reaper,
) -> Result<Forked, JobError> {
    let cgroup = cgroups
        .as_ref()
        .map(|c| job.cgroup_in(c))
        .transpose()
        .map_err(|source| JobError::Cgroup {
            job: job.id.clone(),
            source,
        })?;
    let plan = cgroup.as_ref().and_then(|_| fork_into::Plan::of(&cmd));
    if let (Some(cg), Some(plan)) = (&cgroup, plan) {
        let forked = reaper.spawn_forked(|| fork_into::spawn(&plan, cwd.as_fd(), cg.dir_fd()));
        match forked {
            Ok(s) => {
                let c = s.child;
                let pid = c.pid as u32;
                return Ok(added(
                    job,
                    pid,
                    s.start,
                    s.pidfd,
                    s.exit,
                    [c.stdin, c.stdout, c.stderr].map(Some),
                ));
            }
            Err(ForkError::Unsupported(e)) => {
                tracing::debug!(job = %job.id, "{e}; the child enters its cgroup itself");
            }
            Err(ForkError::Failed(source)) => return Err(start_error(source)),
        }
    }
    spawn_command(job, cmd, cgroup.as_deref(), reaper)
}

/// `cmd` spawned as std does it, entering `cgroup` between fork and exec.
fn spawn_command(
    job: &Arc<Job>,
    mut cmd: std::process::Command,
    cgroup: Option<&cgroup::JobCgroup>,
    reaper: &Reaper,
) -> Result<Forked, JobError> {
    use std::os::unix::process::CommandExt;
    if let Some(cg) = cgroup {
        let fd = cg.procs_fd();
        // SAFETY: `enter` only calls write(2) on a descriptor the job's cgroup keeps open for
        // the job's life; it allocates nothing (async-signal-safe).
        unsafe { cmd.pre_exec(move || cgroup::enter(fd)) };
    }
    let spawned = reaper.spawn(&mut cmd).map_err(start_error)?;
    let mut child = spawned.child;
    let stdio = [
        child.stdin.take().map(OwnedFd::from),
        child.stdout.take().map(OwnedFd::from),
        child.stderr.take().map(OwnedFd::from),
    ];
    Ok(added(
        job,
        child.id(),
        spawned.start,
        spawned.pidfd,
        spawned.exit,
        stdio,
    ))
}

fn start_error(source: std::io::Error) -> JobError {
    JobError::Start {
        label: LABEL.to_string(),
        what: "/bin/sh".to_string(),
        source,
    }
}

/// The forked command, added to `job`.
fn added(
    job: &Job,
    pid: u32,
    start: Option<u64>,
    pidfd: Option<super::pidfd::PidFd>,
    exit: oneshot::Receiver<Exit>,
    [stdin, stdout, stderr]: [Option<OwnedFd>; 3],
) -> Forked {
    let index = job.add_process(LABEL, pid, start, pidfd, Instant::now());
    crate::metrics::add(&crate::metrics::COUNTERS.processes_started, 1);
    Forked {
        index,
        pid,
        exit,
        stdin,
        stdout,
        stderr,
    }
}

/// How the input side ended.
enum InputEnd {
    /// The client closed its side: no more stdin, the session goes on.
    Closed,
    /// The stream broke: the client is gone.
    Broken(String),
}

/// How a session ended.
enum Ended {
    Exited(Exit),
    ClientGone(String),
}

type OutputSender = mpsc::Sender<Result<pb::SessionOutput, Status>>;

struct Run {
    jobs: Arc<Jobs>,
    job: Arc<Job>,
    tx: OutputSender,
    /// Given back when the session is over.
    slots: SessionSlots,
}

/// The tasks moving the command's bytes: its output readers and its stdin feeder.
struct Pumps {
    readers: Vec<tokio::task::JoinHandle<()>>,
    /// Tells the readers the command exited (they then stop at the first silence).
    exited: watch::Sender<bool>,
    feeder: tokio::task::JoinHandle<InputEnd>,
    /// Since when the feeder has waited for the client's next message.
    heard: watch::Receiver<Option<Instant>>,
}

impl Run {
    async fn supervise<S>(self, forked: Forked, input: S)
    where
        S: Stream<Item = Result<pb::SessionInput, Status>> + Send + Unpin + 'static,
    {
        let Forked {
            index,
            pid,
            mut exit,
            stdin,
            stdout,
            stderr,
        } = forked;
        let mut pumps = self.start_pumps(input, stdin, stdout, stderr, pid);
        let ended = self.wait_for_end(&mut exit, &mut pumps).await;
        pumps.feeder.abort();
        let reported = match ended {
            Ended::Exited(code) => Some(self.drain_and_record(index, code, pumps).await),
            Ended::ClientGone(why) => {
                tracing::info!(job = %self.job.id, "session ended before its command: {why}; stopping it");
                stopped::announce(
                    &self.job,
                    pb::StopCause::Requested,
                    "the session's client going away",
                );
                None
            }
        };
        // Whatever the command left running goes with the session, before the exit is
        // reported: once rsh returns, nothing of it runs on.
        let grace = self.jobs.config.grace;
        let stopped = stop_job(&self.job, grace, false).await;
        if let Some(exit) = reported {
            let exit = session_output::Msg::Exit(exit);
            let _ = self
                .tx
                .send(Ok(pb::SessionOutput { msg: Some(exit) }))
                .await;
        } else {
            // The reaper has the exit by now or soon; the job is dropped either way.
            let _ = tokio::time::timeout(grace, &mut exit).await;
        }
        drop(self.tx);
        forget(&self.jobs, &self.job, stopped);
        drop(self.slots);
    }

    /// Starts forwarding the command's stdout and stderr to the client and the client's
    /// stdin and signals to the command.
    fn start_pumps<S>(
        &self,
        input: S,
        stdin: Option<OwnedFd>,
        stdout: Option<OwnedFd>,
        stderr: Option<OwnedFd>,
        pid: u32,
    ) -> Pumps
    where
        S: Stream<Item = Result<pb::SessionInput, Status>> + Send + Unpin + 'static,
    {
        let (exited, exited_rx) = watch::channel(false);
        let mut readers = Vec::new();
        for (fd, stdout) in [(stdout, true), (stderr, false)] {
            if let Some(fd) = fd {
                let (tx, rx) = (self.tx.clone(), exited_rx.clone());
                readers.push(tokio::spawn(forward_output(fd, stdout, tx, rx)));
            }
        }
        let reaper = self.jobs.reaper.clone();
        let (heard_tx, heard) = watch::channel(Some(Instant::now()));
        let feeder = tokio::spawn(feed_input(input, stdin, pid, reaper, heard_tx));
        Pumps {
            readers,
            exited,
            feeder,
            heard,
        }
    }

    /// Until the command exits or its client is gone, renewing the job's lease meanwhile.
    async fn wait_for_end(&self, exit: &mut oneshot::Receiver<Exit>, pumps: &mut Pumps) -> Ended {
        let mut input_open = true;
        let lease = self.job.state().lease;
        let mut renew = tokio::time::interval(lease / 4);
        loop {
            tokio::select! {
                e = &mut *exit => return Ended::Exited(e.unwrap_or(Exit::Code(-1))),
                r = &mut pumps.feeder, if input_open => {
                    input_open = false;
                    if let Ok(InputEnd::Broken(why)) = r {
                        return Ended::ClientGone(why);
                    }
                }
                _ = self.tx.closed() => return Ended::ClientGone("the client went away".into()),
                _ = renew.tick() => {
                    // A client sends a keepalive every 2 s: silence for the lease means its
                    // link is gone, long before HTTP/2's keepalive would say so. (Once it
                    // closed its side, and while its stdin waits for the pipe, only the
                    // connection's keepalive can tell.)
                    let silent = *pumps.heard.borrow();
                    let bound = lease.max(MIN_SILENCE);
                    if let Some(since) = silent.filter(|s| input_open && s.elapsed() > bound) {
                        return Ended::ClientGone(format!(
                            "nothing from the client for {:.1} s",
                            since.elapsed().as_secs_f64()
                        ));
                    }
                    self.job.renew();
                }
            }
        }
    }

    /// After the command's exit: its output read to the end (or the first silence), the exit
    /// recorded; the exit as the client gets it.
    async fn drain_and_record(&self, index: u32, code: Exit, pumps: Pumps) -> pb::SessionExit {
        self.job.mark_reaped(index);
        let _ = pumps.exited.send(true);
        for r in pumps.readers {
            let _ = r.await;
        }
        self.job.record_exit(index, code);
        let (code, signal) = match code {
            Exit::Code(c) => (c, 0),
            Exit::Signal(s) => (-1, s),
        };
        pb::SessionExit { code, signal }
    }
}

/// Drops the session's job once its stop found nothing left; otherwise it stays, stopping,
/// and the lease monitor retries the stop.
fn forget(
    jobs: &Jobs,
    job: &Job,
    stopped: Result<super::stop::StopOutcome, super::tree::ScanError>,
) {
    match stopped {
        Ok(outcome) if outcome.remaining == 0 => {
            if outcome.signalled > 0 {
                tracing::info!(job = %job.id, signalled = outcome.signalled, "session's processes stopped");
            }
            jobs.remove(job.id.as_str());
        }
        Ok(outcome) => {
            tracing::warn!(job = %job.id, remaining = outcome.remaining, "processes of the session survived the stop")
        }
        Err(e) => {
            tracing::error!(job = %job.id, "cannot stop the session's processes: {}", error_chain(&e))
        }
    }
}

/// Sends one pipe's bytes to the client until end of file (or, once the command exited, until
/// the pipe stays silent for [`DRAIN_IDLE`]).
async fn forward_output(
    fd: OwnedFd,
    stdout: bool,
    tx: OutputSender,
    mut exited: watch::Receiver<bool>,
) {
    let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut buf = vec![0u8; READ_SIZE];
    let mut after_exit = false;
    loop {
        let read = pipe.read(&mut buf);
        let r = if after_exit {
            match tokio::time::timeout(DRAIN_IDLE, read).await {
                Ok(r) => r,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                r = read => r,
                _ = exited.wait_for(|e| *e) => {
                    after_exit = true;
                    continue;
                }
            }
        };
        let n = match r {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let data = buf[..n].to_vec().into();
        let msg = if stdout {
            session_output::Msg::Stdout(data)
        } else {
            session_output::Msg::Stderr(data)
        };
        if tx
            .send(Ok(pb::SessionOutput { msg: Some(msg) }))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Writes the client's stdin to the command and forwards its signals. `heard` holds since when
/// it has been waiting for the client's next message (None while it writes to the pipe).
async fn feed_input<S>(
    mut input: S,
    stdin: Option<OwnedFd>,
    pid: u32,
    reaper: Arc<Reaper>,
    heard: watch::Sender<Option<Instant>>,
) -> InputEnd
where
    S: Stream<Item = Result<pb::SessionInput, Status>> + Send + Unpin,
{
    let mut writer = stdin.and_then(|fd| tokio::net::unix::pipe::Sender::from_owned_fd(fd).ok());
    loop {
        let msg = match input.next().await {
            None => return InputEnd::Closed,
            Some(Err(s)) => return InputEnd::Broken(s.message().to_string()),
            Some(Ok(m)) => m.msg,
        };
        heard.send_replace(None);
        match msg {
            Some(session_input::Msg::Stdin(data)) => {
                if let Some(w) = writer.as_mut() {
                    // A command that closed its stdin gets no more, as with ssh.
                    if w.write_all(&data).await.is_err() {
                        writer = None;
                    }
                }
            }
            Some(session_input::Msg::StdinEof(_)) => writer = None,
            Some(session_input::Msg::Signal(n)) => match forwardable(n) {
                // The command leads its own process group; signalled only while unreaped, so
                // a reused group id is never hit.
                Some(sig) => {
                    reaper.signal_unreaped_group(pid as i32, &[sig]);
                }
                None => tracing::warn!(
                    signal = n,
                    "a session client asked for a signal that is not forwarded"
                ),
            },
            Some(session_input::Msg::Start(_) | session_input::Msg::Keepalive(_)) | None => {}
        }
        heard.send_replace(Some(Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(command: &str) -> pb::SessionStart {
        pb::SessionStart {
            command: command.to_string(),
            requester: "t\x1b".to_string(),
        }
    }

    #[test]
    fn a_session_command_is_bounded_and_the_requester_printable() {
        let ok = SessionSpec::try_from(start("echo hi")).unwrap();
        assert_eq!(
            (ok.command.as_str(), ok.requester.as_str()),
            ("echo hi", "t?")
        );
        for (bad, want) in [
            (" \n".to_string(), ProcessProblem::BlankShell),
            ("a\0b".to_string(), ProcessProblem::Nul),
            (
                "x".repeat(MAX_ARGV_BYTES),
                ProcessProblem::CommandTooLarge(MAX_ARGV_BYTES + 1),
            ),
        ] {
            assert_eq!(
                SessionSpec::try_from(start(&bad)),
                Err(InvalidRequest::Session(want))
            );
        }
    }

    #[test]
    fn only_the_signals_ssh_users_send_are_forwarded() {
        assert_eq!(forwardable(libc_sig(Signal::SIGINT)), Some(Signal::SIGINT));
        assert_eq!(forwardable(libc_sig(Signal::SIGHUP)), Some(Signal::SIGHUP));
        assert_eq!(forwardable(libc_sig(Signal::SIGKILL)), None);
        assert_eq!(forwardable(libc_sig(Signal::SIGSTOP)), None);
        assert_eq!(forwardable(0), None);
        assert_eq!(forwardable(999), None);
    }

    fn libc_sig(s: Signal) -> i32 {
        s as i32
    }
}
