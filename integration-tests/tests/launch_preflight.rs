//! Doctor's cheap checks as launch's preflight, on real agents: a host whose DGL server port
//! is already held, whose clock is far off, or whose /dev/shm cannot hold its partition is
//! refused by name before anything starts; a sound cluster launches.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use dglrun_integration_tests::fake_dgl::records;
use dglrun_integration_tests::run::run;
use dglrun_integration_tests::{TestCluster, WS};

fn host(c: &TestCluster, i: usize) -> String {
    format!("m{i} ({}:{})", c.ip(i), c.port)
}

fn assert_nothing_started(c: &TestCluster) {
    for i in 0..c.len() {
        assert!(records(c.root(i)).is_empty(), "something ran on m{i}");
    }
}

#[test]
fn a_held_server_port_is_refused_naming_the_host_port_and_holder() {
    let c = TestCluster::with_workspace(2);
    // What an earlier job's server would hold: host 1's first DGL server port.
    let held = std::net::TcpListener::bind((c.ip(1), 30050)).expect("bind the server port");
    let r = run(
        c.launch_direct("1", &[], "python3 fake_dgl.py"),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 1, "{r:?}");
    let want = format!(
        "{}: DGL server port held: 30050 by pid {}",
        host(&c, 1),
        std::process::id()
    );
    assert!(r.stderr.contains(&want), "{r:?}");
    // Host 0's port is on another address: free.
    assert!(!r.stderr.contains(&host(&c, 0)), "{r:?}");
    assert_nothing_started(&c);

    drop(held);
    let r = run(
        c.launch_direct("1", &[], "python3 fake_dgl.py"),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 0, "{r:?}");
}

#[test]
fn a_host_whose_clock_is_far_off_is_refused() {
    let mut c = TestCluster::with_workspace(2);
    c.set_agent_env(0, &[("DGL_AGENT_TEST_CLOCK_OFFSET_MS", "-90000")]);
    let r = run(
        c.launch_direct("1", &[], "python3 fake_dgl.py"),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 1, "{r:?}");
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains(&host(&c, 0)))
        .unwrap_or_else(|| panic!("no line names m0: {r:?}"));
    let offset: i64 = line
        .split("its clock is ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {line:?}"));
    // 90 s behind, give or take the round trip the offset is measured over.
    assert!((-91_000..=-89_000).contains(&offset), "{r:?}");
    assert!(
        line.contains("ms off this host's") && line.contains("NTP"),
        "{r:?}"
    );
    assert!(!r.stderr.contains(&host(&c, 1)), "{r:?}");
    assert_nothing_started(&c);

    // A few seconds off is only doctor's warning: the launch goes ahead.
    c.set_agent_env(0, &[("DGL_AGENT_TEST_CLOCK_OFFSET_MS", "4000")]);
    let r = run(
        c.launch_direct("1", &[], "python3 fake_dgl.py"),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 0, "{r:?}");
}

#[test]
fn a_partition_larger_than_dev_shm_is_refused() {
    let c = TestCluster::with_workspace(2);
    // Sparse: 8 TiB that take no space, in the partition host 1 loads.
    let part = c.root(1).join(WS).join("data/part1/graph.dgl");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&part)
        .unwrap()
        .set_len(1 << 43)
        .unwrap();
    let r = run(
        c.launch_direct("1", &[], "python3 fake_dgl.py"),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 1, "{r:?}");
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains(&host(&c, 1)))
        .unwrap_or_else(|| panic!("no line names m1: {r:?}"));
    assert!(
        line.contains("/dev/shm") && line.contains("partition 8192.0 GiB"),
        "{r:?}"
    );
    assert!(!r.stderr.contains(&host(&c, 0)), "{r:?}");
    assert_nothing_started(&c);

    // The dry run checks the same.
    let r = run(
        c.launch_direct("1", &["--dry-run"], "python3 fake_dgl.py"),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr.contains("/dev/shm"), "{r:?}");
}
