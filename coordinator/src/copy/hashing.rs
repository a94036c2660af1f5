//! Digests of the local sources, each computed once per run and remembered across runs in
//! the coordinator's hash cache (`$XDG_CACHE_HOME/dglrun/hashes.json`, else
//! `~/.cache/dglrun/hashes.json`), so an unchanged partition is not read again to re-copy it.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use dglrun_proto::digest::{hash_reader, FileDigest, HashCache};
use futures::{StreamExt, TryStreamExt};

use super::plan::{Content, Source};
use super::progress::Progress;

/// Where the coordinator keeps its hash cache.
pub fn default_cache_path() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
    };
    Some(base.join("dglrun").join("hashes.json"))
}

/// What hashing cost: how much was read, how much the cache spared.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct HashStats {
    pub files: usize,
    pub from_cache: usize,
    pub bytes_read: u64,
    pub seconds: f64,
}

/// Digests of every source, in order. Files are hashed in parallel on blocking threads, one
/// thread per core (hashing is CPU-bound; more would only contend).
pub async fn hash_sources(
    sources: &[Source],
    cache_path: Option<PathBuf>,
    progress: Arc<Progress>,
) -> anyhow::Result<(Vec<FileDigest>, HashStats)> {
    let started = std::time::Instant::now();
    let cache = Arc::new(Mutex::new(match &cache_path {
        // The sender keeps chunk hashes too: they go into every manifest.
        Some(p) => HashCache::open(p.clone(), true),
        None => HashCache::open(PathBuf::new(), true),
    }));
    let total: u64 = sources.iter().map(size_hint).sum();
    progress.phase("hashing", total);
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
    let results: Vec<(FileDigest, bool)> = futures::stream::iter(sources.iter().cloned())
        .map(|src| {
            let cache = cache.clone();
            let progress = progress.clone();
            async move {
                tokio::task::spawn_blocking(move || hash_one(&src, &cache, &progress))
                    .await
                    .context("a hashing thread failed")?
            }
        })
        .buffered(parallel)
        .try_collect()
        .await?;
    progress.finish_phase();
    if cache_path.is_some() {
        let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = c.save() {
            // Only costs a re-read next time.
            tracing::warn!("cannot save the hash cache: {e}");
        }
    }
    let stats = HashStats {
        files: results.len(),
        from_cache: results.iter().filter(|(_, hit)| *hit).count(),
        // Generated contents (the rewritten part_config) are hashed in memory, not read.
        bytes_read: results
            .iter()
            .zip(sources)
            .filter(|((_, hit), s)| !hit && matches!(s.content, Content::File(_)))
            .map(|((d, _), _)| d.size)
            .sum(),
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((results.into_iter().map(|(d, _)| d).collect(), stats))
}

fn size_hint(s: &Source) -> u64 {
    match &s.content {
        Content::File(p) => fs::metadata(p).map_or(0, |m| m.len()),
        Content::Bytes(b) => b.len() as u64,
    }
}

/// Returns the digest and whether it came from the cache.
fn hash_one(
    src: &Source,
    cache: &Mutex<HashCache>,
    progress: &Progress,
) -> anyhow::Result<(FileDigest, bool)> {
    let path = match &src.content {
        Content::Bytes(b) => {
            let d = hash_reader(&b[..], |n| progress.advance(n))?;
            return Ok((d, false));
        }
        Content::File(p) => p,
    };
    let err = |what: &str| format!("{}: cannot {what} {}", src.origin, path.display());
    // The cache is keyed by the real path, so `./x` and `x` share an entry.
    let key = path.canonicalize().with_context(|| err("resolve"))?;
    let file = File::open(&key).with_context(|| err("open"))?;
    let before = file.metadata().with_context(|| err("stat"))?;
    if let Some(d) = cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .lookup(&key, &before)
    {
        progress.advance(d.size);
        return Ok((d, true));
    }
    let d = hash_reader(file, |n| progress.advance(n)).with_context(|| err("read"))?;
    let after = fs::metadata(&key).with_context(|| err("stat"))?;
    if !dglrun_proto::digest::unchanged(&before, &after) || d.size != before.len() {
        anyhow::bail!(
            "{}: {} changed while it was being hashed; copy again once it is complete",
            src.origin,
            path.display()
        );
    }
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(&key, &before, &d);
    Ok((d, false))
}

/// Checks that every local file exists and is a regular file before any host is contacted.
pub fn check_sources(sources: &[Source], part_config: &Path) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    for s in sources {
        let Content::File(p) = &s.content else {
            continue;
        };
        let problem = match fs::metadata(p) {
            Ok(m) if m.is_file() => continue,
            Ok(_) => "is not a regular file".to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist".to_string(),
            Err(e) => format!("cannot be read: {e}"),
        };
        // Keys of the part_config are named with the file they come from.
        let origin = if ["part-", "node_map", "edge_map"]
            .iter()
            .any(|k| s.origin.starts_with(k))
        {
            format!("{}: {}", part_config.display(), s.origin)
        } else {
            s.origin.clone()
        };
        errors.push(format!("{origin} names {}, which {problem}", p.display()));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{}", errors.join("\n"))
    }
}
