//! The end of a job, decided from its final state: the exit code, the error text, the table's
//! rows, the timings and the JSON summary. Pure: the loop prints what this returns.

use std::time::{Duration, Instant};

use super::super::events::{AttemptSummary, ExitInfo, Outcome, ProcessSummary, Summary};
use super::super::summary::{self, Row};
use super::stall::{self, NO_PROGRESS_EXIT};
use super::state::{Job, Proc, Reason};

/// dgl-coord's exit code when someone else stopped the job and no process had failed before:
/// that of a SIGTERM, which is what such a stop sends.
pub const STOPPED_BY_OTHER_EXIT: u8 = 143;

/// What the loop prints and returns at the end.
#[derive(Debug)]
pub(crate) struct Ending {
    /// Said before the table (a signal was already announced when it came).
    pub(crate) note: Option<String>,
    pub(crate) summary: Summary,
    /// The table, the timings and the exit code.
    pub(crate) text: String,
    pub(crate) code: u8,
}

/// dgl-coord's exit code from why the job stopped (`None`: it never began stopping) and the
/// worst code of a process that failed on its own (0 when none did).
pub(crate) fn exit_code(reason: Option<&Reason>, worst: u8) -> u8 {
    match reason {
        Some(Reason::Success) | None => worst,
        Some(Reason::Failed { .. } | Reason::SpawnFailed { .. } | Reason::Lost { .. }) => {
            worst.max(1)
        }
        Some(Reason::Signal(sig)) if worst == 0 => (128 + sig).clamp(0, 255) as u8,
        Some(Reason::StoppedBy { .. }) if worst == 0 => STOPPED_BY_OTHER_EXIT,
        Some(Reason::Signal(_) | Reason::StoppedBy { .. }) => worst,
        Some(Reason::Stalled { .. } | Reason::StartTimeout { .. }) => NO_PROGRESS_EXIT,
    }
}

pub(crate) fn outcome(reason: Option<&Reason>) -> Outcome {
    match reason {
        Some(Reason::Success) | None => Outcome::Success,
        Some(Reason::Failed { .. }) => Outcome::Failed,
        Some(Reason::SpawnFailed { .. }) => Outcome::SpawnFailed,
        Some(Reason::Lost { .. }) => Outcome::Lost,
        Some(Reason::Signal(_)) => Outcome::Signal,
        Some(Reason::StoppedBy { .. }) => Outcome::Stopped,
        Some(Reason::Stalled { .. }) => Outcome::Stalled,
        Some(Reason::StartTimeout { .. }) => Outcome::StartTimeout,
    }
}

/// The error a user reads at the end. `host` names the host the reason is about; `failed` is
/// the process a `Failed` reason names.
pub(crate) fn error_text(
    reason: &Reason,
    host: &str,
    failed: Option<&Proc>,
    lease: Duration,
) -> Option<String> {
    match reason {
        Reason::Success => None,
        Reason::Failed { label, .. } => failed.map(|p| failure_text(host, label, p)),
        Reason::SpawnFailed { message, .. } => Some(format!("job failed: {host}: {message}")),
        Reason::Lost { loss, .. } => Some(format!(
            "job failed: lost the agent of {host}: {}; {}",
            loss.reason(),
            loss.aftermath(lease)
        )),
        Reason::Signal(sig) => Some(format!("job stopped by {}", summary::signal_name(*sig))),
        Reason::StoppedBy { by, .. } => {
            Some(format!("job stopped by {by} (seen by the agent of {host})"))
        }
        Reason::Stalled { after } => Some(format!(
            "stalled: no progress for {}: no trainer wrote a line or used CPU time",
            stall::human(*after)
        )),
        Reason::StartTimeout { after, silent } => Some(format!(
            "start timeout: {} printed nothing within {} of the start",
            silent.join(", "),
            stall::human(*after)
        )),
    }
}

/// `job failed: <host> <label> (pid N): <status>` and the last lines of its stderr.
fn failure_text(host: &str, label: &str, p: &Proc) -> String {
    let status = p
        .exit
        .as_ref()
        .map_or("failed".to_string(), summary::status_text);
    let pid = p.pid.map_or(String::new(), |pid| format!(" (pid {pid})"));
    let mut msg = format!("job failed: {host} {label}{pid}: {status}\n");
    if p.stderr_tail.is_empty() {
        msg.push_str("  (it wrote nothing to stderr)");
    } else {
        msg.push_str("  last lines of its stderr:");
        for l in &p.stderr_tail {
            msg.push_str(&format!("\n  | {l}"));
        }
    }
    msg
}

/// The table's rows, in the plan's order.
pub(crate) fn rows(job: &Job) -> Vec<Row> {
    job.order
        .iter()
        .filter_map(|key| {
            let p = job.procs.get(key)?;
            Some(Row {
                host: host_name(job, key.0),
                process: key.1.clone(),
                pid: p.pid,
                exit: p.exit,
                started: p.pid.is_some(),
            })
        })
        .collect()
}

/// The timings under the table, then the exit code.
pub(crate) fn timings_text(
    processes: usize,
    all_started_ms: Option<u64>,
    teardown: Option<(&str, u64)>,
    code: u8,
) -> String {
    let mut text = String::new();
    if let Some(ms) = all_started_ms {
        text.push_str(&format!(
            "all {processes} processes started {ms} ms after the command\n"
        ));
    }
    if let Some((what, ms)) = teardown {
        text.push_str(&format!("{what} {ms} ms after the stop began\n"));
    }
    text.push_str(&format!("exit code {code}\n"));
    text
}

fn host_name(job: &Job, host: usize) -> String {
    job.hosts
        .get(host)
        .map_or_else(|| format!("m{host}"), |h| h.name.clone())
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// How `job`, one attempt, ended at `now`.
pub(crate) fn attempt(job: &Job, now: Instant) -> AttemptSummary {
    let reason = job.stopping.as_ref().map(|s| &s.reason);
    let failed = match reason {
        Some(Reason::Failed { host, label }) => job.procs.get(&(*host, label.clone())),
        _ => None,
    };
    let error = reason.and_then(|r| {
        let host = reason_host(r).map_or_else(String::new, |h| host_name(job, h));
        error_text(r, &host, failed, job.facts.lease)
    });
    let since = |t: Instant| millis(t.saturating_duration_since(job.facts.started));
    AttemptSummary {
        restart: job.facts.restarts,
        outcome: outcome(reason),
        exit_code: exit_code(reason, worst_failure(job)),
        // The first line: the stderr lines under it are the last attempt's to show.
        error: error.map(|e| e.lines().next().unwrap_or_default().to_string()),
        failed_process: failed.map(|p| p.who.clone()),
        started_ms: since(job.facts.attempt_started),
        ended_ms: since(now),
    }
}

/// One line per attempt, under the table.
pub(crate) fn attempts_text(attempts: &[AttemptSummary]) -> String {
    attempts
        .iter()
        .map(|a| {
            let secs = a.ended_ms.saturating_sub(a.started_ms) as f64 / 1000.0;
            let how = match &a.error {
                Some(e) => format!("exit code {}: {e}", a.exit_code),
                None => format!("exit code {}", a.exit_code),
            };
            format!(
                "attempt {} (restart {}): {secs:.1} s, {how}\n",
                a.restart + 1,
                a.restart
            )
        })
        .collect()
}

/// Everything the end of `job` prints, with `now` as the moment it ends; `attempts`: every
/// attempt's ending when the job may restart (the last is `job`'s), else empty.
pub(crate) fn ending(job: &Job, now: Instant, attempts: Vec<AttemptSummary>) -> Ending {
    let reason = job.stopping.as_ref().map(|s| &s.reason);
    let code = exit_code(reason, worst_failure(job));
    let failed = match reason {
        Some(Reason::Failed { host, label }) => job.procs.get(&(*host, label.clone())),
        _ => None,
    };
    let error = reason.and_then(|r| {
        let host = reason_host(r).map_or_else(String::new, |h| host_name(job, h));
        error_text(r, &host, failed, job.facts.lease)
    });
    // The signal was already announced when it came; the other reasons are told here.
    let note = error
        .clone()
        .filter(|_| !matches!(reason, Some(Reason::Signal(_))));
    let rows = rows(job);
    let all_started_ms = job
        .all_started
        .map(|t| millis(t.saturating_duration_since(job.facts.started)));
    let teardown = teardown(job);
    let text = format!(
        "\n{}{}{}",
        summary::render(&rows),
        attempts_text(&attempts),
        timings_text(job.order.len(), all_started_ms, teardown, code)
    );
    let processes = process_summaries(job, &rows);
    let summary = Summary {
        job_id: job.facts.job_id.clone(),
        outcome: outcome(reason),
        exit_code: code,
        error,
        failed_process: failed.map(|p| p.who.clone()),
        failed_stderr_tail: failed
            .map_or_else(Vec::new, |p| p.stderr_tail.iter().cloned().collect()),
        all_started_ms,
        teardown_ms: teardown.map(|(_, ms)| ms),
        elapsed_ms: millis(now.saturating_duration_since(job.facts.started)),
        processes,
        attempts,
    };
    Ending {
        note,
        summary,
        text,
        code,
    }
}

/// The worst exit code of a process that failed on its own; 0 when none did.
fn worst_failure(job: &Job) -> u8 {
    job.procs
        .values()
        .filter_map(|p| p.exit.as_ref())
        .filter(|e| summary::is_failure(e))
        .map(summary::exit_code)
        .max()
        .unwrap_or(0)
}

/// What was stopped and how long the stop took, once every host confirmed it.
fn teardown(job: &Job) -> Option<(&'static str, u64)> {
    let s = job.stopping.as_ref()?;
    let what = match s.reason {
        Reason::Success => "servers stopped",
        _ => "job torn down",
    };
    s.confirmed
        .map(|c| (what, millis(c.saturating_duration_since(s.since))))
}

/// The JSON summary's processes, in the table's order.
fn process_summaries(job: &Job, rows: &[Row]) -> Vec<ProcessSummary> {
    job.order
        .iter()
        .filter_map(|key| job.procs.get(key))
        .zip(rows)
        .map(|(p, row)| ProcessSummary {
            who: p.who.clone(),
            pid: p.pid,
            started: p.pid.is_some(),
            exit: p.exit.as_ref().map(ExitInfo::from_pb),
            status: summary::row_status(row),
        })
        .collect()
}

/// The host a reason is about.
fn reason_host(r: &Reason) -> Option<usize> {
    match r {
        Reason::Failed { host, .. }
        | Reason::SpawnFailed { host, .. }
        | Reason::Lost { host, .. }
        | Reason::StoppedBy { host, .. } => Some(*host),
        Reason::Success
        | Reason::Signal(_)
        | Reason::Stalled { .. }
        | Reason::StartTimeout { .. } => None,
    }
}
