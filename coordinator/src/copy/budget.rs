//! The coordinator's bound on the chunk bytes it holds, across all hosts.
//!
//! Two kinds of buffer hold a chunk: the reader's (one per source, shared by every host that
//! gets it) and the PutFile stream's (tonic encodes each message into a buffer of its own, so
//! a chunk sent to 64 hosts is 64 buffers until HTTP/2 has written them). Each kind has its
//! own pool, so a stream waiting for room never holds what the readers need, and the other
//! way round: neither can starve the other into a deadlock.
//!
//! - Read-ahead: a reader takes room for a chunk before reading it; the room is freed when
//!   every host has taken the chunk.
//! - Streams: a stream holds at most two encoded messages (one h2 is still writing, one being
//!   handed over: hyper asks for the next only once h2's 400 KiB send buffer of the stream has
//!   drained, but the previous message's buffer lives until its last byte is written), so it
//!   reserves two chunks (or twice its file, if smaller) for its whole life. A source whose
//!   hosts need more than the pool is sent to them in groups, each reading the file again
//!   (from the page cache): a whole group's room is taken at once, so no group can wait on
//!   another while holding part of the pool.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Permits count KiB: a semaphore holds at most `u32::MAX` permits per acquire.
const UNIT: usize = 1024;

/// The two pools of one copy.
#[derive(Clone, Debug)]
pub struct Budget {
    read: Arc<Semaphore>,
    streams: Arc<Semaphore>,
    read_units: u32,
    stream_units: u32,
    chunk: usize,
}

impl Budget {
    /// `bytes` in all: a quarter for read-ahead, the rest for streams; each pool holds at
    /// least two chunks.
    pub fn new(bytes: usize, chunk: usize) -> Self {
        let read = units((bytes / 4).max(2 * chunk));
        let streams = units(bytes.saturating_sub(bytes / 4).max(2 * chunk));
        Self {
            read: Arc::new(Semaphore::new(read as usize)),
            streams: Arc::new(Semaphore::new(streams as usize)),
            read_units: read,
            stream_units: streams,
            chunk,
        }
    }

    /// Room for a chunk of `len` bytes about to be read. Blocking: for the reader's thread.
    pub fn read_blocking(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        let n = units(len).min(self.read_units);
        futures::executor::block_on(self.read.clone().acquire_many_owned(n)).ok()
    }

    /// What one stream of a `size`-byte file reserves.
    fn stream_cost(&self, size: u64) -> u32 {
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        units(size.min(self.chunk).saturating_mul(2)).clamp(1, self.stream_units)
    }

    /// How many hosts can be sent a `size`-byte file at once.
    pub fn group(&self, size: u64) -> usize {
        (self.stream_units / self.stream_cost(size)).max(1) as usize
    }

    /// Room for `n` streams (at most [`Budget::group`]) of a `size`-byte file, held until the
    /// permit drops; `None` when the pool has not that much free now.
    pub fn try_streams(&self, size: u64, n: usize) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(n.min(self.group(size))).unwrap_or(1);
        let want = self
            .stream_cost(size)
            .saturating_mul(n)
            .min(self.stream_units);
        self.streams.clone().try_acquire_many_owned(want).ok()
    }

    /// Bytes of the read-ahead pool not held right now.
    pub fn read_available(&self) -> usize {
        self.read.available_permits() * UNIT
    }
}

fn units(len: usize) -> u32 {
    u32::try_from(len.div_ceil(UNIT)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_files_go_to_a_few_hosts_at_a_time_and_small_ones_to_all() {
        let mib = 1 << 20;
        let b = Budget::new(64 * mib, 4 * mib);
        // 48 MiB for streams, 8 MiB per stream of a big file.
        assert_eq!(b.group(1 << 30), 6);
        assert_eq!(b.group(4 * mib as u64), 6);
        // A 1 KiB config: 2 KiB a stream.
        assert!(b.group(1024) >= 64 * 256);
        // The floor: one stream of two chunks, whatever was asked.
        let tiny = Budget::new(0, 4 * mib);
        assert_eq!(tiny.group(1 << 30), 1);
    }
}
