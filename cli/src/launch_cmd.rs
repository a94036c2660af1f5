//! `dgl-coord launch`: the flags of DGL's launch.py, plus dglrun's own. `JobArgs` (everything
//! but where the job's files are) is shared with `dgl-coord run`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{ArgAction, ValueEnum};
use dglrun_coordinator::launch::{self, LaunchOptions, RunOptions, TrainerMode};

use crate::access::AccessArgs;
use crate::argv::is_kv;
use crate::duration;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum Mode {
    /// One `python -m torch.distributed.run` per machine, as DGL does.
    Torchrun,
    /// dglrun starts every trainer itself with torchrun's worker environment.
    Direct,
}

const DGL: &str = "DGL launch.py options";
const DGLRUN: &str = "dglrun options";

/// DGL's launch.py flags keep their names; kebab-case spellings work too.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Output: every line is labelled `[m1 server0]` on the stream the process wrote it to; at the end
a table of every process. --json prints one JSON event per line on stdout instead; --log-dir
keeps one .out/.err pair per process, the merged log and the summary (see the README).

Exit status: 0 when every trainer exited 0; else the worst exit code of a failed process
(128+N for signal N), at least 1; 130/143 when stopped by Ctrl-C/SIGTERM; 124 for a stall or a
start timeout; 1 when nothing could be started; 2 for a usage error. With --max-restarts, that of
the last attempt.

Example (DGL's own, with `dgl-coord launch` for `python3 tools/launch.py`, and a workspace inside
the agents' --root ~/dglrun):
  dgl-coord launch --workspace ~/dglrun/graphsage \\
    --num_trainers 2 --num_samplers 4 --num_servers 1 \\
    --part_config data/ogb-product.json --ip_config ip_config.txt \\
    \"python3 code/train_dist.py --graph-name ogb-product --ip_config ip_config.txt --num-epochs 5\"")]
pub(crate) struct LaunchArgs {
    /// Directory the processes run in on every host (absolute, or relative to the agent's root).
    #[arg(long, value_name = "DIR", help_heading = DGL)]
    pub(crate) workspace: String,
    /// Partition config JSON, relative to the workspace (as DGL passes it on).
    #[arg(
        long = "part_config",
        visible_alias = "part-config",
        value_name = "PATH",
        help_heading = DGL
    )]
    pub(crate) part_config: String,
    /// ip_config.txt: read here (relative to the current directory, or inside the workspace
    /// path) to find the machines, and in the workspace on every host by DGL.
    #[arg(long = "ip_config", visible_alias = "ip-config", value_name = "PATH", help_heading = DGL)]
    pub(crate) ip_config: String,
    /// Print the processes that would run, with their commands and environments, and exit.
    /// Then the agents' read-only checks run as for a launch (workspace, ip_config,
    /// part_config, stale jobs), and each host says what was checked; unreachable agents are
    /// reported, not an error.
    #[arg(long = "dry-run", visible_alias = "dry_run", help_heading = DGLRUN)]
    pub(crate) dry_run: bool,
    /// With --dry-run: contact no agent (only the plan is printed; nothing remote is checked).
    #[arg(long, requires = "dry_run", help_heading = DGLRUN)]
    pub(crate) offline: bool,
    #[command(flatten)]
    pub(crate) job: JobArgs,
}

/// What `launch` and `run` share: the job's shape, dglrun's options, the agents, the command.
#[derive(clap::Args, Debug)]
pub(crate) struct JobArgs {
    /// Trainer processes per machine (or give --trainers-per-host).
    #[arg(
        long = "num_trainers",
        visible_alias = "num-trainers",
        value_name = "N",
        required_unless_present = "trainers_per_host",
        value_parser = clap::value_parser!(u32).range(1..),
        help_heading = DGL
    )]
    pub(crate) num_trainers: Option<u32>,
    /// Sampler processes per trainer (forked by the trainers themselves).
    #[arg(
        long = "num_samplers",
        visible_alias = "num-samplers",
        value_name = "N",
        default_value_t = 0,
        help_heading = DGL
    )]
    pub(crate) num_samplers: u32,
    /// DGL server processes per machine.
    #[arg(
        long = "num_servers",
        visible_alias = "num-servers",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..),
        help_heading = DGL
    )]
    pub(crate) num_servers: u32,
    /// OMP threads of each server process.
    #[arg(
        long = "num_server_threads",
        visible_alias = "num-server-threads",
        value_name = "N",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..),
        help_heading = DGL
    )]
    pub(crate) num_server_threads: u32,
    /// OMP threads of each trainer, or `host`: each host's own usable CPUs (its affinity
    /// and cgroup CPU quota, asked of its agent) divided by its own trainer count [default,
    /// kept as DGL's for compatibility: max(CPUs / 2 / trainers of its machine, 1), counting
    /// this launching machine's CPUs; OMP_NUM_THREADS set in this shell wins over both].
    #[arg(
        long = "num_omp_threads",
        visible_alias = "num-omp-threads",
        value_name = "N|host",
        value_parser = omp_threads,
        help_heading = DGL
    )]
    pub(crate) num_omp_threads: Option<OmpThreads>,
    /// Graph formats the servers keep: csr, csc or coo, or several separated by commas.
    #[arg(
        long = "graph_format",
        visible_alias = "graph-format",
        value_name = "FORMATS",
        default_value = "csc",
        value_parser = graph_formats,
        help_heading = DGL
    )]
    pub(crate) graph_format: String,
    /// Extra environment variables, `K=V ...` (values may use $VAR of the host's environment).
    #[arg(
        long = "extra_envs",
        visible_alias = "extra-envs",
        value_name = "K=V",
        action = ArgAction::Append,
        value_parser = kv_word,
        help_heading = DGL
    )]
    pub(crate) extra_envs: Vec<String>,
    /// Accepted for launch.py compatibility and ignored: dglrun does not use ssh.
    #[arg(
        long = "ssh_port",
        visible_alias = "ssh-port",
        value_name = "PORT",
        hide = true
    )]
    pub(crate) ssh_port: Option<String>,
    /// Accepted for launch.py compatibility and ignored: dglrun does not use ssh.
    #[arg(
        long = "ssh_username",
        visible_alias = "ssh-username",
        value_name = "USER",
        hide = true
    )]
    pub(crate) ssh_username: Option<String>,
    /// Refused: DGL's old server-reuse flag (see `removed_flag`).
    #[arg(long = "keep_alive", visible_alias = "keep-alive", hide = true)]
    pub(crate) keep_alive: bool,
    /// Refused: DGL's old server-reuse flag (see `removed_flag`).
    #[arg(
        long = "server_name",
        visible_alias = "server-name",
        value_name = "NAME",
        hide = true
    )]
    pub(crate) server_name: Option<String>,

    /// Trainers of each machine, one count per ip_config line (`2,2,1`), or `@FILE` holding
    /// them (commas, spaces or lines; `#` starts a comment), or `gpus`: one trainer per GPU
    /// of each host (per --gpus-per-trainer GPUs with that flag), as `nvidia-smi -L` counts
    /// them there. Counts that differ need --trainer-mode direct; DGL_NUM_CLIENT and
    /// WORLD_SIZE then count every host's own trainers, and DGL's node_split (which assumes
    /// the same count everywhere) must be replaced by a split on LOCAL_RANK.
    #[arg(
        long = "trainers-per-host",
        visible_alias = "trainers_per_host",
        value_name = "N,N,..|@FILE",
        conflicts_with = "num_trainers",
        help_heading = DGLRUN
    )]
    pub(crate) trainers_per_host: Option<String>,
    /// GPUs of each trainer. In direct mode trainer L of a host gets CUDA_VISIBLE_DEVICES
    /// with devices L*N .. L*N+N-1 of its host, so `cuda:0` is its own on every rank; in
    /// torchrun mode nothing is set (the script picks by LOCAL_RANK). Either way a host
    /// without enough GPUs (`nvidia-smi -L` on its agent's PATH) is refused before anything
    /// starts.
    #[arg(
        long = "gpus-per-trainer",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..),
        help_heading = DGLRUN
    )]
    pub(crate) gpus_per_trainer: Option<u32>,
    /// Shell text every process runs first, in the same shell as its command (`sh -c`), e.g.
    /// `. /opt/conda/etc/profile.d/conda.sh && conda activate dgl` or `module load cuda`.
    /// With it (or --python), each host must import dgl and torch with the command's
    /// interpreter before anything starts.
    #[arg(long, value_name = "SHELL", help_heading = DGLRUN)]
    pub(crate) setup: Option<String>,
    /// The Python interpreter to run instead of the one in the command (the first python in
    /// command position, where torchrun mode inserts `-m torch.distributed.run`), e.g.
    /// /opt/envs/dgl/bin/python; it must import dgl and torch on every host.
    #[arg(long, value_name = "PATH", help_heading = DGLRUN)]
    pub(crate) python: Option<String>,
    /// How trainers are started.
    #[arg(
        long = "trainer-mode",
        value_name = "MODE",
        value_enum,
        default_value = "torchrun",
        help_heading = DGLRUN
    )]
    pub(crate) trainer_mode: Mode,
    /// Print one JSON event per line on stdout instead of labelled text (with launch
    /// --dry-run: the plan as JSON).
    #[arg(long, help_heading = DGLRUN)]
    pub(crate) json: bool,
    /// Keep the logs in DIR: m<machine>-<label>.out/.err per process, launch.log (merged and
    /// labelled), events.jsonl, summary.txt and summary.json.
    #[arg(long = "log-dir", visible_alias = "log_dir", value_name = "DIR", help_heading = DGLRUN)]
    pub(crate) log_dir: Option<PathBuf>,
    /// Start the trainers only once every DGL server port of the job listens, as each host's
    /// agent sees it in its socket table (never by connecting). Spares trainers DGL's 3 s
    /// retry sleeps, but their own start no longer overlaps the servers'; slower on the
    /// measured hosts (README, "Time to the first training step"), hence not the default.
    #[arg(long = "wait-servers", visible_alias = "wait_servers", help_heading = DGLRUN)]
    pub(crate) wait_servers: bool,
    /// Hand the job to machine 0's agent, print its id and exit 0 once every process has
    /// started: the job runs on without dgl-coord, with the same supervision. Follow it with
    /// `dgl-coord attach`, `wait` and `stop`.
    #[arg(long, help_heading = DGLRUN, conflicts_with = "log_dir")]
    pub(crate) detach: bool,
    /// Seconds between SIGTERM and SIGKILL when stopping processes.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0, help_heading = DGLRUN)]
    pub(crate) grace: f64,
    /// Seconds an agent keeps the job running without hearing from dgl-coord.
    #[arg(
        long = "lease-timeout",
        value_name = "SECONDS",
        default_value_t = 10.0,
        help_heading = DGLRUN
    )]
    pub(crate) lease_timeout: f64,
    /// Stop processes of earlier jobs still running in the same workspace instead of refusing.
    #[arg(long = "kill-stale", help_heading = DGLRUN)]
    pub(crate) kill_stale: bool,
    /// Start the whole job again (servers and trainers, same job id) up to N times when it
    /// fails: a process failing (but with exit code 2, a usage error), a lost host, a stall.
    /// Every process gets DGLRUN_RESTART_COUNT (and TORCHELASTIC_RESTART_COUNT), 0 at first.
    #[arg(long = "max-restarts", value_name = "N", default_value_t = 0, help_heading = DGLRUN)]
    pub(crate) max_restarts: u32,
    /// Wait before the first restart; doubled for each further one (at most 5m), each wait
    /// drawn between half and all of that.
    #[arg(
        long = "restart-backoff",
        value_name = "DUR",
        default_value = "1s",
        value_parser = duration::duration,
        help_heading = DGLRUN
    )]
    pub(crate) restart_backoff: Duration,
    /// Restart only on these exit codes of dgl-coord's (e.g. 1,137; 124 for a stall).
    #[arg(
        long = "restart-on",
        value_name = "CODES",
        value_parser = duration::exit_codes,
        help_heading = DGLRUN
    )]
    pub(crate) restart_on: Option<duration::ExitCodes>,
    /// Fail the job (exit code 124) when no trainer wrote a line or used CPU time for DUR
    /// (e.g. 10m), saying what each trainer last printed and when.
    #[arg(long = "stall-timeout", value_name = "DUR", value_parser = duration::duration, help_heading = DGLRUN)]
    pub(crate) stall_timeout: Option<Duration>,
    /// Fail the job (exit code 124) when a trainer printed nothing within DUR of the start.
    #[arg(long = "start-timeout", value_name = "DUR", value_parser = duration::duration, help_heading = DGLRUN)]
    pub(crate) start_timeout: Option<Duration>,

    /// The command every process runs, as ONE quoted argument (as in DGL's launch.py).
    #[arg(value_name = "COMMAND", allow_hyphen_values = true)]
    pub(crate) command: Vec<String>,

    #[command(flatten, next_help_heading = "Reaching the agents")]
    pub(crate) access: AccessArgs,
}

fn seconds(name: &str, v: f64) -> Result<Duration, UsageError> {
    if (0.0..1e7).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(UsageError(format!(
            "--{name} must be a number of seconds, not {v}"
        )))
    }
}

/// A command line that is wrong as given: exit 2, like clap's own usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub String);

/// `--graph_format`: what DGL's servers accept, `csr`, `csc`, `coo` or a comma list of them.
fn graph_formats(v: &str) -> Result<String, BadValue> {
    let ok = v.split(',').all(|f| matches!(f, "csr" | "csc" | "coo"));
    if ok {
        Ok(v.to_string())
    } else {
        Err(BadValue::GraphFormat)
    }
}

/// Why clap refuses a flag's value; clap names the flag and the value.
#[derive(Debug, thiserror::Error)]
enum BadValue {
    #[error("DGL's graph formats are csr, csc or coo, or several separated by commas (`csr,csc`)")]
    GraphFormat,
    #[error("--extra_envs takes NAME=value words (DGL's launch.py exports each one)")]
    ExtraEnv,
}

/// DGL's launch.py once had `--keep_alive` and `--server_name` to leave servers running for
/// later jobs; it has neither since (2.1 is what dglrun follows).
fn removed_flag(name: &str) -> UsageError {
    UsageError(format!(
        "{name} is not supported: it belongs to DGL's removed server-reuse mode (--keep_alive, \
         --server_name), which DGL's launch.py no longer has. dglrun starts the servers with \
         each job and stops every process of the job when it ends, so no server outlives it; \
         drop the flag"
    ))
}

/// clap's check of one `--extra_envs` word.
fn kv_word(w: &str) -> Result<String, BadValue> {
    if is_kv(w) {
        Ok(w.to_string())
    } else {
        Err(BadValue::ExtraEnv)
    }
}

pub(crate) fn parse_extra_envs(words: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    words
        .iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if is_kv(w) => Ok((k.to_string(), v.to_string())),
            _ => anyhow::bail!("--extra_envs takes K=V words, not {w:?}"),
        })
        .collect()
}

/// `--num_omp_threads`: a count, or each host's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OmpThreads {
    Count(u32),
    Host,
}

fn omp_threads(v: &str) -> Result<OmpThreads, String> {
    if v == "host" {
        return Ok(OmpThreads::Host);
    }
    match v.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(OmpThreads::Count(n)),
        _ => Err(format!(
            "{v:?} is neither a thread count (1 or more) nor `host`"
        )),
    }
}

/// `--trainers-per-host`: the counts it gives, and whether they come from each host's GPUs
/// (`gpus`).
fn trainers_per_host(value: Option<&str>) -> anyhow::Result<(Option<Vec<u32>>, bool)> {
    match value {
        Some("gpus") => Ok((None, true)),
        Some(v) => Ok((Some(parse_host_counts(v)?), false)),
        None => Ok((None, false)),
    }
}

/// `--num_omp_threads`: the count it gives, and whether each host's own is meant (`host`).
fn omp_threads_of(value: Option<OmpThreads>) -> (Option<u32>, bool) {
    match value {
        Some(OmpThreads::Count(n)) => (Some(n), false),
        Some(OmpThreads::Host) => (None, true),
        None => (None, false),
    }
}

/// `2,2,1`, or `@FILE` with the counts separated by commas, spaces or lines.
pub(crate) fn parse_host_counts(value: &str) -> anyhow::Result<Vec<u32>> {
    let (text, origin) = match value.strip_prefix('@') {
        Some(path) => (
            std::fs::read_to_string(Path::new(path))
                .with_context(|| format!("cannot read --trainers-per-host file {path}"))?,
            format!("--trainers-per-host file {path}"),
        ),
        None => (value.to_string(), "--trainers-per-host".to_string()),
    };
    let mut counts = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        for word in line.split(|c: char| c == ',' || c.is_whitespace()) {
            if word.is_empty() {
                continue;
            }
            let n = word.parse::<u32>().map_err(|_| {
                anyhow::anyhow!("{origin}: {word:?} is not a trainer count (a whole number)")
            })?;
            counts.push(n);
        }
    }
    anyhow::ensure!(
        !counts.is_empty(),
        "{origin}: no counts; give one per ip_config line"
    );
    Ok(counts)
}

impl JobArgs {
    /// The options of a launch of the job at `workspace` (no dry run, ip_config found as
    /// launch.py finds it); `run` adjusts what it knows better.
    pub(crate) fn options(
        self,
        workspace: String,
        part_config: String,
        ip_config: String,
        started: Instant,
    ) -> anyhow::Result<(LaunchOptions, RunOptions)> {
        self.check_flags(&workspace)?;
        let udf_command = self.user_command()?;
        let lease = seconds("lease-timeout", self.lease_timeout)?;
        if lease < Duration::from_millis(500) {
            return Err(UsageError("--lease-timeout must be at least 0.5 seconds".into()).into());
        }
        let options = self.launch_options(workspace, part_config, ip_config, udf_command)?;
        let run = self.run_options(lease, started)?;
        Ok((options, run))
    }

    /// Refuses what dgl-coord cannot do as asked; notes the ssh flags it ignores.
    fn check_flags(&self, workspace: &str) -> anyhow::Result<()> {
        if let Some(msg) = dglrun_coordinator::config::workspace::unexpanded_tilde(workspace) {
            return Err(UsageError(msg).into());
        }
        if self.keep_alive {
            return Err(removed_flag("--keep_alive").into());
        }
        if self.server_name.is_some() {
            return Err(removed_flag("--server_name").into());
        }
        if self.ssh_port.is_some() || self.ssh_username.is_some() {
            launch::output::note(
                "note: --ssh_port/--ssh_username are ignored: dgl-coord talks to dgl-agent, not ssh",
            );
        }
        Ok(())
    }

    /// The one quoted user command, its Python replaced by `--python`'s.
    fn user_command(&self) -> anyhow::Result<String> {
        let udf_command = match self.command.as_slice() {
            [c] => c.clone(),
            // argv::preprocess_args explains these; reached only when it was bypassed.
            _ => anyhow::bail!("give the user command as one quoted argument"),
        };
        match &self.python {
            Some(p) => launch::command::replace_python(&udf_command, p)
                .map_err(|e| anyhow::anyhow!("--python {p}: {e}")),
            None => Ok(udf_command),
        }
    }

    fn launch_options(
        &self,
        workspace: String,
        part_config: String,
        ip_config: String,
        udf_command: String,
    ) -> anyhow::Result<LaunchOptions> {
        let (trainers_per_host, trainers_from_gpus) =
            trainers_per_host(self.trainers_per_host.as_deref())?;
        let (num_omp_threads, omp_per_host) = omp_threads_of(self.num_omp_threads);
        Ok(LaunchOptions {
            workspace,
            num_trainers: self.num_trainers.unwrap_or(0),
            trainers_per_host,
            gpus_per_trainer: self.gpus_per_trainer,
            trainers_from_gpus,
            setup: self.setup.clone(),
            python: self.python.clone(),
            num_samplers: self.num_samplers,
            num_servers: self.num_servers,
            part_config,
            ip_config,
            num_server_threads: self.num_server_threads,
            num_omp_threads,
            omp_per_host,
            graph_format: self.graph_format.clone(),
            extra_envs: parse_extra_envs(&self.extra_envs)?,
            udf_command,
            trainer_mode: match self.trainer_mode {
                Mode::Torchrun => TrainerMode::Torchrun,
                Mode::Direct => TrainerMode::Direct,
            },
        })
    }

    fn run_options(self, lease: Duration, started: Instant) -> anyhow::Result<RunOptions> {
        Ok(RunOptions {
            access: self.access.access()?,
            grace: seconds("grace", self.grace)?,
            lease,
            kill_stale: self.kill_stale,
            dry_run: false,
            offline: false,
            json: self.json,
            log_dir: self.log_dir,
            local_ip_config: None,
            started,
            wait_servers: self.wait_servers,
            detach: self.detach,
            policy: launch::driver::JobPolicy {
                restart: launch::driver::RestartPolicy {
                    max_restarts: self.max_restarts,
                    first_backoff: self.restart_backoff,
                    restart_on: self.restart_on.map(|c| c.0),
                },
                watchdog: launch::driver::Watchdog {
                    stall_timeout: self.stall_timeout.filter(|d| !d.is_zero()),
                    start_timeout: self.start_timeout.filter(|d| !d.is_zero()),
                },
            },
        })
    }
}

pub(crate) async fn run(args: LaunchArgs) -> anyhow::Result<u8> {
    let started = Instant::now();
    let json = args.job.json && !args.dry_run;
    let prepared = args
        .job
        .options(args.workspace, args.part_config, args.ip_config, started);
    let (options, mut run) = match prepared {
        Ok(o) => o,
        Err(e) => {
            if json {
                launch::print_error_summary(started, &e);
            }
            return Err(e);
        }
    };
    run.dry_run = args.dry_run;
    run.offline = args.offline;
    launch::run(options, run).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_host_flags_give_counts_or_each_hosts_own() {
        let cases = [
            (None, (None, false)),
            (Some("gpus"), (None, true)),
            (Some("2,1"), (Some(vec![2, 1]), false)),
        ];
        for (value, want) in cases {
            assert_eq!(trainers_per_host(value).unwrap(), want, "{value:?}");
        }
        assert!(trainers_per_host(Some("gpu")).is_err());
        let cases = [
            (None, (None, false)),
            (Some(OmpThreads::Count(4)), (Some(4), false)),
            (Some(OmpThreads::Host), (None, true)),
        ];
        for (value, want) in cases {
            assert_eq!(omp_threads_of(value), want, "{value:?}");
        }
    }

    #[test]
    fn host_counts_from_a_list_or_a_file() {
        assert_eq!(parse_host_counts("2,2,1").unwrap(), [2, 2, 1]);
        assert_eq!(parse_host_counts(" 3 ").unwrap(), [3]);
        let d = std::env::temp_dir().join(format!("dglrun-counts-{}", std::process::id()));
        std::fs::write(&d, "# host counts\n2  # m0\n1,\n4\n").unwrap();
        let r = parse_host_counts(&format!("@{}", d.display()));
        let _ = std::fs::remove_file(&d);
        assert_eq!(r.unwrap(), [2, 1, 4]);
        let err = parse_host_counts("2,x").unwrap_err().to_string();
        assert!(err.contains("\"x\" is not a trainer count"), "{err}");
        assert!(parse_host_counts("").is_err());
        assert!(parse_host_counts("@/nonexistent/dglrun")
            .unwrap_err()
            .to_string()
            .contains("cannot read"));
    }
}
