//! `dgl-coord doctor` over real agents: each check passes on a sound host and fails when the
//! host is made unsound in that one way.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dglrun_integration_tests::run::{run, Run};
use dglrun_integration_tests::{fixtures_dir, TestCluster};
use serde_json::Value;

/// `--setup` giving the probe the fixtures' stand-in dgl and torch.
fn standin_setup() -> String {
    format!(
        "export PYTHONPATH={}",
        fixtures_dir().join("pythonpath").display()
    )
}

fn doctor(c: &TestCluster, flags: &[&str]) -> (Run, Vec<Value>) {
    let mut cmd: Command = c.coord();
    cmd.arg("doctor")
        .arg("--ip_config")
        .arg(c.ip_config_file())
        .args(flags)
        .arg("--json");
    let r = run(cmd, Duration::from_secs(120));
    let reports: Vec<Value> =
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    (r, reports)
}

fn status<'a>(reports: &'a [Value], m: usize, check: &str) -> (&'a str, &'a str) {
    let c = &reports[m][check];
    (
        c["status"].as_str().unwrap_or_default(),
        c["detail"].as_str().unwrap_or_default(),
    )
}

/// A stand-in `nvidia-smi` listing `n` GPUs (or failing as a broken driver does when `n` is
/// None), in its own directory to put first on an agent's PATH.
fn standin_nvidia_smi(dir: &Path, n: Option<usize>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let body = match n {
        Some(n) => (0..n)
            .map(|i| format!("echo 'GPU {i}: Stand-in GPU (UUID: GPU-{i})'\n"))
            .collect::<String>(),
        None => "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\nexit 9\n".into(),
    };
    let p = dir.join("nvidia-smi");
    std::fs::write(&p, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir.to_path_buf()
}

fn path_with(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

#[test]
fn a_sound_cluster_passes_every_check_and_gpus_are_counted_per_host() {
    let mut c = TestCluster::start(3);
    for (i, n) in [(1, 2), (2, 4)] {
        let dir = standin_nvidia_smi(&c.dir.path().join(format!("gpus{i}")), Some(n));
        c.set_agent_env(i, &[("PATH", &path_with(&dir))]);
    }
    let setup = standin_setup();
    let (r, reports) = doctor(&c, &["--setup", &setup]);
    assert_eq!(r.code(), 0, "{r:?}");
    for m in 0..3 {
        for check in ["agent", "interface", "python", "disk", "ports"] {
            assert_eq!(status(&reports, m, check).0, "ok", "m{m} {check}: {r:?}");
        }
        assert_eq!(status(&reports, m, "interface").1, "lo");
        assert!(
            status(&reports, m, "python")
                .1
                .contains("dgl 0.0.0+dglrun.fake"),
            "{r:?}"
        );
    }
    let gpus: Vec<&str> = (0..3).map(|m| status(&reports, m, "gpus").1).collect();
    assert!(gpus[0].starts_with("none"), "{gpus:?}");
    assert_eq!(&gpus[1..], ["2", "4"]);

    // The table: one row per host.
    let mut cmd = c.coord();
    cmd.args(["doctor", "--ip_config"])
        .arg(c.ip_config_file())
        .args(["--setup", &setup]);
    let table = run(cmd, Duration::from_secs(120));
    assert_eq!(table.code(), 0, "{table:?}");
    assert!(table.stdout.starts_with("host "), "{table:?}");
    assert!(table.stdout.contains("every check passed"), "{table:?}");
}

#[test]
fn an_unreachable_agent_fails_its_row_and_the_others_are_still_checked() {
    let mut c = TestCluster::start(2);
    c.kill_agent(1);
    let setup = standin_setup();
    let (r, reports) = doctor(&c, &["--setup", &setup]);
    assert_eq!(r.code(), 1, "{r:?}");
    assert_eq!(status(&reports, 1, "agent").0, "fail");
    assert_eq!(status(&reports, 0, "python").0, "ok", "{r:?}");
}

#[test]
fn a_python_without_dgl_fails_naming_the_module() {
    let c = TestCluster::start(1);
    // The system python3 with only the stand-in torch on its path.
    let torch_only = c.dir.path().join("torch-only");
    std::fs::create_dir_all(&torch_only).unwrap();
    std::os::unix::fs::symlink(
        fixtures_dir().join("pythonpath/torch"),
        torch_only.join("torch"),
    )
    .unwrap();
    let setup = format!("export PYTHONPATH={}", torch_only.display());
    let (r, reports) = doctor(&c, &["--setup", &setup]);
    assert_eq!(r.code(), 1, "{r:?}");
    let py = &reports[0]["python"];
    assert_eq!(py["status"], "fail", "{r:?}");
    assert!(
        py["detail"].as_str().unwrap().contains("dgl missing"),
        "{r:?}"
    );
    assert!(
        py["fix"].as_str().unwrap().contains("cannot import dgl"),
        "{r:?}"
    );

    let (r, reports) = doctor(&c, &["--python", "/nonexistent/python3"]);
    assert_eq!(r.code(), 1, "{r:?}");
    assert_eq!(status(&reports, 0, "python").0, "fail", "{r:?}");
}

#[test]
fn a_broken_nvidia_driver_fails_the_gpu_check() {
    let mut c = TestCluster::start(1);
    let dir = standin_nvidia_smi(&c.dir.path().join("broken"), None);
    c.set_agent_env(0, &[("PATH", &path_with(&dir))]);
    let setup = standin_setup();
    let (r, reports) = doctor(&c, &["--setup", &setup]);
    assert_eq!(r.code(), 1, "{r:?}");
    assert_eq!(status(&reports, 0, "gpus").0, "fail", "{r:?}");
    assert!(
        reports[0]["gpus"]["fix"]
            .as_str()
            .unwrap()
            .contains("exited 9"),
        "{r:?}"
    );
}

#[test]
fn a_process_holding_a_server_port_is_named() {
    let c = TestCluster::start(1);
    let port = 30050 + rand_port_offset();
    let ip_config = c.ip_config_file_with_port(port);
    let _held = std::net::TcpListener::bind((c.ip(0), port)).expect("bind the server port");
    let setup = standin_setup();
    let mut cmd = c.coord();
    cmd.args(["doctor", "--json", "--setup", &setup, "--ip_config"])
        .arg(ip_config);
    let r = run(cmd, Duration::from_secs(120));
    assert_eq!(r.code(), 1, "{r:?}");
    let reports: Vec<Value> = serde_json::from_str(&r.stdout).unwrap();
    let (s, detail) = status(&reports, 0, "ports");
    assert_eq!(s, "fail", "{r:?}");
    assert!(
        detail.contains(&format!("{port} by pid {}", std::process::id())),
        "{r:?}"
    );
}

fn rand_port_offset() -> u16 {
    (std::process::id() % 1000) as u16
}

#[test]
fn a_partition_larger_than_the_free_space_fails_the_disk_check() {
    let c = TestCluster::start(1);
    let data = c.local().join("data");
    std::fs::create_dir_all(data.join("part0")).unwrap();
    // Sparse: 8 TiB that take no space.
    let big = std::fs::File::create(data.join("part0/graph.dgl")).unwrap();
    big.set_len(1 << 43).unwrap();
    std::fs::write(
        data.join("g.json"),
        r#"{"graph_name": "g", "num_parts": 1, "part-0": {"part_graph": "part0/graph.dgl"}}"#,
    )
    .unwrap();
    let setup = standin_setup();
    let part = data.join("g.json");
    let (r, reports) = doctor(
        &c,
        &["--setup", &setup, "--part_config", part.to_str().unwrap()],
    );
    assert_eq!(r.code(), 1, "{r:?}");
    assert_eq!(status(&reports, 0, "disk").0, "fail", "{r:?}");
    let fix = reports[0]["disk"]["fix"].as_str().unwrap();
    assert!(
        fix.contains("the agent root") && fix.contains("/dev/shm"),
        "{r:?}"
    );
}

#[test]
fn a_host_missing_its_partition_fails_the_partition_check_by_digest() {
    let c = TestCluster::start(2);
    let part = dglrun_integration_tests::gen_partitions(&c.local().join("out"), 2, 4096, "g")
        .expect("partitions");
    let mut copy = c.coord();
    copy.env("XDG_CACHE_HOME", c.dir.path().join("cache"))
        .args([
            "copy",
            "--workspace",
            "ws",
            "--rel_data_path",
            "data",
            "--part_config",
        ])
        .arg(&part)
        .arg("--ip_config")
        .arg(c.ip_config_file());
    let r = run(copy, Duration::from_secs(60));
    assert_eq!(r.code(), 0, "{r:?}");
    let setup = standin_setup();
    let flags = [
        "--setup",
        &setup,
        "--workspace",
        "ws",
        "--rel_data_path",
        "data",
        "--part_config",
        part.to_str().unwrap(),
    ];
    let (r, reports) = doctor(&c, &flags);
    assert_eq!(r.code(), 0, "{r:?}");
    for m in 0..2 {
        assert_eq!(status(&reports, m, "partition").0, "ok", "{r:?}");
    }

    // One byte of host 1's partition changes: its digest no longer matches.
    let feat = c.root(1).join("ws/data/part1/node_feat.dgl");
    let mut bytes = std::fs::read(&feat).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&feat, bytes).unwrap();
    let (r, reports) = doctor(&c, &flags);
    assert_eq!(r.code(), 1, "{r:?}");
    assert_eq!(status(&reports, 0, "partition").0, "ok", "{r:?}");
    assert_eq!(status(&reports, 1, "partition").0, "fail", "{r:?}");
    assert!(
        reports[1]["partition"]["fix"]
            .as_str()
            .unwrap()
            .contains("part1/node_feat.dgl"),
        "{r:?}"
    );
}

#[test]
fn a_clock_off_is_warned_then_failed_and_another_version_warned() {
    let mut c = TestCluster::start(2);
    c.set_agent_env(0, &[("DGL_AGENT_TEST_CLOCK_OFFSET_MS", "5000")]);
    c.set_agent_env(
        1,
        &[
            ("DGL_AGENT_TEST_CLOCK_OFFSET_MS", "-60000"),
            ("DGL_AGENT_TEST_VERSION", "0.0.1"),
        ],
    );
    let setup = standin_setup();
    let (r, reports) = doctor(&c, &["--setup", &setup]);
    assert_eq!(r.code(), 1, "{r:?}");
    let (s, detail) = status(&reports, 0, "agent");
    assert_eq!(s, "warn", "{r:?}");
    assert!(
        detail.contains("clock +49") || detail.contains("clock +50"),
        "{r:?}"
    );
    let (s, detail) = status(&reports, 1, "agent");
    assert_eq!(s, "fail", "{r:?}");
    assert!(
        detail.starts_with("0.0.1 (protocol") && detail.contains("clock -"),
        "{r:?}"
    );
    let fix = reports[1]["agent"]["fix"].as_str().unwrap();
    assert!(
        fix.contains("NTP") && fix.contains("the agent is version 0.0.1"),
        "{r:?}"
    );

    // Another version alone is a warning: doctor passes.
    c.set_agent_env(0, &[]);
    c.set_agent_env(1, &[("DGL_AGENT_TEST_VERSION", "0.0.1")]);
    let (r, reports) = doctor(&c, &["--setup", &setup]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(status(&reports, 0, "agent").0, "ok", "{r:?}");
    assert_eq!(status(&reports, 1, "agent").0, "warn", "{r:?}");
}
