//! The job's Python environment (`--setup`, `--python`) on real agents: the setup runs in the
//! same shell before every process's command, the interpreter is replaced, and a host whose
//! chosen python cannot import dgl and torch (the fixtures' stand-ins) is refused, by name,
//! before anything starts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use dglrun_integration_tests::fake_dgl::{env_of, records};
use dglrun_integration_tests::run::run;
use dglrun_integration_tests::{fixtures_dir, TestCluster};

fn standin_path() -> String {
    fixtures_dir().join("pythonpath").display().to_string()
}

#[test]
fn the_setup_runs_before_every_command_in_the_same_shell() {
    let c = TestCluster::with_workspace(2);
    let setup = format!("export PYTHONPATH={} DGLRUN_SETUP_RAN=yes", standin_path());
    let r = run(
        c.launch_direct("1", &["--setup", &setup], "python3 fake_dgl.py"),
        Duration::from_secs(90),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    for i in 0..c.len() {
        let recs = records(c.root(i));
        assert_eq!(recs.len(), 2, "{r:?}");
        for (name, rec) in &recs {
            let env = env_of(rec);
            assert_eq!(
                env.get("DGLRUN_SETUP_RAN").map(String::as_str),
                Some("yes"),
                "{name}"
            );
        }
    }
}

#[test]
fn a_host_whose_python_lacks_dgl_is_refused_by_name_before_anything_starts() {
    let mut c = TestCluster::with_workspace(2);
    // Only host 1's agent (and so its processes) sees the stand-in dgl and torch.
    c.set_agent_env(1, &[("PYTHONPATH", &standin_path())]);
    let python = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v python3"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let r = run(
        c.launch_direct("1", &["--python", &python], "python3 fake_dgl.py"),
        Duration::from_secs(90),
    );
    assert_ne!(r.code(), 0, "{r:?}");
    let m = |i: usize| format!("m{i} ({}:{})", c.ip(i), c.port);
    assert!(
        r.stderr
            .contains(&format!("{}: {python} cannot import dgl", m(0))),
        "{r:?}"
    );
    assert!(r.stderr.contains("No module named 'dgl'"), "{r:?}");
    assert!(!r.stderr.contains(&m(1)), "{r:?}");
    for i in 0..c.len() {
        assert!(records(c.root(i)).is_empty(), "nothing ran on m{i}");
    }

    // With the stand-ins on every host it runs, with that interpreter.
    let setup = format!("export PYTHONPATH={}", standin_path());
    let r = run(
        c.launch_direct(
            "1",
            &["--python", &python, "--setup", &setup, "--dry-run"],
            "python3 fake_dgl.py",
        ),
        Duration::from_secs(90),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.contains(&format!("{python} fake_dgl.py")), "{r:?}");
}
