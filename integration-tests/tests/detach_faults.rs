//! Faults of detached jobs across real separate hosts (network namespaces on a bridge, see
//! `netns`): machine 0's agent supervises the job, so no dgl-coord has to live. A killed
//! dgl-coord changes nothing; a cut link or a restarted agent ends the job everywhere, within
//! the lease, and `wait` reports it. Each test prints one `FIGURES` line.
//!
//! Agents and coordinator use a 3 s lease and a 1 s grace, so a lease expiry is quick.

// Test code throughout: a failed unwrap is a failed test, and a test may sleep; its helper
// modules are private to this test.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

mod faults_support;

use std::process::Command;
use std::time::{Duration, Instant};

use dglrun_integration_tests::netns::{start_or_skip, NetCluster};
use dglrun_integration_tests::run::{run, Run};
use dglrun_integration_tests::{pids_with_env, wait_gone};
use faults_support::*;
use serde_json::Value;

/// A detached job hanging on every host (a server, a trainer and its sampler each); returns
/// its id once all of it runs.
fn detached_hanging_job(c: &NetCluster) -> String {
    setup_workspaces(c);
    let r = run(
        launch(
            c,
            &["--num_trainers", "1", "--num_samplers", "1", "--detach"],
            "python3 fake_dgl.py --hang --samplers",
        ),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    let job = r.stdout.trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while stable_pids(c).len() < 3 * c.len() {
        assert!(Instant::now() < deadline, "the job never ran whole: {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    job
}

/// The job's long-lived processes: each host's server and trainer (their records) and the
/// trainer's sampler (its pid file).
fn stable_pids(c: &NetCluster) -> Vec<u32> {
    let mut pids: Vec<u32> = records(c).iter().map(|r| r.pid).collect();
    for h in 0..c.len() {
        pids.extend(pid_files(c, h, "sampler"));
    }
    pids.sort_unstable();
    pids
}

fn coord(c: &NetCluster, sub: &str, job: &str, flags: &[&str]) -> Command {
    let mut cmd = c.coord();
    cmd.args([sub, job, "--ip_config", "ip_config.txt"])
        .args(flags);
    cmd
}

fn wait_json(c: &NetCluster, job: &str) -> (Run, Value) {
    let r = run(coord(c, "wait", job, &["--json"]), Duration::from_secs(90));
    let v = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    (r, v)
}

#[test]
fn a_killed_dgl_coord_changes_nothing_for_a_detached_job() {
    let Some(c) = start_or_skip("detached: coordinator SIGKILL", 3, AGENT_FLAGS) else {
        return;
    };
    let job = detached_hanging_job(&c);
    let pids = stable_pids(&c);
    // An attached dgl-coord, SIGKILLed: it held no lease.
    let mut attach = Coord::start(coord(&c, "attach", &job, &[]));
    std::thread::sleep(Duration::from_secs(1));
    attach.kill();
    let t = Instant::now();
    std::thread::sleep(2 * LEASE + GRACE);
    let left = live(&pids);
    print_figures(
        "detached: dgl-coord SIGKILLed",
        t.elapsed(),
        pids.len() - left.len(),
        0,
    );
    let s = run(coord(&c, "stop", &job, &[]), Duration::from_secs(30));
    let (w, v) = wait_json(&c, &job);
    assert_eq!(left, pids, "every process lives on past two leases: {w:?}");
    assert_eq!(s.code(), 0, "{s:?}");
    assert_eq!((w.code(), &v["outcome"]), (143, &"stopped".into()), "{w:?}");
    assert!(wait_gone(&pids, Duration::from_secs(5)).is_empty());
}

/// Cuts host `cut`'s link mid-job; every host's part must be gone within the lease (plus
/// grace and slack), and `wait`, once the link is back, names the lost host.
fn cut_link_case(what: &str, cut: usize) {
    let Some(c) = start_or_skip(what, 3, AGENT_FLAGS) else {
        return;
    };
    let job = detached_hanging_job(&c);
    let pids = job_pids(&c, &job, None);
    let t = Instant::now();
    c.cut_link(cut);
    // The hosts that lost their leader (or the host that lost it) stop at lease expiry; the
    // leader declares the silent hosts lost after a lease and stops the rest.
    let left = wait_gone(&pids, 2 * LEASE + GRACE + SLACK);
    let clean_after = t.elapsed();
    let marked = pids_with_env("DGLRUN_JOB_ID", &job);
    c.restore_link(cut);
    print_figures(what, clean_after, left.len() + marked.len(), 0);
    assert!(
        left.is_empty(),
        "alive {clean_after:?} after the cut: {left:?}"
    );
    assert!(marked.is_empty(), "{marked:?}");
    let (w, v) = wait_json(&c, &job);
    assert_ne!(w.code(), 0, "{w:?}");
    assert_eq!(v["outcome"], "lost", "{v}");
    let text = v["text"].as_str().unwrap();
    // With the leader cut off, every other host went silent to it; it names the first.
    let named = (0..c.len())
        .filter(|&h| if cut == 0 { h != 0 } else { h == cut })
        .any(|h| text.contains(&format!("lost the agent of {}", c.host_name(h))));
    assert!(named, "names a lost host: {text}");
}

#[test]
fn the_leaders_link_cut_stops_every_host_within_the_lease() {
    cut_link_case("detached: leader link cut", 0);
}

#[test]
fn another_hosts_link_cut_stops_every_host_within_the_lease() {
    cut_link_case("detached: non-leader link cut", 2);
}

#[test]
fn a_restarted_leader_agent_fails_the_job_everywhere_and_records_it() {
    let Some(mut c) = start_or_skip("detached: leader agent restart", 3, AGENT_FLAGS) else {
        return;
    };
    let job = detached_hanging_job(&c);
    let pids = job_pids(&c, &job, None);
    let t = Instant::now();
    c.restart_agent(0);
    let left = wait_gone(&pids, LEASE + GRACE + SLACK);
    let clean_after = t.elapsed();
    print_figures(
        "detached: leader agent restarted",
        clean_after,
        left.len(),
        0,
    );
    assert!(left.is_empty(), "alive {clean_after:?} after: {left:?}");
    let (w, v) = wait_json(&c, &job);
    assert_eq!((w.code(), &v["outcome"]), (1, &"lost".into()), "{w:?}");
    assert!(v["text"].as_str().unwrap().contains("restarted"), "{v}");
}

#[test]
fn a_restarted_agent_on_another_host_fails_the_job_at_once() {
    let Some(mut c) = start_or_skip("detached: agent restart", 3, AGENT_FLAGS) else {
        return;
    };
    let job = detached_hanging_job(&c);
    let pids = job_pids(&c, &job, None);
    let t = Instant::now();
    c.restart_agent(1);
    let (w, v) = wait_json(&c, &job);
    let failed_after = t.elapsed();
    let left = wait_gone(&pids, Duration::from_secs(3));
    print_figures("detached: agent restarted", failed_after, left.len(), 0);
    assert!(left.is_empty(), "{left:?}");
    assert_eq!((w.code(), &v["outcome"]), (1, &"lost".into()), "{w:?}");
    let text = v["text"].as_str().unwrap();
    assert!(
        text.contains(&format!("lost the agent of {}", c.host_name(1))),
        "{text}"
    );
    // No answer-less wait for a lease: the agent said it no longer knows the job.
    assert!(failed_after < LEASE + SLACK, "{failed_after:?}");
}

#[test]
fn a_detach_is_refused_when_the_leader_cannot_reach_another_agent() {
    let Some(c) = start_or_skip("detached: leader cannot reach a host", 3, AGENT_FLAGS) else {
        return;
    };
    setup_workspaces(&c);
    // dgl-coord reaches every agent; machine 0's agent cannot reach machine 2's.
    let blackhole = Command::new("ip")
        .args(["-n", &c.hosts[0].ns, "route", "add", "blackhole"])
        .arg(format!("{}/32", c.ip(2)))
        .status()
        .unwrap();
    assert!(blackhole.success());
    let r = run(
        launch(
            &c,
            &["--num_trainers", "1", "--detach"],
            "python3 fake_dgl.py --hang",
        ),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(
        r.stderr
            .contains("machine 0's agent cannot reach every other agent")
            && r.stderr.contains(&format!("machine 2 at {}", c.ip(2))),
        "{r:?}"
    );
    assert!(records(&c).is_empty(), "nothing started: {r:?}");
}

#[test]
fn attach_across_a_link_blip_loses_and_repeats_no_line() {
    let Some(c) = start_or_skip("detached: attach across a blip", 3, AGENT_FLAGS) else {
        return;
    };
    setup_workspaces(&c);
    // Every process prints `tick i` every 0.1 s for 6 s, then exits 0.
    let ticks = "i=1; while [ $i -le 60 ]; do echo tick $i; i=$((i+1)); sleep 0.1; done";
    let r = run(
        launch(&c, &["--num_trainers", "1", "--detach"], ticks),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    let job = r.stdout.trim().to_string();
    let attach = Coord::start(coord(&c, "attach", &job, &["--from-start"]));
    std::thread::sleep(Duration::from_secs(2));
    // Shorter than half the lease: the job lives on, the streams resume.
    c.cut_link(1);
    std::thread::sleep(Duration::from_secs(1));
    c.restore_link(1);
    let f = attach.wait(Duration::from_secs(60));
    assert_eq!(f.code, Some(0), "{f:?}");
    let want: Vec<String> = (1..=60)
        .map(|i| format!("[m1 trainer0] tick {i}"))
        .collect();
    let got: Vec<&str> = f
        .stdout
        .lines()
        .filter(|l| l.starts_with("[m1 trainer0] "))
        .collect();
    print_figures(
        "detached: attach across a 1 s blip",
        Duration::ZERO,
        0,
        want.len().abs_diff(got.len()),
    );
    assert_eq!(got, want, "every line once, in order: {f:?}");
}
