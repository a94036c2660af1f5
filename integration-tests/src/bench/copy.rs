//! Copy: `dgl-coord copy` of a generated 4-part set to 4 agents against scp over the loopback
//! sshd the way DGL's copy_files.py does it (one host after another, one scp per file) and
//! against one `rsync -a` per host; the same amount into one agent (the receive rate); the
//! re-copy of unchanged data; and broadcast of one big file (in the script folder, which every
//! host gets) to 1, 4, 16 agents.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use super::sshd::Sshd;
use super::{free_bytes, Opts, Row};
use crate::TestCluster;

const GIB: f64 = (1u64 << 30) as f64;

/// One `dgl-coord copy --json` (`cmd` aimed at the cluster, `extra` flags added): wall
/// seconds and the report.
pub(super) fn timed_copy(
    cmd: Command,
    part_config: &Path,
    ip_config: &Path,
    cache: &Path,
    extra: &[&str],
) -> Result<(f64, Value)> {
    let (secs, report, _) = timed_copy_rss(cmd, part_config, ip_config, cache, extra)?;
    Ok((secs, report))
}

/// [`timed_copy`], plus the coordinator's peak RSS in bytes.
pub(super) fn timed_copy_rss(
    cmd: Command,
    part_config: &Path,
    ip_config: &Path,
    cache: &Path,
    extra: &[&str],
) -> Result<(f64, Value, u64)> {
    let c = timed_copy_measured(cmd, part_config, ip_config, cache, extra)?;
    Ok((c.secs, c.report, c.peak_rss))
}

/// One `dgl-coord copy` as the kernel accounted it.
pub(super) struct Copied {
    pub(super) secs: f64,
    pub(super) report: Value,
    /// Bytes (`ru_maxrss`).
    pub(super) peak_rss: u64,
    /// User + system seconds of the coordinator.
    pub(super) cpu: f64,
}

/// [`timed_copy`], with the coordinator's peak RSS and CPU time.
pub(super) fn timed_copy_measured(
    mut cmd: Command,
    part_config: &Path,
    ip_config: &Path,
    cache: &Path,
    extra: &[&str],
) -> Result<Copied> {
    cmd.env("XDG_CACHE_HOME", cache)
        .args(["copy", "--json", "--progress", "quiet"])
        .args(["--workspace", "ws", "--rel_data_path", "data"])
        .arg("--part_config")
        .arg(part_config)
        .arg("--ip_config")
        .arg(ip_config)
        .args(extra)
        .stderr(Stdio::null());
    let t = Instant::now();
    let (status, stdout, peak, cpu) = run_with_peak_rss(cmd).context("run dgl-coord copy")?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(
        status.success(),
        "dgl-coord copy {extra:?} failed: {}",
        String::from_utf8_lossy(&stdout)
    );
    Ok(Copied {
        secs,
        report: serde_json::from_slice(&stdout).context("copy JSON")?,
        peak_rss: peak,
        cpu,
    })
}

/// Runs `cmd` (stdout captured) to its end: its status, stdout, peak RSS in bytes and CPU
/// seconds (user + system). The figures are the kernel's own (`wait4`'s rusage), so a short
/// spike between two samples counts.
fn run_with_peak_rss(mut cmd: Command) -> Result<(std::process::ExitStatus, Vec<u8>, u64, f64)> {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let mut child = cmd.stdout(Stdio::piped()).spawn().context("spawn")?;
    let mut stdout = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_end(&mut stdout).context("read stdout")?;
    }
    let pid = i32::try_from(child.id()).context("pid")?;
    let mut status = 0;
    // SAFETY: rusage is plain data, zero is a valid value; wait4 writes both out-parameters
    // and reaps only `pid`, our own child (std's Child does not wait on drop).
    let mut usage: nix::libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { nix::libc::wait4(pid, &mut status, 0, &mut usage) };
    ensure!(r == pid, "wait4: {}", std::io::Error::last_os_error());
    // Linux reports ru_maxrss in KiB.
    let peak = u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024;
    let secs = |t: nix::libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let cpu = secs(usage.ru_utime) + secs(usage.ru_stime);
    Ok((
        std::process::ExitStatus::from_raw(status),
        stdout,
        peak,
        cpu,
    ))
}

/// [`timed_copy_rss`] to every agent of `cluster`, with `script_folder` if given.
fn copy(
    cluster: &TestCluster,
    part_config: &Path,
    cache: &Path,
    script_folder: Option<&Path>,
) -> Result<(f64, Value, u64)> {
    let scripts = script_folder.map(|s| s.to_string_lossy().into_owned());
    let extra: Vec<&str> = match &scripts {
        Some(s) => vec!["--script_folder", s],
        None => Vec::new(),
    };
    let ip_config = cluster.ip_config_file();
    timed_copy_rss(cluster.coord(), part_config, &ip_config, cache, &extra)
}

/// [`timed_copy_measured`] to every agent of `cluster`, and the agents' CPU seconds spent
/// meanwhile (all of them together).
fn copy_measured(cluster: &TestCluster, part_config: &Path, cache: &Path) -> Result<(Copied, f64)> {
    let ticks = || -> u64 {
        cluster
            .agents
            .iter()
            .filter_map(|a| a.pid().and_then(super::proc::cpu_ticks))
            .sum()
    };
    let before = ticks();
    let ip_config = cluster.ip_config_file();
    let c = timed_copy_measured(cluster.coord(), part_config, &ip_config, cache, &[])?;
    let agents = ticks().saturating_sub(before) as f64 / super::proc::TICKS;
    Ok((c, agents))
}

/// The ssh tools a DGL user has.
#[derive(Clone, Copy)]
enum SshTool {
    /// copy_files.py's way: for each host, `ssh mkdir -p`, then one scp per file.
    Scp,
    /// One `rsync -a` per host for the configs and one for its partition (how an rsync user
    /// would script it); run again on unchanged data it only compares sizes and mtimes.
    Rsync,
}

/// The placement of `dgl-coord copy` made with `tool` over the loopback sshd, host after host
/// as copy_files.py goes; wall seconds.
fn ssh_copy(
    tool: SshTool,
    sshd: &Sshd,
    part_config: &Path,
    ip_config: &Path,
    dest: &Path,
    parts: usize,
) -> Result<f64> {
    let src = part_config.parent().context("part_config dir")?;
    let t = Instant::now();
    for i in 0..parts {
        let ws = dest.join(format!("host{i}/ws"));
        let data = ws.join("data");
        let part = src.join(format!("part{i}"));
        let mut cmds = Vec::new();
        // (sources, destination directory) of each transfer.
        let transfers: Vec<(Vec<PathBuf>, PathBuf)> = match tool {
            SshTool::Scp => {
                let mut mkdir = sshd.ssh();
                mkdir.arg(format!("mkdir -p {}/part{i}", data.display()));
                cmds.push(mkdir);
                let mut files = vec![
                    (vec![ip_config.to_path_buf()], ws.clone()),
                    (vec![part_config.to_path_buf()], data.clone()),
                ];
                for f in ["node_feat.dgl", "edge_feat.dgl", "graph.dgl"] {
                    files.push((vec![part.join(f)], data.join(format!("part{i}"))));
                }
                files
            }
            SshTool::Rsync => vec![
                (vec![ip_config.to_path_buf()], ws.join("")),
                (vec![part_config.to_path_buf(), part.clone()], data.join("")),
            ],
        };
        for (from, to) in transfers {
            let mut c = match tool {
                SshTool::Scp => sshd.scp(),
                SshTool::Rsync => sshd.rsync(),
            };
            c.args(&from).arg(sshd.remote(&to));
            cmds.push(c);
        }
        for mut c in cmds {
            let st = c.status()?;
            ensure!(st.success(), "{c:?} failed on host {i}");
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

fn set_bytes(part_config: &Path) -> u64 {
    crate::list_files(part_config.parent().unwrap_or(Path::new(".")))
        .iter()
        .filter_map(|f| fs::metadata(part_config.parent().unwrap_or(Path::new(".")).join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// `ssh`: also time scp and rsync (the baselines) for the copy figures.
pub fn run(opts: &Opts, with_copy: bool, ssh: bool, with_bcast: bool) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let work = tempfile::tempdir_in(&opts.dir)?;
    if with_copy {
        match copy_vs_scp(opts, work.path(), ssh) {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(Row::error("copy", &e)),
        }
        match broadcast_memory(opts, work.path()) {
            Ok(r) => rows.push(r),
            Err(e) => rows.push(Row::error("copy: coordinator peak RSS, 64 agents", &e)),
        }
    }
    if with_bcast {
        match broadcast(opts, work.path()) {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(Row::error("broadcast", &e)),
        }
    }
    Ok(rows)
}

fn copy_vs_scp(opts: &Opts, work: &Path, ssh: bool) -> Result<Vec<Row>> {
    let parts = 4;
    let total = (opts.size_gib * GIB) as u64;
    let need = total * 3 + (64 << 20);
    if let Some(free) = free_bytes(&opts.dir) {
        ensure!(
            free > need,
            "copy needs {:.1} GiB free in {} (has {:.1}); use --size-gib or --dir",
            need as f64 / GIB,
            opts.dir.display(),
            free as f64 / GIB
        );
    }
    let t = Instant::now();
    let pc = crate::gen_partitions(&work.join("src"), parts, total / 12, "bench")?;
    let bytes = set_bytes(&pc);
    eprintln!(
        "bench copy: generated {:.2} GiB in {:.1}s under {}",
        bytes as f64 / GIB,
        t.elapsed().as_secs_f64(),
        opts.dir.display()
    );
    let sshd = if ssh { Some(Sshd::start()?) } else { None };
    let reps = opts.reps.clamp(1, 5);
    let (mut first, mut again, mut scp) = (vec![], vec![], vec![]);
    let (mut rsync, mut rsync_again, mut peak) = (vec![], vec![], vec![]);
    let mut cpu = CpuFigures::default();
    let dir = pc.parent().context("part_config dir")?;
    let files: Vec<PathBuf> = crate::list_files(dir).iter().map(|f| dir.join(f)).collect();
    for rep in 0..reps {
        let (floor, floor_cpu) = super::floor::measure(&files, &work.join("floor"))?;
        let cache = tempfile::tempdir_in(work)?;
        let cluster = TestCluster::start(parts);
        let (c1, agents_cpu) = copy_measured(&cluster, &pc, cache.path())?;
        let (t1, rss) = (c1.secs, c1.peak_rss);
        let gb_sent = c1.report["bytes_sent"].as_u64().unwrap_or(0) as f64 / 1e9;
        let (t2, rep2, _) = copy(&cluster, &pc, cache.path(), None)?;
        let resent = rep2["bytes_sent"].as_u64().unwrap_or(0);
        let ip_config = work.join("ip_config.txt");
        fs::copy(cluster.ip_config_file(), &ip_config)?;
        drop(cluster);
        // Fresh agents, the coordinator's hashes cached: what sending alone costs it.
        let cluster = TestCluster::start(parts);
        let (c3, _) = copy_measured(&cluster, &pc, cache.path())?;
        drop(cluster);
        let warm_gb = c3.report["bytes_sent"].as_u64().unwrap_or(0) as f64 / 1e9;
        eprintln!(
            "bench copy rep {rep}: floor {floor:.2}s ({:.2} GB/s, {floor_cpu:.2} CPU s), dglrun / floor {:.2}x time, {:.2}x CPU; CPU s/GB: coordinator {:.2} cold, {:.2} hashes cached ({:.2}s), agents {:.2}",
            bytes as f64 / floor / 1e9,
            t1 / floor,
            (c1.cpu + agents_cpu) / floor_cpu,
            c1.cpu / gb_sent,
            c3.cpu / warm_gb,
            c3.secs,
            agents_cpu / gb_sent,
        );
        cpu.floor.push(floor);
        cpu.ratio.push(t1 / floor);
        cpu.cpu_ratio.push((c1.cpu + agents_cpu) / floor_cpu);
        cpu.coord_cold.push(c1.cpu / gb_sent);
        cpu.coord_cached.push(c3.cpu / warm_gb);
        cpu.agent.push(agents_cpu / gb_sent);
        first.push(t1);
        again.push(t2);
        peak.push(rss as f64 / 1e6);
        let Some(sshd) = &sshd else {
            eprintln!(
                "bench copy rep {rep}: dglrun {t1:.2}s ({:.2} GB/s, coordinator peak RSS {:.0} MB), re-copy {t2:.3}s ({resent} bytes resent)",
                bytes as f64 / t1 / 1e9,
                rss as f64 / 1e6
            );
            continue;
        };
        let dest = work.join("scp");
        let t3 = ssh_copy(SshTool::Scp, sshd, &pc, &ip_config, &dest, parts)?;
        let _ = fs::remove_dir_all(&dest);
        let t4 = ssh_copy(SshTool::Rsync, sshd, &pc, &ip_config, &dest, parts)?;
        let t5 = ssh_copy(SshTool::Rsync, sshd, &pc, &ip_config, &dest, parts)?;
        let _ = fs::remove_dir_all(&dest);
        eprintln!(
            "bench copy rep {rep}: dglrun {t1:.2}s ({:.2} GB/s, coordinator peak RSS {:.0} MB), re-copy {t2:.3}s ({resent} bytes resent), scp {t3:.2}s ({:.2} GB/s), rsync {t4:.2}s, rsync again {t5:.3}s",
            bytes as f64 / t1 / 1e9,
            rss as f64 / 1e6,
            bytes as f64 / t3 / 1e9
        );
        scp.push(t3);
        rsync.push(t4);
        rsync_again.push(t5);
    }
    drop(sshd);
    let _ = fs::remove_dir_all(work.join("src"));
    let (one_cold, one_warm, one_bytes) = into_one_agent(work, total, opts.reps.max(1))?;
    let gbps = |v: &[f64]| v.iter().map(|t| bytes as f64 / t / 1e9).collect::<Vec<_>>();
    let one_gbps = |v: &[f64]| {
        v.iter()
            .map(|t| one_bytes as f64 / t / 1e9)
            .collect::<Vec<_>>()
    };
    let size = format!("{:.2} GiB", bytes as f64 / GIB);
    let mut rows = vec![
        Row::new(
            format!("copy {size} into 1 agent, coordinator hashes cached"),
            "GB/s",
            &one_gbps(&one_warm),
            ">= 1 GB/s",
            Some(&|x| x >= 1.0),
        ),
        Row::new(
            format!("copy {size} into 1 agent, cold (both sides hash)"),
            "GB/s",
            &one_gbps(&one_cold),
            "",
            None,
        ),
        Row::new(
            format!("copy {size} to 4 agents: dglrun (cold hash cache)"),
            "GB/s",
            &gbps(&first),
            "",
            None,
        ),
        Row::new(
            format!("copy {size}: floor (hash on both sides, one loopback copy)"),
            "GB/s",
            &gbps(&cpu.floor),
            "",
            None,
        ),
        Row::new(
            "copy to 4 agents, cold: dglrun time / floor time",
            "x",
            &cpu.ratio,
            "<= 1.5x",
            Some(&|x| x <= 1.5),
        ),
        Row::new(
            "copy to 4 agents, cold: dglrun CPU / floor CPU",
            "x",
            &cpu.cpu_ratio,
            "",
            None,
        ),
        Row::new(
            "copy to 4 agents, cold: coordinator CPU",
            "s/GB",
            &cpu.coord_cold,
            "",
            None,
        ),
        Row::new(
            "copy to 4 agents, hashes cached: coordinator CPU",
            "s/GB",
            &cpu.coord_cached,
            "<= 0.25",
            Some(&|x| x <= 0.25),
        ),
        Row::new(
            "copy to 4 agents: agent CPU (all agents, per GB received)",
            "s/GB",
            &cpu.agent,
            "",
            None,
        ),
        Row::new(
            format!("copy {size} to 4 agents: coordinator peak RSS"),
            "MB",
            &peak,
            "< 100 MB",
            Some(&|x| x < 100.0),
        ),
        Row::new(
            "re-copy unchanged: first / re-copy",
            "x",
            &first
                .iter()
                .zip(&again)
                .map(|(f, a)| f / a)
                .collect::<Vec<_>>(),
            ">= 50x",
            Some(&|x| x >= 50.0),
        ),
        Row::new(
            "re-copy unchanged: time",
            "ms",
            &again.iter().map(|a| a * 1000.0).collect::<Vec<_>>(),
            "",
            None,
        ),
    ];
    if !ssh {
        return Ok(rows);
    }
    rows.extend([
        Row::new(
            format!("copy {size}: scp, host after host"),
            "GB/s",
            &gbps(&scp),
            "baseline",
            None,
        ),
        Row::new(
            "copy: scp time / dglrun time",
            "x",
            &scp.iter()
                .zip(&first)
                .map(|(s, d)| s / d)
                .collect::<Vec<_>>(),
            ">= 3x",
            Some(&|x| x >= 3.0),
        ),
        Row::new(
            format!("copy {size}: rsync -a, host after host"),
            "GB/s",
            &gbps(&rsync),
            "baseline",
            None,
        ),
        Row::new(
            "copy: rsync time / dglrun time",
            "x",
            &rsync
                .iter()
                .zip(&first)
                .map(|(s, d)| s / d)
                .collect::<Vec<_>>(),
            ">= 3x",
            Some(&|x| x >= 3.0),
        ),
        Row::new(
            "re-copy unchanged: rsync again / dglrun re-copy",
            "x",
            &rsync_again
                .iter()
                .zip(&again)
                .map(|(r, d)| r / d)
                .collect::<Vec<_>>(),
            "(rsync trusts size+mtime)",
            None,
        ),
    ]);
    Ok(rows)
}

/// CPU figures of the 4-agent copy, one entry per rep.
#[derive(Default)]
struct CpuFigures {
    /// Seconds of the floor (see `floor`).
    floor: Vec<f64>,
    /// Cold copy time / floor time.
    ratio: Vec<f64>,
    /// CPU seconds of the cold copy (coordinator and agents) / those of the floor: the ratio a
    /// loaded machine moves least (a process with more threads gets more of a busy CPU).
    cpu_ratio: Vec<f64>,
    /// Coordinator CPU seconds per GB sent, cold and with its hashes cached.
    coord_cold: Vec<f64>,
    coord_cached: Vec<f64>,
    /// Agents' CPU seconds per GB they received.
    agent: Vec<f64>,
}

/// Agents of the broadcast memory figure.
const MEMORY_HOSTS: usize = 64;

/// The coordinator's peak RSS sending one file (in the script folder) to 64 agents: with a
/// stream per host, what the coordinator holds per stream is multiplied by 64. The file is
/// large enough to fill every host's pipeline many times over, small enough for 65 copies of
/// it in --dir.
fn broadcast_memory(opts: &Opts, work: &Path) -> Result<Row> {
    let n = MEMORY_HOSTS;
    let size = ((opts.bcast_gib * GIB) as u64).min(128 << 20);
    let need = size * (n as u64 + 1);
    if let Some(free) = free_bytes(&opts.dir) {
        ensure!(
            free > need,
            "needs {:.1} GiB free in {}, has {:.1}",
            need as f64 / GIB,
            opts.dir.display(),
            free as f64 / GIB
        );
    }
    let code = work.join("memory-code");
    fs::create_dir_all(&code)?;
    crate::partitions::write_random(&code.join("big.bin"), size, 78)?;
    let pc = crate::gen_partitions(&work.join("memory-set"), n, 1024, "memory")?;
    let mut peak = Vec::new();
    for rep in 0..opts.reps.clamp(1, 3) {
        let cache = tempfile::tempdir_in(work)?;
        let cluster = TestCluster::start(n);
        let (t, _, rss) = copy(&cluster, &pc, cache.path(), Some(&code))?;
        drop(cluster);
        eprintln!(
            "bench copy {} MiB to {n} agents rep {rep}: {t:.2}s, coordinator peak RSS {:.0} MB",
            size >> 20,
            rss as f64 / 1e6
        );
        peak.push(rss as f64 / 1e6);
    }
    let _ = fs::remove_dir_all(&code);
    let _ = fs::remove_dir_all(work.join("memory-set"));
    Ok(Row::new(
        format!(
            "copy one {} MiB file to {n} agents: coordinator peak RSS",
            size >> 20
        ),
        "MB",
        &peak,
        "< 150 MB",
        Some(&|x| x < 150.0),
    ))
}

/// A one-part set of `total` bytes into one agent, `reps` times: wall seconds with a cold
/// coordinator hash cache (both sides hash, on the same 2 cores) and with it warm (a fresh
/// agent each time, so every byte is sent, verified and written), and the bytes sent.
fn into_one_agent(work: &Path, total: u64, reps: usize) -> Result<(Vec<f64>, Vec<f64>, u64)> {
    let pc = crate::gen_partitions(&work.join("one"), 1, total / 3, "one")?;
    let (mut cold, mut warm, mut bytes) = (Vec::new(), Vec::new(), 0);
    for rep in 0..reps {
        let cache = tempfile::tempdir_in(work)?;
        let cluster = TestCluster::start(1);
        let (t1, report, _) = copy(&cluster, &pc, cache.path(), None)?;
        drop(cluster);
        let cluster = TestCluster::start(1);
        let (t2, _, _) = copy(&cluster, &pc, cache.path(), None)?;
        drop(cluster);
        bytes = report["bytes_sent"].as_u64().unwrap_or(0);
        eprintln!(
            "bench copy into 1 agent rep {rep}: cold {t1:.2}s ({:.2} GB/s), hashes cached {t2:.2}s ({:.2} GB/s)",
            bytes as f64 / t1 / 1e9,
            bytes as f64 / t2 / 1e9
        );
        cold.push(t1);
        warm.push(t2);
    }
    let _ = fs::remove_dir_all(work.join("one"));
    Ok((cold, warm, bytes))
}

fn broadcast(opts: &Opts, work: &Path) -> Result<Vec<Row>> {
    let size = (opts.bcast_gib * GIB) as u64;
    let mut rows = Vec::new();
    let code = work.join("bcast-code");
    fs::create_dir_all(&code)?;
    crate::partitions::write_random(&code.join("big.bin"), size, 77)?;
    let mut base: Vec<f64> = Vec::new();
    let reps = opts.reps.clamp(1, 3);
    for &n in &opts.bcast_hosts {
        let need = size * (n as u64 + 1);
        if let Some(free) = free_bytes(&opts.dir) {
            if free < need {
                rows.push(Row::error(
                    format!("broadcast to {n}"),
                    &anyhow::anyhow!(
                        "skipped: needs {:.1} GiB free in {}, has {:.1}",
                        need as f64 / GIB,
                        opts.dir.display(),
                        free as f64 / GIB
                    ),
                ));
                continue;
            }
        }
        let pc = crate::gen_partitions(&work.join(format!("bcast-set{n}")), n, 1024, "bcast")?;
        let (mut times, mut warm) = (Vec::new(), Vec::new());
        for rep in 0..reps {
            let cache = tempfile::tempdir_in(work)?;
            let cluster = TestCluster::start(n);
            let (t, _, _) = copy(&cluster, &pc, cache.path(), Some(&code))?;
            drop(cluster);
            if n == 1 {
                // Fresh agent, coordinator hash cache warm: the transfer without local hashing.
                let cluster = TestCluster::start(n);
                let (w, _, _) = copy(&cluster, &pc, cache.path(), Some(&code))?;
                drop(cluster);
                eprintln!("bench broadcast to 1 agent, hashes cached, rep {rep}: {w:.2}s");
                warm.push(w);
            }
            eprintln!(
                "bench broadcast {:.2} GiB to {n} agents rep {rep}: {t:.2}s",
                size as f64 / GIB
            );
            times.push(t);
            std::thread::sleep(Duration::from_millis(100));
        }
        let g = format!("{:.2} GiB", size as f64 / GIB);
        if n == 1 {
            rows.push(Row::new(
                format!("broadcast {g} into 1 agent"),
                "GB/s",
                &times
                    .iter()
                    .map(|t| size as f64 / t / 1e9)
                    .collect::<Vec<_>>(),
                "",
                None,
            ));
            rows.push(Row::new(
                format!("broadcast {g} into 1 agent, hashes cached"),
                "GB/s",
                &warm
                    .iter()
                    .map(|t| size as f64 / t / 1e9)
                    .collect::<Vec<_>>(),
                "",
                None,
            ));
            base = times;
        } else if let Some(b) = super::Stat::of(&base) {
            rows.push(Row::new(
                format!("broadcast {g}: time to {n} / to 1"),
                "x",
                &times.iter().map(|t| t / b.median).collect::<Vec<_>>(),
                "",
                None,
            ));
        } else {
            rows.push(Row::new(
                format!("broadcast {g} to {n} agents"),
                "s",
                &times,
                "",
                None,
            ));
        }
    }
    Ok(rows)
}
