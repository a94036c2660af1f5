//! The CPU floor of a copy on this machine, measured in the same run as the copy it is
//! compared with: what no copy tool that verifies can avoid. Every byte is hashed once on the
//! sending side (SHA-256 per chunk over every core, as `dgl-coord` hashes before it sends),
//! then crosses one loopback TCP connection to a receiver thread that hashes it again and
//! writes it to a file beside the agents' roots.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use sha2::{Digest, Sha256};

const CHUNK: usize = dglrun_proto::CHUNK_SIZE;

/// The floor for `files`, written under `dest` (removed after): wall seconds and CPU seconds
/// (user + system of this process, which does nothing else meanwhile).
pub fn measure(files: &[PathBuf], dest: &Path) -> Result<(f64, f64)> {
    let (t, cpu) = (Instant::now(), own_cpu());
    hash_all(files)?;
    let sent = loopback_copy(files, dest);
    let (wall, cpu) = (t.elapsed().as_secs_f64(), own_cpu() - cpu);
    let _ = fs::remove_dir_all(dest);
    sent?;
    Ok((wall, cpu))
}

/// User + system seconds of this process so far.
fn own_cpu() -> f64 {
    // SAFETY: rusage is plain data, zero is a valid value; getrusage only writes it.
    let mut u: nix::libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { nix::libc::getrusage(nix::libc::RUSAGE_SELF, &mut u) };
    let secs = |t: nix::libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

/// Every chunk of every file hashed once, the chunks shared out over every core.
fn hash_all(files: &[PathBuf]) -> Result<()> {
    let mut chunks = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let len = fs::metadata(f)
            .with_context(|| f.display().to_string())?
            .len();
        chunks.extend((0..len.div_ceil(CHUNK as u64)).map(|c| (i, c * CHUNK as u64)));
    }
    let opened: Vec<File> = files.iter().map(File::open).collect::<Result<_, _>>()?;
    let next = AtomicUsize::new(0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..cores)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut buf = vec![0u8; CHUNK];
                    while let Some(&(f, off)) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let n = read_full_at(&opened[f], &mut buf, off)?;
                        std::hint::black_box(Sha256::digest(&buf[..n]));
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .map_err(|_| anyhow::anyhow!("hash thread panicked"))?
        })
    })
}

fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = f.read_at(&mut buf[n..], off + n as u64)?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(n)
}

/// The files one after another over one loopback connection; the receiver hashes each chunk
/// and writes it to its own file.
fn loopback_copy(files: &[PathBuf], dest: &Path) -> Result<()> {
    fs::create_dir_all(dest)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let sizes: Vec<u64> = files
        .iter()
        .map(|f| fs::metadata(f).map(|m| m.len()))
        .collect::<Result<_, _>>()?;
    std::thread::scope(|s| {
        let receiver = s.spawn(|| -> Result<()> {
            let (mut conn, _) = listener.accept()?;
            let mut buf = vec![0u8; CHUNK];
            for (i, &size) in sizes.iter().enumerate() {
                let mut out = File::create(dest.join(format!("f{i}")))?;
                let mut left = size;
                while left > 0 {
                    let n = (left as usize).min(CHUNK);
                    conn.read_exact(&mut buf[..n])?;
                    std::hint::black_box(Sha256::digest(&buf[..n]));
                    out.write_all(&buf[..n])?;
                    left -= n as u64;
                }
            }
            Ok(())
        });
        let sent = (|| -> Result<()> {
            let mut conn = TcpStream::connect(addr)?;
            let mut buf = vec![0u8; CHUNK];
            for f in files {
                let mut src = File::open(f)?;
                loop {
                    let n = src.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    conn.write_all(&buf[..n])?;
                }
            }
            Ok(())
        })();
        let received = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
        sent.and(received)
    })?;
    let written: u64 = (0..files.len())
        .map(|i| fs::metadata(dest.join(format!("f{i}"))).map_or(0, |m| m.len()))
        .sum();
    ensure!(
        written == sizes.iter().sum::<u64>(),
        "the floor's copy is short"
    );
    Ok(())
}
