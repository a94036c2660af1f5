//! Faults across real separate hosts (network namespaces on a bridge, see `netns`): a killed
//! coordinator, a cut link, a short blip, a killed and restarted agent, an agent stopped with
//! SIGTERM, and copy faults.
//!
//! Every test asserts on processes by pid (records written by `fixtures/fake_dgl.py`, the
//! `*.pid` files of samplers and setsid grandchildren, and /proc scans for the job's marker
//! variables) and on files by SHA-256. Each prints one `FIGURES` line: time to a clean state,
//! processes left, bytes lost or corrupted.
//!
//! Agents and coordinator use a 3 s lease and a 1 s grace, so a lease expiry is quick.

// Test code throughout: a failed unwrap is a failed test, and a test may set its own
// environment and sleep; its helper modules are private to this test.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

mod faults_support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use dglrun_integration_tests::bench::compress::write_features;
use dglrun_integration_tests::netns::{start_or_skip, NetCluster, AGENT_PORT};
use dglrun_integration_tests::partitions::write_random;
use dglrun_integration_tests::{gen_partitions, pids_with_env, wait_gone, WS};
use faults_support::proxy::Proxy;
use faults_support::*;

const MIB: u64 = 1 << 20;

#[test]
fn a_killed_coordinator_leaves_nothing_on_any_host_once_the_lease_expires() {
    let Some(c) = start_or_skip("coordinator SIGKILL", 3, AGENT_FLAGS) else {
        return;
    };
    let (mut coord, job) = hanging_job(&c, true);
    let pids = job_pids(&c, &job, None);
    // Per host: a server, a trainer, its sampler and its setsid grandchild.
    assert!(pids.len() >= 12, "{pids:?}");

    let t = Instant::now();
    coord.kill();
    std::thread::sleep(LEASE / 3);
    let early = live(&pids);
    assert_eq!(
        early.len(),
        pids.len(),
        "the job lives until its lease runs out"
    );
    let left = wait_gone(&pids, LEASE + GRACE + SLACK);
    let clean_after = t.elapsed();
    let marked = pids_with_env("DGLRUN_JOB_ID", &job);
    print_figures(
        "coordinator SIGKILLed mid-job",
        clean_after,
        left.len() + marked.len(),
        0,
    );
    assert!(
        left.is_empty(),
        "alive {clean_after:?} after the kill: {left:?}"
    );
    assert!(
        marked.is_empty(),
        "still carrying the job's marker: {marked:?}"
    );
    for i in 0..c.len() {
        assert!(
            c.agent_log(i).contains("lease expired"),
            "agent {i} says why:\n{}",
            c.agent_log(i)
        );
    }
}

#[test]
fn a_cut_link_fails_the_job_naming_the_host_and_both_sides_clean_up() {
    let Some(c) = start_or_skip("link cut", 3, AGENT_FLAGS) else {
        return;
    };
    let (coord, job) = hanging_job(&c, false);
    let cut_side = job_pids(&c, &job, Some(1));
    let other_side: Vec<u32> = (0..c.len())
        .filter(|&h| h != 1)
        .flat_map(|h| job_pids(&c, &job, Some(h)))
        .collect();
    assert!(cut_side.len() >= 3 && other_side.len() >= 6);

    let t = Instant::now();
    c.cut_link(1);
    let r = coord.wait(LEASE + Duration::from_secs(20));
    let failed_after = t.elapsed();
    assert_ne!(r.code, Some(0), "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("lost the agent of {}", c.host_name(1))),
        "names the host: {r:?}"
    );
    // No answer is not proof of death: the coordinator waits out the lease first, counted
    // like the agent counts it, from the last renewal (at most lease/4 before the cut).
    assert!(
        failed_after >= LEASE - LEASE / 4 - Duration::from_millis(200),
        "{failed_after:?}"
    );
    let others_left = wait_gone(&other_side, Duration::from_secs(1));
    // The cut host never hears from the coordinator again: its agent's lease runs out.
    let cut_left = wait_gone(
        &cut_side,
        (LEASE + GRACE + SLACK).saturating_sub(t.elapsed()),
    );
    let clean_after = t.elapsed();
    let marked = pids_with_env("DGLRUN_JOB_ID", &job);
    let log = c.agent_log(1);
    c.restore_link(1);
    print_figures(
        "link to one host cut mid-job",
        clean_after,
        others_left.len() + cut_left.len() + marked.len(),
        0,
    );
    assert!(others_left.is_empty(), "other hosts: {others_left:?}");
    assert!(cut_left.is_empty(), "cut host: {cut_left:?}\n{log}");
    assert!(marked.is_empty(), "{marked:?}");
    assert!(log.contains("lease expired"), "{log}");
}

#[test]
fn a_link_blip_shorter_than_the_lease_loses_neither_the_job_nor_a_line() {
    let Some(c) = start_or_skip("link blip", 3, AGENT_FLAGS) else {
        return;
    };
    setup_workspaces(&c);
    const TICKS: usize = 60;
    for i in 0..c.len() {
        std::fs::write(c.root(i).join(WS).join("tick.py"), tick_script(TICKS)).expect("tick.py");
    }
    let mut coord = Coord::start(launch(
        &c,
        &["--num_trainers", "1"],
        "python3 tick.py && python3 fake_dgl.py",
    ));
    // Every process ticks every 0.1 s; cut once all are under way.
    coord.wait_for("tick 5 of", 6);
    // Half the lease: the longest blip always survived (the last renewal may have been a
    // quarter lease before the cut, the next try comes at most a quarter lease after it ends).
    let blip = LEASE / 2;
    let t = Instant::now();
    c.cut_link(1);
    std::thread::sleep(blip);
    c.restore_link(1);
    let r = coord.wait(Duration::from_secs(90));
    let done_after = t.elapsed();
    let mut lost = 0usize;
    let mut lost_bytes = 0usize;
    for host in 0..c.len() {
        for label in ["server0", "trainer0"] {
            let prefix = format!("[m{host} {label}] tick ");
            let got: Vec<usize> = r
                .stdout
                .lines()
                .filter_map(|l| l.strip_prefix(&prefix))
                .filter_map(|n| n.split_whitespace().next()?.parse().ok())
                .collect();
            let want: Vec<usize> = (0..TICKS).collect();
            if got != want {
                eprintln!("{prefix}: got {got:?}");
            }
            let missing = want.iter().filter(|i| !got.contains(i)).count();
            lost += missing;
            lost_bytes += missing * format!("tick {TICKS} of {TICKS}\n").len();
        }
    }
    let recs = records(&c);
    let pids: Vec<u32> = recs.iter().map(|r| r.pid).collect();
    let left = wait_gone(&pids, Duration::from_secs(1));
    print_figures(
        &format!("link cut for {blip:?} (lease {LEASE:?})"),
        done_after,
        left.len(),
        lost_bytes,
    );
    assert_eq!(r.code, Some(0), "the job survives the blip: {r:?}");
    assert_eq!(lost, 0, "every line arrives once, in order");
    assert!(left.is_empty(), "{left:?}");
    assert!(
        !c.agent_log(1).contains("lease expired"),
        "{}",
        c.agent_log(1)
    );
}

#[test]
fn a_killed_and_restarted_agent_leaves_no_orphans_and_fails_the_job_at_once() {
    let Some(mut c) = start_or_skip("agent SIGKILL and restart", 3, AGENT_FLAGS) else {
        return;
    };
    let (mut coord, job) = hanging_job(&c, true);
    let on_host1 = job_pids(&c, &job, Some(1));
    let elsewhere: Vec<u32> = [0, 2]
        .iter()
        .flat_map(|&h| job_pids(&c, &job, Some(h)))
        .collect();
    assert!(on_host1.len() >= 4, "{on_host1:?}");
    // The agent keeps its direct children on record, with their start times.
    let record = std::fs::read_to_string(c.root(1).join(".dglrun/jobs.json")).expect("record");
    assert!(record.contains(&job), "{record}");

    let t = Instant::now();
    c.kill_agent(1);
    coord.wait_for("lost the agent of", 1);
    let failed_after = t.elapsed();
    // Its exit waits for the other hosts' stop (the grandchildren ignore SIGTERM: 1 s grace).
    let r = coord.wait(Duration::from_secs(20));
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(
        r.stderr.contains(&format!(
            "lost the agent of {}: the agent is not running (connection refused",
            c.host_name(1)
        )),
        "{r:?}"
    );
    eprintln!(
        "FIGURES | agent SIGKILLed | dgl-coord noticed and named the host after {} ms (lease {LEASE:?})",
        failed_after.as_millis()
    );
    assert!(
        failed_after < LEASE / 3,
        "fails fast, not after the lease: {failed_after:?}"
    );
    let elsewhere_left = wait_gone(&elsewhere, Duration::from_secs(1));
    assert!(elsewhere_left.is_empty(), "{elsewhere_left:?}");
    // Orphaned: nothing stops them until the agent comes back.
    assert_eq!(live(&on_host1).len(), on_host1.len(), "orphans run on");

    let t = Instant::now();
    c.restart_agent(1);
    let restarted_after = t.elapsed();
    let left = wait_gone(&on_host1, Duration::from_millis(500));
    let marked = pids_with_env("DGLRUN_JOB_ID", &job);
    print_figures(
        "agent SIGKILLed, restarted",
        restarted_after,
        left.len() + marked.len(),
        0,
    );
    assert!(
        left.is_empty(),
        "the restarted agent stopped them: {left:?}"
    );
    assert!(marked.is_empty(), "{marked:?}");
    let log = c.agent_log(1);
    for line in log.lines().filter(|l| l.contains("previous run")) {
        eprintln!("agent 1 after its restart: {line}");
    }
    assert!(
        log.contains("a previous run of this agent left running") && log.contains(&job),
        "{log}"
    );
}

#[test]
fn a_sigtermed_agent_stops_its_jobs_before_it_exits() {
    let Some(mut c) = start_or_skip("agent SIGTERM", 3, AGENT_FLAGS) else {
        return;
    };
    let (coord, job) = hanging_job(&c, true);
    let on_host1 = job_pids(&c, &job, Some(1));
    let agent = c.agent_pid(1).expect("agent pid");

    let t = Instant::now();
    let status = c
        .stop_agent(1, Duration::from_secs(20))
        .expect("agent exits");
    let stopped_after = t.elapsed();
    // Checked the moment the agent is gone: it stopped them before it exited.
    let left = live(&on_host1);
    let r = coord.wait(Duration::from_secs(20));
    print_figures("agent SIGTERMed", stopped_after, left.len(), 0);
    assert!(status.success(), "{status:?}");
    assert!(left.is_empty(), "agent {agent} exited leaving {left:?}");
    assert_ne!(r.code, Some(0), "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("lost the agent of {}", c.host_name(1))),
        "{r:?}"
    );
    let everywhere = job_pids(&c, &job, None);
    assert!(wait_gone(&everywhere, Duration::from_secs(1)).is_empty());
    let log = c.agent_log(1);
    assert!(log.contains("job stopped: agent shutting down"), "{log}");
    let record = std::fs::read_to_string(c.root(1).join(".dglrun/jobs.json")).expect("record");
    assert!(!record.contains(&job), "nothing left on record: {record}");
}

/// Partitions for two machines; machine 1's graph file is `big` bytes (several 4 MiB chunks).
fn copy_set(c: &NetCluster, big: u64) -> PathBuf {
    let pc = gen_partitions(&c.local().join("src"), c.len(), MIB, "g").expect("partitions");
    let graph = pc.parent().expect("dir").join("part1/graph.dgl");
    write_random(&graph, big, 77).expect("big file");
    pc
}

/// Waits until host `i` holds a partial file of at least `min` bytes; returns its path.
fn wait_for_partial(c: &NetCluster, i: usize, min: u64, coord: &mut Coord) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for p in partials(c, i) {
            if std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0) >= min {
                return p;
            }
        }
        assert!(coord.running(), "the copy ended before a partial showed up");
        assert!(Instant::now() < deadline, "no partial file on m{i}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn an_agent_killed_mid_copy_keeps_its_partial_and_the_rerun_resumes_and_verifies() {
    let Some(mut c) = start_or_skip("agent killed mid-copy", 2, AGENT_FLAGS) else {
        return;
    };
    let pc = copy_set(&c, 48 * MIB + 5);
    let ip_config = c.ip_config_file(30050);
    let mut coord = Coord::start(copy_cmd(
        &c,
        &ip_config,
        &pc,
        &["--retries", "1", "--jobs", "1"],
    ));
    let partial = wait_for_partial(&c, 1, 8 * MIB, &mut coord);
    let t = Instant::now();
    c.kill_agent(1);
    let r = coord.wait(Duration::from_secs(60));
    assert_ne!(r.code, Some(0), "the copy fails with m1 gone: {r:?}");
    let d0 = delivery(&c, 0, &pc);
    assert_eq!(d0.missing + d0.corrupted, 0, "m0 finished and verified");
    let kept = std::fs::metadata(&partial).expect("partial").len();

    // The restart cleans up processes and its own temporaries, never a copy's partial.
    c.restart_agent(1);
    let after_restart = std::fs::metadata(&partial).map(|m| m.len()).ok();
    assert_eq!(
        after_restart,
        Some(kept),
        "the partial survives the restart as it was"
    );
    let r = Coord::start(copy_cmd(&c, &ip_config, &pc, &[])).wait(Duration::from_secs(120));
    let clean_after = t.elapsed();
    let json = report(&r);
    let resumed = json["hosts"][1]["files"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["path"] == "ws/data/part1/graph.dgl"))
        .and_then(|f| f["resumed_from"].as_u64())
        .unwrap_or(0);
    let (d0, d1) = (delivery(&c, 0, &pc), delivery(&c, 1, &pc));
    let bad = d0.missing + d0.corrupted + d1.missing + d1.corrupted;
    print_figures(
        "agent SIGKILLed mid-copy, restarted, copy rerun",
        clean_after,
        0,
        bad as usize,
    );
    eprintln!(
        "FIGURES | agent SIGKILLed mid-copy | partial kept {kept} bytes, rerun resumed at {resumed} bytes"
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(resumed >= 4 * MIB, "the rerun resumes the partial: {json}");
    assert!(d0.files >= 3 && d1.files >= 3);
    assert_eq!(
        bad, 0,
        "every file matches its source by hash: {d0:?} {d1:?}"
    );
    assert!(partials(&c, 0).is_empty() && partials(&c, 1).is_empty());
}

#[test]
fn a_chunk_corrupted_in_transit_is_refused_resent_and_never_written() {
    corrupted_in_transit(false);
}

#[test]
fn a_compressed_chunk_corrupted_in_transit_is_refused_resent_and_never_written() {
    corrupted_in_transit(true);
}

/// One byte of a chunk message flipped on the way to machine 1; with `compress`, the data
/// compresses, so the byte lands in a zstd frame (which then fails to decompress, or
/// decompresses to bytes whose SHA-256 is wrong).
fn corrupted_in_transit(compress: bool) {
    let what = if compress {
        "compressed chunk corrupted in transit"
    } else {
        "chunk corrupted in transit"
    };
    // Plaintext on both sides: through TLS a flipped byte only breaks the record's MAC, and
    // the point here is the agent's own check of every chunk.
    let agent_flags: Vec<&str> = AGENT_FLAGS
        .iter()
        .copied()
        .chain(["--insecure-plaintext"])
        .collect();
    let Some(c) = start_or_skip(what, 2, &agent_flags) else {
        return;
    };
    let pc = copy_set(&c, 12 * MIB + 3);
    let extra: &[&str] = if compress {
        // Every file of machine 1 compresses, so every chunk to it travels as a zstd frame.
        let part = pc.parent().expect("dir").join("part1");
        for (i, f) in ["graph.dgl", "node_feat.dgl", "edge_feat.dgl"]
            .iter()
            .enumerate()
        {
            let len = if i == 0 { 12 * MIB + 3 } else { MIB };
            write_features(&part.join(f), len, 77 + i as u64).expect("compressible file");
        }
        &["--compress", "zstd"]
    } else {
        &[]
    };
    // Machine 1 is reached through the proxy, on the coordinator's own address.
    let listen = SocketAddr::new(c.coord_ip.into(), AGENT_PORT);
    let upstream = SocketAddr::new(c.ip(1).into(), AGENT_PORT);
    // Inside the payload of a chunk message: two MiB into the data (a 4 MiB chunk), or half a
    // MiB into the frames when they are compressed (about 3 MiB in all, over 2 connections).
    let flip_at = if compress { MIB / 2 } else { 2 * MIB } + 12_345;
    let proxy = c
        .spawn_in_coord_ns(move || Proxy::start(listen, upstream, flip_at))
        .join()
        .expect("proxy thread")
        .expect("enter the namespace")
        .expect("proxy listens");
    let ip_config = c.local().join("ip_config_proxied.txt");
    std::fs::write(
        &ip_config,
        format!("{} 30050\n{} 30050\n", c.ip(0), c.coord_ip),
    )
    .expect("ip_config");
    let t = Instant::now();
    let mut cmd = copy_cmd(&c, &ip_config, &pc, extra);
    cmd.env("DGL_COORD_INSECURE_PLAINTEXT", "true");
    let r = Coord::start(cmd).wait(Duration::from_secs(120));
    let took = t.elapsed();
    let flipped = proxy
        .tally
        .flipped
        .load(std::sync::atomic::Ordering::SeqCst);
    let (d0, d1) = (delivery(&c, 0, &pc), delivery(&c, 1, &pc));
    let (corrupted, missing) = (d0.corrupted + d1.corrupted, d0.missing + d1.missing);
    // Whatever the outcome, the corrupted byte reached no file: a partial left behind holds
    // only a prefix of its source.
    let corrupt_partials = partials_not_prefix_of_source(&c, 1, &pc);
    drop(proxy);
    print_figures(
        &format!("one byte flipped in transit ({what})"),
        took,
        0,
        (corrupted + missing) as usize,
    );
    eprintln!(
        "FIGURES | one byte flipped in transit ({what}) | corrupted bytes on disk {corrupted}, \
         bytes not delivered {missing}"
    );
    assert!(flipped, "the proxy corrupted the stream");
    assert_eq!(corrupted, 0, "no corrupted file under its name");
    assert!(corrupt_partials.is_empty(), "{corrupt_partials:?}");
    let refused = |reason: &str| r.stderr.contains(reason) || r.stdout.contains(reason);
    let bad_hash = "does not match its SHA-256 in the manifest; nothing from it was written";
    let bad_frame = "the compressed chunk at offset";
    assert!(
        refused(bad_hash) || (compress && refused(bad_frame)),
        "the agent refused the chunk: {r:?}"
    );
    if compress {
        assert!(r.stdout.contains("\"wire_bytes\""), "{r:?}");
    }
    assert_eq!(
        r.code,
        Some(0),
        "the coordinator must resend a refused chunk (retry the transfer from the last \
         verified chunk), and the file then verify: {r:?}"
    );
    assert!(r.stderr.contains("retrying"), "{r:?}");
    assert_eq!(missing, 0, "every file delivered and verified by hash");
    assert!(partials(&c, 1).is_empty());
}

/// A host whose packets are dropped (no refusal, no reset): `dgl-coord kill` stops the job on
/// every reachable host, names the silent one, and exits non-zero within the operator
/// commands' 2.5 s answer bound (stops elsewhere run meanwhile), not after a connect timeout.
#[test]
fn kill_with_one_host_blackholed_stops_the_others_and_fails_naming_it_soon() {
    let Some(c) = start_or_skip("kill with a blackholed host", 3, AGENT_FLAGS) else {
        return;
    };
    let (coord, job) = hanging_job(&c, false);
    let reachable: Vec<u32> = [0, 2]
        .into_iter()
        .flat_map(|h| job_pids(&c, &job, Some(h)))
        .collect();
    assert!(reachable.len() >= 6, "{reachable:?}");
    c.cut_link(1);
    let t = Instant::now();
    let ip_config = c.local().join("ip_config.txt");
    let out = c
        .coord()
        .args(["kill", "--grace", "1", "--ip_config"])
        .arg(&ip_config)
        .output()
        .expect("run dgl-coord kill");
    let took = t.elapsed();
    let left = wait_gone(&reachable, Duration::from_secs(5));
    let _ = coord.wait(Duration::from_secs(20));
    c.restore_link(1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print_figures("kill with one host blackholed", took, left.len(), 0);
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stderr.contains(&c.host_name(1)) && stderr.contains("no answer within 2.5 s"),
        "names the silent host and why: {stderr}"
    );
    assert!(left.is_empty(), "reachable hosts still run {left:?}");
    assert!(
        took < Duration::from_millis(4500),
        "kill took {took:?}: {stderr}"
    );
}
