//! Compression: `dgl-coord copy` with and without `--compress zstd`, in the same run, over
//! loopback and over a slow link (network namespaces, the coordinator's uplink shaped to
//! 200 Mbit/s with a token bucket), of a generated set shaped like DGL partitions; what it
//! costs on random data (loopback); and how much the real DGL partitions in `fixtures/dgl-compat`
//! would shrink. About a minute: the uncompressed copies over the slow link take most of it.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use dglrun_proto::compress::{Packer, DEFAULT_LEVEL};
use dglrun_proto::CHUNK_SIZE;
use serde_json::Value;

use super::copy::timed_copy;
use super::{free_bytes, Opts, Row};
use crate::netns::NetCluster;
use crate::TestCluster;

const MIB: u64 = 1 << 20;

/// Agents (and partitions) in both settings.
const HOSTS: usize = 2;

/// The whole set: at 200 Mbit/s about 11 s uncompressed, which bounds the benchmark's time.
const SET_BYTES: u64 = 256 * MIB;

/// Random bytes, for what compression costs when nothing shrinks (loopback only).
const RANDOM_BYTES: u64 = 128 * MIB;

/// The slow link, as `tc` spells it.
const RATE: &str = "200mbit";

/// The token bucket's burst: above the largest packet veth hands over with segmentation
/// offload (64 KiB), so such packets are never split or dropped by the shaper.
const BURST: &str = "128kb";

/// Fills `path` with `len` bytes shaped like a DGL node feature file: float32 features that
/// are mostly zero, the rest one of a few values (bag-of-words, one-hot, quantised), then
/// int64 node ids (ascending) and labels (small). Deterministic for a `seed`.
pub fn write_features(path: &Path, len: u64, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    write_with(path, len, |buf, at, total| {
        let ids_from = total * 85 / 100;
        let labels_from = total * 95 / 100;
        for (i, word) in buf.chunks_exact_mut(8).enumerate() {
            let pos = at + 8 * i as u64;
            let x = rng.next();
            if pos < ids_from {
                for (half, r) in word.chunks_exact_mut(4).zip([x, x >> 32]) {
                    let v = if r % 10 < 6 {
                        0.0f32
                    } else {
                        (r >> 8) as u8 as f32 / 16.0
                    };
                    half.copy_from_slice(&v.to_le_bytes());
                }
            } else if pos < labels_from {
                // Node ids of a partition: ascending with small gaps.
                let id = (pos - ids_from) / 8 * 3 + x % 3;
                word.copy_from_slice(&id.to_le_bytes());
            } else {
                word.copy_from_slice(&(x % 47).to_le_bytes());
            }
        }
    })
}

/// Fills `path` with `len` bytes shaped like a DGL graph structure file: int64 arrays, CSR
/// offsets (ascending), neighbour ids (random below 2^21, two million nodes) and edge ids
/// (ascending).
pub fn write_graph(path: &Path, len: u64, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    write_with(path, len, |buf, at, total| {
        let third = total / 3;
        for (i, word) in buf.chunks_exact_mut(8).enumerate() {
            let pos = at + 8 * i as u64;
            let x = rng.next();
            let v = if pos < third {
                pos / 8 * 12 + x % 8
            } else if pos < 2 * third {
                x & ((1 << 21) - 1)
            } else {
                (pos - 2 * third) / 8
            };
            word.copy_from_slice(&v.to_le_bytes());
        }
    })
}

/// A partition set as [`crate::gen_partitions`] lays it out, its files filled by
/// [`write_features`] and [`write_graph`] (`bytes_per_part` per partition). Returns the
/// part_config's path.
pub fn dgl_like_partitions(
    dir: &Path,
    parts: usize,
    bytes_per_part: u64,
    name: &str,
) -> Result<PathBuf> {
    let pc = crate::gen_partitions(dir, parts, 0, name)?;
    let share = |pct: u64| bytes_per_part * pct / 100 / 8 * 8;
    for i in 0..parts {
        let d = dir.join(format!("part{i}"));
        let seed = i as u64 * 3;
        write_features(&d.join("node_feat.dgl"), share(60), seed)?;
        write_features(&d.join("edge_feat.dgl"), share(5), seed + 1)?;
        write_graph(&d.join("graph.dgl"), share(35), seed + 2)?;
    }
    Ok(pc)
}

/// xorshift64: fast, deterministic.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Writes `len` bytes (a multiple of 8 is filled exactly, a tail is zeros), 1 MiB at a time,
/// each block filled by `fill(block, its offset, len)`.
fn write_with(path: &Path, len: u64, mut fill: impl FnMut(&mut [u8], u64, u64)) -> Result<()> {
    let mut w = BufWriter::with_capacity(1 << 20, fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        buf[..n].fill(0);
        fill(&mut buf[..n], at, len);
        w.write_all(&buf[..n])?;
        at += n as u64;
    }
    w.flush()?;
    Ok(())
}

/// Bytes of the files under `dir`, and what they take on the wire: each chunk compressed as
/// `dgl-coord copy --compress zstd` does (raw when it does not shrink).
fn wire_size(dir: &Path) -> Result<(u64, u64)> {
    let mut packer = Packer::new(DEFAULT_LEVEL)?;
    let (mut logical, mut wire) = (0, 0);
    for f in crate::list_files(dir) {
        let data = fs::read(dir.join(&f))?;
        for chunk in data.chunks(CHUNK_SIZE) {
            logical += chunk.len() as u64;
            wire += packer.pack(chunk).map_or(chunk.len(), |z| z.len()) as u64;
        }
    }
    Ok((logical, wire))
}

/// Times with and without compression, and the wire ratios of the compressed runs.
#[derive(Default)]
struct Runs {
    raw: Vec<f64>,
    zstd: Vec<f64>,
    ratio: Vec<f64>,
}

/// `reps` copies each way onto `roots` (emptied before each copy), alternating which goes
/// first so neither always runs on a warmer machine.
fn measure(
    label: &str,
    reps: usize,
    roots: &[PathBuf],
    mut one: impl FnMut(&[&str]) -> Result<(f64, Value)>,
) -> Result<Runs> {
    let mut runs = Runs::default();
    for rep in 0..reps {
        let mut order = [false, true];
        if rep % 2 == 1 {
            order.reverse();
        }
        for zstd in order {
            for r in roots {
                let _ = fs::remove_dir_all(r.join("ws"));
            }
            let flags: &[&str] = if zstd { &["--compress", "zstd"] } else { &[] };
            let (secs, report) = one(flags)?;
            let logical = report["bytes_sent"].as_u64().unwrap_or(0);
            let wire = report["wire_bytes"].as_u64().unwrap_or(0);
            ensure!(
                logical > 0 && report["ok"] == true,
                "{label}: nothing sent: {report}"
            );
            eprintln!(
                "bench compress {label} rep {rep} {}: {secs:.2}s, {:.0} MB/s, \
                 {:.1} MiB on the wire",
                if zstd { "zstd" } else { "none" },
                logical as f64 / secs / 1e6,
                wire as f64 / MIB as f64
            );
            if zstd {
                runs.zstd.push(secs);
                runs.ratio.push(logical as f64 / wire.max(1) as f64);
            } else {
                runs.raw.push(secs);
            }
        }
    }
    Ok(runs)
}

/// The rows of one setting; rates in `unit` (GB/s or MB/s).
fn rows(label: &str, bytes: u64, runs: &Runs, unit: &str, target: Option<f64>) -> Vec<Row> {
    let scale = if unit == "GB/s" { 1e9 } else { 1e6 };
    let rate = |v: &[f64]| {
        v.iter()
            .map(|t| bytes as f64 / t / scale)
            .collect::<Vec<_>>()
    };
    let speedup: Vec<f64> = runs
        .raw
        .iter()
        .zip(&runs.zstd)
        .map(|(r, z)| r / z)
        .collect();
    let target_text = target.map_or(String::new(), |t| format!(">= {t}x"));
    let check = move |x: f64| target.is_none_or(|t| x >= t);
    vec![
        Row::new(
            format!("{label}: no compression"),
            unit,
            &rate(&runs.raw),
            "baseline",
            None,
        ),
        Row::new(
            format!("{label}: --compress zstd"),
            unit,
            &rate(&runs.zstd),
            "",
            None,
        ),
        Row::new(
            format!("{label}: time without / time with"),
            "x",
            &speedup,
            &target_text,
            target.is_some().then_some(&check as &dyn Fn(f64) -> bool),
        ),
    ]
}

/// A generated partition set: its part_config and its size.
struct Set {
    pc: PathBuf,
    bytes: u64,
}

impl Set {
    fn new(pc: PathBuf) -> Self {
        let dir = pc.parent().map(Path::to_path_buf).unwrap_or_default();
        let bytes = crate::list_files(&dir)
            .iter()
            .filter_map(|f| fs::metadata(dir.join(f)).ok())
            .map(|m| m.len())
            .sum();
        Self { pc, bytes }
    }

    fn mib(&self) -> u64 {
        self.bytes / MIB
    }
}

fn loopback(dgl: &Set, random: &Set, cache: &Path, reps: usize) -> Result<Vec<Row>> {
    let cluster = TestCluster::start(HOSTS);
    let ip = cluster.ip_config_file();
    let roots: Vec<PathBuf> = (0..HOSTS).map(|i| cluster.root(i).to_path_buf()).collect();
    let runs = measure("loopback", reps, &roots, |extra| {
        timed_copy(cluster.coord(), &dgl.pc, &ip, cache, extra)
    })?;
    let mut out = vec![Row::new(
        format!(
            "DGL-like set {} MiB, zstd -{DEFAULT_LEVEL}: bytes / wire bytes",
            dgl.mib()
        ),
        "x",
        &runs.ratio,
        "",
        None,
    )];
    let label = format!("loopback, {HOSTS} agents, {} MiB", dgl.mib());
    out.extend(rows(&label, dgl.bytes, &runs, "GB/s", None));
    // What trying costs when nothing shrinks: every chunk is compressed in vain, sent raw.
    let runs = measure("loopback random", reps, &roots, |extra| {
        timed_copy(cluster.coord(), &random.pc, &ip, cache, extra)
    })?;
    out.push(Row::new(
        format!(
            "loopback, random data {} MiB: bytes / wire bytes",
            random.mib()
        ),
        "x",
        &runs.ratio,
        "",
        None,
    ));
    out.push(Row::new(
        format!(
            "loopback, random data {} MiB: time without / time with",
            random.mib()
        ),
        "x",
        &runs
            .raw
            .iter()
            .zip(&runs.zstd)
            .map(|(r, z)| r / z)
            .collect::<Vec<_>>(),
        "",
        None,
    ));
    Ok(out)
}

fn slow_link(pc: &Path, cache: &Path, bytes: u64, reps: usize) -> Result<Vec<Row>> {
    if let Some(why) = crate::netns::unavailable() {
        anyhow::bail!("skipped: cannot make network namespaces ({why})");
    }
    let c = NetCluster::start(HOSTS, &[])?;
    // Shapes what the coordinator sends (the chunks): its uplink is the slow link, shared by
    // the agents as when the master host sits behind one. tbf rather than netem: netem is a
    // module many kernels (this one too) do not have.
    let tc = format!("tc qdisc add dev eth0 root tbf rate {RATE} burst {BURST} latency 50ms");
    let out = Command::new("ip")
        .args(["netns", "exec", &c.coord_ns])
        .args(tc.split(' '))
        .output()
        .context("run tc")?;
    ensure!(
        out.status.success(),
        "{tc}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let ip = c.ip_config_file(30050);
    let roots: Vec<PathBuf> = (0..HOSTS).map(|i| c.root(i).to_path_buf()).collect();
    let runs = measure("slow link", reps, &roots, |extra| {
        timed_copy(c.coord(), pc, &ip, cache, extra)
    })?;
    let label = format!("{RATE} link, {HOSTS} agents, {} MiB", bytes / MIB);
    Ok(rows(&label, bytes, &runs, "MB/s", Some(1.5)))
}

/// How much the real DGL partitions (`fixtures/dgl-compat`) shrink, chunk by chunk as sent.
fn real_partitions() -> Result<Row> {
    let dir = crate::compat_dir().join("dgl-partitions");
    let (logical, wire) = wire_size(&dir)?;
    Ok(Row::new(
        format!(
            "real DGL partitions (compat p2+p4, {:.1} MiB), zstd -{DEFAULT_LEVEL}: \
             bytes / wire bytes",
            logical as f64 / MIB as f64
        ),
        "x",
        &[logical as f64 / wire.max(1) as f64],
        "",
        None,
    ))
}

pub fn run(opts: &Opts) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    match real_partitions() {
        Ok(r) => rows.push(r),
        Err(e) => rows.push(Row::error("compress: real DGL partitions", &e)),
    }
    // The sources, and a copy of the larger one on the agents.
    let need = SET_BYTES * 2 + RANDOM_BYTES * 2 + (64 << 20);
    if let Some(free) = free_bytes(&opts.dir) {
        ensure!(
            free > need,
            "compress needs {} MiB free in {} (has {})",
            need / MIB,
            opts.dir.display(),
            free / MIB
        );
    }
    let work = tempfile::tempdir_in(&opts.dir)?;
    let t = Instant::now();
    let per_part = |total: u64| total / HOSTS as u64;
    let dgl = Set::new(dgl_like_partitions(
        &work.path().join("dgl"),
        HOSTS,
        per_part(SET_BYTES),
        "bench",
    )?);
    let random = Set::new(crate::gen_partitions(
        &work.path().join("random"),
        HOSTS,
        per_part(RANDOM_BYTES) / 3,
        "random",
    )?);
    eprintln!(
        "bench compress: generated {} + {} MiB in {:.1}s",
        dgl.mib(),
        random.mib(),
        t.elapsed().as_secs_f64()
    );
    let cache = work.path().join("cache");
    // Two copies per setting and rep: every figure is a ratio within the same run.
    let reps = opts.reps.clamp(1, 3);
    {
        // Untimed: hashes the sets once (the coordinator's hash cache then serves every run)
        // and warms the page cache.
        let cluster = TestCluster::start(HOSTS);
        let ip = cluster.ip_config_file();
        timed_copy(cluster.coord(), &dgl.pc, &ip, &cache, &[])?;
        for i in 0..HOSTS {
            let _ = fs::remove_dir_all(cluster.root(i).join("ws"));
        }
        timed_copy(cluster.coord(), &random.pc, &ip, &cache, &[])?;
    }
    match loopback(&dgl, &random, &cache, reps) {
        Ok(r) => rows.extend(r),
        Err(e) => rows.push(Row::error("compress: loopback", &e)),
    }
    match slow_link(&dgl.pc, &cache, dgl.bytes, reps) {
        Ok(r) => rows.extend(r),
        Err(e) => rows.push(Row::error(format!("compress: {RATE} link"), &e)),
    }
    Ok(rows)
}
