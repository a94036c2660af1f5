//! The only code in the agent that waits for children.
//!
//! The agent is a child subreaper, so besides its direct children it inherits every orphaned
//! descendant of a job (torchrun workers, samplers, daemons). All of them must be reaped, so
//! one thread waits for any child (`waitid(P_ALL)`) and hands the exit status of the
//! processes the agent spawned to whoever registered them; adopted orphans are just reaped.
//! Nothing else in the agent may wait for children (no `tokio::process`, no
//! `Command::output`): the reaper would steal their exit status.
//!
//! Races: a child can exit before its pid is registered, and `std::process::Command::spawn`
//! itself waits for a child whose exec failed. Both are closed by one lock: spawning happens
//! with the registry locked, and the reaper only reaps with the registry locked. The reaper
//! first waits *without reaping* (`WNOWAIT`), so it never blocks while holding the lock.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Arc, OnceLock};

use parking_lot::{Condvar, Mutex};
use std::time::Duration;

use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

use super::pidfd::PidFd;

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// A process the reaper forked through `fork_into`.
pub struct SpawnedForked {
    pub child: super::fork_into::Child,
    pub exit: oneshot::Receiver<Exit>,
    pub start: Option<u64>,
    pub pidfd: Option<PidFd>,
}

/// A process the reaper started.
pub struct Spawned {
    pub child: Child,
    /// Its exit status, once reaped.
    pub exit: oneshot::Receiver<Exit>,
    /// Its start time (see `proc_stat::ProcEntry::start`), recorded so a later run of the agent
    /// never mistakes a process that reused the pid for this one.
    pub start: Option<u64>,
    /// A pidfd for it, opened before it could be reaped; None only on kernels before 5.3.
    pub pidfd: Option<PidFd>,
}

#[derive(Default)]
struct Registry {
    waiting: HashMap<i32, oneshot::Sender<Exit>>,
}

pub struct Reaper {
    registry: Mutex<Registry>,
    /// Wakes the reaper thread when it slept for lack of children.
    spawned: Condvar,
}

static REAPER: OnceLock<Arc<Reaper>> = OnceLock::new();

impl Reaper {
    /// The process-wide reaper (waiting for "any child" is process-wide, so there is one).
    /// The first call makes this process a child subreaper and starts the thread.
    pub fn get() -> anyhow::Result<Arc<Reaper>> {
        if let Some(r) = REAPER.get() {
            return Ok(r.clone());
        }
        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|e| anyhow::anyhow!("cannot become a child subreaper: {e}"))?;
        // A parent may have left SIGCHLD ignored, which makes the kernel discard exit statuses.
        // SAFETY: restoring the default disposition installs no handler code.
        unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGCHLD,
                nix::sys::signal::SigHandler::SigDfl,
            )
        }
        .map_err(|e| anyhow::anyhow!("cannot reset SIGCHLD: {e}"))?;
        let reaper = REAPER
            .get_or_init(|| {
                let r = Arc::new(Reaper {
                    registry: Mutex::new(Registry::default()),
                    spawned: Condvar::new(),
                });
                let thread_ref = r.clone();
                let started = std::thread::Builder::new()
                    .name("dgl-agent-reaper".into())
                    .spawn(move || thread_ref.run());
                if let Err(e) = started {
                    tracing::error!("cannot start the reaper thread: {e}");
                }
                r
            })
            .clone();
        Ok(reaper)
    }

    /// Spawns `cmd` and registers it; its exit status arrives on the returned receiver.
    /// Blocking (fork/exec): call from a blocking context.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<Spawned> {
        let reg = self.lock();
        let child = cmd.spawn()?;
        let (exit, start, pidfd) = self.register(reg, child.id() as i32)?;
        Ok(Spawned {
            child,
            exit,
            start,
            pidfd,
        })
    }

    /// As [`spawn`](Self::spawn), for a child that `fork` starts by other means than
    /// `Command` (see `fork_into`), under the same lock.
    pub fn spawn_forked(
        &self,
        fork: impl FnOnce() -> Result<super::fork_into::Child, super::fork_into::ForkError>,
    ) -> Result<SpawnedForked, super::fork_into::ForkError> {
        let reg = self.lock();
        let child = fork()?;
        let (exit, start, pidfd) = self.register(reg, child.pid)?;
        Ok(SpawnedForked {
            child,
            exit,
            start,
            pidfd,
        })
    }

    /// Registers the new child `pid` and unlocks the registry: its exit receiver, its start
    /// time and its pidfd. A child no pidfd could be opened for is killed (not stoppable
    /// safely), and reaped like an adopted orphan.
    fn register(
        &self,
        mut reg: parking_lot::MutexGuard<'_, Registry>,
        pid: i32,
    ) -> std::io::Result<(oneshot::Receiver<Exit>, Option<u64>, Option<PidFd>)> {
        // Read while the registry is locked: the child cannot be reaped yet, so its pid cannot
        // have been reused by another process (a zombie still has its start time).
        let start = super::proc_stat::start_time(std::path::Path::new("/proc"), pid);
        let pidfd = match PidFd::open(pid) {
            Ok(fd) => Some(fd),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSYS) => None,
            Err(e) => {
                // Not reaped yet, so the pid is still the child's own.
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::SIGKILL);
                drop(reg);
                self.spawned.notify_one();
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("cannot open a pidfd for the new process: {e}"),
                ));
            }
        };
        let (tx, rx) = oneshot::channel();
        reg.waiting.insert(pid, tx);
        drop(reg);
        self.spawned.notify_one();
        Ok((rx, start, pidfd))
    }

    /// Sends `sigs` to process group `pgid` only while its leader is a child this agent
    /// spawned and has not reaped: until then the leader's pid, and with it the group id,
    /// cannot be reused, so the signals reach that group and no other. Under the registry
    /// lock, which the reaper holds to reap. False when nothing was sent.
    pub fn signal_unreaped_group(&self, pgid: i32, sigs: &[nix::sys::signal::Signal]) -> bool {
        let reg = self.lock();
        if !reg.waiting.contains_key(&pgid) {
            return false;
        }
        for sig in sigs {
            let _ = nix::sys::signal::killpg(Pid::from_raw(pgid), *sig);
        }
        true
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Registry> {
        // A panic elsewhere while holding the lock leaves a usable map; keep going.
        self.registry.lock()
    }

    fn run(&self) {
        loop {
            match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(_) => self.reap_all(),
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::ECHILD) => self.sleep_until_spawned(),
                Err(e) => {
                    tracing::error!("waitid failed: {e}");
                    // the reaper's own thread, not a runtime worker
                    #[allow(clippy::disallowed_methods)]
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Sleeps while the agent has no children at all, without polling: an idle agent costs
    /// no CPU. Children only come from `spawn` (orphans are adopted only from descendants),
    /// which forks with the registry locked; so "no children" checked under the lock stays
    /// true until the condvar releases it, and the spawn's notification cannot be missed.
    fn sleep_until_spawned(&self) {
        let mut reg = self.lock();
        loop {
            let none = matches!(
                waitid(
                    Id::All,
                    WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG,
                ),
                Err(nix::errno::Errno::ECHILD)
            );
            if !none {
                return;
            }
            self.spawned.wait(&mut reg);
        }
    }

    /// Reaps every child that has exited, delivering statuses of registered ones.
    fn reap_all(&self) {
        loop {
            let mut reg = self.lock();
            let (pid, exit) = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return,
                Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => continue,
                Err(e) => {
                    tracing::error!("waitpid failed: {e}");
                    return;
                }
            };
            if let Some(tx) = reg.waiting.remove(&pid.as_raw()) {
                let _ = tx.send(exit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_and_signals_are_delivered() {
        let r = Reaper::get().unwrap();
        let s = r.spawn(Command::new("sh").args(["-c", "exit 7"])).unwrap();
        assert!(s.start.is_some());
        assert_eq!(s.exit.blocking_recv().unwrap(), Exit::Code(7));
        let s = r
            .spawn(Command::new("sh").args(["-c", "kill -9 $$"]))
            .unwrap();
        assert_eq!(s.exit.blocking_recv().unwrap(), Exit::Signal(9));
        // Instant exits, many at once: none may be lost to the registration race.
        let rxs: Vec<_> = (0..50)
            .map(|_| r.spawn(&mut Command::new("true")).unwrap().exit)
            .collect();
        for rx in rxs {
            assert_eq!(rx.blocking_recv().unwrap(), Exit::Code(0));
        }
    }

    #[test]
    fn a_group_is_signalled_only_while_its_leader_is_unreaped() {
        use std::os::unix::process::CommandExt;
        let r = Reaper::get().unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("60").process_group(0);
        let s = r.spawn(&mut cmd).unwrap();
        let pgid = s.child.id() as i32;
        let none: &[nix::sys::signal::Signal] = &[];
        assert!(r.signal_unreaped_group(pgid, none));
        assert!(r.signal_unreaped_group(pgid, &[nix::sys::signal::Signal::SIGKILL]));
        assert_eq!(s.exit.blocking_recv().unwrap(), Exit::Signal(9));
        // Reaped: the group id may now belong to anyone.
        assert!(!r.signal_unreaped_group(pgid, &[nix::sys::signal::Signal::SIGKILL]));
    }

    #[test]
    fn a_failed_exec_is_an_error_not_a_panic() {
        let r = Reaper::get().unwrap();
        for _ in 0..20 {
            assert!(r
                .spawn(&mut Command::new("/nonexistent/dglrun-test"))
                .is_err());
        }
    }
}
