//! Link speeds: a token bucket (`tc ... tbf`) where packets leave each end of a link, so both
//! directions are shaped: a host's `eth0` shapes what it sends, its port on the switch what it
//! gets.

use std::process::Command;

use anyhow::{ensure, Context, Result};

/// The kernel's timer frequency here (CONFIG_HZ=250); elsewhere up to 1000, which a burst sized
/// for 250 also covers.
const HZ: u64 = 250;

/// `tc qdisc replace dev DEV root tbf` at `mbit` Mbit/s in namespace `ns`.
pub(super) fn shape(ns: &str, dev: &str, mbit: u64) -> Result<()> {
    let bytes_per_sec = mbit * 1_000_000 / 8;
    // The bucket holds what the link sends in one timer tick: a smaller one empties between
    // two ticks and the link idles below its rate (1 Gbit/s: 500 KB). At least 128 KiB, above
    // the 64 KiB packets veth passes whole with segmentation offload, so tbf never splits them.
    let burst = (bytes_per_sec / HZ).max(128 << 10);
    let args = [
        "netns",
        "exec",
        ns,
        "tc",
        "qdisc",
        "replace",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        &format!("{mbit}mbit"),
        "burst",
        &burst.to_string(),
        // What may queue behind the bucket: 20 ms at the rate, the buffer of a switch port.
        "latency",
        "20ms",
    ];
    let out = Command::new("ip").args(args).output().context("run tc")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
