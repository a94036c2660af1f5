//! `rsh`: `dgl-coord rsh HOST true` against `ssh HOST true` over a loopback sshd (latency, and
//! the ratio of the medians), and stdin-to-stdout throughput through `rsh HOST cat` and
//! `ssh HOST cat`.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{ensure, Context, Result};

use super::sshd::Sshd;
use super::{Opts, Row, Stat};
use crate::TestCluster;

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
    Ok(rows)
}
