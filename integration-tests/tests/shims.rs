//! DGL's own launch.py, unmodified (`fixtures/dgl-tools/`), with the `ssh` of
//! `dgl-coord shims` first on PATH, across three agents on loopback: it runs the stand-in DGL
//! workload to exit 0, and its Ctrl-C clean-up (ps and kill over ssh) leaves nothing behind.

// Test code throughout: a failed unwrap is a failed test, and a test may sleep.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dglrun_integration_tests::run::{reader, run, wait_with_timeout};
use dglrun_integration_tests::{fake_dgl, fixtures_dir, wait_gone, TestCluster, WS};

const WORKLOAD: &str = "python3 fake_dgl.py --graph-name g --ip_config ip_config.txt";

/// Writes the shims for `c`'s agents; returns their directory.
fn shims(c: &TestCluster) -> PathBuf {
    dglrun_integration_tests::write_shims(c.coord(), c.dir.path().join("shims"))
}

/// `python3 TOOL` for one of DGL's tools (see the harness's `dgl_tool`).
fn dgl_tool(tool: &str) -> Command {
    let mut cmd = dglrun_integration_tests::dgl_tool("python3", tool);
    cmd
        // Lines of the clean-up process arrive when printed, so a test can wait for them.
        .env("PYTHONUNBUFFERED", "1");
    cmd
}

/// DGL's launch.py as its users run it, from machine 0's root (the workspace path is relative:
/// launch.py reads ip_config and part_config locally, and the remote shell starts in the
/// agent's root, as ssh's starts in the home directory).
fn launch_py(c: &TestCluster, shims: &std::path::Path, trainers: &str, udf: &str) -> Command {
    let mut cmd = dgl_tool("launch.py");
    cmd.args([
        "--workspace",
        WS,
        "--num_trainers",
        trainers,
        "--num_samplers",
        "0",
    ])
    .args(["--num_servers", "1", "--part_config", "data/g.json"])
    .args(["--ip_config", "ip_config.txt", udf])
    .current_dir(c.root(0))
    .env(
        "PATH",
        format!(
            "{}:{}",
            shims.display(),
            std::env::var("PATH").unwrap_or_default()
        ),
    )
    .env("PYTHONPATH", fixtures_dir().join("pythonpath"))
    .env_remove("OMP_NUM_THREADS")
    .env_remove("DGL_AGENT_TOKEN_FILE")
    .env_remove("DGL_AGENT_PORT");
    cmd
}

fn record_pids(c: &TestCluster, role: &str) -> Vec<(usize, u32)> {
    let mut out = Vec::new();
    for host in 0..c.len() {
        for (name, v) in fake_dgl::records(c.root(host)) {
            if name.starts_with(&format!("{role}-")) {
                out.push((host, v["pid"].as_u64().unwrap() as u32));
            }
        }
    }
    out
}

#[test]
fn dgl_launch_py_runs_the_workload_over_the_shims_and_exits_0() {
    let c = TestCluster::with_workspace(3);
    let shims = shims(&c);
    let r = run(
        launch_py(&c, &shims, "2", WORKLOAD),
        Duration::from_secs(120),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    let servers = record_pids(&c, "server");
    let trainers = record_pids(&c, "trainer");
    assert_eq!(servers.len(), 3, "{servers:?}\n{r:?}");
    assert_eq!(trainers.len(), 6, "{trainers:?}\n{r:?}");
    for host in 0..3 {
        assert_eq!(trainers.iter().filter(|(h, _)| *h == host).count(), 2);
    }
    assert!(r.stdout.contains("done: 6 trainers said bye"), "{r:?}");
}

#[test]
fn dgl_launch_py_ctrl_c_cleanup_over_the_shims_leaves_nothing() {
    let c = TestCluster::with_workspace(3);
    let shims = shims(&c);
    let mut cmd = launch_py(&c, &shims, "1", &format!("{WORKLOAD} --hang"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
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
    let err = reader(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut hanging = 0;
    // A clean-up process still starting would die of the Ctrl-C instead of cleaning up.
    let mut cleanup_runs = false;
    while hanging < 3 || !cleanup_runs {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains("hanging") => hanging += 1,
            Ok(line) if line.contains("cleanup process runs") => cleanup_runs = true,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "saw {hanging} of 3 trainers hang, clean-up running: {cleanup_runs}: {}",
                    err.join().unwrap()
                );
            }
        }
    }
    // cleanup_proc prints its line before it ignores SIGINT: a Ctrl-C in between kills it.
    std::thread::sleep(Duration::from_secs(1));
    let mut pids: Vec<u32> = record_pids(&c, "server").into_iter().map(|p| p.1).collect();
    pids.extend(record_pids(&c, "trainer").into_iter().map(|p| p.1));
    assert_eq!(pids.len(), 6, "{pids:?}");
    // Ctrl-C as a terminal sends it: to launch.py and every ssh it started.
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = wait_with_timeout(&mut child, Duration::from_secs(60));
    let stdout = out.join().unwrap();
    assert!(status.is_some(), "launch.py did not exit\n{stdout}");
    let left = wait_gone(&pids, Duration::from_secs(30));
    assert!(left.is_empty(), "still alive: {left:?}\n{stdout}");
    assert!(
        stdout.contains("cleanup process exits"),
        "{stdout}\n{}",
        err.join().unwrap()
    );
}

#[test]
fn dgl_copy_files_py_places_the_files_where_it_does_with_ssh() {
    let c = TestCluster::start(3);
    let shims = shims(&c);
    let local = c.local();
    let graph = format!("g{:x}", rand::random::<u64>());
    let parts = local.join("parts");
    dglrun_integration_tests::gen_partitions(&parts, 3, 5000, &graph).unwrap();
    let code = local.join("code");
    std::fs::create_dir_all(code.join("lib")).unwrap();
    std::fs::write(code.join("train.py"), "print('train')\n").unwrap();
    std::fs::write(code.join("lib/util.py"), "X = 1\n").unwrap();
    let ip_config = c.ip_config_file();
    // As its users run it: from the directory the part_config's relative paths start at.
    let mut cmd = Command::new("python3");
    cmd.arg(fixtures_dir().join("dgl-tools/copy_files.py"))
        .args(["--workspace", WS, "--rel_data_path", "data"])
        .arg("--part_config")
        .arg(format!("{graph}.json"))
        .arg("--script_folder")
        .arg(&code)
        .arg("--ip_config")
        .arg(&ip_config)
        .current_dir(&parts)
        .env(
            "PATH",
            format!(
                "{}:{}",
                shims.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env_remove("DGL_AGENT_TOKEN_FILE")
        .env_remove("DGL_AGENT_PORT");
    let r = run(cmd, Duration::from_secs(120));
    let rewritten = PathBuf::from(format!("/tmp/{graph}.json"));
    let rewritten_bytes = std::fs::read(&rewritten).ok();
    let _ = std::fs::remove_file(&rewritten);
    assert_eq!(r.code(), 0, "{r:?}");
    for host in 0..3 {
        let ws = c.root(host).join(WS);
        let mut want: Vec<(String, Vec<u8>)> = vec![
            ("ip_config.txt".into(), std::fs::read(&ip_config).unwrap()),
            (
                format!("data/{graph}.json"),
                rewritten_bytes.clone().unwrap(),
            ),
            ("code/train.py".into(), b"print('train')\n".to_vec()),
            ("code/lib/util.py".into(), b"X = 1\n".to_vec()),
        ];
        for f in ["graph.dgl", "node_feat.dgl", "edge_feat.dgl"] {
            let local = parts.join(format!("part{host}/{f}"));
            want.push((
                format!("data/part{host}/{f}"),
                std::fs::read(local).unwrap(),
            ));
        }
        want.sort();
        let got: Vec<String> = dglrun_integration_tests::list_files(&ws)
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let names: Vec<String> = want.iter().map(|w| w.0.clone()).collect();
        assert_eq!(got, names, "host {host}");
        for (name, bytes) in want {
            assert!(
                std::fs::read(ws.join(&name)).unwrap() == bytes,
                "host {host}: {name}"
            );
        }
    }
}

#[test]
fn dgl_distgraphlaunch_py_starts_its_ranks_with_their_environment() {
    let c = TestCluster::start(3);
    let shims = shims(&c);
    // Each rank records its environment where it starts: the agent's root.
    let dump = "import json, os\n\
                json.dump(dict(os.environ), open('rank-%s.json' % os.environ['RANK'], 'w'))\n";
    for host in 0..3 {
        std::fs::write(c.root(host).join("dump_env.py"), dump).unwrap();
    }
    let ip_config = c.ip_config_file();
    let mut cmd = dgl_tool("distgraphlaunch.py");
    cmd.args(["--num_proc_per_machine", "2", "--master_port", "31234"])
        .arg("--ip_config")
        .arg(&ip_config)
        .arg("python3 dump_env.py")
        .current_dir(c.local())
        .env(
            "PATH",
            format!(
                "{}:{}",
                shims.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("PYTHONPATH", "/opt/extra")
        .env_remove("DGL_AGENT_TOKEN_FILE")
        .env_remove("DGL_AGENT_PORT");
    let r = run(cmd, Duration::from_secs(120));
    assert_eq!(r.code(), 0, "{r:?}");
    for rank in 0..6 {
        let host = rank / 2;
        let path = c.root(host).join(format!("rank-{rank}.json"));
        let env: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&path)
                .unwrap_or_else(|e| panic!("rank {rank} on host {host}: {e}\n{r:?}")),
        )
        .unwrap();
        assert_eq!(env["RANK"], rank.to_string());
        assert_eq!(env["MASTER_ADDR"], c.ip(0).to_string());
        assert_eq!(env["MASTER_PORT"], "31234");
        assert_eq!(env["DGL_NUM_SERVER"], "2");
        assert_eq!(env["DGL_IP_CONFIG"], ip_config.display().to_string());
        assert_eq!(env["PYTHONPATH"], "/opt/extra");
    }
}
