//! `dgl-coord jobs`: every job the agents keep a record of (see the agent's `jobs/history.rs`),
//! running or finished, merged by job id across the hosts of an ip_config.

use std::collections::BTreeMap;
use std::time::Duration;

use dglrun_proto::pb;
use serde::Serialize;

use crate::cluster::{AgentAccess, Host};
use crate::config::IpConfig;
use crate::launch::summary;
use crate::ops;

/// How long `JobRecords` may take on an agent that did answer Hello.
const RECORDS_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Some process runs on some host.
    Running,
    /// Every process on every host that knows it has ended.
    Finished,
    /// An agent restarted while the job ran: some ends were never seen.
    Interrupted,
}

#[derive(Debug, Serialize)]
pub struct JobSummary {
    pub job_id: String,
    pub state: JobState,
    pub started_unix_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_unix_ms: Option<u64>,
    /// As srun gives it: the worst code of a process that failed on its own (128 + signal
    /// for a signal); else 143 when a trainer was stopped before it ended; else 0. None while
    /// the job runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<u8>,
    /// The command of its first trainer process (of its first process when it has none).
    pub command: String,
    pub workspace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_by: Option<String>,
    pub hosts: Vec<HostPart>,
}

#[derive(Debug, Serialize)]
pub struct HostPart {
    pub machine: usize,
    pub address: String,
    pub processes: Vec<ProcessPart>,
    /// Output lines the host could not keep in its files.
    pub lost_lines: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ProcessPart {
    pub label: String,
    pub pid: u32,
    pub command: String,
    /// `running`, `exit 0`, `killed by SIGKILL`, `stopped (exit 143)`, `end unknown`.
    pub status: String,
    pub started_unix_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_unix_ms: Option<u64>,
}

/// A host that could not be asked.
#[derive(Debug, Serialize)]
pub struct Unreachable {
    pub machine: usize,
    pub address: String,
    pub error: String,
}

#[derive(Debug, Serialize)]
pub struct JobsReport {
    pub jobs: Vec<JobSummary>,
    pub unreachable: Vec<Unreachable>,
}

/// Why one host gave no job records.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordsError {
    #[error(transparent)]
    Connect(#[from] crate::cluster::ConnectError),
    #[error("no job records within {} s", RECORDS_TIMEOUT.as_secs())]
    Silent,
    #[error("the agent keeps no job records (an agent from before host-side logs: upgrade it)")]
    Unsupported,
    #[error("cannot read the job records: {}", .0.message())]
    Refused(Box<tonic::Status>),
}

/// One host's records, or why it could not give them.
pub(crate) async fn records(
    machine: usize,
    ip: std::net::IpAddr,
    access: &AgentAccess,
    job: &str,
) -> Result<(Host, Vec<pb::JobRecord>), RecordsError> {
    let mut host = ops::connect(machine, ip, access).await?;
    let call = host.client.job_records(pb::JobRecordsRequest {
        job_id: job.to_string(),
    });
    match tokio::time::timeout(RECORDS_TIMEOUT, call).await {
        Err(_) => Err(RecordsError::Silent),
        Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => Err(RecordsError::Unsupported),
        Ok(Err(s)) => Err(RecordsError::Refused(Box::new(s))),
        Ok(Ok(r)) => Ok((host, r.into_inner().jobs)),
    }
}

/// Asks every host at once; an unreachable host is named in the report, never fatal.
pub async fn jobs(ips: &IpConfig, access: &AgentAccess) -> JobsReport {
    let asks = ips.machines.iter().map(|m| async move {
        let address = format!("{}:{}", m.ip, access.port);
        (
            m.rank,
            address,
            records(m.rank, m.ip, access, "").await.map(|(_, r)| r),
        )
    });
    let answers = futures::future::join_all(asks).await;
    let mut unreachable = Vec::new();
    let mut found = Vec::new();
    for (machine, address, r) in answers {
        match r {
            Ok(records) => found.push((machine, address, records)),
            Err(error) => unreachable.push(Unreachable {
                machine,
                address,
                error: error.to_string(),
            }),
        }
    }
    JobsReport {
        jobs: merge(found),
        unreachable,
    }
}

fn exited(p: &pb::ProcessRecord) -> pb::ProcessExited {
    pb::ProcessExited {
        index: p.index,
        code: p.code,
        signal: p.signal,
        runtime_ms: p.ended_unix_ms.saturating_sub(p.started_unix_ms),
        stopped_by_agent: p.stopped_by_agent,
    }
}

fn process_status(p: &pb::ProcessRecord) -> String {
    if p.running {
        "running".into()
    } else if p.lost {
        "end unknown (agent restarted)".into()
    } else {
        summary::status_text(&exited(p))
    }
}

/// One host's record of a job: its machine, its address, the record.
type Part = (usize, String, pb::JobRecord);

/// Merges each host's records by job id, newest job first.
pub fn merge(hosts: Vec<(usize, String, Vec<pb::JobRecord>)>) -> Vec<JobSummary> {
    let mut by_id: BTreeMap<String, Vec<Part>> = BTreeMap::new();
    for (machine, address, records) in hosts {
        for r in records {
            by_id
                .entry(r.job_id.clone())
                .or_default()
                .push((machine, address.clone(), r));
        }
    }
    let mut jobs: Vec<JobSummary> = by_id
        .into_iter()
        .map(|(job_id, parts)| summarize(job_id, parts))
        .collect();
    jobs.sort_by(|a, b| {
        b.started_unix_ms
            .cmp(&a.started_unix_ms)
            .then_with(|| a.job_id.cmp(&b.job_id))
    });
    jobs
}

/// One job from every host's part of it.
fn summarize(job_id: String, mut parts: Vec<Part>) -> JobSummary {
    parts.sort_by_key(|p| p.0);
    let running = parts.iter().any(|(_, _, r)| r.ended_unix_ms == 0);
    let interrupted = parts
        .iter()
        .any(|(_, _, r)| r.interrupted || r.processes.iter().any(|p| p.lost));
    let all = || parts.iter().flat_map(|(_, _, r)| r.processes.iter());
    let worst = all()
        .filter(|p| !p.running && !p.lost)
        .map(exited)
        .filter(summary::is_failure)
        .map(|e| summary::exit_code(&e))
        .max()
        .unwrap_or(0);
    let state = job_state(running, interrupted);
    // A trainer stopped before it ended (Ctrl-C, `kill`, a lease that ran out): the job did
    // not succeed, whoever stopped it. Servers are stopped on success too.
    let cut_short = all().any(|p| p.stopped_by_agent && p.label.starts_with("trainer"));
    let command = all()
        .find(|p| p.label.starts_with("trainer"))
        .or_else(|| all().next())
        .map(|p| p.command.clone())
        .unwrap_or_default();
    JobSummary {
        started_unix_ms: parts
            .iter()
            .map(|(_, _, r)| r.started_unix_ms)
            .min()
            .unwrap_or(0),
        ended_unix_ms: (!running).then(|| {
            parts
                .iter()
                .map(|(_, _, r)| r.ended_unix_ms)
                .max()
                .unwrap_or(0)
        }),
        exit_code: job_exit_code(state, worst, cut_short),
        command,
        workspace: parts
            .first()
            .map(|(_, _, r)| r.workspace.clone())
            .unwrap_or_default(),
        stopped_by: parts
            .iter()
            .map(|(_, _, r)| r.stopped_by.clone())
            .find(|s| !s.is_empty()),
        hosts: parts.into_iter().map(host_part).collect(),
        state,
        job_id,
    }
}

fn job_state(running: bool, interrupted: bool) -> JobState {
    match (running, interrupted) {
        (true, _) => JobState::Running,
        (false, true) => JobState::Interrupted,
        (false, false) => JobState::Finished,
    }
}

/// The job's code as srun gives it, from the worst code of a process that failed on its own
/// and whether a trainer was stopped before it ended; None while it runs.
fn job_exit_code(state: JobState, worst: u8, cut_short: bool) -> Option<u8> {
    match state {
        JobState::Running => None,
        // An end nobody saw is no success.
        JobState::Interrupted => Some(worst.max(1)),
        JobState::Finished if worst == 0 && cut_short => {
            Some(crate::launch::driver::STOPPED_BY_OTHER_EXIT)
        }
        JobState::Finished => Some(worst),
    }
}

fn host_part((machine, address, r): Part) -> HostPart {
    HostPart {
        machine,
        address,
        processes: r.processes.iter().map(process_part).collect(),
        lost_lines: r.lost_lines,
        log_error: (!r.log_error.is_empty()).then_some(r.log_error),
    }
}

fn process_part(p: &pb::ProcessRecord) -> ProcessPart {
    ProcessPart {
        label: p.label.clone(),
        pid: p.pid,
        command: p.command.clone(),
        status: process_status(p),
        started_unix_ms: p.started_unix_ms,
        ended_unix_ms: (!p.running).then_some(p.ended_unix_ms),
    }
}

/// UTC time of a Unix time in milliseconds, `2026-12-01 11:36:12`.
pub fn utc(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The text form: one block per job, one line per host's processes; then the hosts that
/// could not be asked.
pub fn render(report: &JobsReport) -> String {
    let mut out = String::new();
    for j in &report.jobs {
        let state = match (j.state, j.exit_code) {
            (JobState::Running, _) => "running".to_string(),
            (JobState::Finished, Some(c)) => format!("finished, exit code {c}"),
            (JobState::Interrupted, Some(c)) => format!("interrupted, exit code {c}"),
            (_, None) => "ended".to_string(),
        };
        let ended = j
            .ended_unix_ms
            .map_or(String::new(), |e| format!(" - {}", utc(e)));
        out.push_str(&format!(
            "job {}  {state}  {}{ended} UTC\n    command {}\n",
            j.job_id,
            utc(j.started_unix_ms),
            j.command
        ));
        if let Some(by) = &j.stopped_by {
            out.push_str(&format!("    stopped by {by}\n"));
        }
        for h in &j.hosts {
            let procs: Vec<String> = h
                .processes
                .iter()
                .map(|p| format!("{} {}", p.label, p.status))
                .collect();
            out.push_str(&format!(
                "    m{} {}  {}\n",
                h.machine,
                h.address,
                procs.join(", ")
            ));
            if h.lost_lines > 0 {
                out.push_str(&format!(
                    "      {} output lines not kept on the host: {}\n",
                    h.lost_lines,
                    h.log_error.as_deref().unwrap_or("")
                ));
            }
        }
    }
    if report.jobs.is_empty() {
        out.push_str("no jobs\n");
    }
    for u in &report.unreachable {
        out.push_str(&format!(
            "m{} {}  UNREACHABLE  {}\n",
            u.machine, u.address, u.error
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(label: &str, code: i32, signal: i32, by_agent: bool) -> pb::ProcessRecord {
        pb::ProcessRecord {
            label: label.into(),
            command: format!("run {label}"),
            started_unix_ms: 1000,
            ended_unix_ms: 2000,
            code,
            signal,
            stopped_by_agent: by_agent,
            ..Default::default()
        }
    }

    fn rec(id: &str, started: u64, ended: u64, p: Vec<pb::ProcessRecord>) -> pb::JobRecord {
        pb::JobRecord {
            job_id: id.into(),
            started_unix_ms: started,
            ended_unix_ms: ended,
            processes: p,
            ..Default::default()
        }
    }

    #[test]
    fn a_job_state_and_code_come_from_its_ends() {
        use JobState::{Finished, Interrupted, Running};
        let stopped = crate::launch::driver::STOPPED_BY_OTHER_EXIT;
        // (running, interrupted, worst, cut_short) -> (state, code)
        let cases = [
            ((true, false, 0, false), (Running, None)),
            ((true, true, 3, true), (Running, None)),
            ((false, true, 0, false), (Interrupted, Some(1))),
            ((false, true, 7, false), (Interrupted, Some(7))),
            ((false, false, 0, false), (Finished, Some(0))),
            ((false, false, 0, true), (Finished, Some(stopped))),
            // A process's own failure outranks a stop.
            ((false, false, 2, true), (Finished, Some(2))),
            ((false, false, 137, false), (Finished, Some(137))),
        ];
        for ((running, interrupted, worst, cut_short), want) in cases {
            let state = job_state(running, interrupted);
            assert_eq!(
                (state, job_exit_code(state, worst, cut_short)),
                want,
                "{running} {interrupted} {worst} {cut_short}"
            );
        }
    }

    #[test]
    fn jobs_merge_across_hosts_with_the_worst_exit() {
        let hosts = vec![
            (
                0,
                "a:1".to_string(),
                vec![
                    rec(
                        "j1",
                        100,
                        300,
                        vec![proc("server0", -1, 15, true), proc("trainer0", 0, 0, false)],
                    ),
                    rec(
                        "j2",
                        500,
                        0,
                        vec![pb::ProcessRecord {
                            running: true,
                            ..proc("trainer0", -1, 0, false)
                        }],
                    ),
                ],
            ),
            (
                1,
                "b:1".to_string(),
                vec![rec("j1", 90, 400, vec![proc("trainer1", -1, 9, false)])],
            ),
        ];
        let jobs = merge(hosts);
        assert_eq!(jobs[0].job_id, "j2");
        assert_eq!(jobs[0].state, JobState::Running);
        assert_eq!(jobs[0].exit_code, None);
        let j1 = &jobs[1];
        assert_eq!((j1.started_unix_ms, j1.ended_unix_ms), (90, Some(400)));
        // SIGKILL on its own: 128 + 9; the server the agent stopped does not count.
        assert_eq!(j1.exit_code, Some(137));
        assert_eq!(j1.command, "run trainer0");
        assert_eq!(j1.hosts.len(), 2);
        assert_eq!(j1.hosts[1].processes[0].status, "killed by SIGKILL");
    }

    #[test]
    fn utc_times() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_796_126_172_000), "2026-12-01 11:56:12");
    }
}
