//! `dgl-coord rsh` over network namespaces whose link is cut: a lost link stops the remote
//! tree within the agent's lease and rsh exits 255 saying the connection was lost; a blip
//! shorter than the keepalives leaves the session as it was.

// Test code throughout: a failed unwrap is a failed test, and a test may sleep.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use dglrun_integration_tests::netns::{start_or_skip, NetCluster};
use dglrun_integration_tests::run::{reader, wait_with_timeout};
use dglrun_integration_tests::{pids_with_env, wait_gone};

/// The agents' lease (`--lease-timeout`): what a session's silence may last.
const LEASE: Duration = Duration::from_secs(6);
const AGENT_FLAGS: &[&str] = &["--lease-timeout", "6", "--grace", "1"];

fn marker() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// `rsh` to host 0 running `command` with `RSH_LINK_MARK` set, once its remote tree (`want`
/// processes) runs; the tree's pids.
fn start(c: &NetCluster, command: &str, want: usize) -> (Child, String, Vec<u32>) {
    let mark = marker();
    let mut cmd = c.coord();
    cmd.arg("rsh")
        .arg(c.ip(0).to_string())
        .arg(format!("export RSH_LINK_MARK={mark}; {command}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("start dgl-coord rsh");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pids = Vec::new();
    while pids.len() < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        pids = pids_with_env("RSH_LINK_MARK", &mark);
    }
    assert!(
        pids.len() >= want,
        "the remote tree did not start: {pids:?}"
    );
    (child, mark, pids)
}

#[test]
fn a_cut_link_stops_the_remote_tree_within_the_lease_and_rsh_exits_255() {
    let Some(c) = start_or_skip("rsh over a cut link", 1, AGENT_FLAGS) else {
        return;
    };
    let (mut child, mark, pids) = start(&c, "sleep 600 & sleep 601", 2);
    let stderr = reader(child.stderr.take().unwrap());
    let t = Instant::now();
    c.cut_link(0);
    let left = wait_gone(&pids, LEASE + Duration::from_secs(10));
    let stopped_after = t.elapsed();
    println!(
        "figure: remote tree stopped {stopped_after:?} after the link was cut (lease {LEASE:?})"
    );
    assert!(left.is_empty(), "still running after the lease: {left:?}");
    // The keepalives stop at the cut: the agent gives up one lease (and a renewal tick) later.
    assert!(
        stopped_after < LEASE + LEASE / 4 + Duration::from_secs(3),
        "{stopped_after:?}"
    );
    // rsh learns of it from HTTP/2's keepalive (5 s pings, 10 s to answer).
    let status = wait_with_timeout(&mut child, Duration::from_secs(40));
    let stderr = stderr.join().unwrap();
    println!("figure: rsh exited {:?} after the cut", t.elapsed());
    assert_eq!(status.and_then(|s| s.code()), Some(255), "{stderr}");
    assert!(
        stderr.starts_with(&format!("dgl-coord rsh: {}: connection lost", c.ip(0))),
        "{stderr}"
    );
    assert!(pids_with_env("RSH_LINK_MARK", &mark).is_empty());
    assert!(
        c.agent_log(0).contains("nothing from the client"),
        "{}",
        c.agent_log(0)
    );
}

#[test]
fn a_blip_shorter_than_the_keepalive_keeps_the_session() {
    let Some(c) = start_or_skip("rsh over a link blip", 1, AGENT_FLAGS) else {
        return;
    };
    // Reads one line of stdin after the blip and echoes it: both directions still work. (The
    // shell's own environment does not show an `export`: the sleep carries the mark.)
    let (mut child, _mark, pids) = start(
        &c,
        "sleep 60 >/dev/null 2>&1 & read line; echo got $line; echo done",
        1,
    );
    let stdout = reader(child.stdout.take().unwrap());
    let stderr = reader(child.stderr.take().unwrap());
    c.cut_link(0);
    std::thread::sleep(Duration::from_secs(3));
    c.restore_link(0);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        wait_gone(&pids, Duration::ZERO),
        pids,
        "the blip stopped the command"
    );
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"hello\n").unwrap();
    }
    let status = wait_with_timeout(&mut child, Duration::from_secs(30));
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{stderr}");
    assert_eq!(stdout, "got hello\ndone\n", "{stderr}");
    assert!(
        !c.agent_log(0).contains("nothing from the client"),
        "{}",
        c.agent_log(0)
    );
}
