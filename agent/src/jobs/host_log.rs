//! Host-side logs: every launch process's stdout and stderr written to files under the root
//! as they arrive, and each job's record (`history`) kept beside them.
//!
//! One writer thread does all of the file work, fed through a bounded channel, so neither a
//! slow disk nor a full one can stall the async runtime or the job: when the channel is full
//! a batch of lines is dropped and counted, and a write that fails (ENOSPC, EIO) counts its
//! lines as lost and keeps the error; both show in the job's record (`lost_lines`,
//! `log_error`). Records never drop: a record change that finds the channel full waits in a
//! queue the writer empties once it has caught up with the channel, so a process's exit is
//! recorded after every line it wrote before it.
//!
//! Bounds: each output file is rotated at `max_file_bytes` (`<stem>.out` becomes
//! `<stem>.out.1`, replacing the one before), so a process keeps at most twice that per stream;
//! finished jobs go by the rules of `retention`, which the writer applies at start, when a job
//! ends, and every minute.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dglrun_proto::pb::OutputStream;
use parking_lot::Mutex;
use rustix::fs::OFlags;

use super::history::{now_ms, History, JobRecord, ProcessRecord, JOBS_DIR, RECORD_NAME};
use super::lines::Piece;
use super::retention::{self, Retention};
use super::spec::JobId;
use crate::confine::{Dir, Root};

/// Line batches (one pipe read each, at most 64 KiB of lines) waiting for the writer: at most
/// 16 MiB held for a disk that falls behind.
const CHANNEL: usize = 256;
/// How often the writer looks at retention and lost-line counts when nothing else happens.
const TICK: Duration = Duration::from_secs(1);
/// How often retention runs without a job ending.
const RETENTION_EVERY: Duration = Duration::from_secs(60);
/// Largest record read back at start-up.
const MAX_RECORD_BYTES: u64 = 16 << 20;

#[derive(Clone, Debug, PartialEq)]
pub struct HostLogConfig {
    /// A stream's file is rotated past this size.
    pub max_file_bytes: u64,
    /// When finished jobs' files are deleted.
    pub retention: Retention,
}

impl Default for HostLogConfig {
    fn default() -> Self {
        Self {
            max_file_bytes: 256 << 20,
            retention: Retention::default(),
        }
    }
}

/// How and when a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ended {
    code: i32,
    signal: i32,
    stopped_by_agent: bool,
    at: u64,
}

enum Msg {
    Started {
        job: Arc<str>,
        workspace: PathBuf,
        process: ProcessRecord,
        dropped: Arc<AtomicU64>,
    },
    Lines {
        job: Arc<str>,
        index: u32,
        stderr: bool,
        bytes: Vec<u8>,
        lines: u64,
    },
    Exited {
        job: Arc<str>,
        index: u32,
        end: Ended,
    },
    Stopped {
        job: Arc<str>,
        by: String,
    },
    Flush(mpsc::Sender<()>),
}

/// The writer's inbox and the records it keeps.
pub struct HostLogs {
    tx: SyncSender<Msg>,
    /// Record changes that found the channel full, in order.
    overflow: Arc<Mutex<VecDeque<Msg>>>,
    history: Arc<History>,
}

impl HostLogs {
    /// Loads the records a previous run left (closing those it left unfinished), then starts
    /// the writer thread. Blocking (reads the records).
    pub fn start(root: Root, config: HostLogConfig) -> anyhow::Result<Arc<Self>> {
        let history = Arc::new(History::default());
        let mut writer = Writer {
            root,
            config,
            history: history.clone(),
            jobs: HashMap::new(),
            next_retention: Instant::now(),
        };
        writer.load();
        let (tx, rx) = mpsc::sync_channel(CHANNEL);
        let overflow = Arc::new(Mutex::new(VecDeque::new()));
        let queue = overflow.clone();
        std::thread::Builder::new()
            .name("dgl-host-logs".into())
            .spawn(move || writer.run(rx, queue))?;
        Ok(Arc::new(Self {
            tx,
            overflow,
            history,
        }))
    }

    pub fn history(&self) -> &Arc<History> {
        &self.history
    }

    /// A record change: never dropped (see the module doc).
    fn control(&self, m: Msg) {
        let mut q = self.overflow.lock();
        if !q.is_empty() {
            q.push_back(m);
            return;
        }
        match self.tx.try_send(m) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(m)) => q.push_back(m),
        }
    }

    /// A handle for one job's processes to log through.
    pub fn job(self: &Arc<Self>, id: &JobId) -> JobLog {
        JobLog {
            logs: self.clone(),
            job: Arc::from(id.as_str()),
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Waits (blocking) until the writer has handled everything sent so far, at most `limit`.
    pub fn flush(&self, limit: Duration) {
        let (tx, rx) = mpsc::channel();
        self.control(Msg::Flush(tx));
        let _ = rx.recv_timeout(limit);
    }
}

/// One job's way to the writer.
pub struct JobLog {
    logs: Arc<HostLogs>,
    job: Arc<str>,
    /// Lines dropped because the channel was full; the writer adds them to the record.
    dropped: Arc<AtomicU64>,
}

impl JobLog {
    pub fn started(&self, workspace: &Path, index: u32, label: &str, command: &str, pid: u32) {
        let mut command = command.to_string();
        if command.len() > super::history::MAX_COMMAND {
            let mut cut = super::history::MAX_COMMAND;
            while !command.is_char_boundary(cut) {
                cut -= 1;
            }
            command.truncate(cut);
        }
        self.logs.control(Msg::Started {
            job: self.job.clone(),
            workspace: workspace.to_path_buf(),
            process: ProcessRecord {
                index,
                label: label.to_string(),
                command,
                pid,
                started_unix_ms: now_ms(),
                ..ProcessRecord::default()
            },
            dropped: self.dropped.clone(),
        });
    }

    /// Lines of one pipe read, as the process wrote them (a partial piece has no newline).
    pub fn lines(&self, index: u32, stream: OutputStream, pieces: &[Piece]) {
        if pieces.is_empty() {
            return;
        }
        let size = pieces.iter().map(|p| p.text.len() + 1).sum();
        let mut bytes = Vec::with_capacity(size);
        let mut lines = 0;
        for p in pieces {
            bytes.extend_from_slice(&p.text);
            if !p.partial {
                bytes.push(b'\n');
                lines += 1;
            }
        }
        let m = Msg::Lines {
            job: self.job.clone(),
            index,
            stderr: stream == OutputStream::Stderr,
            bytes,
            lines,
        };
        if let Err(TrySendError::Full(_)) = self.logs.tx.try_send(m) {
            self.dropped.fetch_add(lines.max(1), Ordering::Relaxed);
        }
    }

    pub fn exited(&self, index: u32, code: i32, signal: i32, stopped_by_agent: bool) {
        self.logs.control(Msg::Exited {
            job: self.job.clone(),
            index,
            end: Ended {
                code,
                signal,
                stopped_by_agent,
                at: now_ms(),
            },
        });
    }

    pub fn stopped(&self, by: &str) {
        self.logs.control(Msg::Stopped {
            job: self.job.clone(),
            by: by.to_string(),
        });
    }
}

struct OpenFile {
    file: File,
    len: u64,
}

/// What the writer holds for a job it has seen this run.
struct JobFiles {
    dir: Option<Dir>,
    /// By (process index, stderr).
    files: HashMap<(u32, bool), OpenFile>,
    dropped: Arc<AtomicU64>,
    /// A write error was logged for this job (once is enough for the agent's log).
    error_logged: bool,
}

struct Writer {
    root: Root,
    config: HostLogConfig,
    history: Arc<History>,
    jobs: HashMap<Arc<str>, JobFiles>,
    next_retention: Instant,
}

fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>, overflow: Arc<Mutex<VecDeque<Msg>>>) {
        let mut last_tick = Instant::now();
        loop {
            let msg = match rx.try_recv() {
                Ok(m) => Some(m),
                Err(TryRecvError::Empty) => {
                    self.drain_overflow(&overflow);
                    match rx.recv_timeout(TICK) {
                        Ok(m) => Some(m),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                Err(TryRecvError::Disconnected) => break,
            };
            if let Some(m) = msg {
                self.handle(m, &overflow);
            }
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                self.count_dropped();
                if Instant::now() >= self.next_retention {
                    self.enforce_retention();
                }
            }
        }
        self.drain_overflow(&overflow);
        self.count_dropped();
    }

    fn handle(&mut self, m: Msg, overflow: &Mutex<VecDeque<Msg>>) {
        match m {
            Msg::Started {
                job,
                workspace,
                process,
                dropped,
            } => self.started(&job, workspace, process, dropped),
            Msg::Lines {
                job,
                index,
                stderr,
                bytes,
                lines,
            } => {
                if self.stem(&job, index).is_none() {
                    // Its start is still queued behind the channel.
                    self.drain_overflow(overflow);
                }
                self.write(&job, index, stderr, &bytes, lines);
            }
            Msg::Exited { job, index, end } => self.exited(&job, index, &end),
            Msg::Stopped { job, by } => {
                self.history.update(&job, |r| {
                    r.stopped_by.get_or_insert(by);
                });
                self.save(&job);
            }
            Msg::Flush(done) => {
                self.count_dropped();
                let _ = done.send(());
            }
        }
    }

    /// Handles the record changes that found the channel full, in order.
    fn drain_overflow(&mut self, overflow: &Mutex<VecDeque<Msg>>) {
        loop {
            let next = overflow.lock().pop_front();
            match next {
                Some(m) => self.handle(m, overflow),
                None => break,
            }
        }
    }

    fn started(
        &mut self,
        job: &Arc<str>,
        workspace: PathBuf,
        process: ProcessRecord,
        dropped: Arc<AtomicU64>,
    ) {
        let exists = self
            .history
            .update(job, |r| add_process(r, process.clone()))
            .is_some();
        if !exists {
            let mut r = JobRecord {
                job_id: job.to_string(),
                workspace,
                started_unix_ms: now_ms(),
                ..JobRecord::default()
            };
            add_process(&mut r, process);
            self.history.insert(r);
        }
        self.jobs
            .entry(job.clone())
            .or_insert_with(|| JobFiles {
                dir: None,
                files: HashMap::new(),
                dropped: Arc::default(),
                error_logged: false,
            })
            .dropped = dropped;
        self.save(job);
    }

    fn exited(&mut self, job: &Arc<str>, index: u32, end: &Ended) {
        let ended = self.history.update(job, |r| record_exit(r, index, end));
        if let Some(files) = self.jobs.get_mut(job) {
            files.files.remove(&(index, false));
            files.files.remove(&(index, true));
        }
        self.save(job);
        if ended == Some(true) {
            // A finished job may make the oldest one go.
            self.next_retention = Instant::now();
        }
    }

    fn stem(&self, job: &str, index: u32) -> Option<String> {
        let r = self.history.get(job)?;
        r.processes
            .iter()
            .rev()
            .find(|p| p.index == index)
            .map(|p| p.stem.clone())
    }

    /// The job's directory, created on first use.
    fn dir<'a>(root: &Root, job: &str, slot: &'a mut Option<Dir>) -> std::io::Result<&'a Dir> {
        if slot.is_none() {
            let rel = format!("{JOBS_DIR}/{job}");
            let d = root
                .open_dir(&rel, Path::new(&rel), true)
                .map_err(std::io::Error::other)?;
            *slot = Some(d);
        }
        slot.as_ref()
            .ok_or_else(|| std::io::Error::other("no job directory"))
    }

    fn write(&mut self, job: &Arc<str>, index: u32, stderr: bool, bytes: &[u8], lines: u64) {
        let Some(stem) = self.stem(job, index) else {
            self.lost(
                job,
                lines,
                "lines of a process the agent has no record of".into(),
            );
            return;
        };
        let file_name = format!("{stem}.{}", if stderr { "err" } else { "out" });
        let cap = self.config.max_file_bytes;
        let root = self.root.clone();
        let Some(files) = self.jobs.get_mut(job) else {
            self.lost(
                job,
                lines,
                "lines of a job the agent has no record of".into(),
            );
            return;
        };
        let mut rest = bytes;
        let result = (|| -> std::io::Result<()> {
            let dir = Self::dir(&root, job, &mut files.dir)?;
            let key = (index, stderr);
            let mut rotate = false;
            while !rest.is_empty() {
                if rotate {
                    files.files.remove(&key);
                    dir.rename(name(&file_name), name(&format!("{file_name}.1")))?;
                }
                let f = match files.files.entry(key) {
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        let mut flags = OFlags::WRONLY | OFlags::CREATE | OFlags::APPEND;
                        if rotate {
                            flags |= OFlags::TRUNC;
                        }
                        let file = dir.open(name(&file_name), flags, 0o644)?;
                        let len = file.metadata()?.len();
                        v.insert(OpenFile { file, len })
                    }
                };
                let (take, full) = fitting(rest, cap.saturating_sub(f.len), f.len == 0);
                let written = f.file.write_all(&rest[..take]);
                // A failed write may still have written a part: the size is asked again.
                match &written {
                    Ok(()) => f.len += take as u64,
                    Err(_) => f.len = f.file.metadata().map_or(f.len, |m| m.len()),
                }
                written?;
                rest = &rest[take..];
                rotate = full;
            }
            Ok(())
        })();
        if let Err(e) = result {
            let what = format!("cannot write {JOBS_DIR}/{job}/{file_name}: {e}");
            let unwritten = rest.iter().filter(|&&b| b == b'\n').count() as u64;
            self.lost(job, unwritten.max(1).min(lines.max(1)), what);
        }
    }

    /// Counts lines not kept and remembers why; the agent's log says it once per job.
    fn lost(&mut self, job: &Arc<str>, lines: u64, why: String) {
        let first = match self.jobs.get_mut(job) {
            Some(f) => !std::mem::replace(&mut f.error_logged, true),
            None => true,
        };
        if first {
            tracing::warn!(%job, "host-side log: {why}; the job runs on, its lost lines are counted in its record");
        }
        self.history.update(job, |r| {
            r.lost_lines += lines;
            r.log_error = Some(why);
        });
    }

    /// Moves the channel's drop counts into the records.
    fn count_dropped(&mut self) {
        let mut changed = Vec::new();
        for (job, f) in &self.jobs {
            let n = f.dropped.swap(0, Ordering::Relaxed);
            if n > 0 {
                self.history.update(job, |r| {
                    r.lost_lines += n;
                    r.log_error.get_or_insert_with(|| {
                        "lines arrived faster than the disk took them".to_string()
                    });
                });
                changed.push(job.clone());
            }
        }
        for job in changed {
            self.save(&job);
        }
    }

    /// Writes the job's record (temporary file, rename).
    fn save(&mut self, job: &Arc<str>) {
        let Some(record) = self.history.get(job) else {
            return;
        };
        let root = self.root.clone();
        let Some(files) = self.jobs.get_mut(job) else {
            return;
        };
        let result = (|| -> std::io::Result<()> {
            let dir = Self::dir(&root, job, &mut files.dir)?;
            let bytes = serde_json::to_vec_pretty(&record).map_err(std::io::Error::other)?;
            let tmp = format!("{RECORD_NAME}.tmp");
            let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC;
            dir.open(name(&tmp), flags, 0o644)?.write_all(&bytes)?;
            dir.rename(name(&tmp), name(RECORD_NAME))
        })();
        if let Err(e) = result {
            let why = format!("cannot write {JOBS_DIR}/{job}/{RECORD_NAME}: {e}");
            self.lost(job, 0, why);
        }
    }

    fn jobs_dir(&self, create: bool) -> std::io::Result<Option<Dir>> {
        match self.root.open_dir(JOBS_DIR, Path::new(JOBS_DIR), create) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    /// Reads every record under the jobs directory; closes those a dead agent left open.
    fn load(&mut self) {
        let dir = match self.jobs_dir(false) {
            Ok(Some(d)) => d,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("cannot read the job records in {JOBS_DIR}: {e}");
                return;
            }
        };
        let names = match dir.names() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("cannot list {JOBS_DIR}: {e}");
                return;
            }
        };
        let now = now_ms();
        for n in names {
            let Some(id) = n.to_str().and_then(|s| JobId::parse(s.to_string()).ok()) else {
                continue;
            };
            let record = dir.open_subdir(&n).and_then(|d| read_record(&d));
            let mut record = match record {
                Ok(r) if r.job_id == id.as_str() => r,
                Ok(_) | Err(_) => {
                    // Kept under retention all the same, so it cannot grow the disk forever.
                    tracing::warn!(job = %id, "the job's record in {JOBS_DIR} is missing or unreadable; its files are kept until retention deletes them");
                    let mut r = JobRecord {
                        job_id: id.to_string(),
                        started_unix_ms: now,
                        log_error: Some(format!("{RECORD_NAME} missing or unreadable")),
                        ..JobRecord::default()
                    };
                    r.close_interrupted(now);
                    r
                }
            };
            let interrupted = record.ended_unix_ms.is_none();
            if interrupted {
                record.close_interrupted(now);
                tracing::warn!(job = %id, "the agent restarted while the job ran: its record is closed as interrupted");
            }
            self.history.insert(record);
            if interrupted {
                let job: Arc<str> = Arc::from(id.as_str());
                self.jobs.insert(
                    job.clone(),
                    JobFiles {
                        dir: None,
                        files: HashMap::new(),
                        dropped: Arc::default(),
                        error_logged: false,
                    },
                );
                self.save(&job);
            }
        }
        self.enforce_retention();
    }

    /// Deletes finished jobs past the retention bounds (see `retention`).
    fn enforce_retention(&mut self) {
        self.next_retention = Instant::now() + RETENTION_EVERY;
        let dir = match self.jobs_dir(false) {
            Ok(Some(d)) => d,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("retention: cannot open {JOBS_DIR}: {e}");
                return;
            }
        };
        for job in retention::enforce(&dir, &self.history, &self.config.retention) {
            self.jobs.remove(job.as_str());
        }
    }
}

/// Adds a process that started to its job's record: the job runs again until it ends too.
fn add_process(r: &mut JobRecord, mut process: ProcessRecord) {
    r.ended_unix_ms = None;
    process.stem = r.stem_for(process.index, &process.label);
    r.processes.push(process);
}

/// Records how process `index` (its latest start) ended; true once every process of the job
/// has ended, which ends the job at the same time.
fn record_exit(r: &mut JobRecord, index: u32, end: &Ended) -> bool {
    if let Some(p) = r.processes.iter_mut().rev().find(|p| p.index == index) {
        p.ended_unix_ms = Some(end.at);
        p.code = Some(end.code);
        p.signal = end.signal;
        p.stopped_by_agent = end.stopped_by_agent;
    }
    let all = r.processes.iter().all(|p| p.ended_unix_ms.is_some());
    if all {
        r.ended_unix_ms = Some(end.at);
    }
    all
}

/// How much of `rest` goes into a file with `room` bytes left: whole lines that fit, or (in
/// an empty file) at least one line however long; and whether the file is full after it.
fn fitting(rest: &[u8], room: u64, empty: bool) -> (usize, bool) {
    if rest.len() as u64 <= room {
        return (rest.len(), false);
    }
    let window = &rest[..room.min(rest.len() as u64) as usize];
    match window.iter().rposition(|&b| b == b'\n') {
        Some(i) => (i + 1, true),
        None if empty => {
            let line = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |i| i + 1);
            (line, line < rest.len())
        }
        None => (0, true),
    }
}

fn read_record(dir: &Dir) -> std::io::Result<JobRecord> {
    let f = dir.open(name(RECORD_NAME), OFlags::RDONLY, 0)?;
    let mut bytes = Vec::new();
    f.take(MAX_RECORD_BYTES).read_to_end(&mut bytes)?;
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(index: u32, label: &str, ended: Option<u64>) -> ProcessRecord {
        ProcessRecord {
            index,
            label: label.into(),
            stem: label.into(),
            ended_unix_ms: ended,
            ..ProcessRecord::default()
        }
    }

    #[test]
    fn a_job_ends_with_its_last_process() {
        let end = Ended {
            code: 3,
            signal: 0,
            stopped_by_agent: true,
            at: 50,
        };
        type Procs = &'static [(u32, Option<u64>)];
        // (processes: index and end, the index that exits, every process over, the job's end)
        let cases: &[(Procs, u32, bool, Option<u64>)] = &[
            (&[(0, None), (1, None)], 0, false, None),
            (&[(0, Some(10)), (1, None)], 1, true, Some(50)),
            // A restarted process: its latest start is the one that ended.
            (&[(0, Some(10)), (0, None)], 0, true, Some(50)),
            // An index the record does not know changes nothing.
            (&[(0, None)], 7, false, None),
        ];
        for (procs, index, over, job_end) in cases {
            let mut r = JobRecord::default();
            for (i, ended) in procs.iter() {
                r.processes.push(process(*i, "x", *ended));
            }
            assert_eq!(
                record_exit(&mut r, *index, &end),
                *over,
                "{procs:?} {index}"
            );
            assert_eq!(r.ended_unix_ms, *job_end, "{procs:?} {index}");
            let latest = r.processes.iter().rev().find(|p| p.index == *index);
            if let Some(p) = latest {
                assert_eq!(
                    (p.ended_unix_ms, p.code, p.stopped_by_agent),
                    (Some(50), Some(3), true)
                );
            }
        }
    }

    #[test]
    fn a_started_process_reopens_its_job_under_a_stem_of_its_own() {
        let mut r = JobRecord {
            ended_unix_ms: Some(9),
            ..JobRecord::default()
        };
        r.processes.push(process(0, "trainer", Some(9)));
        add_process(&mut r, process(0, "trainer", None));
        add_process(&mut r, process(1, "server", None));
        assert_eq!(r.ended_unix_ms, None);
        let stems: Vec<&str> = r.processes.iter().map(|p| p.stem.as_str()).collect();
        assert_eq!(stems, ["trainer", "p0", "server"]);
    }

    #[test]
    fn a_file_takes_whole_lines_up_to_its_cap() {
        assert_eq!(fitting(b"a\nb\n", 10, false), (4, false));
        assert_eq!(fitting(b"a\nb\nc\n", 5, false), (4, true));
        // Nothing fits a file that has some already: rotate first.
        assert_eq!(fitting(b"abcdef\n", 3, false), (0, true));
        // An empty file takes one line however long.
        assert_eq!(fitting(b"abcdef\ng\n", 3, true), (7, true));
        assert_eq!(fitting(b"abcdef", 3, true), (6, false));
    }
}
