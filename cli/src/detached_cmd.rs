//! `dgl-coord attach`, `wait` and `stop`: a detached job (`launch --detach`) from any shell.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use dglrun_coordinator::config::IpConfig;
use dglrun_coordinator::{attach, detached};

use crate::access::AccessArgs;

#[derive(clap::Args, Debug)]
pub(crate) struct WaitArgs {
    /// The job id `launch --detach` printed.
    job: String,

    /// ip_config.txt listing the machines (a local file); machine 0's agent supervises the job.
    #[arg(long = "ip_config", alias = "ip-config")]
    ip_config: PathBuf,

    /// Print the outcome as JSON on stdout instead of the job's closing text on stderr.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    access: AccessArgs,
}

#[derive(clap::Args, Debug)]
pub(crate) struct StopArgs {
    /// The job to stop.
    job: String,

    /// ip_config.txt listing the machines (a local file).
    #[arg(long = "ip_config", alias = "ip-config")]
    ip_config: PathBuf,

    #[command(flatten)]
    how: crate::ops_cmd::StopFlags,

    #[command(flatten)]
    access: AccessArgs,
}

#[derive(clap::Args, Debug)]
pub(crate) struct AttachArgs {
    /// The job id `launch --detach` printed.
    job: String,

    /// ip_config.txt listing the machines (a local file).
    #[arg(long = "ip_config", alias = "ip-config")]
    ip_config: PathBuf,

    /// Print every line the agents still hold (up to 100,000 lines or 32 MiB per host), not
    /// only the lines from now on.
    #[arg(long = "from-start")]
    from_start: bool,

    /// Ctrl-C stops the job (on every machine) instead of detaching from it.
    #[arg(long = "stop-on-interrupt")]
    stop_on_interrupt: bool,

    /// Seconds between SIGTERM and SIGKILL with --stop-on-interrupt.
    #[arg(long, default_value_t = 5.0)]
    grace: f64,

    #[command(flatten)]
    access: AccessArgs,
}

/// The job's output until it ends (its exit code), or until Ctrl-C (130; the job runs on).
pub(crate) async fn attach(args: AttachArgs) -> anyhow::Result<u8> {
    anyhow::ensure!(
        args.grace.is_finite() && args.grace >= 0.0,
        "--grace must be a number of seconds, not {}",
        args.grace
    );
    let ips = IpConfig::load(&args.ip_config)?;
    let o = attach::AttachOptions {
        job_id: args.job,
        from_start: args.from_start,
        stop_on_interrupt: args.stop_on_interrupt,
        grace: Duration::from_secs_f64(args.grace),
    };
    attach::attach(&ips, &args.access.access()?, o).await
}

/// Exits with the job's own exit code once it is over.
pub(crate) async fn wait(args: WaitArgs) -> anyhow::Result<u8> {
    let ips = IpConfig::load(&args.ip_config)?;
    let r = detached::wait(&ips, &args.access.access()?, &args.job).await?;
    let code = u8::try_from(r.exit_code).unwrap_or(1);
    if args.json {
        let doc = serde_json::json!({
            "job_id": args.job,
            "outcome": r.outcome,
            "exit_code": code,
            "started_unix_ms": r.started_unix_ms,
            "ended_unix_ms": r.ended_unix_ms,
            "text": r.text,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        let shown = dglrun_coordinator::launch::output::escape_controls(r.text.as_bytes(), true);
        let _ = std::io::stderr().lock().write_all(&shown);
    }
    Ok(code)
}

/// `kill --job JOB`: every host stops its part; the supervising agent records the stop.
pub(crate) async fn stop(args: StopArgs) -> anyhow::Result<u8> {
    crate::ops_cmd::stop_jobs(
        "stop",
        &args.ip_config,
        &args.access,
        Some(&args.job),
        &args.how,
    )
    .await
}
