//! `dgl-coord launch --wait-servers` starts the trainers only once every DGL server port of
//! the job listens, as each host's agent sees it in /proc/net/tcp, and a server that exits
//! before it listens fails the launch before any trainer starts. Three real agents on loopback addresses, the
//! stand-in DGL (`fixtures/fake_dgl.py --listen-delay`: servers that take a while to listen).

use std::time::Duration;

use dglrun_integration_tests::fixtures_dir;
use dglrun_integration_tests::run::run;
use dglrun_integration_tests::TestCluster;

const MACHINES: usize = 3;

/// The wall-clock times in lines `<prefix> <id> <word> <T>` of `out`.
fn times(out: &str, prefix: &str, word: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once(&format!("{prefix} "))?;
            let (_, t) = rest.split_once(&format!(" {word} "))?;
            t.trim().parse().ok()
        })
        .collect()
}

#[test]
fn trainers_start_only_once_every_server_port_listens() {
    let c = TestCluster::with_workspace(MACHINES);
    let torch = fixtures_dir().join("pythonpath").display().to_string();
    for mode in ["direct", "torchrun"] {
        let mut cmd = c.launch(
            &[
                "--num_trainers",
                "2",
                "--trainer-mode",
                mode,
                "--wait-servers",
            ],
            "python3 fake_dgl.py --listen-delay 1",
        );
        cmd.env("PYTHONPATH", &torch);
        let r = run(cmd, Duration::from_secs(90));
        assert_eq!(r.code(), 0, "{mode}: {r:?}");
        let listening = times(&r.stdout, "server", "listens since");
        let started = times(&r.stdout, "trainer", "started at");
        assert_eq!(
            listening.len(),
            MACHINES,
            "{mode}: one line per server: {r:?}"
        );
        assert_eq!(
            started.len(),
            2 * MACHINES,
            "{mode}: one line per trainer: {r:?}"
        );
        let last_listen = listening.iter().copied().fold(f64::MIN, f64::max);
        let first_start = started.iter().copied().fold(f64::MAX, f64::min);
        assert!(
            first_start >= last_listen,
            "{mode}: a trainer started at {first_start:.3}, before the last server listened at \
             {last_listen:.3}: {r:?}"
        );
    }
}

#[test]
fn a_server_that_exits_before_listening_fails_the_launch_before_any_trainer() {
    let c = TestCluster::with_workspace(MACHINES);
    let r = run(
        c.launch_direct(
            "1",
            &["--wait-servers"],
            "python3 fake_dgl.py --listen-delay 1 --fail-server 1 --fail-code 5",
        ),
        Duration::from_secs(60),
    );
    assert_ne!(r.code(), 0, "{r:?}");
    let m1 = format!("m1 ({}:{})", c.ip(1), c.port);
    assert!(
        r.stderr.contains(&format!("job failed: {m1}")) && r.stderr.contains("server0"),
        "names the host and the server: {r:?}"
    );
    assert!(
        r.stderr.contains("before it listened"),
        "says the server ended before it listened: {r:?}"
    );
    assert!(
        times(&r.stdout, "trainer", "started at").is_empty(),
        "no trainer may start: {r:?}"
    );
}

/// Another process of the host listening on the job's port, on another address (another
/// job's server, another user's), is not the job's server: the trainers still wait.
#[test]
fn a_port_held_on_another_address_of_the_host_does_not_start_the_trainers() {
    let c = TestCluster::with_workspace(MACHINES);
    let port = 30050;
    let other = std::net::Ipv4Addr::new(127, 254, rand::random::<u8>() | 1, 7);
    let _held = std::net::TcpListener::bind((other, port)).expect("bind another address");
    let r = run(
        c.launch(
            &[
                "--num_trainers",
                "1",
                "--trainer-mode",
                "direct",
                "--wait-servers",
            ],
            "python3 fake_dgl.py --listen-delay 1",
        ),
        Duration::from_secs(90),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    let last_listen = times(&r.stdout, "server", "listens since")
        .into_iter()
        .fold(f64::MIN, f64::max);
    let first_start = times(&r.stdout, "trainer", "started at")
        .into_iter()
        .fold(f64::MAX, f64::min);
    assert!(
        first_start >= last_listen,
        "a trainer started at {first_start:.3}, before the last server listened at \
         {last_listen:.3}, as if {other}:{port} were the job's: {r:?}"
    );
}
