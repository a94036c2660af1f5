//! Workspace leases: a workspace serves one job at a time, and never a launch and a copy at
//! once.
//!
//! A job holds its workspace from its first Spawn until it is stopped, over, or forgotten; a
//! copy holds the workspaces of the files it still has to send, from the PrepareFiles that
//! said so until each of them was written (or reported present by a later PrepareFiles, the
//! copy's closing check), or until it has been idle for [`COPY_IDLE`]. So:
//! * a Spawn of a new job into a workspace held by another job or by a copy is refused,
//!   naming the holder; so is a Preflight into a workspace being copied into;
//! * a copy that would change a file in the workspace of a running job is refused (one whose
//!   files are all present and unchanged needs to send nothing, and passes).
//!
//! Every check and claim happens under one lock, so a launch and a copy that race are ordered:
//! whichever comes second is refused.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::jobs::job::Job;

/// A copy that sent nothing for this long has been abandoned: it no longer holds anything.
pub const COPY_IDLE: Duration = Duration::from_secs(30);
/// Copies held at once; past this the oldest idle one is let go first.
const MAX_COPIES: usize = 256;
/// Paths one copy hold remembers (a PrepareFiles names at most a few thousand files).
const MAX_PENDING: usize = 100_000;

/// Why a workspace cannot be used now. Messages name the holder so the user can act on it.
#[derive(Debug, thiserror::Error)]
pub enum Held {
    #[error(
        "workspace {workspace} is in use by job {job} (started {started}); stop it first \
         (dgl-coord kill --job {job}) or launch into another workspace"
    )]
    Job {
        workspace: String,
        job: String,
        started: String,
    },
    #[error(
        "workspace {workspace} is being copied into: a copy of {files} files began {age} s ago \
         and {pending} of them are still to come (such as {example}); launch once the copy \
         has finished"
    )]
    Copy {
        workspace: String,
        files: usize,
        pending: usize,
        age: u64,
        example: String,
    },
    #[error(
        "{path} would change in workspace {workspace} while job {job} (started {started}) runs \
         there; only files already present and unchanged may be copied into a running job's \
         workspace: stop the job first (dgl-coord kill --job {job})"
    )]
    ChangedUnderJob {
        path: String,
        workspace: String,
        job: String,
        started: String,
    },
}

struct JobHold {
    workspace: PathBuf,
    job: Weak<Job>,
}

struct CopyHold {
    files: usize,
    pending: HashSet<PathBuf>,
    since: Instant,
    last_activity: Instant,
    /// PutFiles of its files in progress: a slow transfer is not idleness.
    writing: usize,
}

impl CopyHold {
    fn active(&self, now: Instant) -> bool {
        !self.pending.is_empty()
            && (self.writing > 0 || now.duration_since(self.last_activity) < COPY_IDLE)
    }
}

#[derive(Default)]
struct Inner {
    jobs: Vec<JobHold>,
    copies: Vec<CopyHold>,
}

#[derive(Default)]
pub struct Workspaces {
    inner: Mutex<Inner>,
}

/// Whether `job` still holds its workspace: not forgotten, not cleanly stopped, and not over
/// (every process exited after a stop or a lease expiry).
fn holds(job: &Job) -> bool {
    let st = job.state();
    !st.gone && !st.clean && !(st.finished_at.is_some() && (st.stopping || st.lease_stopped))
}

/// When `job` started, as a person reads it: the UTC time of day and how long ago.
fn started(job: &Job) -> String {
    let first = {
        let st = job.state();
        st.procs
            .iter()
            .map(|p| p.started)
            .min()
            .unwrap_or(st.renewed)
    };
    let age = first.elapsed();
    let secs = SystemTime::now()
        .checked_sub(age)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    format!(
        "at {:02}:{:02}:{:02} UTC, {} s ago",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60,
        age.as_secs()
    )
}

impl Inner {
    fn prune(&mut self, now: Instant) {
        self.jobs
            .retain(|h| h.job.upgrade().is_some_and(|j| holds(&j)));
        self.copies.retain(|c| c.active(now));
    }

    /// The running job holding `workspace` other than `except`, if any.
    fn job_in(&self, workspace: &Path, except: Option<&str>) -> Option<Arc<Job>> {
        self.jobs
            .iter()
            .filter(|h| h.workspace == workspace)
            .filter_map(|h| h.job.upgrade())
            .find(|j| except != Some(j.id.as_str()) && holds(j))
    }

    /// The running job whose workspace contains `path`.
    fn job_over(&self, path: &Path) -> Option<(PathBuf, Arc<Job>)> {
        self.jobs
            .iter()
            .filter(|h| path.starts_with(&h.workspace))
            .filter_map(|h| Some((h.workspace.clone(), h.job.upgrade()?)))
            .find(|(_, j)| holds(j))
    }

    fn copy_into(&self, workspace: &Path, now: Instant) -> Result<(), Held> {
        for c in self.copies.iter().filter(|c| c.active(now)) {
            let mut inside = c.pending.iter().filter(|p| p.starts_with(workspace));
            if let Some(example) = inside.next() {
                return Err(Held::Copy {
                    workspace: workspace.display().to_string(),
                    files: c.files,
                    pending: 1 + inside.count(),
                    age: now.duration_since(c.since).as_secs(),
                    example: example.display().to_string(),
                });
            }
        }
        Ok(())
    }
}

impl Workspaces {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update is one step: the state stays consistent across a panicking holder.
        self.inner.lock()
    }

    /// Before a launch's Preflight: refused while a copy into `workspace` is under way. (Jobs
    /// running there are reported by Preflight itself, so `--kill-stale` can stop them.)
    pub fn check_launch(&self, workspace: &Path) -> Result<(), Held> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.prune(now);
        inner.copy_into(workspace, now)
    }

    /// At a new job's first Spawn: claims `workspace` for `job`, or says who holds it.
    pub fn claim_for_job(&self, workspace: &Path, job: &Arc<Job>) -> Result<(), Held> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.prune(now);
        if let Some(other) = inner.job_in(workspace, Some(job.id.as_str())) {
            return Err(Held::Job {
                workspace: workspace.display().to_string(),
                job: other.id.to_string(),
                started: started(&other),
            });
        }
        inner.copy_into(workspace, now)?;
        if !inner
            .jobs
            .iter()
            .any(|h| h.job.upgrade().is_some_and(|j| j.id == job.id))
        {
            inner.jobs.push(JobHold {
                workspace: workspace.to_path_buf(),
                job: Arc::downgrade(job),
            });
        }
        Ok(())
    }

    /// After a PrepareFiles: `sending` are the files it asked for, `present` those already
    /// there. Refused when a file to send lies in a running job's workspace; otherwise the
    /// files to send hold their workspaces until written, and present ones no longer do.
    pub fn note_prepare(&self, sending: Vec<PathBuf>, present: &[PathBuf]) -> Result<(), Held> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.prune(now);
        for path in &sending {
            if let Some((workspace, job)) = inner.job_over(path) {
                return Err(Held::ChangedUnderJob {
                    path: path.display().to_string(),
                    workspace: workspace.display().to_string(),
                    job: job.id.to_string(),
                    started: started(&job),
                });
            }
        }
        for c in &mut inner.copies {
            for p in present.iter().chain(&sending) {
                // A file asked for again belongs to the newer copy (a retry of the same one).
                c.pending.remove(p);
            }
        }
        if sending.is_empty() {
            return Ok(());
        }
        if inner.copies.len() >= MAX_COPIES {
            // The one idle longest goes first.
            if let Some(i) = (0..inner.copies.len()).min_by_key(|&i| inner.copies[i].last_activity)
            {
                let c = inner.copies.swap_remove(i);
                tracing::warn!(
                    pending = c.pending.len(),
                    "too many copies in progress: letting go of the oldest one's workspace hold"
                );
            }
        }
        let files = sending.len();
        inner.copies.push(CopyHold {
            files,
            pending: sending.into_iter().take(MAX_PENDING).collect(),
            since: now,
            last_activity: now,
            writing: 0,
        });
        Ok(())
    }

    /// At the start of a PutFile of `target`: refused in a running job's workspace; otherwise
    /// the copy it belongs to stays held while it runs. Call [`Writing::written`] on success.
    pub fn writing(self: &Arc<Self>, target: &Path) -> Result<Writing, Held> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.prune(now);
        if let Some((workspace, job)) = inner.job_over(target) {
            return Err(Held::ChangedUnderJob {
                path: target.display().to_string(),
                workspace: workspace.display().to_string(),
                job: job.id.to_string(),
                started: started(&job),
            });
        }
        for c in inner
            .copies
            .iter_mut()
            .filter(|c| c.pending.contains(target))
        {
            c.writing += 1;
            c.last_activity = now;
        }
        Ok(Writing {
            workspaces: self.clone(),
            target: target.to_path_buf(),
            written: false,
        })
    }
}

/// One PutFile in progress; dropping it ends it.
pub struct Writing {
    workspaces: Arc<Workspaces>,
    target: PathBuf,
    written: bool,
}

impl Writing {
    /// The file is in place and verified: it no longer holds its copy's workspace.
    pub fn written(mut self) {
        self.written = true;
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut inner = self.workspaces.lock();
        for c in inner
            .copies
            .iter_mut()
            .filter(|c| c.pending.contains(&self.target))
        {
            c.writing = c.writing.saturating_sub(1);
            c.last_activity = now;
            if self.written {
                c.pending.remove(&self.target);
            }
        }
    }
}

/// PrepareFiles' targets split by its answers: those to send, and those already present.
pub fn split_prepared(
    targets: Vec<PathBuf>,
    states: &[(dglrun_proto::pb::FileState, u64)],
) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let present = dglrun_proto::pb::FileStatus::Present as i32;
    let (present, sending): (Vec<_>, Vec<_>) = targets
        .into_iter()
        .zip(states)
        .partition(|(_, (s, _))| s.status == present);
    (
        sending.into_iter().map(|(t, _)| t).collect(),
        present.into_iter().map(|(t, _)| t).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, ws: &Path) -> Arc<Job> {
        let j = Arc::new(Job::new(
            crate::jobs::spec::JobId::parse(id.into()).unwrap(),
            ws.into(),
            Path::new("/r"),
            Duration::from_secs(10),
            crate::limits::MAX_WATCHES_PER_JOB,
        ));
        j.add_process("server0", 1, None, None, Instant::now());
        j
    }

    #[test]
    fn a_second_job_is_refused_naming_the_first_until_it_is_stopped() {
        let w = Arc::new(Workspaces::default());
        let ws = Path::new("/r/ws");
        let a = job("a", ws);
        w.claim_for_job(ws, &a).unwrap();
        // The same job's later Spawns are its own.
        w.claim_for_job(ws, &a).unwrap();
        let err = w.claim_for_job(ws, &job("b", ws)).unwrap_err().to_string();
        assert!(err.contains("in use by job a (started at "), "{err}");
        // Another workspace is free.
        w.claim_for_job(Path::new("/r/other"), &job("c", Path::new("/r/other")))
            .unwrap();
        a.state().clean = true;
        w.claim_for_job(ws, &job("b", ws)).unwrap();
    }

    #[test]
    fn a_copy_holds_its_workspace_until_its_files_are_written() {
        let w = Arc::new(Workspaces::default());
        let ws = Path::new("/r/ws");
        let files = vec![ws.join("a"), ws.join("data/b")];
        w.note_prepare(files.clone(), &[]).unwrap();
        let err = w.check_launch(ws).unwrap_err().to_string();
        assert!(err.contains("a copy of 2 files"), "{err}");
        assert!(w.claim_for_job(ws, &job("j", ws)).is_err());
        // A copy elsewhere does not hold this workspace.
        w.check_launch(Path::new("/r/other")).unwrap();

        w.writing(&files[0]).unwrap().written();
        // A failed transfer leaves its file to come.
        drop(w.writing(&files[1]).unwrap());
        let err = w.check_launch(ws).unwrap_err().to_string();
        assert!(err.contains("1 of them are still to come"), "{err}");
        // The copy's closing check finds it present.
        w.note_prepare(Vec::new(), &files[1..]).unwrap();
        w.check_launch(ws).unwrap();
        w.claim_for_job(ws, &job("j", ws)).unwrap();
    }

    #[test]
    fn under_a_running_job_only_unchanged_files_may_be_copied() {
        let w = Arc::new(Workspaces::default());
        let ws = Path::new("/r/ws");
        let j = job("j", ws);
        w.claim_for_job(ws, &j).unwrap();
        w.note_prepare(Vec::new(), &[ws.join("a")]).unwrap();
        let err = w.note_prepare(vec![ws.join("a")], &[]).unwrap_err();
        assert!(err.to_string().contains("while job j"), "{err}");
        assert!(w.writing(&ws.join("x")).is_err());
        // Outside the workspace, anything goes.
        w.note_prepare(vec![Path::new("/r/elsewhere/a").into()], &[])
            .unwrap();
        j.forget();
        w.note_prepare(vec![ws.join("a")], &[]).unwrap();
    }
}
