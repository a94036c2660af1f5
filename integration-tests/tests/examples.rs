//! Every example command runs as written: each `sh` code block of README.md, in order, and
//! each example of `dgl-coord --help` and of every subcommand's `--help`, against a real
//! `dgl-agent`, in a temporary HOME holding what the examples assume (the master host's
//! `ip_config.txt`, `out/ogb-product.json` and its partition, `code/train_dist.py`: the DGL
//! stand-in).
//!
//! A README block that cannot run here says so on the line before its fence:
//! `<!-- examples-test: skip (why) -->`, or `<!-- examples-test: agent (...) -->` for the
//! agent's start command, which the test runs as a daemon on its loopback address.

// Test code throughout: a failed unwrap is a failed test, and a test may set its own
// environment and sleep; its helper modules are private to this test.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dglrun_integration_tests::run::run;
use dglrun_integration_tests::{
    bin_dir, fixtures_dir, gen_partitions, repo_dir, root_flag, terminate, wait_until_listening,
};

/// One fenced `sh` block of the README.
#[derive(Debug)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    /// The `examples-test:` annotation before it, if any.
    annotation: Option<String>,
    code: String,
}

fn readme_blocks(text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let fence = lines[i].trim_start();
        if fence == "```sh" {
            let indent = lines[i].len() - fence.len();
            let annotation = lines[..i]
                .iter()
                .rev()
                .find(|l| !l.trim().is_empty())
                .and_then(|l| l.trim().strip_prefix("<!-- examples-test:"))
                .and_then(|l| l.strip_suffix("-->"))
                .map(|a| a.trim().to_string());
            let start = i;
            let mut code = String::new();
            i += 1;
            while i < lines.len() && lines[i].trim() != "```" {
                code.push_str(lines[i].get(indent..).unwrap_or(lines[i].trim_start()));
                code.push('\n');
                i += 1;
            }
            out.push(Block {
                line: start + 1,
                annotation,
                code,
            });
        }
        i += 1;
    }
    out
}

/// The example commands of one `--help` text: the indented lines under a heading that starts
/// with `Example`, `Install` or `Typical use` (and ends, maybe a line later, with `:`), with
/// `\` continuations joined.
fn help_examples(help: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut opening, mut inside) = (false, false);
    let mut current = String::new();
    for line in help.lines() {
        if !line.starts_with(' ') {
            inside = false;
            if ["Example", "Install", "Typical use"]
                .iter()
                .any(|h| line.starts_with(h))
            {
                opening = true;
            }
            if opening && line.trim_end().ends_with(':') {
                (opening, inside) = (false, true);
            }
            continue;
        }
        if !inside {
            continue;
        }
        let text = line.trim();
        match text.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head.trim_end());
                current.push(' ');
            }
            None => {
                current.push_str(text);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

/// The agent the README's start command launched; stopped when the test ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        terminate(&mut self.0, Duration::from_secs(10));
    }
}

struct World {
    home: PathBuf,
    master: PathBuf,
    ip: String,
    /// `export` lines of the blocks run so far: later blocks run after them, as in one shell.
    exports: String,
}

impl World {
    fn new(home: &Path) -> Self {
        let ip = format!(
            "127.{}.{}.2",
            rand::random_range(16u8..250),
            rand::random_range(0u8..=255)
        );
        let master = home.join("master");
        fs::create_dir_all(master.join("code")).unwrap();
        fs::create_dir_all(home.join("dglrun")).unwrap();
        fs::write(master.join("ip_config.txt"), format!("{ip}\n")).unwrap();
        gen_partitions(&master.join("out"), 1, 4096, "ogb-product").unwrap();
        fs::copy(
            fixtures_dir().join("fake_dgl.py"),
            master.join("code/train_dist.py"),
        )
        .unwrap();
        Self {
            home: home.to_path_buf(),
            master,
            ip,
            exports: String::new(),
        }
    }

    fn command(&self, program: &str) -> Command {
        let path = format!(
            "{}:{}",
            bin_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut c = Command::new(program);
        c.current_dir(&self.master)
            .env("HOME", &self.home)
            .env("PATH", path)
            // The DGL and torchrun stand-ins, passed on to the processes as DGL does.
            .env("PYTHONPATH", fixtures_dir().join("pythonpath"))
            .env("MANPAGER", "cat")
            .env_remove("DGL_AGENT_TOKEN")
            .env_remove("DGL_AGENT_TOKEN_FILE")
            .env_remove("DGL_AGENT_PORT")
            .env_remove("OMP_NUM_THREADS");
        c
    }

    /// Runs `code` in bash (errexit) after the exports of the earlier blocks.
    fn run_ok(&mut self, what: &str, code: &str) {
        let mut c = self.command("bash");
        c.args(["-c", &format!("set -euo pipefail\n{}{code}", self.exports)]);
        let r = run(c, Duration::from_secs(120));
        assert_eq!(
            r.code(),
            0,
            "{what} failed as written:\n{code}\nstdout:\n{}\nstderr:\n{}",
            r.stdout,
            r.stderr
        );
        for l in code
            .lines()
            .filter(|l| l.trim_start().starts_with("export "))
        {
            self.exports.push_str(l.trim_start());
            self.exports.push('\n');
        }
    }

    /// Starts the README's agent command with this test's address.
    fn start_agent(&self, block: &Block) -> Daemon {
        let cmd = block.code.trim().replace("10.0.0.1", &self.ip);
        assert!(!cmd.contains('\n'), "one command: {cmd}");
        let log = self.home.join("agent.log");
        let mut c = self.command("bash");
        c.args([
            "-c",
            &format!("exec {cmd} {}", root_flag().unwrap_or_default()),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&log).unwrap());
        let child = c.spawn().unwrap();
        let child = wait_until_listening(child, &log, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("README line {}: {cmd}: {e:#}", block.line));
        Daemon(child)
    }
}

#[test]
fn readme_and_help_examples_run_as_written() {
    let home = tempfile::tempdir().unwrap();
    let mut world = World::new(home.path());
    let readme = fs::read_to_string(repo_dir().join("README.md")).unwrap();
    let blocks = readme_blocks(&readme);
    assert!(blocks.len() >= 6, "{blocks:?}");
    let mut agent = None;
    let mut ran = 0;
    for b in &blocks {
        match b.annotation.as_deref() {
            Some(a) if a.starts_with("skip") => {
                assert!(
                    a.len() > "skip (".len(),
                    "README line {}: a skip says why",
                    b.line
                );
            }
            Some(a) if a.starts_with("agent") => agent = Some(world.start_agent(b)),
            Some(other) => panic!("README line {}: unknown annotation {other:?}", b.line),
            None => {
                world.run_ok(&format!("README.md line {}", b.line), &b.code);
                ran += 1;
            }
        }
    }
    assert!(agent.is_some(), "the README starts an agent");
    assert!(ran >= 4, "token, copy, launch, run: {ran} blocks ran");

    let mut helps = 0;
    for sub in [
        "",
        "copy",
        "launch",
        "run",
        "status",
        "kill",
        "completions",
        "man",
    ] {
        let mut c = world.command("dgl-coord");
        c.args(sub.split_whitespace()).arg("--help");
        let out = c.output().unwrap();
        assert!(out.status.success(), "dgl-coord {sub} --help");
        for example in help_examples(&String::from_utf8_lossy(&out.stdout)) {
            world.run_ok(&format!("`dgl-coord {sub} --help` example"), &example);
            helps += 1;
        }
    }
    assert!(helps >= 8, "{helps} --help examples ran");
    // What the examples said they would leave.
    assert!(world
        .home
        .join(".local/share/man/man1/dgl-coord-launch.1")
        .exists());
    assert!(world
        .home
        .join("dglrun/graphsage/data/ogb-product.json")
        .exists());
    drop(agent);
}

#[test]
fn help_examples_are_found_with_their_continuations() {
    let help = "Usage: x\n\nOptions:\n  --a  b\n\nExample (with a note\nthat spans lines):\n  \
                dgl-coord a \\\n    --b c \\\n    \"d e\"\n  dgl-coord f\nExit status: 0\n";
    assert_eq!(
        help_examples(help),
        ["dgl-coord a --b c \"d e\"", "dgl-coord f"]
    );
}
