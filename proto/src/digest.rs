//! The file digest of the protocol, and a cache that remembers it.
//!
//! A file is cut into [`CHUNK_SIZE`] chunks and each chunk is hashed with SHA-256. The file's
//! digest is SHA-256 over a domain tag, the file size and the list of chunk hashes. Both ends
//! therefore read and hash every byte exactly once: a chunk hash verifies a chunk in transit,
//! and the same hashes give the file digest without a second pass.

use std::collections::HashMap;
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::CHUNK_SIZE;

pub type Hash = [u8; 32];

const DOMAIN: &[u8] = b"dglrun-file-v1\0";

/// What a file looks like to the protocol: its size, digest and chunk hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDigest {
    pub size: u64,
    pub digest: Hash,
    pub chunk_hashes: Vec<Hash>,
}

impl FileDigest {
    pub fn from_chunks(size: u64, chunk_hashes: Vec<Hash>) -> Self {
        let digest = digest_of(size, &chunk_hashes);
        Self {
            size,
            digest,
            chunk_hashes,
        }
    }

    pub fn hex(&self) -> String {
        hex::encode(self.digest)
    }
}

pub fn chunk_hash(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

pub fn digest_of(size: u64, chunk_hashes: &[Hash]) -> Hash {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(size.to_le_bytes());
    for c in chunk_hashes {
        h.update(c);
    }
    h.finalize().into()
}

/// Number of chunks a file of `size` bytes has.
pub fn chunk_count(size: u64) -> usize {
    size.div_ceil(CHUNK_SIZE as u64) as usize
}

/// Reads `r` to the end, calling `progress` with the bytes of each chunk read.
pub fn hash_reader(mut r: impl Read, mut progress: impl FnMut(u64)) -> io::Result<FileDigest> {
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut size = 0u64;
    let mut chunks = Vec::new();
    loop {
        let n = read_full(&mut r, &mut buf)?;
        if n == 0 {
            break;
        }
        chunks.push(chunk_hash(&buf[..n]));
        size += n as u64;
        progress(n as u64);
        if n < CHUNK_SIZE {
            break;
        }
    }
    Ok(FileDigest::from_chunks(size, chunks))
}

pub fn hash_file(path: &Path) -> io::Result<FileDigest> {
    hash_reader(File::open(path)?, |_| {})
}

/// Fills `buf` unless the reader ends first; returns the bytes read.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Identity of a file's contents as far as the file system tells: if any of these change,
/// the contents may have changed. ctime cannot be set back by a user, so a file rewritten
/// and given its old mtime is still noticed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
    dev: u64,
}

impl Stamp {
    fn of(m: &Metadata) -> Self {
        Self {
            size: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
            ino: m.ino(),
            dev: m.dev(),
        }
    }
}

/// True when the file system shows no sign that the contents changed between two stats.
pub fn unchanged(a: &Metadata, b: &Metadata) -> bool {
    Stamp::of(a) == Stamp::of(b)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    stamp: Stamp,
    digest: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    chunks: Vec<String>,
}

/// Digests of files keyed by absolute path, valid while the file's [`Stamp`] is unchanged.
///
/// Persisted as JSON, written atomically. A cache that cannot be read is started afresh:
/// it only ever saves work, never decides correctness on its own.
pub struct HashCache {
    path: PathBuf,
    entries: HashMap<String, Entry>,
    keep_chunks: bool,
    dirty: bool,
}

impl HashCache {
    /// `keep_chunks`: remember chunk hashes too (the sender needs them, a receiver does not).
    pub fn open(path: PathBuf, keep_chunks: bool) -> Self {
        let entries = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            path,
            entries,
            keep_chunks,
            dirty: false,
        }
    }

    pub fn lookup(&self, file: &Path, meta: &Metadata) -> Option<FileDigest> {
        let e = self.entries.get(file.to_str()?)?;
        if e.stamp != Stamp::of(meta) {
            return None;
        }
        let digest = decode(&e.digest)?;
        if !self.keep_chunks {
            return Some(FileDigest {
                size: meta.len(),
                digest,
                chunk_hashes: Vec::new(),
            });
        }
        let chunk_hashes = e
            .chunks
            .iter()
            .map(|c| decode(c))
            .collect::<Option<Vec<_>>>()?;
        (chunk_hashes.len() == chunk_count(meta.len())).then_some(FileDigest {
            size: meta.len(),
            digest,
            chunk_hashes,
        })
    }

    pub fn insert(&mut self, file: &Path, meta: &Metadata, d: &FileDigest) {
        let Some(key) = file.to_str() else { return };
        let chunks = if self.keep_chunks {
            d.chunk_hashes.iter().map(hex::encode).collect()
        } else {
            Vec::new()
        };
        self.entries.insert(
            key.to_string(),
            Entry {
                stamp: Stamp::of(meta),
                digest: d.hex(),
                chunks,
            },
        );
        self.dirty = true;
    }

    pub fn remove(&mut self, file: &Path) {
        if let Some(key) = file.to_str() {
            self.dirty |= self.entries.remove(key).is_some();
        }
    }

    /// Looks the file up, hashing it (and remembering the result) on a miss.
    pub fn digest(&mut self, file: &Path) -> io::Result<FileDigest> {
        let f = File::open(file)?;
        let meta = f.metadata()?;
        if let Some(d) = self.lookup(file, &meta) {
            return Ok(d);
        }
        let d = hash_reader(f, |_| {})?;
        // Re-read the stamp: a file that changed while it was hashed is not cached.
        if fs::metadata(file).map(|m| Stamp::of(&m)).ok() == Some(Stamp::of(&meta)) {
            self.insert(file, &meta, &d);
        }
        Ok(d)
    }

    pub fn save(&mut self) -> io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(&serde_json::to_vec(&self.entries).map_err(io::Error::other)?)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&self.path).map_err(|e| e.error)?;
        self.dirty = false;
        Ok(())
    }
}

fn decode(s: &str) -> Option<Hash> {
    hex::decode(s).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_depends_on_every_chunk_and_the_size() {
        let a = vec![1u8; CHUNK_SIZE + 10];
        let mut b = a.clone();
        b[CHUNK_SIZE + 3] = 2;
        let da = hash_reader(&a[..], |_| {}).unwrap();
        let db = hash_reader(&b[..], |_| {}).unwrap();
        assert_eq!(da.chunk_hashes.len(), 2);
        assert_eq!(da.chunk_hashes[0], db.chunk_hashes[0]);
        assert_ne!(da.digest, db.digest);
        assert_eq!(da.size, (CHUNK_SIZE + 10) as u64);
        assert_ne!(digest_of(0, &[]), digest_of(1, &[]));
    }

    #[test]
    fn empty_file_has_no_chunks() {
        let d = hash_reader(&b""[..], |_| {}).unwrap();
        assert_eq!(d.size, 0);
        assert!(d.chunk_hashes.is_empty());
        assert_eq!(chunk_count(0), 0);
        assert_eq!(chunk_count(CHUNK_SIZE as u64), 1);
        assert_eq!(chunk_count(CHUNK_SIZE as u64 + 1), 2);
    }

    #[test]
    fn cache_hit_survives_reload_and_misses_after_change() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"hello").unwrap();
        let cache_path = dir.path().join("cache.json");
        let mut c = HashCache::open(cache_path.clone(), true);
        let d = c.digest(&file).unwrap();
        c.save().unwrap();

        let c2 = HashCache::open(cache_path, true);
        let meta = fs::metadata(&file).unwrap();
        assert_eq!(c2.lookup(&file, &meta), Some(d.clone()));

        fs::write(&file, b"hellp").unwrap();
        let meta = fs::metadata(&file).unwrap();
        assert_eq!(c2.lookup(&file, &meta), None);
    }

    #[test]
    fn unreadable_cache_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let cache_path = dir.path().join("cache.json");
        fs::write(&cache_path, b"{not json").unwrap();
        let c = HashCache::open(cache_path, false);
        assert!(c.entries.is_empty());
    }
}
