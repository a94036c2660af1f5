//! A file manifest from the wire, checked once so the rest of `files` can trust it.

use dglrun_proto::digest::{chunk_count, digest_of, Hash};
use dglrun_proto::{pb, CHUNK_SIZE};

use super::error::FilesError;

/// Permission bits the agent gives a file: setuid, setgid and sticky are dropped, because a
/// file arriving over the network must not gain privileges on this host.
pub(super) const MODE_MASK: u32 = 0o777;

#[derive(Clone, Debug)]
pub struct Manifest {
    /// The path as the coordinator wrote it: what error messages name.
    pub path: String,
    pub size: u64,
    pub digest: Hash,
    pub chunks: Vec<Hash>,
    pub mode: u32,
}

impl Manifest {
    pub fn from_pb(m: pb::FileManifest) -> Result<Self, FilesError> {
        let bad = |reason: String| FilesError::Invalid(format!("manifest of {}: {reason}", m.path));
        let expected = chunk_count(m.size);
        if m.chunk_hashes.len() != expected {
            return Err(bad(format!(
                "{} chunk hashes for {} bytes, expected {expected}",
                m.chunk_hashes.len(),
                m.size
            )));
        }
        let digest: Hash = m
            .digest
            .as_slice()
            .try_into()
            .map_err(|_| bad(format!("digest is {} bytes, not 32", m.digest.len())))?;
        let mut chunks = Vec::with_capacity(expected);
        for (i, h) in m.chunk_hashes.iter().enumerate() {
            let h: Hash = h
                .as_slice()
                .try_into()
                .map_err(|_| bad(format!("chunk hash {i} is {} bytes, not 32", h.len())))?;
            chunks.push(h);
        }
        // The agent derives the file digest from the chunk list it verified, so the two
        // must agree up front: a manifest that contradicts itself could never be satisfied.
        if digest_of(m.size, &chunks) != digest {
            return Err(bad(
                "the digest does not match the size and chunk hashes".into()
            ));
        }
        if m.mode & !0o7777 != 0 {
            return Err(bad(format!("invalid mode {:o}", m.mode)));
        }
        Ok(Self {
            path: m.path,
            size: m.size,
            digest,
            chunks,
            mode: m.mode & MODE_MASK,
        })
    }

    /// Length of the chunk that starts at `offset` (a multiple of CHUNK_SIZE below `size`).
    pub fn chunk_len_at(&self, offset: u64) -> u64 {
        (self.size - offset).min(CHUNK_SIZE as u64)
    }

    /// A resume offset is valid at a chunk boundary or at the very end.
    pub fn is_valid_offset(&self, offset: u64) -> bool {
        offset <= self.size
            && (offset.checked_rem(CHUNK_SIZE as u64) == Some(0) || offset == self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dglrun_proto::digest::hash_reader;

    fn pb_of(data: &[u8]) -> pb::FileManifest {
        let d = hash_reader(data, |_| {}).unwrap();
        pb::FileManifest {
            path: "ws/f".into(),
            size: d.size,
            digest: d.digest.to_vec(),
            chunk_hashes: d.chunk_hashes.iter().map(|h| h.to_vec()).collect(),
            mode: 0o4755,
        }
    }

    fn check_err(m: pb::FileManifest, needle: &str) {
        let err = Manifest::from_pb(m).unwrap_err().to_string();
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        assert!(err.contains("ws/f"), "{err:?} names no path");
    }

    #[test]
    fn accepts_a_consistent_manifest_and_drops_special_bits() {
        let m = Manifest::from_pb(pb_of(&vec![7u8; CHUNK_SIZE + 1])).unwrap();
        assert_eq!(m.chunks.len(), 2);
        assert_eq!(m.mode, 0o755);
        assert_eq!(m.chunk_len_at(0), CHUNK_SIZE as u64);
        assert_eq!(m.chunk_len_at(CHUNK_SIZE as u64), 1);
        assert!(m.is_valid_offset(0));
        assert!(m.is_valid_offset(CHUNK_SIZE as u64));
        assert!(m.is_valid_offset(CHUNK_SIZE as u64 + 1));
        assert!(!m.is_valid_offset(5));
        assert!(!m.is_valid_offset(2 * CHUNK_SIZE as u64));
    }

    #[test]
    fn refuses_inconsistent_manifests() {
        let good = pb_of(b"hello");
        check_err(
            pb::FileManifest {
                chunk_hashes: vec![],
                ..good.clone()
            },
            "0 chunk hashes for 5 bytes",
        );
        check_err(
            pb::FileManifest {
                digest: vec![1; 5],
                ..good.clone()
            },
            "digest is 5 bytes",
        );
        check_err(
            pb::FileManifest {
                chunk_hashes: vec![vec![0; 31]],
                ..good.clone()
            },
            "chunk hash 0 is 31 bytes",
        );
        check_err(
            pb::FileManifest {
                size: 6,
                ..good.clone()
            },
            "does not match",
        );
        check_err(
            pb::FileManifest {
                digest: vec![0; 32],
                ..good.clone()
            },
            "does not match",
        );
        check_err(
            pb::FileManifest {
                mode: 0o10000,
                ..good
            },
            "invalid mode",
        );
    }
}
