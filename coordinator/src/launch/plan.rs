//! The launch plan: a pure function from the options and the cluster to every process that
//! will run, with its exact environment and command. It reproduces DGL's tools/launch.py
//! (checked against `integration-tests/fixtures/dgl-compat/launch_cases.json`), plus the direct trainer mode and
//! per-host trainer counts (which DGL cannot express: its ip_config has no room for them).

use std::collections::BTreeMap;

use serde::Serialize;

use super::command::{self, CommandLine, TorchRun};
use super::host_env::{HostFacts, SOCKET_IFNAME_VARS};
use crate::config::Machine;

/// How trainers are started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainerMode {
    /// As DGL does: one `python -m torch.distributed.run` per machine, which forks the trainers.
    #[default]
    Torchrun,
    /// dglrun starts each trainer itself with the environment torchrun would give it, so
    /// every rank is supervised and labelled on its own.
    Direct,
}

/// launch.py's options.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    pub workspace: String,
    /// Trainers on every machine; ignored when `trainers_per_host` is given.
    pub num_trainers: u32,
    /// Trainers of each machine, in ip_config order (dglrun's own `--trainers-per-host`).
    pub trainers_per_host: Option<Vec<u32>>,
    pub num_samplers: u32,
    pub num_servers: u32,
    pub part_config: String,
    pub ip_config: String,
    pub num_server_threads: u32,
    /// None: DGL's default, `max(cpu_count // 2 // num_trainers, 1)` on the launching machine.
    pub num_omp_threads: Option<u32>,
    pub graph_format: String,
    /// `K=V` pairs in the order given.
    pub extra_envs: Vec<(String, String)>,
    pub udf_command: String,
    pub trainer_mode: TrainerMode,
    /// `--gpus-per-trainer`: in direct mode each trainer gets CUDA_VISIBLE_DEVICES with its
    /// own this many devices of its host (torchrun mode sets nothing; both check the counts).
    pub gpus_per_trainer: Option<u32>,
    /// `--trainers-per-host gpus`: `trainers_per_host` is filled from the hosts' GPU counts
    /// once the agents answered.
    pub trainers_from_gpus: bool,
    /// `--setup`: shell text every process runs first, in the same shell as its command.
    pub setup: Option<String>,
    /// `--python`: the interpreter that replaced the command's (already in `udf_command`).
    pub python: Option<String>,
    /// `--num_omp_threads host`: each trainer gets its host's usable CPUs (`HostFacts::cpus`)
    /// divided by its host's trainer count.
    pub omp_per_host: bool,
}

/// Facts about the cluster and the launching machine the plan depends on.
#[derive(Clone, Debug)]
pub struct ClusterFacts {
    pub machines: Vec<Machine>,
    /// Chosen by machine 0's agent; None for a dry run (shown as `<PORT>`).
    pub master_port: Option<u16>,
    /// The launching shell's PYTHONPATH, passed on as DGL does.
    pub pythonpath: Option<String>,
    /// The launching shell's OMP_NUM_THREADS: DGL gives it to trainers instead of
    /// --num_omp_threads.
    pub omp_num_threads_env: Option<String>,
    /// CPUs of the launching machine (for DGL's default of --num_omp_threads).
    pub cpu_count: usize,
    /// Also torchrun's run id in direct mode.
    pub job_id: String,
    /// Per machine, in ip_config order, what its agent reported; empty when no agent was
    /// asked (then dglrun adds nothing of its own to DGL's environment).
    pub hosts: Vec<HostFacts>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Server,
    /// One trainer process (direct mode).
    Trainer,
    /// torchrun, which starts the machine's trainers (torchrun mode).
    TrainerGroup,
}

impl Role {
    /// The name on the wire and in `launch_cases.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Trainer => "trainer",
            Role::TrainerGroup => "trainer-group",
        }
    }

    pub fn is_trainer(self) -> bool {
        self != Role::Server
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlannedProcess {
    /// Machine rank (line of ip_config).
    pub machine: usize,
    pub role: Role,
    /// `server0`, `trainer1`, `trainers`.
    pub label: String,
    pub command: CommandLine,
    pub env: BTreeMap<String, String>,
    /// Relative to the workspace; empty: the workspace itself (DGL `cd`s there).
    pub cwd: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("the user command is empty")]
    EmptyCommand,
    #[error(transparent)]
    Torchrun(#[from] command::NoInterpreter),
    #[error("no machines in ip_config")]
    NoMachines,
    #[error("{0}")]
    HostCounts(String),
}

/// DGL's default for --num_omp_threads.
pub fn default_omp_threads(cpu_count: usize, num_trainers: u32) -> u32 {
    ((cpu_count / 2) as u32 / num_trainers.max(1)).max(1)
}

/// The trainer count of every machine, checked: one count per ip_config line, each at least
/// 1 (torch has no node without workers), and equal counts in torchrun mode.
pub fn trainer_counts(o: &LaunchOptions, machines: usize) -> Result<Vec<u32>, PlanError> {
    let Some(counts) = &o.trainers_per_host else {
        if o.num_trainers == 0 {
            return Err(PlanError::Zero("--num_trainers"));
        }
        return Ok(vec![o.num_trainers; machines]);
    };
    if counts.len() != machines {
        return Err(PlanError::HostCounts(format!(
            "--trainers-per-host gives {} counts but ip_config lists {machines} machines: give \
             one count per ip_config line, in its order",
            counts.len()
        )));
    }
    if let Some(m) = counts.iter().position(|&n| n == 0) {
        return Err(PlanError::HostCounts(format!(
            "--trainers-per-host: machine {m} has 0 trainers; every machine needs at least 1"
        )));
    }
    let uniform = counts.windows(2).all(|w| w[0] == w[1]);
    if o.trainer_mode == TrainerMode::Torchrun && !uniform {
        // torchrun numbers the ranks itself, from each node's --nproc_per_node; DGL's launch.py
        // (which torchrun mode reproduces) gives every node the same count, and dglrun cannot
        // check or supervise ranks it did not assign.
        return Err(PlanError::HostCounts(format!(
            "--trainers-per-host {} differs between machines, which torchrun mode cannot run: \
             there torchrun assigns RANK and WORLD_SIZE itself and DGL's launch.py gives every \
             node the same --nproc_per_node. Add --trainer-mode direct: dglrun then starts each \
             trainer itself with its global RANK, WORLD_SIZE and LOCAL_WORLD_SIZE",
            counts
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )));
    }
    Ok(counts.clone())
}

/// Every process of the job: servers of every machine first, then the trainers.
pub fn plan(o: &LaunchOptions, f: &ClusterFacts) -> Result<Vec<PlannedProcess>, PlanError> {
    let p = Planning::new(o, f)?;
    let mut out = Vec::new();
    for m in &f.machines {
        out.extend(p.servers(m.rank));
    }
    let mut rank_base = 0;
    for m in &f.machines {
        out.extend(p.trainers(m.rank, rank_base)?);
        // Ranks are global and contiguous by machine, as torchrun numbers them.
        rank_base += p.counts[m.rank] as usize;
    }
    Ok(out)
}

/// Every trainer and each of its samplers is one DGL client of every server.
fn num_client(world: usize, num_samplers: u32) -> usize {
    world * (1 + num_samplers as usize)
}

/// What every process of a plan shares, checked once.
struct Planning<'a> {
    o: &'a LaunchOptions,
    f: &'a ClusterFacts,
    /// Trainers per machine.
    counts: Vec<u32>,
    world: usize,
    master_ip: String,
    master_port: String,
    shared: [(&'static str, String); 6],
    user_command: CommandLine,
}

impl<'a> Planning<'a> {
    fn new(o: &'a LaunchOptions, f: &'a ClusterFacts) -> Result<Self, PlanError> {
        let counts = trainer_counts(o, f.machines.len())?;
        if o.num_servers == 0 {
            return Err(PlanError::Zero("--num_servers"));
        }
        if o.udf_command.trim().is_empty() {
            return Err(PlanError::EmptyCommand);
        }
        let master = f.machines.first().ok_or(PlanError::NoMachines)?;
        let world: usize = counts.iter().map(|&n| n as usize).sum();
        let shared = [
            ("DGL_NUM_SAMPLER", o.num_samplers.to_string()),
            (
                "DGL_NUM_CLIENT",
                num_client(world, o.num_samplers).to_string(),
            ),
            ("DGL_CONF_PATH", o.part_config.clone()),
            ("DGL_IP_CONFIG", o.ip_config.clone()),
            ("DGL_NUM_SERVER", o.num_servers.to_string()),
            ("DGL_GRAPH_FORMAT", o.graph_format.clone()),
        ];
        Ok(Self {
            o,
            f,
            counts,
            world,
            master_ip: master.ip.to_string(),
            master_port: f
                .master_port
                .map_or_else(|| "<PORT>".to_string(), |p| p.to_string()),
            shared,
            user_command: command::parse(&o.udf_command),
        })
    }

    /// A process's environment: extra_envs first (DGL exports them in an outer scope, so
    /// its own variables win), then `pairs`, then the launcher's PYTHONPATH, then dglrun's
    /// own additions for `machine` where neither the user nor the agent's environment has them.
    fn env(&self, machine: usize, pairs: &[(&str, String)]) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = self.o.extra_envs.iter().cloned().collect();
        for (k, v) in pairs {
            env.insert(k.to_string(), v.clone());
        }
        if let Some(pp) = &self.f.pythonpath {
            env.insert("PYTHONPATH".into(), pp.clone());
        }
        if let Some(host) = self.f.hosts.get(machine) {
            if let Some(ifname) = &host.socket_ifname {
                for k in SOCKET_IFNAME_VARS {
                    if !env.contains_key(k) && !host.agent_env.iter().any(|a| a == k) {
                        env.insert(k.to_string(), ifname.clone());
                    }
                }
            }
        }
        env
    }

    /// DGL's default divides the launching machine's CPUs by the trainer count; with
    /// per-host counts, by that host's count.
    fn client_omp(&self, machine: usize, trainers: u32) -> String {
        let host_cpus = self
            .f
            .hosts
            .get(machine)
            .and_then(|h| h.cpus)
            .filter(|_| self.o.omp_per_host);
        self.f.omp_num_threads_env.clone().unwrap_or_else(|| {
            match host_cpus {
                Some(cpus) => (cpus / trainers.max(1)).max(1),
                None => self
                    .o
                    .num_omp_threads
                    .unwrap_or_else(|| default_omp_threads(self.f.cpu_count, trainers)),
            }
            .to_string()
        })
    }

    fn servers(&self, machine: usize) -> impl Iterator<Item = PlannedProcess> + '_ {
        let o = self.o;
        (0..o.num_servers).map(move |j| {
            let mut pairs = vec![
                ("DGL_ROLE", "server".to_string()),
                ("OMP_NUM_THREADS", o.num_server_threads.to_string()),
                (
                    "DGL_SERVER_ID",
                    (machine * o.num_servers as usize + j as usize).to_string(),
                ),
            ];
            pairs.extend(self.shared.iter().cloned());
            PlannedProcess {
                machine,
                role: Role::Server,
                label: format!("server{j}"),
                command: command::with_setup(self.user_command.clone(), self.o.setup.as_deref()),
                env: self.env(machine, &pairs),
                cwd: String::new(),
            }
        })
    }

    /// The trainers of one machine: one torchrun, or each trainer directly with torchrun's
    /// worker environment; `rank_base` is the global rank of its first trainer.
    fn trainers(&self, machine: usize, rank_base: usize) -> Result<Vec<PlannedProcess>, PlanError> {
        let local_world = self.counts[machine];
        let mut client = vec![
            ("DGL_DIST_MODE", "distributed".to_string()),
            ("DGL_ROLE", "client".to_string()),
            ("OMP_NUM_THREADS", self.client_omp(machine, local_world)),
            ("DGL_GROUP_ID", "0".to_string()),
        ];
        client.extend(self.shared.iter().cloned());
        let nnodes = self.f.machines.len();
        match self.o.trainer_mode {
            TrainerMode::Torchrun => {
                let wrapped = command::wrap_torchrun(
                    &self.o.udf_command,
                    &TorchRun {
                        nproc_per_node: local_world,
                        nnodes,
                        node_rank: machine,
                        master_addr: self.master_ip.clone(),
                        master_port: self.master_port.clone(),
                    },
                )?;
                // dglrun's own addition: where torchrun keeps its failed rank's error record
                // (torch's `@record` writes it there), one file per torchrun and job.
                let mut env = self.env(machine, &client);
                env.insert(
                    TORCHELASTIC_ERROR_FILE.into(),
                    torchrun_error_file(&self.f.job_id, machine),
                );
                Ok(vec![PlannedProcess {
                    machine,
                    role: Role::TrainerGroup,
                    label: "trainers".into(),
                    command: command::with_setup(command::parse(&wrapped), self.o.setup.as_deref()),
                    env,
                    cwd: String::new(),
                }])
            }
            TrainerMode::Direct => Ok((0..local_world)
                .map(|l| {
                    let mut pairs = client.clone();
                    pairs.extend(worker_env(
                        &Worker {
                            rank: rank_base + l as usize,
                            world: self.world,
                            local_rank: l,
                            local_world,
                            node_rank: machine,
                            nnodes,
                        },
                        &self.master_ip,
                        &self.master_port,
                        &self.f.job_id,
                    ));
                    if let Some(n) = self.o.gpus_per_trainer {
                        // Trainer l owns devices l*n .. l*n+n-1: `cuda:0` is its own on
                        // every rank.
                        let devices: Vec<String> =
                            (l * n..(l + 1) * n).map(|d| d.to_string()).collect();
                        pairs.push(("CUDA_VISIBLE_DEVICES", devices.join(",")));
                    }
                    PlannedProcess {
                        machine,
                        role: Role::Trainer,
                        label: format!("trainer{l}"),
                        command: command::with_setup(
                            self.user_command.clone(),
                            self.o.setup.as_deref(),
                        ),
                        env: self.env(machine, &pairs),
                        cwd: String::new(),
                    }
                })
                .collect()),
        }
    }
}

/// The `--extra_envs` names the plan sets itself in some process (`DGL_ROLE`, `RANK`, ...):
/// DGL exports extra_envs in an outer scope, so its own value wins and the user's is dropped.
pub fn overridden_extra_envs(o: &LaunchOptions, planned: &[PlannedProcess]) -> Vec<String> {
    o.extra_envs
        .iter()
        .filter(|(k, v)| planned.iter().any(|p| p.env.get(k) != Some(v)))
        .map(|(k, _)| k.clone())
        .collect()
}

/// The variable torchrun reads for where to write its root cause's error record.
pub const TORCHELASTIC_ERROR_FILE: &str = "TORCHELASTIC_ERROR_FILE";

/// The error file of machine `machine`'s torchrun: in the directory torchrun starts in (the
/// workspace), hidden, named for the job.
pub fn torchrun_error_file(job_id: &str, machine: usize) -> String {
    format!(".dglrun-{job_id}-m{machine}-torchrun-error.json")
}

/// Where one trainer sits in the job.
struct Worker {
    rank: usize,
    world: usize,
    local_rank: u32,
    local_world: u32,
    node_rank: usize,
    nnodes: usize,
}

/// The environment torchrun gives worker `local_rank` of node `node_rank` — except
/// TORCHELASTIC_USE_AGENT_STORE: there is no torchrun agent hosting the store, so rank 0 must.
fn worker_env(
    w: &Worker,
    master_addr: &str,
    master_port: &str,
    run_id: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("RANK", w.rank.to_string()),
        ("LOCAL_RANK", w.local_rank.to_string()),
        ("WORLD_SIZE", w.world.to_string()),
        ("LOCAL_WORLD_SIZE", w.local_world.to_string()),
        ("GROUP_RANK", w.node_rank.to_string()),
        ("GROUP_WORLD_SIZE", w.nnodes.to_string()),
        ("ROLE_RANK", w.rank.to_string()),
        ("ROLE_WORLD_SIZE", w.world.to_string()),
        ("ROLE_NAME", "default".to_string()),
        ("MASTER_ADDR", master_addr.to_string()),
        ("MASTER_PORT", master_port.to_string()),
        ("TORCHELASTIC_RUN_ID", run_id.to_string()),
        ("TORCHELASTIC_RESTART_COUNT", "0".to_string()),
        ("TORCHELASTIC_MAX_RESTARTS", "0".to_string()),
        ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1".to_string()),
    ]
}

#[cfg(test)]
mod tests;
