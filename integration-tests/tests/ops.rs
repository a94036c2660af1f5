//! Operations: the machine-readable outputs (`launch --json`, `--log-dir`,
//! `status --json`, `run --json`), exit codes, agent settings precedence, completions and man
//! pages, and per-host trainer counts — against real agents and the stand-in DGL workload.

// Test code throughout: a failed unwrap is a failed test, and a test may set its own
// environment and sleep; its helper modules are private to this test.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dglrun_integration_tests::run::{reader, run, wait_with_timeout};
use dglrun_integration_tests::{bin, fake_dgl, fixtures_dir, gen_partitions, TestCluster, WS};
use serde_json::Value;

fn cluster() -> TestCluster {
    TestCluster::with_workspace(3)
}

fn launch(c: &TestCluster, flags: &[&str], command: &str) -> Command {
    c.launch(flags, command)
}

fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event"] == kind).collect()
}

/// The summary is the last event, and the only one.
fn summary(events: &[Value]) -> &Value {
    let last = events.last().expect("at least one event");
    assert_eq!(last["event"], "summary", "last event: {last}");
    assert_eq!(of_kind(events, "summary").len(), 1);
    last
}

fn records(c: &TestCluster, role: &str) -> Vec<(usize, BTreeMap<String, String>)> {
    let mut out = Vec::new();
    for host in 0..c.len() {
        for (name, v) in fake_dgl::records(c.root(host)) {
            if name.starts_with(&format!("{role}-")) {
                out.push((host, fake_dgl::env_of(&v)));
            }
        }
    }
    out
}

#[test]
fn launch_json_streams_every_event_and_log_dir_keeps_them() {
    let c = cluster();
    let logs = c.dir.path().join("logs");
    let logs_arg = logs.display().to_string();
    let r = run(
        c.launch_direct(
            "1",
            &["--json", "--log-dir", &logs_arg],
            "python3 fake_dgl.py --ip_config ip_config.txt --lines 4",
        ),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(!r.stdout.contains("[m0 "), "no labelled text on stdout");
    let events = r.events();
    let kinds = ["started", "line", "lost_lines", "exited", "summary"];
    for e in &events {
        let kind = e["event"].as_str().unwrap_or_default();
        assert!(kinds.contains(&kind), "undocumented event {e}");
        assert!(e["elapsed_ms"].is_u64(), "{e}");
        if kind != "summary" {
            // One vocabulary with `status --json`: `machine` and `address` (the agent's).
            assert!(e["machine"].is_u64() && e["address"].is_string(), "{e}");
            assert!(e.get("host").is_none(), "{e}");
        }
    }

    // started: one per process, with its pid, host and role.
    let started = of_kind(&events, "started");
    assert_eq!(started.len(), 6, "3 servers and 3 trainers: {r:?}");
    for s in &started {
        let m = s["machine"].as_u64().expect("machine") as usize;
        assert_eq!(s["address"], format!("{}:{}", c.ip(m), c.port));
        assert!(s["pid"].as_u64().is_some_and(|p| p > 0), "{s}");
        assert!(["server", "trainer"].contains(&s["role"].as_str().unwrap_or_default()));
    }
    // line: the trainers' lines, on the stream they were written to.
    let lines = of_kind(&events, "line");
    let find = |label: &str, machine: u64, text: &str| {
        lines.iter().find(|l| {
            l["label"] == label
                && l["machine"] == machine
                && l["text"].as_str().unwrap_or_default().starts_with(text)
        })
    };
    let out = find("trainer0", 1, "trainer 1 out 0").expect("a stdout line");
    assert_eq!(out["stream"], "stdout");
    let err = find("trainer0", 2, "trainer 2 err 1").expect("a stderr line");
    assert_eq!(err["stream"], "stderr");
    // exited: one per process; trainers exited 0, servers too (the stand-in ends once every
    // trainer said bye) or were stopped: never a failure.
    let exited = of_kind(&events, "exited");
    assert_eq!(exited.len(), 6, "{r:?}");
    for x in &exited {
        assert_eq!(x["failed"], false, "{x}");
        assert!(x["runtime_ms"].is_u64(), "{x}");
        if x["role"] == "trainer" || x["stopped_by_agent"] == false {
            assert_eq!((&x["code"], &x["exit_code"]), (&0.into(), &0.into()), "{x}");
            assert_eq!(
                (&x["signal"], &x["status"]),
                (&Value::Null, &"exit 0".into())
            );
        }
    }
    // summary: last, complete.
    let s = summary(&events);
    assert_eq!(s["outcome"], "success");
    assert_eq!(s["exit_code"], 0);
    assert!(s["error"].is_null());
    assert!(s["job_id"]
        .as_str()
        .is_some_and(|j| j.starts_with("dglrun-")));
    assert!(
        s["all_started_ms"].is_u64() && s["teardown_ms"].is_u64(),
        "{s}"
    );
    let procs = s["processes"].as_array().expect("processes");
    assert_eq!(procs.len(), 6);
    for p in procs {
        assert_eq!(p["started"], true, "{p}");
        assert!(p["exit"].is_object() && p["status"].is_string(), "{p}");
    }

    // --log-dir: one .out/.err per process, the merged log, the events, the summary.
    let read = |name: &str| {
        std::fs::read_to_string(logs.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    for m in 0..3 {
        for label in ["server0", "trainer0"] {
            read(&format!("m{m}-{label}.out"));
            read(&format!("m{m}-{label}.err"));
        }
    }
    let (out1, err1) = (read("m1-trainer0.out"), read("m1-trainer0.err"));
    assert!(out1.contains("trainer 1 out 0"), "{out1}");
    assert!(err1.contains("trainer 1 err 1"), "{err1}");
    assert!(!read("m1-trainer0.out").contains(" err "));
    let merged = read("launch.log");
    assert!(merged.contains("[m2 trainer0] trainer 2 out 2"), "{merged}");
    assert!(
        merged.contains("[m0 server0] server 0 listening on"),
        "{merged}"
    );
    assert!(merged.contains("exit code 0"), "the table too: {merged}");
    assert_eq!(
        read("events.jsonl"),
        r.stdout,
        "events.jsonl is the --json stream"
    );
    assert!(read("summary.txt").contains("exit code 0"));
    let sj: Value = serde_json::from_str(&read("summary.json")).expect("summary.json");
    assert_eq!(&sj["event"], &Value::Null, "the summary object itself");
    assert_eq!(sj["job_id"], s["job_id"]);
    assert_eq!(sj["processes"], s["processes"]);
}

#[test]
fn a_failed_job_says_who_and_why_in_json_and_text_logs() {
    let c = cluster();
    let logs = c.dir.path().join("logs");
    let logs_arg = logs.display().to_string();
    let r = run(
        c.launch_direct(
            "1",
            &["--json", "--log-dir", &logs_arg],
            "python3 fake_dgl.py --fail-rank 1 --fail-code 7 --hang",
        ),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 7, "worst exit code: {r:?}");
    let events = r.events();
    let failed: Vec<&Value> = of_kind(&events, "exited")
        .into_iter()
        .filter(|x| x["failed"] == true)
        .collect();
    assert_eq!(failed.len(), 1, "{r:?}");
    assert_eq!(
        (&failed[0]["machine"], &failed[0]["code"]),
        (&1.into(), &7.into())
    );
    let s = summary(&events);
    assert_eq!(s["outcome"], "failed");
    assert_eq!(s["exit_code"], 7);
    assert_eq!(s["failed_process"]["machine"], 1);
    assert_eq!(s["failed_process"]["label"], "trainer0");
    assert_eq!(
        s["failed_process"]["address"],
        format!("{}:{}", c.ip(1), c.port)
    );
    let tail = s["failed_stderr_tail"].as_array().expect("tail");
    assert!(
        tail.iter().any(|l| l == "trainer 1 failing on purpose"),
        "{s}"
    );
    assert!(s["error"]
        .as_str()
        .is_some_and(|e| e.contains("trainer0") && e.contains("exit 7")));
    // The messages of dgl-coord stay on stderr, and reach the merged log.
    assert!(r.stderr.contains("job failed"), "{r:?}");
    let merged = std::fs::read_to_string(logs.join("launch.log")).expect("launch.log");
    assert!(merged.contains("dgl-coord: job failed"), "{merged}");
    assert!(merged.contains("exit code 7"), "{merged}");
}

#[test]
fn errors_before_anything_starts_exit_1_with_a_summary_and_usage_errors_exit_2() {
    let dir = tempfile::tempdir().expect("tmp");
    let coord = || {
        let mut c = Command::new(bin("dgl-coord"));
        c.current_dir(dir.path()).env_remove("DGL_AGENT_TOKEN");
        c
    };
    // No such ip_config: exit 1, and --json still ends with its summary.
    let mut c = coord();
    c.args(["launch", "--workspace", "ws", "--num_trainers", "1"])
        .args(["--num_servers", "1", "--part_config", "p.json"])
        .args(["--ip_config", "missing.txt", "--json", "python3 x.py"]);
    let r = run(c, Duration::from_secs(30));
    assert_eq!(r.code(), 1, "{r:?}");
    let events = r.events();
    let s = summary(&events);
    assert_eq!(
        (&s["outcome"], &s["exit_code"]),
        (&"error".into(), &1.into())
    );
    assert!(s["error"]
        .as_str()
        .is_some_and(|e| e.contains("missing.txt")));
    assert!(r.stderr.contains("dgl-coord: error:"), "{r:?}");

    // Usage errors: clap's, and a user command the shell split.
    for args in [
        &["launch", "--bogus"][..],
        &[
            "launch",
            "--workspace",
            "w",
            "--num_trainers",
            "1",
            "--num_servers",
            "1",
        ],
        &[
            "launch",
            "--workspace",
            "w",
            "--num_servers",
            "1",
            "--part_config",
            "p",
            "--ip_config",
            "i",
            "python3",
            "x.py",
        ],
        &["completions", "tcsh"],
        &[
            "launch",
            "--workspace",
            "w",
            "--num_trainers",
            "1",
            "--trainers-per-host",
            "1,1",
            "--num_servers",
            "1",
            "--part_config",
            "p",
            "--ip_config",
            "i",
            "python3 x.py",
        ],
    ] {
        let mut c = coord();
        c.args(args);
        let r = run(c, Duration::from_secs(30));
        assert_eq!(r.code(), 2, "{args:?}: {r:?}");
    }
}

#[test]
fn per_host_trainer_counts_give_global_ranks_in_direct_mode_and_are_refused_by_torchrun() {
    let c = cluster();
    let r = run(
        launch(
            &c,
            &[
                "--trainers-per-host",
                "2,1,3",
                "--num_samplers",
                "1",
                "--trainer-mode",
                "direct",
            ],
            "python3 fake_dgl.py --ip_config ip_config.txt --samplers",
        ),
        Duration::from_secs(90),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    let counts = [2usize, 1, 3];
    let trainers = records(&c, "trainer");
    assert_eq!(trainers.len(), 6, "{r:?}");
    let mut ranks: Vec<usize> = Vec::new();
    for (host, env) in &trainers {
        let get = |k: &str| env.get(k).cloned().unwrap_or_else(|| format!("<no {k}>"));
        let rank: usize = get("RANK").parse().expect("RANK");
        let local: usize = get("LOCAL_RANK").parse().expect("LOCAL_RANK");
        let base: usize = counts[..*host].iter().sum();
        assert_eq!(
            rank,
            base + local,
            "rank {rank} on machine {host}: contiguous"
        );
        assert!(local < counts[*host]);
        assert_eq!(get("LOCAL_WORLD_SIZE"), counts[*host].to_string());
        assert_eq!(get("WORLD_SIZE"), "6");
        assert_eq!(get("GROUP_RANK"), host.to_string());
        assert_eq!(get("GROUP_WORLD_SIZE"), "3");
        // sum over hosts of trainers * (1 + samplers)
        assert_eq!(get("DGL_NUM_CLIENT"), "12");
        ranks.push(rank);
    }
    ranks.sort();
    assert_eq!(ranks, (0..6).collect::<Vec<_>>());
    for (_, env) in records(&c, "server") {
        assert_eq!(env.get("DGL_NUM_CLIENT").map(String::as_str), Some("12"));
    }
    // Exit 0 means each trainer passed the stand-in's WORLD_SIZE * (1 + samplers) ==
    // DGL_NUM_CLIENT check and met all WORLD_SIZE trainers on the store.
    assert!(
        r.stdout
            .contains("[m2 trainer2] trainer 5 talked to 3 servers"),
        "{r:?}"
    );

    // torchrun mode cannot give hosts different counts: refused before anything starts.
    let before = records(&c, "trainer").len() + records(&c, "server").len();
    let r = run(
        launch(
            &c,
            &["--trainers-per-host", "2,1,3"],
            "python3 fake_dgl.py --ip_config ip_config.txt",
        ),
        Duration::from_secs(30),
    );
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr.contains("--trainer-mode direct"), "{r:?}");
    let after = records(&c, "trainer").len() + records(&c, "server").len();
    assert_eq!(before, after, "nothing ran");
}

/// Starts a job that hangs, reads `status --json` while it runs, then Ctrl-C: exit 130.
#[test]
fn status_json_shows_the_running_job_and_ctrl_c_exits_130() {
    let c = cluster();
    let mut child = c
        .launch_direct(
            "1",
            &["--json"],
            "python3 fake_dgl.py --ip_config ip_config.txt --hang",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dgl-coord");
    let stdout = child.stdout.take().expect("stdout");
    let err = reader(child.stderr.take().expect("stderr"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen
        .iter()
        .filter(|l: &&String| l.contains("hanging"))
        .count()
        < 3
    {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => seen.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!("the trainers never hung: {seen:#?}");
            }
        }
    }
    let mut status = c.coord();
    status
        .args(["status", "--json", "--ip_config"])
        .arg(c.ip_config_file());
    let st = run(status, Duration::from_secs(30));
    assert_eq!(st.code(), 0, "{st:?}");
    let hosts: Value = serde_json::from_str(&st.stdout).expect("status JSON");
    let hosts = hosts.as_array().expect("one entry per host");
    assert_eq!(hosts.len(), 3);
    for (m, h) in hosts.iter().enumerate() {
        assert_eq!(h["machine"], m);
        assert_eq!(h["address"], format!("{}:{}", c.ip(m), c.port));
        assert_eq!(h["reachable"], true);
        let agent = &h["agent"];
        assert!(
            agent["version"].is_string() && agent["free_bytes"].is_u64(),
            "{h}"
        );
        assert_eq!(agent["root"], c.root(m).display().to_string());
        let jobs = h["jobs"].as_array().expect("jobs");
        assert_eq!(jobs.len(), 1, "{h}");
        let procs = jobs[0]["processes"].as_array().expect("processes");
        let labels: Vec<&str> = procs.iter().filter_map(|p| p["label"].as_str()).collect();
        assert_eq!(labels, ["server0", "trainer0"], "{h}");
        assert!(procs.iter().all(|p| p["running"] == true), "{h}");
        assert!(jobs[0]["job_id"]
            .as_str()
            .is_some_and(|j| j.starts_with("dglrun-")));
    }

    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let code = wait_with_timeout(&mut child, Duration::from_secs(30));
    let stderr = err.join().unwrap_or_default();
    let rest: Vec<String> = rx.try_iter().collect();
    assert_eq!(code.and_then(|s| s.code()), Some(130), "{stderr}");
    let last: Value = serde_json::from_str(rest.last().expect("summary")).expect("JSON");
    assert_eq!(last["event"], "summary");
    assert_eq!(
        (&last["outcome"], &last["exit_code"]),
        (&"signal".into(), &130.into())
    );
}

#[test]
fn run_copies_then_launches_what_it_copied() {
    let c = TestCluster::start(3);
    let local = c.local();
    let part_config = gen_partitions(&local.join("parts"), 3, 1000, "g").expect("partitions");
    let code = local.join("code");
    std::fs::create_dir_all(&code).expect("code");
    std::fs::copy(fixtures_dir().join("fake_dgl.py"), code.join("fake_dgl.py")).expect("script");
    let mut cmd = c.coord();
    cmd.env("XDG_CACHE_HOME", c.dir.path().join("cache"))
        .args(["run", "--workspace", WS, "--rel_data_path", "data"])
        .arg("--part_config")
        .arg(&part_config)
        .arg("--ip_config")
        .arg(c.ip_config_file())
        .arg("--script_folder")
        .arg(&code)
        .args([
            "--progress",
            "quiet",
            "--num_trainers",
            "1",
            "--num_servers",
            "1",
        ])
        .args(["--trainer-mode", "direct", "--grace", "1", "--json"])
        .arg("python3 code/fake_dgl.py --ip_config ip_config.txt")
        .env_remove("OMP_NUM_THREADS")
        .env_remove("PYTHONPATH");
    let r = run(cmd, Duration::from_secs(90));
    assert_eq!(r.code(), 0, "{r:?}");
    let events = r.events();
    let copy = &events[0];
    assert_eq!(copy["event"], "copy", "the copy report comes first");
    assert_eq!(copy["ok"], true);
    assert_eq!(copy["launch"]["part_config"], "data/g.json");
    assert_eq!(of_kind(&events, "started").len(), 6);
    let s = summary(&events);
    assert_eq!(
        (&s["outcome"], &s["exit_code"]),
        (&"success".into(), &0.into())
    );
    // The processes ran in the copied workspace with the copied configs.
    let servers = records(&c, "server");
    assert_eq!(servers.len(), 3);
    for (_, env) in &servers {
        assert_eq!(env["DGL_CONF_PATH"], "data/g.json");
        assert_eq!(env["DGL_IP_CONFIG"], "ip_config.txt");
    }
}

/// `dgl-agent --print-config ARGS` with only the given `DGL_AGENT_*` variables.
fn print_config(args: &[&str], env: &[(&str, &str)]) -> toml::Table {
    let mut c = Command::new(bin("dgl-agent"));
    for (k, _) in std::env::vars() {
        if k.starts_with("DGL_AGENT_") {
            c.env_remove(k);
        }
    }
    c.arg("--print-config").args(args).envs(env.iter().copied());
    let r = run(c, Duration::from_secs(30));
    assert_eq!(r.code(), 0, "{r:?}");
    r.stdout
        .parse()
        .unwrap_or_else(|e| panic!("not TOML ({e}): {r:?}"))
}

#[test]
fn agent_settings_come_from_flags_then_env_then_toml() {
    let dir = tempfile::tempdir().expect("tmp");
    let toml = dir.path().join("agent.toml");
    std::fs::write(
        &toml,
        "root = \"/from/toml\"\ngrace = 7.0\nlease_timeout = 8.0\nlisten = \"127.0.0.9:5000\"\n",
    )
    .expect("toml");
    let toml_arg = toml.display().to_string();
    let only_toml = print_config(&["--config", &toml_arg], &[]);
    assert_eq!(only_toml["root"].as_str(), Some("/from/toml"));
    assert_eq!(only_toml["listen"].as_str(), Some("127.0.0.9:5000"));
    assert_eq!(only_toml["grace"].as_float(), Some(7.0));

    let env = [
        ("DGL_AGENT_ROOT", "/from/env"),
        ("DGL_AGENT_GRACE", "5"),
        ("DGL_AGENT_CONFIG", toml_arg.as_str()),
    ];
    let all = print_config(&["--root", "/from/flag"], &env);
    assert_eq!(
        all["root"].as_str(),
        Some("/from/flag"),
        "flag beats env and TOML"
    );
    assert_eq!(all["grace"].as_float(), Some(5.0), "env beats TOML");
    assert_eq!(
        all["lease_timeout"].as_float(),
        Some(8.0),
        "TOML beats the default"
    );
    assert_eq!(all["listen"].as_str(), Some("127.0.0.9:5000"));
    let defaults = print_config(&["--root", "/r"], &[]);
    assert_eq!(defaults["lease_timeout"].as_float(), Some(10.0));
    assert_eq!(defaults["listen"].as_str(), Some("127.0.0.1:47001"));
}

#[test]
fn completions_and_man_pages_generate() {
    let dir = tempfile::tempdir().expect("tmp");
    for shell in ["bash", "zsh", "fish"] {
        for (prog, args) in [
            ("dgl-coord", vec!["completions", shell]),
            ("dgl-agent", vec!["--completions", shell]),
        ] {
            let mut c = Command::new(bin(prog));
            c.args(&args);
            let r = run(c, Duration::from_secs(30));
            assert_eq!(r.code(), 0, "{prog} {args:?}: {r:?}");
            assert!(r.stdout.contains(prog), "{prog} {shell}");
            // The script must at least parse in its shell, where that shell is installed.
            let path: PathBuf = dir.path().join(format!("{prog}.{shell}"));
            std::fs::write(&path, &r.stdout).expect("write");
            if has(shell) {
                let check = Command::new(shell)
                    .arg("-n")
                    .arg(&path)
                    .output()
                    .expect("shell");
                assert!(
                    check.status.success(),
                    "{prog} {shell}: {}",
                    String::from_utf8_lossy(&check.stderr)
                );
            }
        }
    }
    assert!(has("bash"), "bash checks the bash script");
    // And it completes: `dgl-coord la<TAB>` gives `launch`.
    let script = dir.path().join("dgl-coord.bash");
    let out = Command::new("bash")
        .arg("-c")
        .arg(
            "source \"$1\"; COMP_WORDS=(dgl-coord la); COMP_CWORD=1; \
             _dgl__coord dgl-coord la dgl-coord; echo \"${COMPREPLY[*]}\"",
        )
        .arg("bash")
        .arg(&script)
        .output()
        .expect("bash");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "launch");
    let mut c = Command::new(bin("dgl-coord"));
    c.args(["man", "--dir"]).arg(dir.path().join("man"));
    assert_eq!(run(c, Duration::from_secs(30)).code(), 0);
    for sub in ["", "-copy", "-launch", "-run", "-status", "-kill"] {
        let page = dir.path().join(format!("man/dgl-coord{sub}.1"));
        let text = std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{sub}: {e}"));
        assert!(
            text.contains(".TH") && text.contains(".SH OPTIONS"),
            "{sub}"
        );
    }
    let mut c = Command::new(bin("dgl-agent"));
    c.arg("--man");
    let r = run(c, Duration::from_secs(30));
    assert!(
        r.stdout.contains(".TH dgl-agent") && r.stdout.contains("metrics"),
        "{r:?}"
    );
}

fn has(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A `launch --json` of a job whose trainers hang, once every trainer said so: the child, its
/// stdout lines as they come, and its stderr once it ends.
struct Hanging {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Hanging {
    fn start(c: &TestCluster, flags: &[&str]) -> Self {
        Self::start_script(c, "fake_dgl.py", flags)
    }

    /// As [`start`](Self::start), with the stand-in at `script` in the workspace.
    fn start_script(c: &TestCluster, script: &str, flags: &[&str]) -> Self {
        let mut all = vec!["--json"];
        all.extend_from_slice(flags);
        let mut child = c
            .launch_direct(
                "1",
                &all,
                &format!("python3 {script} --ip_config ip_config.txt --hang"),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dgl-coord");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = reader(child.stderr.take().expect("stderr"));
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut h = Self {
            child,
            lines,
            stderr,
        };
        let mut hanging = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while hanging < c.len() {
            match h
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) => hanging += usize::from(l.contains("hanging")),
                Err(_) => {
                    let _ = h.child.kill();
                    panic!("the trainers never hung");
                }
            }
        }
        h
    }

    /// Waits (at most `limit`) for dgl-coord to exit: its code, its stderr, its last event.
    fn end(mut self, limit: Duration) -> (Option<i32>, String, Value) {
        let code = wait_with_timeout(&mut self.child, limit).and_then(|s| s.code());
        if code.is_none() {
            let _ = self.child.kill();
        }
        let stderr = self.stderr.join().unwrap_or_default();
        let rest: Vec<String> = self.lines.try_iter().collect();
        let last = rest
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or(Value::Null);
        (code, stderr, last)
    }

    fn job_id(c: &TestCluster) -> String {
        let mut status = c.coord();
        status
            .args(["status", "--json", "--ip_config"])
            .arg(c.ip_config_file());
        let st = run(status, Duration::from_secs(30));
        let hosts: Value = serde_json::from_str(&st.stdout).expect("status JSON");
        hosts[0]["jobs"][0]["job_id"]
            .as_str()
            .expect("a job on m0")
            .to_string()
    }
}

fn kill_cmd(c: &TestCluster, ip_config: &std::path::Path, extra: &[&str]) -> Command {
    let mut k = c.coord();
    k.args(["kill", "--grace", "1", "--ip_config"])
        .arg(ip_config)
        .args(extra);
    k
}

/// `dgl-coord kill` of a running job: the launch that owns it sees the stop at once, names who
/// stopped it, prints its summary and exits 143 (outcome `stopped`); a second kill says the
/// job had already finished; `--job` of an unknown id fails naming the id and the hosts.
#[test]
fn kill_ends_the_owning_launch_at_once_naming_who_stopped_it() {
    let c = cluster();
    let launch = Hanging::start(&c, &[]);
    let job = Hanging::job_id(&c);

    let k = run(
        kill_cmd(&c, &c.ip_config_file(), &["--job", &job]),
        Duration::from_secs(60),
    );
    assert_eq!(k.code(), 0, "{k:?}");
    for m in 0..c.len() {
        assert!(
            k.stdout.contains(&format!("m{m} (")) && k.stdout.contains("stopped job"),
            "{k:?}"
        );
    }
    let stopped_at = Instant::now();
    // Generous: far below the minute the launch used to sit until the agent forgot the job.
    let (code, stderr, summary) = launch.end(Duration::from_secs(20));
    assert!(
        stopped_at.elapsed() < Duration::from_secs(20),
        "the launch did not end after the kill: {stderr}"
    );
    assert_eq!(code, Some(143), "{stderr}");
    assert!(
        stderr.contains("stopped by dgl-coord kill from "),
        "{stderr}"
    );
    assert!(
        stderr.contains("(user ") && stderr.contains(", pid "),
        "{stderr}"
    );
    assert!(!stderr.contains("shutting down"), "{stderr}");
    assert!(!stderr.contains("lost the agent"), "{stderr}");
    assert_eq!(summary["event"], "summary", "{summary}");
    assert_eq!(
        (&summary["outcome"], &summary["exit_code"]),
        (&"stopped".into(), &143.into())
    );
    assert!(summary["error"]
        .as_str()
        .is_some_and(|e| e.contains("dgl-coord kill")));

    // The job is over: kill says so and signals nothing.
    let again = run(
        kill_cmd(&c, &c.ip_config_file(), &[]),
        Duration::from_secs(60),
    );
    assert_eq!(again.code(), 0, "{again:?}");
    assert!(!again.stdout.contains("stopped job"), "{again:?}");
    assert!(
        again
            .stdout
            .contains(&format!("job {job} had already finished")),
        "{again:?}"
    );

    // An id no agent knows is an error naming it and every host asked.
    let unknown = run(
        kill_cmd(&c, &c.ip_config_file(), &["--job", "no-such-id"]),
        Duration::from_secs(60),
    );
    assert_eq!(unknown.code(), 1, "{unknown:?}");
    assert!(unknown.stderr.contains("\"no-such-id\""), "{unknown:?}");
    for m in 0..c.len() {
        assert!(
            unknown
                .stderr
                .contains(&format!("m{m} ({}:{})", c.ip(m), c.port)),
            "{unknown:?}"
        );
    }
}

/// A kill that lands while the launch is still starting (one host's Spawn is slow): the launch
/// still reports the job as stopped by the kill (exit 143), not as a failed Spawn.
#[test]
fn a_kill_while_the_job_starts_is_a_stop_not_a_spawn_failure() {
    let mut c = cluster();
    // SAFETY: nextest runs each test in a process of its own, and no other thread of this
    // one reads the environment while it is set; only the restarted agent inherits it.
    unsafe { std::env::set_var("DGL_AGENT_TEST_SPAWN_DELAY_MS", "4000") };
    c.restart_agent(2);
    unsafe { std::env::remove_var("DGL_AGENT_TEST_SPAWN_DELAY_MS") };
    let mut launch = c
        .launch_direct(
            "1",
            &["--json"],
            "python3 fake_dgl.py --ip_config ip_config.txt --hang",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dgl-coord");
    let out = reader(launch.stdout.take().expect("stdout"));
    let err = reader(launch.stderr.take().expect("stderr"));
    // Machine 0's servers run while machine 2's Spawn still waits.
    let deadline = Instant::now() + Duration::from_secs(30);
    let job = loop {
        let mut status = c.coord();
        status
            .args(["status", "--json", "--ip_config"])
            .arg(c.ip_config_file());
        let st = run(status, Duration::from_secs(30));
        let hosts: Value = serde_json::from_str(&st.stdout).expect("status JSON");
        if let Some(id) = hosts[0]["jobs"][0]["job_id"].as_str() {
            assert!(
                hosts[2]["jobs"].as_array().is_some_and(|j| j.is_empty()),
                "machine 2's Spawn was not slow: {hosts}"
            );
            break id.to_string();
        }
        assert!(Instant::now() < deadline, "the job never started: {hosts}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let k = run(
        kill_cmd(&c, &c.ip_config_file(), &["--job", &job]),
        Duration::from_secs(60),
    );
    assert_eq!(k.code(), 0, "{k:?}");
    let code = wait_with_timeout(&mut launch, Duration::from_secs(30)).and_then(|s| s.code());
    if code.is_none() {
        let _ = launch.kill();
    }
    let stderr = err.join().unwrap_or_default();
    let stdout = out.join().unwrap_or_default();
    assert_eq!(code, Some(143), "{stderr}");
    assert!(
        stderr.contains("stopped by dgl-coord kill from "),
        "{stderr}"
    );
    let summary: Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("summary");
    assert_eq!(summary["outcome"], "stopped", "{summary}");
}

/// One machine of the ip_config has no agent: kill still stops the job everywhere else, names
/// the unreachable machine and exits 1.
#[test]
fn kill_stops_every_reachable_host_when_one_is_unreachable() {
    let c = cluster();
    let launch = Hanging::start(&c, &[]);
    let pids: Vec<u32> = (0..c.len())
        .flat_map(|m| fake_dgl::records(c.root(m)))
        .filter_map(|(_, v)| v["pid"].as_u64().map(|p| p as u32))
        .collect();
    assert!(!pids.is_empty());
    // The same machines and one more, where nothing listens.
    let nobody = match c.ip(0) {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.250", o[0], o[1], o[2])
        }
        other => panic!("loopback v4 expected, got {other}"),
    };
    let ip_config = c.dir.path().join("ip_config_plus_one.txt");
    let mut text = std::fs::read_to_string(c.ip_config_file()).expect("ip_config");
    text.push_str(&format!("{nobody} 30050\n"));
    std::fs::write(&ip_config, text).expect("write ip_config");

    let k = run(kill_cmd(&c, &ip_config, &[]), Duration::from_secs(60));
    assert_eq!(k.code(), 1, "{k:?}");
    assert!(
        k.stderr.contains(&format!("m3 ({nobody}:{})", c.port)) && k.stderr.contains("unreachable"),
        "{k:?}"
    );
    // Every reachable host is named. The launch that owns the job sees its first host stop and
    // stops the rest itself, so a host kill reaches later may already be over.
    for m in 0..c.len() {
        let host = format!("m{m} ({}:{}): ", c.ip(m), c.port);
        let line = k.stdout.lines().find(|l| l.starts_with(&host));
        assert!(
            line.is_some_and(|l| l.contains("stopped job") || l.contains("had already finished")),
            "{k:?}"
        );
    }
    assert!(k.stdout.contains("stopped job"), "{k:?}");
    let left = dglrun_integration_tests::wait_gone(&pids, Duration::from_secs(20));
    assert!(left.is_empty(), "still running: {left:?}\n{k:?}");
    let (code, stderr, _) = launch.end(Duration::from_secs(20));
    assert_eq!(code, Some(143), "{stderr}");

    // The same as JSON: what was over, which host failed and why.
    let k = run(
        kill_cmd(&c, &ip_config, &["--json"]),
        Duration::from_secs(60),
    );
    assert_eq!(k.code(), 1, "{k:?}");
    let doc: Value = serde_json::from_str(&k.stdout).expect("kill JSON");
    let jobs = doc["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), c.len(), "{doc}");
    assert!(
        jobs.iter().all(|j| j["state"] == "already_finished"),
        "{doc}"
    );
    let failures = doc["failures"].as_array().expect("failures");
    assert_eq!(failures.len(), 1, "{doc}");
    assert_eq!(
        (&failures[0]["machine"], &failures[0]["reachable"]),
        (&3.into(), &false.into())
    );
    assert_eq!(failures[0]["address"], format!("{nobody}:{}", c.port));
    assert_eq!(doc["errors"].as_array().map(Vec::len), Some(1), "{doc}");
}

/// One host's Spawn takes longer than the whole lease (the agent delays it on purpose): the
/// other hosts' leases are renewed from the first Spawn on, so none of them stops its part
/// and the job succeeds.
#[test]
fn a_slow_spawn_on_one_host_does_not_let_the_others_leases_expire() {
    let mut c = cluster();
    // SAFETY: nextest runs each test in a process of its own, and no other thread of this
    // one reads the environment while it is set; only the restarted agent inherits it.
    unsafe { std::env::set_var("DGL_AGENT_TEST_SPAWN_DELAY_MS", "3000") };
    c.restart_agent(2);
    unsafe { std::env::remove_var("DGL_AGENT_TEST_SPAWN_DELAY_MS") };
    let r = run(
        c.launch_direct(
            "1",
            &["--lease-timeout", "1"],
            "python3 fake_dgl.py --ip_config ip_config.txt --lines 2",
        ),
        Duration::from_secs(120),
    );
    assert!(
        r.elapsed >= Duration::from_secs(3),
        "the Spawn was not slowed: {r:?}"
    );
    for m in 0..2 {
        let log = c.agent_log(m);
        assert!(!log.contains("lease expired"), "m{m}: {log}\n{r:?}");
    }
    assert_eq!(r.code(), 0, "{r:?}");
}

mod workspace_lease {
    //! A workspace serves one job at a time, and never a launch and a copy at once.

    use super::*;
    use dglrun_integration_tests::wire::{manifest, put_messages};
    use dglrun_integration_tests::RawClient as Client;
    use dglrun_proto::pb::{self, put_file_message::Msg};

    fn client(c: &TestCluster, m: usize) -> Client {
        c.client(m)
    }

    async fn prepare(
        client: &mut Client,
        path: &str,
        data: &[u8],
    ) -> Result<pb::PrepareFilesReply, tonic::Status> {
        client
            .prepare_files(pb::PrepareFilesRequest {
                files: vec![manifest(path, data)],
            })
            .await
            .map(|r| r.into_inner())
    }

    async fn put(client: &mut Client, path: &str, data: &[u8]) -> Result<(), tonic::Status> {
        client
            .put_file(tokio_stream::iter(put_messages(path, data)))
            .await
            .map(|_| ())
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Runtime::new().expect("runtime")
    }

    /// Two launches into one workspace at once (the agent's Spawn made slow so both pass
    /// Preflight before either Spawn lands): one runs, the other is refused naming its job.
    #[test]
    fn two_launches_at_once_one_is_refused_naming_the_other_job() {
        let mut c = TestCluster::with_workspace(1);
        // SAFETY: nextest runs each test in a process of its own, and no other thread of this
        // one reads the environment while it is set; only the restarted agent inherits it.
        unsafe { std::env::set_var("DGL_AGENT_TEST_SPAWN_DELAY_MS", "3000") };
        c.restart_agent(0);
        unsafe { std::env::remove_var("DGL_AGENT_TEST_SPAWN_DELAY_MS") };
        let start = || {
            c.launch_direct(
                "1",
                &[],
                "python3 fake_dgl.py --ip_config ip_config.txt --hang",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dgl-coord")
        };
        let mut a = start();
        let mut b = start();
        let (ea, eb) = (
            reader(a.stderr.take().expect("stderr")),
            reader(b.stderr.take().expect("stderr")),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        let (loser_code, loser_err, mut winner) = loop {
            if let Some(st) = a.try_wait().expect("wait") {
                break (st.code(), ea.join().unwrap_or_default(), b);
            }
            if let Some(st) = b.try_wait().expect("wait") {
                break (st.code(), eb.join().unwrap_or_default(), a);
            }
            if Instant::now() > deadline {
                let _ = a.kill();
                let _ = b.kill();
                panic!("both launches ran on one workspace");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let job = Hanging::job_id(&c);
        let k = run(
            kill_cmd(&c, &c.ip_config_file(), &["--job", &job]),
            Duration::from_secs(60),
        );
        let _ = wait_with_timeout(&mut winner, Duration::from_secs(30));
        let _ = winner.kill();
        assert_eq!(loser_code, Some(1), "{loser_err}");
        assert!(
            loser_err.contains(&format!("in use by job {job}")),
            "the refusal names the running job {job}: {loser_err}"
        );
        assert!(
            loser_err.contains("UTC"),
            "and when it started: {loser_err}"
        );
        assert_eq!(k.code(), 0, "{k:?}");
    }

    /// A copy whose files are not all in place holds the workspace: a launch in the middle of
    /// a file's transfer (one of its two chunks sent) is refused naming the copy and the file;
    /// once the file is written, the launch runs.
    #[test]
    fn a_launch_during_a_copy_is_refused_naming_the_copy() {
        let c = TestCluster::with_workspace(1);
        let rt = runtime();
        let _in_runtime = rt.enter();
        let mut cl = client(&c, 0);
        let chunk = dglrun_proto::CHUNK_SIZE;
        let data: Vec<u8> = (0..chunk + 4096).map(|i| (i % 251) as u8).collect();
        let path = format!("{WS}/data/big.bin");
        let prepared = rt
            .block_on(prepare(&mut cl, &path, &data))
            .expect("prepare");
        assert_eq!(prepared.files[0].status, pb::FileStatus::Send as i32);

        // The transfer starts: header and first chunk, then the stream waits.
        let (tx, rx) = futures::channel::mpsc::unbounded();
        tx.unbounded_send(pb::PutFileMessage {
            msg: Some(Msg::Header(pb::PutFileHeader {
                manifest: Some(manifest(&path, &data)),
                offset: 0,
            })),
        })
        .unwrap();
        let piece = |from: usize, to: usize| pb::PutFileMessage {
            msg: Some(Msg::Chunk(pb::Chunk {
                offset: from as u64,
                data: data[from..to].to_vec().into(),
                ..Default::default()
            })),
        };
        tx.unbounded_send(piece(0, chunk)).unwrap();
        let mut putter = cl.clone();
        let transfer = rt.spawn(async move { putter.put_file(rx).await });

        let launch = || {
            run(
                c.launch_direct(
                    "1",
                    &[],
                    "python3 fake_dgl.py --ip_config ip_config.txt --lines 1",
                ),
                Duration::from_secs(60),
            )
        };
        let r = launch();
        assert_eq!(r.code(), 1, "{r:?}");
        assert!(r.stderr.contains("is being copied into"), "{r:?}");
        assert!(r.stderr.contains("data/big.bin"), "{r:?}");
        assert!(
            fake_dgl::records(c.root(0)).is_empty(),
            "nothing ran: {r:?}"
        );

        tx.unbounded_send(piece(chunk, data.len())).unwrap();
        drop(tx);
        rt.block_on(transfer)
            .expect("transfer task")
            .expect("the file arrives");
        let r = launch();
        assert_eq!(r.code(), 0, "the copy is over: {r:?}");
    }

    /// While a job runs, a copy into its workspace that would change a file is refused naming
    /// the job (at PrepareFiles, and a PutFile straight away too); one of unchanged files passes.
    #[test]
    fn a_copy_into_a_running_jobs_workspace_only_passes_unchanged() {
        let c = TestCluster::with_workspace(1);
        let launch = Hanging::start(&c, &[]);
        let job = Hanging::job_id(&c);
        let rt = runtime();
        let _in_runtime = rt.enter();
        let mut cl = client(&c, 0);
        let path = format!("{WS}/fake_dgl.py");
        let same = std::fs::read(c.root(0).join(&path)).expect("script");
        let mut changed = same.clone();
        changed.extend_from_slice(b"\n# changed\n");

        let unchanged = rt
            .block_on(prepare(&mut cl, &path, &same))
            .expect("unchanged");
        assert_eq!(unchanged.files[0].status, pb::FileStatus::Present as i32);

        let refused = rt
            .block_on(prepare(&mut cl, &path, &changed))
            .expect_err("a changed file is refused");
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        assert!(
            refused.message().contains(&format!("job {job}"))
                && refused.message().contains("fake_dgl.py"),
            "{refused:?}"
        );
        let refused = rt
            .block_on(put(&mut cl, &path, &changed))
            .expect_err("a changed file is refused");
        assert!(
            refused.message().contains(&format!("job {job}")),
            "{refused:?}"
        );
        assert_eq!(
            std::fs::read(c.root(0).join(&path)).expect("script"),
            same,
            "the running job's file is untouched"
        );

        let k = run(
            kill_cmd(&c, &c.ip_config_file(), &["--job", &job]),
            Duration::from_secs(60),
        );
        assert_eq!(k.code(), 0, "{k:?}");
        let (code, stderr, _) = launch.end(Duration::from_secs(30));
        assert_eq!(code, Some(143), "{stderr}");
        // The job is over: the copy goes through.
        rt.block_on(prepare(&mut cl, &path, &changed))
            .expect("no job holds the workspace any more");
    }

    /// The same through `dgl-coord copy`: while a job runs in the workspace, a copy of the
    /// same files passes (nothing to send), a copy with one file changed fails naming the job
    /// and leaves the file as the job has it.
    #[test]
    fn dgl_coord_copy_into_a_running_jobs_workspace_passes_only_unchanged() {
        let c = TestCluster::start(1);
        let local = c.local();
        let part_config = gen_partitions(&local.join("parts"), 1, 64, "g").expect("partitions");
        let code = local.join("code");
        std::fs::create_dir_all(&code).expect("code");
        let script = code.join("fake_dgl.py");
        std::fs::copy(fixtures_dir().join("fake_dgl.py"), &script).expect("script");
        let copy = || {
            let mut cmd = c.coord();
            cmd.env("XDG_CACHE_HOME", c.dir.path().join("cache"))
                .args(["copy", "--workspace", WS, "--rel_data_path", "data"])
                .arg("--part_config")
                .arg(&part_config)
                .arg("--ip_config")
                .arg(c.ip_config_file())
                .arg("--script_folder")
                .arg(&code)
                .args(["--progress", "quiet"]);
            run(cmd, Duration::from_secs(60))
        };
        let first = copy();
        assert_eq!(first.code(), 0, "{first:?}");

        let launch = Hanging::start_script(&c, "code/fake_dgl.py", &[]);
        let job = Hanging::job_id(&c);
        let same = copy();
        assert_eq!(same.code(), 0, "unchanged files pass: {same:?}");

        let mut changed = std::fs::read(&script).expect("script");
        changed.extend_from_slice(b"\n# changed\n");
        std::fs::write(&script, &changed).expect("change the script");
        let refused = copy();
        assert_ne!(refused.code(), 0, "{refused:?}");
        let text = format!("{}{}", refused.stdout, refused.stderr);
        assert!(
            text.contains(&format!("while job {job}")) && text.contains("fake_dgl.py"),
            "{refused:?}"
        );
        assert_ne!(
            std::fs::read(c.root(0).join(WS).join("code/fake_dgl.py")).expect("copied script"),
            changed,
            "the running job's script is untouched"
        );

        let k = run(
            kill_cmd(&c, &c.ip_config_file(), &["--job", &job]),
            Duration::from_secs(60),
        );
        assert_eq!(k.code(), 0, "{k:?}");
        let (code, stderr, _) = launch.end(Duration::from_secs(30));
        assert_eq!(code, Some(143), "{stderr}");
        let after = copy();
        assert_eq!(after.code(), 0, "the job is over: {after:?}");
    }
}
