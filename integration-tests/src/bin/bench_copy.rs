//! Benchmark of `dgl-coord copy` on loopback: GB/s of a first copy, time of a re-copy, one
//! agent's receive rate, and scp over a loopback sshd when one is available.
//!
//!     cargo build --release -p dglrun-agent -p dglrun-cli -p dglrun-integration-tests
//!     target/release/bench_copy [--gib 2] [--parts 4] [--dir /dev/shm] [--connections N] [--jobs N]
//!
//! Agent roots go under `--dir` (default /dev/shm, so the disk's own speed is not what is
//! measured; pass a disk directory to include it). Figures are printed, never asserted.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use dglrun_integration_tests::{gen_partitions, TestCluster};

struct Args {
    gib: f64,
    parts: usize,
    dir: PathBuf,
    extra: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        gib: 2.0,
        parts: 4,
        dir: PathBuf::from(if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        }),
        extra: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--gib" => a.gib = value()?.parse()?,
            "--parts" => a.parts = value()?.parse()?,
            "--dir" => a.dir = PathBuf::from(value()?),
            "--connections" | "--jobs" => {
                let v = value()?;
                a.extra.extend([flag.clone(), v]);
            }
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

/// One `dgl-coord copy --json` run: wall seconds and the parsed summary.
fn copy(
    cluster: &TestCluster,
    part_config: &Path,
    scripts: &Path,
    cache: &Path,
    extra: &[String],
) -> Result<(f64, serde_json::Value)> {
    let started = Instant::now();
    let out = cluster
        .coord()
        .env("XDG_CACHE_HOME", cache)
        .args([
            "copy",
            "--workspace",
            "ws",
            "--rel_data_path",
            "data",
            "--json",
            "--progress",
            "quiet",
        ])
        .arg("--part_config")
        .arg(part_config)
        .arg("--ip_config")
        .arg(cluster.ip_config_file())
        .arg("--script_folder")
        .arg(scripts)
        .args(extra)
        .stderr(Stdio::inherit())
        .output()?;
    let secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "dgl-coord copy failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok((secs, serde_json::from_slice(&out.stdout)?))
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // TestCluster puts agent roots in a temp dir: under --dir.
    std::env::set_var("TMPDIR", &args.dir);
    let work = tempfile::tempdir_in(&args.dir)?;
    let total = (args.gib * (1u64 << 30) as f64) as u64;
    let per_file = total / (3 * args.parts as u64);
    println!(
        "bench_copy: {} parts x 3 files x {:.1} MiB = {:.2} GiB, agent roots in {}",
        args.parts,
        per_file as f64 / (1 << 20) as f64,
        (per_file * 3 * args.parts as u64) as f64 / (1u64 << 30) as f64,
        args.dir.display()
    );
    let t = Instant::now();
    let multi = gen_partitions(&work.path().join("multi"), args.parts, per_file, "bench")?;
    // A small script folder, as every DGL copy has.
    let scripts = work.path().join("code");
    std::fs::create_dir_all(scripts.join("utils"))?;
    std::fs::write(scripts.join("train_dist.py"), "import dgl\n".repeat(200))?;
    std::fs::write(
        scripts.join("utils/load.py"),
        "def load(): pass\n".repeat(50),
    )?;
    println!("generated in {:.1}s", t.elapsed().as_secs_f64());

    // 1. N agents: a first copy (cold coordinator hash cache), then a re-copy.
    let cache = work.path().join("cache");
    let cluster = TestCluster::start(args.parts);
    let (first, summary) = copy(&cluster, &multi, &scripts, &cache, &args.extra)?;
    let bytes = summary["bytes_sent"].as_u64().unwrap_or(0);
    let hash_secs = summary["hashing"]["seconds"].as_f64().unwrap_or(0.0);
    println!(
        "first copy to {} agents: {:.2}s, {:.2} GB/s end to end ({} bytes; hashing {:.2}s of it)",
        args.parts,
        first,
        gbps(bytes, first),
        bytes,
        hash_secs
    );
    let (again, summary) = copy(&cluster, &multi, &scripts, &cache, &args.extra)?;
    let resent = summary["bytes_sent"].as_u64().unwrap_or(0);
    println!(
        "re-copy (unchanged): {:.3}s, {resent} bytes sent: {:.0}x faster than the first copy",
        again,
        first / again
    );
    drop(cluster);

    // 2. The same data to fresh agents, hashes already cached: the transfer alone.
    let cluster = TestCluster::start(args.parts);
    let (warm, summary) = copy(&cluster, &multi, &scripts, &cache, &args.extra)?;
    println!(
        "first copy, coordinator hashes cached: {:.2}s, {:.2} GB/s aggregate",
        warm,
        gbps(bytes, warm)
    );
    for h in summary["hosts"].as_array().into_iter().flatten() {
        println!(
            "  {}: {:.2} GB/s over {:.2}s",
            h["addr"].as_str().unwrap_or("?"),
            h["bytes_per_second"].as_f64().unwrap_or(0.0) / 1e9,
            h["seconds"].as_f64().unwrap_or(0.0)
        );
    }
    drop(cluster);

    // 3. One agent receiving everything of a one-part set of the same size.
    let single = gen_partitions(&work.path().join("single"), 1, total / 3, "one")?;
    let cluster = TestCluster::start(1);
    let _ = copy(&cluster, &single, &scripts, &cache, &args.extra)?; // hashes the set
    drop(cluster);
    let cluster = TestCluster::start(1);
    let (one, summary) = copy(&cluster, &single, &scripts, &cache, &args.extra)?;
    let one_bytes = summary["bytes_sent"].as_u64().unwrap_or(0);
    let host_rate = summary["hosts"][0]["bytes_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    println!(
        "one agent receiving {:.2} GiB: {:.2}s wall, {:.2} GB/s wall, {:.2} GB/s send phase",
        one_bytes as f64 / (1u64 << 30) as f64,
        one,
        gbps(one_bytes, one),
        host_rate / 1e9
    );
    drop(cluster);

    // 4. scp to N "machines" over loopback ssh, as copy_files.py does (serially).
    let ip_config = work.path().join("ip_config.txt");
    let lines: String = (0..args.parts)
        .map(|i| format!("127.0.0.{} 30050\n", i + 2))
        .collect();
    std::fs::write(&ip_config, lines)?;
    match scp_baseline(&multi, &ip_config, &scripts, args.parts, work.path()) {
        Ok(scp) => println!(
            "copy_files.py's ssh/scp commands over loopback ssh, {} machines: {:.2}s; dgl-coord \
             copy is {:.1}x faster ({:.1}x with its hashes cached)",
            args.parts,
            scp,
            scp / first,
            scp / warm
        ),
        Err(e) => println!("scp baseline skipped: {e}"),
    }
    Ok(())
}

/// copy_files.py's transfer: for each machine in turn, the same ssh and scp commands it runs.
/// Needs `sshd` and `scp`, and runs its own sshd on a loopback port with a throwaway key.
fn scp_baseline(
    part_config: &Path,
    ip_config: &Path,
    scripts: &Path,
    parts: usize,
    work: &Path,
) -> Result<f64> {
    let sshd =
        which("sshd").or_else(|| Some(PathBuf::from("/usr/sbin/sshd")).filter(|p| p.exists()));
    let (Some(sshd), Some(_)) = (sshd, which("scp")) else {
        bail!("no sshd/scp on this machine (install openssh-server to include it)");
    };
    // sshd started as root insists on its privilege separation directory, which only its
    // service unit creates.
    if nix::unistd::geteuid().is_root() {
        std::fs::create_dir_all("/run/sshd")?;
    }
    let dir = work.join("ssh");
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("key");
    let hostkey = dir.join("hostkey");
    for k in [&key, &hostkey] {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(k)
            .status()?;
        anyhow::ensure!(st.success(), "ssh-keygen failed");
    }
    let auth = dir.join("authorized_keys");
    std::fs::copy(dir.join("key.pub"), &auth)?;
    let port = "47222";
    let mut server = Command::new(&sshd)
        .args(["-D", "-e", "-p", port, "-o", "ListenAddress=127.0.0.1"])
        .arg("-h")
        .arg(&hostkey)
        .arg("-o")
        .arg(format!("AuthorizedKeysFile={}", auth.display()))
        .args([
            "-o",
            "PidFile=none",
            "-o",
            "StrictModes=no",
            "-o",
            "PermitRootLogin=yes",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    let ssh_opts = |c: &mut Command| {
        c.arg("-i").arg(&key).args([
            "-q",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ]);
    };
    let run = |mut c: Command| -> Result<()> {
        let st = c.stdout(Stdio::null()).status()?;
        anyhow::ensure!(st.success(), "{c:?} failed");
        Ok(())
    };
    let ssh = |cmd: String| -> Result<()> {
        let mut c = Command::new("ssh");
        ssh_opts(&mut c);
        c.args(["-p", port, "127.0.0.1"]).arg(cmd);
        run(c)
    };
    let scp = |from: &Path, to: String| -> Result<()> {
        let mut c = Command::new("scp");
        ssh_opts(&mut c);
        c.args(["-P", port, "-r"])
            .arg(from)
            .arg(format!("127.0.0.1:{to}"));
        run(c)
    };
    let src = part_config.parent().context("part_config dir")?;
    let started = Instant::now();
    // The commands of DGL's tools/copy_files.py, machine after machine.
    let result = (|| -> Result<()> {
        for i in 0..parts {
            let ws = work.join(format!("scp-host{i}/ws")).display().to_string();
            ssh(format!("mkdir -p {ws}/data"))?;
            scp(ip_config, ws.clone())?;
            scp(part_config, format!("{ws}/data"))?;
            ssh(format!("mkdir -p {ws}/data/part{i}"))?;
            for f in ["node_feat.dgl", "edge_feat.dgl", "graph.dgl"] {
                scp(
                    &src.join(format!("part{i}/{f}")),
                    format!("{ws}/data/part{i}"),
                )?;
            }
            scp(scripts, ws)?;
        }
        Ok(())
    })();
    let secs = started.elapsed().as_secs_f64();
    let _ = server.kill();
    let _ = server.wait();
    result.map(|_| secs)
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}
