//! `cargo test` builds this crate's binaries, not the agent's nor `dgl-coord`. Before a test
//! first runs one of those, it is built through cargo when it is missing or older than any
//! source cargo recorded for it (its `.d` file beside the binary), so `cargo test` needs no
//! prior `cargo build` and a test never runs a stale binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::time::SystemTime;

/// The binaries the tests run, and the package that builds each.
const BINS: &[(&str, &str)] = &[("dgl-agent", "dglrun-agent"), ("dgl-coord", "dglrun-cli")];

/// Builds the agent and `dgl-coord` into `bin_dir` (once per test process) if either is stale.
pub(crate) fn ensure(bin_dir: &Path) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if BINS.iter().any(|(name, _)| stale(bin_dir, name)) {
            build(bin_dir);
        }
    });
}

fn stale(bin_dir: &Path, name: &str) -> bool {
    let Some(built) = modified(&bin_dir.join(name)) else {
        return true;
    };
    // A binary without cargo's record of its sources was put there by hand: it is used as is.
    let Ok(deps) = std::fs::read_to_string(bin_dir.join(format!("{name}.d"))) else {
        return false;
    };
    dep_paths(&deps)
        .into_iter()
        .any(|p| modified(&p).is_none_or(|t| t > built))
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The sources of a make-style dep-info line (`target: src src ...`, spaces escaped as `\ `).
fn dep_paths(deps: &str) -> Vec<PathBuf> {
    let sources = deps
        .lines()
        .next()
        .and_then(|l| l.split_once(": "))
        .map_or("", |(_, s)| s);
    sources
        .replace("\\ ", "\u{0}")
        .split_whitespace()
        .map(|p| PathBuf::from(p.replace('\u{0}', " ")))
        .collect()
}

fn build(bin_dir: &Path) {
    // target/<profile>: the profile's directory is its name, except `dev`'s.
    let profile = match bin_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(p) => p,
    };
    let target_dir = bin_dir.parent().unwrap_or(bin_dir);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(crate::repo_dir().join("Cargo.toml"))
        .args(["--profile", profile, "--target-dir"])
        .arg(target_dir);
    for (_, package) in BINS {
        cmd.args(["-p", package]);
    }
    let status = cmd.arg("--bins").status();
    assert!(
        status.as_ref().is_ok_and(|s| s.success()),
        "building the agent and dgl-coord failed ({status:?}): run `cargo build --workspace --bins`"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dep_info_sources_are_read_with_escaped_spaces() {
        let d = "/t/debug/dgl-agent: /r/a.rs /r/my\\ dir/b.rs\n\n/r/a.rs:\n";
        let got = dep_paths(d);
        assert_eq!(
            got,
            [PathBuf::from("/r/a.rs"), PathBuf::from("/r/my dir/b.rs")]
        );
    }

    #[test]
    fn a_binary_older_than_a_source_is_stale() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("a.rs");
        std::fs::write(d.path().join("dgl-agent"), "").unwrap();
        std::fs::write(&src, "").unwrap();
        let dep = format!(
            "{}: {}\n",
            d.path().join("dgl-agent").display(),
            src.display()
        );
        std::fs::write(d.path().join("dgl-agent.d"), dep).unwrap();
        let past = SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(d.path().join("dgl-agent"))
            .unwrap()
            .set_modified(past)
            .unwrap();
        assert!(stale(d.path(), "dgl-agent"));
        std::fs::File::options()
            .write(true)
            .open(&src)
            .unwrap()
            .set_modified(past - std::time::Duration::from_secs(60))
            .unwrap();
        assert!(!stale(d.path(), "dgl-agent"));
        std::fs::remove_file(d.path().join("dgl-agent.d")).unwrap();
        assert!(!stale(d.path(), "dgl-agent"), "no dep-info: used as is");
        std::fs::remove_file(d.path().join("dgl-agent")).unwrap();
        assert!(stale(d.path(), "dgl-agent"), "missing: built");
    }
}
