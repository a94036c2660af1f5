//! Digests of the local sources, each computed once per run and remembered across runs in
//! the coordinator's hash cache (`$XDG_CACHE_HOME/dglrun/hashes.json`, else
//! `~/.cache/dglrun/hashes.json`), so an unchanged partition is not read again to re-copy it.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use anyhow::Context;
use dglrun_proto::digest::{chunk_count, chunk_hash, hash_reader, FileDigest, Hash, HashCache};
use dglrun_proto::CHUNK_SIZE;

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

/// The local sources, digested.
pub struct Digests {
    /// Per source, in order: what goes into the manifests.
    pub digests: Vec<FileDigest>,
    /// Per source: the file as it was when its digest was taken (`None` for generated
    /// contents). The reader checks the file still looks so while it sends it.
    pub seen: Vec<Option<fs::Metadata>>,
    pub stats: HashStats,
}

/// Digests of every source, in order. The chunks of every file to hash are shared out over
/// one thread per core (hashing is CPU-bound; more would only contend), so one big file is
/// hashed on every core, not on one.
pub async fn hash_sources(
    sources: &[Source],
    cache_path: Option<PathBuf>,
    progress: Arc<Progress>,
) -> anyhow::Result<Digests> {
    let started = std::time::Instant::now();
    let total: u64 = sources.iter().map(size_hint).sum();
    progress.phase("hashing", total);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let work = sources.to_vec();
    let keep = cache_path.clone();
    let bar = progress.clone();
    // Dropped with this future (Ctrl-C): the workers stop at their next chunk, so the process
    // does not wait for a hashing nobody will use.
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let flag = stop.0.clone();
    let results = tokio::task::spawn_blocking(move || {
        // The sender keeps chunk hashes too: they go into every manifest.
        let mut cache = HashCache::open(keep.unwrap_or_default(), true);
        let r = hash_all(&work, &mut cache, &bar, threads, &flag);
        (r, cache)
    })
    .await
    .context("the hashing thread failed")?;
    let (results, mut cache) = results;
    let results = results?;
    progress.finish_phase();
    if cache_path.is_some() {
        if let Err(e) = cache.save() {
            // Only costs a re-read next time.
            tracing::warn!("cannot save the hash cache: {e}");
        }
    }
    let stats = HashStats {
        files: results.len(),
        from_cache: results.iter().filter(|h| h.from_cache).count(),
        // Generated contents (the rewritten part_config) are hashed in memory, not read.
        bytes_read: results
            .iter()
            .zip(sources)
            .filter(|(h, s)| !h.from_cache && matches!(s.content, Content::File(_)))
            .map(|(h, _)| h.digest.size)
            .sum(),
        seconds: started.elapsed().as_secs_f64(),
    };
    let (digests, seen) = results.into_iter().map(|h| (h.digest, h.seen)).unzip();
    Ok(Digests {
        digests,
        seen,
        stats,
    })
}

/// One source's digest, whether the cache had it, and the file as it was then.
#[derive(Clone, Debug)]
struct Hashed {
    digest: FileDigest,
    from_cache: bool,
    seen: Option<fs::Metadata>,
}

fn size_hint(s: &Source) -> u64 {
    match &s.content {
        Content::File(p) => fs::metadata(p).map_or(0, |m| m.len()),
        Content::Bytes(b) => b.len() as u64,
    }
}

/// A local file the cache did not know: what it was when checked. Not kept open: a script
/// folder may hold more files than a process may have open.
struct ToHash {
    source: usize,
    key: PathBuf,
    before: fs::Metadata,
}

/// Sets its flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Digests of `sources` in order; gives up when `stop` is set. Blocking.
fn hash_all(
    sources: &[Source],
    cache: &mut HashCache,
    progress: &Progress,
    threads: usize,
    stop: &AtomicBool,
) -> anyhow::Result<Vec<Hashed>> {
    let mut done: Vec<Option<Hashed>> = vec![None; sources.len()];
    let mut misses = Vec::new();
    for (i, src) in sources.iter().enumerate() {
        let path = match &src.content {
            Content::Bytes(b) => {
                done[i] = Some(Hashed {
                    digest: hash_reader(&b[..], |n| progress.advance(n))?,
                    from_cache: false,
                    seen: None,
                });
                continue;
            }
            Content::File(p) => p,
        };
        let err = |what: &str| format!("{}: cannot {what} {}", src.origin, path.display());
        // The cache is keyed by the real path, so `./x` and `x` share an entry.
        let key = path.canonicalize().with_context(|| err("resolve"))?;
        // Opened here so an unreadable file is named before any hashing starts.
        let before = File::open(&key)
            .with_context(|| err("open"))?
            .metadata()
            .with_context(|| err("stat"))?;
        match cache.lookup(&key, &before) {
            Some(d) => {
                progress.advance(d.size);
                done[i] = Some(Hashed {
                    digest: d,
                    from_cache: true,
                    seen: Some(before),
                });
            }
            None => misses.push(ToHash {
                source: i,
                key,
                before,
            }),
        }
    }
    let hashed = hash_chunks(&misses, sources, progress, threads, stop)?;
    for (m, chunks) in misses.iter().zip(hashed) {
        let src = &sources[m.source];
        let d = FileDigest::from_chunks(m.before.len(), chunks);
        let after = fs::metadata(&m.key)
            .with_context(|| format!("{}: cannot stat {}", src.origin, m.key.display()))?;
        if !dglrun_proto::digest::unchanged(&m.before, &after) {
            anyhow::bail!(
                "{}: {} changed while it was being hashed; copy again once it is complete",
                src.origin,
                m.key.display()
            );
        }
        cache.insert(&m.key, &m.before, &d);
        done[m.source] = Some(Hashed {
            digest: d,
            from_cache: false,
            seen: Some(m.before.clone()),
        });
    }
    Ok(done.into_iter().flatten().collect())
}

/// The chunk hashes of every file in `files`, computed by `threads` threads that each take the
/// next chunk of the whole list (files in order, chunks in order within a file: neighbouring
/// threads read neighbouring chunks, which keeps the reads close to sequential).
fn hash_chunks(
    files: &[ToHash],
    sources: &[Source],
    progress: &Progress,
    threads: usize,
    stop: &AtomicBool,
) -> anyhow::Result<Vec<Vec<Hash>>> {
    let mut work: Vec<(usize, u64)> = Vec::new();
    for (f, m) in files.iter().enumerate() {
        let n = chunk_count(m.before.len()) as u64;
        work.extend((0..n).map(|c| (f, c * CHUNK_SIZE as u64)));
    }
    let slots: Vec<OnceLock<Hash>> = (0..work.len()).map(|_| OnceLock::new()).collect();
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let worker = || {
        let mut buf = vec![0u8; CHUNK_SIZE];
        // The file of the last chunk taken: the next chunk is most often of the same file.
        let mut open: Option<(usize, File)> = None;
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let k = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(f, offset)) = work.get(k) else {
                return;
            };
            let m = &files[f];
            let len = (m.before.len() - offset).min(CHUNK_SIZE as u64) as usize;
            let read = match &open {
                Some((g, file)) if *g == f => read_exact_at(file, &mut buf[..len], offset),
                _ => File::open(&m.key).and_then(|file| {
                    let r = read_exact_at(&file, &mut buf[..len], offset);
                    open = Some((f, file));
                    r
                }),
            };
            match read {
                Ok(()) => {
                    let _ = slots[k].set(chunk_hash(&buf[..len]));
                    progress.advance(len as u64);
                }
                Err(e) => {
                    let src = &sources[m.source];
                    let e = anyhow::Error::new(e).context(format!(
                        "{}: cannot read {} at offset {offset}",
                        src.origin,
                        m.key.display()
                    ));
                    failed.lock().get_or_insert(e);
                    // The others stop at their next chunk.
                    next.store(work.len(), Ordering::Relaxed);
                    return;
                }
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, work.len().max(1)) {
            s.spawn(worker);
        }
    });
    if let Some(e) = failed.into_inner() {
        return Err(e);
    }
    let mut out: Vec<Vec<Hash>> = files.iter().map(|_| Vec::new()).collect();
    for ((f, _), slot) in work.iter().zip(slots) {
        let h = slot
            .into_inner()
            .context("internal error: a chunk was left unhashed")?;
        out[*f].push(h);
    }
    Ok(out)
}

/// Fills `buf` from `offset`; a file that ends first has changed since it was checked.
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            std::io::Error::other("the file got shorter while it was being hashed")
        } else {
            e
        }
    })
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::ProgressMode;
    use dglrun_proto::digest::hash_file;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn chunks_shared_over_threads_give_the_file_digest() {
        let dir = tempfile::tempdir().unwrap();
        let c = CHUNK_SIZE;
        let sizes = [0, 1, c - 1, c, c + 1, 3 * c + 5];
        let mut sources = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let p = dir.path().join(format!("f{i}"));
            fs::write(&p, pattern(len, i as u8)).unwrap();
            sources.push(Source {
                origin: format!("f{i}"),
                content: Content::File(p),
            });
        }
        sources.insert(
            2,
            Source {
                origin: "generated".into(),
                content: Content::Bytes(pattern(c + 7, 9)),
            },
        );
        let progress = Progress::new(ProgressMode::Quiet);
        for threads in [1, 3, 8] {
            let mut cache = HashCache::open(PathBuf::new(), true);
            let got = hash_all(
                &sources,
                &mut cache,
                &progress,
                threads,
                &AtomicBool::new(false),
            )
            .unwrap();
            assert_eq!(got.len(), sources.len());
            for (h, s) in got.iter().zip(&sources) {
                let (d, hit) = (&h.digest, h.from_cache);
                let want = match &s.content {
                    Content::File(p) => hash_file(p).unwrap(),
                    Content::Bytes(b) => hash_reader(&b[..], |_| {}).unwrap(),
                };
                assert_eq!(d, &want, "{} with {threads} threads", s.origin);
                assert!(!hit);
            }
            // Every file is now known: nothing is read again.
            let again = hash_all(
                &sources,
                &mut cache,
                &progress,
                threads,
                &AtomicBool::new(false),
            )
            .unwrap();
            let hits = again.iter().filter(|h| h.from_cache).count();
            assert_eq!(hits, sizes.len(), "{threads} threads");
        }
    }

    #[test]
    fn more_files_than_may_be_open_at_once_are_hashed() {
        // This test runs in its own process (nextest), so the limit is its own.
        let limit = 64;
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, limit, limit)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sources: Vec<Source> = (0..4 * limit)
            .map(|i| {
                let p = dir.path().join(format!("script{i}.py"));
                fs::write(&p, pattern(100 + i as usize, i as u8)).unwrap();
                Source {
                    origin: format!("script_folder/script{i}.py"),
                    content: Content::File(p),
                }
            })
            .collect();
        let mut cache = HashCache::open(PathBuf::new(), true);
        let progress = Progress::new(ProgressMode::Quiet);
        let got = hash_all(&sources, &mut cache, &progress, 2, &AtomicBool::new(false)).unwrap();
        for (h, s) in got.iter().zip(&sources) {
            let Content::File(p) = &s.content else {
                unreachable!()
            };
            assert_eq!(h.digest, hash_file(p).unwrap(), "{}", s.origin);
        }
    }

    #[test]
    fn an_unreadable_source_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let sources = vec![Source {
            origin: "part-0.node_feats".into(),
            content: Content::File(dir.path().join("missing.dgl")),
        }];
        let mut cache = HashCache::open(PathBuf::new(), true);
        let progress = Progress::new(ProgressMode::Quiet);
        let e = hash_all(&sources, &mut cache, &progress, 2, &AtomicBool::new(false)).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("part-0.node_feats") && msg.contains("missing.dgl"),
            "{msg}"
        );
    }
}
