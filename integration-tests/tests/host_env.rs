//! What dglrun adds to DGL's environment from each host's agent, on real separate hosts
//! (network namespaces, `netns`): the interface gloo, tensorpipe and NCCL must use.
//!
//! Every host's ip_config address is on `eth0` while a second interface, `wan0`, carries its
//! default route: the layout where a library left to pick its own interface picks the wrong
//! one and the job hangs at initialisation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use dglrun_integration_tests::fake_dgl::{self, env_of, records};
use dglrun_integration_tests::netns::{start_or_skip, NetCluster};
use dglrun_integration_tests::run::run;

const IFNAME_VARS: [&str; 3] = [
    "GLOO_SOCKET_IFNAME",
    "TP_SOCKET_IFNAME",
    "NCCL_SOCKET_IFNAME",
];

fn two_hosts_with_a_default_route_elsewhere(test: &str) -> Option<NetCluster> {
    let c = start_or_skip(test, 2, &[])?;
    let ip_config = std::fs::read(c.ip_config_file(30050)).expect("ip_config");
    for i in 0..c.len() {
        c.add_default_route_link(i);
        fake_dgl::write_workspace(c.root(i), &ip_config, c.len());
    }
    Some(c)
}

fn launch(c: &NetCluster, flags: &[&str]) -> std::process::Command {
    let mut all = vec!["--trainer-mode", "direct", "--num_trainers", "1"];
    all.extend_from_slice(flags);
    fake_dgl::launch(c.coord(), &all, "python3 fake_dgl.py")
}

#[test]
fn every_process_gets_the_interface_of_its_hosts_ip_config_address() {
    let Some(c) = two_hosts_with_a_default_route_elsewhere("socket interface") else {
        return;
    };
    let dry = run(launch(&c, &["--dry-run"]), Duration::from_secs(30));
    assert_eq!(dry.code(), 0, "{dry:?}");
    for i in 0..c.len() {
        let line = dry
            .stdout
            .lines()
            .skip_while(|l| !l.starts_with(&format!("[m{i} server0]")))
            .find(|l| l.trim_start().starts_with("env:"))
            .unwrap_or_else(|| panic!("no env line of m{i}: {dry:?}"));
        for k in IFNAME_VARS {
            assert!(line.contains(&format!("{k}=eth0")), "m{i} {k}: {line}");
        }
    }

    // The user's own setting wins, variable by variable.
    let r = run(
        launch(&c, &["--extra_envs", "TP_SOCKET_IFNAME=wan0"]),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    for i in 0..c.len() {
        let recs = records(c.root(i));
        assert_eq!(recs.len(), 2, "a server and a trainer on m{i}: {recs:?}");
        for (name, rec) in &recs {
            let env = env_of(rec);
            let get = |k: &str| env.get(k).map(String::as_str);
            assert_eq!(get("GLOO_SOCKET_IFNAME"), Some("eth0"), "m{i} {name}");
            assert_eq!(get("NCCL_SOCKET_IFNAME"), Some("eth0"), "m{i} {name}");
            assert_eq!(get("TP_SOCKET_IFNAME"), Some("wan0"), "m{i} {name}");
        }
    }
}

/// Sets the CPU affinity of the calling thread (children it spawns inherit it).
fn pin_this_thread(cpus: &str) {
    let link = std::fs::read_link("/proc/thread-self").expect("thread-self");
    let tid = link.file_name().unwrap().to_string_lossy().to_string();
    let st = std::process::Command::new("taskset")
        .args(["-pc", cpus, &tid])
        .output()
        .expect("taskset");
    assert!(st.status.success(), "{st:?}");
}

#[test]
fn host_omp_threads_follow_each_hosts_own_usable_cpus() {
    use dglrun_integration_tests::TestCluster;
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    if all < 2 {
        dglrun_integration_tests::cannot_run(
            "host OMP threads",
            "needs 2 CPUs to give two hosts different counts",
        );
        return;
    }
    let mut c = TestCluster::with_workspace(2);
    // Host 1's agent restarted while this thread runs on one CPU: it and its jobs inherit that.
    pin_this_thread("0");
    c.set_agent_env(1, &[]);
    pin_this_thread(&format!("0-{}", all - 1));
    let r = run(
        c.launch_direct("1", &["--num_omp_threads", "host"], "python3 fake_dgl.py"),
        Duration::from_secs(90),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    for (i, want) in [(0, all.to_string()), (1, "1".to_string())] {
        let trainer = records(c.root(i))
            .iter()
            .map(|(_, rec)| env_of(rec))
            .find(|e| e.get("DGL_ROLE").map(String::as_str) == Some("client"))
            .expect("a trainer record");
        assert_eq!(trainer["OMP_NUM_THREADS"], want, "m{i}: {r:?}");
    }
}

#[test]
fn doctor_fails_a_host_whose_ip_config_address_is_on_none_of_its_interfaces() {
    use dglrun_integration_tests::netns::AGENT_PORT;
    use dglrun_integration_tests::{bin, root_flag, wait_until_listening};
    let Some(c) = start_or_skip("doctor interface", 1, &[]) else {
        return;
    };
    let addr = c.add_route_only_address(0);
    // A second agent on host 0, reached at that address.
    let root = c.dir.path().join("route-only-root");
    std::fs::create_dir_all(&root).unwrap();
    let log = c.dir.path().join("route-only-agent.log");
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", &c.hosts[0].ns])
        .arg(bin("dgl-agent"))
        .arg("--listen")
        .arg(format!("{addr}:{AGENT_PORT}"))
        .arg("--root")
        .arg(&root)
        .arg("--token-file")
        .arg(&c.token_file)
        .args(root_flag())
        .env("XDG_CONFIG_HOME", c.dir.path().join("config"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut child = wait_until_listening(child, &log, Duration::from_secs(30)).unwrap();
    let ip_config = c.local().join("route-only.txt");
    std::fs::write(&ip_config, format!("{addr} 30050\n")).unwrap();
    let mut cmd = c.coord();
    cmd.args(["doctor", "--json", "--python", "true", "--ip_config"])
        .arg(&ip_config);
    let r = run(cmd, Duration::from_secs(60));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r.code(), 1, "{r:?}");
    let reports: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).expect("JSON");
    let iface = &reports[0]["interface"];
    assert_eq!(iface["status"], "fail", "{r:?}");
    assert!(
        iface["fix"]
            .as_str()
            .unwrap()
            .contains(&format!("eth0 {}", c.ip(0))),
        "names the host's addresses: {r:?}"
    );
}

#[test]
fn a_variable_the_agents_environment_sets_is_left_to_it() {
    use dglrun_integration_tests::TestCluster;
    let mut c = TestCluster::with_workspace(2);
    c.set_agent_env(0, &[("GLOO_SOCKET_IFNAME", "bond7")]);
    let r = run(
        c.launch_direct("1", &[], "python3 fake_dgl.py"),
        Duration::from_secs(90),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    for (i, gloo) in [(0, "bond7"), (1, "lo")] {
        let recs = records(c.root(i));
        assert_eq!(recs.len(), 2, "{r:?}");
        for (name, rec) in &recs {
            let env = env_of(rec);
            assert_eq!(env["GLOO_SOCKET_IFNAME"], gloo, "m{i} {name}");
            assert_eq!(env["TP_SOCKET_IFNAME"], "lo", "m{i} {name}");
        }
    }
}
