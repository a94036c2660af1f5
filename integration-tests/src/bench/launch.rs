//! Launch and teardown: `dgl-coord launch` on 4 agents x (1 server + 2 trainers), against the
//! same processes started the way DGL's launch.py does it (one `ssh` per process, concurrently,
//! `cd WS; (export K=V ...; CMD)`) through the loopback sshd.
//!
//! "Running" is measured the same way on both sides: every process's first action writes the
//! wall-clock time into `marks/` of its workspace; the figure is the latest mark minus the
//! instant the launcher was started.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::sshd::Sshd;
use super::{now_epoch, run_lines, Opts, Row};
use crate::TestCluster;

const MARK_SH: &str = r#"#!/bin/bash
# First action: record the wall-clock start (bash builtin, no fork). Servers hold longer than
# trainers, as DGL servers outlive their trainers.
echo "$EPOCHREALTIME" > "marks/${DGL_ROLE:-x}-$$"
if [ "$DGL_ROLE" = server ]; then exec sleep 3; fi
exec sleep "${1:-0.3}"
"#;

const MARK_PY: &str = r#"import os, sys, time
t = time.time()
with open("marks/%s-%d" % (os.environ.get("DGL_ROLE", "x"), os.getpid()), "w") as f:
    f.write(repr(t))
time.sleep(3.0 if os.environ.get("DGL_ROLE") == "server" else float(sys.argv[1]))
"#;

const HOSTS: usize = 4;
const TRAINERS: usize = 2;

#[derive(Clone, Copy, PartialEq)]
pub enum Mode {
    Direct,
    Torchrun,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Torchrun => "torchrun",
        }
    }
    fn command(self) -> &'static str {
        match self {
            Mode::Direct => "bash code/mark.sh 0.3",
            Mode::Torchrun => "python3 code/mark.py 0.3",
        }
    }
}

struct Setup {
    cluster: TestCluster,
    /// The ssh baseline's per-host workspaces.
    ssh_ws: Vec<PathBuf>,
    _ssh_dir: tempfile::TempDir,
}

fn write_ws(ws: &Path, ip_config: &Path) -> Result<()> {
    fs::create_dir_all(ws.join("code"))?;
    fs::create_dir_all(ws.join("marks"))?;
    fs::copy(ip_config, ws.join("ip_config.txt"))?;
    crate::gen_partitions(&ws.join("data"), HOSTS, 1024, "bench")?;
    fs::write(ws.join("code/mark.sh"), MARK_SH)?;
    fs::write(ws.join("code/mark.py"), MARK_PY)?;
    fs::copy(
        crate::fixtures_dir().join("fake_dgl.py"),
        ws.join("code/train_dist.py"),
    )?;
    Ok(())
}

fn setup() -> Result<Setup> {
    let cluster = TestCluster::start(HOSTS);
    let port = 31000 + rand::random_range(0u16..2000);
    // In the coordinator's cwd (cluster.local()), passed relative, as DGL users do.
    let ip_config = cluster.ip_config_file_with_port(port);
    for i in 0..HOSTS {
        write_ws(&cluster.root(i).join("ws"), &ip_config)?;
    }
    let ssh_dir = tempfile::tempdir()?;
    let mut ssh_ws = Vec::new();
    for i in 0..HOSTS {
        let ws = ssh_dir.path().join(format!("host{i}/ws"));
        write_ws(&ws, &ip_config)?;
        ssh_ws.push(ws);
    }
    Ok(Setup {
        cluster,
        ssh_ws,
        _ssh_dir: ssh_dir,
    })
}

fn launch_cmd(s: &Setup, mode: Mode, command: &str, extra: &[&str]) -> Command {
    let mut c = s.cluster.coord();
    c.env("PYTHONPATH", crate::fixtures_dir().join("pythonpath"))
        .args([
            "launch",
            "--workspace",
            "ws",
            "--num_servers",
            "1",
            "--num_trainers",
            "2",
            "--part_config",
            "data/bench.json",
            "--trainer-mode",
            mode.name(),
            "--grace",
            "2",
        ])
        .args(["--ip_config", "ip_config.txt"])
        .args(extra)
        .arg(command);
    match fs::File::create(s.cluster.local().join("coord.err")) {
        Ok(f) => c.stderr(f),
        Err(_) => c.stderr(Stdio::null()),
    };
    c
}

/// Keeps the logs of a failed run (agents' and dgl-coord's stderr) in /tmp; returns where.
fn save_logs(s: &Setup, what: &str) -> String {
    let dir = Path::new("/tmp").join(format!(
        "dglrun-bench-failure-{}-{}",
        std::process::id(),
        rand::random_range(0u32..1_000_000)
    ));
    let _ = fs::create_dir_all(&dir);
    for i in 0..HOSTS {
        let _ = fs::write(dir.join(format!("agent{i}.log")), s.cluster.agent_log(i));
    }
    let _ = fs::copy(s.cluster.local().join("coord.err"), dir.join("coord.err"));
    let _ = fs::write(dir.join("what.txt"), what);
    dir.display().to_string()
}

fn clear_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::create_dir_all(dir)?;
    Ok(())
}

/// Waits (bounded) for `n` marks across `dirs`; returns the latest.
fn latest_mark(dirs: &[PathBuf], n: usize, timeout: Duration) -> Result<f64> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut marks = Vec::new();
        for d in dirs {
            for e in fs::read_dir(d)?.flatten() {
                let text = fs::read_to_string(e.path()).unwrap_or_default();
                if let Ok(t) = text.trim().replace(',', ".").parse::<f64>() {
                    marks.push(t);
                }
            }
        }
        if marks.len() >= n {
            return Ok(marks.iter().copied().fold(f64::MIN, f64::max));
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} processes wrote their start mark",
                marks.len()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One `dgl-coord launch`: (seconds until every process ran, summary all_started_ms).
fn dglrun_once(s: &Setup, mode: Mode) -> Result<(f64, f64)> {
    let marks: Vec<PathBuf> = (0..HOSTS)
        .map(|i| s.cluster.root(i).join("ws/marks"))
        .collect();
    for d in &marks {
        clear_dir(d)?;
    }
    let mut summary = Value::Null;
    let t0 = now_epoch();
    let cmd = launch_cmd(s, mode, mode.command(), &["--json"]);
    let (st, _) = run_lines(cmd, Duration::from_secs(60), |_, line| {
        if let Ok(v) = serde_json::from_str::<Value>(line) {
            if v["event"] == "summary" {
                summary = v;
            }
        }
    })?;
    ensure!(st.success(), "dgl-coord launch failed: {summary}");
    let last = latest_mark(&marks, HOSTS * (1 + TRAINERS), Duration::from_secs(5))?;
    let started_ms = summary["all_started_ms"].as_f64().unwrap_or(f64::NAN);
    Ok((last - t0, started_ms / 1000.0))
}

/// The processes of the plan as launch.py runs them: one ssh per planned process, or (floor,
/// no launcher at all) one local `sh -c` per process with the same command line.
fn ssh_commands(s: &Setup, mode: Mode, sshd: Option<&Sshd>) -> Result<Vec<Command>> {
    let out = launch_cmd(s, mode, mode.command(), &["--dry-run", "--json"]).output()?;
    ensure!(out.status.success(), "dgl-coord launch --dry-run failed");
    let plan: Value = serde_json::from_slice(&out.stdout).context("dry-run JSON")?;
    let port = super::free_port()?.to_string();
    let mut cmds = Vec::new();
    for p in plan["processes"].as_array().context("plan processes")? {
        let m = p["machine"].as_u64().context("machine")? as usize;
        let ws = s.ssh_ws.get(m).context("machine index")?;
        let cmd = if let Some(sh) = p["command"]["shell"].as_str() {
            sh.replace("<PORT>", &port)
        } else {
            p["command"]["argv"]
                .as_array()
                .context("argv")?
                .iter()
                .map(|a| shell_quote(a.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let env = p["env"]
            .as_object()
            .context("env")?
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    shell_quote(&v.as_str().unwrap_or_default().replace("<PORT>", &port))
                )
            })
            .collect::<Vec<_>>()
            .join(" ");
        let mut c = match sshd {
            Some(sshd) => sshd.ssh(),
            None => {
                let mut c = Command::new("sh");
                c.arg("-c");
                c
            }
        };
        c.arg(format!(
            "cd {}; (export {env}; {cmd})",
            shell_quote(&ws.display().to_string())
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        cmds.push(c);
    }
    Ok(cmds)
}

fn shell_quote(w: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !w.is_empty() && w.chars().all(safe) {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

fn wait_all(children: &mut [Child], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for c in children.iter_mut() {
        loop {
            if c.try_wait()?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("ssh did not finish in {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

fn ssh_once(s: &Setup, mode: Mode, sshd: Option<&Sshd>) -> Result<f64> {
    let marks: Vec<PathBuf> = s.ssh_ws.iter().map(|w| w.join("marks")).collect();
    for d in &marks {
        clear_dir(d)?;
    }
    let mut cmds = ssh_commands(s, mode, sshd)?;
    let t0 = now_epoch();
    let mut children = Vec::new();
    for c in &mut cmds {
        children.push(c.spawn().context("spawn ssh")?);
    }
    let last = latest_mark(&marks, HOSTS * (1 + TRAINERS), Duration::from_secs(60));
    wait_all(&mut children, Duration::from_secs(60))?;
    Ok(last? - t0)
}

/// Teardown: a trainer fails (fake_dgl `--fail-rank 5`); seconds from its failure (its
/// `exited` event reaching the benchmark, or its "failing on purpose" line if earlier) until
/// every recorded pid on every host is gone; and the summary's teardown_ms.
fn teardown_once(s: &Setup, mode: Mode) -> Result<(f64, f64)> {
    let records: Vec<PathBuf> = (0..HOSTS)
        .map(|i| s.cluster.root(i).join("ws/records"))
        .collect();
    for d in &records {
        clear_dir(d)?;
    }
    let (fail_tx, fail_rx) = std::sync::mpsc::channel::<Instant>();
    let mut summary = Value::Null;
    let cmd = launch_cmd(
        s,
        mode,
        "python3 code/train_dist.py --graph-name bench --fail-rank 5 --connect-timeout 20",
        &["--json"],
    );
    let records2 = records.clone();
    let gone = std::thread::scope(|scope| -> Result<f64> {
        let poller = scope.spawn(move || -> Result<f64> {
            let t_fail = fail_rx
                .recv_timeout(Duration::from_secs(60))
                .context("no failure seen")?;
            let pids = record_pids(&records2)?;
            ensure!(!pids.is_empty(), "no process records");
            let deadline = t_fail + Duration::from_secs(30);
            loop {
                if pids.iter().all(|&p| !crate::alive(p)) {
                    return Ok(t_fail.elapsed().as_secs_f64());
                }
                if Instant::now() > deadline {
                    bail!("processes still alive 30 s after the failure");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let mut sent = false;
        let res = run_lines(cmd, Duration::from_secs(90), |t, line| {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                return;
            };
            let failing = (v["event"] == "exited" && v["failed"] == true)
                || (v["event"] == "line"
                    && v["text"]
                        .as_str()
                        .is_some_and(|x| x.contains("failing on purpose")));
            if failing && !sent {
                sent = true;
                let _ = fail_tx.send(t);
            }
            if v["event"] == "summary" {
                summary = v;
            }
        });
        drop(fail_tx);
        let gone = poller
            .join()
            .map_err(|_| anyhow::anyhow!("poller panicked"))?;
        let (st, _) = res?;
        ensure!(!st.success(), "the job was expected to fail");
        // No failing trainer seen: say why dgl-coord ended instead.
        gone.with_context(|| format!("dgl-coord: {}", summary["error"]))
    })?;
    let td = summary["teardown_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0;
    Ok((gone, td))
}

fn record_pids(dirs: &[PathBuf]) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for d in dirs {
        for e in fs::read_dir(d)?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let v: Value = serde_json::from_slice(&fs::read(e.path())?)
                .with_context(|| format!("record {name}"))?;
            if let Some(p) = v["pid"].as_u64() {
                pids.push(p as u32);
            }
        }
    }
    Ok(pids)
}

/// All launch and teardown figures.
pub fn run(
    opts: &Opts,
    with_launch: bool,
    with_ssh: bool,
    with_teardown: bool,
) -> Result<Vec<Row>> {
    // A fresh set of agents for each section: every section starts from idle agents.
    let sshd = if with_ssh { Some(Sshd::start()?) } else { None };
    let mut rows = Vec::new();
    let launch_modes: &[Mode] = if with_launch {
        &[Mode::Direct, Mode::Torchrun]
    } else {
        &[]
    };
    for &mode in launch_modes {
        let s = setup()?;
        let (mut run, mut started, mut ssh, mut floor) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut failures = Vec::new();
        for rep in 0..opts.reps {
            let (r, st) = match dglrun_once(&s, mode) {
                Ok(x) => x,
                Err(e) => {
                    failures.push(failed(&s, "launch", mode, rep, &e));
                    continue;
                }
            };
            run.push(r);
            started.push(st);
            if let Some(sshd) = &sshd {
                ssh.push(
                    ssh_once(&s, mode, Some(sshd))
                        .with_context(|| format!("ssh {}", mode.name()))?,
                );
            }
            floor.push(ssh_once(&s, mode, None).with_context(|| format!("local {}", mode.name()))?);
            eprintln!(
                "bench launch {} rep {rep}: dglrun {:.3}s (all started {:.3}s), no launcher {:.3}s{}",
                mode.name(),
                r,
                st,
                floor.last().copied().unwrap_or(f64::NAN),
                ssh.last()
                    .map(|x| format!(", ssh {x:.3}s"))
                    .unwrap_or_default()
            );
        }
        let name = mode.name();
        rows.extend(failures_row("launch", mode, &failures));
        let ms: Vec<f64> = run.iter().map(|x| x * 1000.0).collect();
        let started_ms: Vec<f64> = started.iter().map(|x| x * 1000.0).collect();
        let ssh_ms: Vec<f64> = ssh.iter().map(|x| x * 1000.0).collect();
        let floor_ms: Vec<f64> = floor.iter().map(|x| x * 1000.0).collect();
        if mode == Mode::Direct {
            rows.push(Row::new(
                format!("launch {name}: all 12 running"),
                "ms",
                &ms,
                "<= 100 ms",
                Some(&|x| x <= 100.0),
            ));
        } else {
            rows.push(Row::new(
                format!("launch {name}: all 12 running"),
                "ms",
                &ms,
                "(python + torchrun stand-in)",
                None,
            ));
        }
        rows.push(Row::new(
            format!("launch {name}: coord all_started_ms"),
            "ms",
            &started_ms,
            "",
            None,
        ));
        rows.push(Row::new(
            format!("launch {name}: no launcher (local sh -c)"),
            "ms",
            &floor_ms,
            "floor",
            None,
        ));
        // In torchrun mode the floor is torchrun itself: what matters is what the launcher
        // adds on top of it, for dglrun and for ssh alike.
        let over = |v: &[f64]| {
            v.iter()
                .zip(&floor_ms)
                .map(|(d, f)| d - f)
                .collect::<Vec<_>>()
        };
        let dglrun_over = over(&ms);
        let (target, check): (&str, Option<&dyn Fn(f64) -> bool>) = match mode {
            Mode::Direct => ("", None),
            Mode::Torchrun => (
                "<= 100 ms (adds nothing to torchrun)",
                Some(&|x| x <= 100.0),
            ),
        };
        rows.push(Row::new(
            format!("launch {name}: dglrun - floor"),
            "ms",
            &dglrun_over,
            target,
            check,
        ));
        if !ssh.is_empty() {
            rows.push(Row::new(
                format!("launch {name}: ssh (launch.py style)"),
                "ms",
                &ssh_ms,
                "baseline",
                None,
            ));
            let ratios: Vec<f64> = ssh.iter().zip(&run).map(|(s, d)| s / d).collect();
            let (target, check): (&str, Option<&dyn Fn(f64) -> bool>) = match mode {
                Mode::Direct => (">= 10x", Some(&|x| x >= 10.0)),
                // Bounded by torchrun's own start, which both launchers pay.
                Mode::Torchrun => ("", None),
            };
            rows.push(Row::new(
                format!("launch {name}: ssh / dglrun"),
                "x",
                &ratios,
                target,
                check,
            ));
            let ratios: Vec<f64> = over(&ssh_ms)
                .iter()
                .zip(&dglrun_over)
                .map(|(s, d)| s / d.max(1.0))
                .collect();
            rows.push(Row::new(
                format!("launch {name}: launcher cost, ssh / dglrun (above floor)"),
                "x",
                &ratios,
                ">= 10x",
                Some(&|x| x >= 10.0),
            ));
        }
    }
    if with_teardown {
        for mode in [Mode::Direct, Mode::Torchrun] {
            let s = setup()?;
            let (mut gone, mut td, mut failures) = (Vec::new(), Vec::new(), Vec::new());
            for rep in 0..opts.reps {
                match teardown_once(&s, mode) {
                    Ok((g, t)) => {
                        eprintln!(
                            "bench teardown {} rep {rep}: all gone {:.3}s after the failure (coord teardown_ms {:.3}s)",
                            mode.name(),
                            g,
                            t
                        );
                        gone.push(g * 1000.0);
                        td.push(t * 1000.0);
                    }
                    Err(e) => failures.push(failed(&s, "teardown", mode, rep, &e)),
                }
            }
            rows.extend(failures_row("teardown", mode, &failures));
            if !gone.is_empty() {
                rows.push(Row::new(
                    format!("teardown {}: failure -> all gone", mode.name()),
                    "ms",
                    &gone,
                    "<= 1000 ms",
                    Some(&|x| x <= 1000.0),
                ));
                rows.push(Row::new(
                    format!("teardown {}: coord teardown_ms", mode.name()),
                    "ms",
                    &td,
                    "",
                    None,
                ));
            }
        }
    }
    Ok(rows)
}

/// Reports a failed repetition of `what` and keeps its logs; returns the error to count.
fn failed(s: &Setup, what: &str, mode: Mode, rep: usize, e: &anyhow::Error) -> anyhow::Error {
    let logs = save_logs(s, &format!("{e:#}"));
    eprintln!(
        "bench {what} {} rep {rep}: FAILED: {e:#} (logs in {logs})",
        mode.name()
    );
    anyhow::anyhow!("{e:#} (logs in {logs})")
}

/// The "failed runs" row of `what`, when any repetition failed.
fn failures_row(what: &str, mode: Mode, failures: &[anyhow::Error]) -> Option<Row> {
    let first = failures.first()?;
    let mut r = Row::new(
        format!("{what} {}: failed runs", mode.name()),
        "",
        &[failures.len() as f64],
        "0",
        Some(&|x| x == 0.0),
    );
    r.target = format!("0 (first: {})", short(first));
    Some(r)
}

fn short(e: &anyhow::Error) -> String {
    let m = format!("{e:#}").replace('\n', " ");
    if m.chars().count() > 70 {
        m.chars().take(67).collect::<String>() + "..."
    } else {
        m
    }
}
