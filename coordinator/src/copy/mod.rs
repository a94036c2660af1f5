//! dgl-coord copy: DGL's copy_files.py, verified, resumable and parallel.
//!
//! `plan` decides what goes where (pure), `scripts` lists the script folder, `hashing` digests
//! the local files once (with a cache across runs), `send` drives the agents (`reader` fans
//! each file out to every host that needs it), `progress` and `summary` report.
//!
//! Order matters: every input is checked and every agent reached and asked (PrepareFiles,
//! free disk) before the first byte is written anywhere, so bad input changes nothing.

pub mod alloc;
pub mod budget;
pub mod connections;
pub mod hashing;
pub mod plan;
pub mod progress;
mod put_wire;
pub mod reader;
pub mod retry;
pub mod scripts;
pub mod send;
pub mod summary;
mod tally;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use crate::cluster::{self, AgentAccess};
use crate::config::{IpConfig, PartConfig};
pub use progress::{Progress, ProgressMode};
pub use reader::Compression;
pub use send::SendOptions;
pub use summary::{CopyReport, FileOutcome, HostReport};

/// Everything `dgl-coord copy` was asked.
#[derive(Clone, Debug)]
pub struct CopyOptions {
    /// Workspace on the hosts: relative to each agent's root, or absolute inside it.
    pub workspace: String,
    /// Where the partitions go, relative to the workspace.
    pub rel_data_path: String,
    /// Local partition config JSON.
    pub part_config: PathBuf,
    /// Local ip_config.txt.
    pub ip_config: PathBuf,
    /// Local folder copied to `<workspace>/<its name>`.
    pub script_folder: Option<PathBuf>,
    pub access: AgentAccess,
    pub send: SendOptions,
    pub progress: ProgressMode,
    /// Hash cache of the local files; `None` disables it.
    pub cache_path: Option<PathBuf>,
}

/// Ctrl-C before the first byte was sent: nothing changed on any host.
#[derive(Debug, thiserror::Error)]
#[error("interrupted before anything was sent: no host was changed")]
pub struct InterruptedBeforeSending;

/// A copy that runs to its end.
pub async fn run(opts: CopyOptions) -> anyhow::Result<CopyReport> {
    run_until(opts, None).await
}

/// Resolves once `rx` turns true; never when there is none or its sender is gone.
pub(crate) async fn interrupted(rx: Option<tokio::sync::watch::Receiver<bool>>) {
    if let Some(mut rx) = rx {
        if rx.wait_for(|v| *v).await.is_ok() {
            return;
        }
    }
    std::future::pending::<()>().await
}

/// A copy that stops when `interrupt` turns true (Ctrl-C): before sending, with
/// [`InterruptedBeforeSending`]; while sending, with a report whose `interrupted` is set and
/// whose unfinished files are [`FileOutcome::Interrupted`] (their partial files stay on the
/// hosts, and a rerun resumes them).
pub async fn run_until(
    opts: CopyOptions,
    interrupt: Option<tokio::sync::watch::Receiver<bool>>,
) -> anyhow::Result<CopyReport> {
    let started = Instant::now();
    let (ip, plan) = inputs(&opts)?;
    let progress = Progress::new(opts.progress);
    let ready = before_sending(&opts, &ip, &plan, &progress, started);
    let (reached, digests, further) = tokio::select! {
        r = ready => r?,
        () = interrupted(interrupt.clone()) => return Err(InterruptedBeforeSending.into()),
    };

    // 4. Check disk, send, verify.
    let hosts = send::send(
        &plan,
        &digests,
        reached,
        send::Connections::Opening(further),
        opts.send.clone(),
        progress,
        interrupt,
    )
    .await?;
    Ok(report(&opts, &plan, hosts, digests.stats, started))
}

/// 1. Inputs, all checked before any host is contacted.
fn inputs(opts: &CopyOptions) -> anyhow::Result<(IpConfig, plan::CopyPlan)> {
    // These errors already say what failed and why; `one_line` keeps anyhow from printing
    // their source a second time.
    let ip = IpConfig::load(&opts.ip_config).map_err(one_line)?;
    let pc = PartConfig::load(&opts.part_config).map_err(one_line)?;
    let scripts = opts
        .script_folder
        .as_deref()
        .map(scripts::scan)
        .transpose()
        .map_err(one_line)?;
    let plan = plan::plan(&plan::PlanInput {
        workspace: &opts.workspace,
        rel_data_path: &opts.rel_data_path,
        ip_config_path: &opts.ip_config,
        ip_config: &ip,
        part_config: &pc,
        scripts: scripts.as_ref(),
    })?;
    hashing::check_sources(&plan.sources, &opts.part_config)?;
    Ok((ip, plan))
}

/// Steps 2 and 3: a connection to every agent first, so that an unreachable one fails fast
/// (each host's further connections open meanwhile); then at once every agent's Hello and the
/// local files' digests, and as soon as those are known, PrepareFiles to every host. With the
/// digests cached, PrepareFiles goes out on each connection alongside Hello (it carries the
/// token and version checks too): one round trip fewer before the first byte. A failed Hello
/// ends the copy without waiting for the hashing.
async fn before_sending(
    opts: &CopyOptions,
    ip: &IpConfig,
    plan: &plan::CopyPlan,
    progress: &std::sync::Arc<Progress>,
    started: Instant,
) -> anyhow::Result<(send::Reached, hashing::Digests, connections::Further)> {
    let addrs: Vec<_> = ip
        .machines
        .iter()
        .map(|m| std::net::SocketAddr::new(m.ip, opts.access.port))
        .collect();
    let further = connections::Further::open(&addrs, &opts.access, opts.send.connections);
    let opened = cluster::open_all(ip, &opts.access)
        .await
        .context("nothing was sent to any host")?;
    let clients: Vec<cluster::Client> = opened.iter().map(|o| o.client.clone()).collect();
    let hellos = async {
        let hosts = cluster::hello_all(opened)
            .await
            .context("nothing was sent to any host")?;
        tracing::debug!(
            "every agent answered Hello {:?} after start",
            started.elapsed()
        );
        anyhow::Ok(hosts)
    };
    let prepared = async {
        let digests =
            hashing::hash_sources(&plan.sources, opts.cache_path.clone(), progress.clone()).await?;
        tracing::debug!("hashed {:?} after start", started.elapsed());
        let manifests = send::manifests(plan, &digests.digests);
        let prepared = send::prepare_each(&clients, &manifests).await;
        anyhow::Ok((digests, prepared))
    };
    tokio::pin!(hellos, prepared);
    let (hosts, (digests, prepared)) = tokio::select! {
        h = &mut hellos => (h?, prepared.await?),
        p = &mut prepared => {
            let p = p?;
            (hellos.await?, p)
        }
    };
    let reached = send::Reached {
        hosts,
        prepared: Some(prepared),
    };
    Ok((reached, digests, further))
}

/// 5. What the copy did, for the report.
fn report(
    opts: &CopyOptions,
    plan: &plan::CopyPlan,
    hosts: Vec<HostReport>,
    hashing: hashing::HashStats,
    started: Instant,
) -> CopyReport {
    let ok = hosts.iter().all(HostReport::ok);
    let interrupted = hosts
        .iter()
        .flat_map(|h| &h.files)
        .any(|f| f.status == FileOutcome::Interrupted);
    let bytes_sent = hosts.iter().map(|h| h.bytes_sent).sum();
    let wire_bytes = hosts.iter().map(|h| h.wire_bytes).sum();
    CopyReport {
        ok,
        interrupted,
        hosts,
        bytes_sent,
        wire_bytes,
        compression: opts.send.compression,
        seconds: started.elapsed().as_secs_f64(),
        hashing,
        launch: summary::LaunchHint {
            workspace: opts.workspace.clone(),
            part_config: plan.launch_part_config.clone(),
            ip_config: plan.launch_ip_config.clone(),
        },
    }
}

fn one_line(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::msg(e.to_string())
}
