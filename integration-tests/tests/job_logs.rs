//! Logs on every host: each process's output kept in files under its agent's root, the job
//! records beside them, and the two commands that read them, `dgl-coord jobs` and
//! `dgl-coord logs` — against real agents, real processes and real files.

// Test code throughout: a failed unwrap is a failed test, and a test may sleep.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::collections::BTreeMap;
use std::fs;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dglrun_integration_tests::run::{reader, run, wait_with_timeout};
use dglrun_integration_tests::{cannot_run, fake_dgl, in_ci, TestCluster, WS};
use serde_json::Value;

fn with_workspace(n: usize, agent_args: &[&str]) -> TestCluster {
    let c = TestCluster::start_with(n, agent_args);
    let ip_config = fs::read(c.ip_config_file()).unwrap();
    for i in 0..c.len() {
        fake_dgl::write_workspace(c.root(i), &ip_config, c.len());
    }
    c
}

fn coord(c: &TestCluster, args: &[&str]) -> Command {
    let mut cmd = c.coord();
    cmd.args(args).arg("--ip_config").arg(c.ip_config_file());
    cmd
}

/// `dgl-coord jobs --json`, with its exit code.
fn jobs(c: &TestCluster) -> (i32, Value) {
    let r = run(coord(c, &["jobs", "--json"]), Duration::from_secs(30));
    let v = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    (r.code(), v)
}

fn only_job(report: &Value) -> &Value {
    let list = report["jobs"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{report:#}");
    &list[0]
}

/// Labelled lines (`[m0 trainer0] ...`) of an output, sorted: the same set whatever order
/// the hosts' lines arrived in.
fn labelled(out: &str) -> Vec<String> {
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("[m"))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

#[test]
fn jobs_and_logs_after_the_fact_survive_an_agent_restart() {
    let mut c = with_workspace(2, &[]);
    let r = run(
        c.launch_direct(
            "1",
            &[],
            "python3 fake_dgl.py --ip_config ip_config.txt --lines 5 --fail-rank 1 --fail-code 7",
        ),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 7, "{r:?}");

    let (code, report) = jobs(&c);
    assert_eq!(code, 0, "{report:#}");
    let job = only_job(&report);
    assert_eq!(job["state"], "finished", "{job:#}");
    assert_eq!(job["exit_code"], 7, "{job:#}");
    assert!(
        job["command"].as_str().unwrap().contains("fake_dgl.py"),
        "{job:#}"
    );
    assert!(job["ended_unix_ms"].as_u64() >= job["started_unix_ms"].as_u64());
    let hosts = job["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 2);
    let status_of = |h: usize, label: &str| {
        hosts[h]["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["label"] == label)
            .map(|p| p["status"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(status_of(1, "trainer0"), "exit 7");
    assert!(status_of(0, "server0").starts_with("stopped"), "{job:#}");
    let id = job["job_id"].as_str().unwrap().to_string();

    // Text form: the job, its exit code, each host.
    let text = run(coord(&c, &["jobs"]), Duration::from_secs(30));
    assert!(
        text.stdout
            .contains(&format!("job {id}  finished, exit code 7")),
        "{text:?}"
    );

    // The whole output, labelled exactly as the attached launch labelled it.
    let logs = run(coord(&c, &["logs", &id]), Duration::from_secs(30));
    assert_eq!(logs.code(), 0, "{logs:?}");
    assert_eq!(labelled(&logs.stdout), labelled(&r.stdout), "{logs:?}");
    assert_eq!(labelled(&logs.stderr), labelled(&r.stderr), "{logs:?}");

    // Filters and --tail: the last two stderr lines of machine 1's trainer.
    let tail = run(
        coord(
            &c,
            &[
                "logs",
                &id,
                "--machine",
                "1",
                "--process",
                "trainer0",
                "--stream",
                "stderr",
                "--tail",
                "2",
            ],
        ),
        Duration::from_secs(30),
    );
    assert_eq!(tail.code(), 0, "{tail:?}");
    assert!(tail.stdout.is_empty(), "{tail:?}");
    let want: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("[m1 trainer0] "))
        .collect();
    let got: Vec<&str> = tail
        .stderr
        .lines()
        .filter(|l| l.starts_with("[m"))
        .collect();
    assert_eq!(got, want[want.len() - 2..], "{tail:?}");

    // The files are where the README says.
    let dir = c.root(1).join(".dglrun/jobs").join(&id);
    assert!(fs::read_to_string(dir.join("trainer0.out"))
        .unwrap()
        .contains(" out 4 "));
    assert!(dir.join("job.json").is_file());

    // An agent SIGKILLed and started again still has both.
    c.restart_agent(1);
    let (_, again) = jobs(&c);
    assert_eq!(only_job(&again)["exit_code"], 7, "{again:#}");
    let logs1 = run(
        coord(&c, &["logs", &id, "--machine", "1"]),
        Duration::from_secs(30),
    );
    assert_eq!(logs1.code(), 0, "{logs1:?}");
    let m1 = |v: Vec<String>| -> Vec<String> {
        v.into_iter().filter(|l| l.starts_with("[m1 ")).collect()
    };
    assert_eq!(m1(labelled(&logs1.stdout)), m1(labelled(&r.stdout)));

    // A host that cannot be reached is named, not fatal.
    c.kill_agent(0);
    let (code, partial) = jobs(&c);
    assert_eq!(code, 1);
    assert_eq!(only_job(&partial)["hosts"].as_array().unwrap().len(), 1);
    assert_eq!(partial["unreachable"][0]["machine"], 0, "{partial:#}");
    let unknown = run(
        coord(&c, &["logs", "no-such-job", "--machine", "1"]),
        Duration::from_secs(30),
    );
    assert_eq!(unknown.code(), 1, "{unknown:?}");
    assert!(
        unknown
            .stderr
            .contains("no host keeps a record of job no-such-job"),
        "{unknown:?}"
    );
}

/// A workload that prints slowly: trainers print `lines` numbered lines on stdout, 5 ms
/// apart; servers wait to be stopped.
const SLOW: &str = r#"
import os, sys, time
if os.environ.get("DGL_ROLE") == "server":
    time.sleep(600)
n = int(sys.argv[1])
for i in range(n):
    print(f"line {i}", flush=True)
    time.sleep(0.005)
"#;

/// Launches `slow.py LINES` with `trainers` trainers a host, and once the agents list the job,
/// `logs JOB --follow --stream stdout`: the job's id, the launch, the follow, and the follow's stdout and
/// stderr as they are read.
fn follow_slow_job(
    c: &TestCluster,
    trainers: &str,
    lines: u32,
) -> (String, Child, Child, JoinHandle<String>, JoinHandle<String>) {
    for i in 0..c.len() {
        fs::write(c.root(i).join(WS).join("slow.py"), SLOW).unwrap();
    }
    let launch = c
        .launch_direct(trainers, &[], &format!("python3 slow.py {lines}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The job as soon as the agents know it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let (_, report) = jobs(c);
        if let Some(j) = report["jobs"].as_array().and_then(|a| a.first()) {
            break j["job_id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no job listed");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut follow = coord(c, &["logs", &id, "--follow", "--stream", "stdout"]);
    let mut follow = follow
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = reader(follow.stdout.take().unwrap());
    let err = reader(follow.stderr.take().unwrap());
    (id, launch, follow, out, err)
}

#[test]
fn logs_follow_sees_every_line_once_in_order_and_ends_with_the_job() {
    let c = with_workspace(2, &[]);
    let (_, mut launch, mut follow, out, err) = follow_slow_job(&c, "2", 600);
    let launched = wait_with_timeout(&mut launch, Duration::from_secs(90)).expect("launch ends");
    assert!(launched.success(), "{launched:?}");
    let followed = wait_with_timeout(&mut follow, Duration::from_secs(30))
        .expect("logs --follow ends once the job has ended");
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(followed.success(), "{followed:?} {err}");
    let mut per: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for l in out.lines() {
        let (label, text) = l.split_once("] ").unwrap();
        let n = text.strip_prefix("line ").unwrap().parse().unwrap();
        per.entry(label.to_string()).or_default().push(n);
    }
    let labels: Vec<&String> = per.keys().collect();
    assert_eq!(
        labels,
        [
            "[m0 trainer0",
            "[m0 trainer1",
            "[m1 trainer0",
            "[m1 trainer1"
        ],
        "{out}"
    );
    for (label, lines) in &per {
        assert_eq!(*lines, (0..600).collect::<Vec<_>>(), "{label}");
    }
}

#[test]
fn retention_deletes_the_oldest_finished_job_and_says_so() {
    // One job's output takes about 120 KB per host: two do not fit.
    let c = with_workspace(1, &["--log-max-total-size", "200K"]);
    let job = || {
        let r = run(
            c.launch_direct(
                "1",
                &[],
                "python3 fake_dgl.py --ip_config ip_config.txt --lines 500 --line-bytes 120",
            ),
            Duration::from_secs(60),
        );
        assert_eq!(r.code(), 0, "{r:?}");
        let (_, report) = jobs(&c);
        report["jobs"][0]["job_id"].as_str().unwrap().to_string()
    };
    let first = job();
    let dir = c.root(0).join(".dglrun/jobs");
    assert!(dir.join(&first).is_dir());
    let second = job();
    assert_ne!(first, second);
    let deadline = Instant::now() + Duration::from_secs(10);
    while dir.join(&first).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!dir.join(&first).exists(), "the oldest job is deleted");
    assert!(
        dir.join(&second).join("trainer0.out").is_file(),
        "the newest is kept"
    );
    let log = c.agent_log(0);
    assert!(
        log.contains("retention: deleted the finished job's logs and record")
            && log.contains(&first),
        "{log}"
    );
    let (_, report) = jobs(&c);
    assert_eq!(only_job(&report)["job_id"], second.as_str());
}

/// Mounts a tmpfs of `size` at `dir` for as long as it lives.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Result<Self, String> {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into());
        }
        Ok(Self(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_keeps_the_job_running_and_reports_the_loss() {
    let test = "a_full_disk_keeps_the_job_running_and_reports_the_loss";
    let mut c = with_workspace(1, &[]);
    // The logs' directory alone is full: the workspace (and the job's own files) are not.
    c.kill_agent(0);
    let jobs_dir = c.root(0).join(".dglrun/jobs");
    let _tmpfs = match Tmpfs::mount(&jobs_dir, "64k") {
        Ok(t) => t,
        Err(why) => {
            cannot_run(test, &format!("cannot mount a tmpfs: {why}"));
            assert!(!in_ci());
            return;
        }
    };
    c.restart_agent(0);
    let r = run(
        c.launch_direct(
            "1",
            &[],
            "python3 fake_dgl.py --ip_config ip_config.txt --lines 2000 --line-bytes 120",
        ),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 0, "the job runs on: {r:?}");
    assert_eq!(
        r.stdout.lines().filter(|l| l.contains(" out ")).count(),
        2000,
        "the attached launch still sees every line: {r:?}"
    );
    let (_, report) = jobs(&c);
    let job = only_job(&report);
    assert_eq!(job["exit_code"], 0, "{job:#}");
    let host = &job["hosts"][0];
    assert!(host["lost_lines"].as_u64().unwrap() > 0, "{job:#}");
    assert!(
        host["log_error"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{job:#}"
    );
    let id = job["job_id"].as_str().unwrap();
    let logs = run(coord(&c, &["logs", id]), Duration::from_secs(30));
    assert_eq!(logs.code(), 0, "{logs:?}");
    assert!(
        logs.stderr
            .contains("output lines of the job were not kept on the host"),
        "{logs:?}"
    );
    assert!(c.agent_log(0).contains("No space left on device"));
}

#[test]
fn logs_outlive_a_coordinator_killed_mid_job() {
    let c = with_workspace(1, &["--lease-timeout", "2"]);
    fs::write(c.root(0).join(WS).join("slow.py"), SLOW).unwrap();
    let mut launch = c
        .launch_direct("1", &[], "python3 slow.py 100000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let (_, report) = jobs(&c);
        let trainer_started = report["jobs"][0]["hosts"][0]["processes"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["label"] == "trainer0"));
        if trainer_started {
            break report["jobs"][0]["job_id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no job listed");
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(500));
    launch.kill().unwrap();
    launch.wait().unwrap();
    // The agent stops the job once the lease runs out; the record says so.
    let deadline = Instant::now() + Duration::from_secs(30);
    let job = loop {
        let (_, report) = jobs(&c);
        let job = only_job(&report).clone();
        if job["state"] != "running" {
            break job;
        }
        assert!(Instant::now() < deadline, "the job still runs: {job:#}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(job["stopped_by"], "lease expiry", "{job:#}");
    assert_eq!(job["state"], "finished", "{job:#}");
    assert_eq!(job["exit_code"], 143, "{job:#}");
    let logs = run(
        coord(&c, &["logs", &id, "--process", "trainer0"]),
        Duration::from_secs(30),
    );
    assert_eq!(logs.code(), 0, "{logs:?}");
    let n: Vec<usize> = logs
        .stdout
        .lines()
        .map(|l| {
            l.strip_prefix("[m0 trainer0] line ")
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(n.len() > 10, "{logs:?}");
    assert_eq!(n, (0..n.len()).collect::<Vec<_>>());
}

#[test]
fn a_job_running_when_its_agent_died_is_recorded_as_interrupted() {
    let mut c = with_workspace(1, &[]);
    fs::write(c.root(0).join(WS).join("slow.py"), SLOW).unwrap();
    let mut launch = c
        .launch_direct("1", &[], "python3 slow.py 100000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let dir = c.root(0).join(".dglrun/jobs");
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let (_, report) = jobs(&c);
        let lines = report["jobs"][0]["job_id"]
            .as_str()
            .map(|id| dir.join(id).join("trainer0.out"))
            .and_then(|f| fs::read_to_string(f).ok())
            .map_or(0, |t| t.lines().count());
        if lines > 10 {
            break report["jobs"][0]["job_id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no output kept");
        std::thread::sleep(Duration::from_millis(50));
    };
    c.restart_agent(0);
    let _ = wait_with_timeout(&mut launch, Duration::from_secs(60));
    let _ = launch.kill();
    let (_, report) = jobs(&c);
    let job = only_job(&report);
    assert_eq!(job["job_id"], id.as_str());
    assert_eq!(job["state"], "interrupted", "{job:#}");
    assert_eq!(job["exit_code"], 1, "{job:#}");
    let trainer = job["hosts"][0]["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["label"] == "trainer0")
        .unwrap()
        .clone();
    assert!(
        trainer["status"]
            .as_str()
            .unwrap()
            .starts_with("end unknown"),
        "{job:#}"
    );
    let logs = run(
        coord(&c, &["logs", &id, "--tail", "1"]),
        Duration::from_secs(30),
    );
    assert_eq!(logs.code(), 0, "{logs:?}");
    assert!(logs.stdout.starts_with("[m0 trainer0] line "), "{logs:?}");
    assert!(c.agent_log(0).contains("restarted while the job ran"));
}

#[test]
fn logs_follow_resumes_across_an_agent_restart_without_a_line_twice() {
    let mut c = with_workspace(2, &[]);
    let (id, mut launch, mut follow, out, err) = follow_slow_job(&c, "1", 100000);
    std::thread::sleep(Duration::from_millis(1500));
    c.restart_agent(1);
    let followed = wait_with_timeout(&mut follow, Duration::from_secs(60))
        .expect("logs --follow ends once the job has ended on every host");
    let _ = wait_with_timeout(&mut launch, Duration::from_secs(30));
    let _ = launch.kill();
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(followed.success(), "{followed:?} {err}");
    let mut per: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for l in out.lines() {
        let (label, text) = l.split_once("] ").unwrap();
        let n = text.strip_prefix("line ").unwrap().parse().unwrap();
        per.entry(label.to_string()).or_default().push(n);
    }
    let m1 = &per["[m1 trainer0"];
    assert!(m1.len() > 20, "{per:?}");
    for (label, lines) in &per {
        assert_eq!(
            *lines,
            (0..lines.len()).collect::<Vec<_>>(),
            "{label}: {err}"
        );
    }
    // What host 1 kept is exactly what was printed for it.
    let kept = fs::read_to_string(
        c.root(1)
            .join(".dglrun/jobs")
            .join(&id)
            .join("trainer0.out"),
    )
    .unwrap();
    assert_eq!(kept.lines().count(), m1.len());
}
