//! The coordinator's bound on the chunk bytes it holds, across all hosts.
//!
//! Two kinds of buffer hold a chunk: the reader's (one per source, shared by every host that
//! gets it) and the PutFile stream's (tonic encodes each message into a buffer of its own, so
//! a chunk sent to 64 hosts is 64 buffers until HTTP/2 has written them). Each kind has its
//! own pool, so a stream waiting for room to encode never holds what the readers need, and
//! the other way round: neither can starve the other into a deadlock.
//!
//! A stream holds its permit from the moment it hands a message to tonic until it is asked
//! for the next one: hyper asks only once h2's send buffer of the stream (400 KiB by default)
//! has drained, so by then the message has left the process but for that remainder.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Permits count KiB: a semaphore holds at most `u32::MAX` permits per acquire.
const UNIT: usize = 1024;

/// The two pools of one copy.
#[derive(Clone, Debug)]
pub struct Budget {
    read: Arc<Semaphore>,
    send: Arc<Semaphore>,
    /// The largest single acquire: one chunk always fits, so nothing waits forever.
    read_max: u32,
    send_max: u32,
}

impl Budget {
    /// `bytes` in all, half for the readers and half for the streams, each at least `chunk`.
    pub fn new(bytes: usize, chunk: usize) -> Self {
        let half = (bytes / 2).max(chunk).div_ceil(UNIT);
        let half = u32::try_from(half).unwrap_or(u32::MAX >> 1);
        Self {
            read: Arc::new(Semaphore::new(half as usize)),
            send: Arc::new(Semaphore::new(half as usize)),
            read_max: half,
            send_max: half,
        }
    }

    /// Room for a chunk of `len` bytes about to be read. Blocking: for the reader's thread.
    pub fn read_blocking(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        let n = units(len).min(self.read_max);
        futures::executor::block_on(self.read.clone().acquire_many_owned(n)).ok()
    }

    /// Room for a message of `len` bytes about to be encoded for one host.
    pub async fn send(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        let n = units(len).min(self.send_max);
        self.send.clone().acquire_many_owned(n).await.ok()
    }

    /// Bytes of each pool not held right now.
    pub fn available(&self) -> (usize, usize) {
        (
            self.read.available_permits() * UNIT,
            self.send.available_permits() * UNIT,
        )
    }
}

fn units(len: usize) -> u32 {
    u32::try_from(len.div_ceil(UNIT)).unwrap_or(u32::MAX)
}
