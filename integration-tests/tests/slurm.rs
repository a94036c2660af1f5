//! The Slurm recipe (`deploy/slurm/dglrun.sbatch`) on a real Slurm cluster of 3 nodes, each a
//! separate host (`slurm` harness: Debian's slurmctld, slurmd and munge, every node in its own
//! network and UTS namespace). The jobs run the stand-in DGL workload (`fixtures/fake_dgl.py`
//! under the stand-in torchrun) with this build's `dgl-agent` and `dgl-coord`.
//!
//! Starting the cluster costs a few seconds and each job holds every node, so the scenarios
//! share one cluster and run in order in one test; each is reported on its own, and all run
//! even when one fails. Each prints a `FIGURES` line.

// Test code throughout: a failed unwrap is a failed test, and a test may sleep.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use dglrun_integration_tests::run::run;
use dglrun_integration_tests::slurm::{start_or_skip, JobEnd, SlurmCluster};
use dglrun_integration_tests::{
    bin, fixtures_dir, gen_partitions, list_files, repo_dir, sha256_file, wait_gone, WS,
};
use serde_json::Value;

const NODES: usize = 3;
const AGENT_PORT: u16 = 47001;
const TRAIN: &str = "python3 code/fake_dgl.py --graph-name g --ip_config ip_config.txt";
/// A job's longest honest run here (the time-limit job waits up to 40 s for its signal).
const JOB_TIMEOUT: Duration = Duration::from_secs(120);

struct Setup {
    c: SlurmCluster,
    dir: tempfile::TempDir,
}

/// One submission of the recipe.
struct Job<'a> {
    /// Names the records directory in each node's workspace (`records-<tag>`).
    tag: &'a str,
    sbatch_args: &'a [&'a str],
    env: &'a [(&'a str, &'a str)],
    train: String,
}

impl Setup {
    fn new(c: SlurmCluster) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let s = Self { c, dir };
        gen_partitions(&s.dir.path().join("out"), NODES, 4096, "g").expect("partitions");
        fs::create_dir_all(s.code()).unwrap();
        fs::copy(
            fixtures_dir().join("fake_dgl.py"),
            s.code().join("fake_dgl.py"),
        )
        .unwrap();
        s
    }

    fn code(&self) -> PathBuf {
        self.dir.path().join("code")
    }

    fn base(&self) -> PathBuf {
        self.dir.path().join("base")
    }

    /// Node i's agent root (the recipe's `$DGLRUN_ROOT_BASE/<node>`).
    fn root(&self, i: usize) -> PathBuf {
        self.base().join(self.c.node_name(i))
    }

    fn job_dir(&self, id: u32) -> PathBuf {
        self.base().join("jobs").join(id.to_string())
    }

    fn output(&self, id: u32) -> String {
        fs::read_to_string(self.dir.path().join(format!("out-{id}.txt"))).unwrap_or_default()
    }

    /// The environment the recipe reads, and what the workload needs, on `cmd` (sbatch or
    /// salloc pass it on to the batch script, srun to the agents, the agents to DGL).
    fn job_env(&self, cmd: &mut Command, job: &Job) {
        let bin_dir = bin("dgl-agent").parent().unwrap().to_path_buf();
        cmd.current_dir(self.dir.path())
            .env("DGLRUN_BIN_DIR", bin_dir)
            .env(
                "DGLRUN_PART_CONFIG",
                self.dir.path().join("out").join("g.json"),
            )
            .env("DGLRUN_SCRIPT_FOLDER", self.code())
            .env("DGLRUN_ROOT_BASE", self.base())
            .env("DGLRUN_NUM_TRAINERS", "2")
            .env("DGLRUN_AGENT_WAIT", "60")
            .env("DGLRUN_RECORD_DIR", format!("records-{}", job.tag))
            .env("PYTHONPATH", fixtures_dir().join("pythonpath"))
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            .env("RUST_LOG", "info")
            .env_remove("DGL_AGENT_TOKEN")
            .env_remove("DGL_AGENT_TOKEN_FILE")
            .env_remove("OMP_NUM_THREADS");
        if nix::unistd::geteuid().is_root() {
            cmd.env("DGL_AGENT_ALLOW_ROOT", "true");
        }
        cmd.envs(job.env.iter().copied());
    }

    fn submit(&self, job: &Job) -> u32 {
        let mut cmd = self.c.sbatch();
        self.job_env(&mut cmd, job);
        cmd.arg(format!("--nodes={NODES}"))
            .arg(format!("--chdir={}", self.dir.path().display()))
            .arg(format!(
                "--output={}",
                self.dir.path().join("out-%j.txt").display()
            ))
            .args(job.sbatch_args)
            .arg(repo_dir().join("deploy/slurm/dglrun.sbatch"))
            .arg(&job.train);
        self.c.submit(cmd).expect("sbatch")
    }

    fn wait(&self, id: u32) -> JobEnd {
        self.c
            .wait_job(id, JOB_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", self.output(id)))
    }

    /// Waits until `needle` occurs `n` times in the job's output.
    fn wait_output(&self, id: u32, needle: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.output(id).matches(needle).count() < n {
            assert!(
                Instant::now() < deadline,
                "job {id}: {n} times {needle:?} not in its output after {timeout:?}:\n{}\n{}",
                self.output(id),
                self.agent_logs(id)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn agent_log(&self, id: u32, i: usize) -> String {
        fs::read_to_string(
            self.job_dir(id)
                .join(format!("agent-{}.log", self.c.node_name(i))),
        )
        .unwrap_or_default()
    }

    fn agent_logs(&self, id: u32) -> String {
        (0..NODES)
            .map(|i| format!("--- agent {}\n{}", i, self.agent_log(id, i)))
            .collect()
    }

    /// The records the job's DGL processes wrote on node i: (file name, JSON).
    fn records(&self, tag: &str, i: usize) -> Vec<(String, Value)> {
        let dir = self.root(i).join(WS).join(format!("records-{tag}"));
        let mut out: Vec<(String, Value)> = fs::read_dir(&dir)
            .map(|d| d.flatten().collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with('.') || !name.ends_with(".json") {
                    return None;
                }
                let v = serde_json::from_slice(&fs::read(e.path()).ok()?).ok()?;
                Some((name, v))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Every DGL process of the job on every node: the records' pids and the `*.pid` files
    /// of samplers and setsid grandchildren.
    fn dgl_pids(&self, tag: &str) -> Vec<u32> {
        let mut pids = Vec::new();
        for i in 0..NODES {
            pids.extend(
                self.records(tag, i)
                    .iter()
                    .filter_map(|(_, v)| v["pid"].as_u64().map(|p| p as u32)),
            );
            let dir = self.root(i).join(WS).join(format!("records-{tag}"));
            for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().ends_with(".pid") {
                    if let Ok(p) = fs::read_to_string(e.path()) {
                        pids.extend(p.trim().parse::<u32>().ok());
                    }
                }
            }
        }
        pids
    }

    /// Waits until each node runs nothing but its slurmd; returns what is left otherwise.
    fn wait_nodes_clean(&self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left: Vec<String> = (0..NODES)
                .flat_map(|i| {
                    self.c
                        .processes_on_node(i)
                        .into_iter()
                        .filter(|(_, comm)| comm != "slurmd")
                        .map(move |(pid, comm)| format!("n{} {pid} {comm}", i + 1))
                })
                .collect();
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Each node runs exactly one dgl-agent, in the foreground of its srun step: its parent is
    /// the step's slurmstepd, and every DGL process of the node descends from it.
    fn assert_agents_in_their_steps(&self, id: u32, tag: &str) {
        for i in 0..NODES {
            let procs = self.c.processes_on_node(i);
            let agents: Vec<u32> = procs
                .iter()
                .filter(|(_, comm)| comm == "dgl-agent")
                .map(|(p, _)| *p)
                .collect();
            assert_eq!(agents.len(), 1, "job {id}: node {i}: {procs:?}");
            let parent = ppid(agents[0]);
            assert_eq!(
                comm(parent),
                "slurmstepd",
                "job {id}: node {i}: the agent's parent is {parent} {}",
                comm(parent)
            );
            for (name, r) in self.records(tag, i) {
                let pid = r["pid"].as_u64().unwrap() as u32;
                if name.starts_with("trainer") || name.starts_with("server") {
                    assert!(
                        descends_from(pid, agents[0]),
                        "job {id}: node {i}: {name} (pid {pid}) is not under the agent {}",
                        agents[0]
                    );
                }
            }
        }
    }

    /// The checks every job ends with: the clean-up ran, the token is gone, nothing is left.
    fn assert_cleaned_up(&self, id: u32, tag: &str) {
        let out = self.output(id);
        assert!(
            out.contains("dglrun: clean-up done"),
            "job {id}: no clean-up:\n{out}"
        );
        assert!(
            !self.job_dir(id).join("token").exists(),
            "job {id}: the token file is still there"
        );
        let left = wait_gone(&self.dgl_pids(tag), Duration::from_secs(10));
        assert!(left.is_empty(), "job {id}: DGL processes left: {left:?}");
        let left = self.wait_nodes_clean(Duration::from_secs(15));
        assert!(left.is_empty(), "job {id}: left on the nodes: {left:?}");
    }
}

fn stat_field(pid: u32, n: usize) -> String {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: state is field 3, ppid field 4.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(n - 3))
        .unwrap_or_default()
        .to_string()
}

fn ppid(pid: u32) -> u32 {
    stat_field(pid, 4).parse().unwrap_or(0)
}

fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn descends_from(mut pid: u32, ancestor: u32) -> bool {
    while pid > 1 {
        if pid == ancestor {
            return true;
        }
        pid = ppid(pid);
    }
    false
}

/// The copy summary's row of host m: files sent, skipped, failed.
fn copy_row(out: &str, m: usize, ip: std::net::Ipv4Addr) -> Vec<String> {
    let host = format!("m{m} ({ip}:{AGENT_PORT})");
    let row = out
        .lines()
        .find(|l| {
            l.starts_with(&host)
                && l[host.len()..]
                    .split_whitespace()
                    .next()
                    .is_some_and(|w| w.parse::<u64>().is_ok())
        })
        .unwrap_or_else(|| panic!("no copy summary row for {host}:\n{out}"));
    row[host.len()..]
        .split_whitespace()
        .take(3)
        .map(str::to_string)
        .collect()
}

/// How many trainers of host m reached every server.
fn talked(out: &str, m: usize) -> usize {
    out.lines()
        .filter(|l| {
            l.starts_with(&format!("[m{m} trainers] trainer "))
                && l.ends_with(&format!("talked to {NODES} servers"))
        })
        .count()
}

fn train(flags: &str) -> String {
    format!("{TRAIN} {flags}").trim().to_string()
}

/// sbatch of the recipe: copy, then launch, and the job COMPLETES. Every node ran one agent
/// and holds its own partition only; the output file has the labelled lines and the summary.
fn a_job_copies_then_launches_and_completes(s: &Setup) {
    let job = Job {
        tag: "complete",
        sbatch_args: &[],
        env: &[],
        train: train(""),
    };
    let t = Instant::now();
    let id = s.submit(&job);
    let end = s.wait(id);
    let elapsed = t.elapsed();
    let out = s.output(id);
    assert_eq!(
        (end.state.as_str(), end.exit_code),
        ("COMPLETED", 0),
        "{out}\n{}",
        s.agent_logs(id)
    );
    for i in 0..NODES {
        let ip = s.c.node_ip(i);
        assert!(
            out.contains(&format!(
                "[m{i} server0] server {i} listening on {ip}:30050"
            )),
            "{out}"
        );
        assert_eq!(talked(&out, i), 2, "two trainers talked on m{i}:\n{out}");
        assert_eq!(copy_row(&out, i, ip), ["6", "0", "0"], "{out}");
        let summary = format!("m{i} ({ip}:{AGENT_PORT})  trainers");
        assert!(
            out.lines()
                .any(|l| l.starts_with(&summary) && l.contains("exit 0")),
            "no summary row {summary:?}:\n{out}"
        );

        // One agent per node, on the node's own address, with its own root.
        let log = s.agent_log(id, i);
        let listening = format!(
            "dgl-agent listening on {ip}:{AGENT_PORT} root {}",
            s.root(i).display()
        );
        assert_eq!(log.matches(&listening).count(), 1, "node {i}:\n{log}");

        // Its own partition, and nothing of the others'.
        let data = s.root(i).join(WS).join("data");
        let part = format!("part{i}");
        let files: Vec<String> = list_files(&data)
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let want: Vec<String> = std::iter::once("g.json".to_string())
            .chain(
                ["edge_feat.dgl", "graph.dgl", "node_feat.dgl"]
                    .iter()
                    .map(|f| format!("{part}/{f}")),
            )
            .collect();
        assert_eq!(files, want, "node {i}");
        for f in ["graph.dgl", "node_feat.dgl", "edge_feat.dgl"] {
            assert_eq!(
                sha256_file(&data.join(&part).join(f)),
                sha256_file(&s.dir.path().join("out").join(&part).join(f))
            );
        }

        // The DGL processes of node i ran in node i's step of this job.
        let records = s.records(job.tag, i);
        let roles: Vec<&str> = records
            .iter()
            .map(|(_, r)| r["role"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(
            roles.iter().filter(|r| **r == "server").count(),
            1,
            "one server on node {i}: {roles:?}"
        );
        assert_eq!(
            roles.iter().filter(|r| **r == "trainer").count(),
            2,
            "two trainers on node {i}: {roles:?}"
        );
        for (name, r) in &records {
            assert_eq!(
                r["env"]["SLURMD_NODENAME"],
                s.c.node_name(i),
                "{name} on node {i}"
            );
            assert_eq!(r["env"]["SLURM_JOB_ID"], id.to_string(), "{name}");
        }
    }
    assert!(out.contains("exit code 0"), "{out}");
    assert!(
        out.contains("dglrun: training exited with status 0"),
        "{out}"
    );
    s.assert_cleaned_up(id, job.tag);
    println!(
        "FIGURES slurm job: copy + launch, COMPLETED {:.1} s after sbatch",
        elapsed.as_secs_f64()
    );
}

/// A second job on the same nodes sends only the file that changed.
fn a_second_job_recopies_only_what_changed(s: &Setup) {
    let changed = s.dir.path().join("out/part1/graph.dgl");
    let mut bytes = fs::read(&changed).unwrap();
    bytes[0] ^= 0xff;
    fs::write(&changed, bytes).unwrap();
    let job = Job {
        tag: "again",
        sbatch_args: &[],
        env: &[],
        train: train(""),
    };
    let id = s.submit(&job);
    let end = s.wait(id);
    let out = s.output(id);
    assert_eq!(
        (end.state.as_str(), end.exit_code),
        ("COMPLETED", 0),
        "{out}"
    );
    for i in 0..NODES {
        let want = if i == 1 {
            ["1", "5", "0"]
        } else {
            ["0", "6", "0"]
        };
        assert_eq!(copy_row(&out, i, s.c.node_ip(i)), want, "m{i}:\n{out}");
    }
    let sent: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(&format!(":{AGENT_PORT}): ws/")))
        .collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0].contains("ws/data/part1/graph.dgl"), "{sent:?}");
    assert_eq!(
        sha256_file(&s.root(1).join(WS).join("data/part1/graph.dgl")),
        sha256_file(&changed)
    );
    s.assert_cleaned_up(id, job.tag);
}

/// A trainer exits 7: the job ends FAILED with dglrun's exit code, and nothing is left.
fn a_failing_trainer_fails_the_job_with_its_code(s: &Setup) {
    let job = Job {
        tag: "fail",
        sbatch_args: &[],
        env: &[("DGLRUN_NUM_SAMPLERS", "1")],
        train: train("--fail-rank 3 --fail-code 7 --samplers --spawn-setsid-child --hang"),
    };
    let id = s.submit(&job);
    let end = s.wait(id);
    let out = s.output(id);
    assert_eq!(
        (end.state.as_str(), end.exit_code),
        ("FAILED", 7),
        "{out}\n{}",
        s.agent_logs(id)
    );
    assert!(out.contains("exit code 7"), "{out}");
    assert!(
        out.contains("dglrun: training exited with status 7"),
        "{out}"
    );
    assert!(
        s.dgl_pids(job.tag).len() > 3 * NODES,
        "samplers and grandchildren recorded"
    );
    s.assert_cleaned_up(id, job.tag);
}

/// Starts a job that runs until stopped and returns once every trainer reached every server
/// and the agents were checked; returns the job id and the DGL processes' pids.
fn start_hanging_job(s: &Setup, job: &Job) -> (u32, Vec<u32>) {
    let id = s.submit(job);
    s.wait_output(
        id,
        "talked to 3 servers",
        2 * NODES,
        Duration::from_secs(60),
    );
    s.assert_agents_in_their_steps(id, job.tag);
    let pids = s.dgl_pids(job.tag);
    // A server and two trainers per node, and what they forked.
    assert!(pids.len() >= 3 * NODES, "{pids:?}");
    (id, pids)
}

/// scancel mid-job: every DGL process on every node is gone within seconds, the agents exit,
/// the batch script's clean-up ran.
fn scancel_stops_everything_within_seconds(s: &Setup) {
    let job = Job {
        tag: "scancel",
        sbatch_args: &[],
        env: &[("DGLRUN_NUM_SAMPLERS", "1")],
        train: train("--hang --samplers --spawn-setsid-child"),
    };
    let (id, pids) = start_hanging_job(s, &job);
    let t = Instant::now();
    let st = s.c.command("scancel").arg(id.to_string()).status().unwrap();
    assert!(st.success());
    let left = wait_gone(&pids, Duration::from_secs(10));
    let dgl_gone = t.elapsed();
    assert!(
        left.is_empty(),
        "DGL processes left 10 s after scancel: {left:?}"
    );
    let left = s.wait_nodes_clean(Duration::from_secs(15));
    let nodes_clean = t.elapsed();
    assert!(left.is_empty(), "left on the nodes after scancel: {left:?}");
    let end = s.wait(id);
    assert_eq!(end.state, "CANCELLED", "{}", s.output(id));
    s.assert_cleaned_up(id, job.tag);
    println!(
        "FIGURES slurm scancel: {} DGL processes gone {:.2} s after scancel, agents and \
         steps gone after {:.2} s",
        pids.len(),
        dgl_gone.as_secs_f64(),
        nodes_clean.as_secs_f64()
    );
}

/// The time limit: the recipe's `--signal=B:TERM@<s>` reaches the batch script before the
/// limit; it stops dgl-coord (which stops every process on every node), then the agents,
/// which exit cleanly; the job ends with 143 before Slurm would kill it.
fn the_time_limit_signal_stops_the_job_cleanly(s: &Setup) {
    let job = Job {
        tag: "timelimit",
        // slurmctld checks time limits every 30 s and sends the signal at the first check
        // less than 30 s before it is due, so it may come at once: the limit is cut to 1 min
        // only once the job runs, and the signal then comes within 30 s, at least 20 s
        // before the limit.
        sbatch_args: &["--time=10", "--signal=B:TERM@50"],
        env: &[],
        train: train("--hang"),
    };
    let (id, pids) = start_hanging_job(s, &job);
    let st =
        s.c.command("scontrol")
            .args(["update", &format!("JobId={id}"), "TimeLimit=1"])
            .status()
            .unwrap();
    assert!(st.success());
    s.wait_output(id, "dglrun: cleaning up", 1, Duration::from_secs(45));
    let t = Instant::now();
    let left = wait_gone(&pids, Duration::from_secs(15));
    let dgl_gone = t.elapsed();
    assert!(
        left.is_empty(),
        "DGL processes left 15 s after the signal: {left:?}"
    );
    let left = s.wait_nodes_clean(Duration::from_secs(15));
    let nodes_clean = t.elapsed();
    assert!(left.is_empty(), "left on the nodes: {left:?}");
    let end = s.wait(id);
    let out = s.output(id);
    assert_eq!(
        (end.state.as_str(), end.exit_code),
        ("FAILED", 143),
        "the script stops itself before the limit:\n{out}"
    );
    assert!(
        out.contains("dglrun: cleaning up (exit status 143)"),
        "{out}"
    );
    for i in 0..NODES {
        let log = s.agent_log(id, i);
        assert!(
            log.contains("shutting down: stopping jobs")
                && log.contains("dglrun_agent::server: stopped"),
            "agent {i} did not shut down cleanly:\n{log}"
        );
    }
    s.assert_cleaned_up(id, job.tag);
    println!(
        "FIGURES slurm time limit: {} DGL processes gone {:.2} s after the script's signal, \
         agents and steps after {:.2} s",
        pids.len(),
        dgl_gone.as_secs_f64(),
        nodes_clean.as_secs_f64()
    );
}

/// The recipe run from an `salloc` shell: the allocation's first host is the machine that
/// ran salloc, outside the nodes; the agents still run one per node.
fn salloc_runs_the_recipe_interactively(s: &Setup) {
    let job = Job {
        tag: "salloc",
        sbatch_args: &[],
        env: &[],
        train: train(""),
    };
    let mut cmd = s.c.command("salloc");
    s.job_env(&mut cmd, &job);
    cmd.arg(format!("--nodes={NODES}"))
        .arg("--exclusive")
        .arg("bash")
        .arg(repo_dir().join("deploy/slurm/dglrun.sbatch"))
        .arg(&job.train);
    let r = run(cmd, JOB_TIMEOUT);
    assert_eq!(r.code(), 0, "{r:?}");
    let id: u32 = r
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("salloc: Granted job allocation "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no allocation: {r:?}"));
    for i in 0..NODES {
        assert_eq!(talked(&r.stdout, i), 2, "{r:?}");
        assert_eq!(copy_row(&r.stdout, i, s.c.node_ip(i)), ["0", "6", "0"]);
        for (name, rec) in s.records(job.tag, i) {
            assert_eq!(rec["env"]["SLURMD_NODENAME"], s.c.node_name(i), "{name}");
        }
    }
    assert!(r.stderr.contains("exit code 0"), "{r:?}");
    assert!(r.stdout.contains("dglrun: clean-up done"), "{r:?}");
    assert!(!s.job_dir(id).join("token").exists());
    let left = s.wait_nodes_clean(Duration::from_secs(15));
    assert!(left.is_empty(), "left on the nodes: {left:?}");
}

/// A name and the checks of one scenario.
type Scenario = (&'static str, fn(&Setup));

#[test]
fn the_slurm_recipe_on_a_real_cluster() {
    bin("dgl-agent");
    bin("dgl-coord");
    let Some(c) = start_or_skip("the Slurm recipe on a real Slurm cluster", NODES) else {
        return;
    };
    let s = Setup::new(c);
    let scenarios: [Scenario; 6] = [
        (
            "copy then launch, COMPLETED",
            a_job_copies_then_launches_and_completes,
        ),
        (
            "a second job re-copies only what changed",
            a_second_job_recopies_only_what_changed,
        ),
        (
            "a failing trainer: FAILED with its code",
            a_failing_trainer_fails_the_job_with_its_code,
        ),
        ("scancel mid-job", scancel_stops_everything_within_seconds),
        ("an salloc session", salloc_runs_the_recipe_interactively),
        (
            "the time limit's signal",
            the_time_limit_signal_stops_the_job_cleanly,
        ),
    ];
    let mut failed = Vec::new();
    for (name, scenario) in scenarios {
        let t = Instant::now();
        match catch_unwind(AssertUnwindSafe(|| scenario(&s))) {
            Ok(()) => eprintln!("ok   {name} ({:.1} s)", t.elapsed().as_secs_f64()),
            Err(_) => {
                eprintln!("FAIL {name} ({:.1} s)", t.elapsed().as_secs_f64());
                failed.push(name);
                // What a failed scenario left must not fail the next one.
                s.c.cancel_all();
                s.wait_nodes_clean(Duration::from_secs(20));
            }
        }
    }
    assert!(failed.is_empty(), "failed: {failed:?}\n{}", s.c.log_tails());
}
