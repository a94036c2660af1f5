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

use dglrun_integration_tests::run::{reader, run, wait_with_timeout, Run};
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
        // Written once by `with_workspace`: rewriting it here would race a running command.
        .arg(c.local().join("ip_config.txt"))
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
    let c = TestCluster::with_workspace(1);
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

/// A job whose every process prints `tick N` every 0.1 s, `n` times, then exits 0.
fn ticking(n: u32) -> String {
    format!("i=1; while [ $i -le {n} ]; do echo tick $i; i=$((i+1)); sleep 0.1; done")
}

/// A running `dgl-coord attach`, its output read on threads.
struct Attach {
    child: std::process::Child,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
}

fn start_attach(c: &TestCluster, job: &str, flags: &[&str]) -> Attach {
    use std::process::Stdio;
    let mut cmd = coord(c, "attach", job, flags);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = reader(child.stdout.take().unwrap());
    let err = reader(child.stderr.take().unwrap());
    Attach { child, out, err }
}

impl Attach {
    fn interrupt(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    }

    /// Exit code, stdout, stderr.
    fn finish(mut self, within: Duration) -> (i32, String, String) {
        let st = wait_with_timeout(&mut self.child, within);
        if st.is_none() {
            let _ = self.child.kill();
        }
        let (out, err) = (self.out.join().unwrap(), self.err.join().unwrap());
        let st = st.unwrap_or_else(|| panic!("attach did not end: {out}\n{err}"));
        (st.code().unwrap_or(-1), out, err)
    }
}

/// Every trainer line of machine `m`, in order.
fn trainer_ticks(out: &str, m: usize) -> Vec<String> {
    let prefix = format!("[m{m} trainer0] tick ");
    out.lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

#[test]
fn two_attaches_see_every_line_labelled_and_end_with_the_job() {
    let c = TestCluster::with_workspace(2);
    let job = job_id(&detach(&c, &[], &ticking(40)));
    let a = start_attach(&c, &job, &["--from-start"]);
    let b = start_attach(&c, &job, &["--from-start"]);
    let (ca, out_a, err_a) = a.finish(Duration::from_secs(60));
    let (cb, out_b, err_b) = b.finish(Duration::from_secs(60));
    assert_eq!((ca, cb), (0, 0), "{out_a}\n{err_a}\n---\n{out_b}\n{err_b}");
    let want: Vec<String> = (1..=40)
        .map(|i| format!("[m1 trainer0] tick {i}"))
        .collect();
    assert_eq!(trainer_ticks(&out_a, 1), want, "{out_a}");
    assert_eq!(trainer_ticks(&out_b, 1), want, "{out_b}");
    assert_eq!(trainer_ticks(&out_a, 0).len(), 40, "{out_a}");
    // The closing table of the supervising driver, as an attached launch ends.
    assert!(err_a.contains("exit code 0"), "{err_a}");
}

#[test]
fn attach_follows_from_now_on_and_ctrl_c_detaches() {
    let c = TestCluster::with_workspace(2);
    let job = job_id(&detach(&c, &[], &ticking(600)));
    std::thread::sleep(Duration::from_secs(2));
    let a = start_attach(&c, &job, &[]);
    std::thread::sleep(Duration::from_secs(3));
    a.interrupt();
    let (code, out, err) = a.finish(Duration::from_secs(20));
    assert_eq!(code, 130, "{out}\n{err}");
    assert!(err.contains("detached from job"), "{err}");
    let ticks = trainer_ticks(&out, 0);
    assert!(!ticks.is_empty(), "new lines are shown: {out}\n{err}");
    assert!(
        !ticks.contains(&"[m0 trainer0] tick 1".to_string()),
        "only the lines from now on: {out}"
    );
    assert!(
        !pids_with_env("DGLRUN_JOB_ID", &job).is_empty(),
        "the job runs on after a detach"
    );
    let s = run(coord(&c, "stop", &job, &[]), Duration::from_secs(30));
    assert_eq!(s.code(), 0, "{s:?}");
    assert_gone(&job, Duration::from_secs(10));
}

#[test]
fn a_stop_from_either_attach_wins_and_both_end_with_the_job() {
    let c = TestCluster::with_workspace(2);
    let job = job_id(&detach(&c, &[], &ticking(600)));
    let stopper = start_attach(&c, &job, &["--stop-on-interrupt"]);
    let watcher = start_attach(&c, &job, &[]);
    std::thread::sleep(Duration::from_secs(3));
    stopper.interrupt();
    let (cs, out_s, err_s) = stopper.finish(Duration::from_secs(30));
    assert_eq!(cs, 143, "{out_s}\n{err_s}");
    let (cw, out_w, err_w) = watcher.finish(Duration::from_secs(30));
    assert_eq!(cw, 143, "{out_w}\n{err_w}");
    assert!(
        err_w.contains("job stopped by dgl-coord kill from"),
        "{err_w}"
    );
    assert_gone(&job, Duration::from_secs(10));
}

#[test]
fn run_detach_copies_then_hands_the_job_over_with_json() {
    use dglrun_integration_tests::{fixtures_dir, gen_partitions};
    let c = TestCluster::start(2);
    let local = c.local();
    let part_config = gen_partitions(&local.join("parts"), 2, 1000, "g").unwrap();
    let code = local.join("code");
    std::fs::create_dir_all(&code).unwrap();
    std::fs::copy(fixtures_dir().join("fake_dgl.py"), code.join("fake_dgl.py")).unwrap();
    let ip_config = c.ip_config_file();
    let mut cmd = c.coord();
    cmd.env("XDG_CACHE_HOME", c.dir.path().join("cache"))
        .args(["run", "--workspace", WS, "--rel_data_path", "data"])
        .arg("--part_config")
        .arg(&part_config)
        .arg("--ip_config")
        .arg(&ip_config)
        .arg("--script_folder")
        .arg(&code)
        .args(["--progress", "quiet", "--num_trainers", "1"])
        .args([
            "--num_servers",
            "1",
            "--trainer-mode",
            "direct",
            "--grace",
            "1",
        ])
        .args(["--json", "--detach"])
        .arg("python3 code/fake_dgl.py --ip_config ip_config.txt --fail-rank 0 --fail-code 9")
        .env_remove("OMP_NUM_THREADS")
        .env_remove("PYTHONPATH");
    let r = run(cmd, Duration::from_secs(90));
    assert_eq!(r.code(), 0, "{r:?}");
    let events = r.events();
    assert_eq!(events[0]["event"], "copy", "{r:?}");
    let detached = &events[1];
    assert_eq!(detached["event"], "detached", "{r:?}");
    assert_eq!(detached["supervisor"], format!("{}:{}", c.ip(0), c.port));
    let job = detached["job_id"].as_str().unwrap();
    let (w, v) = wait_json(&c, job);
    assert_eq!((w.code(), &v["outcome"]), (9, &"failed".into()), "{w:?}");
}
