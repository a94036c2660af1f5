//! The blocking half of a PutFile: verify each chunk, write it to the partial, and at the end
//! make the file durable and visible under its name.
//!
//! It runs on its own blocking thread fed by a bounded channel, so decompression, hashing and
//! disk writes of one chunk overlap the network receive of the next, and the async runtime
//! never does any of them.

use std::fs::{self, File, OpenOptions, Permissions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use dglrun_proto::compress::Unpacker;
use dglrun_proto::digest::chunk_hash;
use dglrun_proto::{pb, CHUNK_SIZE};
use tokio::sync::{mpsc, OwnedMutexGuard};
use tonic::Status;

use super::cache::SharedCache;
use super::io_status;
use super::manifest::Manifest;
use super::partial::{verified_prefix, Verified};
use super::Active;
use crate::confine::{verify_opened, Root};
use crate::metrics;

pub enum ToWriter {
    /// A chunk whose offset and length (`len`, as the manifest has it) the receiver already
    /// checked against the manifest. Raw, `data` is those `len` bytes; compressed, a zstd frame
    /// the receiver only bounded, which must hold exactly `len` bytes.
    Chunk {
        offset: u64,
        len: u64,
        data: Bytes,
        compression: pb::Compression,
    },
    /// Every chunk has been sent: make the file durable and rename it into place.
    Finish,
}

pub struct Transfer {
    pub root: Root,
    pub manifest: Manifest,
    pub target: PathBuf,
    pub partial: PathBuf,
    pub offset: u64,
    pub cache: Arc<SharedCache>,
    pub verified: Arc<Verified>,
    /// Held until the writer is done, even if the request that started it is gone.
    pub _lock: OwnedMutexGuard<()>,
    pub _active: Active,
}

/// Runs a transfer to its end. Without a `Finish` the partial is kept (with every chunk
/// written so far verified) and the transfer reports that it was cut off.
pub fn run(t: Transfer, mut rx: mpsc::Receiver<ToWriter>) -> Result<pb::PutFileReply, Status> {
    let m = &t.manifest;
    let file = open_partial(&t)?;
    let mut next = t.offset;
    let mut unpacker = Unpacker::new();
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            ToWriter::Chunk {
                offset,
                len,
                data,
                compression,
            } => {
                let data: &[u8] = match compression {
                    pb::Compression::None => &data,
                    // Into a buffer of exactly `len` bytes: a frame holding more (a "bomb") or
                    // less, or no frame at all, is refused like a chunk with a wrong hash.
                    pb::Compression::Zstd => unpacker.unpack(&data, len as usize).map_err(|e| {
                        metrics::add(&metrics::COUNTERS.verification_failures, 1);
                        Status::data_loss(format!(
                            "{}: the compressed chunk at offset {offset} {e}; nothing from it \
                             was written",
                            m.path
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
                    return Err(Status::data_loss(format!(
                        "{}: the chunk at offset {offset} does not match its SHA-256 in the \
                         manifest; nothing from it was written",
                        m.path
                    )));
                }
                file.write_all_at(data, offset)
                    .map_err(|e| io_status("cannot write", &m.path, e))?;
                metrics::add(&metrics::COUNTERS.bytes_received, data.len() as u64);
                next += data.len() as u64;
            }
            ToWriter::Finish => {
                if next != m.size {
                    return Err(Status::invalid_argument(format!(
                        "{}: finished at {next} of {} bytes",
                        m.path, m.size
                    )));
                }
                return finish(&t, file);
            }
        }
    }
    Err(Status::aborted(format!(
        "{}: transfer cut off at {next} of {} bytes; the verified part is kept to resume",
        m.path, m.size
    )))
}

/// Opens the partial for this transfer: fresh when starting at 0, otherwise the existing one,
/// whose first `offset` bytes must be verified before anything is added after them.
fn open_partial(t: &Transfer) -> Result<File, Status> {
    let m = &t.manifest;
    let mut opts = OpenOptions::new();
    // O_NOFOLLOW: the partial is ours; a symlink in its place is not followed out of the root.
    opts.read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits());
    if t.offset == 0 {
        t.verified.forget(&t.partial);
        let file = opts
            .create(true)
            .truncate(true)
            .open(&t.partial)
            .map_err(|e| io_status("cannot create the partial file of", &m.path, e))?;
        // The directory was checked before the open; the kernel's record of what was opened
        // cannot have been swapped in between.
        verify_opened(&t.root, &file, &m.path)?;
        return Ok(file);
    }
    let file = opts.open(&t.partial).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Status::failed_precondition(format!(
                "{}: no partial file to resume at offset {}; prepare the file again",
                m.path, t.offset
            ))
        } else {
            io_status("cannot open the partial file of", &m.path, e)
        }
    })?;
    verify_opened(&t.root, &file, &m.path)?;
    let meta = file
        .metadata()
        .map_err(|e| io_status("cannot stat the partial file of", &m.path, e))?;
    let trusted = meta.len() >= t.offset && t.verified.still_valid(&t.partial, &meta, &m.digest);
    if !trusted {
        // Not verified by a prepare of this process (or touched since): check it now.
        let good = verified_prefix(&file, m, t.offset)
            .map_err(|e| io_status("cannot read the partial file of", &m.path, e))?;
        if good < t.offset {
            return Err(Status::failed_precondition(format!(
                "{}: only {good} bytes of the partial file are verified, cannot resume at \
                 offset {}; prepare the file again",
                m.path, t.offset
            )));
        }
    }
    t.verified.forget(&t.partial);
    file.set_len(t.offset)
        .map_err(|e| io_status("cannot truncate the partial file of", &m.path, e))?;
    Ok(file)
}

/// fsync, mode, rename over the target, fsync the directory, remember the digest.
fn finish(t: &Transfer, file: File) -> Result<pb::PutFileReply, Status> {
    let m = &t.manifest;
    let len = file
        .metadata()
        .map_err(|e| io_status("cannot stat the partial file of", &m.path, e))?
        .len();
    if len != m.size {
        return Err(Status::internal(format!(
            "{}: the partial file holds {len} bytes, expected {}",
            m.path, m.size
        )));
    }
    file.set_permissions(Permissions::from_mode(m.mode))
        .map_err(|e| io_status("cannot set the mode of", &m.path, e))?;
    file.sync_all()
        .map_err(|e| io_status("cannot fsync", &m.path, e))?;
    drop(file);
    // Every chunk was verified (the prefix before `offset` too), and the manifest's digest
    // was checked against its chunk list: the file is whole and correct.
    fs::rename(&t.partial, &t.target)
        .map_err(|e| io_status("cannot rename the finished file onto", &m.path, e))?;
    if let Some(dir) = t.target.parent() {
        // Makes the rename itself durable.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_status("cannot fsync the directory of", &m.path, e))?;
    }
    match fs::symlink_metadata(&t.target) {
        Ok(meta) => t.cache.insert(&t.target, &meta, m.digest),
        Err(_) => t.cache.remove(&t.target),
    }
    t.cache.save_soon();
    metrics::add(&metrics::COUNTERS.files_verified, 1);
    Ok(pb::PutFileReply {
        path: m.path.clone(),
        bytes_written: m.size - t.offset,
    })
}
