//! dgl-coord: the command line. Each subcommand parses its flags here and hands plain options
//! to the coordinator library.

mod access;
mod copy_cmd;
mod launch_cmd;
mod ops_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Copy DGL graph partitions to dgl-agents and launch distributed DGL jobs on them, without ssh.
#[derive(Parser, Debug)]
#[command(name = "dgl-coord", version, about, long_about = None)]
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
    /// Show every agent: reachable, version, root, free disk, jobs and their processes.
    Status(ops_cmd::StatusArgs),
    /// Stop jobs on every agent by hand (all of them, or one with --job).
    Kill(ops_cmd::KillArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match launch_cmd::preprocess_args(std::env::args_os().collect()) {
        Ok(argv) => Cli::parse_from(argv),
        Err(e) => {
            eprintln!("dgl-coord: error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dgl-coord: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Copy(args) => copy_cmd::run(args).await,
            Command::Launch(args) => launch_cmd::run(args).await,
            Command::Status(args) => ops_cmd::status(args).await,
            Command::Kill(args) => ops_cmd::kill(args).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("dgl-coord: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
