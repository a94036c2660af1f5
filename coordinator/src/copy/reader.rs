//! Reads a source once and fans its chunks out to every host that needs them.
//!
//! One blocking thread per source reads chunk by chunk from the smallest resume offset of its
//! hosts; each chunk (a `Bytes`, shared, never copied) goes to every host whose own resume
//! offset it has reached. The channels are bounded, so memory stays at a few chunks per host
//! whatever the file size, and the reader runs at the pace of its slowest host.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use dglrun_proto::CHUNK_SIZE;
use tokio::sync::mpsc;

use super::plan::Content;

/// Chunks queued per host: one being sent, one ready, one being read.
pub const QUEUE_CHUNKS: usize = 2;

/// A chunk and its offset in the file.
pub type ChunkMsg = (u64, Bytes);

/// Set when the reader fails: the streams it fed ended early, and this says why.
#[derive(Clone, Default)]
pub struct ReadError(Arc<Mutex<Option<String>>>);

impl ReadError {
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, e: String) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }
}

/// One host's end of a fan-out.
pub struct Feed {
    pub rx: mpsc::Receiver<ChunkMsg>,
    pub error: ReadError,
}

/// Starts a reader for `content` (`size` bytes, `origin` for messages) feeding one stream per
/// entry of `offsets`, each from its own offset. Returns the feeds in the same order.
pub fn spawn(content: Content, origin: String, size: u64, offsets: &[u64]) -> Vec<Feed> {
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
        if let Err(e) = fan_out(&content, size, &mut outs) {
            // Set before the senders drop: a stream that sees its end can then find the cause.
            error.set(format!("{origin}: {e}"));
        }
        drop(outs);
    });
    feeds
}

fn fan_out(
    content: &Content,
    size: u64,
    outs: &mut Vec<(u64, mpsc::Sender<ChunkMsg>)>,
) -> Result<(), String> {
    let Some(start) = outs.iter().map(|(o, _)| *o).min() else {
        return Ok(());
    };
    let mut source = Chunks::open(content, start)?;
    let mut offset = start;
    while offset < size && !outs.is_empty() {
        let len = (size - offset).min(CHUNK_SIZE as u64) as usize;
        let chunk = source
            .next(len)
            .map_err(|e| format!("cannot read at offset {offset}: {e}"))?;
        if chunk.len() < len {
            return Err(format!(
                "the file shrank while being copied (ended at {} of {size} bytes)",
                offset + chunk.len() as u64
            ));
        }
        // A host whose stream ended (failed, or will retry on its own) drops out.
        outs.retain(|(from, tx)| {
            *from > offset || tx.blocking_send((offset, chunk.clone())).is_ok()
        });
        offset += len as u64;
    }
    Ok(())
}

/// Sequential chunks of a file or of bytes in memory.
enum Chunks<'a> {
    File(File),
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
                Ok(Self::File(f))
            }
            Content::Bytes(b) => Ok(Self::Bytes(b, start as usize)),
        }
    }

    /// Up to `len` bytes; fewer only at the end of the data.
    fn next(&mut self, len: usize) -> std::io::Result<Bytes> {
        match self {
            Self::File(f) => {
                // read_to_end fills spare capacity without zeroing it first.
                let mut buf = Vec::with_capacity(len);
                f.take(len as u64).read_to_end(&mut buf)?;
                Ok(Bytes::from(buf))
            }
            Self::Bytes(b, at) => {
                let end = (*at + len).min(b.len());
                let out = Bytes::copy_from_slice(b.get(*at..end).unwrap_or(&[]));
                *at = end;
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(mut feed: Feed) -> (Vec<u8>, Vec<u64>) {
        let mut data = Vec::new();
        let mut offsets = Vec::new();
        while let Some((off, chunk)) = feed.rx.recv().await {
            offsets.push(off);
            data.extend_from_slice(&chunk);
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
        for content in [Content::File(p.clone()), Content::Bytes(data.clone())] {
            let feeds = spawn(
                content,
                "f".into(),
                data.len() as u64,
                &[c as u64, 0, 2 * c as u64 + 10],
            );
            // Concurrently, as the hosts' streams do: the reader goes at the slowest one's pace.
            let got = futures::future::join_all(feeds.into_iter().map(collect)).await;
            assert_eq!(got[0], (data[c..].to_vec(), vec![c as u64, 2 * c as u64]));
            assert_eq!(got[1], (data.clone(), vec![0, c as u64, 2 * c as u64]));
            assert_eq!(got[2], (vec![], vec![]));
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
        );
        let second = feeds.pop().unwrap();
        drop(feeds);
        let (got, _) = collect(second).await;
        assert_eq!(got, data);
    }

    #[tokio::test]
    async fn a_file_that_shrank_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"short").unwrap();
        let mut feeds = spawn(Content::File(p), "part-0.x".into(), 100, &[0]);
        let feed = feeds.pop().unwrap();
        let err = feed.error.clone();
        let (got, _) = collect(feed).await;
        assert!(got.is_empty());
        let e = err.get().unwrap();
        assert!(e.contains("part-0.x") && e.contains("shrank"), "{e}");
    }
}
