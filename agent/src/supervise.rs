//! Detached jobs: this agent (machine 0's) runs the launch's driver for them
//! (`dglrun_coordinator::launch::supervised`) and keeps each one's outcome for `WaitJob`.
//!
//! The outcomes are kept in `<root>/.dglrun/supervised.json` (the newest `MAX_RECORDS`), so a
//! `wait` after the fact, or after this agent restarted, still gets an answer: a job that was
//! still running when the previous agent ended is recorded as lost then, since its driver
//! died with that agent (this host's processes were stopped by the restart, the other hosts
//! stop theirs when their lease runs out).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use dglrun_coordinator::cluster::AgentAccess;
use dglrun_coordinator::launch::supervised::{self, Supervision};
use dglrun_proto::pb;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Semaphore};
use tonic::Status;

/// Jobs supervised at once.
pub const MAX_SUPERVISED: usize = 16;
/// Outcomes kept (the oldest finished ones go first).
pub const MAX_RECORDS: usize = 256;
/// `WaitJob` calls waiting at once.
pub const MAX_WAITERS: usize = 256;
/// The end of a job's text that is kept (the table and the exit code are at its end).
pub const MAX_TEXT_BYTES: usize = 64 << 10;

const FILE_NAME: &str = "supervised.json";
/// Starts with `.tmp`: the restart clean-up removes it after an interrupted write.
const TMP_NAME: &str = ".tmp-supervised.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub exit_code: u8,
    pub text: String,
    pub outcome: String,
    pub ended_unix_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    job_id: String,
    started_unix_ms: u64,
    outcome: Option<Outcome>,
}

struct Entry {
    started_unix_ms: u64,
    /// None while the job runs.
    done: watch::Sender<Option<Outcome>>,
    /// Order of arrival, for the bound on records.
    n: u64,
}

/// Why this agent cannot reach the other agents of its cluster, so it supervises nothing.
#[derive(Debug, thiserror::Error)]
pub enum NoPeerAccess {
    #[error(
        "this agent has no token (it admits certified TLS peers only): it reaches the other \
         agents with its token, so detached jobs need agents sharing one"
    )]
    NoToken,
    #[error("cannot set up access to the other agents: {0}")]
    Setup(#[source] dglrun_coordinator::cluster::AccessError),
    #[error("this agent was not set up to supervise jobs")]
    Disabled,
}

pub struct Supervisor {
    /// How this agent reaches the others; the reason it cannot when it has no token.
    access: Result<AgentAccess, NoPeerAccess>,
    entries: Mutex<BTreeMap<String, Entry>>,
    next: Mutex<u64>,
    dir: PathBuf,
    /// Writes of the record file, one at a time (each writes the newest state).
    writing: Arc<Mutex<()>>,
    waiters: Arc<Semaphore>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The last `MAX_TEXT_BYTES` of `text`, cut at a character boundary.
fn bounded(mut text: String) -> String {
    if text.len() <= MAX_TEXT_BYTES {
        return text;
    }
    let mut cut = text.len() - MAX_TEXT_BYTES;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    text.replace_range(..cut, "[...]\n");
    text
}

impl Supervisor {
    /// One that supervises nothing and keeps no file.
    pub fn disabled() -> Arc<Self> {
        Self::new(PathBuf::new(), Err(NoPeerAccess::Disabled))
    }

    fn new(dir: PathBuf, access: Result<AgentAccess, NoPeerAccess>) -> Arc<Self> {
        Arc::new(Self {
            access,
            entries: Mutex::new(BTreeMap::new()),
            next: Mutex::new(0),
            dir,
            writing: Arc::new(Mutex::new(())),
            waiters: Arc::new(Semaphore::new(MAX_WAITERS)),
        })
    }

    /// Reads what the previous run left in `state_dir`; a job it was still supervising is
    /// recorded as lost.
    pub fn start(state_dir: PathBuf, access: Result<AgentAccess, NoPeerAccess>) -> Arc<Self> {
        let s = Self::new(state_dir, access);
        let records = match std::fs::read(s.dir.join(FILE_NAME)) {
            Ok(b) => serde_json::from_slice::<Vec<Record>>(&b).unwrap_or_else(|e| {
                tracing::warn!("ignoring {}: {e}", s.dir.join(FILE_NAME).display());
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        let mut lost = 0;
        for r in records {
            let outcome = r.outcome.unwrap_or_else(|| {
                lost += 1;
                tracing::warn!(job = %r.job_id, "a detached job this agent supervised was still running when it last stopped: recorded as lost");
                Outcome {
                    exit_code: 1,
                    text: format!(
                        "dgl-coord: job failed: the agent of machine 0, which supervised job {}, \
                         restarted before the job ended: its processes on that host were \
                         stopped then, and the other hosts stopped theirs when their lease ran \
                         out\n",
                        r.job_id
                    ),
                    outcome: "lost".to_string(),
                    ended_unix_ms: now_ms(),
                }
            });
            s.insert(&r.job_id, r.started_unix_ms, Some(outcome));
        }
        if lost > 0 {
            s.save_now();
        }
        s
    }

    /// Takes `job_id` for a new supervised job (running), in one step with the checks, so two
    /// calls naming one job cannot both start it.
    fn reserve(&self, job_id: &str) -> Result<(), Status> {
        let mut entries = self.entries.lock();
        if entries.contains_key(job_id) {
            return Err(Status::already_exists(format!(
                "job {job_id} is already supervised here"
            )));
        }
        let running = entries
            .values()
            .filter(|e| e.done.borrow().is_none())
            .count();
        if running >= MAX_SUPERVISED {
            return Err(Status::resource_exhausted(format!(
                "this agent already supervises {MAX_SUPERVISED} detached jobs"
            )));
        }
        self.insert_into(&mut entries, job_id, now_ms(), None);
        Ok(())
    }

    fn insert(&self, job_id: &str, started_unix_ms: u64, outcome: Option<Outcome>) {
        let mut entries = self.entries.lock();
        self.insert_into(&mut entries, job_id, started_unix_ms, outcome);
    }

    fn insert_into(
        &self,
        entries: &mut BTreeMap<String, Entry>,
        job_id: &str,
        started_unix_ms: u64,
        outcome: Option<Outcome>,
    ) {
        let n = {
            let mut next = self.next.lock();
            *next += 1;
            *next
        };
        entries.insert(
            job_id.to_string(),
            Entry {
                started_unix_ms,
                done: watch::Sender::new(outcome),
                n,
            },
        );
        // The oldest finished ones go first; running ones are never dropped.
        while entries.len() > MAX_RECORDS {
            let oldest = entries
                .iter()
                .filter(|(_, e)| e.done.borrow().is_some())
                .min_by_key(|(_, e)| e.n)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(id) => entries.remove(&id),
                None => break,
            };
        }
    }

    fn snapshot(&self) -> Vec<Record> {
        let entries = self.entries.lock();
        let mut v: Vec<(u64, Record)> = entries
            .iter()
            .map(|(id, e)| {
                (
                    e.n,
                    Record {
                        job_id: id.clone(),
                        started_unix_ms: e.started_unix_ms,
                        outcome: e.done.borrow().clone(),
                    },
                )
            })
            .collect();
        v.sort_by_key(|(n, _)| *n);
        v.into_iter().map(|(_, r)| r).collect()
    }

    /// Writes the newest state (temporary file, rename). A failure is logged: the job goes on.
    fn save_now(&self) {
        let _one = self.writing.lock();
        let records = self.snapshot();
        let write = || -> std::io::Result<()> {
            let json = serde_json::to_vec(&records).map_err(std::io::Error::other)?;
            std::fs::create_dir_all(&self.dir)?;
            std::fs::write(self.dir.join(TMP_NAME), json)?;
            std::fs::rename(self.dir.join(TMP_NAME), self.dir.join(FILE_NAME))
        };
        if let Err(e) = write() {
            tracing::warn!(
                "cannot write {}: {e}; `dgl-coord wait` after a restart of this agent will not know its jobs",
                self.dir.join(FILE_NAME).display()
            );
        }
    }

    async fn save(self: &Arc<Self>) {
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.save_now()).await;
    }

    /// Supervise: checks, reaches every agent, starts the driver; answers once every process
    /// started or starting failed. The driver runs on whatever becomes of this call.
    pub async fn supervise(self: &Arc<Self>, s: Supervision) -> Result<pb::SuperviseReply, Status> {
        let access = match &self.access {
            Ok(a) => a.clone(),
            Err(e) => return Err(Status::failed_precondition(e.to_string())),
        };
        let job_id = s.job_id.clone();
        self.reserve(&job_id)?;
        let hosts = match supervised::connect(&s, &access).await {
            Ok(h) => h,
            Err(e) => {
                self.entries.lock().remove(&job_id);
                return Err(crate::status::supervise(e));
            }
        };
        self.save().await;
        let mut done = match self.entries.lock().get(&job_id) {
            Some(e) => e.done.subscribe(),
            None => return Err(Status::internal("the job's record vanished")),
        };
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let me = self.clone();
        tokio::spawn(async move {
            tracing::info!(job = %job_id, "supervising a detached job");
            let f = supervised::run(s, hosts, access, started_tx).await;
            let outcome = Outcome {
                exit_code: f.code,
                text: bounded(f.text),
                outcome: f.outcome,
                ended_unix_ms: now_ms(),
            };
            tracing::info!(job = %job_id, code = outcome.exit_code, outcome = %outcome.outcome, "a detached job ended");
            if let Some(e) = me.entries.lock().get(&job_id) {
                e.done.send_replace(Some(outcome));
            }
            me.save().await;
        });
        if started_rx.await.is_ok() {
            return Ok(pb::SuperviseReply {
                started: true,
                ..Default::default()
            });
        }
        // Starting failed: the driver stopped what had started and ends now.
        let o = wait_done(&mut done).await;
        Ok(pb::SuperviseReply {
            started: false,
            exit_code: u32::from(o.exit_code),
            text: o.text,
        })
    }

    /// WaitJob: until the job is over.
    pub async fn wait(&self, req: pb::WaitJobRequest) -> Result<pb::WaitJobReply, Status> {
        let _permit = self.waiters.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!("{MAX_WAITERS} waits are already open here"))
        })?;
        let (started_unix_ms, mut done) = match self.entries.lock().get(&req.job_id) {
            Some(e) => (e.started_unix_ms, e.done.subscribe()),
            None => {
                return Err(Status::not_found(format!(
                    "this agent supervises no job {:?} (only detached jobs are supervised, by \
                     the agent of machine 0; it keeps the newest {MAX_RECORDS})",
                    req.job_id
                )))
            }
        };
        let o = wait_done(&mut done).await;
        Ok(pb::WaitJobReply {
            exit_code: u32::from(o.exit_code),
            text: o.text,
            outcome: o.outcome,
            started_unix_ms,
            ended_unix_ms: o.ended_unix_ms,
        })
    }
}

async fn wait_done(done: &mut watch::Receiver<Option<Outcome>>) -> Outcome {
    loop {
        if let Some(o) = done.borrow_and_update().clone() {
            return o;
        }
        if done.changed().await.is_err() {
            // Never: the sender lives in the map until the record is dropped, and only
            // finished records are.
            return Outcome {
                exit_code: 1,
                text: String::new(),
                outcome: "lost".to_string(),
                ended_unix_ms: now_ms(),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_text_keeps_its_end() {
        let t = "é".repeat(MAX_TEXT_BYTES) + "exit code 3\n";
        let b = bounded(t);
        assert!(b.len() <= MAX_TEXT_BYTES + 8);
        assert!(b.starts_with("[...]\n") && b.ends_with("exit code 3\n"));
    }

    #[test]
    fn one_job_id_is_supervised_once_and_running_jobs_are_bounded() {
        let s = Supervisor::disabled();
        s.reserve("j").unwrap();
        assert_eq!(
            s.reserve("j").unwrap_err().code(),
            tonic::Code::AlreadyExists
        );
        for i in 1..MAX_SUPERVISED {
            s.reserve(&format!("j{i}")).unwrap();
        }
        let e = s.reserve("one-more").unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    }

    #[test]
    fn a_job_running_when_the_agent_stopped_is_recorded_as_lost() {
        let dir = tempfile::tempdir().unwrap();
        let s = Supervisor::start(dir.path().to_path_buf(), Err(NoPeerAccess::NoToken));
        s.insert("j1", 1, None);
        s.insert(
            "j2",
            2,
            Some(Outcome {
                exit_code: 0,
                text: "ok".into(),
                outcome: "success".into(),
                ended_unix_ms: 3,
            }),
        );
        s.save_now();
        let again = Supervisor::start(dir.path().to_path_buf(), Err(NoPeerAccess::NoToken));
        let recs = again.snapshot();
        assert_eq!(recs.len(), 2);
        let j1 = recs[0].outcome.as_ref().unwrap();
        assert_eq!((j1.exit_code, j1.outcome.as_str()), (1, "lost"));
        assert!(j1.text.contains("restarted"), "{}", j1.text);
        assert_eq!(recs[1].outcome.as_ref().unwrap().outcome, "success");
    }
}
