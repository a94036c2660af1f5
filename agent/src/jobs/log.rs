//! A job's event log: what Watch replays and follows.
//!
//! Every event gets the next sequence number. Started/exited events are few (two per process)
//! and always kept: losing one would make a coordinator wait forever or miss a failure. Output
//! lines are kept up to a count and a byte budget; when either overflows, the oldest lines go
//! first and a watcher that had not read them gets one `lost_lines` event in their place.

use std::collections::VecDeque;

use dglrun_proto::pb::{job_event::Event, JobEvent};

/// Lines kept per job for replay.
pub const MAX_LINES: usize = 100_000;
/// Bytes of line text kept per job for replay.
pub const MAX_LINE_BYTES: usize = 32 << 20;

#[derive(Debug)]
pub struct EventLog {
    next_seq: u64,
    /// Started and exited events, in seq order.
    control: Vec<JobEvent>,
    /// Output lines, in seq order, oldest first.
    lines: VecDeque<JobEvent>,
    line_bytes: usize,
    /// Every line with seq <= this was dropped (lines go oldest first).
    last_dropped: u64,
    max_lines: usize,
    max_bytes: usize,
}

impl Default for EventLog {
    fn default() -> Self {
        Self::with_limits(MAX_LINES, MAX_LINE_BYTES)
    }
}

fn line_len(e: &JobEvent) -> usize {
    match &e.event {
        Some(Event::Line(l)) => l.text.len(),
        _ => 0,
    }
}

impl EventLog {
    pub fn with_limits(max_lines: usize, max_bytes: usize) -> Self {
        Self {
            next_seq: 1,
            control: Vec::new(),
            lines: VecDeque::new(),
            line_bytes: 0,
            last_dropped: 0,
            max_lines: max_lines.max(1),
            max_bytes,
        }
    }

    /// Seq of the newest event; 0 when there is none.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Appends an event and returns its seq.
    pub fn push(&mut self, event: Event) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let ev = JobEvent {
            seq,
            event: Some(event),
        };
        if matches!(ev.event, Some(Event::Line(_))) {
            self.line_bytes += line_len(&ev);
            self.lines.push_back(ev);
            while self.lines.len() > self.max_lines
                || (self.line_bytes > self.max_bytes && self.lines.len() > 1)
            {
                let Some(old) = self.lines.pop_front() else {
                    break;
                };
                self.line_bytes -= line_len(&old);
                self.last_dropped = old.seq;
            }
        } else {
            self.control.push(ev);
        }
        seq
    }

    /// Up to `max` events with seq > `after`, in seq order. Lines that were dropped before
    /// this watcher read them are stood for by one `lost_lines` event carrying the seq of the
    /// last dropped line, so a watcher that resumes from it does not count them twice.
    pub fn after(&self, after: u64, max: usize) -> Vec<JobEvent> {
        let mut out = Vec::new();
        let c0 = self.control.partition_point(|e| e.seq <= after);
        let mut c = c0;
        if after < self.last_dropped {
            let control_in_gap = self.control[c0..].partition_point(|e| e.seq <= self.last_dropped);
            let lost = self.last_dropped - after - control_in_gap as u64;
            out.extend(self.control[c0..c0 + control_in_gap].iter().cloned());
            c = c0 + control_in_gap;
            if lost > 0 {
                out.push(JobEvent {
                    seq: self.last_dropped,
                    event: Some(Event::LostLines(lost)),
                });
            }
        }
        let mut l = self.lines.partition_point(|e| e.seq <= after);
        while out.len() < max {
            let next_c = self.control.get(c);
            let next_l = self.lines.get(l);
            match (next_c, next_l) {
                (Some(a), Some(b)) if a.seq < b.seq => {
                    out.push(a.clone());
                    c += 1;
                }
                (_, Some(b)) => {
                    out.push(b.clone());
                    l += 1;
                }
                (Some(a), None) => {
                    out.push(a.clone());
                    c += 1;
                }
                (None, None) => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dglrun_proto::pb::{OutputLine, ProcessExited, ProcessStarted};

    fn line(t: &str) -> Event {
        Event::Line(OutputLine {
            index: 0,
            stream: 1,
            text: t.as_bytes().to_vec(),
            partial: false,
        })
    }
    fn started() -> Event {
        Event::Started(ProcessStarted::default())
    }
    fn exited() -> Event {
        Event::Exited(ProcessExited::default())
    }
    fn describe(evs: &[JobEvent]) -> Vec<String> {
        evs.iter()
            .map(|e| match &e.event {
                Some(Event::Line(l)) => format!("{}:{}", e.seq, String::from_utf8_lossy(&l.text)),
                Some(Event::Started(_)) => format!("{}:started", e.seq),
                Some(Event::Exited(_)) => format!("{}:exited", e.seq),
                Some(Event::LostLines(n)) => format!("{}:lost{n}", e.seq),
                Some(Event::Stopped(_)) => format!("{}:stopped", e.seq),
                None => "none".into(),
            })
            .collect()
    }

    #[test]
    fn replays_in_order_from_any_point() {
        let mut log = EventLog::default();
        log.push(started());
        log.push(line("a"));
        log.push(line("b"));
        log.push(exited());
        assert_eq!(
            describe(&log.after(0, 100)),
            ["1:started", "2:a", "3:b", "4:exited"]
        );
        assert_eq!(describe(&log.after(2, 100)), ["3:b", "4:exited"]);
        assert_eq!(describe(&log.after(0, 2)), ["1:started", "2:a"]);
        assert!(log.after(4, 100).is_empty());
        assert_eq!(log.last_seq(), 4);
    }

    #[test]
    fn overflow_drops_oldest_lines_but_never_control_events() {
        let mut log = EventLog::with_limits(2, 1 << 20);
        log.push(started()); // 1
        log.push(line("a")); // 2
        log.push(line("b")); // 3
        log.push(exited()); // 4
        log.push(line("c")); // 5
        log.push(line("d")); // 6: a, b dropped
        assert_eq!(
            describe(&log.after(0, 100)),
            ["1:started", "3:lost2", "4:exited", "5:c", "6:d"]
        );
        // A watcher that had read line a only lost b.
        assert_eq!(
            describe(&log.after(2, 100)),
            ["3:lost1", "4:exited", "5:c", "6:d"]
        );
        // Resuming from the lost marker does not report it again.
        assert_eq!(describe(&log.after(3, 100)), ["4:exited", "5:c", "6:d"]);
    }

    #[test]
    fn byte_budget_is_enforced() {
        let mut log = EventLog::with_limits(1000, 10);
        for t in ["aaaa", "bbbb", "cccc", "dddd"] {
            log.push(line(t));
        }
        assert_eq!(
            describe(&log.after(0, 100)),
            ["2:lost2", "3:cccc", "4:dddd"]
        );
    }
}
