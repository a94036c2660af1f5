//! Reads a source once and fans its chunks out to every host that needs them.
//!
//! One blocking thread per source reads chunk by chunk from the smallest resume offset of its
//! hosts; each chunk (a `Bytes`, shared, never copied) goes to every host whose own resume
//! offset it has reached. The channels are bounded, so memory stays at a few chunks per host
//! whatever the file size, and the reader runs at the pace of its slowest host.
//!
//! With compression on, the same thread compresses each chunk once, before the fan-out: every
//! host gets the same frame, and the async runtime never compresses.

use std::fs::{File, Metadata};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;

use bytes::Bytes;
use dglrun_proto::compress::Packer;
use dglrun_proto::pb;
use dglrun_proto::CHUNK_SIZE;
use tokio::sync::mpsc;

use super::budget::{Budget, Room};

use super::plan::Content;

/// Chunks queued per host: one being sent, one ready, one being read.
pub const QUEUE_CHUNKS: usize = 2;

/// How chunks travel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// As they are.
    #[default]
    None,
    /// zstd at this level (see `dglrun_proto::compress`); a chunk that does not shrink is sent
    /// as it is.
    Zstd { level: i32 },
}

impl Compression {
    /// As the report names it.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Zstd { .. } => "zstd",
        }
    }
}

/// Reports name the algorithm only: `"none"` or `"zstd"`.
impl serde::Serialize for Compression {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// A chunk as it goes on the wire.
#[derive(Clone, Debug)]
pub struct ChunkMsg {
    /// Offset in the file.
    pub offset: u64,
    /// The chunk's length in the file (what progress and reports count).
    pub len: u64,
    /// What is sent: the chunk's bytes, or its zstd frame.
    pub data: Bytes,
    pub compression: pb::Compression,
}

/// Set when the reader fails: the streams it fed ended early, and this says why.
#[derive(Clone, Default)]
pub struct ReadError(Arc<Mutex<Option<String>>>);

impl ReadError {
    pub fn get(&self) -> Option<String> {
        self.0.lock().clone()
    }

    fn set(&self, e: String) {
        *self.0.lock() = Some(e);
    }
}

/// One host's end of a fan-out.
pub struct Feed {
    pub rx: mpsc::Receiver<ChunkMsg>,
    pub error: ReadError,
}

/// What is said of a file that changed while it was being sent: its chunks no longer match
/// the manifest, so no retry can succeed.
pub fn changed_message(path: &Path) -> String {
    format!(
        "{} changed while it was being copied; rerun the copy",
        path.display()
    )
}

/// Why a reader stopped.
#[derive(Debug, thiserror::Error)]
enum FanOutError {
    /// The file is not the one hashed any more (another size, mtime, ctime or inode).
    #[error("{}", changed_message(.0))]
    Changed(std::path::PathBuf),
    #[error("{0}")]
    Read(String),
}

impl From<String> for FanOutError {
    fn from(e: String) -> Self {
        Self::Read(e)
    }
}

/// Starts a reader for `content` (`size` bytes, `origin` for messages) feeding one stream per
/// entry of `offsets`, each from its own offset. Returns the feeds in the same order. With
/// `seen` (the file as it was hashed), the reader checks after every chunk that the file
/// still looks so, and stops naming it when it does not.
pub fn spawn(
    content: Content,
    origin: String,
    size: u64,
    offsets: &[u64],
    compression: Compression,
    seen: Option<Metadata>,
    budget: Option<Budget>,
) -> Vec<Feed> {
    let error = ReadError::default();
    let mut outs = Vec::new();
    let mut feeds = Vec::new();
    for &offset in offsets {
        let (tx, rx) = mpsc::channel(QUEUE_CHUNKS);
        outs.push((offset, tx));
        feeds.push(Feed {
            rx,
            error: error.clone(),
        });
    }
    tokio::task::spawn_blocking(move || {
        let mut outs = outs;
        let check = Check {
            seen: seen.as_ref(),
            budget: budget.as_ref(),
        };
        if let Err(e) = fan_out(&content, size, &mut outs, compression, check) {
            // Set before the senders drop: a stream that sees its end can then find the cause.
            error.set(match e {
                FanOutError::Changed(_) => e.to_string(),
                FanOutError::Read(e) => format!("{origin}: {e}"),
            });
        }
        drop(outs);
    });
    feeds
}

/// What the reader checks before and after each chunk.
#[derive(Clone, Copy)]
struct Check<'a> {
    /// The file as hashed.
    seen: Option<&'a Metadata>,
    /// Room for the chunk, taken before it is read.
    budget: Option<&'a Budget>,
}

fn fan_out(
    content: &Content,
    size: u64,
    outs: &mut Vec<(u64, mpsc::Sender<ChunkMsg>)>,
    compression: Compression,
    check: Check,
) -> Result<(), FanOutError> {
    let seen = check.seen;
    let Some(start) = outs.iter().map(|(o, _)| *o).min() else {
        return Ok(());
    };
    let mut packer = match compression {
        Compression::None => None,
        Compression::Zstd { level } => Some(
            Packer::new(level).map_err(|e| format!("cannot start zstd at level {level}: {e}"))?,
        ),
    };
    let mut source = Chunks::open(content, start)?;
    source.check(seen)?;
    let mut offset = start;
    while offset < size && !outs.is_empty() {
        let len = (size - offset).min(CHUNK_SIZE as u64) as usize;
        let room = check.budget.and_then(|b| b.take_blocking(len));
        let mut buf = check.budget.map_or_else(|| vec![0; len], |b| b.buffer(len));
        let n = source
            .next(&mut buf[..len])
            .map_err(|e| format!("cannot read at offset {offset}: {e}"))?;
        // After the read: a write that the chunk saw has updated the mtime by then.
        source.check(seen)?;
        if n < len {
            return Err(FanOutError::Read(format!(
                "the file shrank while being copied (ended at {} of {size} bytes)",
                offset + n as u64
            )));
        }
        // Once for all hosts; the raw chunk is given back as soon as its frame is made.
        let msg = match packer.as_mut().and_then(|p| p.pack(&buf[..len])) {
            Some(frame) => {
                if let Some(b) = check.budget {
                    b.recycle(buf);
                }
                ChunkMsg {
                    offset,
                    len: len as u64,
                    data: sealed(check.budget, room, frame.len(), frame),
                    compression: pb::Compression::Zstd,
                }
            }
            None => ChunkMsg {
                offset,
                len: len as u64,
                data: sealed(check.budget, room, len, buf),
                compression: pb::Compression::None,
            },
        };
        // A host whose stream ended (failed, or will retry on its own) drops out.
        outs.retain(|(from, tx)| *from > offset || tx.blocking_send(msg.clone()).is_ok());
        offset += len as u64;
    }
    Ok(())
}

/// The first `len` bytes of `buf`, holding their room in the bound while any host has them.
fn sealed(budget: Option<&Budget>, room: Option<Room>, len: usize, mut buf: Vec<u8>) -> Bytes {
    match (budget, room) {
        (Some(b), Some(room)) => b.seal(buf, len, room),
        _ => {
            buf.truncate(len);
            Bytes::from(buf)
        }
    }
}

/// Sequential chunks of a file or of bytes in memory.
enum Chunks<'a> {
    File(File, &'a Path),
    Bytes(&'a [u8], usize),
}

impl<'a> Chunks<'a> {
    fn open(content: &'a Content, start: u64) -> Result<Self, String> {
        match content {
            Content::File(p) => {
                let mut f =
                    File::open(p).map_err(|e| format!("cannot open {}: {e}", p.display()))?;
                f.seek(SeekFrom::Start(start))
                    .map_err(|e| format!("cannot seek in {}: {e}", p.display()))?;
                Ok(Self::File(f, p))
            }
            Content::Bytes(b) => Ok(Self::Bytes(b, start as usize)),
        }
    }

    /// Fails when the open file no longer looks as `seen` (one fstat: nothing next to the
    /// cost of reading a chunk).
    fn check(&self, seen: Option<&Metadata>) -> Result<(), FanOutError> {
        let (Self::File(f, p), Some(seen)) = (self, seen) else {
            return Ok(());
        };
        let now = f
            .metadata()
            .map_err(|e| format!("cannot stat {}: {e}", p.display()))?;
        if dglrun_proto::digest::unchanged(seen, &now) {
            Ok(())
        } else {
            Err(FanOutError::Changed(p.to_path_buf()))
        }
    }

    /// Fills `buf`; returns fewer bytes only at the end of the data.
    fn next(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::File(f, _) => {
                let mut n = 0;
                while n < buf.len() {
                    match f.read(&mut buf[n..]) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(n)
            }
            Self::Bytes(b, at) => {
                let src = b.get(*at..).unwrap_or(&[]);
                let n = src.len().min(buf.len());
                buf[..n].copy_from_slice(&src[..n]);
                *at += n;
                Ok(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dglrun_proto::compress::Unpacker;

    /// The chunks of a feed, as sent.
    async fn chunks(mut feed: Feed) -> Vec<ChunkMsg> {
        let mut out = Vec::new();
        while let Some(c) = feed.rx.recv().await {
            out.push(c);
        }
        out
    }

    /// The bytes (decompressed) and offsets of a feed.
    async fn collect(feed: Feed) -> (Vec<u8>, Vec<u64>) {
        let mut data = Vec::new();
        let mut offsets = Vec::new();
        let mut u = Unpacker::new();
        for c in chunks(feed).await {
            offsets.push(c.offset);
            match c.compression {
                pb::Compression::None => data.extend_from_slice(&c.data),
                pb::Compression::Zstd => {
                    data.extend_from_slice(u.unpack(&c.data, c.len as usize).unwrap())
                }
            }
        }
        (data, offsets)
    }

    #[tokio::test]
    async fn each_host_gets_the_file_from_its_own_offset() {
        let c = CHUNK_SIZE;
        let data: Vec<u8> = (0..2 * c + 10).map(|i| (i % 253) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, &data).unwrap();
        for compression in [Compression::None, Compression::Zstd { level: 1 }] {
            for content in [Content::File(p.clone()), Content::Bytes(data.clone())] {
                let feeds = spawn(
                    content,
                    "f".into(),
                    data.len() as u64,
                    &[c as u64, 0, 2 * c as u64 + 10],
                    compression,
                    None,
                    None,
                );
                // Concurrently, as the hosts' streams do: the reader goes at the slowest one's
                // pace.
                let got = futures::future::join_all(feeds.into_iter().map(collect)).await;
                assert_eq!(got[0], (data[c..].to_vec(), vec![c as u64, 2 * c as u64]));
                assert_eq!(got[1], (data.clone(), vec![0, c as u64, 2 * c as u64]));
                assert_eq!(got[2], (vec![], vec![]));
            }
        }
    }

    #[tokio::test]
    async fn a_chunk_is_compressed_once_for_all_hosts_and_only_if_it_shrinks() {
        // One compressible chunk, then one of noise, then a short compressible one.
        let mut data = vec![7u8; CHUNK_SIZE];
        let mut x = 1u64;
        data.extend((0..CHUNK_SIZE).map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        }));
        data.extend([1u8; 5000]);
        let feeds = spawn(
            Content::Bytes(data.clone()),
            "f".into(),
            data.len() as u64,
            &[0, 0],
            Compression::Zstd { level: 3 },
            None,
            None,
        );
        let got = futures::future::join_all(feeds.into_iter().map(chunks)).await;
        let kinds: Vec<_> = got[0].iter().map(|c| (c.compression, c.len)).collect();
        assert_eq!(
            kinds,
            [
                (pb::Compression::Zstd, CHUNK_SIZE as u64),
                (pb::Compression::None, CHUNK_SIZE as u64),
                (pb::Compression::Zstd, 5000),
            ]
        );
        assert!(got[0][0].data.len() < 1000, "{}", got[0][0].data.len());
        // Both hosts were handed the very same buffers: compressed once, never copied.
        for (a, b) in got[0].iter().zip(&got[1]) {
            assert_eq!(a.data.as_ptr(), b.data.as_ptr());
        }
    }

    #[tokio::test]
    async fn a_host_that_hangs_up_does_not_stop_the_others() {
        let data = vec![5u8; 3 * CHUNK_SIZE];
        let mut feeds = spawn(
            Content::Bytes(data.clone()),
            "f".into(),
            data.len() as u64,
            &[0, 0],
            Compression::None,
            None,
            None,
        );
        let second = feeds.pop().unwrap();
        drop(feeds);
        let (got, _) = collect(second).await;
        assert_eq!(got, data);
    }

    #[tokio::test]
    async fn a_file_changed_since_it_was_hashed_stops_the_reader_naming_it() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![3u8; 3 * CHUNK_SIZE]).unwrap();
        let seen = std::fs::metadata(&p).unwrap();
        // Past the file system's timestamp granularity (a plain test thread, no runtime).
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(std::time::Duration::from_millis(20));
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(b"new", 2 * CHUNK_SIZE as u64).unwrap();
        let mut feeds = spawn(
            Content::File(p.clone()),
            "part-0.x".into(),
            3 * CHUNK_SIZE as u64,
            &[0],
            Compression::None,
            Some(seen),
            None,
        );
        let feed = feeds.pop().unwrap();
        let err = feed.error.clone();
        let (got, _) = collect(feed).await;
        assert!(got.is_empty(), "{} bytes sent", got.len());
        assert_eq!(err.get().unwrap(), changed_message(&p));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reader_holds_no_more_than_its_share_of_the_budget() {
        let c = CHUNK_SIZE;
        let data = vec![9u8; 6 * c];
        // Two chunks in all.
        let budget = Budget::new(2 * c, c);
        let mut feeds = spawn(
            Content::Bytes(data.clone()),
            "f".into(),
            data.len() as u64,
            &[0],
            Compression::None,
            None,
            Some(budget.clone()),
        );
        let mut feed = feeds.pop().unwrap();
        let first = feed.rx.recv().await.unwrap();
        // With the first chunk held here, the reader gets one more and then waits for room.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(feed.rx.len(), 1);
        assert_eq!(budget.available(), 0);
        drop(first);
        let mut offsets = Vec::new();
        while let Some(m) = feed.rx.recv().await {
            offsets.push(m.offset);
        }
        assert_eq!(offsets.len(), 5);
        assert_eq!(budget.available(), 2 * c);
    }

    #[tokio::test]
    async fn a_file_that_shrank_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"short").unwrap();
        let mut feeds = spawn(
            Content::File(p),
            "part-0.x".into(),
            100,
            &[0],
            Compression::None,
            None,
            None,
        );
        let feed = feeds.pop().unwrap();
        let err = feed.error.clone();
        let (got, _) = collect(feed).await;
        assert!(got.is_empty());
        let e = err.get().unwrap();
        assert!(e.contains("part-0.x") && e.contains("shrank"), "{e}");
    }
}
