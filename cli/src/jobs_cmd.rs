//! `dgl-coord jobs` and `dgl-coord logs`: what the hosts keep of jobs, running or finished.

use std::path::PathBuf;

use dglrun_coordinator::config::IpConfig;
use dglrun_coordinator::job_history;
use dglrun_coordinator::job_logs::{self, LogsOptions};
use dglrun_proto::pb::OutputStream;

use crate::access::AccessArgs;

#[derive(clap::Args, Debug)]
pub(crate) struct JobsArgs {
    /// ip_config.txt listing the machines (a local file).
    #[arg(long = "ip_config", alias = "ip-config")]
    ip_config: PathBuf,

    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    access: AccessArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Stream {
    Stdout,
    Stderr,
}

#[derive(clap::Args, Debug)]
pub(crate) struct LogsArgs {
    /// The job's id (as `launch` printed it, or `dgl-coord jobs` lists it).
    job: String,

    /// ip_config.txt listing the machines (a local file).
    #[arg(long = "ip_config", alias = "ip-config")]
    ip_config: PathBuf,

    /// Keep printing new lines until the job has ended on every host.
    #[arg(long, short = 'f')]
    follow: bool,

    /// Only this machine (its line in ip_config, from 0).
    #[arg(long, value_name = "M")]
    machine: Option<usize>,

    /// Only the process with this label (server0, trainer1, trainers); may be repeated.
    #[arg(long, value_name = "LABEL")]
    process: Vec<String>,

    /// Only this stream.
    #[arg(long, value_enum)]
    stream: Option<Stream>,

    /// Only the last N lines of each process's stream.
    #[arg(long, value_name = "N")]
    tail: Option<u64>,

    /// Print JSON events (as `launch --json` does) instead of labelled text.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    access: AccessArgs,
}

/// Exit 0 when every agent answered, 1 otherwise.
pub(crate) async fn jobs(args: JobsArgs) -> anyhow::Result<u8> {
    let ips = IpConfig::load(&args.ip_config)?;
    let report = job_history::jobs(&ips, &args.access.access()?).await;
    crate::ops_cmd::print_report(args.json, &report, job_history::render)?;
    Ok(if report.unreachable.is_empty() { 0 } else { 1 })
}

/// Exit 0 when every host asked was read, 1 otherwise (or when no host knows the job).
pub(crate) async fn logs(args: LogsArgs) -> anyhow::Result<u8> {
    let ips = IpConfig::load(&args.ip_config)?;
    let opts = LogsOptions {
        job: args.job,
        machine: args.machine,
        labels: args.process,
        stream: args.stream.map(|s| match s {
            Stream::Stdout => OutputStream::Stdout,
            Stream::Stderr => OutputStream::Stderr,
        }),
        tail: args.tail.unwrap_or(0),
        follow: args.follow,
        json: args.json,
    };
    job_logs::logs(&ips, &args.access.access()?, &opts).await
}
