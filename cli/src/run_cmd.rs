//! `dgl-coord run`: `copy` then `launch` in one command, for the common case. The launch's
//! --part_config and --ip_config are where the copy put them; ip_config is read locally from
//! the file that was copied.
//!
//! The copy flags are declared again here rather than shared with `copy_cmd` (owned and
//! still changing elsewhere); they keep copy's names, meanings and defaults.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use dglrun_coordinator::copy::{self, hashing, CopyOptions, CopyReport, ProgressMode, SendOptions};
use dglrun_coordinator::launch;

use crate::launch_cmd::JobArgs;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Progress {
    /// A bar when stderr is a terminal, plain lines otherwise.
    Auto,
    /// One line per finished file and a status line every 5 s.
    Plain,
    /// Nothing but errors and the summary.
    Quiet,
}

const COPY: &str = "Copy options (as dgl-coord copy)";

#[derive(clap::Args, Debug)]
#[command(after_help = "\
The copy runs first, exactly as `dgl-coord copy` (nothing is started unless every host verified
every file); then the job is launched with --part_config and --ip_config pointing at what the
copy placed in the workspace. --json prints the copy report as one `copy` event, then the
launch's events. Exit status: 1 when the copy failed, else as `dgl-coord launch`.

Example:
  dgl-coord run --workspace ~/graphsage --rel_data_path data --part_config out/ogb-product.json \\
    --ip_config ip_config.txt --script_folder code --num_trainers 2 --num_servers 1 \\
    \"python3 code/train_dist.py --graph-name ogb-product --ip_config ip_config.txt\"")]
pub struct RunArgs {
    /// Workspace on every host: relative to the agent's root, or absolute inside it.
    #[arg(long, value_name = "DIR", help_heading = COPY)]
    workspace: String,
    /// Where the partitions go, relative to the workspace.
    #[arg(
        long = "rel_data_path",
        visible_alias = "rel-data-path",
        value_name = "DIR",
        help_heading = COPY
    )]
    rel_data_path: String,
    /// The partition config JSON written by dgl.distributed.partition_graph (local path).
    #[arg(
        long = "part_config",
        visible_alias = "part-config",
        value_name = "FILE",
        help_heading = COPY
    )]
    part_config: PathBuf,
    /// ip_config.txt: one machine a line, `IP [PORT]` (local path).
    #[arg(long = "ip_config", visible_alias = "ip-config", value_name = "FILE", help_heading = COPY)]
    ip_config: PathBuf,
    /// Folder of training scripts, copied to <workspace>/<its name> on every machine.
    #[arg(
        long = "script_folder",
        visible_alias = "script-folder",
        value_name = "DIR",
        help_heading = COPY
    )]
    script_folder: Option<PathBuf>,
    // No defaults of their own: copy's (SendOptions::default) apply.
    /// Files in flight per host [default: as copy].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=32), help_heading = COPY)]
    jobs: Option<u32>,
    /// Further attempts for a transfer whose agent dropped (backoff 0.5 s, doubling) [default:
    /// as copy].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=20), help_heading = COPY)]
    retries: Option<u32>,
    /// HTTP/2 connections per host over which the transfers are spread [default: as copy].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=16), help_heading = COPY)]
    connections: Option<u32>,
    /// Progress display of the copy on stderr.
    #[arg(long, value_enum, default_value_t = Progress::Auto, help_heading = COPY)]
    progress: Progress,
    /// Hash every local file again instead of trusting the hash cache.
    #[arg(long = "no-hash-cache", help_heading = COPY)]
    no_hash_cache: bool,

    #[command(flatten)]
    job: JobArgs,
}

/// The copy report as the first event of `run --json`.
fn copy_event(report: &CopyReport) -> anyhow::Result<String> {
    let mut event = serde_json::Map::new();
    event.insert("event".into(), "copy".into());
    if let serde_json::Value::Object(fields) = serde_json::to_value(report)? {
        event.extend(fields);
    }
    Ok(serde_json::to_string(&event)?)
}

pub async fn run(args: RunArgs) -> anyhow::Result<u8> {
    let started = Instant::now();
    let json = args.job.json;
    match copy_then_options(args, started).await {
        Ok((options, run)) => launch::run(options, run).await,
        Err(e) => {
            // The launch ends its own stream; errors before it still end with a summary.
            if json {
                launch::print_error_summary(started, &e);
            }
            Err(e)
        }
    }
}

/// Checks the launch flags, copies, and returns the launch's options pointing at the copy.
async fn copy_then_options(
    args: RunArgs,
    started: Instant,
) -> anyhow::Result<(launch::LaunchOptions, launch::RunOptions)> {
    let json = args.job.json;
    // Every launch flag is checked before the (possibly long) copy begins.
    let (mut options, mut run) = args.job.options(
        args.workspace.clone(),
        String::new(),
        String::new(),
        started,
    )?;
    copy::alloc::tune();
    let send = SendOptions::default();
    let report = copy::run(CopyOptions {
        workspace: args.workspace,
        rel_data_path: args.rel_data_path,
        part_config: args.part_config,
        ip_config: args.ip_config.clone(),
        script_folder: args.script_folder,
        access: run.access.clone(),
        send: SendOptions {
            jobs: args.jobs.map_or(send.jobs, |n| n as usize),
            retries: args.retries.unwrap_or(send.retries),
            backoff: Duration::from_millis(500),
            connections: args.connections.map_or(send.connections, |n| n as usize),
            ..send
        },
        progress: match args.progress {
            Progress::Auto => ProgressMode::Auto,
            Progress::Plain => ProgressMode::Plain,
            Progress::Quiet => ProgressMode::Quiet,
        },
        cache_path: if args.no_hash_cache {
            None
        } else {
            hashing::default_cache_path()
        },
    })
    .await?;
    if json {
        println!("{}", copy_event(&report)?);
    } else {
        // The table, without its "launch with: ..." hint: run launches by itself.
        let human = report.to_human();
        let table: Vec<&str> = human
            .lines()
            .filter(|l| !l.starts_with("launch with:"))
            .collect();
        eprintln!("{}", table.join("\n"));
    }
    if let Some(dir) = &run.log_dir {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("copy.json"), report.to_json() + "\n")?;
    }
    anyhow::ensure!(report.ok, "the copy failed; nothing was launched");
    options.part_config = report.launch.part_config.clone();
    options.ip_config = report.launch.ip_config.clone();
    run.local_ip_config = Some(args.ip_config);
    Ok((options, run))
}
