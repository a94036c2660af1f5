//! The agent's record of its running jobs, `<root>/.dglrun/jobs.json`.
//!
//! It exists for the next run of the agent: after a crash, a SIGKILL or an upgrade, the new
//! agent reads it to find the processes the old one started (see `recover`). Each direct child
//! is named by pid *and* start time, because after a restart a recorded pid may long since
//! belong to an unrelated process. Descendants are not listed: they carry the marker variables.
//!
//! Written whenever a Spawn started processes and whenever a job is forgotten, atomically
//! (temporary file, rename), so an agent dying mid-write leaves the previous record whole.
//! Not fsynced: the record only matters while the machine stays up (a power cut ends the
//! processes it names too), and an agent crash does not lose the page cache.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use parking_lot::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

pub const FILE_NAME: &str = "jobs.json";
/// The one temporary name: writes are serialised and one agent owns a root at a time.
pub const TMP_NAME: &str = "jobs.json.tmp";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The agent that wrote the record (for the log of the next run).
    pub agent_pid: u32,
    pub jobs: Vec<JobRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub workspace: PathBuf,
    pub processes: Vec<ProcRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRecord {
    pub label: String,
    pub pid: i32,
    /// `/proc/<pid>/stat` field 22, clock ticks after boot.
    pub start: u64,
}

pub struct StateFile {
    dir: PathBuf,
    /// Orders snapshots: taken (in memory, cheap) under this lock, each with the next number.
    order: Mutex<u64>,
    /// The number of the snapshot last written; an older one arriving later is dropped, so
    /// the file always ends with the newest state even when writes finish out of order.
    written: Mutex<u64>,
}

/// A snapshot waiting to be written.
pub struct Pending {
    number: u64,
    record: Record,
}

impl StateFile {
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            dir: state_dir,
            order: Mutex::new(0),
            written: Mutex::new(0),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Takes a snapshot with `take` and numbers it. Not blocking (no I/O).
    pub fn snapshot(&self, take: impl FnOnce() -> Record) -> Pending {
        let mut n = lock(&self.order);
        *n += 1;
        Pending {
            number: *n,
            record: take(),
        }
    }

    /// Writes `p` atomically unless a newer snapshot was written already. Blocking.
    pub fn write(&self, p: Pending) -> io::Result<()> {
        let mut written = lock(&self.written);
        if p.number <= *written {
            return Ok(());
        }
        fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(TMP_NAME);
        let bytes = serde_json::to_vec_pretty(&p.record).map_err(io::Error::other)?;
        fs::File::create(&tmp)?.write_all(&bytes)?;
        fs::rename(&tmp, self.path())?;
        *written = p.number;
        Ok(())
    }
}

fn lock(m: &Mutex<u64>) -> MutexGuard<'_, u64> {
    // A counter stays meaningful after a panicking holder.
    m.lock()
}

/// Reads the record a previous run left. `Ok(None)` when there is none; an unreadable or
/// malformed file is an error for the caller to log (the marker scan still finds the jobs).
pub fn load(state_dir: &Path) -> io::Result<Option<Record>> {
    let bytes = match fs::read(state_dir.join(FILE_NAME)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_and_replaces_the_previous_one() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join(".dglrun");
        assert_eq!(load(&dir).unwrap(), None);
        let sf = StateFile::new(dir.clone());
        let mut r = Record {
            agent_pid: 7,
            jobs: vec![JobRecord {
                id: "j1".into(),
                workspace: "/r/ws".into(),
                processes: vec![ProcRecord {
                    label: "server0".into(),
                    pid: 12,
                    start: 345,
                }],
            }],
        };
        sf.write(sf.snapshot(|| r.clone())).unwrap();
        assert_eq!(load(&dir).unwrap(), Some(r.clone()));
        // A snapshot taken before the last write is never written over it.
        let old = sf.snapshot(|| r.clone());
        r.jobs.clear();
        sf.write(sf.snapshot(|| r.clone())).unwrap();
        sf.write(old).unwrap();
        assert_eq!(load(&dir).unwrap(), Some(r));
        assert!(!dir.join(TMP_NAME).exists());
        fs::write(dir.join(FILE_NAME), b"{torn").unwrap();
        assert!(load(&dir).is_err());
    }
}
