//! `dgl-coord copy`: the flags of DGL's copy_files.py, plus dglrun's own.

use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;
use dglrun_coordinator::copy::{
    self, hashing, Compression, CopyOptions, ProgressMode, SendOptions,
};
use dglrun_proto::compress;

use dglrun_coordinator::cluster::AgentAccess;

use crate::access::AccessArgs;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum Progress {
    /// A bar when stderr is a terminal, plain lines otherwise.
    Auto,
    /// One line per finished file and a status line every 5 s.
    Plain,
    /// Nothing but errors and the summary.
    Quiet,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum Compress {
    /// Chunks travel as they are.
    None,
    /// Each chunk is zstd-compressed (once, however many hosts get it).
    Zstd,
}

/// DGL's copy_files.py flags keep their names; kebab-case spellings work too.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Placement (under each agent's root; (all): on every machine):
  <workspace>/<ip_config name>                      ip_config (all)
  <workspace>/<rel_data_path>/<part_config name>    part_config (all), its paths rewritten relative
                                                    to its own directory, as DGL resolves them
  <workspace>/<rel_data_path>/<name>                node_map / edge_map .npy files (old DGL) (all)
  <workspace>/<rel_data_path>/part<i>/<name>        every file named under part-<i>, machine i only
  <workspace>/<script_folder name>/...              the script folder, modes kept (all)

Symlinks in the script folder are followed and copied as the files they point to (as scp -r
does); a dangling link or a link loop is refused, naming it.

Files already on a host with the same size and SHA-256 are not sent again; a transfer cut off
midway resumes from its last verified chunk (a hidden `.<name>.dglrun-partial` beside the file).
Exit status: 0 only if every host verified every file; 130 after Ctrl-C, which prints what each
host kept (a rerun resumes). A local file that changes during the copy fails at once, named.

Example:
  dgl-coord copy --workspace ~/dglrun/graphsage --rel_data_path data \\
    --part_config out/ogb-product.json --ip_config ip_config.txt --script_folder code")]
pub(crate) struct CopyArgs {
    #[command(flatten)]
    copy: CopyFlags,

    #[command(flatten)]
    access: AccessArgs,

    /// Print the summary as JSON on stdout (per host and per file).
    #[arg(long)]
    json: bool,
}

/// What to copy and how: the flags `copy` and `run` share.
#[derive(clap::Args, Debug)]
pub(crate) struct CopyFlags {
    /// Workspace on every host: relative to the agent's root, or absolute inside it.
    #[arg(long, value_name = "DIR")]
    pub workspace: String,

    /// Where the partitions go, relative to the workspace.
    #[arg(
        long = "rel_data_path",
        visible_alias = "rel-data-path",
        value_name = "DIR"
    )]
    rel_data_path: String,

    /// The partition config JSON written by dgl.distributed.partition_graph (local path).
    #[arg(
        long = "part_config",
        visible_alias = "part-config",
        value_name = "FILE"
    )]
    part_config: PathBuf,

    /// ip_config.txt: one machine a line, `IP [PORT]` (local path).
    #[arg(long = "ip_config", visible_alias = "ip-config", value_name = "FILE")]
    pub ip_config: PathBuf,

    /// Folder of training scripts, copied to <workspace>/<its name> on every machine.
    #[arg(
        long = "script_folder",
        visible_alias = "script-folder",
        value_name = "DIR"
    )]
    script_folder: Option<PathBuf>,

    /// Files in flight per host.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=32))]
    jobs: u32,

    /// Further attempts for a transfer whose agent dropped (backoff 0.5 s, doubling up to 10 s, jittered).
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=20))]
    retries: u32,

    /// HTTP/2 connections per host over which the transfers are spread.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    connections: u32,

    /// Progress display on stderr.
    #[arg(long, value_enum, default_value_t = Progress::Auto)]
    progress: Progress,

    /// Hash every local file again instead of trusting the hash cache.
    #[arg(long = "no-hash-cache")]
    no_hash_cache: bool,

    /// Compress chunks on the wire. `zstd` pays on links slower than this host compresses
    /// (measured on 2 cores: ~300 MB/s, so 1 Gbit/s and below) when the partitions compress
    /// (graph structure, sparse or low-precision features); on loopback or a fast LAN it costs
    /// CPU and time. A chunk that does not shrink by 3% is sent as it is, so random or already
    /// compressed data costs the agents nothing.
    #[arg(long, value_enum, value_name = "ALGO", default_value_t = Compress::None)]
    compress: Compress,

    /// zstd level for --compress zstd, 1 (fastest) to 19 (smallest).
    #[arg(
        long = "compress-level",
        value_name = "N",
        default_value_t = compress::DEFAULT_LEVEL,
        value_parser = level_parser(),
        requires = "compress"
    )]
    compress_level: i32,
}

/// `--compress-level`: the levels the protocol crate allows.
fn level_parser() -> clap::builder::RangedI64ValueParser<i32> {
    let (lo, hi) = (*compress::LEVELS.start(), *compress::LEVELS.end());
    clap::value_parser!(i32).range(i64::from(lo)..=i64::from(hi))
}

impl CopyFlags {
    /// The copy's options; also tunes the allocator for streaming, so call it once per copy.
    pub(crate) fn options(self, access: AgentAccess) -> CopyOptions {
        copy::alloc::tune();
        CopyOptions {
            workspace: self.workspace,
            rel_data_path: self.rel_data_path,
            part_config: self.part_config,
            ip_config: self.ip_config,
            script_folder: self.script_folder,
            access,
            send: SendOptions {
                jobs: self.jobs as usize,
                retries: self.retries,
                backoff: Duration::from_millis(500),
                connections: self.connections as usize,
                compression: match self.compress {
                    Compress::None => Compression::None,
                    Compress::Zstd => Compression::Zstd {
                        level: self.compress_level,
                    },
                },
                ..SendOptions::default()
            },
            progress: match self.progress {
                Progress::Auto => ProgressMode::Auto,
                Progress::Plain => ProgressMode::Plain,
                Progress::Quiet => ProgressMode::Quiet,
            },
            cache_path: if self.no_hash_cache {
                None
            } else {
                hashing::default_cache_path()
            },
        }
    }
}

/// Exit status after Ctrl-C, as a shell reports a SIGINT death.
const EXIT_INTERRUPTED: u8 = 130;

pub(crate) async fn run(args: CopyArgs) -> anyhow::Result<u8> {
    let opts = args.copy.options(args.access.access()?);
    // Ctrl-C stops the transfers where they are; the report then says what each host kept.
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = tx.send(true);
        }
    });
    let report = match copy::run_until(opts, Some(rx)).await {
        Ok(r) => r,
        Err(e) if e.is::<copy::InterruptedBeforeSending>() => {
            eprintln!("{e}; rerun the same command to copy");
            return Ok(EXIT_INTERRUPTED);
        }
        Err(e) => return Err(e),
    };
    if args.json {
        println!("{}", report.to_json());
    } else if !report.interrupted {
        print!("{}", report.to_human());
    }
    if report.interrupted {
        eprint!("{}", report.kept());
        return Ok(EXIT_INTERRUPTED);
    }
    Ok(if report.ok { 0 } else { 1 })
}
