//! The coordinator's bound on the chunk bytes it holds, across all hosts.
//!
//! A chunk's room is taken by its reader before the read and travels with the chunk's bytes
//! ([`Budget::seal`]): it comes back when the last holder drops them, that is once HTTP/2 has
//! written the chunk to every connection it goes to (the PutFile body hands the reader's
//! `Bytes` to h2 as they are, so a chunk sent to 64 hosts is one buffer). The bound is thus
//! exact, whatever holds a chunk: the queue to a stream, hyper, or h2's send buffer.
//!
//! Only readers take room, and a held chunk only waits for its connections, never for room,
//! so no wait can close a cycle. Chunk buffers are reused: a fresh 4 MiB buffer costs a page
//! fault and a zeroed page per 4 KiB, a few percent of the coordinator's CPU when it only
//! sends. At most the bound's worth of them exist, held or waiting for reuse.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Permits count KiB: a semaphore holds at most `u32::MAX` permits per acquire.
const UNIT: usize = 1024;

/// The bound of one copy, and its chunk buffers.
#[derive(Clone, Debug)]
pub struct Budget {
    room: Arc<Semaphore>,
    units: u32,
    chunk: usize,
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// Room for one chunk, taken by [`Budget::take_blocking`].
#[derive(Debug)]
pub struct Room {
    _permit: OwnedSemaphorePermit,
}

impl Budget {
    /// `bytes` in all, at least two chunks.
    pub fn new(bytes: usize, chunk: usize) -> Self {
        let units = units(bytes.max(2 * chunk));
        Self {
            room: Arc::new(Semaphore::new(units as usize)),
            units,
            chunk,
            spare: Arc::default(),
        }
    }

    /// Room for a chunk of `len` bytes about to be read. Blocking: for the reader's thread.
    pub fn take_blocking(&self, len: usize) -> Option<Room> {
        let n = units(len).min(self.units);
        futures::executor::block_on(self.room.clone().acquire_many_owned(n))
            .ok()
            .map(|p| Room { _permit: p })
    }

    /// A buffer of at least `len` bytes to read a chunk into: a spare one when there is one.
    pub fn buffer(&self, len: usize) -> Vec<u8> {
        if len <= self.chunk {
            if let Some(b) = self.spare.lock().pop() {
                return b;
            }
        }
        vec![0; len.max(self.chunk)]
    }

    /// Gives back a buffer from [`Budget::buffer`] that is not sent after all.
    pub fn recycle(&self, buf: Vec<u8>) {
        if buf.len() == self.chunk {
            self.spare.lock().push(buf);
        }
    }

    /// The first `len` bytes of `buf`, holding `room` until the last clone is dropped; a
    /// chunk-sized buffer then goes back for reuse, before the room is free for the next read.
    pub fn seal(&self, buf: Vec<u8>, len: usize, room: Room) -> Bytes {
        let len = len.min(buf.len());
        Bytes::from_owner(Held {
            buf,
            len,
            budget: self.clone(),
            _room: room,
        })
    }

    /// Bytes of the bound not held right now.
    pub fn available(&self) -> usize {
        self.room.available_permits() * UNIT
    }
}

/// A sealed chunk. Fields drop after `drop` runs: the buffer is spare before the room is free.
struct Held {
    buf: Vec<u8>,
    len: usize,
    budget: Budget,
    _room: Room,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.recycle(std::mem::take(&mut self.buf));
    }
}

fn units(len: usize) -> u32 {
    u32::try_from(len.div_ceil(UNIT)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunks_room_comes_back_when_its_last_clone_is_dropped() {
        let c = 64 * UNIT;
        let b = Budget::new(2 * c, c);
        let room = b.take_blocking(c).unwrap();
        let mut buf = b.buffer(c);
        buf[0] = 7;
        let bytes = b.seal(buf, 10, room);
        let copy = bytes.clone();
        assert_eq!((bytes.len(), bytes[0]), (10, 7));
        assert_eq!(b.available(), c);
        drop(bytes);
        assert_eq!(b.available(), c);
        drop(copy);
        assert_eq!(b.available(), 2 * c);
        // The buffer is reused, whatever it held.
        let again = b.buffer(c);
        assert_eq!((again.len(), again[0]), (c, 7));
    }

    #[test]
    fn the_bound_holds_at_least_two_chunks_and_a_buffer_fits_any_request() {
        let c = 64 * UNIT;
        let b = Budget::new(0, c);
        assert_eq!(b.available(), 2 * c);
        assert_eq!(b.buffer(3 * c).len(), 3 * c);
        // Only chunk-sized buffers are kept.
        b.recycle(vec![0; 3 * c]);
        assert_eq!(b.buffer(1).len(), c);
    }
}
