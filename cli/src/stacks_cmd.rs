//! `dgl-coord stacks`: the Python stack of every process of a running job.

use std::path::PathBuf;

use dglrun_coordinator::config::IpConfig;
use dglrun_coordinator::stacks;

use crate::access::AccessArgs;

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Each agent runs `py-spy dump --pid P` on every Python process of the job: servers, trainers
(torchrun's workers too) and their samplers, labelled as the launch labels them. py-spy must be
on the agent's PATH on every host (pip install py-spy). `dgl-coord status` lists the jobs.

Exit status: 0 when every host answered and every process was dumped; 1 otherwise (a host
unreachable or without py-spy, a dump that failed, a job no agent knows).")]
pub(crate) struct StacksArgs {
    /// The job's id, as `dgl-coord launch` prints it and `dgl-coord status` lists it.
    job: String,

    /// ip_config.txt listing the machines (a local file).
    #[arg(long = "ip_config", alias = "ip-config")]
    ip_config: PathBuf,

    /// Native (C/C++) frames too (`py-spy dump --native`).
    #[arg(long)]
    native: bool,

    /// One JSON object per process, one a line, instead of text.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    access: AccessArgs,
}

pub(crate) async fn run(args: StacksArgs) -> anyhow::Result<u8> {
    let ips = IpConfig::load(&args.ip_config)?;
    let report = stacks::dump_cluster(&ips, &args.access.access()?, &args.job, args.native).await;
    if args.json {
        print!("{}", report.render_json_lines());
    } else {
        print!("{}", report.render_text());
    }
    for e in &report.errors {
        eprintln!("dgl-coord stacks: {e}");
    }
    Ok(if report.ok() { 0 } else { 1 })
}
