//! The stand-in DGL job (`fixtures/fake_dgl.py`) on an agent root: the workspace a
//! `dgl-coord copy` would leave, the `dgl-coord launch` of it, and what its processes record
//! about themselves (`<workspace>/records`: one JSON file per process, and `<kind>-<pid>.pid`
//! files for the samplers and grandchildren it forks).

use std::fs;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::{fixtures_dir, gen_partitions, WS};

/// Writes under `root/WS` what `dgl-coord copy` would have left for a job of `machines`
/// machines: the script, `ip_config` (its contents) and a partition set named `g`. Written
/// directly, so launch tests do not depend on copy.
pub fn write_workspace(root: &Path, ip_config: &[u8], machines: usize) {
    let ws = root.join(WS);
    fs::create_dir_all(&ws).expect("workspace");
    fs::copy(fixtures_dir().join("fake_dgl.py"), ws.join("fake_dgl.py")).expect("script");
    fs::write(ws.join("ip_config.txt"), ip_config).expect("ip_config");
    gen_partitions(&ws.join("data"), machines, 64, "g").expect("partitions");
}

/// Turns `cmd` (a `dgl-coord` aimed at the agents) into the launch of `command` on the
/// [`write_workspace`] layout: one server per machine, a 1 s grace, `flags`, and no inherited
/// OMP_NUM_THREADS or PYTHONPATH.
pub fn launch(mut cmd: Command, flags: &[&str], command: &str) -> Command {
    cmd.args(["launch", "--workspace", WS, "--num_servers", "1"])
        .args([
            "--part_config",
            "data/g.json",
            "--ip_config",
            "ip_config.txt",
        ])
        .args(["--grace", "1"])
        .args(flags)
        .arg(command)
        .env_remove("OMP_NUM_THREADS")
        .env_remove("PYTHONPATH");
    cmd
}

/// The records on the host of agent root `root`: file name and JSON, in name order.
pub fn records(root: &Path) -> Vec<(String, Value)> {
    let Ok(dir) = fs::read_dir(root.join(WS).join("records")) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Value)> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            // Dot files are records still being written.
            if name.starts_with('.') || !name.ends_with(".json") {
                return None;
            }
            let v =
                serde_json::from_slice(&fs::read(e.path()).expect("record")).expect("record JSON");
            Some((name, v))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Pids from the `<kind>-<pid>.pid` files on the host of agent root `root`.
pub fn pid_files(root: &Path, kind: &str) -> Vec<u32> {
    let Ok(dir) = fs::read_dir(root.join(WS).join("records")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.starts_with(&format!("{kind}-")) && n.ends_with(".pid")
        })
        .filter_map(|e| fs::read_to_string(e.path()).ok()?.trim().parse().ok())
        .collect()
}

/// A record's environment as strings.
pub fn env_of(record: &Value) -> std::collections::BTreeMap<String, String> {
    record["env"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}
