//! Open MPI's `mpirun` (Debian's openmpi-bin), unmodified, with the `ssh` of `dgl-coord shims`
//! as its rsh agent, across three hosts in network namespaces (`netns`): each rank runs on its
//! own host, mpirun exits with the ranks' outcome, and nothing of the job (orted, ranks, rsh
//! sessions) is left on any host afterwards.

// Test code throughout: a failed unwrap is a failed test, and a test may sleep.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dglrun_integration_tests::cannot_run;
use dglrun_integration_tests::netns::{start_or_skip, NetCluster};
use dglrun_integration_tests::run::{run, Run};

/// The cluster, or None (with the reason printed, and a failure under CI) when namespaces or
/// Open MPI are missing.
fn cluster(test: &str) -> Option<NetCluster> {
    let open_mpi = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Open MPI")
        });
    if !open_mpi {
        cannot_run(
            test,
            "Open MPI's mpirun is not installed (apt-get install openmpi-bin)",
        );
        return None;
    }
    start_or_skip(test, 3, &[])
}

/// Writes the shims for `c`'s agents (port and token file from the coordinator's environment);
/// returns their directory.
fn shims(c: &NetCluster) -> PathBuf {
    dglrun_integration_tests::write_shims(c.coord(), c.dir.path().join("shims"))
}

/// `mpirun` in the coordinator's namespace running `sh -c COMMAND` as one rank per host, as
/// README's recipe runs it. Only `orte_launch_agent` is there for these hosts alone: they share
/// one /tmp and one hostname, so each orted is given its agent's root as TMPDIR, or their
/// session directories would be one and the same.
fn mpirun(c: &NetCluster, shims: &Path, command: &str) -> Command {
    let hosts: Vec<String> = (0..c.len()).map(|i| c.ip(i).to_string()).collect();
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &c.coord_ns,
        "mpirun",
        "--allow-run-as-root",
    ])
    .arg("--mca")
    .arg("plm_rsh_agent")
    .arg(shims.join("ssh"))
    .args([
        "--mca",
        "plm_rsh_no_tree_spawn",
        "1",
        "--leave-session-attached",
    ])
    .args(["--prefix", "/usr"])
    .args(["--mca", "oob_tcp_if_include", "eth0"])
    .args([
        "--mca",
        "btl",
        "self,tcp",
        "--mca",
        "btl_tcp_if_include",
        "eth0",
    ])
    .args(["--mca", "orte_launch_agent", "env TMPDIR=$PWD orted"])
    .args(["--host", &hosts.join(","), "-np", &c.len().to_string()])
    .args(["sh", "-c", command])
    .current_dir(c.local())
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    // The shims carry the port and the token file themselves.
    .env_remove("DGL_AGENT_TOKEN_FILE")
    .env_remove("DGL_AGENT_PORT");
    cmd
}

/// The network namespace of `pid`, as `readlink /proc/PID/ns/net` prints it.
fn net_ns(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .display()
        .to_string()
}

/// Waits until only the agents live in the cluster's namespaces and no agent lists a job;
/// fails naming what is left.
fn assert_nothing_left(c: &NetCluster, r: &Run) {
    let agents: Vec<u32> = (0..c.len()).filter_map(|i| c.agent_pid(i)).collect();
    let ip_config = c.ip_config_file(30050);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut others: Vec<(u32, String)> = c
            .pids_in_namespaces()
            .into_iter()
            .filter(|p| !agents.contains(p))
            .map(|p| {
                let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                (p, String::from_utf8_lossy(&cmdline).replace('\0', " "))
            })
            .collect();
        others.sort();
        let out = c
            .coord()
            .args(["status", "--json", "--ip_config"])
            .arg(&ip_config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let jobs: Vec<String> = status
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|m| m["jobs"].as_array().cloned().unwrap_or_default())
            .map(|j| j["job_id"].to_string())
            .collect();
        if others.is_empty() && jobs.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left on the hosts: processes {others:?}, jobs {jobs:?}\n{r:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // orted's session directory went with it.
    for i in 0..c.len() {
        let names: Vec<String> = std::fs::read_dir(c.root(i))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".dglrun")
            .collect();
        assert!(names.is_empty(), "host {i}'s root holds {names:?}");
    }
}

#[test]
fn mpirun_runs_one_rank_on_each_namespace_host_over_the_shims() {
    let Some(c) = cluster("mpirun over the shims") else {
        return;
    };
    let shims = shims(&c);
    let t = Instant::now();
    let r = run(
        mpirun(
            &c,
            &shims,
            "echo rank=$OMPI_COMM_WORLD_RANK net=$(readlink /proc/self/ns/net) root=$DGLRUN_AGENT",
        ),
        Duration::from_secs(120),
    );
    println!(
        "figure: mpirun ran 3 ranks on 3 namespace hosts in {:?}",
        t.elapsed()
    );
    assert_eq!(r.code(), 0, "{r:?}");
    let mut lines: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("rank="))
        .collect();
    lines.sort_unstable();
    // --host lists one slot per host, in order: rank i runs on host i, in its agent's
    // namespace and under its agent (the agent's root is in its sessions' environment).
    let want: Vec<String> = (0..c.len())
        .map(|i| {
            format!(
                "rank={i} net={} root={}",
                net_ns(c.agent_pid(i).unwrap()),
                c.root(i).display()
            )
        })
        .collect();
    assert_eq!(lines, want, "{r:?}");
    let namespaces: std::collections::BTreeSet<String> = (0..c.len())
        .map(|i| net_ns(c.agent_pid(i).unwrap()))
        .collect();
    assert_eq!(namespaces.len(), 3, "the hosts share a namespace");
    assert_nothing_left(&c, &r);
}

#[test]
fn a_failing_rank_makes_mpirun_fail_and_the_other_ranks_are_stopped() {
    let Some(c) = cluster("mpirun with a failing rank over the shims") else {
        return;
    };
    let shims = shims(&c);
    // Rank 1 fails once every rank runs; the others would sleep for ten minutes.
    let r = run(
        mpirun(
            &c,
            &shims,
            "echo started $OMPI_COMM_WORLD_RANK; \
             if [ $OMPI_COMM_WORLD_RANK = 1 ]; then sleep 1; exit 3; fi; exec sleep 600",
        ),
        Duration::from_secs(120),
    );
    assert_eq!(r.stdout.matches("started ").count(), 3, "{r:?}");
    assert_eq!(r.code(), 3, "{r:?}");
    assert!(r.stderr.contains("Exit code:    3"), "{r:?}");
    assert!(r.elapsed < Duration::from_secs(60), "{r:?}");
    assert_nothing_left(&c, &r);
}
