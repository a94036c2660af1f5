//! Partial files: where an unfinished transfer is kept, and how much of it can be trusted.
//!
//! Rule: the bytes of a transfer go to `<dir>/.<name>.dglrun-partial` beside the target (same
//! file system, so the final rename is atomic). A transfer that stops midway leaves its
//! partial in place; the next prepare keeps its longest prefix of whole chunks that match the
//! new manifest and resumes after it. A finished transfer renames its partial onto the
//! target, so nothing is left behind. The target name only ever holds a whole, verified file.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use dglrun_proto::digest::{chunk_hash, Hash};
use dglrun_proto::CHUNK_SIZE;

use super::manifest::Manifest;

pub use crate::confine::PARTIAL_SUFFIX;

/// `<dir>/.<name>.dglrun-partial` for `<dir>/<name>`.
pub fn partial_path(target: &Path) -> PathBuf {
    let name = target.file_name().unwrap_or_default();
    target.with_file_name(crate::confine::partial_name(name))
}

/// Length of the longest prefix of `file`, up to `limit` bytes, made of whole chunks that
/// match the manifest (the file's last chunk may be short). Reads each byte once.
pub(super) fn verified_prefix(file: &File, m: &Manifest, limit: u64) -> io::Result<u64> {
    let have = file.metadata()?.len().min(limit).min(m.size);
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut verified = 0u64;
    for expected in &m.chunks {
        let len = m.chunk_len_at(verified);
        if verified + len > have {
            break;
        }
        let data = &mut buf[..len as usize];
        file.read_exact_at(data, verified)?;
        if chunk_hash(data) != *expected {
            break;
        }
        verified += len;
    }
    Ok(verified)
}

/// What the file system says about a file; if any of it changes the contents may have.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
    dev: u64,
}

impl Stamp {
    fn of(m: &Metadata) -> Self {
        Self {
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            ino: m.ino(),
            dev: m.dev(),
        }
    }
}

struct Record {
    stamp: Stamp,
    digest: Hash,
    /// Length of the verified prefix.
    good: u64,
}

/// Partials this process verified in a prepare and that nobody touched since: a put resuming
/// one of them need not read it again. Anything else is verified again before resuming.
#[derive(Default)]
pub(super) struct Verified {
    map: Mutex<HashMap<PathBuf, Record>>,
}

impl Verified {
    fn map(&self) -> parking_lot::MutexGuard<'_, HashMap<PathBuf, Record>> {
        self.map.lock()
    }

    /// Remembers that the first `good` bytes of `partial`, as it is now, are a verified
    /// prefix of the file `digest`.
    pub(super) fn remember(&self, partial: &Path, meta: &Metadata, digest: Hash, good: u64) {
        self.map().insert(
            partial.to_path_buf(),
            Record {
                stamp: Stamp::of(meta),
                digest,
                good,
            },
        );
    }

    /// The verified prefix of `partial` when it is unchanged since it was verified against
    /// the file `digest`.
    pub(super) fn still_valid(
        &self,
        partial: &Path,
        meta: &Metadata,
        digest: &Hash,
    ) -> Option<u64> {
        self.map()
            .get(partial)
            .filter(|r| r.digest == *digest && r.stamp == Stamp::of(meta))
            .map(|r| r.good)
    }

    pub(super) fn forget(&self, partial: &Path) {
        self.map().remove(partial);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dglrun_proto::digest::hash_reader;
    use dglrun_proto::pb;

    fn manifest(data: &[u8]) -> Manifest {
        let d = hash_reader(data, |_| {}).unwrap();
        Manifest::from_pb(pb::FileManifest {
            path: "f".into(),
            size: d.size,
            digest: d.digest.to_vec(),
            chunk_hashes: d.chunk_hashes.iter().map(|h| h.to_vec()).collect(),
            mode: 0o644,
        })
        .unwrap()
    }

    #[test]
    fn partial_sits_beside_its_target() {
        assert_eq!(
            partial_path(Path::new("/r/ws/data/part0/graph.dgl")),
            Path::new("/r/ws/data/part0/.graph.dgl.dglrun-partial")
        );
    }

    #[test]
    fn keeps_only_whole_matching_chunks() {
        let c = CHUNK_SIZE;
        let data: Vec<u8> = (0..2 * c + 100).map(|i| (i % 251) as u8).collect();
        let m = manifest(&data);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p");
        let check = |content: &[u8], limit: u64, expected: u64| {
            std::fs::write(&p, content).unwrap();
            let f = File::open(&p).unwrap();
            assert_eq!(verified_prefix(&f, &m, limit).unwrap(), expected);
        };
        check(&data, u64::MAX, data.len() as u64);
        check(&data[..c + 5], u64::MAX, c as u64);
        check(&data[..c - 1], u64::MAX, 0);
        check(&data, c as u64, c as u64);
        let mut bad = data.clone();
        bad[c + 1] ^= 1;
        check(&bad, u64::MAX, c as u64);
        bad[0] ^= 1;
        check(&bad, u64::MAX, 0);
        let mut longer = data.clone();
        longer.extend_from_slice(b"junk");
        check(&longer, u64::MAX, data.len() as u64);
    }
}
