//! Receiving files: prepare (what is already there, where to resume) and put (verify, write,
//! rename).
//!
//! `manifest` checks what the coordinator claims about a file, `partial` owns the partial
//! file rule, `writer` does the blocking work of one transfer, `locks` keeps two requests for
//! the same path apart, `cache` remembers digests of files already held.

mod alloc;
mod cache;
pub mod error;
mod locks;
mod manifest;
mod partial;
pub mod request;
mod writer;

use std::ffi::OsStr;
use std::fs::{File, Permissions};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dglrun_proto::digest::hash_reader;
use dglrun_proto::pb;
use futures::{StreamExt, TryStreamExt};
use rustix::fs::OFlags;
use tokio::sync::{mpsc, OwnedMutexGuard};
use tonic::Streaming;

use crate::blocking;
use crate::confine::{partial_name, ConfineError, Dir, Root};
use cache::{coarse_now, SharedCache};
pub use error::FilesError;
use locks::PathLocks;
use manifest::Manifest;
pub use partial::{partial_path, PARTIAL_SUFFIX};
use partial::{verified_prefix, Verified};
use request::{Chunk, FileSpec, PrepareFiles, PutHeader};
use writer::{ToWriter, Transfer};

/// Chunks queued between the network and the writer of one transfer: enough to keep both
/// busy, small enough that memory stays bounded (4 x 4 MiB per transfer).
const WRITER_QUEUE: usize = 4;

/// Files a prepare checks at once (each may need hashing on a cache miss).
const PREPARE_PARALLELISM: usize = 4;

/// How long a PutFile stream may go without a message before it is dropped (and its permit
/// freed). `DGL_AGENT_TRANSFER_IDLE_TIMEOUT` (seconds) overrides it.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
pub const IDLE_TIMEOUT_ENV: &str = "DGL_AGENT_TRANSFER_IDLE_TIMEOUT";

/// How long one file of a prepare may take (it may hash a large file on a cache miss), and
/// how long a transfer's writer may take to make its file durable once every chunk is in.
const PREPARE_FILE_TIMEOUT: Duration = Duration::from_secs(600);
const FINISH_TIMEOUT: Duration = Duration::from_secs(600);

pub struct Files {
    root: Root,
    cache: Arc<SharedCache>,
    locks: PathLocks,
    verified: Arc<Verified>,
    active: Arc<AtomicUsize>,
    idle: Duration,
    /// The agent's umask, read once at start: files get the coordinator's mode less these bits.
    umask: u32,
    /// Copies and jobs holding workspaces (shared with `jobs`).
    workspaces: Arc<crate::workspace::Workspaces>,
}

/// Counts a running transfer; the last one to end gives the heap back to the system.
pub(crate) struct Active(Arc<AtomicUsize>);

impl Active {
    fn start(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        if self.0.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Dropped on the writer's blocking thread: trimming may take a moment.
            alloc::trim_idle();
        }
    }
}

/// The process umask, without changing it (reading it with umask(2) would set it for a
/// moment, racing every thread that creates a file).
fn read_umask() -> u32 {
    let from_proc = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        });
    from_proc.unwrap_or_else(|| {
        let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
        rustix::process::umask(old);
        old.as_raw_mode()
    }) & 0o777
}

fn idle_timeout_from_env() -> Duration {
    match std::env::var(IDLE_TIMEOUT_ENV) {
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(secs) if secs > 0.0 && secs.is_finite() => Duration::from_secs_f64(secs),
            _ => {
                tracing::warn!(
                    "{IDLE_TIMEOUT_ENV}={v:?} is not a positive number of seconds; using {}s",
                    DEFAULT_IDLE_TIMEOUT.as_secs()
                );
                DEFAULT_IDLE_TIMEOUT
            }
        },
        Err(_) => DEFAULT_IDLE_TIMEOUT,
    }
}

impl Files {
    pub fn new(root: Root) -> Self {
        alloc::tune();
        let cache = Arc::new(SharedCache::open(root.state_dir().join("hashes.json")));
        Self {
            root,
            cache,
            locks: PathLocks::default(),
            verified: Arc::new(Verified::default()),
            active: Arc::new(AtomicUsize::new(0)),
            idle: idle_timeout_from_env(),
            umask: read_umask(),
            workspaces: Arc::default(),
        }
    }

    /// Shares the workspace leases the agent's jobs keep.
    pub fn with_workspaces(mut self, workspaces: Arc<crate::workspace::Workspaces>) -> Self {
        self.workspaces = workspaces;
        self
    }

    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    /// Where the lock, the cache and the verified partials of a file are keyed.
    fn key(&self, f: &FileSpec) -> PathBuf {
        self.root.path().join(f.path.rel())
    }

    pub async fn prepare(&self, req: PrepareFiles) -> Result<pb::PrepareFilesReply, FilesError> {
        // The request was parsed whole before this, so a bad request touches nothing.
        let targets: Vec<PathBuf> = req.files.iter().map(|f| self.key(f)).collect();
        let states: Vec<(pb::FileState, u64)> = futures::stream::iter(req.files)
            .map(|f| async move {
                let key = self.key(&f);
                let lock = self.locks.lock(&key).await;
                let ctx = Ctx {
                    root: self.root.clone(),
                    cache: self.cache.clone(),
                    verified: self.verified.clone(),
                    umask: self.umask,
                };
                let what = format!("checking {}", f.manifest.path);
                blocking::run(what, PREPARE_FILE_TIMEOUT, move || {
                    prepare_one(&f, key, &ctx, lock)
                })
                .await?
            })
            .buffered(PREPARE_PARALLELISM)
            .try_collect()
            .await?;
        let cache = self.cache.clone();
        let root = self.root.clone();
        let idle = self.active.load(Ordering::SeqCst) == 0;
        let free_bytes = blocking::run("saving the hash cache", blocking::FS_TIMEOUT, move || {
            cache.save_now();
            if idle {
                // A copy ends with a prepare (its check) once every transfer has let go of its
                // buffers: the moment to give the memory back.
                alloc::trim_idle();
            }
            root.free_bytes()
        })
        .await?;
        let (sending, present) = crate::workspace::split_prepared(targets, &states);
        self.workspaces.note_prepare(sending, &present)?;
        let to_receive: u64 = states.iter().map(|(_, n)| n).sum();
        tracing::debug!(files = states.len(), to_receive, free_bytes, "prepared");
        Ok(pb::PrepareFilesReply {
            files: states.into_iter().map(|(s, _)| s).collect(),
            free_bytes,
        })
    }

    pub async fn put(
        &self,
        mut stream: Streaming<pb::PutFileMessage>,
    ) -> Result<pb::PutFileReply, FilesError> {
        let first = match tokio::time::timeout(self.idle, stream.message()).await {
            Ok(msg) => msg?,
            Err(_) => {
                return Err(FilesError::Idle {
                    path: "(no header yet)".into(),
                    after: self.idle,
                })
            }
        };
        let header = PutHeader::parse(&self.root, first)?;
        let key = self.key(&header.file);
        let m = header.file.manifest.clone();
        let offset = header.offset;
        let copy = self.workspaces.writing(&key)?;
        let lock = self.locks.lock(&key).await;
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let transfer = Transfer {
            ctx: Ctx {
                root: self.root.clone(),
                cache: self.cache.clone(),
                verified: self.verified.clone(),
                umask: self.umask,
            },
            file: header.file,
            key,
            offset,
            _lock: lock,
            _active: Active::start(&self.active),
        };
        let writer = tokio::task::spawn_blocking(move || writer::run(transfer, rx));
        let received = receive(&mut stream, &m, offset, &tx, self.idle).await;
        if received.is_ok() {
            // If the writer already stopped, its own error says why.
            let _ = tx.send(ToWriter::Finish).await;
        }
        drop(tx);
        let written = match tokio::time::timeout(FINISH_TIMEOUT, writer).await {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => {
                return Err(FilesError::Internal(format!(
                    "{}: the writer failed: {e}",
                    m.path
                )))
            }
            Err(_) => {
                return Err(blocking::BlockingError::TimedOut {
                    what: format!("writing {}", m.path),
                    after: FINISH_TIMEOUT,
                }
                .into())
            }
        };
        let result = match received {
            Err(Received::Refused(e)) => Err(e),
            Ok(()) | Err(Received::WriterStopped) => written,
        };
        if result.is_ok() {
            copy.written();
        }
        result
    }
}

/// What the blocking half of a request needs of `Files`.
pub(crate) struct Ctx {
    root: Root,
    cache: Arc<SharedCache>,
    verified: Arc<Verified>,
    umask: u32,
}

enum Received {
    /// The stream failed, stalled or broke the protocol.
    Refused(FilesError),
    /// The writer hung up (it failed): its result has the reason.
    WriterStopped,
}

/// Passes the chunks of the stream to the writer, each parsed against the manifest as the
/// next one expected. A stream silent for `idle` is dropped.
async fn receive(
    stream: &mut Streaming<pb::PutFileMessage>,
    m: &Manifest,
    offset: u64,
    tx: &mpsc::Sender<ToWriter>,
    idle: Duration,
) -> Result<(), Received> {
    let mut next = offset;
    loop {
        let msg = match tokio::time::timeout(idle, stream.message()).await {
            Ok(Ok(Some(msg))) => msg,
            Ok(Ok(None)) => break,
            Ok(Err(status)) => return Err(Received::Refused(status.into())),
            Err(_) => {
                return Err(Received::Refused(FilesError::Idle {
                    path: m.path.clone(),
                    after: idle,
                }))
            }
        };
        let chunk = Chunk::parse(msg, m, next).map_err(Received::Refused)?;
        next += chunk.len;
        if tx.send(ToWriter::Chunk(chunk)).await.is_err() {
            return Err(Received::WriterStopped);
        }
    }
    if next != m.size {
        return Err(Received::Refused(FilesError::Invalid(format!(
            "{}: the stream ended at {next} of {} bytes",
            m.path, m.size
        ))));
    }
    Ok(())
}

/// Opens the directory a file goes into, beneath the root; refuses the agent's state
/// directory whatever name leads to it.
fn open_parent(ctx: &Ctx, f: &FileSpec, create: bool) -> Result<Dir, FilesError> {
    let (dir, _) = f.path.split()?;
    let dir = ctx.root.open_dir(f.path.shown(), dir, create)?;
    let state = ctx
        .root
        .is_state_dir(&dir)
        .map_err(|e| FilesError::io("cannot stat the directory of", f.path.shown(), e))?;
    if state {
        return Err(ConfineError::Reserved(f.path.shown().to_string()).into());
    }
    Ok(dir)
}

fn is_dir(st: &rustix::fs::Stat) -> bool {
    rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
}

fn is_regular(st: &rustix::fs::Stat) -> bool {
    rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
}

/// Decides one file of a prepare. Blocking: may hash the target or verify a partial. Changes
/// nothing on disk but the mode of a present file that has a single link.
fn prepare_one(
    f: &FileSpec,
    key: PathBuf,
    ctx: &Ctx,
    _lock: OwnedMutexGuard<()>,
) -> Result<(pb::FileState, u64), FilesError> {
    let m = &f.manifest;
    let state = |status: pb::FileStatus, resume_offset: u64| pb::FileState {
        path: m.path.clone(),
        status: status as i32,
        resume_offset,
    };
    let send_all = Ok((state(pb::FileStatus::Send, 0), m.size));
    let dir = match open_parent(ctx, f, false) {
        Ok(d) => d,
        Err(FilesError::Confine(e)) if e.is_not_found() => return send_all,
        Err(e) => return Err(e),
    };
    let (_, name) = f.path.split()?;
    let st = dir
        .stat_entry(name)
        .map_err(|e| FilesError::io("cannot stat", &m.path, e))?;
    match st {
        Some(st) if is_dir(&st) => return Err(FilesError::InTheWay(m.path.clone())),
        // A file with other links is never trusted nor chmodded: sent anew, the rename
        // replaces this name only.
        Some(st)
            if is_regular(&st)
                && st.st_size as u64 == m.size
                && st.st_nlink == 1
                && is_present(m, &dir, name, &key, ctx)? =>
        {
            crate::metrics::add(&crate::metrics::COUNTERS.files_skipped, 1);
            return Ok((state(pb::FileStatus::Present, 0), 0));
        }
        // A file of another size, or a symlink (replaced, never followed): sent anew.
        _ => {}
    }
    let resume = resumable_prefix(m, &dir, name, &partial_path(&key), &ctx.verified)?;
    Ok((state(pb::FileStatus::Send, resume), m.size - resume))
}

/// True when `name` holds exactly the manifest's file; then also gives it the wanted mode
/// (a mode change alone is not worth sending the file again).
fn is_present(
    m: &Manifest,
    dir: &Dir,
    name: &OsStr,
    key: &std::path::Path,
    ctx: &Ctx,
) -> Result<bool, FilesError> {
    let file = match dir.open(name, OFlags::RDONLY, 0) {
        Ok(f) => f,
        // Swapped for a symlink since the stat: not the file, sent anew.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(FilesError::io("cannot open", &m.path, e)),
    };
    let read_err = |e| FilesError::io("cannot read", &m.path, e);
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() || meta.nlink() != 1 || meta.len() != m.size {
        return Ok(false);
    }
    let digest = match ctx.cache.lookup(key, &meta) {
        Some(d) => d,
        None => {
            let observed = coarse_now();
            let d = hash_reader(&file, |_| {}).map_err(read_err)?;
            // Only cached when the file did not change while it was read.
            if file
                .metadata()
                .is_ok_and(|after| dglrun_proto::digest::unchanged(&meta, &after))
            {
                ctx.cache.insert(key, &meta, d.digest, observed);
            }
            d.digest
        }
    };
    if digest != m.digest {
        return Ok(false);
    }
    let want = m.mode & !ctx.umask;
    if meta.mode() & 0o7777 != want {
        // On the opened file, which has this single link: nothing outside the root changes.
        file.set_permissions(Permissions::from_mode(want))
            .map_err(|e| FilesError::io("cannot set the mode of", &m.path, e))?;
        // chmod changed the ctime: the cache entry must follow it. The contents were known
        // (hashed or cached) before now.
        if let Ok(after) = file.metadata() {
            ctx.cache.insert(key, &after, m.digest, coarse_now());
        }
    }
    Ok(true)
}

/// How much of an existing partial matches the manifest: where the transfer can resume (0
/// when there is none, or when it is not a plain file of this agent's with one link). Reads
/// only; the put that resumes cuts off the rest.
fn resumable_prefix(
    m: &Manifest,
    dir: &Dir,
    name: &OsStr,
    key: &std::path::Path,
    verified: &Verified,
) -> Result<u64, FilesError> {
    let file: File = match dir.open(&partial_name(name), OFlags::RDONLY, 0) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        // A symlink: a put starting at 0 replaces it.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(0),
        Err(e) => {
            return Err(FilesError::io(
                "cannot open the partial file of",
                &m.path,
                e,
            ))
        }
    };
    let read_err = |e| FilesError::io("cannot read the partial file of", &m.path, e);
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Ok(0);
    }
    let good = verified_prefix(&file, m, m.size).map_err(read_err)?;
    verified.remember(key, &meta, m.digest, good);
    Ok(good)
}

#[cfg(test)]
mod tests;
