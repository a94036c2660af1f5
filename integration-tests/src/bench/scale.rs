//! Scale: 256 agents on 127.0.0.2 ... 127.0.1.1 (one process each, started concurrently), one
//! job of 4 processes per agent (1 server + 3 trainers, `sleep 0.5`, direct mode): time until
//! every process started, until the job stopped cleanly, the coordinator's peak RSS; and the
//! agents' idle RSS and CPU.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use super::proc::{cpu_ticks, loopback_ips, status_kb, Agents, TICKS};
use super::{release_bin, run_lines_pid, Opts, Row};

const PER_AGENT: usize = 4;

fn write_inputs(agents: &Agents, local: &Path) -> Result<std::path::PathBuf> {
    let n = agents.ips.len();
    let mut ipc = String::new();
    for ip in &agents.ips {
        ipc.push_str(&format!("{ip} 30050\n"));
    }
    let mut part = serde_json::Map::new();
    part.insert("graph_name".into(), "scale".into());
    part.insert("num_parts".into(), n.into());
    part.insert("num_nodes".into(), (n * 10).into());
    part.insert("num_edges".into(), (n * 10).into());
    part.insert("part_method".into(), "metis".into());
    part.insert("halo_hops".into(), 1.into());
    let ranges: Vec<Value> = (0..n)
        .map(|i| serde_json::json!([i * 10, (i + 1) * 10]))
        .collect();
    part.insert(
        "node_map".into(),
        serde_json::json!({ "_N": ranges.clone() }),
    );
    part.insert("edge_map".into(), serde_json::json!({ "_N:_E:_N": ranges }));
    part.insert("ntypes".into(), serde_json::json!({ "_N": 0 }));
    part.insert("etypes".into(), serde_json::json!({ "_N:_E:_N": 0 }));
    for i in 0..n {
        part.insert(
            format!("part-{i}"),
            serde_json::json!({
                "node_feats": format!("part{i}/node_feat.dgl"),
                "edge_feats": format!("part{i}/edge_feat.dgl"),
                "part_graph": format!("part{i}/graph.dgl"),
            }),
        );
    }
    let part = serde_json::to_vec_pretty(&Value::Object(part))?;
    for root in &agents.roots {
        let ws = root.join("ws");
        fs::create_dir_all(&ws)?;
        fs::write(ws.join("ip_config.txt"), &ipc)?;
        fs::write(ws.join("part.json"), &part)?;
    }
    fs::create_dir_all(local)?;
    let p = local.join("ip_config.txt");
    fs::File::create(&p)?.write_all(ipc.as_bytes())?;
    Ok(p)
}

/// RSS (MB) of every agent, and their CPU use (% of one core) over `window`.
fn idle(agents: &Agents, window: Duration) -> (Vec<f64>, f64) {
    let pids = agents.pids();
    let before: u64 = pids.iter().filter_map(|&p| cpu_ticks(p)).sum();
    std::thread::sleep(window);
    let after: u64 = pids.iter().filter_map(|&p| cpu_ticks(p)).sum();
    let rss = pids
        .iter()
        .filter_map(|&p| status_kb(p, "VmRSS"))
        .map(|b| b as f64 / 1e6)
        .collect();
    let cpu = (after.saturating_sub(before)) as f64 / TICKS / window.as_secs_f64() * 100.0;
    (rss, cpu)
}

struct JobFigures {
    started_s: f64,
    coord_started_s: f64,
    done_s: f64,
    peak_rss_mb: f64,
    left: usize,
}

fn job_once(agents: &Agents, ip_config: &Path, dir: &Path) -> Result<JobFigures> {
    let mut cmd = std::process::Command::new(release_bin("dgl-coord")?);
    let local = ip_config.parent().context("ip_config dir")?;
    cmd.current_dir(local)
        .env_remove("DGL_AGENT_TOKEN")
        .env("DGL_AGENT_TOKEN_FILE", &agents.token_file)
        .args([
            "launch",
            "--json",
            "--workspace",
            "ws",
            "--num_servers",
            "1",
            "--num_trainers",
            &(PER_AGENT - 1).to_string(),
            "--trainer-mode",
            "direct",
            "--part_config",
            "part.json",
            "--grace",
            "2",
            "--agent-port",
            &agents.port.to_string(),
        ])
        .args(["--ip_config", "ip_config.txt"])
        .arg("sleep 0.5")
        .stderr(fs::File::create(dir.join("coord-scale.log"))?);
    let pid = AtomicU32::new(0);
    let peak = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let mut pids = Vec::new();
    let mut last_started = None;
    let mut summary = Value::Null;
    let t0 = Instant::now();
    let res = std::thread::scope(|scope| {
        scope.spawn(|| {
            // Bounded by the launch's own timeout below (done is set when it returns).
            while !done.load(Ordering::SeqCst) {
                let p = pid.load(Ordering::SeqCst);
                if p != 0 {
                    if let Some(hwm) = status_kb(p, "VmHWM") {
                        peak.fetch_max(hwm, Ordering::SeqCst);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let r = run_lines_pid(cmd, Duration::from_secs(120), Some(&pid), |t, line| {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                return;
            };
            if v["event"] == "started" {
                if let Some(p) = v["pid"].as_u64() {
                    pids.push(p as u32);
                }
                last_started = Some(t);
            } else if v["event"] == "summary" {
                summary = v;
            }
        });
        done.store(true, Ordering::SeqCst);
        r
    });
    let (st, exit_at) = res?;
    ensure!(
        st.success(),
        "scale job failed: {} (see {})",
        summary["error"],
        dir.join("coord-scale.log").display()
    );
    let n = agents.ips.len() * PER_AGENT;
    ensure!(pids.len() == n, "{} of {n} processes started", pids.len());
    let job = summary["job_id"].as_str().unwrap_or_default().to_string();
    let left_pids = crate::wait_gone(&pids, Duration::from_secs(5));
    let left_env = if job.is_empty() {
        0
    } else {
        crate::pids_with_env("DGLRUN_JOB_ID", &job).len()
    };
    Ok(JobFigures {
        started_s: last_started
            .map(|t| t.duration_since(t0).as_secs_f64())
            .unwrap_or(f64::NAN),
        coord_started_s: summary["all_started_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0,
        done_s: exit_at.duration_since(t0).as_secs_f64(),
        peak_rss_mb: peak.load(Ordering::SeqCst) as f64 / 1e6,
        left: left_pids.len() + left_env,
    })
}

pub fn run(opts: &Opts) -> Result<Vec<Row>> {
    let n = opts.scale_agents;
    let dir = tempfile::tempdir()?;
    let port = 47311;
    let t = Instant::now();
    let agents = Agents::start(
        dir.path(),
        loopback_ips(2, n),
        port,
        Duration::from_secs(120),
    )
    .with_context(|| format!("start {n} agents"))?;
    let start_s = t.elapsed().as_secs_f64();
    eprintln!(
        "bench scale: {n} agents ({} ... {}) listening after {start_s:.2}s",
        agents.ips[0],
        agents.ips[n - 1]
    );
    let ip_config = write_inputs(&agents, &dir.path().join("local"))?;
    std::thread::sleep(Duration::from_secs(1));
    let (rss_before, cpu_before) = idle(&agents, Duration::from_secs(5));
    let mut rows = vec![Row::new(
        format!("scale: {n} agents started concurrently"),
        "s",
        &[start_s],
        "",
        None,
    )];
    let (mut started, mut coord_started, mut done, mut peak) = (vec![], vec![], vec![], vec![]);
    let mut left_total = 0;
    for rep in 0..opts.reps.min(3) {
        let f = job_once(&agents, &ip_config, dir.path())?;
        eprintln!(
            "bench scale rep {rep}: {} processes started {:.3}s (coord {:.3}s), stopped cleanly {:.3}s, coord peak RSS {:.1} MB, left {}",
            n * PER_AGENT,
            f.started_s,
            f.coord_started_s,
            f.done_s,
            f.peak_rss_mb,
            f.left
        );
        started.push(f.started_s);
        coord_started.push(f.coord_started_s);
        done.push(f.done_s);
        peak.push(f.peak_rss_mb);
        left_total += f.left;
    }
    std::thread::sleep(Duration::from_secs(1));
    let (rss_after, cpu_after) = idle(&agents, Duration::from_secs(5));
    let np = n * PER_AGENT;
    rows.push(Row::new(
        format!("scale: {np} procs all started"),
        "s",
        &started,
        "< 2 s",
        Some(&|x| x < 2.0),
    ));
    rows.push(Row::new(
        "scale: coord all_started_ms",
        "s",
        &coord_started,
        "",
        None,
    ));
    rows.push(Row::new(
        "scale: plan+start+stop (sleep 0.5)",
        "s",
        &done,
        "",
        None,
    ));
    rows.push(Row::new(
        "scale: processes left after",
        "",
        &[left_total as f64],
        "0",
        Some(&|x| x == 0.0),
    ));
    rows.push(Row::new(
        "scale: coordinator peak RSS",
        "MB",
        &peak,
        "",
        None,
    ));
    for (name, rss) in [("before job", &rss_before), ("after jobs", &rss_after)] {
        let mut r = Row::new(
            format!("scale: agent idle RSS, {name}"),
            "MB",
            rss,
            "max < 15 MB",
            None,
        );
        r.pass = Some(r.stat.is_some_and(|s| s.max < 15.0));
        rows.push(r);
    }
    rows.push(Row::new(
        format!("scale: idle CPU, all {n} agents (% of a core)"),
        "%",
        &[cpu_before, cpu_after],
        "~0 (< 2 %)",
        Some(&|x| x < 2.0),
    ));
    drop(agents);
    Ok(rows)
}
