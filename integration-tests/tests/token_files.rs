//! Token files another user could have planted or could replace are refused by both sides,
//! naming the file and the fix: owned by another user, or in a directory another user can
//! write.

// Test code throughout: a failed unwrap is a failed test, and a test may set its own
// environment and sleep; its helper modules are private to this test.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dglrun_integration_tests::run::run;
use dglrun_integration_tests::{bin, cannot_run, root_flag, write_token_file};

/// Both sides' stderr when given `file`: the agent's, then dgl-coord's.
fn refusals(work: &Path, file: &Path) -> [(i32, String); 2] {
    let mut agent = Command::new(bin("dgl-agent"));
    agent
        .args(["--listen", "127.0.0.1:0", "--root"])
        .arg(work.join("root"))
        .arg("--token-file")
        .arg(file)
        .args(root_flag());
    let a = run(agent, Duration::from_secs(20));
    let ipc = work.join("ip_config.txt");
    std::fs::write(&ipc, "127.0.0.1\n").unwrap();
    let mut coord = Command::new(bin("dgl-coord"));
    coord
        .args(["status", "--ip_config"])
        .arg(&ipc)
        .env("DGL_AGENT_TOKEN_FILE", file)
        .env_remove("DGL_AGENT_TOKEN");
    let c = run(coord, Duration::from_secs(20));
    [(a.code(), a.stderr), (c.code(), c.stderr)]
}

#[test]
fn token_files_another_user_owns_or_could_replace_are_refused_by_both_sides() {
    let work = tempfile::tempdir().unwrap();
    let open_dir = work.path().join("shared");
    std::fs::create_dir(&open_dir).unwrap();
    let token = open_dir.join("token");
    write_token_file(&token).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    for (code, err) in refusals(work.path(), &token) {
        assert_ne!(code, 0, "{err}");
        assert!(
            err.contains(&open_dir.display().to_string()) && err.contains("chmod go-w"),
            "{err}"
        );
    }
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    if !nix::unistd::geteuid().is_root() {
        cannot_run(
            "token file of another user",
            "giving a file away needs root",
        );
        return;
    }
    std::os::unix::fs::chown(&token, Some(65534), None).unwrap();
    for (code, err) in refusals(work.path(), &token) {
        assert_ne!(code, 0, "{err}");
        assert!(
            err.contains(&token.display().to_string()) && err.contains("belongs to uid 65534"),
            "{err}"
        );
    }
}
