//! The machine-readable form of a launch: one JSON object per line, on stdout with `--json`
//! and in `events.jsonl` of `--log-dir`. Every object has `"event"`: `started`, `line`,
//! `lost_lines`, `exited`, then exactly one `summary` last. README "Machine-readable output"
//! documents every field; `tests` below pins the shapes it documents.

use std::borrow::Cow;

use dglrun_proto::pb::ProcessExited;
use serde::Serialize;

use super::summary;

/// Which process an event is about.
#[derive(Clone, Debug, Serialize)]
pub struct Who {
    /// Machine rank: the line of ip_config, from 0.
    pub machine: usize,
    /// The machine's IP as ip_config gives it; in JSON, `address`: the agent's `IP:port`, as
    /// `status --json` and the copy report name a machine (the sink adds the port).
    #[serde(rename = "address")]
    pub host: String,
    /// Unique per machine: `server0`, `trainer1`, `trainers`.
    pub label: String,
    /// `server`, `trainer` (direct mode) or `trainer-group` (one torchrun).
    pub role: String,
}

/// How a process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExitInfo {
    /// Its exit code; null when a signal ended it or the agent could not learn it.
    pub code: Option<i32>,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
    /// `SIGTERM`, ...; null without a signal.
    pub signal_name: Option<String>,
    /// dglrun stopped it (job teardown); such an exit is never a failure.
    pub stopped_by_agent: bool,
    /// It ended badly on its own (non-zero code or a signal not sent by dglrun).
    pub failed: bool,
    /// The code it contributes to dgl-coord's exit code: its code, or 128+signal.
    pub exit_code: u8,
    /// The table's STATUS text: `exit 0`, `killed by SIGSEGV`, `stopped (killed by SIGTERM)`.
    pub status: String,
    pub runtime_ms: u64,
}

impl ExitInfo {
    pub fn from_pb(x: &ProcessExited) -> Self {
        let signal = (x.signal != 0).then_some(x.signal);
        Self {
            code: (x.signal == 0 && x.code >= 0).then_some(x.code),
            signal,
            signal_name: signal.map(summary::signal_name),
            stopped_by_agent: x.stopped_by_agent,
            failed: summary::is_failure(x),
            exit_code: summary::exit_code(x),
            status: summary::status_text(x),
            runtime_ms: x.runtime_ms,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event<'a> {
    /// A process was spawned.
    Started {
        #[serde(flatten)]
        who: &'a Who,
        pid: u32,
        elapsed_ms: u64,
    },
    /// One line a process wrote (without its newline; invalid UTF-8 replaced by U+FFFD).
    Line {
        #[serde(flatten)]
        who: &'a Who,
        /// `stdout` or `stderr`.
        stream: &'static str,
        text: Cow<'a, str>,
        elapsed_ms: u64,
    },
    /// The agent dropped `count` lines of this machine before they could be read.
    LostLines {
        machine: usize,
        /// The agent's `IP:port`.
        address: &'a str,
        count: u64,
        elapsed_ms: u64,
    },
    /// A process ended.
    Exited {
        #[serde(flatten)]
        who: &'a Who,
        pid: Option<u32>,
        #[serde(flatten)]
        exit: ExitInfo,
        elapsed_ms: u64,
    },
    Summary(&'a Summary),
}

/// How the job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every trainer exited 0; the servers were stopped.
    Success,
    /// A process exited non-zero or was killed by a signal dglrun did not send.
    Failed,
    /// An agent refused or failed to start processes.
    SpawnFailed,
    /// An agent was lost (refused, restarted, or silent for a lease).
    Lost,
    /// dgl-coord got SIGINT or SIGTERM.
    Signal,
    /// Someone else stopped the job (`dgl-coord kill`).
    Stopped,
    /// No trainer wrote a line or used CPU time for `--stall-timeout`.
    Stalled,
    /// A trainer printed nothing within `--start-timeout` of the start.
    StartTimeout,
    /// Nothing was started: bad input, an unreachable agent or a failed preflight.
    Error,
}

/// One process of the plan at the end.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessSummary {
    #[serde(flatten)]
    pub who: Who,
    pub pid: Option<u32>,
    pub started: bool,
    /// Null when the process never started or its exit was never reported.
    pub exit: Option<ExitInfo>,
    /// The table's STATUS: the exit's status, `not started` or `no exit reported`.
    pub status: String,
}

/// The last event of every launch.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub job_id: String,
    pub outcome: Outcome,
    /// dgl-coord's exit code (README's exit code table).
    pub exit_code: u8,
    /// Why the job failed, as the last message on stderr says it; null on success.
    pub error: Option<String>,
    /// The process whose failure stopped the job (outcome `failed`).
    pub failed_process: Option<Who>,
    /// Last lines (at most 10) of that process's stderr.
    pub failed_stderr_tail: Vec<String>,
    /// Milliseconds from the command's start until every process was started.
    pub all_started_ms: Option<u64>,
    /// Milliseconds from the start of the stop until every agent confirmed it.
    pub teardown_ms: Option<u64>,
    pub elapsed_ms: u64,
    pub processes: Vec<ProcessSummary>,
    /// Every attempt, the last one included; only with `--max-restarts`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<AttemptSummary>,
}

/// How one attempt of a job that may restart ended.
#[derive(Clone, Debug, Serialize)]
pub struct AttemptSummary {
    /// Restarts before it (the processes' DGLRUN_RESTART_COUNT): 0 for the first.
    pub restart: u32,
    pub outcome: Outcome,
    pub exit_code: u8,
    pub error: Option<String>,
    /// The process whose failure ended it.
    pub failed_process: Option<Who>,
    /// Milliseconds since dgl-coord started: when it began spawning, when it was over.
    pub started_ms: u64,
    pub ended_ms: u64,
}

impl Summary {
    /// The summary of a launch that failed before any process started.
    pub fn error(job_id: &str, message: String, elapsed_ms: u64) -> Self {
        Self {
            job_id: job_id.to_string(),
            outcome: Outcome::Error,
            exit_code: 1,
            error: Some(message),
            failed_process: None,
            failed_stderr_tail: Vec::new(),
            all_started_ms: None,
            teardown_ms: None,
            elapsed_ms,
            processes: Vec::new(),
            attempts: Vec::new(),
        }
    }
}

/// One event as its line (without the newline).
pub fn to_line(e: &Event<'_>) -> String {
    // Serializing these types cannot fail (string keys, no maps of non-strings).
    escape_del_c1(serde_json::to_string(e).unwrap_or_default())
}

/// JSON escapes only C0 controls; DEL and the C1 range (U+0080-U+009F, e.g. U+009B, a CSI
/// for some terminals) would reach a terminal that shows the JSON raw. Outside strings JSON
/// is plain ASCII, so every such character is inside a string, where `\u00XX` is valid.
pub fn escape_del_c1(json: String) -> String {
    let is_del_c1 = |c: char| matches!(c, '\u{7f}'..='\u{9f}');
    if !json.contains(is_del_c1) {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if is_del_c1(c) {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn who() -> Who {
        Who {
            machine: 1,
            host: "10.0.0.2".into(),
            label: "trainer0".into(),
            role: "trainer".into(),
        }
    }

    fn parse(e: &Event<'_>) -> Value {
        let line = to_line(e);
        assert!(!line.contains('\n'), "one line: {line}");
        serde_json::from_str(&line).unwrap()
    }

    #[test]
    fn events_have_the_documented_fields() {
        let w = who();
        let v = parse(&Event::Started {
            who: &w,
            pid: 42,
            elapsed_ms: 7,
        });
        assert_eq!(
            v,
            json!({"event": "started", "machine": 1, "address": "10.0.0.2", "label": "trainer0",
                   "role": "trainer", "pid": 42, "elapsed_ms": 7})
        );
        let v = parse(&Event::Line {
            who: &w,
            stream: "stderr",
            text: String::from_utf8_lossy(b"a\xffb"),
            elapsed_ms: 8,
        });
        assert_eq!(v["event"], "line");
        assert_eq!(v["stream"], "stderr");
        assert_eq!(v["text"], "a\u{fffd}b");
        let x = ProcessExited {
            index: 0,
            code: -1,
            signal: 9,
            runtime_ms: 1500,
            stopped_by_agent: false,
        };
        let v = parse(&Event::Exited {
            who: &w,
            pid: Some(42),
            exit: ExitInfo::from_pb(&x),
            elapsed_ms: 9,
        });
        assert_eq!(
            v,
            json!({"event": "exited", "machine": 1, "address": "10.0.0.2", "label": "trainer0",
                   "role": "trainer", "pid": 42, "code": null, "signal": 9,
                   "signal_name": "SIGKILL", "stopped_by_agent": false, "failed": true,
                   "exit_code": 137, "status": "killed by SIGKILL", "runtime_ms": 1500,
                   "elapsed_ms": 9})
        );
        let v = parse(&Event::LostLines {
            machine: 2,
            address: "10.0.0.3:47001",
            count: 5,
            elapsed_ms: 1,
        });
        assert_eq!(v["event"], "lost_lines");
        assert_eq!(v["count"], 5);
    }

    #[test]
    fn del_and_c1_controls_are_escaped_like_c0_ones() {
        let w = who();
        let text = "a\u{1b}[2Jb\u{7f}c\u{85}d\u{9b}2Je\u{80}\u{9f}\u{a0}é";
        let e = Event::Line {
            who: &w,
            stream: "stdout",
            text: Cow::Borrowed(text),
            elapsed_ms: 1,
        };
        let line = to_line(&e);
        let raw: Vec<char> = line
            .chars()
            .filter(|c| c.is_control() && *c != '\u{a0}')
            .collect();
        assert!(raw.is_empty(), "raw controls {raw:?} in {line}");
        for esc in [
            "\\u001b", "\\u007f", "\\u0085", "\\u009b", "\\u0080", "\\u009f",
        ] {
            assert!(line.contains(esc), "{esc} in {line}");
        }
        assert!(
            line.contains("\u{a0}é"),
            "printable characters stay: {line}"
        );
        assert_eq!(parse(&e)["text"], text);
    }

    #[test]
    fn the_summary_is_tagged_and_complete() {
        let s = Summary::error("job-1", "cannot reach m2".into(), 12);
        let v = parse(&Event::Summary(&s));
        assert_eq!(v["event"], "summary");
        assert_eq!(v["outcome"], "error");
        assert_eq!(v["exit_code"], 1);
        assert_eq!(v["error"], "cannot reach m2");
        assert_eq!(v["processes"], json!([]));
        for k in [
            "job_id",
            "failed_process",
            "failed_stderr_tail",
            "all_started_ms",
            "teardown_ms",
            "elapsed_ms",
        ] {
            assert!(v.get(k).is_some(), "{k} in {v}");
        }
    }

    #[test]
    fn exit_codes_are_null_when_unknown() {
        let unknown = ProcessExited {
            index: 0,
            code: -1,
            signal: 0,
            runtime_ms: 0,
            stopped_by_agent: false,
        };
        let e = ExitInfo::from_pb(&unknown);
        assert_eq!((e.code, e.signal), (None, None));
        assert_eq!(e.status, "exit status unknown");
        let ok = ProcessExited { code: 0, ..unknown };
        let e = ExitInfo::from_pb(&ok);
        assert_eq!((e.code, e.failed, e.exit_code), (Some(0), false, 0));
    }
}
