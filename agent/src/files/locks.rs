//! One lock per target path, so two transfers of the same file never write the same partial.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use tokio::sync::OwnedMutexGuard;

type PathMutex = tokio::sync::Mutex<()>;

#[derive(Default)]
pub(super) struct PathLocks {
    // Weak: a lock nobody holds or waits for disappears with its last guard.
    map: Mutex<HashMap<PathBuf, Weak<PathMutex>>>,
}

impl PathLocks {
    /// Waits until no other prepare or put works on `path`. The guard is owned so it can
    /// travel into the blocking thread that does the writing and outlive the request.
    pub(super) async fn lock(&self, path: &Path) -> OwnedMutexGuard<()> {
        let mutex = {
            let mut map = self.map.lock();
            if let Some(m) = map.get(path).and_then(Weak::upgrade) {
                m
            } else {
                // Forget dead entries now and then so the map stays as small as the work.
                if map.len() >= 1024 {
                    map.retain(|_, w| w.strong_count() > 0);
                }
                let m = Arc::new(PathMutex::new(()));
                map.insert(path.to_path_buf(), Arc::downgrade(&m));
                m
            }
        };
        mutex.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn same_path_waits_other_paths_do_not() {
        let locks = Arc::new(PathLocks::default());
        let a = locks.lock(Path::new("/r/a")).await;
        // Another path is free.
        let _b = locks.lock(Path::new("/r/b")).await;
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move { l2.lock(Path::new("/r/a")).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
