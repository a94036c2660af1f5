//! `dgl-coord launch`: the flags of DGL's launch.py.

use std::ffi::OsString;

#[derive(clap::Args, Debug)]
pub struct LaunchArgs {}

/// Rewrites argv before clap sees it (DGL's `--extra_envs K=V...` ends at the first word
/// that is not `K=V`). Returns a clear message for arguments clap cannot explain well.
pub fn preprocess_args(argv: Vec<OsString>) -> Result<Vec<OsString>, String> {
    Ok(argv)
}

pub async fn run(_args: LaunchArgs) -> anyhow::Result<u8> {
    anyhow::bail!("not implemented")
}
