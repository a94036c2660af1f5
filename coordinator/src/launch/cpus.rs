//! Each host's usable CPUs (`--num_omp_threads host`), asked of the host through a probe: the
//! CPUs its processes may run on (affinity, as `nproc` counts them), capped by the CPU quota
//! (`cpu.max`) of its cgroup v2 and every ancestor.

use std::time::Duration;

use crate::cluster::Host;

const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

const SCRIPT: &str = r#"n=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
cg=$(sed -n 's/^0:://p' /proc/self/cgroup 2>/dev/null)
d=/sys/fs/cgroup$cg
while :; do
  if [ -r "$d/cpu.max" ] && read -r q p <"$d/cpu.max" && [ "$q" != max ] && [ "$p" -gt 0 ]; then
    c=$(( (q + p - 1) / p ))
    [ "$c" -lt "$n" ] && n=$c
  fi
  [ "$d" = /sys/fs/cgroup ] || [ -z "$d" ] && break
  d=${d%/*}
done
echo "dglrun-cpus $n""#;

/// Usable CPUs of every host, in rank order; fails naming each host that did not say.
pub async fn count_all(hosts: &[Host]) -> anyhow::Result<Vec<u32>> {
    let probes = hosts.iter().map(|h| async move {
        let out = crate::probe::run(h, ".", SCRIPT, PROBE_TIMEOUT).await?;
        out.stdout
            .iter()
            .find_map(|l| l.strip_prefix("dglrun-cpus ")?.trim().parse::<u32>().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: cannot count its usable CPUs (exit {}): {}",
                    h.name(),
                    out.code,
                    out.stderr.last().map_or("no output", String::as_str)
                )
            })
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
        "--num_omp_threads host:\n  {}",
        errors.join("\n  ")
    );
    Ok(counts)
}
