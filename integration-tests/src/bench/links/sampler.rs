//! Link utilisation over time: a thread inside the switch namespace reads every interface's
//! byte counters (`/proc/thread-self/net/dev`, the namespace of the reading thread) every
//! period, and on request at once (the start and end of a measured run).

use std::collections::HashMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// (received, sent) bytes per interface, as the switch end of each link counts them.
#[derive(Clone, Debug)]
pub(super) struct Sample {
    pub(super) at: Instant,
    pub(super) bytes: HashMap<String, (u64, u64)>,
}

enum Req {
    Now(mpsc::Sender<Result<Sample>>),
    All(mpsc::Sender<Vec<Sample>>),
    Stop,
}

pub(super) struct Sampler {
    req: mpsc::Sender<Req>,
    thread: Option<JoinHandle<Result<()>>>,
}

fn read_counters() -> Result<Sample> {
    let text = fs::read_to_string("/proc/thread-self/net/dev").context("read net/dev")?;
    let at = Instant::now();
    let mut bytes = HashMap::new();
    // "  name: rx_bytes rx_packets ... (8 receive fields) tx_bytes ..."
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        if f.len() >= 9 {
            bytes.insert(name.trim().to_string(), (f[0], f[8]));
        }
    }
    Ok(Sample { at, bytes })
}

impl Sampler {
    pub(super) fn start(ns: &str, period: Duration) -> Result<Sampler> {
        let path = Path::new("/var/run/netns").join(ns);
        let (req, rx) = mpsc::channel::<Req>();
        let thread = std::thread::spawn(move || -> Result<()> {
            let f = fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
            // SAFETY: setns on a valid namespace descriptor; it changes only this thread's
            // network namespace.
            let r = unsafe { nix::libc::setns(f.as_raw_fd(), nix::libc::CLONE_NEWNET) };
            if r != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            let mut samples = vec![read_counters()?];
            let mut next = Instant::now() + period;
            loop {
                match rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
                    Ok(Req::Now(reply)) => {
                        let _ = reply.send(read_counters());
                    }
                    Ok(Req::All(reply)) => {
                        let _ = reply.send(samples.clone());
                    }
                    Ok(Req::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        samples.push(read_counters()?);
                        next += period;
                    }
                }
            }
            Ok(())
        });
        Ok(Sampler {
            req,
            thread: Some(thread),
        })
    }

    /// The counters now.
    pub(super) fn now(&self) -> Result<Sample> {
        let (tx, rx) = mpsc::channel();
        self.req
            .send(Req::Now(tx))
            .context("the counter sampler stopped")?;
        rx.recv().context("the counter sampler stopped")?
    }

    /// Every periodic sample so far.
    pub(super) fn all(&self) -> Result<Vec<Sample>> {
        let (tx, rx) = mpsc::channel();
        self.req
            .send(Req::All(tx))
            .context("the counter sampler stopped")?;
        rx.recv().context("the counter sampler stopped")
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        let _ = self.req.send(Req::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One link as seen from its switch port: `rx` counts what its host sends, tx what it gets.
#[derive(Clone, Debug)]
pub(super) struct Link {
    pub(super) label: String,
    pub(super) port: String,
    /// Count what the host sends (true) or receives.
    pub(super) uplink: bool,
    pub(super) mbit: u64,
}

impl Link {
    fn bytes(&self, s: &Sample) -> u64 {
        s.bytes
            .get(&self.port)
            .map_or(0, |&(rx, tx)| if self.uplink { rx } else { tx })
    }

    /// Share of the link's rate used between `a` and `b` (bytes on the wire, headers counted,
    /// as the shaper counts them).
    pub(super) fn busy(&self, a: &Sample, b: &Sample) -> f64 {
        let secs = b.at.saturating_duration_since(a.at).as_secs_f64();
        let bytes = self.bytes(b).saturating_sub(self.bytes(a)) as f64;
        bytes * 8.0 / (self.mbit as f64 * 1e6 * secs.max(1e-9))
    }
}

/// The samples from `start` to `end`, both included.
fn window(samples: &[Sample], start: &Sample, end: &Sample) -> Vec<Sample> {
    let mut v = vec![start.clone()];
    v.extend(
        samples
            .iter()
            .filter(|s| s.at > start.at && s.at < end.at)
            .cloned(),
    );
    v.push(end.clone());
    v
}

const BARS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// Text: per link one bar a sample interval (merged to at most 100 bars) and the busy share
/// over the whole run; then a table of the busy share in each second.
pub(super) fn render(
    title: &str,
    links: &[Link],
    samples: &[Sample],
    start: &Sample,
    end: &Sample,
) -> String {
    let w = window(samples, start, end);
    let steps = w.len().saturating_sub(1).max(1);
    let per_bar = steps.div_ceil(100);
    let secs = end.at.saturating_duration_since(start.at).as_secs_f64();
    let period_ms = (secs * 1000.0 / steps as f64).round();
    let mut out = format!(
        "{title}: {secs:.2} s; busy share of each link's rate, one bar per {:.0} ms \
         (' ' idle .. '█' full):\n",
        period_ms * per_bar as f64
    );
    let name_w = links.iter().map(|l| l.label.len()).max().unwrap_or(0);
    for l in links {
        let mut bars = String::new();
        for k in (0..steps).step_by(per_bar) {
            let b = l.busy(&w[k], &w[(k + per_bar).min(steps)]);
            bars.push(BARS[((b * 8.0).round() as usize).min(8)]);
        }
        out += &format!(
            "  {:<name_w$} {:>6} Mbit/s |{bars}| {:>3.0}%\n",
            l.label,
            l.mbit,
            l.busy(start, end) * 100.0
        );
    }
    // Per second: the counters interpolated at whole seconds from the start.
    let cum = |l: &Link, t: f64| -> f64 {
        let pts: Vec<(f64, f64)> = w
            .iter()
            .map(|s| {
                (
                    s.at.saturating_duration_since(start.at).as_secs_f64(),
                    l.bytes(s).saturating_sub(l.bytes(start)) as f64,
                )
            })
            .collect();
        for p in pts.windows(2) {
            let ((t0, b0), (t1, b1)) = (p[0], p[1]);
            if t <= t1 {
                return b0 + (b1 - b0) * ((t - t0) / (t1 - t0).max(1e-9)).clamp(0.0, 1.0);
            }
        }
        pts.last().map_or(0.0, |p| p.1)
    };
    out += &format!("  {:>7}", "second");
    for l in links {
        out += &format!(" {:>w$}", l.label, w = l.label.len().max(4));
    }
    out += "\n";
    let mut t = 0.0;
    while t < secs {
        let t1 = (t + 1.0).min(secs);
        out += &format!("  {:>3.0}-{:<3.0}", t, t1.ceil());
        for l in links {
            let bytes = cum(l, t1) - cum(l, t);
            let busy = bytes * 8.0 / (l.mbit as f64 * 1e6 * (t1 - t).max(1e-9));
            out += &format!(
                " {:>w$}",
                format!("{:.0}%", busy * 100.0),
                w = l.label.len().max(4)
            );
        }
        out += "\n";
        t = t1;
    }
    out
}
