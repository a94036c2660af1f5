//! Chunk compression on the wire, the rule both ends share.
//!
//! A chunk sent as [`Compression::Zstd`](crate::pb::Compression::Zstd) carries one zstd frame
//! whose content is exactly the chunk's bytes; how many bytes that is follows from the
//! manifest (every chunk but the last is [`CHUNK_SIZE`](crate::CHUNK_SIZE)). The receiver
//! decompresses into a buffer of exactly that length, so no frame can make it allocate or
//! produce more, and then checks the chunk's SHA-256 like that of any other chunk: compression
//! changes what travels, never what is verified.

use std::ops::RangeInclusive;

use zstd::bulk::{Compressor, Decompressor};

/// `--compress-level` unless told otherwise: zstd's own default, a few hundred MB/s per core
/// with most of the gain of the slower levels on typical partition data.
pub const DEFAULT_LEVEL: i32 = 3;

/// Levels a sender may pick. Above 19 zstd wants much more memory on both ends.
pub const LEVELS: RangeInclusive<i32> = 1..=19;

/// A frame is sent only if it is below this share (percent) of the raw chunk. Closer to 100 %
/// the saving on the wire is worth less than the receiver's work to decompress, and data that
/// does not compress (random, already compressed) then costs the receiver nothing.
pub const WORTH_PERCENT: usize = 97;

/// The longest frame a receiver accepts for a chunk of `len` bytes: zstd's worst case for
/// that much input. Anything longer cannot be an honest frame of the chunk.
pub fn max_frame_len(len: usize) -> usize {
    zstd::zstd_safe::compress_bound(len)
}

/// The sender's half: one zstd context, reused for every chunk a thread compresses.
pub struct Packer {
    ctx: Compressor<'static>,
}

impl Packer {
    /// Fails only if zstd cannot allocate its context or refuses the level.
    pub fn new(level: i32) -> std::io::Result<Self> {
        Ok(Self {
            ctx: Compressor::new(level)?,
        })
    }

    /// The zstd frame of `raw`, or None when it would not be [worth it](WORTH_PERCENT).
    pub fn pack(&mut self, raw: &[u8]) -> Option<Vec<u8>> {
        // The output buffer is as large as a worthwhile frame may be: zstd stops with
        // "destination too small" as soon as it is clear the frame is not, so incompressible
        // data is given up on early, and no second size check is needed. Any other error
        // just means "send it raw", which is always correct.
        let mut out = Vec::with_capacity(raw.len() * WORTH_PERCENT / 100);
        self.ctx.compress_to_buffer(raw, &mut out).ok()?;
        (out.len() < raw.len() * WORTH_PERCENT / 100).then_some(out)
    }
}

/// Why a compressed chunk is no use; reads after "the compressed chunk at offset N".
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("is a frame of {frame} bytes, longer than any frame of {len} bytes can be")]
    TooLong { frame: usize, len: usize },
    #[error("cannot be unpacked: zstd does not start")]
    Start(#[source] std::io::Error),
    #[error("does not decompress to its {len} bytes")]
    Corrupt {
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("decompresses to {got} bytes, expected {len}")]
    WrongLength { got: usize, len: usize },
}

/// The receiver's half: a zstd context (made on the first compressed chunk) and one output
/// buffer, both reused for every chunk of a transfer.
#[derive(Default)]
pub struct Unpacker {
    ctx: Option<Decompressor<'static>>,
    buf: Vec<u8>,
}

impl Unpacker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The `len` bytes `frame` holds. Err (saying why) for a frame that is not zstd, is cut
    /// off, or holds more or fewer than `len` bytes; then the output is no use to anyone.
    pub fn unpack(&mut self, frame: &[u8], len: usize) -> Result<&[u8], UnpackError> {
        if frame.len() > max_frame_len(len) {
            return Err(UnpackError::TooLong {
                frame: frame.len(),
                len,
            });
        }
        let ctx = match &mut self.ctx {
            Some(c) => c,
            None => self
                .ctx
                .insert(Decompressor::new().map_err(UnpackError::Start)?),
        };
        // Exactly `len` bytes of room: a frame that holds more fails here (zstd's
        // "destination buffer is too small") instead of being written anywhere.
        self.buf.resize(len, 0);
        let out = &mut self.buf[..len];
        let n = ctx
            .decompress_to_buffer(frame, out)
            .map_err(|source| UnpackError::Corrupt { len, source })?;
        if n != len {
            return Err(UnpackError::WrongLength { got: n, len });
        }
        Ok(&self.buf[..len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compressible(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i / 1000 % 7) as u8).collect()
    }

    fn random(len: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_packed_chunk_unpacks_to_itself() {
        let raw = compressible(crate::CHUNK_SIZE);
        let frame = Packer::new(DEFAULT_LEVEL).unwrap().pack(&raw).unwrap();
        assert!(frame.len() < raw.len() / 10, "{}", frame.len());
        let mut u = Unpacker::new();
        assert_eq!(u.unpack(&frame, raw.len()).unwrap(), raw);
        // The buffer is reused: a shorter (last) chunk after a full one.
        let short = compressible(1000);
        let frame = Packer::new(1).unwrap().pack(&short).unwrap();
        assert_eq!(u.unpack(&frame, 1000).unwrap(), short);
    }

    #[test]
    fn data_that_does_not_shrink_is_left_raw() {
        let mut p = Packer::new(DEFAULT_LEVEL).unwrap();
        assert!(p.pack(&random(1 << 20)).is_none());
        assert!(p.pack(b"").is_none());
        // The context survives a refused frame.
        assert!(p.pack(&compressible(1 << 20)).is_some());
    }

    #[test]
    fn frames_of_the_wrong_length_or_no_frames_are_refused() {
        let mut u = Unpacker::new();
        let big = zstd::bulk::compress(&vec![0u8; 2 * crate::CHUNK_SIZE], 3).unwrap();
        let e = u.unpack(&big, crate::CHUNK_SIZE).unwrap_err().to_string();
        assert!(
            e.contains("does not decompress to its 4194304 bytes"),
            "{e}"
        );
        let small = zstd::bulk::compress(&[1u8; 100], 3).unwrap();
        let e = u.unpack(&small, 101).unwrap_err().to_string();
        assert!(e.contains("decompresses to 100 bytes, expected 101"), "{e}");
        let e = u.unpack(b"not a zstd frame", 100).unwrap_err().to_string();
        assert!(e.contains("does not decompress"), "{e}");
        let cut = &small[..small.len() - 2];
        assert!(u.unpack(cut, 100).is_err());
        let e = u
            .unpack(&vec![0u8; max_frame_len(10) + 1], 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("longer than any frame"), "{e}");
        // Still usable after all that.
        assert_eq!(u.unpack(&small, 100).unwrap(), [1u8; 100]);
    }
}
