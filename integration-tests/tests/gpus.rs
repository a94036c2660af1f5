//! Trainers on GPUs: hosts report their GPUs through a stand-in `nvidia-smi` on each agent's
//! PATH (hosts with 0, 2 and 4 GPUs); plans that need more than a host has are refused before
//! anything starts, naming the host.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use dglrun_integration_tests::fake_dgl::{env_of, records};
use dglrun_integration_tests::run::run;
use dglrun_integration_tests::{fake_dgl, TestCluster};

/// Agents whose PATH starts with a stand-in `nvidia-smi` listing `gpus[i]` GPUs on host i,
/// each with the stand-in job's workspace.
fn cluster(gpus: &[usize]) -> TestCluster {
    let mut c = TestCluster::with_workspace(gpus.len());
    for (i, &n) in gpus.iter().enumerate() {
        let dir = c.dir.path().join(format!("gpus{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let lines: String = (0..n)
            .map(|g| format!("echo 'GPU {g}: Stand-in GPU (UUID: GPU-{i}-{g})'\n"))
            .collect();
        let smi = dir.join("nvidia-smi");
        std::fs::write(&smi, format!("#!/bin/sh\n{lines}")).unwrap();
        std::fs::set_permissions(&smi, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap());
        c.set_agent_env(i, &[("PATH", &path)]);
    }
    c
}

fn trainer_records(c: &TestCluster, i: usize) -> Vec<std::collections::BTreeMap<String, String>> {
    records(c.root(i))
        .iter()
        .map(|(_, r)| env_of(r))
        .filter(|e| e.get("DGL_ROLE").map(String::as_str) == Some("client"))
        .collect()
}

#[test]
fn one_trainer_per_gpu_on_hosts_with_different_counts_each_with_its_own_device() {
    let c = cluster(&[2, 4]);
    let r = run(
        c.launch(
            &[
                "--trainers-per-host",
                "gpus",
                "--gpus-per-trainer",
                "1",
                "--trainer-mode",
                "direct",
            ],
            "python3 fake_dgl.py",
        ),
        Duration::from_secs(90),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    for (i, n) in [(0, 2), (1, 4)] {
        let trainers = trainer_records(&c, i);
        assert_eq!(trainers.len(), n, "m{i}: {r:?}");
        let devices: BTreeSet<&str> = trainers
            .iter()
            .map(|e| e["CUDA_VISIBLE_DEVICES"].as_str())
            .collect();
        let want: BTreeSet<String> = (0..n).map(|d| d.to_string()).collect();
        assert_eq!(
            devices,
            want.iter().map(String::as_str).collect(),
            "m{i}: one device each"
        );
        for e in &trainers {
            assert_eq!(e["WORLD_SIZE"], "6");
            assert_eq!(e["LOCAL_WORLD_SIZE"], n.to_string());
        }
    }
}

#[test]
fn a_host_without_enough_gpus_is_refused_by_name_before_anything_starts() {
    let c = cluster(&[0, 2, 4]);
    let m = |i: usize| format!("m{i} ({}:{})", c.ip(i), c.port);
    let cases: [(&[&str], &[usize]); 3] = [
        (
            &["--trainers-per-host", "gpus", "--trainer-mode", "direct"],
            &[0],
        ),
        (
            &[
                "--num_trainers",
                "2",
                "--gpus-per-trainer",
                "2",
                "--trainer-mode",
                "direct",
            ],
            &[0, 1],
        ),
        // torchrun mode sets nothing, but checks the same.
        (&["--num_trainers", "1", "--gpus-per-trainer", "4"], &[0, 1]),
    ];
    for (flags, short) in cases {
        let r = run(
            c.launch(flags, "python3 fake_dgl.py"),
            Duration::from_secs(60),
        );
        assert_ne!(r.code(), 0, "{flags:?}: {r:?}");
        for &i in short {
            assert!(r.stderr.contains(&m(i)), "{flags:?} names m{i}: {r:?}");
        }
        assert!(!r.stderr.contains(&m(2)), "m2 has 4 GPUs: {r:?}");
        for i in 0..c.len() {
            assert!(
                records(c.root(i)).is_empty(),
                "{flags:?}: nothing ran on m{i}"
            );
        }
    }
}

/// Keeps the stand-in layout honest: the cluster above is the fake_dgl workspace.
#[test]
fn the_stand_in_reports_its_gpus_in_a_dry_run() {
    let c = cluster(&[2, 4]);
    let r = run(
        fake_dgl::launch(
            c.coord(),
            &[
                "--trainers-per-host",
                "gpus",
                "--trainer-mode",
                "direct",
                "--dry-run",
            ],
            "python3 fake_dgl.py",
        ),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.contains("[m1 trainer3]"), "{r:?}");
    assert!(!r.stdout.contains("[m0 trainer2]"), "{r:?}");
}
