//! `dgl-coord launch` against three real agents on their own loopback addresses, running the
//! stand-in DGL workload (`fixtures/fake_dgl.py`) and the stand-in torchrun.
//!
//! Every process writes a record of what it got (env, pid, process group) into
//! `<workspace>/records/`; assertions about what ran and what is left use those pids, never
//! process names.

// Test code throughout: a failed unwrap is a failed test, and a test may set its own
// environment and sleep; its helper modules are private to this test.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dglrun_integration_tests::run::{reader, run, wait_with_timeout};
use dglrun_integration_tests::{
    compat_dir, fake_dgl, fixtures_dir, pids_with_env, wait_gone, write_token_file, TestCluster, WS,
};
use serde_json::Value;

const MACHINES: usize = 3;

fn cluster() -> TestCluster {
    TestCluster::with_workspace(MACHINES)
}

fn launch(c: &TestCluster, flags: &[&str], command: &str) -> Command {
    c.launch(flags, command)
}

/// Snapshot settings with `c`'s volatile parts (addresses, port, paths, pids) filtered out.
fn redacted(c: &TestCluster) -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    for (re, with) in c.redactions() {
        s.add_filter(&re, with);
    }
    s
}

/// dgl-coord's closing words: its last message (`dgl-coord: ...` and the lines indented
/// under it) and the exit code line under the table.
fn final_message(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().collect();
    let start = lines
        .iter()
        .rposition(|l| l.starts_with("dgl-coord: "))
        .unwrap_or(0);
    let mut out: Vec<&str> = vec![lines.get(start).copied().unwrap_or_default()];
    out.extend(
        lines
            .iter()
            .skip(start + 1)
            .take_while(|l| l.starts_with("  ")),
    );
    out.extend(lines.iter().rev().find(|l| l.starts_with("exit code ")));
    out.join("\n")
}

fn torch_pythonpath() -> String {
    fixtures_dir().join("pythonpath").display().to_string()
}

#[derive(Debug, Clone)]
struct Record {
    host: usize,
    role: String,
    id: String,
    pid: u32,
    pgid: i64,
    sid: i64,
    cwd: String,
    env: BTreeMap<String, String>,
}

fn records(c: &TestCluster) -> Vec<Record> {
    let mut out = Vec::new();
    for host in 0..c.len() {
        for (_, v) in fake_dgl::records(c.root(host)) {
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            out.push(Record {
                host,
                role: s("role"),
                id: s("id"),
                pid: v["pid"].as_u64().expect("pid") as u32,
                pgid: v["pgid"].as_i64().unwrap_or(-1),
                sid: v["sid"].as_i64().unwrap_or(-1),
                cwd: s("cwd"),
                env: fake_dgl::env_of(&v),
            });
        }
    }
    out.sort_by(|a, b| (a.host, &a.role, &a.id).cmp(&(b.host, &b.role, &b.id)));
    out
}

/// Pids from `*.pid` files on every host (samplers, setsid grandchildren).
fn pid_files(c: &TestCluster, kind: &str) -> Vec<u32> {
    (0..c.len())
        .flat_map(|host| fake_dgl::pid_files(c.root(host), kind))
        .collect()
}

/// Every process the job recorded, every process still in a recorded process group or
/// session, and every process still carrying the job's marker, must be gone.
fn assert_nothing_left(c: &TestCluster, what: &str) {
    let recs = records(c);
    assert!(!recs.is_empty(), "{what}: no records written");
    let mut pids: Vec<u32> = recs.iter().map(|r| r.pid).collect();
    pids.extend(pid_files(c, "sampler"));
    pids.extend(pid_files(c, "grandchild"));
    let live = wait_gone(&pids, Duration::from_millis(500));
    assert!(live.is_empty(), "{what}: still alive: {live:?}");
    // Groups and sessions the job's processes created (servers share the agent's session).
    let groups: Vec<i64> = recs
        .iter()
        .flat_map(|r| {
            [r.pgid, r.sid]
                .into_iter()
                .filter(move |&g| g == r.pid as i64)
        })
        .collect();
    let in_groups = processes_in_groups(&groups);
    assert!(
        in_groups.is_empty(),
        "{what}: alive in the job's groups/sessions: {in_groups:?}"
    );
    let mut jobs: Vec<&str> = recs
        .iter()
        .filter_map(|r| r.env.get("DGLRUN_JOB_ID").map(String::as_str))
        .collect();
    jobs.dedup();
    for j in jobs {
        let marked = pids_with_env("DGLRUN_JOB_ID", j);
        assert!(
            marked.is_empty(),
            "{what}: processes of job {j} alive: {marked:?}"
        );
    }
}

/// Live (non-zombie) processes whose process group or session is one of `ids`.
fn processes_in_groups(ids: &[i64]) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() < 4 || f[0] == "Z" || f[0] == "X" {
            continue;
        }
        let (pgid, sid) = (
            f[2].parse::<i64>().unwrap_or(0),
            f[3].parse::<i64>().unwrap_or(0),
        );
        if ids.contains(&pgid) || ids.contains(&sid) {
            out.push((pid, stat));
        }
    }
    out
}

fn env_of<'a>(r: &'a Record, k: &str) -> &'a str {
    r.env.get(k).map(String::as_str).unwrap_or("<unset>")
}

#[test]
fn direct_mode_runs_the_whole_job_with_torchruns_worker_environment() {
    let c = cluster();
    let path = std::env::var("PATH").unwrap_or_default();
    let r = run(
        launch(
            &c,
            &[
                "--num_trainers",
                "2",
                "--num_samplers",
                "1",
                "--trainer-mode",
                "direct",
                "--extra_envs",
                "DGLRUN_TEST_PATH=/x:$PATH",
                "DGL_ROLE=overridden",
            ],
            "python3 fake_dgl.py --graph-name g --ip_config ip_config.txt --samplers --lines 4",
        ),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    let recs = records(&c);
    let servers: Vec<&Record> = recs.iter().filter(|r| r.role == "server").collect();
    let trainers: Vec<&Record> = recs.iter().filter(|r| r.role == "trainer").collect();
    assert_eq!((servers.len(), trainers.len()), (3, 6), "{recs:#?}");
    let ip0 = c.ip(0).to_string();
    let port = env_of(trainers[0], "MASTER_PORT").to_string();
    assert!(
        port.parse::<u16>().is_ok_and(|p| p > 0),
        "MASTER_PORT {port}"
    );
    for s in &servers {
        assert_eq!(env_of(s, "DGL_ROLE"), "server");
        assert_eq!(env_of(s, "DGL_SERVER_ID"), s.host.to_string());
        assert_eq!(env_of(s, "DGL_NUM_CLIENT"), "12");
        assert_eq!(env_of(s, "OMP_NUM_THREADS"), "1");
        assert_eq!(env_of(s, "DGL_CONF_PATH"), "data/g.json");
        assert_eq!(env_of(s, "DGL_IP_CONFIG"), "ip_config.txt");
        assert_eq!(env_of(s, "DGL_GRAPH_FORMAT"), "csc");
        assert!(!s.env.contains_key("RANK"));
        assert_eq!(s.pgid, s.pid as i64, "each process leads its own group");
    }
    for t in &trainers {
        let m = t.host;
        let rank: usize = t.id.parse().expect("rank");
        assert_eq!(rank / 2, m, "rank {rank} on machine {m}");
        let expect = [
            ("DGL_ROLE", "client".to_string()),
            ("DGL_DIST_MODE", "distributed".to_string()),
            ("DGL_NUM_SAMPLER", "1".to_string()),
            ("DGL_NUM_CLIENT", "12".to_string()),
            ("DGL_GROUP_ID", "0".to_string()),
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", (rank % 2).to_string()),
            ("WORLD_SIZE", "6".to_string()),
            ("LOCAL_WORLD_SIZE", "2".to_string()),
            ("GROUP_RANK", m.to_string()),
            ("GROUP_WORLD_SIZE", "3".to_string()),
            ("ROLE_RANK", rank.to_string()),
            ("ROLE_WORLD_SIZE", "6".to_string()),
            ("ROLE_NAME", "default".to_string()),
            ("MASTER_ADDR", ip0.clone()),
            ("MASTER_PORT", port.clone()),
            ("TORCHELASTIC_RESTART_COUNT", "0".to_string()),
            ("TORCHELASTIC_MAX_RESTARTS", "0".to_string()),
            ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1".to_string()),
        ];
        for (k, v) in expect {
            assert_eq!(env_of(t, k), v, "{k} of trainer {rank}");
        }
        assert!(!t.env.contains_key("TORCHELASTIC_USE_AGENT_STORE"));
        assert_eq!(env_of(t, "TORCHELASTIC_RUN_ID"), env_of(t, "DGLRUN_JOB_ID"));
    }
    for rec in servers.iter().chain(&trainers) {
        // extra_envs: expanded against the agent's environment; DGL's own variables win.
        assert_eq!(env_of(rec, "DGLRUN_TEST_PATH"), format!("/x:{path}"));
        assert_ne!(env_of(rec, "DGL_ROLE"), "overridden");
        let ws = c.root(rec.host).join(WS).canonicalize().expect("ws");
        assert_eq!(Path::new(&rec.cwd), ws, "cwd is the workspace");
    }
    // Labelled output on the right stream, and the summary.
    assert!(r.stdout.contains("[m1 trainer0] trainer 2 out 0"), "{r:?}");
    assert!(r.stderr.contains("[m2 trainer1] trainer 5 err 1"), "{r:?}");
    assert!(
        r.stdout.contains("[m0 server0] server 0 listening on"),
        "{r:?}"
    );
    for label in ["server0", "trainer0", "trainer1"] {
        assert!(r.stderr.contains(label), "summary names {label}");
    }
    assert!(r.stderr.contains("exit code 0"), "{r:?}");
    assert_nothing_left(&c, "after success");
}

#[test]
fn torchrun_mode_wraps_the_command_like_dgl() {
    let c = cluster();
    let mut cmd = launch(
        &c,
        &["--num_trainers", "2", "--num_samplers", "0"],
        "python3 fake_dgl.py --graph-name g --ip_config ip_config.txt",
    );
    cmd.env("PYTHONPATH", torch_pythonpath());
    let r = run(cmd, Duration::from_secs(90));
    assert_eq!(r.code(), 0, "{r:?}");
    let recs = records(&c);
    let torchruns: Vec<&Record> = recs.iter().filter(|r| r.role == "torchrun").collect();
    let trainers: Vec<&Record> = recs.iter().filter(|r| r.role == "trainer").collect();
    assert_eq!((torchruns.len(), trainers.len()), (3, 6), "{recs:#?}");
    for t in &torchruns {
        assert_eq!(env_of(t, "DGL_ROLE"), "client");
        assert_eq!(
            env_of(t, "PYTHONPATH"),
            torch_pythonpath(),
            "launcher PYTHONPATH passed on"
        );
        assert_eq!(env_of(t, "DGL_NUM_CLIENT"), "6");
    }
    for t in &trainers {
        let rank: usize = t.id.parse().expect("rank");
        assert_eq!(rank / 2, t.host);
        assert_eq!(env_of(t, "TORCHELASTIC_USE_AGENT_STORE"), "True");
        assert_eq!(env_of(t, "MASTER_ADDR"), c.ip(0).to_string());
        // torchrun put each worker in a session of its own.
        assert_eq!(t.sid, t.pid as i64);
    }
    assert!(r.stdout.contains("[m0 trainers]"), "{r:?}");
    assert_nothing_left(&c, "after success");
}

#[test]
fn a_failing_trainer_stops_the_whole_job_everywhere() {
    let c = cluster();
    let r = run(
        launch(
            &c,
            &[
                "--num_trainers",
                "2",
                "--num_samplers",
                "2",
                "--trainer-mode",
                "direct",
            ],
            "python3 fake_dgl.py --fail-rank 3 --fail-code 7 --samplers --hang",
        ),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 7, "worst exit code: {r:?}");
    let m1 = format!("m1 ({}:{})", c.ip(1), c.port);
    assert!(
        r.stderr
            .contains(&format!("job failed: {m1} trainer1 (pid ")),
        "names host and process: {r:?}"
    );
    assert!(r.stderr.contains("exit 7"), "{r:?}");
    assert!(
        r.stderr.contains("| trainer 3 failing on purpose"),
        "last stderr lines: {r:?}"
    );
    assert!(!pid_files(&c, "sampler").is_empty(), "samplers ran");
    redacted(&c).bind(|| {
        insta::assert_snapshot!("failing_trainer_final_message", final_message(&r.stderr));
    });
    assert_nothing_left(&c, "after a trainer failure");
}

#[test]
fn a_trainer_killed_by_a_signal_gives_128_plus_signal() {
    let c = cluster();
    let r = run(
        c.launch_direct(
            "1",
            &[],
            "python3 fake_dgl.py --fail-rank 0 --fail-signal KILL --hang",
        ),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 137, "{r:?}");
    assert!(r.stderr.contains("killed by SIGKILL"), "{r:?}");
    assert_nothing_left(&c, "after a signal");
}

/// Starts dgl-coord and waits until `n` stdout lines contain `marker`.
fn start_until(
    mut cmd: Command,
    marker: &str,
    n: usize,
) -> (
    Child,
    std::thread::JoinHandle<String>,
    std::thread::JoinHandle<String>,
) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dgl-coord");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    let out = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let err = reader(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = 0;
    while seen < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(marker) => seen += 1,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "saw {seen} of {n} `{marker}` lines; stderr:\n{}",
                    err.join().unwrap_or_default()
                );
            }
        }
    }
    (child, out, err)
}

#[test]
fn sigint_stops_every_process_including_setsid_grandchildren() {
    let c = cluster();
    let mut cmd = launch(
        &c,
        &["--num_trainers", "2", "--num_samplers", "1"],
        "python3 fake_dgl.py --samplers --spawn-setsid-child --hang",
    );
    cmd.env("PYTHONPATH", torch_pythonpath());
    let (mut child, out, err) = start_until(cmd, "hanging", 6);
    let grandchildren = pid_files(&c, "grandchild");
    assert_eq!(
        grandchildren.len(),
        6,
        "every trainer forked its setsid child"
    );
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let status = wait_with_timeout(&mut child, Duration::from_secs(30)).expect("dgl-coord exits");
    let stop_time = t.elapsed();
    let stderr = err.join().unwrap_or_default();
    let _ = out.join();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("SIGINT: stopping the job on every host"),
        "{stderr}"
    );
    // The grandchildren ignore SIGTERM: they go at SIGKILL after the 1 s grace, and dgl-coord
    // returns only once the agents confirmed.
    assert!(stop_time >= Duration::from_secs(1), "{stop_time:?}");
    assert_nothing_left(&c, "after SIGINT");
}

#[test]
fn a_setsid_grandchild_ignoring_sigterm_does_not_outlive_a_successful_job() {
    let c = cluster();
    // The grandchildren keep the trainers' stdout open, so the pipes never reach EOF.
    let r = run(
        c.launch_direct(
            "1",
            &[],
            "python3 fake_dgl.py --spawn-setsid-child --grandchild-keep-stdio",
        ),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(pid_files(&c, "grandchild").len(), 3);
    assert_nothing_left(&c, "after success with lingering grandchildren");
}

#[test]
fn lines_are_never_torn_or_interleaved() {
    let c = cluster();
    let r = run(
        c.launch_direct(
            "2",
            &[],
            "python3 fake_dgl.py --lines 3000 --line-bytes 300 --long-line 150000",
        ),
        Duration::from_secs(120),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    let mut per_trainer: HashMap<String, (usize, usize)> = HashMap::new();
    let mut long_pieces: HashMap<String, Vec<usize>> = HashMap::new();
    for (text, stream) in [(&r.stdout, "out"), (&r.stderr, "err")] {
        for line in text.lines() {
            let Some(rest) = line.strip_prefix('[') else {
                continue;
            };
            let Some((label, body)) = rest.split_once("] ") else {
                continue;
            };
            if !label.contains("trainer") {
                continue;
            }
            if body.starts_with('x') {
                assert!(
                    body.bytes().all(|b| b == b'x'),
                    "long line piece torn: {label}"
                );
                long_pieces
                    .entry(label.to_string())
                    .or_default()
                    .push(body.len());
                continue;
            }
            if !body.starts_with("trainer ") || !body.contains(&format!(" {stream} ")) {
                assert!(
                    !body.contains(" out ") && !body.contains(" err "),
                    "wrong stream: {line}"
                );
                continue;
            }
            // `trainer <t> out <i> xxx...` padded to 300 bytes; each trainer writes 3000 lines
            // to each stream.
            assert_eq!(body.len(), 300, "torn line: {line:.120}");
            assert!(
                body.trim_end_matches('x').len() < 40,
                "interleaved: {line:.120}"
            );
            // Numbered per stream: every line once, in order.
            let i: usize = body
                .split(' ')
                .nth(3)
                .and_then(|n| n.parse().ok())
                .expect("line number");
            let e = per_trainer.entry(label.to_string()).or_default();
            let next = if stream == "out" { &mut e.0 } else { &mut e.1 };
            assert_eq!(i, *next, "{label} {stream}: line {i} out of order");
            *next += 1;
        }
    }
    assert_eq!(per_trainer.len(), 6, "{per_trainer:?}");
    for (label, counts) in &per_trainer {
        assert_eq!(*counts, (3000, 3000), "{label}");
    }
    for (label, pieces) in &long_pieces {
        // 150000 bytes with no newline: pieces of at most 64 KiB, nothing lost.
        assert_eq!(pieces.iter().sum::<usize>(), 150_000, "{label}: {pieces:?}");
        assert!(pieces.iter().all(|&p| p <= 64 << 10), "{label}: {pieces:?}");
    }
    assert_eq!(long_pieces.len(), 6);
}

#[test]
fn stale_processes_of_the_workspace_block_a_new_launch_until_killed() {
    let c = cluster();
    let (mut first, _out, _err) = start_until(
        c.launch_direct(
            "1",
            &["--lease-timeout", "30"],
            "python3 fake_dgl.py --hang",
        ),
        "hanging",
        3,
    );
    // SIGKILL: no goodbye, the agents keep the job until its lease expires.
    let _ = first.kill();
    let _ = first.wait();
    let stale: Vec<u32> = records(&c).iter().map(|r| r.pid).collect();
    let r = run(
        c.launch_direct("1", &[], "python3 fake_dgl.py"),
        Duration::from_secs(30),
    );
    assert_ne!(r.code(), 0, "{r:?}");
    assert!(r.stderr.contains("are still running"), "{r:?}");
    assert!(r.stderr.contains("--kill-stale"), "{r:?}");
    assert!(
        wait_gone(&stale, Duration::ZERO).len() == stale.len(),
        "refusal left them alone"
    );
    let r = run(
        c.launch_direct(
            "1",
            &["--kill-stale", "--log-dir", "stale-logs"],
            "python3 fake_dgl.py",
        ),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stderr.contains("stopping stale"), "{r:?}");
    let log = std::fs::read_to_string(c.local().join("stale-logs/launch.log")).unwrap();
    assert!(
        log.contains("stopping stale"),
        "the log dir has the note too: {log}"
    );
    assert!(wait_gone(&stale, Duration::from_millis(100)).is_empty());
    assert_nothing_left(&c, "after --kill-stale");
}

#[test]
fn a_killed_coordinator_leaves_nothing_once_the_lease_expires() {
    let c = cluster();
    let (mut coord, _out, _err) = start_until(
        c.launch_direct(
            "1",
            &["--lease-timeout", "1"],
            "python3 fake_dgl.py --hang --spawn-setsid-child",
        ),
        "hanging",
        3,
    );
    let _ = coord.kill();
    let _ = coord.wait();
    let mut pids: Vec<u32> = records(&c).iter().map(|r| r.pid).collect();
    pids.extend(pid_files(&c, "grandchild"));
    // Lease 1 s + the agent's own grace (3 s by default) + scan rounds.
    let live = wait_gone(&pids, Duration::from_secs(10));
    assert!(live.is_empty(), "still alive: {live:?}");
    assert!(
        c.agent_log(0).contains("lease expired"),
        "the agent says why"
    );
    assert_nothing_left(&c, "after the lease expired");
}

#[test]
fn a_lost_agent_fails_the_job_and_the_others_are_stopped() {
    let mut c = cluster();
    let (mut coord, _out, err) = start_until(
        c.launch_direct("1", &["--lease-timeout", "2"], "python3 fake_dgl.py --hang"),
        "hanging",
        3,
    );
    let on_lost_host: Vec<u32> = records(&c)
        .iter()
        .filter(|r| r.host == 2)
        .map(|r| r.pid)
        .collect();
    c.kill_agent(2);
    let status = wait_with_timeout(&mut coord, Duration::from_secs(30)).expect("dgl-coord exits");
    let stderr = err.join().unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("lost the agent of m2 ({}:{})", c.ip(2), c.port)),
        "{stderr}"
    );
    let others: Vec<u32> = records(&c)
        .iter()
        .filter(|r| r.host != 2)
        .map(|r| r.pid)
        .collect();
    assert!(
        wait_gone(&others, Duration::from_millis(500)).is_empty(),
        "other hosts stopped"
    );
    // The killed agent could not stop its own processes (its restart cleans up);
    // don't leak them from the test.
    for p in on_lost_host {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[test]
fn a_workspace_that_does_not_match_is_refused_before_anything_starts() {
    let c = cluster();
    // Host 1's ip_config differs, host 2 lacks the partition config.
    std::fs::write(c.root(1).join(WS).join("ip_config.txt"), "10.9.9.9\n").expect("write");
    std::fs::remove_file(c.root(2).join(WS).join("data/g.json")).expect("rm");
    let r = run(
        launch(&c, &["--num_trainers", "1"], "python3 fake_dgl.py"),
        Duration::from_secs(30),
    );
    assert_ne!(r.code(), 0);
    let m1 = format!("m1 ({}:{})", c.ip(1), c.port);
    let m2 = format!("m2 ({}:{})", c.ip(2), c.port);
    assert!(
        r.stderr
            .contains(&format!("{m1}: its ip_config.txt lists other machines")),
        "{r:?}"
    );
    assert!(
        r.stderr
            .contains(&format!("{m2}: part_config data/g.json not found")),
        "{r:?}"
    );
    assert!(records(&c).is_empty(), "nothing ran");
    redacted(&c).bind(|| {
        insta::assert_snapshot!("workspace_mismatch", r.stderr);
    });
}

/// What a user reads when dgl-coord cannot use an agent: the token is not the agents', the
/// port is some other server's, nothing listens there.
#[test]
fn agent_connection_errors_snapshot() {
    let mut c = TestCluster::with_workspace(1);
    let other = c.dir.path().join("other-token");
    write_token_file(&other).expect("token file");
    let mut cmd = launch(&c, &["--num_trainers", "1"], "python3 fake_dgl.py");
    cmd.env("DGL_AGENT_TOKEN_FILE", &other);
    let r = run(cmd, Duration::from_secs(60));
    assert_eq!(r.code(), 1, "{r:?}");
    redacted(&c).bind(|| insta::assert_snapshot!("wrong_token", r.stderr));

    // An HTTP/1 server that answers everything with 400, as most web servers would.
    let http = std::net::TcpListener::bind((c.ip(0), 0)).expect("bind");
    c.port = http.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut conn in http.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            });
        }
    });
    let r = run(
        launch(&c, &["--num_trainers", "1"], "python3 fake_dgl.py"),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 1, "{r:?}");
    redacted(&c).bind(|| insta::assert_snapshot!("not_an_agent", r.stderr));

    // A port that was just free: nothing listens there.
    c.port = std::net::TcpListener::bind((c.ip(0), 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let r = run(
        launch(&c, &["--num_trainers", "1"], "python3 fake_dgl.py"),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 1, "{r:?}");
    redacted(&c).bind(|| insta::assert_snapshot!("agent_unreachable", r.stderr));
}

#[test]
fn dry_run_json_matches_dgl_for_the_compat_cases() {
    let dir = compat_dir();
    let cases: Vec<Value> =
        serde_json::from_slice(&std::fs::read(dir.join("launch_cases.json")).expect("cases"))
            .expect("cases JSON");
    let local = tempfile::tempdir().expect("tmp");
    for case in &cases {
        let name = case["name"].as_str().unwrap_or_default();
        let lines: Vec<&str> = case["ip_config"]
            .as_array()
            .expect("ip_config")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        std::fs::write(local.path().join("ip_config.txt"), lines.join("\n") + "\n").expect("write");
        let n = |k: &str| case[k].as_u64().expect(k).to_string();
        let mut cmd = Command::new(dglrun_integration_tests::bin("dgl-coord"));
        cmd.current_dir(local.path())
            .env_remove("PYTHONPATH")
            .env_remove("OMP_NUM_THREADS")
            .args([
                "launch",
                "--workspace",
                "/ws",
                "--ip_config",
                "ip_config.txt",
            ])
            .args([
                "--part_config",
                case["part_config"].as_str().unwrap_or_default(),
            ])
            .args([
                "--num_trainers",
                &n("num_trainers"),
                "--num_samplers",
                &n("num_samplers"),
            ])
            .args([
                "--num_servers",
                &n("num_servers"),
                "--num_omp_threads",
                &n("num_omp_threads"),
            ])
            .args(["--num_server_threads", &n("num_server_threads")])
            .args([
                "--graph_format",
                case["graph_format"].as_str().unwrap_or_default(),
            ]);
        let envs: Vec<&str> = case["extra_envs"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if !envs.is_empty() {
            cmd.arg("--extra_envs").args(&envs);
        }
        cmd.args(["--dry-run", "--json"])
            .arg(case["udf_command"].as_str().unwrap_or_default());
        let r = run(cmd, Duration::from_secs(30));
        assert_eq!(r.code(), 0, "{name}: {r:?}");
        let plan: Value = serde_json::from_str(&r.stdout).expect("plan JSON");
        let mut got: Vec<String> = plan["processes"]
            .as_array()
            .expect("processes")
            .iter()
            .map(|p| {
                let command = match (&p["command"]["argv"], &p["command"]["shell"]) {
                    (Value::Array(a), _) => a
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(" "),
                    (_, Value::String(s)) => s.clone(),
                    other => panic!("{name}: command {other:?}"),
                };
                // dglrun's additions to DGL's environment: torchrun's error file, and the
                // interface gloo, tensorpipe and NCCL use (no agent answers here: the dry run
                // shows a placeholder for it).
                let mut env = p["env"].clone();
                if let Some(e) = env.as_object_mut() {
                    e.shift_remove("TORCHELASTIC_ERROR_FILE");
                    for k in [
                        "GLOO_SOCKET_IFNAME",
                        "TP_SOCKET_IFNAME",
                        "NCCL_SOCKET_IFNAME",
                    ] {
                        let ip = case["ip_config"][p["machine"].as_u64().unwrap() as usize]
                            .as_str()
                            .unwrap_or_default()
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_string();
                        assert_eq!(
                            e.shift_remove(k),
                            Some(Value::String(format!("<interface of {ip}>"))),
                            "{name}: {k}"
                        );
                    }
                }
                format!(
                    "{} {} {} {}",
                    p["machine"],
                    p["role"].as_str().unwrap_or_default(),
                    env,
                    command
                )
            })
            .collect();
        let mut want: Vec<String> = case["processes"]
            .as_array()
            .expect("processes")
            .iter()
            .map(|p| {
                let env: BTreeMap<String, Value> =
                    serde_json::from_value(p["env"].clone()).expect("env");
                format!(
                    "{} {} {} {}",
                    p["machine"],
                    p["role"].as_str().unwrap_or_default(),
                    serde_json::to_string(&env).expect("env"),
                    p["command"].as_str().unwrap_or_default()
                )
            })
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "case {name}");
    }
}

/// A job cannot drive the user's terminal: in text mode every control character it prints
/// (C0 but tab, DEL, C1) and every byte that is not UTF-8 reaches the terminal as `\xNN`, in
/// the labelled lines and in the summary's stderr tail alike.
#[test]
fn control_sequences_from_the_job_are_escaped_in_text_mode() {
    let c = TestCluster::with_workspace(1);
    let script = r"import sys
sys.stdout.buffer.write(b'a\x1b]0;pwned\x07b\rc\x00d\x7fe\xc2\x9bf\xff\tg\n')
sys.stdout.flush()
sys.stderr.buffer.write(b'err\x1b[2J\x1b[H\n')
sys.exit(3)";
    std::fs::write(c.root(0).join(WS).join("ctl.py"), script).unwrap();
    let r = run(
        c.launch_direct("1", &[], "python3 ctl.py"),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 3, "{r:?}");
    assert!(
        r.stdout
            .contains(r"] a\x1b]0;pwned\x07b\x0dc\x00d\x7fe\xc2\x9bf\xff	g"),
        "{r:?}"
    );
    assert!(r.stderr.contains(r"err\x1b[2J\x1b[H"), "{r:?}");
    for raw in ['\u{1b}', '\u{7}', '\r', '\0', '\u{7f}', '\u{9b}'] {
        assert!(!r.stdout.contains(raw), "raw {raw:?} on stdout: {r:?}");
        assert!(!r.stderr.contains(raw), "raw {raw:?} on stderr: {r:?}");
    }
}

/// `launch --dry-run` with `flags`, workspace `ws`, on `c`'s agents.
fn dry_run(c: &TestCluster, ws: &str, flags: &[&str]) -> dglrun_integration_tests::run::Run {
    let mut cmd = c.coord();
    cmd.args([
        "launch",
        "--dry-run",
        "--workspace",
        ws,
        "--num_servers",
        "1",
    ])
    .args(["--num_trainers", "1", "--part_config", "data/g.json"])
    .args(["--ip_config", "ip_config.txt"])
    .args(flags)
    .arg("python3 fake_dgl.py");
    run(cmd, Duration::from_secs(60))
}

/// A dry run asks the agents what the real launch would find (Preflight is read-only), says
/// per host what it checked, and fails where the launch would; offline, or with agents out
/// of reach, it says that nothing remote was checked.
#[test]
fn dry_run_runs_the_agents_checks_or_says_it_did_not() {
    let c = TestCluster::with_workspace(2);
    let r = dry_run(&c, WS, &[]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.contains("[m1 trainers]"), "the plan: {r:?}");
    redacted(&c).bind(|| insta::assert_snapshot!("dry_run_checked", r.stderr));
    for m in 0..2 {
        let host = format!("m{m} ({}:{})", c.ip(m), c.port);
        assert!(
            r.stderr
                .contains(&format!("dry run: {host} checked: workspace")),
            "{r:?}"
        );
    }
    // Outside every agent's root: the real launch fails, so the dry run does too.
    let outside = c.dir.path().join("elsewhere");
    std::fs::create_dir_all(&outside).unwrap();
    let r = dry_run(&c, outside.to_str().unwrap(), &[]);
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr.contains("cannot launch"), "{r:?}");
    assert!(
        r.stderr.contains(&format!("m1 ({}:{})", c.ip(1), c.port)),
        "{r:?}"
    );
    // Offline: the plan, and a plain word that nothing remote was checked.
    let r = dry_run(&c, outside.to_str().unwrap(), &["--offline"]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stderr.contains("nothing remote was checked"), "{r:?}");
    // Agents out of reach: the same, with the reason.
    let mut unreachable = TestCluster::with_workspace(1);
    unreachable.port = 1;
    let r = dry_run(&unreachable, WS, &[]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stderr.contains("nothing remote was checked"), "{r:?}");
}

/// In torchrun mode a failing rank's own exit code is the job's, not torchrun's 1, and the
/// failure names the rank; every torchrun gets a TORCHELASTIC_ERROR_FILE of its own in the
/// workspace, where torchrun keeps the root cause's error record as real torchrun does.
#[test]
fn torchrun_mode_reports_the_failing_ranks_own_exit_code() {
    let c = cluster();
    let mut cmd = launch(
        &c,
        &["--num_trainers", "2"],
        "python3 fake_dgl.py --fail-rank 3 --fail-code 7 --hang",
    );
    cmd.env("PYTHONPATH", torch_pythonpath());
    let r = run(cmd, Duration::from_secs(90));
    assert_eq!(r.code(), 7, "the rank's own code: {r:?}");
    assert!(
        r.stderr
            .contains("rank 3 (local_rank 1) exited with code 7"),
        "{r:?}"
    );
    assert!(r.stderr.contains("exit code 7"), "{r:?}");
    let recs = records(&c);
    let mut files: Vec<&str> = recs
        .iter()
        .filter(|r| r.role == "torchrun")
        .map(|r| env_of(r, "TORCHELASTIC_ERROR_FILE"))
        .collect();
    files.sort();
    files.dedup();
    assert_eq!(files.len(), 3, "one error file per torchrun: {files:?}");
    assert_nothing_left(&c, "after a rank failed under torchrun");
}

/// A rank whose entry point is decorated with torch's `@record` leaves its exception in its
/// error file; torchrun copies it, with the rank's exit code, into the TORCHELASTIC_ERROR_FILE
/// dglrun gave it in the workspace, and the failure names that file.
#[test]
fn torchrun_keeps_a_recorded_ranks_error_in_the_workspace() {
    let c = TestCluster::with_workspace(1);
    let script = r#"import json, os, sys, time, traceback
if os.environ.get("DGL_ROLE") == "client" and os.environ.get("RANK") == "1":
    try:
        raise RuntimeError("rank 1 broke")
    except RuntimeError as e:  # what torch's @record writes
        data = {"message": {"message": f"RuntimeError: {e}", "extraInfo": {
            "py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))}}}
        with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
            json.dump(data, f)
        sys.exit(1)
time.sleep(120)
"#;
    let ws = c.root(0).join(WS);
    std::fs::write(ws.join("rec.py"), script).unwrap();
    let mut cmd = launch(&c, &["--num_trainers", "2"], "python3 rec.py");
    cmd.env("PYTHONPATH", torch_pythonpath());
    let r = run(cmd, Duration::from_secs(90));
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(
        r.stderr
            .contains("rank 1 (local_rank 1) exited with code 1 (its error file: "),
        "{r:?}"
    );
    let kept: Vec<_> = std::fs::read_dir(&ws)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(".dglrun-") && n.ends_with("-m0-torchrun-error.json")
        })
        .collect();
    assert_eq!(kept.len(), 1, "{r:?}");
    let v: Value = serde_json::from_slice(&std::fs::read(kept[0].path()).unwrap()).unwrap();
    assert_eq!(v["message"]["message"], "RuntimeError: rank 1 broke");
    assert_eq!(v["message"]["errorCode"], 1);
}
