//! Running a command to completion (or to a timeout) and keeping what it printed.

use std::io::{BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A finished command: its status, its output, how long it took.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    /// Every stdout line as JSON; panics naming a line that is not.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}\n{self:?}"))
            })
            .collect()
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?} after {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Reads a pipe to its end on a thread of its own.
pub fn reader<R: Read + Send + 'static>(r: R) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(r).read_to_string(&mut s);
        s
    })
}

/// The child's status once it exits, or None after `timeout`.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Runs to completion; a run that hangs is killed and fails the test with its output.
///
/// The command leads a process group of its own, so that a hang kills everything it started,
/// and its output is read for at most a few seconds after it ends: a leftover grandchild that
/// holds the pipes open fails the test instead of hanging it.
pub fn run(mut cmd: Command, timeout: Duration) -> Run {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start the command");
    let out = Capture::start(child.stdout.take().expect("stdout"));
    let err = Capture::start(child.stderr.take().expect("stderr"));
    let status = wait_with_timeout(&mut child, timeout);
    let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
    let status_now = status.unwrap_or_else(|| {
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        child.wait().expect("wait")
    });
    let grace = Instant::now() + Duration::from_secs(10);
    let (stdout, out_closed) = out.finish(grace);
    let (stderr, err_closed) = err.finish(grace);
    let r = Run {
        status: status_now,
        stdout,
        stderr,
        elapsed: start.elapsed(),
    };
    if status.is_none() {
        panic!("did not finish in {timeout:?}: {r:?}");
    }
    if !(out_closed && err_closed) {
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        panic!("exited, but something it started still holds its output open: {r:?}");
    }
    r
}

/// A pipe read on a thread of its own into a buffer that can be taken at any time.
struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    closed: mpsc::Receiver<()>,
}

impl Capture {
    fn start<R: Read + Send + 'static>(mut r: R) -> Capture {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let (tx, closed) = mpsc::channel();
        let sink = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n @ 1..) = r.read(&mut chunk) {
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&chunk[..n]);
            }
            let _ = tx.send(());
        });
        Capture { buf, closed }
    }

    /// What was read by `deadline`, and whether the pipe had closed by then.
    fn finish(self, deadline: Instant) -> (String, bool) {
        let left = deadline.saturating_duration_since(Instant::now());
        let closed = self.closed.recv_timeout(left).is_ok();
        let bytes = self.buf.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (String::from_utf8_lossy(&bytes).into_owned(), closed)
    }
}
