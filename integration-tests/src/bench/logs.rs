//! `logs`: what host-side logging costs and how fast its output reads back. The throughput of
//! `dgl-coord logs` over a finished job's kept output on 4 hosts; the latency of
//! `logs --follow` from a line's write to its print; the agent's CPU and peak RSS while a job
//! prints 100,000 lines a second (attached, so the same agent also streams them to `launch`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use super::proc::{cpu_ticks, status_kb, TICKS};
use super::{Opts, Row};
use crate::{fake_dgl, TestCluster, WS};

/// The workload: servers wait to be stopped; each trainer prints what `argv[1]` says.
const WORKLOAD: &str = r#"
import os, sys, time
if os.environ.get("DGL_ROLE") == "server":
    time.sleep(3600)
mode = sys.argv[1]
if mode == "bulk":
    n, w = int(sys.argv[2]), int(sys.argv[3])
    line = "x" * (w - 1) + "\n"
    for i in range(0, n, 1000):
        k = min(1000, n - i)
        sys.stdout.write(line * k)
        sys.stderr.write(line * k)
    sys.stdout.flush()
    sys.stderr.flush()
elif mode == "stamps":
    n, gap = int(sys.argv[2]), float(sys.argv[3])
    for i in range(n):
        print(f"t {time.time_ns()}", flush=True)
        time.sleep(gap)
elif mode == "rate":
    rate, secs = int(sys.argv[2]), float(sys.argv[3])
    per = rate // 100
    line = "y" * 99 + "\n"
    t0 = time.monotonic()
    for tick in range(int(secs * 100)):
        sys.stdout.write(line * per)
        sys.stdout.flush()
        d = t0 + (tick + 1) / 100 - time.monotonic()
        if d > 0:
            time.sleep(d)
"#;

fn cluster(n: usize) -> TestCluster {
    let c = TestCluster::start(n);
    let ip_config = std::fs::read(c.ip_config_file()).unwrap_or_default();
    for i in 0..c.len() {
        fake_dgl::write_workspace(c.root(i), &ip_config, c.len());
        let _ = std::fs::write(c.root(i).join(WS).join("logbench.py"), WORKLOAD);
    }
    c
}

fn coord(c: &TestCluster, args: &[&str]) -> Command {
    let mut cmd = c.coord();
    cmd.args(args).arg("--ip_config").arg(c.ip_config_file());
    cmd
}

/// Runs `launch` of the workload with `args` to its end; returns the job's id.
fn launch(c: &TestCluster, args: &str) -> Result<String> {
    let out = c
        .launch_direct("1", &[], &format!("python3 logbench.py {args}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("launch")?;
    ensure!(out.success(), "launch of {args}: {out:?}");
    newest_job(c)
}

fn newest_job(c: &TestCluster) -> Result<String> {
    let out = coord(c, &["jobs", "--json"]).output().context("jobs")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["jobs"][0]["job_id"]
        .as_str()
        .map(str::to_string)
        .context("no job listed")
}

/// MiB/s of `dgl-coord logs` of a finished job of `mib` MiB over 4 hosts.
fn throughput(opts: &Opts, mib: u64) -> Result<Vec<f64>> {
    let c = cluster(4);
    // 4 hosts x stdout and stderr of one trainer, 1000-byte lines.
    let lines = (mib << 20) / (4 * 2 * 1000);
    let job = launch(&c, &format!("bulk {lines} 1000"))?;
    let bytes = (lines * 4 * 2 * 1000) as f64;
    let mut out = Vec::new();
    for _ in 0..opts.reps {
        let t = Instant::now();
        let st = coord(&c, &["logs", &job])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        ensure!(st.success(), "logs: {st:?}");
        out.push(bytes / (1 << 20) as f64 / t.elapsed().as_secs_f64());
    }
    Ok(out)
}

/// Milliseconds from each line's write (its own timestamp) to `logs --follow` printing it.
fn follow_latency(n: usize) -> Result<Vec<f64>> {
    let c = cluster(1);
    let mut job = c
        .launch_direct("1", &[], &format!("python3 logbench.py stamps {n} 0.02"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        if let Ok(id) = newest_job(&c) {
            break id;
        }
        ensure!(Instant::now() < deadline, "no job listed");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut follow = coord(&c, &["logs", &id, "--follow", "--stream", "stdout"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = follow.stdout.take().context("stdout")?;
    let mut lat = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as f64;
        let line = line?;
        if let Some(t) = line
            .rsplit_once("] t ")
            .and_then(|(_, t)| t.parse::<f64>().ok())
        {
            lat.push((now - t) / 1e6);
        }
    }
    let _ = follow.wait();
    let _ = job.wait();
    // The first lines were written before the follow began: they measure its start.
    let skip = lat.len().min(10);
    Ok(lat.split_off(skip))
}

/// The agent's CPU (% of one core) and peak RSS (MiB) while a job prints `rate` lines/s.
fn cost(rate: u64, secs: f64) -> Result<(f64, f64, f64)> {
    let c = cluster(1);
    let pid = c.agents[0].pid().context("agent pid")?;
    let before = cpu_ticks(pid).context("agent cpu")?;
    let t = Instant::now();
    let id = launch(&c, &format!("rate {rate} {secs}"))?;
    let wall = t.elapsed().as_secs_f64();
    let ticks = cpu_ticks(pid).context("agent cpu")? - before;
    let hwm = status_kb(pid, "VmHWM").unwrap_or(0) as f64 / (1 << 20) as f64;
    let out = coord(&c, &["jobs", "--json"]).output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let lost = v["jobs"][0]["hosts"][0]["lost_lines"]
        .as_f64()
        .unwrap_or(0.0);
    ensure!(v["jobs"][0]["job_id"] == id.as_str(), "job listed");
    Ok((ticks as f64 / TICKS / wall * 100.0, hwm, lost))
}

/// The rows of the `logs` section; `mib` is the finished job's output.
pub fn run(opts: &Opts, mib: u64, rate: u64) -> Result<Vec<Row>> {
    let mut rows = vec![match throughput(opts, mib) {
        Ok(s) => Row::new(
            format!("logs: `dgl-coord logs` of {mib} MiB on 4 hosts"),
            "MiB/s",
            &s,
            "",
            None,
        ),
        Err(e) => Row::error("logs: throughput", &e),
    }];
    let under_100: &dyn Fn(f64) -> bool = &|ms| ms < 100.0;
    rows.push(match follow_latency(60 + 40 * opts.reps) {
        Ok(s) => Row::new(
            "logs: --follow, line written -> printed",
            "ms",
            &s,
            "< 100",
            Some(under_100),
        ),
        Err(e) => Row::error("logs: follow latency", &e),
    });
    let secs = 5.0;
    match cost(rate, secs) {
        Ok((cpu, rss, lost)) => {
            rows.push(Row::new(
                format!("logs: agent CPU, job printing {rate} lines/s"),
                "% core",
                &[cpu],
                "",
                None,
            ));
            rows.push(Row::new(
                format!("logs: agent peak RSS, job printing {rate} lines/s"),
                "MiB",
                &[rss],
                "",
                None,
            ));
            rows.push(Row::new(
                format!("logs: lines not kept at {rate} lines/s"),
                "lines",
                &[lost],
                "",
                None,
            ));
        }
        Err(e) => rows.push(Row::error("logs: agent cost", &e)),
    }
    Ok(rows)
}
