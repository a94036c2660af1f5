//! Job records: what the agent keeps of each launch job, running or finished, beside its
//! output files.
//!
//! Layout under the root (every access through the root's directory fd, see `confine`):
//!
//! ```text
//! .dglrun/jobs/<job id>/job.json            this record (JSON, [`JobRecord`])
//! .dglrun/jobs/<job id>/<stem>.out, .err    a process's stdout and stderr, as written
//! .dglrun/jobs/<job id>/<stem>.out.1, ...   the previous file after a rotation
//! ```
//!
//! `<stem>` is the process's label when it is a plain file name unique in the job, else
//! `p<index>`; the record names each process's files. The record is written by the host-log
//! writer (`host_log`) whenever a process starts or ends, the job is stopped, or lines were
//! lost; the in-memory copy here is what `JobRecords` and `ReadLogs` answer from.
//!
//! This is the agent's API for whoever needs a job's outcome after the fact (`dgl-coord jobs`,
//! `logs`, and a supervisor waiting for a job): a record with `ended_unix_ms` set is final.
//! A record left unfinished by an agent that died is closed by the next run
//! ([`History::load`]): `interrupted`, its running processes `lost`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use dglrun_proto::pb;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// The record's file name in the job's directory.
pub const RECORD_NAME: &str = "job.json";
/// Where job directories live, relative to the root.
pub const JOBS_DIR: &str = ".dglrun/jobs";
/// Longest command text kept per process.
pub const MAX_COMMAND: usize = 4096;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    pub workspace: PathBuf,
    pub started_unix_ms: u64,
    /// Set once every process of the job has ended; the record is final from then on.
    #[serde(default)]
    pub ended_unix_ms: Option<u64>,
    pub processes: Vec<ProcessRecord>,
    #[serde(default)]
    pub stopped_by: Option<String>,
    /// Lines not kept in the files (write errors, or the writer falling behind).
    #[serde(default)]
    pub lost_lines: u64,
    #[serde(default)]
    pub log_error: Option<String>,
    /// The agent restarted while the job ran.
    #[serde(default)]
    pub interrupted: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub index: u32,
    pub label: String,
    pub command: String,
    pub pid: u32,
    pub started_unix_ms: u64,
    #[serde(default)]
    pub ended_unix_ms: Option<u64>,
    /// Exit code; -1 with `signal` set when a signal ended it.
    #[serde(default)]
    pub code: Option<i32>,
    #[serde(default)]
    pub signal: i32,
    #[serde(default)]
    pub stopped_by_agent: bool,
    /// Its end was never seen (the agent restarted meanwhile).
    #[serde(default)]
    pub lost: bool,
    /// File name stem of its output: `<stem>.out`, `<stem>.err`.
    pub stem: String,
}

impl JobRecord {
    pub fn dir(&self) -> String {
        format!("{JOBS_DIR}/{}", self.job_id)
    }

    pub fn to_pb(&self) -> pb::JobRecord {
        let dir = self.dir();
        pb::JobRecord {
            job_id: self.job_id.clone(),
            workspace: self.workspace.display().to_string(),
            started_unix_ms: self.started_unix_ms,
            ended_unix_ms: self.ended_unix_ms.unwrap_or(0),
            processes: self
                .processes
                .iter()
                .map(|p| pb::ProcessRecord {
                    index: p.index,
                    label: p.label.clone(),
                    command: p.command.clone(),
                    pid: p.pid,
                    started_unix_ms: p.started_unix_ms,
                    ended_unix_ms: p.ended_unix_ms.unwrap_or(0),
                    running: p.ended_unix_ms.is_none(),
                    code: p.code.unwrap_or(-1),
                    signal: p.signal,
                    stopped_by_agent: p.stopped_by_agent,
                    lost: p.lost,
                    stdout_file: format!("{dir}/{}.out", p.stem),
                    stderr_file: format!("{dir}/{}.err", p.stem),
                })
                .collect(),
            stopped_by: self.stopped_by.clone().unwrap_or_default(),
            lost_lines: self.lost_lines,
            log_error: self.log_error.clone().unwrap_or_default(),
            interrupted: self.interrupted,
        }
    }

    /// The stem for a new process: its label when that is a plain, unused file name.
    pub fn stem_for(&self, index: u32, label: &str) -> String {
        let plain = !label.is_empty()
            && label.len() <= 64
            && !label.starts_with('.')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        let taken = |s: &str| self.processes.iter().any(|p| p.stem == s);
        if plain && !taken(label) && label != "job" {
            label.to_string()
        } else {
            let mut stem = format!("p{index}");
            while taken(&stem) {
                stem.push('_');
            }
            stem
        }
    }

    /// Closes a record whose agent died while the job ran.
    pub fn close_interrupted(&mut self, now_ms: u64) {
        self.interrupted = true;
        self.ended_unix_ms = Some(now_ms);
        for p in &mut self.processes {
            if p.ended_unix_ms.is_none() {
                p.ended_unix_ms = Some(now_ms);
                p.lost = true;
            }
        }
    }
}

/// The records the agent holds, shared by the writer (which changes them) and the readers.
#[derive(Default)]
pub struct History {
    records: Mutex<BTreeMap<String, JobRecord>>,
}

impl History {
    pub fn get(&self, job: &str) -> Option<JobRecord> {
        self.records.lock().get(job).cloned()
    }

    pub fn all(&self) -> Vec<JobRecord> {
        self.records.lock().values().cloned().collect()
    }

    pub fn ended(&self, job: &str) -> Option<bool> {
        self.records
            .lock()
            .get(job)
            .map(|r| r.ended_unix_ms.is_some())
    }

    pub(super) fn update<T>(&self, job: &str, f: impl FnOnce(&mut JobRecord) -> T) -> Option<T> {
        self.records.lock().get_mut(job).map(f)
    }

    pub(super) fn insert(&self, r: JobRecord) {
        self.records.lock().insert(r.job_id.clone(), r);
    }

    pub(super) fn remove(&self, job: &str) {
        self.records.lock().remove(job);
    }
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_are_plain_unique_file_names() {
        let mut r = JobRecord::default();
        for (i, label) in ["server0", "server0", "../x", "job", ".hidden", "p1"]
            .iter()
            .enumerate()
        {
            let stem = r.stem_for(i as u32, label);
            r.processes.push(ProcessRecord {
                index: i as u32,
                stem,
                ..ProcessRecord::default()
            });
        }
        let stems: Vec<&str> = r.processes.iter().map(|p| p.stem.as_str()).collect();
        assert_eq!(stems, ["server0", "p1", "p2", "p3", "p4", "p5"]);
    }

    #[test]
    fn an_interrupted_record_is_closed_with_its_running_processes_lost() {
        let mut r = JobRecord {
            processes: vec![
                ProcessRecord {
                    ended_unix_ms: Some(5),
                    code: Some(0),
                    ..ProcessRecord::default()
                },
                ProcessRecord::default(),
            ],
            ..JobRecord::default()
        };
        r.close_interrupted(9);
        assert!(r.interrupted);
        assert_eq!(r.ended_unix_ms, Some(9));
        assert!(!r.processes[0].lost && r.processes[1].lost);
        let back: JobRecord = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
