//! Progress of a copy on stderr: a bar (bytes, rate, ETA) on a terminal, plain lines
//! otherwise (one per finished file, and a status line every few seconds), nothing when quiet.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often plain mode reports the running totals.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, plain lines otherwise.
    Auto,
    Plain,
    Quiet,
}

pub struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
    done: AtomicU64,
    total: AtomicU64,
    phase: Mutex<Phase>,
}

struct Phase {
    name: &'static str,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    pub fn new(mode: ProgressMode) -> Arc<Self> {
        let mode = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => None,
            ProgressMode::Auto => Some(true),
            ProgressMode::Plain => Some(true),
            ProgressMode::Quiet => Some(false),
        };
        let bar = mode.is_none().then(|| {
            let style = ProgressStyle::with_template(
                "{prefix:>8} [{bar:36}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr()).with_style(style)
        });
        Arc::new(Self {
            bar,
            plain: mode == Some(true),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            phase: Mutex::new(Phase {
                name: "",
                started: Instant::now(),
                last_line: Instant::now(),
            }),
        })
    }

    fn phase_state(&self) -> parking_lot::MutexGuard<'_, Phase> {
        self.phase.lock()
    }

    /// Starts a phase ("hashing", "sending") of `total` bytes.
    pub fn phase(&self, name: &'static str, total: u64) {
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        *self.phase_state() = Phase {
            name,
            started: Instant::now(),
            last_line: Instant::now(),
        };
        if let Some(bar) = &self.bar {
            bar.reset();
            bar.set_length(total);
            bar.set_prefix(name);
        }
    }

    /// `n` more bytes done in the current phase. Cheap: called once per chunk.
    pub fn advance(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(bar) = &self.bar {
            bar.inc(n);
            return;
        }
        if !self.plain {
            return;
        }
        // try_lock: a status line is never worth waiting for.
        let Some(mut phase) = self.phase.try_lock() else {
            return;
        };
        if phase.last_line.elapsed() < PLAIN_EVERY {
            return;
        }
        phase.last_line = Instant::now();
        let line = status_line(
            phase.name,
            done,
            self.total.load(Ordering::Relaxed),
            phase.started.elapsed(),
        );
        drop(phase);
        eprintln_flush(&line);
    }

    /// A finished file: a line in plain mode, above the bar on a terminal.
    pub fn file_line(&self, line: &str) {
        if let Some(bar) = &self.bar {
            bar.println(line);
        } else if self.plain {
            eprintln_flush(line);
        }
    }

    /// A line that must be seen whatever the mode (warnings, retries).
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln_flush(line),
        }
    }

    pub fn finish_phase(&self) {
        let phase = self.phase_state();
        let (done, total) = (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        );
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        } else if self.plain && !phase.name.is_empty() {
            eprintln_flush(&status_line(
                phase.name,
                done,
                total,
                phase.started.elapsed(),
            ));
        }
    }
}

fn status_line(phase: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let pct = if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
    format!(
        "{phase}: {} of {} ({pct:.0}%), {}/s",
        HumanBytes(done),
        HumanBytes(total),
        HumanBytes(rate as u64)
    )
}

fn eprintln_flush(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
    let _ = err.flush();
}
