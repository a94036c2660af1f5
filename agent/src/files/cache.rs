//! The agent's hash cache, shared by every request: digests of the files it holds, so an
//! unchanged file is not read again to learn that it is unchanged.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use dglrun_proto::digest::{FileDigest, Hash, HashCache};

/// A transfer finishing saves the cache at most this often; a prepare always saves, so the
/// final check of a copy leaves the cache on disk.
const SAVE_INTERVAL: Duration = Duration::from_secs(2);

/// A file timestamp: seconds and nanoseconds.
pub(super) type Stamp = (i64, i64);

/// The clock the kernel stamps file times with (the coarse real-time clock).
pub(super) fn coarse_now() -> Stamp {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
    (t.tv_sec, t.tv_nsec)
}

pub(super) struct SharedCache {
    inner: Mutex<HashCache>,
    last_save: Mutex<Option<Instant>>,
}

impl SharedCache {
    pub(super) fn open(path: PathBuf) -> Self {
        Self {
            // The receiver never needs chunk hashes of files it holds: only the digest.
            inner: Mutex::new(HashCache::open(path, false)),
            last_save: Mutex::new(None),
        }
    }

    fn cache(&self) -> parking_lot::MutexGuard<'_, HashCache> {
        // The cache only saves work: after a panic elsewhere its contents are still usable.
        self.inner.lock()
    }

    pub(super) fn lookup(&self, file: &Path, meta: &Metadata) -> Option<Hash> {
        self.cache().lookup(file, meta).map(|d| d.digest)
    }

    /// Remembers the digest of `file` as `meta` describes it, if that can be trusted later.
    ///
    /// `observed` is the file-timestamp clock ([`coarse_now`]) when the contents were known
    /// (before they were read, or after they were written). A file whose mtime is not strictly
    /// older than that may still be rewritten within the same timestamp tick, with the same
    /// size and times: such an entry is not kept, and the file is hashed again next time (the
    /// racy-git rule).
    pub(super) fn insert(&self, file: &Path, meta: &Metadata, digest: Hash, observed: Stamp) {
        if (meta.mtime(), meta.mtime_nsec()) >= observed {
            self.remove(file);
            return;
        }
        let d = FileDigest {
            size: meta.len(),
            digest,
            chunk_hashes: Vec::new(),
        };
        self.cache().insert(file, meta, &d);
    }

    pub(super) fn remove(&self, file: &Path) {
        self.cache().remove(file);
    }

    /// Saves unless a save happened within [`SAVE_INTERVAL`]. Blocking.
    pub(super) fn save_soon(&self) {
        let due = {
            let last = self.last_save.lock();
            last.is_none_or(|t| t.elapsed() >= SAVE_INTERVAL)
        };
        if due {
            self.save_now();
        }
    }

    /// Blocking.
    pub(super) fn save_now(&self) {
        if let Err(e) = self.cache().save() {
            // Losing the cache costs a re-read later, never a wrong answer.
            tracing::warn!("cannot save the hash cache: {e}");
        }
        *self.last_save.lock() = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_written_in_the_current_tick_is_not_trusted() {
        let d = tempfile::tempdir().unwrap();
        let cache = SharedCache::open(d.path().join("hashes.json"));
        let f = d.path().join("f");
        std::fs::write(&f, b"one").unwrap();
        let observed = coarse_now();
        let meta = std::fs::metadata(&f).unwrap();
        cache.insert(&f, &meta, [1; 32], observed);
        // Rewritten within the same tick, same size: the stamp cannot tell; the cache must not.
        assert_eq!(cache.lookup(&f, &meta), None);

        // An mtime strictly before the moment the contents were known is trusted.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let observed = coarse_now();
        let meta = std::fs::metadata(&f).unwrap();
        cache.insert(&f, &meta, [2; 32], observed);
        assert_eq!(cache.lookup(&f, &meta), Some([2; 32]));
    }
}
