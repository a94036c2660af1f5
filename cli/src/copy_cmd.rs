//! `dgl-coord copy`: the flags of DGL's copy_files.py.

#[derive(clap::Args, Debug)]
pub struct CopyArgs {}

pub async fn run(_args: CopyArgs) -> anyhow::Result<u8> {
    anyhow::bail!("not implemented")
}
