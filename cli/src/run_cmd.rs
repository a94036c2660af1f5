//! `dgl-coord run`: `copy` then `launch` in one command, for the common case. The launch's
//! --part_config and --ip_config are where the copy put them; ip_config is read locally from
//! the file that was copied.

use std::time::Instant;

use dglrun_coordinator::copy::{self, CopyReport};
use dglrun_coordinator::launch;

use crate::copy_cmd::CopyFlags;
use crate::launch_cmd::JobArgs;

const COPY: &str = "Copy options (as dgl-coord copy)";

#[derive(clap::Args, Debug)]
#[command(after_help = "\
The copy runs first, exactly as `dgl-coord copy` (nothing is started unless every host verified
every file); then the job is launched with --part_config and --ip_config pointing at what the
copy placed in the workspace. --json prints the copy report as one `copy` event, then the
launch's events. Exit status: 1 when the copy failed, else as `dgl-coord launch`.

Example (agents started with --root ~/dglrun):
  dgl-coord run --workspace ~/dglrun/graphsage --rel_data_path data \\
    --part_config out/ogb-product.json --ip_config ip_config.txt --script_folder code \\
    --num_trainers 2 --num_servers 1 \\
    \"python3 code/train_dist.py --graph-name ogb-product --ip_config ip_config.txt\"")]
pub(crate) struct RunArgs {
    #[command(flatten, next_help_heading = COPY)]
    copy: CopyFlags,

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

pub(crate) async fn run(args: RunArgs) -> anyhow::Result<u8> {
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
        args.copy.workspace.clone(),
        String::new(),
        String::new(),
        started,
    )?;
    let local_ip_config = args.copy.ip_config.clone();
    let report = copy::run(args.copy.options(run.access.clone())).await?;
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
    run.local_ip_config = Some(local_ip_config);
    Ok((options, run))
}
