//! Whether each host already holds what `dgl-coord copy` would give it (its partition, the
//! configs), verified by digest: the agent's PrepareFiles answers that for a copy anyway.
//!
//! A PrepareFiles that finds files missing counts, on the agent, as a copy about to send them
//! for up to 30 s (`COPY_IDLE`): a launch into that workspace is refused meanwhile, as it
//! would be while a copy runs.

use std::time::Duration;

use dglrun_proto::pb;

use super::{Check, DoctorOptions, Status};
use crate::cluster::Host;
use crate::config::{IpConfig, PartConfig};
use crate::copy::hashing::{default_cache_path, hash_sources};
use crate::copy::plan::{plan, PlanInput};
use crate::copy::progress::{Progress, ProgressMode};
use crate::copy::send::manifest;

/// Per machine, the manifests of the files a copy would place there; None unless
/// `--part_config`, `--rel_data_path` and `--workspace` are all given.
pub(super) async fn expected(
    o: &DoctorOptions,
    ips: &IpConfig,
) -> anyhow::Result<Option<Vec<Vec<pb::FileManifest>>>> {
    let (Some(pc_path), Some(rel)) = (&o.part_config, &o.rel_data_path) else {
        return Ok(None);
    };
    let pc = PartConfig::load(pc_path)?;
    let p = plan(&PlanInput {
        workspace: &o.workspace,
        rel_data_path: rel,
        ip_config_path: &o.ip_config,
        ip_config: ips,
        part_config: &pc,
        scripts: None,
    })?;
    let d = hash_sources(
        &p.sources,
        default_cache_path(),
        Progress::new(ProgressMode::Quiet),
    )
    .await?;
    Ok(Some(
        p.machines
            .iter()
            .map(|m| {
                m.files
                    .iter()
                    .map(|f| manifest(&f.remote, &d.digests[f.source], f.mode))
                    .collect()
            })
            .collect(),
    ))
}

/// Longest wait for PrepareFiles: an agent whose hash cache is cold hashes the files already
/// there (about 2 GB/s), so this is past a large partition's time, and still a bound.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(120);

pub(super) async fn check(host: &Host, files: &[pb::FileManifest]) -> Check {
    let mut client = host.client.clone();
    let call = client.prepare_files(pb::PrepareFilesRequest {
        files: files.to_vec(),
    });
    let reply = match tokio::time::timeout(PREPARE_TIMEOUT, call).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(s)) => {
            return Check::bad(
                Status::Fail,
                "cannot ask",
                format!("PrepareFiles: {}", s.message()),
            )
        }
        Err(_) => {
            return Check::bad(
                Status::Fail,
                "no answer",
                format!(
                    "PrepareFiles did not answer within {} s: is the host's link or disk hung?",
                    PREPARE_TIMEOUT.as_secs()
                ),
            )
        }
    };
    let missing: Vec<&str> = reply
        .files
        .iter()
        .filter(|f| f.status != pb::FileStatus::Present as i32)
        .map(|f| f.path.as_str())
        .collect();
    if missing.is_empty() {
        return Check::ok(format!("{} files verified", files.len()));
    }
    Check::bad(
        Status::Fail,
        format!(
            "{} of {} files missing or different",
            missing.len(),
            files.len()
        ),
        format!(
            "such as {}: run dgl-coord copy with the same --workspace, --rel_data_path and \
             --part_config",
            missing
                .iter()
                .take(3)
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
}
