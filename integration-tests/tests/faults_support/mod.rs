//! Helpers of the fault tests: workspaces on the namespace hosts, a dgl-coord run whose output
//! is followed line by line, the records of `fake_dgl.py`, and the figures line.

#![allow(dead_code)]

pub mod proxy;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dglrun_integration_tests::netns::NetCluster;
use dglrun_integration_tests::{alive, fake_dgl, list_files, pids_with_env, sha256_file, WS};
use serde_json::Value;

pub const LEASE: Duration = Duration::from_secs(3);
pub const GRACE: Duration = Duration::from_secs(1);
/// Scan rounds, process start-up and the 2-core machine shared with other builds.
pub const SLACK: Duration = Duration::from_secs(3);
pub const AGENT_FLAGS: &[&str] = &["--lease-timeout", "3", "--grace", "1"];

/// Every host gets the workspace a `dgl-coord copy` would leave: script, ip_config (the
/// hosts' namespace addresses) and a partition set.
pub fn setup_workspaces(c: &NetCluster) {
    let ip_config = std::fs::read(c.ip_config_file(30050)).expect("ip_config");
    for i in 0..c.len() {
        fake_dgl::write_workspace(c.root(i), &ip_config, c.len());
    }
}

/// `dgl-coord launch` of `command` on the cluster: one server per host, direct trainers,
/// the tests' lease and grace.
pub fn launch(c: &NetCluster, flags: &[&str], command: &str) -> Command {
    let mut all = vec!["--trainer-mode", "direct", "--lease-timeout", "3"];
    all.extend_from_slice(flags);
    fake_dgl::launch(c.coord(), &all, command)
}

/// Starts a job hanging on every host of `c` (a server, and a trainer with a sampler; with
/// `setsid`, each trainer also forks a grandchild in its own session that ignores SIGTERM) and
/// returns once all of it runs: the running dgl-coord and the job's id.
pub fn hanging_job(c: &NetCluster, setsid: bool) -> (Coord, String) {
    setup_workspaces(c);
    let command = if setsid {
        "python3 fake_dgl.py --hang --samplers --spawn-setsid-child"
    } else {
        "python3 fake_dgl.py --hang --samplers"
    };
    let mut coord = Coord::start(launch(
        c,
        &["--num_trainers", "1", "--num_samplers", "1"],
        command,
    ));
    coord.wait_for("hanging", 3);
    let job = job_id(c);
    (coord, job)
}

/// A script printing `tick <i> of <n>` every 0.1 s, `n` times.
pub fn tick_script(n: usize) -> String {
    format!(
        "import time\nfor i in range({n}):\n    print(f'tick {{i}} of {n}', flush=True)\n    time.sleep(0.1)\n"
    )
}

#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// A running dgl-coord whose output lines are collected as they come.
pub struct Coord {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Coord {
    pub fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dgl-coord");
        let (tx, lines) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let readers = vec![
            follow(out, stdout.clone(), tx.clone()),
            follow(err, stderr.clone(), tx),
        ];
        Self {
            child,
            lines,
            stdout,
            stderr,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for `n` lines containing `marker` (60 s at most; panics with the output).
    pub fn wait_for(&mut self, marker: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = 0;
        while seen < n {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) if l.contains(marker) => seen += 1,
                Ok(_) => {}
                Err(_) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!(
                        "saw {seen} of {n} `{marker}` lines; stdout:\n{}\nstderr:\n{}",
                        text(&self.stdout),
                        text(&self.stderr)
                    );
                }
            }
        }
    }

    /// SIGKILL: no goodbye to the agents.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the exit; a run still going after `timeout` is killed and fails the test.
    pub fn wait(mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                break Some(st);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let f = Finished {
            code: status.and_then(|s| s.code()),
            stdout: text(&self.stdout),
            stderr: text(&self.stderr),
        };
        assert!(
            status.is_some(),
            "dgl-coord did not finish in {timeout:?}: {f:?}"
        );
        f
    }
}

fn text(s: &Arc<Mutex<String>>) -> String {
    s.lock().map(|s| s.clone()).unwrap_or_default()
}

fn follow(
    r: impl std::io::Read + Send + 'static,
    all: Arc<Mutex<String>>,
    tx: mpsc::Sender<String>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if let Ok(mut a) = all.lock() {
                a.push_str(&line);
                a.push('\n');
            }
            let _ = tx.send(line);
        }
    })
}

#[derive(Debug, Clone)]
pub struct Record {
    pub host: usize,
    pub role: String,
    pub pid: u32,
    pub pgid: i64,
    pub job: String,
}

/// The records every process of fake_dgl.py wrote.
pub fn records(c: &NetCluster) -> Vec<Record> {
    let mut out = Vec::new();
    for host in 0..c.len() {
        for (_, v) in fake_dgl::records(c.root(host)) {
            out.push(Record {
                host,
                role: v["role"].as_str().unwrap_or_default().to_string(),
                pid: v["pid"].as_u64().expect("pid") as u32,
                pgid: v["pgid"].as_i64().unwrap_or(-1),
                job: v["env"]["DGLRUN_JOB_ID"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            });
        }
    }
    out
}

/// Pids from `<kind>-<pid>.pid` files on `host` (samplers, setsid grandchildren).
pub fn pid_files(c: &NetCluster, host: usize, kind: &str) -> Vec<u32> {
    fake_dgl::pid_files(c.root(host), kind)
}

/// The id of the (one) job the records belong to.
pub fn job_id(c: &NetCluster) -> String {
    let recs = records(c);
    let job = recs.first().map(|r| r.job.clone()).unwrap_or_default();
    assert!(!job.is_empty(), "no records: {recs:?}");
    assert!(recs.iter().all(|r| r.job == job), "one job: {recs:?}");
    job
}

/// Every process of `job` on `host` (or on every host): recorded pids, every process still in a
/// recorded process group, sampler and grandchild pid files, and the live processes carrying
/// the job's marker whose agent root is that host's.
pub fn job_pids(c: &NetCluster, job: &str, host: Option<usize>) -> Vec<u32> {
    let hosts: Vec<usize> = match host {
        Some(h) => vec![h],
        None => (0..c.len()).collect(),
    };
    let recs = records(c);
    let mut out = Vec::new();
    for h in hosts {
        out.extend(recs.iter().filter(|r| r.host == h).map(|r| r.pid));
        let groups: Vec<i64> = recs
            .iter()
            .filter(|r| r.host == h && r.pgid > 1)
            .map(|r| r.pgid)
            .collect();
        out.extend(in_groups(&groups));
        out.extend(pid_files(c, h, "sampler"));
        out.extend(pid_files(c, h, "grandchild"));
        let root = c.root(h).canonicalize().expect("root");
        let of_host = pids_with_env("DGLRUN_AGENT", &root.display().to_string());
        out.extend(
            pids_with_env("DGLRUN_JOB_ID", job)
                .into_iter()
                .filter(|p| of_host.contains(p)),
        );
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Live processes whose process group is one of `groups`.
fn in_groups(groups: &[i64]) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let (_, rest) = s.rsplit_once(')')?;
                    rest.split_whitespace().nth(2)?.parse::<i64>().ok()
                })
                .is_some_and(|g| groups.contains(&g))
        })
        .filter(|&p| alive(p))
        .collect()
}

/// Those of `pids` still alive.
pub fn live(pids: &[u32]) -> Vec<u32> {
    pids.iter().copied().filter(|&p| alive(p)).collect()
}

/// The closing note's figures for one fault.
pub fn print_figures(fault: &str, clean_after: Duration, processes_left: usize, bytes_lost: usize) {
    eprintln!(
        "FIGURES | {fault} | time to clean state {} ms | processes left {processes_left} | \
         bytes lost or corrupted {bytes_lost}",
        clean_after.as_millis()
    );
}

/// `dgl-coord copy --json` of `part_config` to the machines of `ip_config` (workspace `ws`,
/// data under `data`), plus `extra` flags.
pub fn copy_cmd(c: &NetCluster, ip_config: &Path, part_config: &Path, extra: &[&str]) -> Command {
    let mut cmd = c.coord();
    cmd.env("XDG_CACHE_HOME", c.dir.path().join("cache"))
        .args(["copy", "--json", "--progress", "plain", "--workspace", WS])
        .args(["--rel_data_path", "data", "--part_config"])
        .arg(part_config)
        .arg("--ip_config")
        .arg(ip_config)
        .args(extra);
    cmd
}

/// How machine `i`'s partition files compare with their sources, by SHA-256.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub files: usize,
    /// Bytes of files that are not there (not delivered).
    pub missing: u64,
    /// Bytes of files that are there but differ (corrupted).
    pub corrupted: u64,
}

pub fn delivery(c: &NetCluster, i: usize, part_config: &Path) -> Delivery {
    let src_dir = part_config
        .parent()
        .expect("part_config dir")
        .join(format!("part{i}"));
    let dst_dir = c.root(i).join(WS).join("data").join(format!("part{i}"));
    let mut d = Delivery::default();
    for rel in list_files(&src_dir) {
        let (src, dst) = (src_dir.join(&rel), dst_dir.join(&rel));
        let len = std::fs::metadata(&src).map(|m| m.len()).unwrap_or(0);
        d.files += 1;
        if !dst.is_file() {
            d.missing += len;
        } else if sha256_file(&src) != sha256_file(&dst) {
            d.corrupted += len;
        }
    }
    d
}

/// Partials under host `i`'s `ws/data` that hold anything but a prefix of their source file
/// (a partial `.<name>.dglrun-partial` stands for `<name>` in the same directory).
pub fn partials_not_prefix_of_source(c: &NetCluster, i: usize, part_config: &Path) -> Vec<PathBuf> {
    let data = c.root(i).join(WS).join("data");
    let src_dir = part_config.parent().expect("part_config dir");
    partials(c, i)
        .into_iter()
        .filter(|p| {
            let (Ok(rel), Some(name)) = (p.strip_prefix(&data), p.file_name()) else {
                return false;
            };
            let name = name.to_string_lossy();
            let target = name
                .strip_prefix('.')
                .and_then(|n| n.strip_suffix(".dglrun-partial"))
                .unwrap_or(&name);
            let src = src_dir.join(rel.with_file_name(target));
            let (got, want) = (
                std::fs::read(p).unwrap_or_default(),
                std::fs::read(src).unwrap_or_default(),
            );
            got.len() > want.len() || got[..] != want[..got.len()]
        })
        .collect()
}

/// Partial files (`.<name>.dglrun-partial`) under host `i`'s workspace.
pub fn partials(c: &NetCluster, i: usize) -> Vec<PathBuf> {
    let ws = c.root(i).join(WS);
    list_files(&ws)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".dglrun-partial"))
        .map(|p| ws.join(p))
        .collect()
}

/// The JSON report of a finished copy.
pub fn report(f: &Finished) -> Value {
    serde_json::from_str(&f.stdout).unwrap_or(Value::Null)
}
