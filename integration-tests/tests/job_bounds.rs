//! What one job can cost the agent: memory, whatever the job prints.

// Test code throughout: a failed unwrap is a failed test, and a test may set its own
// environment and sleep; its helper modules are private to this test.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::time::{Duration, Instant};

use dglrun_integration_tests::TestCluster;
use dglrun_proto::pb;

/// The agent's resident memory in KiB (`VmRSS` of /proc/<pid>/status).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn shell(label: &str, script: &str) -> pb::ProcessSpec {
    pb::ProcessSpec {
        label: label.into(),
        role: "trainer".into(),
        command: Some(pb::process_spec::Command::Shell(script.into())),
        ..Default::default()
    }
}

/// `yes` writes as fast as the agent reads, for 10 s; in the second job it outlives the shell
/// that started it, so the agent drains the pipe after the direct child's exit while `yes`
/// keeps filling it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_printing_without_pause_keeps_the_agent_under_64_mib() {
    const LIMIT_KIB: u64 = 64 << 10;
    let cluster = TestCluster::start(1);
    let agent = cluster.agents[0].pid().unwrap();
    let mut c = cluster.client(0);
    let jobs = [
        ("yes-plain", "exec yes"),
        ("yes-orphan", "yes & sleep 1; exit 0"),
    ];
    for (id, script) in jobs {
        // One job per workspace: each job gets its own.
        std::fs::create_dir_all(cluster.root(0).join(id)).unwrap();
        c.spawn(pb::SpawnRequest {
            job_id: id.into(),
            workspace: id.into(),
            processes: vec![shell("t0", script)],
            lease_ms: 30_000,
            restart: false,
        })
        .await
        .unwrap();
    }
    let idle = rss_kib(agent);
    let started = Instant::now();
    let mut peak = idle;
    while started.elapsed() < Duration::from_secs(10) {
        peak = peak.max(rss_kib(agent));
        if peak > LIMIT_KIB {
            break; // no need to take the machine's memory to show it
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "agent RSS under two `yes` jobs for {:.1} s: idle {} KiB, peak {} KiB ({:.1} MiB)",
        started.elapsed().as_secs_f64(),
        idle,
        peak,
        peak as f64 / 1024.0
    );
    let mut stops = Vec::new();
    for (id, _) in jobs {
        let r = c
            .stop(pb::StopRequest {
                job_id: id.into(),
                grace_ms: 100,
                force: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        stops.push((id, r));
    }
    assert!(
        peak <= LIMIT_KIB,
        "the agent grew to {peak} KiB (limit {LIMIT_KIB} KiB) under a chatty job"
    );
    for (id, r) in stops {
        assert_eq!(r.remaining, 0, "{id}: {r:?}");
    }
}

/// The lowest descriptor number free in process `pid`: with the soft limit there, the
/// process can open nothing more.
fn lowest_free_fd(pid: u32) -> u64 {
    let open: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !open.contains(n)).unwrap()
}

fn set_nofile(pid: u32, soft: &str, hard: &str) {
    let st = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft}:{hard}"))
        .status()
        .unwrap();
    assert!(st.success(), "prlimit failed");
}

/// An agent whose descriptors are exhausted cannot read /proc: its Stop must not say
/// "nothing left" while the job runs, and a later Stop must finish the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_that_cannot_read_proc_fails_and_the_job_is_stopped_later() {
    let cluster = TestCluster::start(1);
    std::fs::create_dir_all(cluster.root(0).join("ws")).unwrap();
    let agent = cluster.agents[0].pid().unwrap();
    let mut c = cluster.client(0);
    let reply = c
        .spawn(pb::SpawnRequest {
            job_id: "emfile".into(),
            workspace: "ws".into(),
            processes: vec![shell("t0", "exec sleep 60")],
            lease_ms: 60_000,
            restart: false,
        })
        .await
        .unwrap()
        .into_inner();
    let sleeper = reply.processes[0].pid;
    let limits = std::fs::read_to_string(format!("/proc/{agent}/limits")).unwrap();
    let hard = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .unwrap()
        .to_string();
    let stop = pb::StopRequest {
        job_id: "emfile".into(),
        grace_ms: 200,
        force: false,
        ..Default::default()
    };
    set_nofile(agent, &lowest_free_fd(agent).to_string(), &hard);
    let starved = c.stop(stop.clone()).await;
    set_nofile(agent, &hard, &hard);
    match &starved {
        Err(s) => assert!(s.message().contains("/proc"), "{s:?}"),
        Ok(r) => assert!(
            r.get_ref().remaining > 0,
            "a stop that could not read /proc claimed success: {r:?}"
        ),
    }
    let listed = c
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.jobs.iter().any(|j| j.job_id == "emfile"),
        "the job was forgotten: {listed:?}"
    );
    let r = c.stop(stop).await.unwrap().into_inner();
    assert_eq!(r.remaining, 0, "{r:?}");
    assert!(
        dglrun_integration_tests::wait_gone(&[sleeper], Duration::from_secs(5)).is_empty(),
        "sleep {sleeper} survived"
    );
}
