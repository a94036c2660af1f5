//! The blocking half of a PutFile: verify each chunk, write it to the partial, and at the end
//! make the file durable and visible under its name.
//!
//! It runs on its own blocking thread fed by a bounded channel, so decompression, hashing and
//! disk writes of one chunk overlap the network receive of the next, and the async runtime
//! never does any of them.

use std::ffi::OsStr;
use std::fs::{File, Permissions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;

use dglrun_proto::compress::Unpacker;
use dglrun_proto::digest::chunk_hash;
use dglrun_proto::{pb, CHUNK_SIZE};
use rustix::fs::{OFlags, Timespec, Timestamps};
use tokio::sync::{mpsc, OwnedMutexGuard};

use super::cache::coarse_now;
use super::error::FilesError;
use super::partial::{partial_path, verified_prefix};
use super::request::{Chunk, FileSpec};
use super::{is_dir, open_parent, Active, Ctx};
use crate::confine::{partial_name, Dir};
use crate::metrics;

pub(super) enum ToWriter {
    /// A chunk whose offset and length the receiver already checked against the manifest.
    /// Raw, `data` is those `len` bytes; compressed, a zstd frame the receiver only bounded,
    /// which must hold exactly `len` bytes.
    Chunk(Chunk),
    /// Every chunk has been sent: make the file durable and rename it into place.
    Finish,
}

pub(super) struct Transfer {
    pub ctx: Ctx,
    pub file: FileSpec,
    /// The target's path inside the root: the key of its lock, cache entry and partial.
    pub key: PathBuf,
    pub offset: u64,
    /// Held until the writer is done, even if the request that started it is gone.
    pub _lock: OwnedMutexGuard<()>,
    pub _active: Active,
}

/// Runs a transfer to its end. Without a `Finish` the partial is kept (with every chunk
/// written so far verified) and the transfer reports that it was cut off.
pub(super) fn run(
    t: Transfer,
    mut rx: mpsc::Receiver<ToWriter>,
) -> Result<pb::PutFileReply, FilesError> {
    let m = &t.file.manifest;
    let dir = open_parent(&t.ctx, &t.file, true)?;
    let (_, name) = t.file.path.split()?;
    let st = dir
        .stat_entry(name)
        .map_err(|e| FilesError::io("cannot stat", &m.path, e))?;
    if st.is_some_and(|st| is_dir(&st)) {
        return Err(FilesError::InTheWay(m.path.clone()));
    }
    let partial = partial_name(name);
    let file = open_partial(&t, &dir, &partial)?;
    let mut next = t.offset;
    let mut unpacker = Unpacker::new();
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            ToWriter::Chunk(Chunk {
                offset,
                len,
                data,
                compression,
            }) => {
                let data: &[u8] = match compression {
                    pb::Compression::None => &data,
                    // Into a buffer of exactly `len` bytes: a frame holding more (a "bomb") or
                    // less, or no frame at all, is refused like a chunk with a wrong hash.
                    pb::Compression::Zstd => unpacker.unpack(&data, len as usize).map_err(|e| {
                        metrics::add(&metrics::COUNTERS.verification_failures, 1);
                        FilesError::DataLoss(format!(
                            "{}: the compressed chunk at offset {offset} {}; nothing from it \
                             was written",
                            m.path,
                            dglrun_proto::error_chain(&e)
                        ))
                    })?,
                };
                let idx = (offset / CHUNK_SIZE as u64) as usize;
                if offset != next
                    || data.len() as u64 != len
                    || m.chunks.get(idx) != Some(&chunk_hash(data))
                {
                    // Not written: the partial keeps only verified bytes.
                    metrics::add(&metrics::COUNTERS.verification_failures, 1);
                    return Err(FilesError::DataLoss(format!(
                        "{}: the chunk at offset {offset} does not match its SHA-256 in the \
                         manifest; nothing from it was written",
                        m.path
                    )));
                }
                file.write_all_at(data, offset)
                    .map_err(|e| FilesError::io("cannot write", &m.path, e))?;
                metrics::add(&metrics::COUNTERS.bytes_received, data.len() as u64);
                next += data.len() as u64;
            }
            ToWriter::Finish => {
                if next != m.size {
                    return Err(FilesError::Invalid(format!(
                        "{}: finished at {next} of {} bytes",
                        m.path, m.size
                    )));
                }
                return finish(&t, &dir, name, &partial, file);
            }
        }
    }
    Err(FilesError::CutOff {
        path: m.path.clone(),
        at: next,
        size: m.size,
    })
}

/// Opens the partial for this transfer, in the opened parent directory.
///
/// Starting at 0, a new file is created under the partial name (whatever held the name
/// before is unlinked, never written to: it may be a hard link to a file elsewhere).
/// Resuming, the existing partial must be a regular file with a single link, and its first
/// `offset` bytes verified before anything is added after them.
fn open_partial(t: &Transfer, dir: &Dir, partial: &OsStr) -> Result<File, FilesError> {
    let m = &t.file.manifest;
    let key = partial_path(&t.key);
    let create_err = |e| FilesError::io("cannot create the partial file of", &m.path, e);
    if t.offset == 0 {
        t.ctx.verified.forget(&key);
        dir.unlink(partial).map_err(create_err)?;
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL;
        return dir.open(partial, flags, 0o600).map_err(create_err);
    }
    let file = dir.open(partial, OFlags::RDWR, 0).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            FilesError::Precondition(format!(
                "{}: no partial file to resume at offset {}; prepare the file again",
                m.path, t.offset
            ))
        } else {
            FilesError::io("cannot open the partial file of", &m.path, e)
        }
    })?;
    let meta = file
        .metadata()
        .map_err(|e| FilesError::io("cannot stat the partial file of", &m.path, e))?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Err(FilesError::Precondition(format!(
            "{}: the partial file is not a regular file with a single link; it is not \
             resumed (a transfer from offset 0 replaces it)",
            m.path
        )));
    }
    let trusted = meta.len() >= t.offset
        && t.ctx
            .verified
            .still_valid(&key, &meta, &m.digest)
            .is_some_and(|good| good >= t.offset);
    if !trusted {
        // Not verified by a prepare of this process (or touched since): check it now.
        let good = verified_prefix(&file, m, t.offset)
            .map_err(|e| FilesError::io("cannot read the partial file of", &m.path, e))?;
        if good < t.offset {
            return Err(FilesError::Precondition(format!(
                "{}: only {good} bytes of the partial file are verified, cannot resume at \
                 offset {}; prepare the file again",
                m.path, t.offset
            )));
        }
    }
    t.ctx.verified.forget(&key);
    file.set_len(t.offset)
        .map_err(|e| FilesError::io("cannot truncate the partial file of", &m.path, e))?;
    Ok(file)
}

/// True when `name` in `dir` is the inode `file` is open on.
fn is_same_inode(dir: &Dir, name: &OsStr, file: &std::fs::Metadata) -> bool {
    matches!(dir.stat_entry(name), Ok(Some(st))
        if st.st_dev == file.dev() && st.st_ino == file.ino())
}

/// Mode, fsync, rename over the target (only if the partial's name still holds the inode this
/// transfer wrote), fsync the directory, remember the digest of that inode.
fn finish(
    t: &Transfer,
    dir: &Dir,
    name: &OsStr,
    partial: &OsStr,
    file: File,
) -> Result<pb::PutFileReply, FilesError> {
    let m = &t.file.manifest;
    let stat_err = |e| FilesError::io("cannot stat the partial file of", &m.path, e);
    let len = file.metadata().map_err(stat_err)?.len();
    if len != m.size {
        return Err(FilesError::Internal(format!(
            "{}: the partial file holds {len} bytes, expected {}",
            m.path, m.size
        )));
    }
    file.set_permissions(Permissions::from_mode(m.mode & !t.ctx.umask))
        .map_err(|e| FilesError::io("cannot set the mode of", &m.path, e))?;
    // The contents are known from now on. The mtime is set just before this tick of the
    // file-timestamp clock, so any later write, even within this tick, gets a newer one and
    // the hash cache can trust the entry at once (see `SharedCache::insert`).
    let known = coarse_now();
    let before = if known.1 > 0 {
        (known.0, known.1 - 1)
    } else {
        (known.0 - 1, 999_999_999)
    };
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: before.0,
            tv_nsec: before.1 as _,
        },
    };
    rustix::fs::futimens(&file, &times)
        .map_err(|e| FilesError::io("cannot set the mtime of", &m.path, e))?;
    file.sync_all()
        .map_err(|e| FilesError::io("cannot fsync", &m.path, e))?;
    let written = file.metadata().map_err(stat_err)?;
    // Every chunk was verified (the prefix before `offset` too), and the manifest's digest
    // was checked against its chunk list: the inode this transfer wrote is whole and correct.
    // Only that inode may be renamed onto the target.
    if !is_same_inode(dir, partial, &written) {
        return Err(FilesError::Replaced {
            path: m.path.clone(),
        });
    }
    dir.rename(partial, name)
        .map_err(|e| FilesError::io("cannot rename the finished file onto", &m.path, e))?;
    if !is_same_inode(dir, name, &written) {
        // Swapped between the check and the rename: what landed is not what was verified.
        let _ = dir.unlink(name);
        t.ctx.cache.remove(&t.key);
        return Err(FilesError::Replaced {
            path: m.path.clone(),
        });
    }
    // Makes the rename itself durable.
    dir.sync()
        .map_err(|e| FilesError::io("cannot fsync the directory of", &m.path, e))?;
    match file.metadata() {
        Ok(meta) => t.ctx.cache.insert(&t.key, &meta, m.digest, known),
        Err(_) => t.ctx.cache.remove(&t.key),
    }
    t.ctx.cache.save_soon();
    metrics::add(&metrics::COUNTERS.files_verified, 1);
    Ok(pb::PutFileReply {
        path: m.path.clone(),
        bytes_written: m.size - t.offset,
    })
}
