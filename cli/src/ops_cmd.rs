//! `dgl-coord status` and `dgl-coord kill`: for operators.

use std::path::PathBuf;
use std::time::Duration;

use dglrun_coordinator::config::IpConfig;
use dglrun_coordinator::ops;

use crate::access::AccessArgs;

#[derive(clap::Args, Debug)]
pub(crate) struct StatusArgs {
    /// ip_config.txt listing the machines (a local file).
    #[arg(long = "ip_config", alias = "ip-config")]
    ip_config: PathBuf,

    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    access: AccessArgs,
}

#[derive(clap::Args, Debug)]
pub(crate) struct KillArgs {
    /// ip_config.txt listing the machines (a local file).
    #[arg(long = "ip_config", alias = "ip-config")]
    ip_config: PathBuf,

    /// Stop only this job (default: every job on every agent). An id no reachable agent
    /// knows is an error.
    #[arg(long)]
    job: Option<String>,

    #[command(flatten)]
    how: StopFlags,

    #[command(flatten)]
    access: AccessArgs,
}

/// How `kill` and `stop` stop, and how they report.
#[derive(clap::Args, Clone, Copy, Debug)]
pub(crate) struct StopFlags {
    /// Seconds between SIGTERM and SIGKILL.
    #[arg(long, default_value_t = 5.0)]
    grace: f64,

    /// SIGKILL at once.
    #[arg(long)]
    force: bool,

    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// A report as JSON (`--json`) or as its text, on stdout.
pub(crate) fn print_report<T: serde::Serialize>(
    json: bool,
    report: &T,
    text: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", text(report));
    }
    Ok(())
}

/// Exit 0 when every agent answered, 1 otherwise.
pub(crate) async fn status(args: StatusArgs) -> anyhow::Result<u8> {
    let ips = IpConfig::load(&args.ip_config)?;
    let hosts = ops::status(&ips, &args.access.access()?).await;
    print_report(args.json, &hosts, |h| ops::render_status(h))?;
    Ok(if hosts.iter().all(|h| h.reachable && h.error.is_none()) {
        0
    } else {
        1
    })
}

/// Exit 0 when every host was reached and every job asked for is stopped or over, 1 otherwise.
pub(crate) async fn kill(args: KillArgs) -> anyhow::Result<u8> {
    stop_jobs(
        "kill",
        &args.ip_config,
        &args.access,
        args.job.as_deref(),
        &args.how,
    )
    .await
}

/// Stops `job` (every job when None) on every machine of `ip_config` and reports per host;
/// `kill` and `stop` both. Exit 0 when every agent answered.
pub(crate) async fn stop_jobs(
    command: &str,
    ip_config: &std::path::Path,
    access: &AccessArgs,
    job: Option<&str>,
    how: &StopFlags,
) -> anyhow::Result<u8> {
    let StopFlags { grace, force, json } = *how;
    anyhow::ensure!(
        grace.is_finite() && grace >= 0.0,
        "--grace must be a number of seconds, not {grace}"
    );
    let ips = IpConfig::load(ip_config)?;
    let report = ops::kill(
        &ips,
        &access.access()?,
        job,
        Duration::from_secs_f64(grace),
        force,
    )
    .await;
    print_report(json, &report, |r| r.render())?;
    for e in &report.errors {
        eprintln!("dgl-coord {command}: {e}");
    }
    Ok(if report.ok() { 0 } else { 1 })
}
