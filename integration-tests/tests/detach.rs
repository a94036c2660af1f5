//! Detached jobs: `launch --detach` hands the job to machine 0's agent, which runs the
//! launch's driver; `wait`, `stop` and `attach` follow it from any shell. Real agents, the
//! stand-in DGL workload.

// Test code throughout: a failed unwrap is a failed test, and a test may sleep.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::process::Command;
use std::time::{Duration, Instant};

use dglrun_integration_tests::run::{run, Run};
use dglrun_integration_tests::{pids_with_env, TestCluster, WS};
use serde_json::Value;

fn detach(c: &TestCluster, flags: &[&str], command: &str) -> Run {
    let mut all = vec![
        "--num_trainers",
        "1",
        "--trainer-mode",
        "direct",
        "--detach",
    ];
    all.extend_from_slice(flags);
    run(c.launch(&all, command), Duration::from_secs(60))
}

/// The job id a successful `--detach` printed.
fn job_id(r: &Run) -> String {
    assert_eq!(r.code(), 0, "{r:?}");
    let id = r.stdout.trim().to_string();
    assert!(id.starts_with("dglrun-") && !id.contains('\n'), "{r:?}");
    id
}

fn coord(c: &TestCluster, sub: &str, job: &str, flags: &[&str]) -> Command {
    let mut cmd = c.coord();
    cmd.arg(sub)
        .arg(job)
        .arg("--ip_config")
        .arg(c.ip_config_file())
        .args(flags);
    cmd
}

fn wait_json(c: &TestCluster, job: &str) -> (Run, Value) {
    let r = run(coord(c, "wait", job, &["--json"]), Duration::from_secs(90));
    let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    (r, v)
}

/// Every process of `job` is gone, on every host, within `within`.
fn assert_gone(job: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = pids_with_env("DGLRUN_JOB_ID", job);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes of {job} alive: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_detached_job_runs_on_without_dgl_coord_and_wait_returns_its_outcome() {
    let c = TestCluster::with_workspace(3);
    let started = Instant::now();
    // Trainers run 4 s: well past the 1 s lease, which only machine 0's agent renews now.
    let r = detach(
        &c,
        &["--lease-timeout", "1"],
        "python3 fake_dgl.py --ip_config ip_config.txt --sleep 4",
    );
    let job = job_id(&r);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "--detach returns once started, not at the end: {r:?}"
    );
    assert!(
        r.stderr.contains(&job) && r.stderr.contains("attach"),
        "{r:?}"
    );
    assert!(
        !pids_with_env("DGLRUN_JOB_ID", &job).is_empty(),
        "the job runs"
    );
    let (w, v) = wait_json(&c, &job);
    assert_eq!(w.code(), 0, "{w:?}");
    assert_eq!(v["outcome"], "success", "{v}");
    assert_eq!(v["exit_code"], 0, "{v}");
    assert!(v["ended_unix_ms"].as_u64() >= v["started_unix_ms"].as_u64());
    // The closing text of an attached launch: the table and the exit code.
    let text = v["text"].as_str().unwrap();
    assert!(
        text.contains("trainer0") && text.contains("exit code 0"),
        "{text}"
    );
    assert_gone(&job, Duration::from_secs(5));
    // After the fact too, in text: the table on stderr.
    let again = run(coord(&c, "wait", &job, &[]), Duration::from_secs(30));
    assert_eq!(again.code(), 0, "{again:?}");
    assert!(again.stderr.contains("exit code 0"), "{again:?}");
}

#[test]
fn a_bad_exit_in_a_detached_job_stops_every_host_and_wait_exits_with_its_code() {
    let c = TestCluster::with_workspace(3);
    let r = detach(
        &c,
        &[],
        "python3 fake_dgl.py --ip_config ip_config.txt --fail-rank 1 --fail-code 7 --hang",
    );
    let job = job_id(&r);
    let (w, v) = wait_json(&c, &job);
    assert_eq!(w.code(), 7, "the worst exit code, as srun: {w:?}");
    assert_eq!(v["outcome"], "failed", "{v}");
    let m1 = format!("m1 ({}:{})", c.ip(1), c.port);
    let text = v["text"].as_str().unwrap();
    assert!(
        text.contains(&format!("job failed: {m1} trainer0 (pid ")),
        "names host and process: {text}"
    );
    assert_gone(&job, Duration::from_secs(5));
}

#[test]
fn stop_ends_a_detached_job_and_wait_says_who_stopped_it() {
    let c = TestCluster::with_workspace(2);
    let job = job_id(&detach(
        &c,
        &[],
        "python3 fake_dgl.py --ip_config ip_config.txt --hang",
    ));
    let s = run(coord(&c, "stop", &job, &[]), Duration::from_secs(30));
    assert_eq!(s.code(), 0, "{s:?}");
    let (w, v) = wait_json(&c, &job);
    assert_eq!(w.code(), 143, "{w:?}");
    assert_eq!(v["outcome"], "stopped", "{v}");
    assert!(
        v["text"].as_str().unwrap().contains("dgl-coord kill from"),
        "names the requester: {v}"
    );
    assert_gone(&job, Duration::from_secs(5));
    // `kill --job` stays the same command.
    let mut k = c.coord();
    k.args(["kill", "--ip_config"])
        .arg(c.ip_config_file())
        .args(["--job", &job]);
    let k = run(k, Duration::from_secs(30));
    assert_eq!(k.code(), 0, "already over is no error: {k:?}");
}

#[test]
fn a_detached_launch_whose_start_fails_exits_non_zero_with_the_launch_message() {
    let c = TestCluster::with_workspace(2);
    // A server port of its own: a server of a test running beside it must not count.
    let port = 20000 + (std::process::id() % 20000) as u16;
    let ip_config = std::fs::read(c.ip_config_file_with_port(port)).unwrap();
    for m in 0..c.len() {
        std::fs::write(c.root(m).join(WS).join("ip_config.txt"), &ip_config).unwrap();
    }
    let r = detach(
        &c,
        &["--wait-servers"],
        "python3 fake_dgl.py --listen-delay 1 --fail-server 1 --fail-code 5",
    );
    assert_ne!(r.code(), 0, "{r:?}");
    assert!(r.stdout.trim().is_empty(), "no job id: {r:?}");
    let m1 = format!("m1 ({}:{})", c.ip(1), c.port);
    assert!(
        r.stderr.contains(&format!("job failed: {m1}")) && r.stderr.contains("server0"),
        "names the host and the server, as an attached launch: {r:?}"
    );
    assert!(r.stderr.contains("exit code"), "the table: {r:?}");
}

#[test]
fn wait_for_a_job_nobody_supervises_names_it() {
    let c = TestCluster::start(1);
    let r = run(
        coord(&c, "wait", "dglrun-0-nosuchjob", &[]),
        Duration::from_secs(30),
    );
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(
        r.stderr
            .contains("supervises no job \"dglrun-0-nosuchjob\""),
        "{r:?}"
    );
}
