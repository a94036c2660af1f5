//! The benchmark suite behind `cargo run --release -p dglrun-integration-tests --bin bench`:
//! launch and teardown against an ssh baseline, 256-agent scale, copy against scp, broadcast.
//! Every figure is measured against a baseline measured in the same run (ratios), because the
//! machine is shared and noisy. Only loopback addresses are used, and for `compress`'s slow
//! link and `links`' shaped links network namespaces of this machine (198.18.0.0/15).

pub mod compress;
pub mod copy;
pub mod floor;
pub mod launch;
pub mod links;
pub mod logs;
pub mod proc;
pub mod rsh;
pub mod scale;
pub mod sshd;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Options shared by every benchmark.
#[derive(Clone, Debug)]
pub struct Opts {
    pub reps: usize,
    pub size_gib: f64,
    pub bcast_gib: f64,
    pub bcast_hosts: Vec<usize>,
    pub dir: PathBuf,
    pub scale_agents: usize,
    /// `links`: the hosts' link rate in Mbit/s, and the size of each partition.
    pub link_mbit: u64,
    pub link_mib: u64,
}

/// min / median / max of some samples.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(samples: &[f64]) -> Option<Stat> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stat {
            min: v[0],
            median,
            max: v[n - 1],
            n,
        })
    }
}

/// One line of the final table.
#[derive(Clone, Debug)]
pub struct Row {
    pub figure: String,
    pub unit: String,
    pub stat: Option<Stat>,
    pub target: String,
    /// None: no target (informational).
    pub pass: Option<bool>,
}

impl Row {
    /// A row whose pass/fail is `check(median)` when a target is given.
    pub fn new(
        figure: impl Into<String>,
        unit: &str,
        samples: &[f64],
        target: &str,
        check: Option<&dyn Fn(f64) -> bool>,
    ) -> Row {
        let stat = Stat::of(samples);
        let pass = match (check, stat) {
            (Some(f), Some(s)) => Some(f(s.median)),
            (Some(_), None) => Some(false),
            (None, _) => None,
        };
        Row {
            figure: figure.into(),
            unit: unit.to_string(),
            stat,
            target: target.to_string(),
            pass,
        }
    }

    /// A row that failed to be measured.
    pub fn error(figure: impl Into<String>, err: &anyhow::Error) -> Row {
        let figure = figure.into();
        eprintln!("bench: {figure}: {err:#}");
        let mut msg = format!("{err:#}").replace('\n', " ");
        if msg.chars().count() > 90 {
            msg = msg.chars().take(87).collect::<String>() + "...";
        }
        Row {
            figure,
            unit: String::new(),
            stat: None,
            target: format!("error: {msg}"),
            pass: Some(false),
        }
    }
}

fn fmt_num(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// The final table: figure, median value, min/median/max, target, pass/fail.
pub fn print_table(rows: &[Row]) {
    let mut lines = vec![[
        "figure".to_string(),
        "value".to_string(),
        "min / median / max (n)".to_string(),
        "target".to_string(),
        "result".to_string(),
    ]];
    for r in rows {
        let (value, mmm) = match r.stat {
            Some(s) => (
                format!("{} {}", fmt_num(s.median), r.unit),
                format!(
                    "{} / {} / {} ({})",
                    fmt_num(s.min),
                    fmt_num(s.median),
                    fmt_num(s.max),
                    s.n
                ),
            ),
            None => ("-".into(), "-".into()),
        };
        let result = match r.pass {
            Some(true) => "pass",
            Some(false) => "FAIL",
            None => "info",
        };
        lines.push([
            r.figure.clone(),
            value,
            mmm,
            r.target.clone(),
            result.into(),
        ]);
    }
    let mut w = [0usize; 5];
    for l in &lines {
        for (i, c) in l.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    for (k, l) in lines.iter().enumerate() {
        println!(
            "| {:<w0$} | {:>w1$} | {:>w2$} | {:<w3$} | {:<w4$} |",
            l[0],
            l[1],
            l[2],
            l[3],
            l[4],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3],
            w4 = w[4]
        );
        if k == 0 {
            println!(
                "|{}|{}|{}|{}|{}|",
                "-".repeat(w[0] + 2),
                "-".repeat(w[1] + 2),
                "-".repeat(w[2] + 2),
                "-".repeat(w[3] + 2),
                "-".repeat(w[4] + 2)
            );
        }
    }
}

/// `target/release/<name>`, or an error saying how to build it.
pub fn release_bin(name: &str) -> Result<PathBuf> {
    let p = crate::bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} not found: run `cargo build --release --bins` first",
            p.display()
        );
    }
    Ok(p)
}

/// Runs `cmd` with stdout piped; every stdout line goes to `on_line` with the instant it was
/// read. Kills the process after `timeout`. Returns the exit status and the instant of exit.
pub fn run_lines(
    cmd: Command,
    timeout: Duration,
    on_line: impl FnMut(Instant, &str),
) -> Result<(std::process::ExitStatus, Instant)> {
    run_lines_pid(cmd, timeout, None, on_line)
}

/// As [`run_lines`], storing the child's pid in `pid_out` once it is spawned.
pub fn run_lines_pid(
    mut cmd: Command,
    timeout: Duration,
    pid_out: Option<&std::sync::atomic::AtomicU32>,
    mut on_line: impl FnMut(Instant, &str),
) -> Result<(std::process::ExitStatus, Instant)> {
    cmd.stdout(Stdio::piped());
    let mut child = cmd.spawn().context("spawn")?;
    if let Some(p) = pid_out {
        p.store(child.id(), std::sync::atomic::Ordering::SeqCst);
    }
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            timed_out = true;
            break;
        }
        match rx.recv_timeout(left) {
            Ok((t, l)) => on_line(t, &l),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
        }
    }
    if timed_out {
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        bail!("timed out after {timeout:?}");
    }
    let status = child.wait()?;
    let at = Instant::now();
    let _ = reader.join();
    Ok((status, at))
}

/// Seconds since the Unix epoch, as a float.
pub fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Bytes that may be written under `dir`: free space, and on tmpfs (/dev/shm) also the
/// memory available less 2 GiB for everyone else on the machine.
pub fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    let df = df_avail(dir)?;
    if !dir.starts_with("/dev/shm") {
        return Some(df);
    }
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?
        * 1024;
    Some(df.min(mem.saturating_sub(2 << 30)))
}

fn df_avail(dir: &std::path::Path) -> Option<u64> {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(dir)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)?
        .trim()
        .parse()
        .ok()
}
