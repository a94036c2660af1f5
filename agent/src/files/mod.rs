//! Receiving files: prepare (what is already there, where to resume) and put (verify, write,
//! rename).
//!
//! `manifest` checks what the coordinator claims about a file, `partial` owns the partial
//! file rule, `writer` does the blocking work of one transfer, `locks` keeps two requests for
//! the same path apart, `cache` remembers digests of files already held.

mod alloc;
mod cache;
mod locks;
mod manifest;
mod partial;
mod writer;

use std::fs::{self, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dglrun_proto::compress::max_frame_len;
use dglrun_proto::digest::hash_file;
use dglrun_proto::pb::{self, put_file_message::Msg};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::{mpsc, OwnedMutexGuard};
use tonic::{Status, Streaming};

use crate::confine::Root;
use cache::SharedCache;
use locks::PathLocks;
use manifest::Manifest;
pub use partial::{partial_path, PARTIAL_SUFFIX};
use partial::{verified_prefix, Verified};
use writer::{ToWriter, Transfer};

/// Chunks queued between the network and the writer of one transfer: enough to keep both
/// busy, small enough that memory stays bounded (4 x 4 MiB per transfer).
const WRITER_QUEUE: usize = 4;

/// Files a prepare checks at once (each may need hashing on a cache miss).
const PREPARE_PARALLELISM: usize = 4;

pub struct Files {
    root: Root,
    cache: Arc<SharedCache>,
    locks: PathLocks,
    verified: Arc<Verified>,
    active: Arc<AtomicUsize>,
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
            workspaces: Arc::default(),
        }
    }

    /// Shares the workspace leases the agent's jobs keep.
    pub fn with_workspaces(mut self, workspaces: Arc<crate::workspace::Workspaces>) -> Self {
        self.workspaces = workspaces;
        self
    }

    pub async fn prepare(
        &self,
        req: pb::PrepareFilesRequest,
    ) -> Result<pb::PrepareFilesReply, Status> {
        // Everything is checked before any file is looked at, so a bad request touches nothing.
        let mut work = Vec::with_capacity(req.files.len());
        for f in req.files {
            let m = Manifest::from_pb(f)?;
            let target = self.root.resolve(&m.path)?;
            work.push((m, target));
        }
        let targets: Vec<PathBuf> = work.iter().map(|(_, t)| t.clone()).collect();
        let states: Vec<(pb::FileState, u64)> = futures::stream::iter(work)
            .map(|(m, target)| async move {
                let lock = self.locks.lock(&target).await;
                let cache = self.cache.clone();
                let verified = self.verified.clone();
                let root = self.root.clone();
                tokio::task::spawn_blocking(move || {
                    prepare_one(m, target, &root, &cache, &verified, lock)
                })
                .await
                .map_err(|e| Status::internal(format!("prepare failed: {e}")))?
            })
            .buffered(PREPARE_PARALLELISM)
            .try_collect()
            .await?;
        let cache = self.cache.clone();
        let root = self.root.path().to_path_buf();
        let idle = self.active.load(Ordering::SeqCst) == 0;
        let free_bytes = tokio::task::spawn_blocking(move || {
            cache.save_now();
            if idle {
                // A copy ends with a prepare (its check) once every transfer has let go of its
                // buffers: the moment to give the memory back.
                alloc::trim_idle();
            }
            crate::service::free_bytes(&root)
        })
        .await
        .map_err(|e| Status::internal(format!("prepare failed: {e}")))?;
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
    ) -> Result<pb::PutFileReply, Status> {
        let header = match stream.message().await? {
            Some(pb::PutFileMessage {
                msg: Some(Msg::Header(h)),
            }) => h,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message of PutFile must be a PutFileHeader",
                ))
            }
            None => return Err(Status::invalid_argument("empty PutFile stream")),
        };
        let m = Manifest::from_pb(
            header
                .manifest
                .ok_or_else(|| Status::invalid_argument("PutFileHeader without a manifest"))?,
        )?;
        let offset = header.offset;
        if !m.is_valid_offset(offset) {
            return Err(Status::invalid_argument(format!(
                "{}: offset {offset} is not a chunk boundary within its {} bytes",
                m.path, m.size
            )));
        }
        let target = self.root.prepare_parent(&m.path)?;
        if target.is_dir() {
            return Err(in_the_way(&m.path));
        }
        let copy = self.workspaces.writing(&target)?;
        let lock = self.locks.lock(&target).await;
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let transfer = Transfer {
            root: self.root.clone(),
            partial: partial_path(&target),
            manifest: m.clone(),
            target,
            offset,
            cache: self.cache.clone(),
            verified: self.verified.clone(),
            _lock: lock,
            _active: Active::start(&self.active),
        };
        let writer = tokio::task::spawn_blocking(move || writer::run(transfer, rx));
        let received = receive(&mut stream, &m, offset, &tx).await;
        if received.is_ok() {
            // If the writer already stopped, its own error says why.
            let _ = tx.send(ToWriter::Finish).await;
        }
        drop(tx);
        let written = writer
            .await
            .map_err(|e| Status::internal(format!("{}: the writer failed: {e}", m.path)))?;
        let result = match received {
            Err(Received::Refused(status)) => Err(status),
            Ok(()) | Err(Received::WriterStopped) => written,
        };
        if result.is_ok() {
            copy.written();
        }
        result
    }
}

enum Received {
    /// The stream failed or broke the protocol.
    Refused(Status),
    /// The writer hung up (it failed): its result has the reason.
    WriterStopped,
}

/// Passes the chunks of the stream to the writer after checking they are exactly the next
/// chunk the manifest expects: in order, from `offset`, each of its full length (a compressed
/// one: a frame no longer than a frame of that length can be; the writer checks what it holds).
async fn receive(
    stream: &mut Streaming<pb::PutFileMessage>,
    m: &Manifest,
    offset: u64,
    tx: &mpsc::Sender<ToWriter>,
) -> Result<(), Received> {
    let refuse = |reason: String| {
        Received::Refused(Status::invalid_argument(format!("{}: {reason}", m.path)))
    };
    let mut next = offset;
    while let Some(msg) = stream.message().await.map_err(Received::Refused)? {
        let chunk = match msg.msg {
            Some(Msg::Chunk(c)) => c,
            _ => return Err(refuse("expected a chunk, got another header".into())),
        };
        if chunk.offset != next {
            return Err(refuse(format!(
                "chunk at offset {}, expected {next}",
                chunk.offset
            )));
        }
        if next >= m.size {
            return Err(refuse(format!(
                "chunk at offset {next} is past the end ({} bytes)",
                m.size
            )));
        }
        let len = chunk.data.len() as u64;
        let expected = m.chunk_len_at(next);
        // An unknown value is refused, not read as raw: it would be taken for the chunk's bytes.
        let compression = pb::Compression::try_from(chunk.compression).map_err(|_| {
            refuse(format!(
                "chunk at offset {next} uses an unknown compression ({}); is dgl-coord newer \
                 than this agent?",
                chunk.compression
            ))
        })?;
        match compression {
            pb::Compression::None if len != expected => {
                return Err(refuse(format!(
                    "chunk at offset {next} has {len} bytes, expected {expected}"
                )));
            }
            // Bounded here, before it is queued; what it holds is checked by the writer.
            pb::Compression::Zstd if len > max_frame_len(expected as usize) as u64 => {
                return Err(refuse(format!(
                    "chunk at offset {next} is a zstd frame of {len} bytes, longer than any \
                     frame of its {expected} bytes can be"
                )));
            }
            _ => {}
        }
        next += expected;
        let msg = ToWriter::Chunk {
            offset: chunk.offset,
            len: expected,
            data: chunk.data,
            compression,
        };
        if tx.send(msg).await.is_err() {
            return Err(Received::WriterStopped);
        }
    }
    if next != m.size {
        return Err(refuse(format!(
            "the stream ended at {next} of {} bytes",
            m.size
        )));
    }
    Ok(())
}

/// Decides one file of a prepare. Blocking: may hash the target or verify a partial.
fn prepare_one(
    m: Manifest,
    target: PathBuf,
    root: &Root,
    cache: &SharedCache,
    verified: &Verified,
    _lock: OwnedMutexGuard<()>,
) -> Result<(pb::FileState, u64), Status> {
    let state = |status: pb::FileStatus, resume_offset: u64| pb::FileState {
        path: m.path.clone(),
        status: status as i32,
        resume_offset,
    };
    match fs::symlink_metadata(&target) {
        Ok(meta) if meta.is_dir() => return Err(in_the_way(&m.path)),
        Ok(meta) if meta.is_file() && meta.len() == m.size => {
            if is_present(&m, &target, &meta, cache)? {
                crate::metrics::add(&crate::metrics::COUNTERS.files_skipped, 1);
                return Ok((state(pb::FileStatus::Present, 0), 0));
            }
        }
        // A file of another size, or a symlink (replaced, never followed): sent anew.
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_status("cannot stat", &m.path, e)),
    }
    let partial = partial_path(&target);
    let resume = resumable_prefix(&m, &partial, root, verified)?;
    Ok((state(pb::FileStatus::Send, resume), m.size - resume))
}

/// True when the target holds exactly the manifest's file; then also gives it the wanted
/// mode (a mode change alone is not worth sending the file again).
fn is_present(
    m: &Manifest,
    target: &Path,
    meta: &fs::Metadata,
    cache: &SharedCache,
) -> Result<bool, Status> {
    let digest = match cache.lookup(target, meta) {
        Some(d) => d,
        None => {
            let d = hash_file(target).map_err(|e| io_status("cannot read", &m.path, e))?;
            // Only cached when the file did not change while it was read.
            if fs::symlink_metadata(target)
                .is_ok_and(|after| dglrun_proto::digest::unchanged(meta, &after))
            {
                cache.insert(target, meta, d.digest);
            }
            d.digest
        }
    };
    if digest != m.digest {
        return Ok(false);
    }
    if meta.permissions().mode() & 0o7777 != m.mode {
        fs::set_permissions(target, Permissions::from_mode(m.mode))
            .map_err(|e| io_status("cannot set the mode of", &m.path, e))?;
        // chmod changed the ctime: the cache entry must follow it.
        if let Ok(after) = fs::symlink_metadata(target) {
            cache.insert(target, &after, m.digest);
        }
    }
    Ok(true)
}

/// Verifies an existing partial against the manifest, cuts off what does not match, and
/// returns where the transfer can resume (0 when there is no partial).
fn resumable_prefix(
    m: &Manifest,
    partial: &Path,
    root: &Root,
    verified: &Verified,
) -> Result<u64, Status> {
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(partial)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        // Not a regular file we can use (e.g. a symlink): a put starting at 0 replaces it.
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) => return Ok(0),
        Err(e) => return Err(io_status("cannot open the partial file of", &m.path, e)),
    };
    crate::confine::verify_opened(root, &file, &m.path)?;
    let read_err = |e| io_status("cannot read the partial file of", &m.path, e);
    let good = verified_prefix(&file, m, m.size).map_err(read_err)?;
    if file.metadata().map_err(read_err)?.len() != good {
        file.set_len(good)
            .map_err(|e| io_status("cannot truncate the partial file of", &m.path, e))?;
    }
    let meta = file.metadata().map_err(read_err)?;
    verified.remember(partial, &meta, m.digest);
    Ok(good)
}

fn in_the_way(path: &str) -> Status {
    Status::already_exists(format!("{path}: a directory is in the way on this host"))
}

/// An I/O error as a Status that says what failed on which path; a full disk is
/// `resource_exhausted` so the coordinator does not retry it.
pub(crate) fn io_status(what: &str, path: &str, e: io::Error) -> Status {
    let msg = format!("{what} {path}: {e}");
    let full = [
        nix::errno::Errno::ENOSPC as i32,
        nix::errno::Errno::EDQUOT as i32,
    ];
    if e.raw_os_error().is_some_and(|c| full.contains(&c)) {
        return Status::resource_exhausted(msg);
    }
    match e.kind() {
        io::ErrorKind::PermissionDenied => Status::permission_denied(msg),
        io::ErrorKind::NotFound => Status::not_found(msg),
        _ => Status::internal(msg),
    }
}

#[cfg(test)]
mod tests;
