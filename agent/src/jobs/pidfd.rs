//! Process file descriptors: a handle on one process that a reused pid can never redirect.
//!
//! The agent opens one for every direct child while the child cannot have been reaped yet
//! (`reaper::Reaper::spawn`), and signals its children only through it. Other processes of a
//! job are found by pid in /proc; they are signalled through a pidfd opened afterwards and
//! checked against the start time the scan read, so a pid that was reused in between is
//! never signalled.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use nix::libc;
use nix::sys::signal::Signal;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags};

use super::proc_stat::start_time;

#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    /// A pidfd for `pid`; `ESRCH` when it is gone, `ENOSYS` before Linux 5.3.
    pub fn open(pid: i32) -> io::Result<Self> {
        // Not a process id (0 or negative would name a group): nothing to open.
        let pid =
            Pid::from_raw(pid.max(0)).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(Self(pidfd_open(pid, PidfdFlags::empty())?))
    }

    /// Sends `sig`; an error (ESRCH) once the process has been reaped.
    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        let sig = rustix::process::Signal::from_named_raw(sig as i32)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(pidfd_send_signal(&self.0, sig)?)
    }

    /// True once the process has terminated (a zombie or reaped): a pidfd polls readable then.
    pub fn has_exited(&self) -> bool {
        let mut fds = [PollFd::new(&self.0, PollFlags::IN)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        matches!(poll(&mut fds, Some(&now)), Ok(n) if n > 0)
            && fds[0].revents().intersects(PollFlags::IN | PollFlags::HUP)
    }
}

/// Sends `sig` to `pid` only if it is still the process that started at `start` (clock ticks
/// after boot, see `proc_stat::ProcEntry::start`). False when it is gone or is another process.
pub fn signal_exact(pid: i32, start: u64, sig: Signal) -> bool {
    let proc_root = Path::new("/proc");
    match PidFd::open(pid) {
        // The pidfd pins the process: if the start time still matches now, it is the one we
        // mean, and a signal through the pidfd cannot reach anything else.
        Ok(fd) => start_time(proc_root, pid) == Some(start) && fd.signal(sig).is_ok(),
        // Kernels before 5.3: check, then signal (a reuse in between is vanishingly unlikely).
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            start_time(proc_root, pid) == Some(start)
                && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).is_ok()
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfd_signals_its_process_and_sees_it_exit() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = PidFd::open(child.id() as i32).unwrap();
        assert!(!fd.has_exited());
        fd.signal(Signal::SIGKILL).unwrap();
        for _ in 0..500 {
            if fd.has_exited() {
                break;
            }
            #[allow(clippy::disallowed_methods)] // a test
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert!(fd.has_exited());
        let _ = child.wait();
    }
}
