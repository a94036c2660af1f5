//! `dgl-coord doctor`: checks every host before a launch.

use std::path::PathBuf;

use dglrun_coordinator::doctor::{self, DoctorOptions};

use crate::access::AccessArgs;

#[derive(clap::Args, Debug)]
pub(crate) struct DoctorArgs {
    /// ip_config.txt listing the machines (a local file).
    #[arg(long = "ip_config", alias = "ip-config")]
    ip_config: PathBuf,

    /// The partition config (a local file): each host's free space in its root and in
    /// /dev/shm is checked against the partition it will load.
    #[arg(long = "part_config", alias = "part-config")]
    part_config: Option<PathBuf>,

    /// Where the probe runs on every host, relative to the agent root (default: the root);
    /// with --part_config and --rel_data_path, the workspace `dgl-coord copy` filled.
    #[arg(long, default_value = ".")]
    workspace: String,

    /// As given to `dgl-coord copy`: with --part_config, each host's files (its partition,
    /// the configs) are verified by digest where that copy put them.
    #[arg(
        long = "rel_data_path",
        alias = "rel-data-path",
        requires = "part_config"
    )]
    rel_data_path: Option<String>,

    /// The Python interpreter the job would use.
    #[arg(long, default_value = "python3")]
    python: String,

    /// Shell text run before the probe, in the same shell (e.g. 'source /opt/conda/bin/activate dgl').
    #[arg(long)]
    setup: Option<String>,

    /// DGL servers per machine: ports PORT .. PORT+N-1 of each ip_config line must be free.
    #[arg(long = "num_servers", alias = "num-servers", default_value_t = 1)]
    num_servers: u32,

    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    access: AccessArgs,
}

/// Exit 0 when no check failed (warnings allowed), 1 otherwise.
pub(crate) async fn run(args: DoctorArgs) -> anyhow::Result<u8> {
    let o = DoctorOptions {
        ip_config: args.ip_config,
        part_config: args.part_config,
        workspace: args.workspace,
        python: args.python,
        setup: args.setup,
        num_servers: args.num_servers,
        rel_data_path: args.rel_data_path,
    };
    let reports = doctor::run(&o, &args.access.access()?).await?;
    crate::ops_cmd::print_report(args.json, &reports, |r| doctor::table::render(r))?;
    Ok(if reports.iter().any(|r| r.failed()) {
        1
    } else {
        0
    })
}
