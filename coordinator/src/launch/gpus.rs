//! GPUs per host: asked of each host (`nvidia-smi -L` on its agent's PATH, through a probe)
//! when the launch places trainers on GPUs, and checked against the plan before anything
//! starts.

use std::time::Duration;

use super::plan::LaunchOptions;
use crate::cluster::Host;

/// `nvidia-smi -L` answers in well under a second; a hung driver must not hang the launch.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

const SCRIPT: &str = "if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L; \
                      else echo 'no nvidia-smi on the PATH'; fi";

/// Whether the launch needs the hosts' GPU counts.
pub fn needed(o: &LaunchOptions) -> bool {
    o.gpus_per_trainer.is_some() || o.trainers_from_gpus
}

/// The GPU count of every host, in rank order; fails naming each host where nvidia-smi fails.
pub async fn count_all(hosts: &[Host]) -> anyhow::Result<Vec<u32>> {
    let probes = hosts.iter().map(|h| async move {
        let out = crate::probe::run(h, ".", SCRIPT, PROBE_TIMEOUT).await?;
        if out.code != 0 {
            anyhow::bail!(
                "{}: nvidia-smi -L exited {}: {}",
                h.name(),
                out.code,
                out.stdout
                    .iter()
                    .chain(&out.stderr)
                    .last()
                    .map_or("", String::as_str)
            );
        }
        Ok(out.stdout.iter().filter(|l| l.starts_with("GPU ")).count() as u32)
    });
    let mut counts = Vec::new();
    let mut errors = Vec::new();
    for r in futures::future::join_all(probes).await {
        match r {
            Ok(n) => counts.push(n),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    anyhow::ensure!(
        errors.is_empty(),
        "cannot count the GPUs:\n  {}",
        errors.join("\n  ")
    );
    Ok(counts)
}

/// Applies the counts: `--trainers-per-host gpus` becomes one trainer per GPU; then every host
/// must have the GPUs its trainers need (`--gpus-per-trainer` × its trainers), or the launch
/// is refused naming each host that lacks them.
pub fn apply(o: &mut LaunchOptions, hosts: &[Host], gpus: &[u32]) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    if o.trainers_from_gpus {
        let per = o.gpus_per_trainer.unwrap_or(1).max(1);
        for (h, &n) in hosts.iter().zip(gpus) {
            if n < per {
                problems.push(format!(
                    "{} has {n} GPUs: --trainers-per-host gpus needs at least {per} there",
                    h.name()
                ));
            }
        }
        o.trainers_per_host = Some(gpus.iter().map(|&n| n / per).collect());
    }
    if let Some(per) = o.gpus_per_trainer {
        for (h, &n) in hosts.iter().zip(gpus) {
            let trainers = o
                .trainers_per_host
                .as_ref()
                .and_then(|c| c.get(h.rank).copied())
                .unwrap_or(o.num_trainers);
            if trainers * per > n && !(o.trainers_from_gpus && n < per) {
                problems.push(format!(
                    "{} has {n} GPUs but its {trainers} trainers need {} ({per} each, \
                     --gpus-per-trainer): give it fewer trainers or --trainers-per-host gpus",
                    h.name(),
                    trainers * per
                ));
            }
        }
    }
    anyhow::ensure!(
        problems.is_empty(),
        "cannot launch:\n  {}",
        problems.join("\n  ")
    );
    Ok(())
}
