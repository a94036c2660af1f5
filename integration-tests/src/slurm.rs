//! A real Slurm cluster on this machine, for the Slurm recipe's tests (`tests/slurm.rs`):
//! Debian's slurmctld, slurmd and munge, unmodified, started by `fixtures/real-slurm.sh`.
//! slurmctld and every slurmd run in a network namespace and a UTS namespace of their own
//! (own address, own hostname), so each node is a separate host to the jobs it runs, while
//! sharing this machine's file system (the test's binaries, fixtures and temp dirs) and its
//! pid namespace (so /proc shows what a job left).
//!
//! ```text
//!   root netns:  <P>h   198.18.255.1   (sbatch, salloc, scontrol run from here)
//!   netns <P>ctl: eth0  198.18.255.2   slurmctld
//!   netns <P>nI:  eth0  198.18.255.1I  slurmd of node nI (I = 1..N)
//! ```
//!
//! One cluster at a time on a machine (a lock file), since its host link lives in the root
//! namespace. Dropping it stops every daemon and job and deletes its namespaces; a cluster
//! whose test process died without that is removed by the next one that starts.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::SLURM_BLOCK;
use crate::{alive, fixtures_dir};

/// What the packages provide and the script calls.
const TOOLS: &[&str] = &[
    "slurmctld",
    "slurmd",
    "sbatch",
    "salloc",
    "srun",
    "scontrol",
    "scancel",
    "sinfo",
    "munged",
    "mungekey",
];

/// Held while a cluster of these tests exists on the machine.
const LOCK: &str = "/tmp/dglrun-real-slurm.lock";

/// The script's state directories are `/tmp/real-slurm.XXXXXX`; ours hold this file.
const OWNER: &str = "dglrun-test-owner";

fn script() -> PathBuf {
    fixtures_dir().join("real-slurm.sh")
}

/// Why a real Slurm cluster cannot be started here, or None when it can.
pub fn unavailable() -> Option<String> {
    if let Some(why) = crate::netns::unavailable() {
        return Some(format!("cannot make network namespaces ({why})"));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    let missing: Vec<&str> = TOOLS
        .iter()
        .copied()
        .filter(|t| !dirs.iter().any(|d| d.join(t).is_file()))
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "{} not on PATH: install Slurm and munge (apt-get install slurmctld slurmd \
             slurm-client munge; .ci/run does)",
            missing.join(", ")
        ));
    }
    None
}

/// Starts a cluster of `nodes` nodes, or prints why the test is skipped and returns None.
pub fn start_or_skip(test: &str, nodes: usize) -> Option<SlurmCluster> {
    if let Some(why) = unavailable() {
        crate::cannot_run(test, &format!("no real Slurm cluster here: {why}"));
        return None;
    }
    Some(SlurmCluster::start(nodes).expect("start the Slurm cluster"))
}

/// How a job ended, as `scontrol show job` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnd {
    /// `COMPLETED`, `FAILED`, `CANCELLED`, `TIMEOUT`, ...
    pub state: String,
    /// The batch script's exit status and the signal that ended it (`ExitCode=7:0`).
    pub exit_code: i32,
    pub signal: i32,
}

pub struct SlurmCluster {
    /// The script's state directory (slurm.conf, logs, munge socket).
    pub state: PathBuf,
    nodes: usize,
    prefix: String,
    _lock: fs::File,
}

impl SlurmCluster {
    /// Brings the cluster up (about 3 s once the packages are installed) and returns when every
    /// node is idle and has run a step.
    pub fn start(nodes: usize) -> Result<Self> {
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK)
            .with_context(|| format!("open {LOCK}"))?;
        lock.lock().with_context(|| format!("lock {LOCK}"))?;
        remove_abandoned();
        let prefix = format!("sl{:04x}", rand::random::<u16>());
        let out = Command::new("bash")
            .arg(script())
            .args(["up", &nodes.to_string()])
            .env("RS_NO_INSTALL", "1")
            .env("RS_PREFIX", &prefix)
            .env("RS_SUBNET", SLURM_BLOCK.to_string())
            .env_remove("SLURM_CONF")
            .stdin(Stdio::null())
            .output()
            .context("run real-slurm.sh up")?;
        if !out.status.success() {
            bail!(
                "real-slurm.sh up {nodes} failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let state = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
        if !state.join("slurm.conf").is_file() {
            bail!("real-slurm.sh up printed no state directory: {stdout:?}");
        }
        let c = Self {
            state,
            nodes,
            prefix,
            _lock: lock,
        };
        fs::write(c.state.join(OWNER), std::process::id().to_string())
            .context("record the cluster's owner")?;
        Ok(c)
    }

    pub fn conf(&self) -> PathBuf {
        self.state.join("slurm.conf")
    }

    /// A Slurm client command (`sbatch`, `scontrol`, ...) aimed at this cluster.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", self.conf());
        c
    }

    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// Slurm's name of node `i` (0-based): `n1`, `n2`, ...
    pub fn node_name(&self, i: usize) -> String {
        format!("n{}", i + 1)
    }

    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, SLURM_BLOCK, 11 + i as u8)
    }

    fn node_ns(&self, i: usize) -> String {
        format!("{}n{}", self.prefix, i + 1)
    }

    /// Every live process in node `i`'s network namespace, with its command name.
    pub fn processes_on_node(&self, i: usize) -> Vec<(u32, String)> {
        let Ok(o) = Command::new("ip")
            .args(["netns", "pids", &self.node_ns(i)])
            .output()
        else {
            return Vec::new();
        };
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .filter(|&p| alive(p))
            .map(|p| (p, comm(p)))
            .collect()
    }

    /// `sbatch --parsable`, for [`Self::submit`]: add options, the script and its arguments.
    pub fn sbatch(&self) -> Command {
        let mut c = self.command("sbatch");
        c.arg("--parsable");
        c
    }

    /// Runs an [`Self::sbatch`] command; returns the job's id.
    pub fn submit(&self, mut cmd: Command) -> Result<u32> {
        let out = cmd.output().context("run sbatch")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "sbatch failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let id = stdout.trim().split(';').next().unwrap_or_default();
        id.parse()
            .with_context(|| format!("sbatch printed no job id: {stdout:?}"))
    }

    /// The job's `scontrol show job` fields (`JobState`, `ExitCode`, ...).
    pub fn job_fields(&self, id: u32) -> Result<Vec<(String, String)>> {
        let out = self
            .command("scontrol")
            .args(["show", "job", &id.to_string(), "-o"])
            .output()
            .context("run scontrol")?;
        if !out.status.success() {
            bail!(
                "scontrol show job {id}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    /// The job's state once it has ended (past `COMPLETING`), polled every 100 ms.
    pub fn wait_job(&self, id: u32, timeout: Duration) -> Result<JobEnd> {
        let deadline = Instant::now() + timeout;
        loop {
            let fields = self.job_fields(id)?;
            let get = |k: &str| {
                fields
                    .iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            let state = get("JobState");
            if !matches!(
                state.as_str(),
                "" | "PENDING" | "CONFIGURING" | "RUNNING" | "COMPLETING" | "SUSPENDED"
            ) {
                let code = get("ExitCode");
                let (rc, sig) = code.split_once(':').unwrap_or((&code, "0"));
                return Ok(JobEnd {
                    state,
                    exit_code: rc.parse().unwrap_or(-1),
                    signal: sig.parse().unwrap_or(-1),
                });
            }
            if Instant::now() >= deadline {
                bail!("job {id} still {state} after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Cancels every job of the cluster (after a failed test, so the next starts clean).
    pub fn cancel_all(&self) {
        let user = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| "root".into());
        let _ = self
            .command("scancel")
            .args(["--full", "--quiet", &format!("--user={user}")])
            .status();
    }

    /// The daemons' logs, the end of each, for a failed test's message.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        let Ok(dir) = fs::read_dir(self.state.join("log")) else {
            return out;
        };
        for e in dir.flatten() {
            let text = fs::read_to_string(e.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            out += &format!("--- {}\n{}\n", e.path().display(), tail.join("\n"));
        }
        out
    }
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        if let Err(e) = down(&self.state) {
            eprintln!("Slurm cluster teardown: {e:#}");
        }
    }
}

fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Stops everything of the cluster in `state` and deletes its namespaces and state.
fn down(state: &Path) -> Result<()> {
    let out = Command::new("bash")
        .arg(script())
        .arg("down")
        .arg(state)
        .env_remove("SLURM_CONF")
        .stdin(Stdio::null())
        .output()
        .context("run real-slurm.sh down")?;
    if !out.status.success() {
        bail!(
            "real-slurm.sh down {} failed: {}",
            state.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Clusters of earlier test processes that died before their teardown (killed by a timeout).
fn remove_abandoned() {
    let Ok(dir) = fs::read_dir("/tmp") else {
        return;
    };
    for e in dir.flatten() {
        if !e.file_name().to_string_lossy().starts_with("real-slurm.") {
            continue;
        }
        let Ok(owner) = fs::read_to_string(e.path().join(OWNER)) else {
            continue;
        };
        if owner.trim().parse().is_ok_and(alive) {
            continue;
        }
        eprintln!(
            "removing the Slurm cluster left by process {}",
            owner.trim()
        );
        if let Err(err) = down(&e.path()) {
            eprintln!("{err:#}");
        }
    }
}
