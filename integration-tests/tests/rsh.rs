//! `dgl-coord rsh` against real agents on loopback: ssh's exit status and messages, stdin and
//! its end of file, byte-exact streams both ways, signals, and no process left on the host
//! however rsh ends.

// Test code throughout: a failed unwrap is a failed test, and a test may sleep.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use dglrun_integration_tests::run::wait_with_timeout;
use dglrun_integration_tests::{pids_with_env, wait_gone, write_token_file, TestCluster};
use sha2::{Digest, Sha256};

fn rsh(c: &TestCluster, words: &[&str]) -> Command {
    let mut cmd = c.coord();
    cmd.arg("rsh").args(words);
    cmd
}

fn output(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null());
    cmd.output().expect("run dgl-coord rsh")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A marker no other test's process carries.
fn marker() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[test]
fn runs_in_the_root_with_the_remote_exit_status_and_both_streams() {
    let c = TestCluster::start(1);
    let ip = c.ip(0).to_string();
    let out = output(rsh(
        &c,
        &[
            "-o",
            "StrictHostKeyChecking=no",
            "-p",
            "22",
            &ip,
            "pwd; echo oops >&2; exit 7",
        ],
    ));
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    let root = c.root(0).canonicalize().unwrap();
    assert_eq!(text(&out.stdout), format!("{}\n", root.display()));
    assert_eq!(text(&out.stderr), "oops\n");
    // The words are joined for the remote shell, as ssh does.
    let out = output(rsh(
        &c,
        &["-n", "-x", "-T", &ip, "echo", "a", "b;", "echo", "c"],
    ));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "a b\nc\n");
}

#[test]
fn remote_command_gets_eof_when_local_stdin_closes() {
    let c = TestCluster::start(1);
    let ip = c.ip(0).to_string();
    let mut cmd = rsh(&c, &[&ip, "cat; echo eof-seen"]);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"line one\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Still waiting for more input: no end of file yet.
    assert!(child.try_wait().unwrap().is_none());
    drop(stdin);
    let status = wait_with_timeout(&mut child, Duration::from_secs(20)).expect("rsh ends");
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, "line one\neof-seen\n");
    assert_eq!(status.code(), Some(0));
    // -n: the command reads end of file at once, whatever local stdin holds.
    let mut cmd = rsh(&c, &["-n", &ip, "wc -c"]);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let _held_open = child.stdin.take();
    let status = wait_with_timeout(&mut child, Duration::from_secs(20)).expect("rsh -n ends");
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!((out.trim(), status.code()), ("0", Some(0)));
}

#[test]
fn binary_output_and_a_100_mib_stdin_stream_come_through_byte_exact() {
    let c = TestCluster::start(1);
    let ip = c.ip(0).to_string();
    // Every byte value, NULs and lone CRs included, no trailing newline.
    let all: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    std::fs::write(c.root(0).join("bin.dat"), &all).unwrap();
    let out = output(rsh(&c, &[&ip, "cat bin.dat"]));
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout == all, "binary output differs");

    // 100 MiB in through stdin and back out through `cat`, hashed on both sides.
    const SIZE: usize = 100 << 20;
    let mut child = rsh(&c, &[&ip, "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let mut h = Sha256::new();
        let mut block = vec![0u8; 1 << 20];
        let mut state = 0x9e3779b97f4a7c15u64;
        for _ in 0..SIZE / block.len() {
            for b in block.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                b.copy_from_slice(&state.to_le_bytes());
            }
            h.update(&block);
            stdin.write_all(&block).unwrap();
        }
        hex::encode(h.finalize())
    });
    let mut stdout = child.stdout.take().unwrap();
    let mut h = Sha256::new();
    let n = std::io::copy(&mut stdout, &mut h).unwrap();
    let sent = writer.join().unwrap();
    let status = wait_with_timeout(&mut child, Duration::from_secs(60)).expect("rsh ends");
    assert_eq!(status.code(), Some(0));
    assert_eq!(n as usize, SIZE);
    assert_eq!(hex::encode(h.finalize()), sent);
}

#[test]
fn killing_rsh_leaves_no_process_on_the_host() {
    let c = TestCluster::start(1);
    let ip = c.ip(0).to_string();
    let mark = marker();
    let command = format!(
        "export RSH_TEST_MARK={mark}; sleep 300 & (trap '' TERM HUP INT; sleep 301) & sleep 302"
    );
    let mut child = rsh(&c, &[&ip, &command])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut pids = Vec::new();
    while pids.len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        pids = pids_with_env("RSH_TEST_MARK", &mark);
    }
    assert!(pids.len() >= 3, "the remote tree did not start: {pids:?}");
    child.kill().unwrap();
    child.wait().unwrap();
    let left = wait_gone(&pids, Duration::from_secs(20));
    assert!(
        left.is_empty(),
        "left on the host after rsh was killed: {left:?}"
    );
    // What a finished command left behind goes with it too.
    let mark = marker();
    let command = format!("export RSH_TEST_MARK={mark}; sleep 303 & echo started");
    let out = output(rsh(&c, &[&ip, &command]));
    assert_eq!(
        (text(&out.stdout).as_str(), out.status.code()),
        ("started\n", Some(0))
    );
    assert!(pids_with_env("RSH_TEST_MARK", &mark).is_empty());
}

#[test]
fn sigint_is_forwarded_and_the_remote_handler_decides_the_status() {
    let c = TestCluster::start(1);
    let ip = c.ip(0).to_string();
    let mut child = rsh(
        &c,
        &[
            &ip,
            "trap 'echo got-int; exit 3' INT; echo ready; while :; do sleep 0.1; done",
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    stdout.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ready\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = wait_with_timeout(&mut child, Duration::from_secs(20)).expect("rsh ends");
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!((rest.as_str(), status.code()), ("got-int\n", Some(3)));
}

#[test]
fn unreachable_refused_or_unknown_hosts_exit_255_with_ssh_like_messages() {
    let c = TestCluster::start(1);
    let ip = c.ip(0).to_string();
    let cases: Vec<(Command, &str)> = vec![
        (
            rsh(&c, &["nosuchhost.invalid", "true"]),
            "Could not resolve hostname nosuchhost.invalid",
        ),
        (
            {
                let mut cmd = rsh(&c, &["--agent-port", "1", &ip, "true"]);
                cmd.env_remove("DGL_AGENT_PORT");
                cmd
            },
            "connect to host",
        ),
        (
            {
                let bad = c.dir.path().join("bad-token");
                write_token_file(&bad).unwrap();
                let mut cmd = c.coord();
                cmd.arg("rsh")
                    .arg("--token-file")
                    .arg(&bad)
                    .args([&ip, "true"]);
                cmd
            },
            "the agent refused",
        ),
        (rsh(&c, &[&ip]), "no command"),
        (rsh(&c, &["-Z", &ip, "true"]), "unknown option -Z"),
        (rsh(&c, &["-p"]), "option -p needs a value"),
    ];
    for (cmd, want) in cases {
        let shown = format!("{cmd:?}");
        let out = output(cmd);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(255), "{shown}: {err}");
        assert!(
            err.starts_with("dgl-coord rsh: ") && err.contains(want),
            "{shown}: {err}"
        );
    }
    // Options it cannot honour are named, and the command still runs.
    let out = output(rsh(&c, &["-L", "8080:h:80", "-tt", &ip, "true"]));
    assert_eq!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert!(
        err.contains("option -L 8080:h:80 is not supported") && err.contains("option -t"),
        "{err}"
    );
}

/// Pids of the processes whose command line is exactly `words`.
fn pids_with_cmdline(words: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = words
        .iter()
        .flat_map(|w| [w.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

#[test]
fn the_command_is_born_in_its_jobs_cgroup_which_stops_what_escaped_the_tree() {
    let c = TestCluster::start(1);
    if !c.agent_log(0).contains("a cgroup v2 per job") {
        dglrun_integration_tests::cannot_run(
            "the_command_is_born_in_its_jobs_cgroup_which_stops_what_escaped_the_tree",
            "the agent cannot make cgroups here",
        );
        return;
    }
    let ip = c.ip(0).to_string();
    let out = output(rsh(&c, &[&ip, "cat /proc/self/cgroup"]));
    let own = text(&out.stdout);
    let unified = own.lines().find_map(|l| l.strip_prefix("0::"));
    assert!(
        unified.is_some_and(|p| p.contains("/dglrun-") && p.contains("/job-rsh-")),
        "{own}"
    );
    // No marker and no parent in the job: only the cgroup still holds it.
    let secs = format!("{}", 3000 + rand::random::<u16>() % 1000);
    let command = format!("env -i setsid sleep {secs} </dev/null >/dev/null 2>&1 & echo started");
    let out = output(rsh(&c, &[&ip, &command]));
    assert_eq!(text(&out.stdout), "started\n", "{}", text(&out.stderr));
    let left = wait_gone(
        &pids_with_cmdline(&["sleep", &secs]),
        Duration::from_secs(10),
    );
    assert!(left.is_empty(), "left after the session: {left:?}");
}
