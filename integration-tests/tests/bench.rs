//! The benchmark suite itself runs: its smallest configuration, against the debug binaries,
//! must measure every figure of the sections it is asked for. Only that it measures is
//! asserted, never how fast (speed is what the suite reports, on release binaries).

// Test code throughout: a failed unwrap is a failed test, and a test may set its own
// environment and sleep; its helper modules are private to this test.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::time::Duration;

use dglrun_integration_tests::bin;
use dglrun_integration_tests::run::run;

#[test]
fn the_benchmark_suite_measures_every_figure_of_a_small_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = std::process::Command::new(bin("bench"));
    cmd.args(["launch", "teardown", "scale", "broadcast", "--no-ssh"])
        .args(["--reps", "1", "--scale-agents", "4"])
        .args(["--bcast-gib", "0.01", "--bcast-hosts", "1,2"])
        .arg("--dir")
        .arg(dir.path());
    let r = run(cmd, Duration::from_secs(300));
    assert_eq!(r.code(), 0, "{r:?}");
    let rows: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with("| ")).collect();
    let errors: Vec<&&str> = rows
        .iter()
        .filter(|l| l.contains("error:") || l.contains("failed runs"))
        .collect();
    assert!(
        errors.is_empty(),
        "figures not measured: {errors:#?}\n{r:?}"
    );
    for figure in [
        "launch direct: all 12 running",
        "launch torchrun: dglrun - floor",
        "teardown direct: failure -> all gone",
        "teardown torchrun: failure -> all gone",
        "scale: 16 procs all started",
        "scale: processes left after",
        "scale: idle CPU, all 4 agents",
        "broadcast 0.01 GiB into 1 agent",
        "broadcast 0.01 GiB: time to 2 / to 1",
    ] {
        assert!(
            rows.iter().any(|l| l.contains(figure)),
            "no row {figure:?} in the table:\n{}",
            r.stdout
        );
    }
    let left = rows
        .iter()
        .find(|l| l.contains("scale: processes left after"))
        .expect("row");
    assert!(left.contains("| pass"), "processes were left: {left}");
}

/// `bench links` small: 10 Mbit/s links and 4 x 1 MiB, every scenario and copy_files.py's
/// baseline (needs root, network namespaces, sshd and DGL's copy_files.py).
#[test]
fn the_link_benchmark_measures_every_figure_of_a_small_run() {
    let test = "link benchmark";
    if let Some(why) = dglrun_integration_tests::netns::unavailable() {
        dglrun_integration_tests::cannot_run(test, &format!("no network namespaces ({why})"));
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = std::process::Command::new(bin("bench"));
    cmd.args([
        "links",
        "--reps",
        "1",
        "--link-mbit",
        "10",
        "--link-mib",
        "1",
    ])
    .arg("--dir")
    .arg(dir.path());
    let r = run(cmd, Duration::from_secs(300));
    assert_eq!(r.code(), 0, "{r:?}");
    let rows: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with("| ")).collect();
    let errors: Vec<&&str> = rows.iter().filter(|l| l.contains("error:")).collect();
    assert!(
        errors.is_empty(),
        "figures not measured: {errors:#?}\n{r:?}"
    );
    for figure in [
        "links (a) all 10 Mbit/s: 4 x 1 MiB scatter, master link busy",
        "links (b) master 100 Mbit/s, hosts 10 Mbit/s: least busy host link",
        "links (b): copy_files.py time / dglrun time",
        "links (c) (a) + 50 ms RTT: master link busy",
        "links (c): copy time / (a)'s",
    ] {
        assert!(
            rows.iter().any(|l| l.contains(figure)),
            "no row {figure:?} in the table:\n{}",
            r.stdout
        );
    }
    // The utilisation over time: one bar line per link of each scenario shown.
    let bars = r.stdout.lines().filter(|l| l.contains(" Mbit/s |")).count();
    assert!(
        bars >= 5 * 4,
        "no link utilisation over time:\n{}",
        r.stdout
    );
}

#[test]
fn the_rsh_benchmark_measures_its_figures() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = std::process::Command::new(bin("bench"));
    cmd.args(["rsh", "--no-ssh", "--reps", "1", "--rsh-mib", "4", "--dir"])
        .arg(dir.path());
    let r = run(cmd, Duration::from_secs(120));
    assert_eq!(r.code(), 0, "{r:?}");
    for figure in [
        "rsh: `dgl-coord rsh HOST true`",
        "rsh: 4 MiB through `rsh HOST cat`",
        "rsh: launch.py, do-nothing job on 4 hosts, over the shims",
    ] {
        let row = r
            .stdout
            .lines()
            .find(|l| l.starts_with("| ") && l.contains(figure));
        let row = row.unwrap_or_else(|| panic!("no row {figure:?}:\n{}", r.stdout));
        assert!(!row.contains("error:"), "{row}");
    }
}

#[test]
fn the_logs_benchmark_measures_every_figure_of_a_small_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = std::process::Command::new(bin("bench"));
    cmd.args([
        "logs",
        "--reps",
        "1",
        "--logs-mib",
        "4",
        "--logs-rate",
        "2000",
    ])
    .arg("--dir")
    .arg(dir.path());
    let r = run(cmd, Duration::from_secs(300));
    assert_eq!(r.code(), 0, "{r:?}");
    let rows: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with("| ")).collect();
    assert!(
        !rows.iter().any(|l| l.contains("error:")),
        "figures not measured:\n{}",
        r.stdout
    );
    for figure in [
        "logs: `dgl-coord logs` of 4 MiB on 4 hosts",
        "logs: --follow, line written -> printed",
        "logs: agent CPU, job printing 2000 lines/s",
        "logs: agent peak RSS",
    ] {
        assert!(
            rows.iter().any(|l| l.contains(figure)),
            "no row {figure:?} in the table:\n{}",
            r.stdout
        );
    }
}
