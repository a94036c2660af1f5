//! A process's stdout or stderr, read as lines (`lines`) into its job's log.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use dglrun_proto::pb::OutputStream;
use tokio::io::AsyncReadExt;
use tokio::sync::{oneshot, watch};

use super::job::Job;
use super::lines::{LineSplitter, Piece, MAX_LINE};

/// Reads one pipe of process `index` until EOF, adding its lines to `job`.
///
/// When `exited` turns true the process has been reaped: everything it wrote is already in the
/// pipe, so the reader drains what is there *now* (bypassing the reactor, whose readiness may
/// lag) and reports on `drained`. That drain reads at most what the pipe holds
/// ([`drain_budget`]): a grandchild that inherited the pipe may refill it as fast as it is read,
/// and the drain runs on a runtime worker. Lines go to the job's bounded log as they are read. The exit event is published after that, so a process's last
/// lines (a traceback) always precede its exit. Reading continues afterwards: a grandchild
/// that inherited the pipe may still write to it.
pub async fn read_pipe(
    fd: OwnedFd,
    stream: OutputStream,
    index: u32,
    job: Arc<Job>,
    mut exited: watch::Receiver<bool>,
    drained: oneshot::Sender<()>,
) {
    let mut drained = Some(drained);
    let mut splitter = LineSplitter::new(MAX_LINE);
    let mut pieces = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut pipe = match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(job = %job.id, index, "cannot read the process's output: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            biased;
            changed = exited.changed(), if drained.is_some() => {
                if changed.is_err() || *exited.borrow() {
                    let budget = drain_budget(pipe.as_fd());
                    let eof = drain_now(pipe.as_fd(), budget, &mut buf, &mut splitter, |pieces| {
                        job.push_lines(index, stream, pieces.drain(..));
                    });
                    pieces.extend(splitter.finish());
                    job.push_lines(index, stream, pieces.drain(..));
                    if let Some(d) = drained.take() {
                        let _ = d.send(());
                    }
                    if eof {
                        return;
                    }
                }
            }
            r = pipe.read(&mut buf) => {
                match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => splitter.push(&buf[..n], &mut pieces),
                }
                job.push_lines(index, stream, pieces.drain(..));
                // One read of a chatty process is tens of thousands of lines: let the
                // worker run other tasks (Stop, Renew, Watch) between reads, not only after
                // the runtime's budget of reads.
                tokio::task::yield_now().await;
            }
        }
    }
    pieces.extend(splitter.finish());
    job.push_lines(index, stream, pieces.drain(..));
    // Dropping `drained` unsent tells the supervisor the same: nothing more will come.
}

/// Bytes the pipe can hold (`F_GETPIPE_SZ`); the default capacity when the kernel does not say.
fn drain_budget(fd: BorrowedFd<'_>) -> usize {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETPIPE_SZ)
        .ok()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_PIPE_CAPACITY)
}

/// Linux's default pipe capacity.
const DEFAULT_PIPE_CAPACITY: usize = 64 << 10;

/// Reads what is in the (non-blocking) pipe now, at most `budget` bytes, handing the lines of
/// each read to `emit`; true at end of file.
fn drain_now(
    fd: BorrowedFd<'_>,
    budget: usize,
    buf: &mut [u8],
    splitter: &mut LineSplitter,
    mut emit: impl FnMut(&mut Vec<Piece>),
) -> bool {
    let mut pieces = Vec::new();
    let mut left = budget;
    while left > 0 {
        let want = buf.len().min(left);
        match nix::unistd::read(fd, &mut buf[..want]) {
            Ok(0) => return true,
            Ok(n) => {
                left -= n;
                splitter.push(&buf[..n], &mut pieces);
                emit(&mut pieces);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => return false,
            Err(_) => return true,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_after_an_exit_stops_at_its_budget() {
        let (r, w) = nix::unistd::pipe().unwrap();
        nix::fcntl::fcntl(
            &r,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        let capacity = drain_budget(r.as_fd());
        assert!(capacity >= 4096, "{capacity}");
        // A writer that keeps the pipe full, as `yes` in a grandchild does.
        let writer = std::thread::spawn(move || {
            let line = b"y\n".repeat(2048);
            while nix::unistd::write(&w, &line).is_ok() {}
        });
        let mut splitter = LineSplitter::new(MAX_LINE);
        let mut buf = vec![0u8; 4096];
        let mut lines = 0;
        let eof = drain_now(r.as_fd(), capacity, &mut buf, &mut splitter, |p| {
            lines += p.len();
            p.clear();
        });
        assert!(!eof);
        assert!(
            lines <= capacity / 2,
            "{lines} lines from a {capacity}-byte pipe"
        );
        drop(r);
        writer.join().unwrap();
    }
}
