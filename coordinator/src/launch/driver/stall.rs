//! Whether a running job still makes progress. Pure: fed the trainers' lines, their CPU time
//! as the agents report it and the time, it says when to look again and whether the job
//! stalled (`--stall-timeout`: no trainer wrote a line or used CPU time for that long) or
//! hangs at its start (`--start-timeout`: a trainer printed nothing that long after the start).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// dgl-coord's exit code for a job stopped for lack of progress, as timeout(1)'s.
pub const NO_PROGRESS_EXIT: u8 = 124;
/// How often the agents are asked for the trainers' CPU time while a stall timeout is set.
pub(super) const CPU_POLL: Duration = Duration::from_secs(1);
/// A trainer computes when it used at least 1/50 of a CPU since the previous sample: a hung
/// Python process still wakes now and then (its runtime's and its libraries' threads).
const BUSY_SHARE: u128 = 50;
/// Longest last line quoted in the report (characters).
const QUOTE_CHARS: usize = 160;

/// `--stall-timeout` and `--start-timeout`; None: not watched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Watchdog {
    pub stall_timeout: Option<Duration>,
    pub start_timeout: Option<Duration>,
}

impl Watchdog {
    pub fn cpu_needed(&self) -> bool {
        self.stall_timeout.is_some()
    }
}

/// Why the watchdog ends the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// No trainer wrote a line or computed for the stall timeout.
    Stalled,
    /// These trainers (`m0 trainer1`) printed nothing within the start timeout.
    StartTimeout { silent: Vec<String> },
}

#[derive(Debug)]
struct Trainer {
    name: String,
    line: Option<(Instant, String)>,
    /// The last CPU sample: when, and the milliseconds used so far.
    cpu: Option<(Instant, u64)>,
    /// The last sample that showed it computing.
    busy: Option<Instant>,
    exited: bool,
}

/// What the trainers of one attempt last did.
#[derive(Debug)]
pub(crate) struct Progress {
    dog: Watchdog,
    /// When the attempt began spawning.
    started: Instant,
    /// When every process was started: stalls are counted from then on.
    running_since: Option<Instant>,
    trainers: BTreeMap<(usize, String), Trainer>,
    fired: bool,
}

impl Progress {
    /// `trainers`: each trainer's key (machine, label) and its name in messages.
    pub(crate) fn new(
        dog: Watchdog,
        started: Instant,
        trainers: impl IntoIterator<Item = ((usize, String), String)>,
    ) -> Self {
        let trainers = trainers
            .into_iter()
            .map(|(key, name)| {
                let t = Trainer {
                    name,
                    line: None,
                    cpu: None,
                    busy: None,
                    exited: false,
                };
                (key, t)
            })
            .collect();
        Self {
            dog,
            started,
            running_since: None,
            trainers,
            fired: false,
        }
    }

    pub(crate) fn all_started(&mut self, now: Instant) {
        self.running_since = Some(now);
    }

    pub(crate) fn line(&mut self, key: &(usize, String), now: Instant, text: &[u8]) {
        if let Some(t) = self.trainers.get_mut(key) {
            let text = String::from_utf8_lossy(text);
            t.line = Some((now, text.chars().take(QUOTE_CHARS).collect()));
        }
    }

    pub(crate) fn exited(&mut self, key: &(usize, String)) {
        if let Some(t) = self.trainers.get_mut(key) {
            t.exited = true;
        }
    }

    /// A sample of the CPU milliseconds `key` and its descendants used so far.
    pub(crate) fn cpu(&mut self, key: &(usize, String), now: Instant, cpu_ms: u64) {
        let Some(t) = self.trainers.get_mut(key) else {
            return;
        };
        if let Some((then, used)) = t.cpu {
            let spent = u128::from(cpu_ms.saturating_sub(used));
            let elapsed = now.saturating_duration_since(then).as_millis();
            if spent > 0 && spent * BUSY_SHARE >= elapsed {
                t.busy = Some(now);
            }
        }
        t.cpu = Some((now, cpu_ms));
    }

    /// The latest sign of life of any trainer, from the moment all were started.
    fn last_progress(&self) -> Option<Instant> {
        let since = self.running_since?;
        let latest = self
            .trainers
            .values()
            .flat_map(|t| [t.line.as_ref().map(|l| l.0), t.busy])
            .flatten()
            .fold(since, Instant::max);
        Some(latest)
    }

    fn start_pending(&self) -> bool {
        self.trainers
            .values()
            .any(|t| t.line.is_none() && !t.exited)
    }

    /// When to look again; None: nothing is watched (any more).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        if self.fired {
            return None;
        }
        let stall = self
            .dog
            .stall_timeout
            .zip(self.last_progress())
            .map(|(d, t)| t + d);
        let start = self
            .dog
            .start_timeout
            .filter(|_| self.start_pending())
            .map(|d| self.started + d);
        [stall, start].into_iter().flatten().min()
    }

    /// The verdict at `now`, given once.
    pub(crate) fn check(&mut self, now: Instant) -> Option<Verdict> {
        if self.fired {
            return None;
        }
        let verdict = if self
            .dog
            .start_timeout
            .is_some_and(|d| now >= self.started + d && self.start_pending())
        {
            let silent = self
                .trainers
                .values()
                .filter(|t| t.line.is_none() && !t.exited)
                .map(|t| t.name.clone())
                .collect();
            Verdict::StartTimeout { silent }
        } else if self
            .dog
            .stall_timeout
            .zip(self.last_progress())
            .is_some_and(|(d, t)| now >= t + d)
        {
            Verdict::Stalled
        } else {
            return None;
        };
        self.fired = true;
        Some(verdict)
    }

    /// Who is waiting where, as far as the output and the CPU times tell: one line per
    /// trainer still running.
    pub(crate) fn report(&self, now: Instant) -> Vec<String> {
        let ago = |t: Instant| human(now.saturating_duration_since(t));
        self.trainers
            .values()
            .filter(|t| !t.exited)
            .map(|t| {
                let line = match &t.line {
                    Some((at, text)) => format!("last line {} ago: {text:?}", ago(*at)),
                    None => "no line yet".to_string(),
                };
                let cpu = match (t.busy, t.cpu) {
                    (Some(at), _) => format!("last busy on a CPU {} ago", ago(at)),
                    (None, Some(_)) => "idle on the CPU since it was first sampled".to_string(),
                    (None, None) => "CPU time not sampled".to_string(),
                };
                format!("  {}: {line}; {cpu}", t.name)
            })
            .collect()
    }
}

/// A duration as a person writes it: `10m`, `1h30m`, `45s`, `1.5s`, `250ms`.
pub fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.subsec_millis());
    }
    if secs < 60 {
        let tenths = d.subsec_millis() / 100;
        return if tenths == 0 {
            format!("{secs}s")
        } else {
            format!("{secs}.{tenths}s")
        };
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    for (n, unit) in [(h, "h"), (m, "m"), (s, "s")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn key(label: &str) -> (usize, String) {
        (0, label.to_string())
    }

    fn progress(stall: Option<u64>, start: Option<u64>, t0: Instant) -> Progress {
        let dog = Watchdog {
            stall_timeout: stall.map(S),
            start_timeout: start.map(S),
        };
        let names = ["trainer0", "trainer1"].map(|l| (key(l), format!("m0 {l}")));
        Progress::new(dog, t0, names)
    }

    #[test]
    fn a_line_or_busy_cpu_of_any_trainer_postpones_the_stall() {
        let t0 = Instant::now();
        let mut p = progress(Some(10), None, t0);
        assert_eq!(p.deadline(), None, "not watched before all started");
        p.all_started(t0);
        assert_eq!(p.deadline(), Some(t0 + S(10)));
        p.line(&key("trainer1"), t0 + S(4), b"epoch 1");
        assert_eq!(p.deadline(), Some(t0 + S(14)));
        // 1 ms of CPU in a second is a process asleep; 100 ms is one computing.
        p.cpu(&key("trainer0"), t0 + S(5), 1000);
        p.cpu(&key("trainer0"), t0 + S(6), 1001);
        assert_eq!(p.deadline(), Some(t0 + S(14)));
        p.cpu(&key("trainer0"), t0 + S(7), 1101);
        assert_eq!(p.deadline(), Some(t0 + S(17)));
        assert_eq!(p.check(t0 + S(16)), None);
        assert_eq!(p.check(t0 + S(17)), Some(Verdict::Stalled));
        assert_eq!(p.check(t0 + S(18)), None, "given once");
        let report = p.report(t0 + S(17));
        assert_eq!(
            report,
            vec![
                "  m0 trainer0: no line yet; last busy on a CPU 10s ago",
                "  m0 trainer1: last line 13s ago: \"epoch 1\"; CPU time not sampled",
            ]
        );
    }

    #[test]
    fn every_trainer_must_print_within_the_start_timeout() {
        let t0 = Instant::now();
        let mut p = progress(None, Some(30), t0);
        assert_eq!(p.deadline(), Some(t0 + S(30)));
        p.line(&key("trainer0"), t0 + S(3), b"hello");
        assert_eq!(p.check(t0 + S(29)), None);
        let silent = vec!["m0 trainer1".to_string()];
        assert_eq!(p.check(t0 + S(30)), Some(Verdict::StartTimeout { silent }));
        let mut p = progress(None, Some(30), t0);
        p.line(&key("trainer0"), t0 + S(3), b"hello");
        p.exited(&key("trainer1"));
        assert_eq!(p.deadline(), None, "satisfied");
    }

    #[test]
    fn durations_read_as_written() {
        let cases = [
            (S(600), "10m"),
            (S(5400), "1h30m"),
            (S(45), "45s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_millis(250), "250ms"),
            (S(61), "1m1s"),
        ];
        for (d, text) in cases {
            assert_eq!(human(d), text);
        }
    }
}
