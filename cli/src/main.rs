//! dgl-coord: the command line. Each subcommand parses its flags here and hands plain options
//! to the coordinator library.

mod access;
mod argv;
mod copy_cmd;
mod detached_cmd;
mod docs_cmd;
mod doctor_cmd;
mod duration;
mod jobs_cmd;
mod launch_cmd;
mod ops_cmd;
mod rcp_cmd;
mod rsh_cmd;
mod run_cmd;
mod shims_cmd;
mod stacks_cmd;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Copy DGL graph partitions to dgl-agents and launch distributed DGL jobs on them, without ssh.
///
/// A dgl-agent runs on every host of ip_config.txt; dgl-coord reaches them at IP:47001.
#[derive(Parser, Debug)]
#[command(
    name = "dgl-coord",
    version,
    // The man page's NAME line is `dgl-coord - <about>`: the about must not name it again.
    about = "Copy DGL partitions to dgl-agents and launch DGL jobs on them, without ssh",
    after_help = "\
Typical use, with agents started as `dgl-agent --root ~/dglrun ...` (the flags are DGL's own,
see `dgl-coord <COMMAND> --help`):
  dgl-coord copy   --workspace ~/dglrun/graphsage --rel_data_path data \\
                   --part_config out/ogb-product.json --ip_config ip_config.txt --script_folder code
  dgl-coord launch --workspace ~/dglrun/graphsage --num_trainers 2 --num_servers 1 \\
                   --part_config data/ogb-product.json --ip_config ip_config.txt \\
                   \"python3 code/train_dist.py --graph-name ogb-product --ip_config ip_config.txt\"
  dgl-coord status --ip_config ip_config.txt

Exit status: 0 success; 1 failure (a host, a file or the job); 2 usage error; launch and run:
the worst exit code of a failed process (128+N for signal N), 130/143 on Ctrl-C/SIGTERM."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Copy partitions, configs and scripts to every machine (replaces DGL's copy_files.py).
    Copy(copy_cmd::CopyArgs),
    /// Start DGL servers and trainers on every machine and supervise them (replaces launch.py).
    Launch(launch_cmd::LaunchArgs),
    /// Copy, then launch what was copied: `copy` and `launch` in one command.
    Run(run_cmd::RunArgs),
    /// Show every agent: reachable, version, root, free disk, jobs and their processes.
    Status(ops_cmd::StatusArgs),
    /// Stop jobs on every agent by hand (all of them, or one with --job).
    Kill(ops_cmd::KillArgs),
    /// Print the Python stack of every process of a running job (py-spy on every host).
    Stacks(stacks_cmd::StacksArgs),
    /// Run a command on one host through its agent, with ssh's command line and exit status.
    #[command(disable_help_flag = true)]
    Rsh(RshWords),
    /// Copy files to (or one from) a host through its agent, with scp's command line.
    #[command(disable_help_flag = true)]
    Rcp(RshWords),
    /// Write `ssh` (and `scp`) executables into a directory that run over the agents.
    Shims(shims_cmd::ShimsArgs),
    /// Check every host before a launch: agent, interface, Python, GPUs, disk, ports.
    Doctor(doctor_cmd::DoctorArgs),
    /// Follow a detached job's output until it ends; Ctrl-C detaches.
    Attach(detached_cmd::AttachArgs),
    /// Wait for a detached job to end; exit with its exit code.
    Wait(detached_cmd::WaitArgs),
    /// Stop a job on every machine (as `kill --job JOB`).
    Stop(detached_cmd::StopArgs),
    /// List every job the agents keep a record of, running or finished, with its exit code.
    Jobs(jobs_cmd::JobsArgs),
    /// Print a job's output as its hosts kept it, during the job or after it (--follow).
    Logs(jobs_cmd::LogsArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(docs_cmd::CompletionsArgs),
    /// Print the man page, or write one per subcommand into a directory.
    Man(docs_cmd::ManArgs),
}

/// The words of `rsh` and `rcp`: parsed by hand, as ssh's and scp's (see `rsh_cmd`).
#[derive(clap::Args, Debug)]
struct RshWords {
    /// rsh: [dglrun options] [ssh options] [user@]HOST COMMAND...; rcp: [-r] SRC... HOST:DST
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    words: Vec<OsString>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let argv: Vec<OsString> = std::env::args_os().collect();
    let own_parser: Option<fn(Vec<OsString>) -> u8> = match argv.get(1).and_then(|a| a.to_str()) {
        Some("rsh") => Some(rsh_cmd::main),
        Some("rcp") => Some(rcp_cmd::main),
        _ => None,
    };
    if let Some(main) = own_parser {
        let code = main(argv.into_iter().skip(2).collect());
        // At once: a runtime would wait for its thread still blocked reading stdin. Every
        // write was flushed.
        std::process::exit(i32::from(code));
    }
    // clap exits 2 on a usage error (0 for --help and --version); so do our own checks.
    let cli = match argv::preprocess_args(std::env::args_os().collect()) {
        Ok(argv::Prepared::Rewritten(argv)) => Cli::parse_from(argv),
        Ok(argv::Prepared::Verbatim(argv)) => {
            argv::parse_verbatim(argv).unwrap_or_else(|e| e.exit())
        }
        Err(e) => {
            eprintln!("dgl-coord: error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        // These need no runtime.
        Command::Completions(args) => docs_cmd::completions(args),
        Command::Man(args) => docs_cmd::man(args),
        Command::Shims(args) => shims_cmd::run(args),
        Command::Rsh(words) => std::process::exit(i32::from(rsh_cmd::main(words.words))),
        Command::Rcp(words) => std::process::exit(i32::from(rcp_cmd::main(words.words))),
        command => match tokio::runtime::Runtime::new() {
            Ok(runtime) => runtime.block_on(run(command)),
            Err(e) => Err(anyhow::anyhow!("cannot start the async runtime: {e}")),
        },
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("dgl-coord: error: {e:#}");
            if e.downcast_ref::<launch_cmd::UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Copy(args) => copy_cmd::run(args).await,
        Command::Launch(args) => launch_cmd::run(args).await,
        Command::Run(args) => run_cmd::run(args).await,
        Command::Status(args) => ops_cmd::status(args).await,
        Command::Kill(args) => ops_cmd::kill(args).await,
        Command::Stacks(args) => stacks_cmd::run(args).await,
        Command::Doctor(args) => doctor_cmd::run(args).await,
        Command::Attach(args) => detached_cmd::attach(args).await,
        Command::Wait(args) => detached_cmd::wait(args).await,
        Command::Stop(args) => detached_cmd::stop(args).await,
        Command::Jobs(args) => jobs_cmd::jobs(args).await,
        Command::Logs(args) => jobs_cmd::logs(args).await,
        Command::Completions(args) => docs_cmd::completions(args),
        Command::Man(args) => docs_cmd::man(args),
        // Both run before any runtime starts (see main).
        Command::Rsh(_) | Command::Rcp(_) | Command::Shims(_) => {
            anyhow::bail!("rsh and shims run without the async runtime")
        }
    }
}
