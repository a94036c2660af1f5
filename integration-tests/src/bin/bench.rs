//! The benchmark suite. Sets up its own agents on loopback addresses, runs every
//! figure several times and prints min/median/max, ratios against baselines measured in the
//! same run, and a pass/fail table.
//!
//!     cargo build --release --bins
//!     cargo run --release -p dglrun-integration-tests --bin bench -- [WHICH...] [OPTIONS]
//!
//! WHICH: launch, teardown, scale, copy, broadcast, compress, links, rsh, logs (default: all).
//! Options:
//! --reps N (5), --size-gib G (copy set, 2), --bcast-gib G (1), --bcast-hosts 1,4,16, --dir DIR
//! (agent roots and generated data for copy/broadcast/compress/links; default /dev/shm),
//! --scale-agents N (256), --link-mbit M (links: the hosts' rate, 1000), --link-mib M (links:
//! each of the 4 partitions, 256), --rsh-mib N (stream size of the rsh throughput, 256),
//! --logs-mib N (the finished job's output `logs` reads back, 1024), --logs-rate N (lines a
//! second the job prints while the agent's cost is measured, 100000), --links-only abc (the
//! scenarios of `links` to run, all three), --no-ssh.

// Test code throughout: a failed unwrap is a failed test, and a test may set its own
// environment and sleep.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dglrun_integration_tests::bench::{self, Opts, Row};

fn main() -> Result<()> {
    // Namespaces of `compress` and `links` go on Ctrl-C too.
    dglrun_integration_tests::netns::delete_on_signal()?;
    let mut opts = Opts {
        reps: 5,
        size_gib: 2.0,
        bcast_gib: 1.0,
        bcast_hosts: vec![1, 4, 16],
        dir: PathBuf::from(if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        }),
        scale_agents: 256,
        link_mbit: 1000,
        link_mib: 256,
    };
    let mut which: Vec<String> = Vec::new();
    let mut ssh = true;
    let mut rsh_mib = 256usize;
    let mut logs_mib = 1024u64;
    let mut logs_rate = 100_000u64;
    let mut links_only = String::from("abc");
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--reps" => opts.reps = value()?.parse::<usize>()?.max(1),
            "--size-gib" => opts.size_gib = value()?.parse()?,
            "--bcast-gib" => opts.bcast_gib = value()?.parse()?,
            "--bcast-hosts" => {
                opts.bcast_hosts = value()?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<_, _>>()?
            }
            "--dir" => opts.dir = PathBuf::from(value()?),
            "--scale-agents" => opts.scale_agents = value()?.parse::<usize>()?.clamp(1, 1000),
            "--link-mbit" => opts.link_mbit = value()?.parse::<u64>()?.clamp(1, 10_000),
            "--link-mib" => opts.link_mib = value()?.parse::<u64>()?.max(1),
            "--links-only" => links_only = value()?,
            "--no-ssh" => ssh = false,
            "--rsh-mib" => rsh_mib = value()?.parse::<usize>()?.max(1),
            "--logs-mib" => logs_mib = value()?.parse::<u64>()?.max(1),
            "--logs-rate" => logs_rate = value()?.parse::<u64>()?.max(100),
            "-h" | "--help" => {
                println!(
                    "bench [launch|teardown|scale|copy|broadcast|compress|links|rsh|logs...] \
                     [--reps N] [--size-gib G] [--bcast-gib G] [--bcast-hosts 1,4,16] [--dir DIR] \
                     [--scale-agents N] [--link-mbit M] [--link-mib M] [--rsh-mib N] \
                     [--logs-mib N] [--logs-rate N] [--links-only abc] [--no-ssh]"
                );
                return Ok(());
            }
            w @ ("launch" | "teardown" | "scale" | "copy" | "broadcast" | "compress" | "links"
            | "rsh" | "logs") => which.push(w.into()),
            other => bail!("unknown argument {other} (try --help)"),
        }
    }
    if which.is_empty() {
        which = [
            "launch",
            "teardown",
            "scale",
            "copy",
            "broadcast",
            "compress",
            "links",
            "rsh",
            "logs",
        ]
        .map(String::from)
        .to_vec();
    }
    bench::release_bin("dgl-agent")?;
    bench::release_bin("dgl-coord")?;
    // Agent roots made by the test harness go into temp dirs: put them under --dir.
    std::env::set_var("TMPDIR", &opts.dir);
    let has = |w: &str| which.iter().any(|x| x == w);
    let mut rows: Vec<Row> = Vec::new();
    if has("launch") || has("teardown") {
        match bench::launch::run(&opts, has("launch"), ssh && has("launch"), has("teardown")) {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(Row::error("launch", &e)),
        }
    }
    if has("scale") {
        match bench::scale::run(&opts) {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(Row::error("scale", &e)),
        }
    }
    if has("copy") || has("broadcast") {
        match bench::copy::run(&opts, has("copy"), ssh, has("broadcast")) {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(Row::error("copy", &e)),
        }
    }
    if has("compress") {
        match bench::compress::run(&opts) {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(Row::error("compress", &e)),
        }
    }
    if has("links") {
        match bench::links::run(&opts, opts.link_mbit, opts.link_mib, ssh, &links_only) {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(Row::error("links", &e)),
        }
    }
    if has("rsh") {
        match bench::rsh::run(&opts, ssh, rsh_mib) {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(Row::error("rsh", &e)),
        }
    }
    if has("logs") {
        match bench::logs::run(&opts, logs_mib, logs_rate) {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(Row::error("logs", &e)),
        }
    }
    println!();
    println!(
        "dglrun bench: {} reps, {} CPUs; loopback and local namespaces only; shared machine, \
         figures are noisy",
        opts.reps,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    bench::print_table(&rows);
    Ok(())
}
