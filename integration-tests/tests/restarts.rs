//! Restarts (`--max-restarts`, `--restart-backoff`, `--restart-on`), stalls
//! (`--stall-timeout`) and hangs at the start (`--start-timeout`), against real agents on
//! their own loopback addresses running the stand-in DGL workload. The figures (failure to
//! the restarted job running, stall to its detection) are printed.

// Test code throughout: a failed unwrap is a failed test, and a test may sleep.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dglrun_integration_tests::run::{run, wait_with_timeout};
use dglrun_integration_tests::{fake_dgl, TestCluster, WS};
use serde_json::Value;

const MACHINES: usize = 2;
// Each cluster below has DGL server ports of its own (30151, ...), apart from the 30050 that
// the other tests' servers use at the same time.

/// Every trainer and server record: (role, id, DGLRUN_RESTART_COUNT, TORCHELASTIC_RESTART_COUNT).
fn attempts_seen(c: &TestCluster) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    for host in 0..c.len() {
        for (_, v) in fake_dgl::records(c.root(host)) {
            let env = fake_dgl::env_of(&v);
            let get = |k: &str| env.get(k).cloned().unwrap_or_default();
            out.push((
                v["role"].as_str().unwrap_or_default().to_string(),
                v["id"].as_str().unwrap_or_default().to_string(),
                get("DGLRUN_RESTART_COUNT"),
                get("TORCHELASTIC_RESTART_COUNT"),
            ));
        }
    }
    out.sort();
    out
}

fn counts_of(seen: &[(String, String, String, String)], role: &str, id: &str) -> Vec<String> {
    seen.iter()
        .filter(|r| r.0 == role && r.1 == id)
        .map(|r| {
            assert_eq!(r.2, r.3, "both restart counts agree: {r:?}");
            r.2.clone()
        })
        .collect()
}

fn events_named<'a>(events: &'a [Value], name: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event"] == name).collect()
}

#[test]
fn a_job_failing_twice_succeeds_on_the_third_attempt_each_knowing_its_restart_count() {
    let c = TestCluster::with_workspace_on_port(MACHINES, 30151);
    let r = run(
        c.launch_direct(
            "1",
            &["--max-restarts", "3", "--restart-backoff", "0.2s", "--json"],
            "python3 fake_dgl.py --fail-rank 1 --fail-times 2 --fail-code 5",
        ),
        Duration::from_secs(120),
    );
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.stderr.contains("attempt 1 failed ("), "{}", r.stderr);
    assert!(
        r.stderr.contains("starting the whole job again in ")
            && r.stderr.contains("(restart 2 of 3)"),
        "{}",
        r.stderr
    );
    let seen = attempts_seen(&c);
    assert_eq!(
        counts_of(&seen, "trainer", "1"),
        ["0", "1", "2"],
        "{seen:?}"
    );
    assert_eq!(
        counts_of(&seen, "trainer", "0"),
        ["0", "1", "2"],
        "{seen:?}"
    );
    // Servers are started again too: DistDGL is not elastic.
    assert_eq!(counts_of(&seen, "server", "0"), ["0", "1", "2"], "{seen:?}");
    let marker = c.root(1).join(WS).join("records/failures-rank1");
    assert_eq!(std::fs::read_to_string(marker).unwrap(), "0\n1\n");

    let events = r.events();
    let summary = events_named(&events, "summary")[0];
    assert_eq!(summary["outcome"], "success");
    let attempts = summary["attempts"].as_array().expect("attempts");
    let got: Vec<(u64, &str, u64)> = attempts
        .iter()
        .map(|a| {
            (
                a["restart"].as_u64().unwrap(),
                a["outcome"].as_str().unwrap(),
                a["exit_code"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, [(0, "failed", 5), (1, "failed", 5), (2, "success", 0)]);
    // RANK 1 is machine 1's only trainer.
    assert_eq!(attempts[0]["failed_process"]["machine"], 1);
    assert_eq!(attempts[0]["failed_process"]["label"], "trainer0");

    // The figure: from the failed exit to every process of the next attempt started.
    let exits: Vec<&Value> = events_named(&events, "exited")
        .into_iter()
        .filter(|e| e["failed"] == true)
        .collect();
    let started = events_named(&events, "started");
    let per_attempt = 2 * MACHINES;
    assert_eq!(started.len(), 3 * per_attempt, "{events:?}");
    // The waits dgl-coord announced: "starting the whole job again in 153ms".
    let waits: Vec<u64> = r
        .stderr
        .lines()
        .filter_map(|l| l.split("starting the whole job again in ").nth(1))
        .filter_map(|t| t.split("ms").next()?.parse().ok())
        .collect();
    assert_eq!(waits.len(), 2, "{}", r.stderr);
    for (i, x) in exits.iter().enumerate() {
        let failed_at = x["elapsed_ms"].as_u64().unwrap();
        let next = &started[(i + 1) * per_attempt..(i + 2) * per_attempt];
        let running_at = next
            .iter()
            .map(|e| e["elapsed_ms"].as_u64().unwrap())
            .max()
            .unwrap();
        let took = running_at - failed_at;
        println!(
            "figure: failure {} -> restarted job's {per_attempt} processes all running: {took} ms, \
             of which {} ms the backoff's wait (the rest: the stop everywhere, then the spawns)",
            i + 1,
            waits[i]
        );
    }
}

#[test]
fn a_job_exceeding_max_restarts_fails_with_its_code_and_usage_errors_do_not_restart() {
    let c = TestCluster::with_workspace_on_port(MACHINES, 30152);
    let r = run(
        c.launch_direct(
            "1",
            &["--max-restarts", "1", "--restart-backoff", "0.1s"],
            "python3 fake_dgl.py --fail-rank 0 --fail-code 7",
        ),
        Duration::from_secs(120),
    );
    assert_eq!(r.code(), 7, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("no restart left: the job failed 2 times (--max-restarts 1)"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("attempt 1 (restart 0): "), "{}", r.stderr);
    assert!(r.stderr.contains("attempt 2 (restart 1): "), "{}", r.stderr);
    assert_eq!(counts_of(&attempts_seen(&c), "trainer", "0"), ["0", "1"]);

    // Exit code 2 is a usage error: the same command would fail the same way.
    let c = TestCluster::with_workspace_on_port(MACHINES, 30153);
    let r = run(
        c.launch_direct(
            "1",
            &["--max-restarts", "3", "--restart-backoff", "0.1s"],
            "python3 fake_dgl.py --fail-rank 0 --fail-code 2",
        ),
        Duration::from_secs(120),
    );
    assert_eq!(r.code(), 2, "{}", r.stderr);
    assert!(
        !r.stderr.contains("starting the whole job again"),
        "{}",
        r.stderr
    );
    assert_eq!(counts_of(&attempts_seen(&c), "trainer", "0"), ["0"]);

    // --restart-on names the codes that restart; 7 is not among them.
    let c = TestCluster::with_workspace_on_port(MACHINES, 30154);
    let r = run(
        c.launch_direct(
            "1",
            &["--max-restarts", "3", "--restart-on", "1,137"],
            "python3 fake_dgl.py --fail-rank 0 --fail-code 7",
        ),
        Duration::from_secs(120),
    );
    assert_eq!(r.code(), 7, "{}", r.stderr);
    assert_eq!(counts_of(&attempts_seen(&c), "trainer", "0"), ["0"]);
}

/// dgl-coord started with its stdout and stderr read line by line, each line with the time
/// it arrived.
struct Live {
    child: Child,
    rx: mpsc::Receiver<(Instant, bool, String)>,
    lines: Vec<(Instant, bool, String)>,
}

impl Live {
    fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dgl-coord");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for (pipe, is_err) in [
            (Box::new(out) as Box<dyn std::io::Read + Send>, false),
            (Box::new(err), true),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let _ = tx.send((Instant::now(), is_err, line));
                }
            });
        }
        Self {
            child,
            rx,
            lines: Vec::new(),
        }
    }

    /// Waits for a line containing `text`; returns when it came.
    fn until(&mut self, text: &str, within: Duration) -> Instant {
        let deadline = Instant::now() + within;
        if let Some(l) = self.lines.iter().find(|l| l.2.contains(text)) {
            return l.0;
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    let hit = l.2.contains(text);
                    let at = l.0;
                    self.lines.push(l);
                    if hit {
                        return at;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!("no line with {text:?} in {within:?}: {:#?}", self.lines);
                }
            }
        }
    }

    fn finish(mut self, within: Duration) -> (i32, String) {
        let status = wait_with_timeout(&mut self.child, within);
        let _ = self.child.kill();
        // The readers end with the pipes.
        while let Ok(l) = self.rx.recv_timeout(Duration::from_secs(2)) {
            self.lines.push(l);
        }
        let text: Vec<String> = self.lines.iter().map(|l| l.2.clone()).collect();
        let code = status.and_then(|s| s.code()).unwrap_or(-1);
        (code, text.join("\n"))
    }
}

#[test]
fn a_stalled_job_is_detected_within_the_timeout_plus_a_second_and_restarts_as_a_failure() {
    let c = TestCluster::with_workspace_on_port(MACHINES, 30155);
    let timeout = Duration::from_secs(3);
    let mut live = Live::start(c.launch_direct(
        "1",
        &[
            "--stall-timeout",
            "3s",
            "--max-restarts",
            "1",
            "--restart-backoff",
            "0.1s",
        ],
        "python3 fake_dgl.py --hang",
    ));
    live.until("trainer 0 hanging", Duration::from_secs(60));
    live.until("trainer 1 hanging", Duration::from_secs(60));
    let last_line = live
        .lines
        .iter()
        .filter(|l| l.2.contains("hanging"))
        .map(|l| l.0)
        .max()
        .unwrap();
    let detected = live.until("stalled: no progress for 3s", Duration::from_secs(30));
    let took = detected.duration_since(last_line);
    println!(
        "figure: stall detected {} ms after the last line (--stall-timeout 3s)",
        took.as_millis()
    );
    assert!(
        took >= timeout - Duration::from_millis(200) && took <= timeout + Duration::from_secs(1),
        "detected after {took:?}"
    );
    let (code, text) = live.finish(Duration::from_secs(120));
    assert_eq!(code, 124, "{text}");
    // Who is waiting where: each trainer's last line and its age, then every stack (or, on an
    // agent without py-spy, why there is none).
    assert!(text.contains("trainer0: last line "), "{text}");
    assert!(
        text.contains("the stack of every process of the stalled job:"),
        "{text}"
    );
    assert!(
        text.contains("sleep_forever") || text.contains("py-spy is not installed"),
        "{text}"
    );
    assert!(text.contains("\"trainer 0 hanging\""), "{text}");
    assert!(
        text.contains("attempt 1 failed (stalled: no progress for 3s"),
        "{text}"
    );
    assert!(
        text.contains("no restart left: the job failed 2 times"),
        "{text}"
    );
    assert_eq!(counts_of(&attempts_seen(&c), "trainer", "0"), ["0", "1"]);
}

#[test]
fn a_busy_silent_trainer_is_no_stall() {
    let c = TestCluster::with_workspace_on_port(MACHINES, 30156);
    // Silent for 6 s but computing the whole time: the agents' CPU times keep it alive. The
    // first sample after the start is a baseline, so the timeout leaves room for two.
    let r = run(
        c.launch_direct(
            "1",
            &["--stall-timeout", "3s"],
            "python3 fake_dgl.py --busy 6",
        ),
        Duration::from_secs(120),
    );
    assert_eq!(r.code(), 0, "{}", r.stderr);
}

#[test]
fn a_hang_at_start_fails_after_the_start_timeout_naming_the_silent_trainers() {
    let c = TestCluster::with_workspace_on_port(MACHINES, 30157);
    let t = Instant::now();
    let r = run(
        c.launch_direct(
            "1",
            &["--start-timeout", "2s", "--json"],
            "python3 fake_dgl.py --hang-at-start",
        ),
        Duration::from_secs(120),
    );
    assert_eq!(r.code(), 124, "{}", r.stderr);
    let m = |i: usize| format!("m{i} ({}:{})", c.ip(i), c.port);
    let expected = format!(
        "start timeout: {} trainer0, {} trainer0 printed nothing within 2s of the start",
        m(0),
        m(1)
    );
    assert!(r.stderr.contains(&expected), "{}", r.stderr);
    let events = r.events();
    assert_eq!(
        events_named(&events, "summary")[0]["outcome"],
        "start_timeout"
    );
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
}

#[test]
fn ctrl_c_during_the_backoff_stops_for_good() {
    let c = TestCluster::with_workspace_on_port(MACHINES, 30158);
    let mut live = Live::start(c.launch_direct(
        "1",
        &["--max-restarts", "5", "--restart-backoff", "60s"],
        "python3 fake_dgl.py --fail-rank 0 --fail-code 7",
    ));
    live.until("starting the whole job again in ", Duration::from_secs(60));
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(live.child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let (code, text) = live.finish(Duration::from_secs(30));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(code, 7, "the failure's own code: {text}");
    assert!(
        text.contains("SIGINT during the wait: not starting the job again"),
        "{text}"
    );
    let trainers: BTreeSet<String> = counts_of(&attempts_seen(&c), "trainer", "0")
        .into_iter()
        .collect();
    assert_eq!(trainers, BTreeSet::from(["0".to_string()]));
}

#[test]
fn a_lost_host_restarts_the_job_like_any_failure() {
    let mut c = TestCluster::with_workspace_on_port(MACHINES, 30159);
    let mut live = Live::start(c.launch_direct(
        "1",
        &["--max-restarts", "2", "--restart-backoff", "3s"],
        "python3 fake_dgl.py --sleep 5",
    ));
    live.until("trainer 1 talked to", Duration::from_secs(60));
    // As if the host crashed and came back: its agent stops what it left behind.
    c.restart_agent(1);
    live.until("lost the agent of", Duration::from_secs(30));
    live.until("starting the whole job again in ", Duration::from_secs(30));
    let (code, text) = live.finish(Duration::from_secs(120));
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        counts_of(&attempts_seen(&c), "trainer", "1"),
        ["0", "1"],
        "{text}"
    );
}

/// A detached job restarts as an attached one does: machine 0's agent runs the same driver
/// with the same policy, and `wait` ends with the last attempt's outcome.
#[test]
fn a_detached_job_restarts_under_its_supervising_agent() {
    let c = TestCluster::with_workspace_on_port(MACHINES, 30160);
    let r = run(
        c.launch_direct(
            "1",
            &[
                "--max-restarts",
                "2",
                "--restart-backoff",
                "0.2s",
                "--detach",
            ],
            "python3 fake_dgl.py --fail-rank 1 --fail-times 1 --fail-code 5",
        ),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    let job = r.stdout.trim().to_string();
    let w = run(
        {
            let mut cmd = c.coord();
            cmd.args(["wait", &job, "--json", "--ip_config"])
                .arg(c.ip_config_file_with_port(30160));
            cmd
        },
        Duration::from_secs(90),
    );
    assert_eq!(w.code(), 0, "{w:?}");
    let v: Value = serde_json::from_str(&w.stdout).unwrap_or_else(|e| panic!("{e}: {w:?}"));
    assert_eq!(v["outcome"], "success", "{v}");
    let text = v["text"].as_str().unwrap();
    assert!(text.contains("attempt 1 failed ("), "{text}");
    let seen = attempts_seen(&c);
    assert_eq!(counts_of(&seen, "trainer", "1"), ["0", "1"], "{seen:?}");
}
