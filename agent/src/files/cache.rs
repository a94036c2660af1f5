//! The agent's hash cache, shared by every request: digests of the files it holds, so an
//! unchanged file is not read again to learn that it is unchanged.

use std::fs::Metadata;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dglrun_proto::digest::{FileDigest, Hash, HashCache};

/// A transfer finishing saves the cache at most this often; a prepare always saves, so the
/// final check of a copy leaves the cache on disk.
const SAVE_INTERVAL: Duration = Duration::from_secs(2);

pub struct SharedCache {
    inner: Mutex<HashCache>,
    last_save: Mutex<Option<Instant>>,
}

impl SharedCache {
    pub fn open(path: PathBuf) -> Self {
        Self {
            // The receiver never needs chunk hashes of files it holds: only the digest.
            inner: Mutex::new(HashCache::open(path, false)),
            last_save: Mutex::new(None),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashCache> {
        // The cache only saves work: after a panic elsewhere its contents are still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn lookup(&self, file: &Path, meta: &Metadata) -> Option<Hash> {
        self.cache().lookup(file, meta).map(|d| d.digest)
    }

    pub fn insert(&self, file: &Path, meta: &Metadata, digest: Hash) {
        let d = FileDigest {
            size: meta.len(),
            digest,
            chunk_hashes: Vec::new(),
        };
        self.cache().insert(file, meta, &d);
    }

    pub fn remove(&self, file: &Path) {
        self.cache().remove(file);
    }

    /// Saves unless a save happened within [`SAVE_INTERVAL`]. Blocking.
    pub fn save_soon(&self) {
        let due = {
            let last = self.last_save.lock().unwrap_or_else(|p| p.into_inner());
            last.is_none_or(|t| t.elapsed() >= SAVE_INTERVAL)
        };
        if due {
            self.save_now();
        }
    }

    /// Blocking.
    pub fn save_now(&self) {
        if let Err(e) = self.cache().save() {
            // Losing the cache costs a re-read later, never a wrong answer.
            tracing::warn!("cannot save the hash cache: {e}");
        }
        *self.last_save.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }
}
