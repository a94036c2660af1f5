//! Where everything a launch reports goes: labelled text on the terminal, or (`--json`) one
//! JSON event per line on stdout; and with `--log-dir`, files as well. The driver reports
//! every start, line, exit and message here and never prints itself.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use std::time::Instant;

use dglrun_proto::pb::{OutputStream, ProcessExited};

use super::events::{self, Event, ExitInfo, Summary, Who};
use super::logdir::LogDir;
use super::output::{format_line, note, print_line};
use super::torchrun_failure;

pub struct Sink {
    json: bool,
    started: Instant,
    log: Option<LogDir>,
    /// The agents' port: JSON names a machine's agent `IP:port`, as `status --json` does.
    agent_port: Option<u16>,
    /// Each machine's torchrun stderr, read for its report of the failed rank.
    torchruns: BTreeMap<usize, torchrun_failure::Reader>,
    /// Set when the job failed through a torchrun whose failed rank's own code is known.
    rank_exit: Arc<OnceLock<u8>>,
    /// Where a driver without a terminal (an agent supervising a detached job) keeps what an
    /// attached launch would print on stderr; nothing then goes to stdout or stderr.
    capture: Option<Arc<Mutex<Captured>>>,
}

/// What a captured sink kept: dgl-coord's notes and the end (the table), as one text.
#[derive(Clone, Debug, Default)]
pub struct Captured {
    pub text: String,
    pub outcome: Option<events::Outcome>,
}

/// Writes one line to stdout; a closed pipe is ignored (the job goes on).
fn stdout_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

impl Sink {
    pub fn new(json: bool, started: Instant, log: Option<LogDir>) -> Self {
        Self {
            json,
            started,
            log,
            agent_port: None,
            torchruns: BTreeMap::new(),
            rank_exit: Arc::new(OnceLock::new()),
            capture: None,
        }
    }

    /// A sink that prints nothing and keeps the notes and the end in the returned buffer.
    pub fn captured(started: Instant) -> (Self, Arc<Mutex<Captured>>) {
        let buf = Arc::new(Mutex::new(Captured::default()));
        let mut sink = Self::new(false, started, None);
        sink.capture = Some(buf.clone());
        (sink, buf)
    }

    fn keep(&self, text: &str) -> bool {
        let Some(c) = &self.capture else { return false };
        c.lock().text.push_str(text);
        true
    }

    /// Where the summary leaves the failed rank's own exit code when torchrun hid it.
    pub fn rank_exit_code(&self) -> Arc<OnceLock<u8>> {
        self.rank_exit.clone()
    }

    /// Events name each machine's agent as `IP:port`, with this port.
    pub fn with_agent_port(mut self, port: u16) -> Self {
        self.agent_port = Some(port);
        self
    }

    fn address(&self, ip: &str) -> String {
        match self.agent_port {
            Some(port) if !ip.is_empty() => format!("{ip}:{port}"),
            _ => ip.to_string(),
        }
    }

    /// `who` as events show it: `host` is the agent's address.
    fn addressed(&self, who: &Who) -> Who {
        Who {
            host: self.address(&who.host),
            ..who.clone()
        }
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Runs a log-dir write; on the first failure reports it and stops using the log dir.
    fn log_with(&mut self, f: impl FnOnce(&mut LogDir) -> std::io::Result<()>) {
        let Some(log) = &mut self.log else { return };
        if let Err(e) = f(log) {
            let dir = log.dir().display().to_string();
            self.log = None;
            note(&format!(
                "cannot write to --log-dir {dir}: {e}; the job goes on without it"
            ));
        }
    }

    fn event(&mut self, e: &Event<'_>) {
        if !self.json && self.log.is_none() {
            return;
        }
        let line = events::to_line(e);
        if self.json {
            stdout_line(&line);
        }
        self.log_with(|l| l.event(&line));
    }

    pub fn started(&mut self, who: &Who, pid: u32) {
        let elapsed_ms = self.elapsed_ms();
        self.event(&Event::Started {
            who: &self.addressed(who),
            pid,
            elapsed_ms,
        });
        self.log_with(|l| l.started(who.machine, &who.label));
    }

    pub fn line(&mut self, who: &Who, stream: OutputStream, text: &[u8]) {
        let prefix = format!("m{} {}", who.machine, who.label);
        let stderr = stream == OutputStream::Stderr;
        if stderr && who.role == "trainer-group" {
            self.torchruns
                .entry(who.machine)
                .or_default()
                .feed(&String::from_utf8_lossy(text));
        }
        if !self.json && self.capture.is_none() {
            print_line(&prefix, stream, text);
        }
        let elapsed_ms = self.elapsed_ms();
        // Only an event needs the address (one allocation per line).
        if self.json || self.log.is_some() {
            self.event(&Event::Line {
                who: &self.addressed(who),
                stream: if stderr { "stderr" } else { "stdout" },
                text: String::from_utf8_lossy(text),
                elapsed_ms,
            });
        }
        if self.log.is_some() {
            let labelled = format_line(&prefix, text);
            self.log_with(|l| l.line(who.machine, &who.label, stderr, &labelled, text));
        }
    }

    pub fn lost_lines(&mut self, machine: usize, host: &str, count: u64, name: &str) {
        self.note(&format!(
            "{name}: {count} output lines were dropped by the agent before they could be read"
        ));
        let elapsed_ms = self.elapsed_ms();
        self.event(&Event::LostLines {
            machine,
            address: &self.address(host),
            count,
            elapsed_ms,
        });
    }

    pub fn exited(&mut self, who: &Who, pid: Option<u32>, x: &ProcessExited) {
        let elapsed_ms = self.elapsed_ms();
        self.event(&Event::Exited {
            who: &self.addressed(who),
            pid,
            exit: ExitInfo::from_pb(x),
            elapsed_ms,
        });
    }

    /// A message of dgl-coord itself: always on stderr (also with `--json`, whose stdout
    /// carries events only), and in the merged log.
    pub fn note(&mut self, msg: &str) {
        let line = format!("dgl-coord: {msg}\n");
        if !self.keep(&line) {
            note(msg);
        }
        self.log_with(|l| l.merged(line.as_bytes()));
    }

    /// The end: the table on stderr (text mode) or the summary event (JSON), and both into
    /// the log dir. Flushes everything.
    pub fn summary(&mut self, s: &Summary, text: &str) {
        self.end(s, text, !self.json);
    }

    /// The summary of a launch that failed before it started: the caller prints the error,
    /// so nothing more goes to the terminal in text mode.
    pub fn error_summary(&mut self, s: &Summary, text: &str) {
        self.end(s, text, false);
    }

    /// A job failed by a torchrun: its rank's own code and name instead of torchrun's 1.
    fn with_rank_cause(&self, s: &Summary, text: &str) -> Option<(Summary, String)> {
        let failed = s.failed_process.as_ref()?;
        if s.outcome != events::Outcome::Failed || failed.role != "trainer-group" {
            return None;
        }
        let cause = self.torchruns.get(&failed.machine)?.root_cause()?;
        let code = cause.exit_code();
        let said = format!(
            "m{} trainers: {} (torchrun itself exited {})",
            failed.machine,
            cause.describe(),
            s.exit_code
        );
        let mut s = s.clone();
        s.error = Some(match &s.error {
            Some(e) => format!("{e}\n{said}"),
            None => said.clone(),
        });
        let old = format!("exit code {}\n", s.exit_code);
        let text = text.replacen(&old, &format!("{said}\nexit code {code}\n"), 1);
        s.exit_code = code;
        let _ = self.rank_exit.set(code);
        Some((s, text))
    }

    fn end(&mut self, s: &Summary, text: &str, show_text: bool) {
        let amended = self.with_rank_cause(s, text);
        let (s, text) = match &amended {
            Some((s, t)) => (s, t.as_str()),
            None => (s, text),
        };
        if let Some(c) = &self.capture {
            c.lock().outcome = Some(s.outcome);
        }
        if show_text && !self.keep(text) {
            let shown = super::output::escape_controls(text.as_bytes(), true);
            let _ = std::io::stderr().lock().write_all(&shown);
        }
        let mut s = s.clone();
        if let Some(w) = &mut s.failed_process {
            *w = self.addressed(w);
        }
        for p in &mut s.processes {
            p.who = self.addressed(&p.who);
        }
        for a in &mut s.attempts {
            if let Some(w) = &mut a.failed_process {
                *w = self.addressed(w);
            }
        }
        self.event(&Event::Summary(&s));
        let json = events::escape_del_c1(serde_json::to_string_pretty(&s).unwrap_or_default());
        self.log_with(|l| {
            l.merged(text.as_bytes())?;
            l.summary(text, &json)
        });
        self.flush();
    }

    pub fn flush(&mut self) {
        self.log_with(LogDir::flush);
    }
}
