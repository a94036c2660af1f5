//! Jobs end to end within one process: spawn, watch, stop, lease.

use std::time::Duration;

use dglrun_proto::pb::{self, job_event::Event, process_spec::Command};
use futures::StreamExt;

use super::*;

fn jobs(lease: Duration) -> (tempfile::TempDir, Arc<Jobs>) {
    let d = tempfile::tempdir().unwrap();
    let root = Root::new(d.path()).unwrap();
    std::fs::create_dir_all(root.path().join("ws")).unwrap();
    let j = Jobs::start(
        root,
        JobsConfig {
            lease_timeout: lease,
            grace: Duration::from_millis(300),
        },
    )
    .unwrap();
    (d, j)
}

fn shell(label: &str, script: &str) -> pb::ProcessSpec {
    pb::ProcessSpec {
        label: label.into(),
        role: "trainer".into(),
        command: Some(Command::Shell(script.into())),
        env: [("GREETING".to_string(), "hi $HOME".to_string())].into(),
        cwd: String::new(),
    }
}

fn spawn_req(id: &str, procs: Vec<pb::ProcessSpec>) -> pb::SpawnRequest {
    pb::SpawnRequest {
        job_id: id.into(),
        workspace: "ws".into(),
        processes: procs,
        lease_ms: 0,
    }
}

/// Events until every one of `n` processes exited.
async fn collect_until_exited(jobs: &Jobs, id: &str, n: usize) -> Vec<pb::JobEvent> {
    let mut s = jobs
        .watch(pb::WatchRequest {
            job_id: id.into(),
            after_seq: 0,
        })
        .unwrap();
    let mut out = Vec::new();
    let mut exits = 0;
    while exits < n {
        let ev = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("events in time")
            .expect("stream open")
            .unwrap();
        if matches!(ev.event, Some(Event::Exited(_))) {
            exits += 1;
        }
        out.push(ev);
    }
    out
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| tree::parse_stat(&s))
        .is_some_and(|p| p.is_alive())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_precedes_exit_and_env_is_expanded() {
    let (_d, jobs) = jobs(Duration::from_secs(30));
    let script = "echo \"$GREETING\"; echo err >&2; printf 'no newline'; pwd; exit 3";
    let reply = jobs
        .spawn(spawn_req("j1", vec![shell("t0", script)]))
        .await
        .unwrap();
    assert_eq!(reply.processes.len(), 1);
    let events = collect_until_exited(&jobs, "j1", 1).await;
    let home = std::env::var("HOME").unwrap_or_default();
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    for e in &events {
        if let Some(Event::Line(l)) = &e.event {
            let t = String::from_utf8_lossy(&l.text).to_string();
            if l.stream == OutputStream::Stdout as i32 {
                stdout.push(t);
            } else {
                stderr.push(t);
            }
        }
    }
    let ws = jobs.root.path().join("ws").display().to_string();
    assert_eq!(stdout, [format!("hi {home}"), format!("no newline{ws}")]);
    assert_eq!(stderr, ["err"]);
    match events.last().and_then(|e| e.event.as_ref()) {
        Some(Event::Exited(x)) => {
            assert_eq!((x.code, x.signal, x.stopped_by_agent), (3, 0, false));
        }
        other => panic!("last event {other:?}"),
    }
    assert!(matches!(events[0].event, Some(Event::Started(_))));
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_kills_a_setsid_grandchild_that_ignores_sigterm() {
    let (_d, jobs) = jobs(Duration::from_secs(30));
    // The grandchild leaves the process group and session and ignores SIGTERM.
    let script = "setsid sh -c 'trap \"\" TERM; echo $$ > gc.pid; exec sleep 60' & sleep 60";
    jobs.spawn(spawn_req("j2", vec![shell("t0", script)]))
        .await
        .unwrap();
    let pidfile = jobs.root.path().join("ws/gc.pid");
    let mut gc = None;
    for _ in 0..200 {
        if let Some(p) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            gc = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let gc = gc.expect("grandchild started");
    let listed = jobs.list();
    assert_eq!(listed.jobs.len(), 1);
    assert!(listed.jobs[0].live_pids >= 2, "{listed:?}");
    let started = Instant::now();
    let reply = jobs
        .stop(pb::StopRequest {
            job_id: "j2".into(),
            grace_ms: 300,
            force: false,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(reply.remaining, 0);
    assert!(reply.signalled >= 2, "{reply:?}");
    assert!(!alive(gc), "grandchild {gc} survived");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "grace was honoured"
    );
    let events = collect_until_exited(&jobs, "j2", 1).await;
    match events.last().and_then(|e| e.event.as_ref()) {
        Some(Event::Exited(x)) => assert!(x.stopped_by_agent && x.signal == 15, "{x:?}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_stops_the_job() {
    let (_d, jobs) = jobs(Duration::from_secs(30));
    let mut req = spawn_req("j3", vec![shell("t0", "sleep 60")]);
    req.lease_ms = 300;
    let pid = jobs.spawn(req).await.unwrap().processes[0].pid as i32;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            jobs.renew(pb::RenewRequest {
                job_id: "j3".into()
            })
            .unwrap()
            .known
        );
    }
    assert!(alive(pid), "renewed job still runs");
    let events = collect_until_exited(&jobs, "j3", 1).await;
    match events.last().and_then(|e| e.event.as_ref()) {
        Some(Event::Exited(x)) => assert!(x.stopped_by_agent, "{x:?}"),
        other => panic!("{other:?}"),
    }
    assert!(
        !jobs
            .renew(pb::RenewRequest {
                job_id: "nope".into()
            })
            .unwrap()
            .known
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_reasons() {
    let (_d, jobs) = jobs(Duration::from_secs(30));
    let err = jobs
        .spawn(spawn_req("bad id!", vec![shell("t0", "true")]))
        .await
        .unwrap_err();
    assert!(err.message().contains("job id"), "{err}");
    let mut req = spawn_req("j4", vec![shell("t0", "true")]);
    req.workspace = "missing".into();
    let err = jobs.spawn(req).await.unwrap_err();
    assert!(err.message().contains("does not exist"), "{err}");
    let mut req = spawn_req("j4", vec![shell("t0", "true")]);
    req.workspace = "/etc".into();
    assert_eq!(
        jobs.spawn(req).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    let argv = pb::ProcessSpec {
        label: "x".into(),
        command: Some(Command::Argv(pb::Argv {
            args: vec!["/nonexistent/prog".into()],
        })),
        ..Default::default()
    };
    let err = jobs.spawn(spawn_req("j5", vec![argv])).await.unwrap_err();
    assert!(
        err.message().contains("cannot start x (/nonexistent/prog)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_reports_live_jobs_of_the_workspace() {
    let (_d, jobs) = jobs(Duration::from_secs(30));
    jobs.spawn(spawn_req("j6", vec![shell("t0", "sleep 60")]))
        .await
        .unwrap();
    let r = jobs
        .preflight(pb::PreflightRequest {
            workspace: "ws".into(),
            read_files: vec![],
            free_port_on: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(r.live_jobs.len(), 1);
    assert_eq!(r.live_jobs[0].job_id, "j6");
    jobs.shutdown().await;
    let r = jobs
        .preflight(pb::PreflightRequest {
            workspace: "ws".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.live_jobs.is_empty());
}

/// Forgetting a finished job must leave the agent responsive (the job record is saved after
/// the job leaves the map, which locks the map again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_a_job_keeps_the_agent_responsive() {
    let (_d, jobs) = jobs(Duration::from_secs(30));
    jobs.spawn(spawn_req("done-1", vec![shell("t", "true")]))
        .await
        .unwrap();
    collect_until_exited(&jobs, "done-1", 1).await;
    // A plain thread: a deadlocked one is abandoned when the test fails, not waited for.
    let (tx, rx) = std::sync::mpsc::channel();
    let runtime = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        let _in_runtime = runtime.enter();
        jobs.remove("done-1");
        let _ = tx.send(jobs.list().jobs.len());
    });
    let n = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("forgetting a job must not deadlock the job map");
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_monitor_sleeps_until_the_next_deadline() {
    let (_d, jobs) = jobs(Duration::from_secs(30));
    let now = Instant::now();
    assert_eq!(lease::check(&jobs, now), None, "no jobs: nothing is due");

    let mut req = spawn_req("j-due", vec![shell("t0", "sleep 60")]);
    req.lease_ms = 2_000;
    jobs.spawn(req).await.unwrap();
    let now = Instant::now();
    let due = lease::check(&jobs, now).expect("a running job's lease expiry is due");
    let left = due.saturating_duration_since(now);
    assert!(
        left > Duration::from_millis(1_500) && left <= Duration::from_secs(2),
        "due in {left:?}, expected the 2 s lease expiry"
    );

    // Finished and watched to the end: next due when it is to be forgotten.
    jobs.stop(pb::StopRequest {
        job_id: "j-due".into(),
        grace_ms: 100,
        force: false,
        ..Default::default()
    })
    .await
    .unwrap();
    collect_until_exited(&jobs, "j-due", 1).await;
    jobs.renew(pb::RenewRequest {
        job_id: "j-due".into(),
    })
    .unwrap();
    let now = Instant::now();
    let due = lease::check(&jobs, now).expect("the finished job's forget time is due");
    let left = due.saturating_duration_since(now);
    assert!(
        left <= Duration::from_secs(2),
        "the lease expiry still comes first: {left:?}"
    );
    // Past both: the first look marks the lease as run out (nothing is left to stop), the
    // next forgets the job.
    let later = now + lease::KEEP_FINISHED + Duration::from_secs(1);
    lease::check(&jobs, later);
    assert_eq!(
        lease::check(&jobs, later),
        None,
        "forgotten once kept long enough"
    );
    let known = jobs
        .renew(pb::RenewRequest {
            job_id: "j-due".into(),
        })
        .unwrap()
        .known;
    assert!(!known, "a forgotten job is unknown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_spawned_on_an_idle_agent_wakes_the_lease_monitor() {
    let (_d, jobs) = jobs(Duration::from_secs(30));
    // Long enough for the monitor to find no jobs and go to sleep for its longest.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut req = spawn_req("j-idle", vec![shell("t0", "sleep 60")]);
    req.lease_ms = 300;
    let started = Instant::now();
    let pid = jobs.spawn(req).await.unwrap().processes[0].pid as i32;
    // Expiry at 300 ms plus the 300 ms grace; far below the monitor's longest sleep (10 s).
    let deadline = started + Duration::from_secs(5);
    while alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !alive(pid),
        "the lease was not enforced within 5 s: the spawn did not wake the monitor"
    );
}
