//! `dgl-coord stacks`: real agents run the real py-spy on the stand-in DGL job's processes,
//! hung in known functions (trainers in `sleep_forever`, servers in `run_server`, samplers in
//! `spawn_samplers`).

// Test code throughout: a failed unwrap is a failed test, and a test may set its own
// environment and sleep; its helper modules are private to this test.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dglrun_integration_tests::run::{run, Run};
use dglrun_integration_tests::{cannot_run, fixtures_dir, TestCluster};
use serde_json::Value;

/// The directory holding py-spy: on PATH, or beside the python3 the tests use (pip puts it
/// there; a pyenv shim may be missing).
fn py_spy_dir() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let scripts = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    on_path
        .into_iter()
        .chain(scripts)
        .find(|d| d.join("py-spy").is_file())
}

/// PATH for an agent that finds py-spy.
fn path_with_py_spy(test: &str) -> Option<String> {
    let Some(dir) = py_spy_dir() else {
        cannot_run(test, "py-spy is not installed: pip install py-spy");
        return None;
    };
    Some(format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    ))
}

/// The real python3's path (through a pyenv shim too).
fn real_python() -> PathBuf {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// PATH for an agent without py-spy: python3 alone in a directory of its own, then the
/// system's directories.
fn path_without_py_spy(dir: &Path) -> String {
    let bin = dir.join("python-only");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(real_python(), bin.join("python3")).unwrap();
    format!("{}:/usr/bin:/bin", bin.display())
}

/// A launch whose trainers hang, once `expected` trainers said so.
struct Hanging(Child);

impl Hanging {
    fn start(cmd: Command, expected: usize) -> Self {
        Self::start_until(cmd, "hanging", expected, Duration::from_secs(90))
    }

    /// Once `expected` lines said `word`.
    fn start_until(mut cmd: Command, word: &str, expected: usize, limit: Duration) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dgl-coord");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + limit;
        let mut hanging = 0;
        while hanging < expected {
            match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => hanging += usize::from(l.contains(word)),
                Err(_) => {
                    let _ = child.kill();
                    panic!("only {hanging} of {expected} trainers hung");
                }
            }
        }
        Self(child)
    }
}

impl Drop for Hanging {
    fn drop(&mut self) {
        // SIGINT: dgl-coord stops the job on every host before it exits.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ =
            dglrun_integration_tests::run::wait_with_timeout(&mut self.0, Duration::from_secs(30));
        let _ = self.0.kill();
    }
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

fn stacks(c: &TestCluster, job: &str, flags: &[&str]) -> Run {
    let mut cmd = c.coord();
    cmd.args(["stacks", job, "--ip_config"])
        .arg(c.ip_config_file())
        .args(flags);
    run(cmd, Duration::from_secs(120))
}

/// A cluster of `n` agents with the stand-in's workspace, each agent finding py-spy.
fn cluster_with_py_spy(test: &str, n: usize) -> Option<TestCluster> {
    let path = path_with_py_spy(test)?;
    let mut c = TestCluster::with_workspace(n);
    for i in 0..n {
        c.set_agent_env(i, &[("PATH", &path)]);
    }
    Some(c)
}

#[test]
fn every_server_trainer_and_sampler_is_dumped_where_it_hangs() {
    let Some(c) = cluster_with_py_spy("stacks of a hanging job", 2) else {
        return;
    };
    let _job = Hanging::start(
        c.launch_direct(
            "2",
            &["--num_samplers", "1"],
            "python3 fake_dgl.py --ip_config ip_config.txt --hang --samplers",
        ),
        4,
    );
    let job = job_id(&c);

    let text = stacks(&c, &job, &[]);
    assert_eq!(text.code(), 0, "{text:?}");
    for m in 0..2 {
        let ip = c.ip(m);
        for (label, role, function) in [
            ("server0", "server", "run_server"),
            ("trainer0", "trainer", "sleep_forever"),
            ("trainer1", "trainer", "sleep_forever"),
            ("trainer0 sampler0", "sampler", "spawn_samplers"),
            ("trainer1 sampler0", "sampler", "spawn_samplers"),
        ] {
            let header = format!("==> m{m} ({ip}:{}, ", c.port);
            let block = text
                .stdout
                .split("\n\n==> ")
                .map(|b| format!("==> {}", b.trim_start_matches("==> ")))
                .find(|b| {
                    b.starts_with(&header)
                        && b.lines()
                            .next()
                            .unwrap()
                            .contains(&format!(") {label} [{role}], pid "))
                })
                .unwrap_or_else(|| panic!("no stack of m{m} {label}:\n{text:?}"));
            assert!(
                block.contains(&format!("    {function} (fake_dgl.py:")),
                "m{m} {label}:\n{block}"
            );
            // The summary names where each one is.
            let summary_line = format!("  m{m} {label} ");
            let row = text
                .stdout
                .lines()
                .find(|l| l.starts_with(&summary_line))
                .unwrap_or_else(|| panic!("no summary row {summary_line:?}:\n{text:?}"));
            // A server's innermost Python frame is its accept (in socket.py) or its own loop.
            if role != "server" {
                assert!(row.contains(&format!("{function} (fake_dgl.py:")), "{row}");
            }
        }
    }

    let json = stacks(&c, &job, &["--json"]);
    assert_eq!(json.code(), 0, "{json:?}");
    let records = json.events();
    assert_eq!(records.len(), 10, "one record per process: {json:?}");
    for r in &records {
        assert_eq!(r["job_id"], job.as_str());
        assert!(r["pid"].as_u64().unwrap() > 0);
        assert!(r["error"].is_null(), "{r}");
        let want = match r["role"].as_str().unwrap() {
            "server" => "run_server",
            "trainer" => "sleep_forever",
            "sampler" => "spawn_samplers",
            other => panic!("role {other}: {r}"),
        };
        let stack = r["stack"].as_str().unwrap();
        assert!(stack.contains(&format!("    {want} (fake_dgl.py:")), "{r}");
        assert!(r["location"].is_string(), "{r}");
        if r["role"] != "server" {
            assert!(
                r["location"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("{want} (fake_dgl.py:")),
                "{r}"
            );
        }
    }
    let trainers = records.iter().filter(|r| r["role"] == "trainer").count();
    assert_eq!(trainers, 4);

    // --native passes through: C frames under the Python ones.
    let native = stacks(&c, &job, &["--json", "--native"]);
    assert_eq!(native.code(), 0, "{native:?}");
    let trainer = native
        .events()
        .into_iter()
        .find(|r| r["label"] == "trainer0")
        .expect("trainer0");
    let stack = trainer["stack"].as_str().unwrap();
    assert!(stack.contains("sleep_forever (fake_dgl.py:"), "{stack}");
    assert!(stack.contains("libc"), "no native frame:\n{stack}");
}

#[test]
fn torchrun_workers_are_labelled_by_local_rank() {
    let Some(c) = cluster_with_py_spy("stacks of a torchrun job", 1) else {
        return;
    };
    let mut cmd = c.launch(
        &["--num_trainers", "2", "--num_samplers", "0"],
        "python3 fake_dgl.py --ip_config ip_config.txt --hang",
    );
    cmd.env("PYTHONPATH", fixtures_dir().join("pythonpath"));
    let _job = Hanging::start(cmd, 2);
    let job = job_id(&c);
    let r = stacks(&c, &job, &["--json"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let mut got: Vec<(String, String)> = r
        .events()
        .iter()
        .map(|e| {
            (
                e["label"].as_str().unwrap().to_string(),
                e["role"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    let want = [
        ("server0", "server"),
        ("trainer0", "trainer"),
        ("trainer1", "trainer"),
        ("trainers", "torchrun"),
    ];
    assert_eq!(
        got,
        want.map(|(a, b)| (a.to_string(), b.to_string())),
        "{r:?}"
    );
}

#[test]
fn a_host_without_py_spy_is_named_with_the_install_hint() {
    let Some(path) = path_with_py_spy("stacks without py-spy") else {
        return;
    };
    if Path::new("/usr/bin/py-spy").exists() || Path::new("/bin/py-spy").exists() {
        cannot_run("stacks without py-spy", "py-spy is installed in /usr/bin");
        return;
    }
    let mut c = TestCluster::with_workspace(2);
    c.set_agent_env(0, &[("PATH", &path)]);
    let bare = path_without_py_spy(c.dir.path());
    c.set_agent_env(1, &[("PATH", &bare)]);
    let _job = Hanging::start(
        c.launch_direct(
            "1",
            &[],
            "python3 fake_dgl.py --ip_config ip_config.txt --hang",
        ),
        2,
    );
    let job = job_id(&c);
    let r = stacks(&c, &job, &[]);
    assert_eq!(r.code(), 1, "{r:?}");
    let hint = format!(
        "dgl-coord stacks: m1 ({}:{}): py-spy is not installed on ",
        c.ip(1),
        c.port
    );
    let line = r
        .stderr
        .lines()
        .find(|l| l.starts_with(&hint))
        .unwrap_or_else(|| panic!("no install hint for m1:\n{r:?}"));
    assert!(line.contains("pip install py-spy"), "{line}");
    // The other host's stacks are still there.
    assert!(r.stdout.contains("==> m0 ("), "{r:?}");
    assert!(!r.stdout.contains("==> m1 ("), "{r:?}");
}

#[test]
fn an_unknown_job_is_an_error_naming_the_hosts_asked() {
    let c = TestCluster::start(2);
    let r = stacks(&c, "dglrun-0-00000000", &[]);
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(
        r.stderr.contains(&format!(
            "no agent knows job \"dglrun-0-00000000\" (asked m0 ({}:{}), m1 ({}:{}))",
            c.ip(0),
            c.port,
            c.ip(1),
            c.port
        )),
        "{r:?}"
    );
    assert!(r.stdout.is_empty(), "{r:?}");
    // An id no agent could hold is refused by each, named.
    let r = stacks(&c, "../x", &[]);
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(
        r.stderr.contains(&format!("m0 ({}:{}): ", c.ip(0), c.port)),
        "{r:?}"
    );
}

/// The state letter of `pid` in /proc (`T` when stopped).
fn state_of(pid: u64) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("?")
        .to_string()
}

/// A py-spy that pauses its target and never finishes (as one stuck while attached) is killed
/// after the agent's 20 s, and the target goes on: the agent sends it SIGCONT.
#[test]
fn a_dump_that_never_ends_is_killed_and_its_target_resumed() {
    let mut c = TestCluster::with_workspace(1);
    let fake = c.dir.path().join("stuck-py-spy");
    std::fs::create_dir_all(&fake).unwrap();
    let script = fake.join("py-spy");
    std::fs::write(&script, "#!/bin/sh\nkill -STOP \"$3\"\nexec sleep 600\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        fake.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    c.set_agent_env(0, &[("PATH", &path)]);
    let _job = Hanging::start(
        c.launch_direct(
            "1",
            &[],
            "python3 fake_dgl.py --ip_config ip_config.txt --hang",
        ),
        1,
    );
    let job = job_id(&c);
    let pids: Vec<u64> = {
        let mut status = c.coord();
        status
            .args(["status", "--json", "--ip_config"])
            .arg(c.ip_config_file());
        let st: Value = serde_json::from_str(&run(status, Duration::from_secs(30)).stdout).unwrap();
        st[0]["jobs"][0]["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["pid"].as_u64().unwrap())
            .collect()
    };
    let resumed = |pids: &[u64]| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|&p| state_of(p) == "T") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        pids.iter().all(|&p| state_of(p) != "T")
    };
    // A caller that gives up (its call dropped) ends the dumps too.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = c.client(0);
        let call = client.dump_stacks(dglrun_proto::pb::DumpStacksRequest {
            job_id: job.clone(),
            native: false,
        });
        assert!(tokio::time::timeout(Duration::from_secs(2), call)
            .await
            .is_err());
    });
    assert!(resumed(&pids), "left stopped after a dropped call");

    let r = stacks(&c, &job, &["--json"]);
    assert_eq!(r.code(), 1, "{r:?}");
    let records = r.events();
    assert_eq!(records.len(), 2, "server and trainer: {r:?}");
    for rec in &records {
        let error = rec["error"].as_str().unwrap_or_default();
        assert!(error.contains("did not finish within 20 s"), "{rec}");
        let pid = rec["pid"].as_u64().unwrap();
        // SIGCONT is sent once py-spy is killed; the kernel applies it at once.
        let deadline = Instant::now() + Duration::from_secs(5);
        while state_of(pid) == "T" && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_ne!(state_of(pid), "T", "{} left stopped", rec["label"]);
    }
    assert!(
        r.stderr.contains("trainer0 (pid ") && r.stderr.contains("it was killed"),
        "{r:?}"
    );
}

/// DumpStacks is refused before anything runs without the token, like every call; with it,
/// an unknown job is NOT_FOUND.
#[test]
fn dump_stacks_needs_the_token() {
    use dglrun_proto::pb;
    let c = TestCluster::start(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let uri = format!("http://{}:{}", c.ip(0), c.port);
        let channel = tonic::transport::Endpoint::from_shared(uri)
            .unwrap()
            .connect_lazy();
        let meta = dglrun_proto::meta::ClientMeta::new(Some(&"0".repeat(64))).unwrap();
        let mut wrong = pb::agent_client::AgentClient::with_interceptor(channel, meta);
        let req = || pb::DumpStacksRequest {
            job_id: "x".into(),
            native: false,
        };
        let err = wrong.dump_stacks(req()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
        let err = c.client(0).dump_stacks(req()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    });
}

/// The real DGL 2.1 job (`integration-tests/e2e/wait_before_barrier.py`): servers in DGL's
/// server loop, a trainer that waits before its barrier, its sampler. Opt-in: it needs DGL and
/// torch (`DGLRUN_E2E_VENV`, default `~/.cache/dglrun-e2e/venv`, as `scripts/e2e-real-dgl.sh
/// --install` makes it) and takes a minute; run it with
/// `cargo nextest run -p dglrun-integration-tests --run-ignored only -E 'test(real_dgl)'`.
#[test]
#[ignore = "opt-in: a real DGL job (DGLRUN_E2E_VENV, default ~/.cache/dglrun-e2e/venv)"]
fn a_real_dgl_trainer_waiting_before_its_barrier_is_named() {
    let venv = std::env::var_os("DGLRUN_E2E_VENV").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/dglrun-e2e/venv"),
        PathBuf::from,
    );
    assert!(
        venv.join("bin/python3").exists(),
        "no DGL venv at {}: scripts/e2e-real-dgl.sh --install makes one",
        venv.display()
    );
    let path = path_with_py_spy("stacks of a real DGL job").expect("py-spy");
    let mut c = TestCluster::start(1);
    let path = format!("{}:{path}", venv.join("bin").display());
    c.set_agent_env(0, &[("PATH", &path)]);
    let ws = c.root(0).join(dglrun_integration_tests::WS);
    std::fs::create_dir_all(&ws).unwrap();
    let e2e = dglrun_integration_tests::repo_dir().join("integration-tests/e2e");
    std::fs::copy(e2e.join("wait_before_barrier.py"), ws.join("wait.py")).unwrap();
    std::fs::copy(c.ip_config_file(), ws.join("ip_config.txt")).unwrap();
    let mut part = Command::new(venv.join("bin/python3"));
    part.arg(e2e.join("partition_graph.py"))
        .arg("--out")
        .arg(ws.join("data"))
        .args(["--parts", "1", "--graph-name", "g", "--method", "random"]);
    let r = run(part, Duration::from_secs(300));
    assert_eq!(r.code(), 0, "partition_graph.py: {r:?}");

    let mut launch = c.coord();
    launch
        .args(["launch", "--workspace", dglrun_integration_tests::WS])
        .args([
            "--num_trainers",
            "1",
            "--num_samplers",
            "1",
            "--num_servers",
            "1",
        ])
        .args(["--trainer-mode", "direct", "--grace", "1"])
        .args([
            "--part_config",
            "data/g.json",
            "--ip_config",
            "ip_config.txt",
        ])
        .arg("python3 wait.py --graph_name g --ip_config ip_config.txt")
        .env_remove("PYTHONPATH");
    let started = Instant::now();
    let _job = Hanging::start_until(launch, "E2E_WAITING", 1, Duration::from_secs(240));
    eprintln!(
        "the trainer waited after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let job = job_id(&c);
    let t = Instant::now();
    let r = stacks(&c, &job, &["--json"]);
    eprintln!("dgl-coord stacks took {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!(r.code(), 0, "{r:?}");
    let records = r.events();
    let trainer = records
        .iter()
        .find(|e| e["label"] == "trainer0")
        .unwrap_or_else(|| panic!("no trainer0: {r:?}"));
    assert!(
        trainer["location"]
            .as_str()
            .unwrap()
            .starts_with("wait_before_barrier (wait.py:"),
        "{trainer}"
    );
    let server = records
        .iter()
        .find(|e| e["label"] == "server0")
        .unwrap_or_else(|| panic!("no server0: {r:?}"));
    assert!(
        server["stack"].as_str().unwrap().contains("initialize"),
        "{server}"
    );
    assert!(
        records.iter().any(|e| e["role"] == "sampler"),
        "no sampler: {r:?}"
    );
    let text = stacks(&c, &job, &[]);
    eprintln!("{}", text.stdout);
}
