//! `rsh`: `dgl-coord rsh HOST true` against `ssh HOST true` over a loopback sshd (latency, and
//! the ratio of the medians), stdin-to-stdout throughput through `rsh HOST cat` and
//! `ssh HOST cat`, and DGL's unmodified launch.py running a do-nothing job on 4 hosts over the
//! shims against the same over sshd.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use super::sshd::Sshd;
use super::{Opts, Row, Stat};
use crate::{fixtures_dir, TestCluster, WS};

/// Wall time of `cmd` (no stdin), which must exit 0.
fn time_true(mut cmd: Command) -> Result<f64> {
    let t = Instant::now();
    let out = cmd.stdin(Stdio::null()).output().context("spawn")?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(secs)
}

/// MiB/s of `mib` MiB written into `cmd`'s stdin and read back from its stdout.
fn throughput(mut cmd: Command, mib: usize) -> Result<f64> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let t = Instant::now();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let block = vec![0x5au8; 1 << 20];
        for _ in 0..mib {
            stdin.write_all(&block)?;
        }
        Ok(())
    });
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    loop {
        let n = stdout.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let secs = t.elapsed().as_secs_f64();
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    ensure!(child.wait()?.success(), "{cmd:?} failed");
    ensure!(
        got == mib << 20,
        "{cmd:?}: {got} bytes back of {}",
        mib << 20
    );
    Ok(mib as f64 / secs)
}

/// The rows of the `rsh` section; `mib` is the size of the throughput stream.
pub fn run(opts: &Opts, with_ssh: bool, mib: usize) -> Result<Vec<Row>> {
    let c = TestCluster::start(1);
    let ip = c.ip(0).to_string();
    let rsh = |words: &[&str]| {
        let mut cmd = c.coord();
        cmd.arg("rsh").arg(&ip).args(words);
        cmd
    };
    let sshd = if with_ssh { Some(Sshd::start()?) } else { None };
    let mut rsh_true = Vec::new();
    let mut ssh_true = Vec::new();
    let mut rsh_cat = Vec::new();
    let mut ssh_cat = Vec::new();
    // One unmeasured run of each warms the page cache and the agent.
    time_true(rsh(&["true"]))?;
    for _ in 0..opts.reps.max(5) {
        rsh_true.push(time_true(rsh(&["true"]))? * 1000.0);
        if let Some(s) = &sshd {
            let mut cmd = s.ssh();
            cmd.arg("true");
            ssh_true.push(time_true(cmd)? * 1000.0);
        }
    }
    for _ in 0..opts.reps {
        rsh_cat.push(throughput(rsh(&["cat"]), mib)?);
        if let Some(s) = &sshd {
            let mut cmd = s.ssh();
            cmd.arg("cat");
            ssh_cat.push(throughput(cmd, mib)?);
        }
    }
    let under_10ms: &dyn Fn(f64) -> bool = &|m| m < 10.0;
    let mut rows = vec![Row::new(
        "rsh: `dgl-coord rsh HOST true`",
        "ms",
        &rsh_true,
        "< 10",
        Some(under_10ms),
    )];
    rows.push(Row::new(
        format!("rsh: {mib} MiB through `rsh HOST cat`"),
        "MiB/s",
        &rsh_cat,
        "",
        None,
    ));
    if with_ssh {
        rows.push(Row::new("rsh: `ssh HOST true`", "ms", &ssh_true, "", None));
        let ratio = match (Stat::of(&ssh_true), Stat::of(&rsh_true)) {
            (Some(s), Some(r)) => vec![s.median / r.median],
            _ => Vec::new(),
        };
        let at_least_20: &dyn Fn(f64) -> bool = &|x| x >= 20.0;
        rows.push(Row::new(
            "rsh: ssh true / rsh true",
            "x",
            &ratio,
            ">= 20",
            Some(at_least_20),
        ));
        rows.push(Row::new(
            format!("rsh: {mib} MiB through `ssh HOST cat`"),
            "MiB/s",
            &ssh_cat,
            "",
            None,
        ));
    }
    match launch_py_rows(opts, with_ssh) {
        Ok(r) => rows.extend(r),
        Err(e) => rows.push(Row::error("rsh: launch.py", &e)),
    }
    Ok(rows)
}

/// Hosts of the launch.py figure.
const LAUNCH_HOSTS: usize = 4;

/// Wall time of DGL's launch.py starting one server and one trainer (through the torchrun
/// stand-in) per host, each running an empty Python script, over the shims and over sshd.
fn launch_py_rows(opts: &Opts, with_ssh: bool) -> Result<Vec<Row>> {
    let c = TestCluster::with_workspace(LAUNCH_HOSTS);
    let ws = c.root(0).join(WS);
    std::fs::write(ws.join("nothing.py"), "")?;
    let shims = c.dir.path().join("shims");
    let out = c.coord().arg("shims").arg("--dir").arg(&shims).output()?;
    ensure!(
        out.status.success(),
        "dgl-coord shims: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shims_path = {
        let rest = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![shims.clone()];
        paths.extend(std::env::split_paths(&rest));
        std::env::join_paths(paths)?
    };
    let sshd = if with_ssh {
        let addrs: Vec<String> = (0..LAUNCH_HOSTS).map(|i| c.ip(i).to_string()).collect();
        Some(Sshd::start_on(&addrs)?)
    } else {
        None
    };
    let mut over_shims = Vec::new();
    let mut over_ssh = Vec::new();
    for _ in 0..opts.reps {
        over_shims.push(time_launch_py(&ws, 22, &shims_path)?);
        if let Some(s) = &sshd {
            over_ssh.push(time_launch_py(&ws, s.port, &s.path_env())?);
        }
    }
    let mut rows = vec![Row::new(
        format!("rsh: launch.py, do-nothing job on {LAUNCH_HOSTS} hosts, over the shims"),
        "s",
        &over_shims,
        "",
        None,
    )];
    if with_ssh {
        rows.push(Row::new(
            format!("rsh: launch.py, do-nothing job on {LAUNCH_HOSTS} hosts, over sshd"),
            "s",
            &over_ssh,
            "",
            None,
        ));
        let ratio = match (Stat::of(&over_ssh), Stat::of(&over_shims)) {
            (Some(s), Some(r)) => vec![s.median / r.median],
            _ => Vec::new(),
        };
        rows.push(Row::new(
            "rsh: launch.py over sshd / over the shims",
            "x",
            &ratio,
            "",
            None,
        ));
    }
    Ok(rows)
}

/// The system's Python when there is one: a version manager's `python3` shim on PATH is a
/// script that costs more than the job, and sshd's shells do not see it.
fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Seconds of one launch.py run from the workspace `ws`, with `path` as PATH (the shims or
/// the sshd wrappers first) and `ssh_port` for its `ssh -p`. Started with multiprocessing's
/// "spawn", as its users should (see README: its fork can deadlock while threads start ssh).
fn time_launch_py(ws: &std::path::Path, ssh_port: u16, path: &std::ffi::OsStr) -> Result<f64> {
    let mut cmd = crate::dgl_tool(python(), "launch.py");
    cmd
        // `--extra_envs` takes every word up to the next option: not last.
        .arg("--extra_envs")
        .arg(format!(
            "PYTHONPATH={}",
            fixtures_dir().join("pythonpath").display()
        ))
        .arg("--workspace")
        .arg(ws)
        .args([
            "--num_trainers",
            "1",
            "--num_samplers",
            "0",
            "--num_servers",
            "1",
        ])
        .args([
            "--part_config",
            "data/g.json",
            "--ip_config",
            "ip_config.txt",
        ])
        .args(["--ssh_port", &ssh_port.to_string()])
        .arg(format!("{} nothing.py", python()))
        .current_dir(ws)
        .env("PATH", path)
        .env_remove("OMP_NUM_THREADS")
        .stdin(Stdio::null());
    let t = Instant::now();
    // Its lines are of no interest; its errors go to stderr as they come.
    let (status, _) =
        super::run_lines(cmd, Duration::from_secs(300), |_, _| {}).context("launch.py")?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(status.success(), "launch.py exited {status}");
    Ok(secs)
}
