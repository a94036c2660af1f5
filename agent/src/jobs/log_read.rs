//! ReadLogs: a job's kept output files (`host_log`) read back as lines.
//!
//! Each selected process and stream is one cursor over its files, the rotated one first
//! (`<stem>.out.1`, then `<stem>.out`). Reading runs on the blocking pool and sends batches
//! into a channel of [`CHANNEL`] messages, so a slow client holds the reader back, not the
//! agent's memory. With `follow` the cursors are polled every [`POLL`] until the job's record
//! says it ended on this host and a last pass found nothing new; a file rotated under a
//! cursor is read to its end before the new one is opened, so no line is read twice or
//! skipped.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dglrun_proto::pb::{self, OutputStream};
use rustix::fs::OFlags;
use tokio::sync::mpsc;
use tonic::Status;

use super::history::{History, JobRecord};
use super::lines::{LineSplitter, Piece, MAX_LINE};
use super::slots::Slots;
use super::spec::JobId;
use crate::confine::{Dir, Root};
use crate::limits::MAX_LABEL_BYTES;

/// Messages buffered between the reader and the client.
const CHANNEL: usize = 8;
/// How often a follow looks for new output.
const POLL: Duration = Duration::from_millis(20);
/// Lines per message, and bytes per message (a message may pass it by one line).
const BATCH_LINES: usize = 4096;
const BATCH_BYTES: usize = 1 << 20;
/// Bytes read from one file before the next cursor gets its turn.
const TURN_BYTES: usize = 4 << 20;
/// Most labels a request may name.
const MAX_LABELS: usize = 4096;

pub type LogStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::LogChunk, Status>> + Send>>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadSpec {
    pub job_id: JobId,
    pub labels: Vec<String>,
    /// None: both streams; Some(true): stderr only.
    pub stderr: Option<bool>,
    pub tail: u64,
    pub follow: bool,
    /// Lines already delivered, by (label, stderr): skipped from the start of the files.
    pub resume: Vec<(String, bool, u64)>,
}

impl TryFrom<pb::ReadLogsRequest> for ReadSpec {
    type Error = Status;

    fn try_from(r: pb::ReadLogsRequest) -> Result<Self, Status> {
        let job_id = JobId::parse(r.job_id)?;
        if r.labels.len() > MAX_LABELS || r.labels.iter().any(|l| l.len() > MAX_LABEL_BYTES) {
            return Err(Status::invalid_argument(format!(
                "ReadLogs names at most {MAX_LABELS} labels of at most {MAX_LABEL_BYTES} bytes"
            )));
        }
        let stderr = match OutputStream::try_from(r.stream) {
            Ok(OutputStream::Unspecified) => None,
            Ok(OutputStream::Stdout) => Some(false),
            Ok(OutputStream::Stderr) => Some(true),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown output stream {}",
                    r.stream
                )))
            }
        };
        if r.resume.len() > MAX_LABELS * 2 || (r.tail > 0 && !r.resume.is_empty()) {
            return Err(Status::invalid_argument(format!(
                "ReadLogs resumes at most {} streams, and never with a tail",
                MAX_LABELS * 2
            )));
        }
        let resume = r
            .resume
            .into_iter()
            .map(|p| (p.label, p.stream == OutputStream::Stderr as i32, p.lines))
            .collect();
        Ok(Self {
            job_id,
            labels: r.labels,
            stderr,
            tail: r.tail,
            follow: r.follow,
            resume,
        })
    }
}

/// Starts reading; the stream ends with the record as it was when reading ended.
pub fn start(root: Root, history: Arc<History>, spec: ReadSpec, slot: Slots) -> LogStream {
    let (tx, rx) = mpsc::channel(CHANNEL);
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let mut r = Reader {
            root,
            history,
            spec,
            tx,
            cursors: Vec::new(),
            dir: None,
        };
        if let Err(e) = r.run() {
            let _ = r.tx.blocking_send(Err(e));
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

struct Reader {
    root: Root,
    history: Arc<History>,
    spec: ReadSpec,
    tx: mpsc::Sender<Result<pb::LogChunk, Status>>,
    cursors: Vec<Cursor>,
    dir: Option<Dir>,
}

/// The client went away: stop reading.
struct Gone;

impl Reader {
    fn run(&mut self) -> Result<(), Status> {
        let job = self.spec.job_id.to_string();
        loop {
            let record = self.history.get(&job);
            let ended = record.as_ref().is_none_or(|r| r.ended_unix_ms.is_some());
            if let Some(r) = &record {
                self.add_cursors(r);
            }
            let progressed = match self.pass() {
                Ok(p) => p,
                Err(Gone) => return Ok(()),
            };
            if !self.spec.follow || (ended && !progressed) {
                break;
            }
            if !progressed {
                if self.tx.is_closed() {
                    return Ok(());
                }
                // A blocking-pool thread, never a runtime worker.
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(POLL);
            }
        }
        // Lines without their newline at the very end.
        for i in 0..self.cursors.len() {
            let mut rest: Vec<Piece> = self.cursors[i].splitter.finish().into_iter().collect();
            self.cursors[i].skip_delivered(&mut rest);
            if !rest.is_empty() && self.send(i, rest).is_err() {
                return Ok(());
            }
        }
        let end = self
            .history
            .get(&job)
            .map(|r| r.to_pb())
            .unwrap_or_default();
        let _ = self.tx.blocking_send(Ok(pb::LogChunk {
            msg: Some(pb::log_chunk::Msg::End(end)),
        }));
        Ok(())
    }

    fn add_cursors(&mut self, r: &JobRecord) {
        for p in &r.processes {
            if !self.spec.labels.is_empty() && !self.spec.labels.contains(&p.label) {
                continue;
            }
            for stderr in [false, true] {
                if self.spec.stderr.is_some_and(|s| s != stderr) {
                    continue;
                }
                let known = self
                    .cursors
                    .iter()
                    .any(|c| c.stem == p.stem && c.stderr == stderr);
                if !known {
                    let mut c = Cursor::new(p.index, &p.label, &p.stem, stderr);
                    c.skip = self
                        .spec
                        .resume
                        .iter()
                        .find(|(l, e, _)| *l == p.label && *e == stderr)
                        .map_or(0, |r| r.2);
                    self.cursors.push(c);
                }
            }
        }
    }

    fn dir(&mut self) -> Option<&Dir> {
        if self.dir.is_none() {
            let rel = format!("{}/{}", super::history::JOBS_DIR, self.spec.job_id);
            self.dir = self.root.open_dir(&rel, Path::new(&rel), false).ok();
        }
        self.dir.as_ref()
    }

    /// One turn for every cursor; true when any read something.
    fn pass(&mut self) -> Result<bool, Gone> {
        let mut progressed = false;
        for i in 0..self.cursors.len() {
            if self.dir().is_none() {
                return Ok(false);
            }
            let tail = self.spec.tail;
            let mut pieces = Vec::new();
            let read = {
                let Some(dir) = self.dir.as_ref() else {
                    return Ok(false);
                };
                self.cursors[i].read_turn(dir, tail, &mut pieces)
            };
            progressed |= read > 0;
            self.cursors[i].skip_delivered(&mut pieces);
            if !pieces.is_empty() {
                self.send(i, pieces)?;
            }
        }
        Ok(progressed)
    }

    fn send(&self, i: usize, pieces: Vec<Piece>) -> Result<(), Gone> {
        let c = &self.cursors[i];
        let mut lines = Vec::new();
        let mut bytes = 0;
        let stream = if c.stderr {
            OutputStream::Stderr
        } else {
            OutputStream::Stdout
        };
        let flush = |lines: Vec<Vec<u8>>| {
            self.tx
                .blocking_send(Ok(pb::LogChunk {
                    msg: Some(pb::log_chunk::Msg::Lines(pb::LogLines {
                        index: c.index,
                        label: c.label.clone(),
                        stream: stream as i32,
                        lines,
                    })),
                }))
                .map_err(|_| Gone)
        };
        for p in pieces {
            bytes += p.text.len();
            lines.push(p.text);
            if lines.len() >= BATCH_LINES || bytes >= BATCH_BYTES {
                flush(std::mem::take(&mut lines))?;
                bytes = 0;
            }
        }
        if !lines.is_empty() {
            flush(lines)?;
        }
        Ok(())
    }
}

struct Cursor {
    index: u32,
    label: String,
    stem: String,
    stderr: bool,
    /// Not yet opened: the first turn decides where to start (`tail`).
    started: bool,
    /// The rotated file to finish before the current one.
    older: Option<File>,
    current: Option<(File, u64)>,
    splitter: LineSplitter,
    buf: Vec<u8>,
    /// Lines still to drop: a reader before this one delivered them.
    skip: u64,
}

impl Cursor {
    fn new(index: u32, label: &str, stem: &str, stderr: bool) -> Self {
        Self {
            index,
            label: label.to_string(),
            stem: stem.to_string(),
            stderr,
            started: false,
            older: None,
            current: None,
            splitter: LineSplitter::new(MAX_LINE),
            buf: vec![0; 64 << 10],
            skip: 0,
        }
    }

    fn skip_delivered(&mut self, pieces: &mut Vec<Piece>) {
        let n = (self.skip.min(pieces.len() as u64)) as usize;
        pieces.drain(..n);
        self.skip -= n as u64;
    }

    fn name(&self) -> String {
        format!("{}.{}", self.stem, if self.stderr { "err" } else { "out" })
    }

    fn open(dir: &Dir, name: &str) -> Option<File> {
        dir.open(std::ffi::OsStr::new(name), OFlags::RDONLY, 0).ok()
    }

    /// Reads up to a turn's bytes; returns how many.
    fn read_turn(&mut self, dir: &Dir, tail: u64, out: &mut Vec<Piece>) -> usize {
        let name = self.name();
        if !self.started {
            let Some(mut cur) = Self::open(dir, &name) else {
                // Nothing written yet.
                return 0;
            };
            self.started = true;
            let mut older = Self::open(dir, &format!("{name}.1"));
            if tail > 0 {
                let (off, found) = tail_offset(&mut cur, tail);
                let _ = cur.seek(SeekFrom::Start(off));
                older = match older {
                    Some(mut o) if found < tail => {
                        let (off, _) = tail_offset(&mut o, tail - found);
                        let _ = o.seek(SeekFrom::Start(off));
                        Some(o)
                    }
                    _ => None,
                };
            }
            let ino = cur.metadata().map_or(0, |m| m.ino());
            self.older = older;
            self.current = Some((cur, ino));
        }
        let mut total = 0;
        if let Some(mut o) = self.older.take() {
            total += self.read_file(&mut o, TURN_BYTES, out);
            if total >= TURN_BYTES {
                self.older = Some(o);
                return total;
            }
        }
        let Some((mut cur, ino)) = self.current.take() else {
            return total;
        };
        total += self.read_file(&mut cur, TURN_BYTES - total, out);
        if total < TURN_BYTES {
            // At the end of the file: has the writer rotated it away?
            let now = dir
                .stat_entry(std::ffi::OsStr::new(&name))
                .ok()
                .flatten()
                .map(|st| st.st_ino);
            if now.is_some_and(|n| n != ino) {
                if let Some(new) = Self::open(dir, &name) {
                    // What was written to the old file before the rename is read first.
                    self.older = Some(cur);
                    let ino = new.metadata().map_or(0, |m| m.ino());
                    self.current = Some((new, ino));
                    return total + self.read_turn(dir, 0, out);
                }
            }
        }
        self.current = Some((cur, ino));
        total
    }

    fn read_file(&mut self, f: &mut File, limit: usize, out: &mut Vec<Piece>) -> usize {
        let mut total = 0;
        while total < limit {
            match f.read(&mut self.buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    total += n;
                    self.splitter.push(&self.buf[..n], out);
                }
            }
        }
        total
    }
}

/// Where the last `n` lines of `f` begin, and how many lines were found (fewer than `n`
/// when the file holds fewer).
fn tail_offset(f: &mut File, n: u64) -> (u64, u64) {
    let len = f.metadata().map_or(0, |m| m.len());
    if len == 0 || n == 0 {
        return (len, 0);
    }
    let mut buf = vec![0u8; 64 << 10];
    let mut end = len;
    // The newline ending the last line separates nothing.
    let mut last = [0u8; 1];
    if f.seek(SeekFrom::Start(len - 1)).is_ok()
        && f.read_exact(&mut last).is_ok()
        && last[0] == b'\n'
    {
        end -= 1;
    }
    let mut seen = 0;
    let mut pos = end;
    while pos > 0 {
        let start = pos.saturating_sub(buf.len() as u64);
        let want = (pos - start) as usize;
        if f.seek(SeekFrom::Start(start)).is_err() || f.read_exact(&mut buf[..want]).is_err() {
            return (0, seen);
        }
        for i in (0..want).rev() {
            if buf[i] == b'\n' {
                seen += 1;
                if seen == n {
                    return (start + i as u64 + 1, n);
                }
            }
        }
        pos = start;
    }
    (0, seen + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tail_of(text: &str, n: u64) -> (String, u64) {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        let (off, found) = tail_offset(&mut f, n);
        (text[off as usize..].to_string(), found)
    }

    #[test]
    fn tail_finds_the_last_lines() {
        assert_eq!(tail_of("a\nb\nc\n", 2), ("b\nc\n".into(), 2));
        assert_eq!(tail_of("a\nb\nc", 1), ("c".into(), 1));
        assert_eq!(tail_of("a\nb\n", 5), ("a\nb\n".into(), 2));
        assert_eq!(tail_of("", 3), ("".into(), 0));
        let long = "x\n".repeat(100_000);
        assert_eq!(tail_of(&long, 70_000).0.len(), 140_000);
    }
}
