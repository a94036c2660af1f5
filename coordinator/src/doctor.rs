//! `dgl-coord doctor`: checks every host of an ip_config at once, before a job wastes an hour
//! on it, and says what to do about each failure. One row per host, one column per check.
//!
//! What the agent knows comes from its Hello (version, clock, interfaces, free space of its
//! root); the rest from one probe process per host (`probe`), run as a job would run: the
//! GPUs on its PATH, /dev/shm, who listens on DGL's server ports, the Python the job would use.

pub mod cheap;
mod host_probe;
mod partition;
pub mod table;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use dglrun_proto::pb;
use serde::Serialize;

use crate::cluster::call::CallError;
use crate::cluster::{self, AgentAccess, Host};
use crate::config::{IpConfig, PartConfig};
use crate::launch::host_env::{address_on, AddressOn};
use host_probe::Facts;

/// A probe imports torch and dgl: seconds on a cold cache.
const PROBE_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Clone, Debug)]
pub struct DoctorOptions {
    pub ip_config: PathBuf,
    /// A local part_config: the partition sizes each host will load.
    pub part_config: Option<PathBuf>,
    /// Where the probe runs on every host (relative to the agent root; `.`: the root).
    pub workspace: String,
    /// The interpreter the job would use (`python3` unless `--python`).
    pub python: String,
    /// Shell text run before the probe, as `launch --setup` runs it before the command.
    pub setup: Option<String>,
    pub num_servers: u32,
    /// With `part_config` and `workspace`: where `dgl-coord copy --rel_data_path` put the
    /// data, so each host's files can be verified by digest.
    pub rel_data_path: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
    /// Not checked (the agent was out of reach).
    Unknown,
}

/// One cell: what was found, and what to do about it when it is not fine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub(crate) fn ok(detail: impl Into<String>) -> Self {
        Self {
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }
    pub(crate) fn bad(status: Status, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn unknown() -> Self {
        Self {
            status: Status::Unknown,
            detail: "-".into(),
            fix: None,
        }
    }
}

/// Every check of one host, in the table's column order.
#[derive(Clone, Debug, Serialize)]
pub struct HostReport {
    pub machine: usize,
    pub ip: IpAddr,
    pub agent: Check,
    pub interface: Check,
    pub python: Check,
    pub gpus: Check,
    pub disk: Check,
    pub ports: Check,
    /// What a copy would place there, verified by digest (`--rel_data_path`).
    pub partition: Check,
}

impl HostReport {
    pub fn checks(&self) -> [(&'static str, &Check); 7] {
        [
            ("agent", &self.agent),
            ("interface", &self.interface),
            ("python", &self.python),
            ("gpus", &self.gpus),
            ("disk", &self.disk),
            ("ports", &self.ports),
            ("partition", &self.partition),
        ]
    }

    pub fn failed(&self) -> bool {
        self.checks().iter().any(|(_, c)| c.status == Status::Fail)
    }
}

/// Runs every check on every host at once.
pub async fn run(o: &DoctorOptions, access: &AgentAccess) -> anyhow::Result<Vec<HostReport>> {
    let ips = IpConfig::load(&o.ip_config)?;
    let part_sizes = match &o.part_config {
        Some(p) => Some(partition_sizes(&PartConfig::load(p)?, ips.len())?),
        None => None,
    };
    let expected = partition::expected(o, &ips).await?;
    let per_host = ips.machines.iter().map(|m| {
        let need = part_sizes.as_ref().and_then(|s| s.get(m.rank).copied());
        let files = expected
            .as_ref()
            .and_then(|e| e.get(m.rank))
            .map(Vec::as_slice);
        async move { check_host(o, access, (m.rank, m.ip, m.port), need, files).await }
    });
    let mut reports = futures::future::join_all(per_host).await;
    flag_python_differences(&mut reports);
    Ok(reports)
}

/// Bytes of each machine's partition files plus the files every machine loads.
fn partition_sizes(pc: &PartConfig, machines: usize) -> anyhow::Result<Vec<u64>> {
    let size = |f: &crate::config::part_config::NamedFile| -> anyhow::Result<u64> {
        std::fs::metadata(&f.local)
            .map(|m| m.len())
            .map_err(|e| anyhow::anyhow!("{}: {e}", f.local.display()))
    };
    (0..machines)
        .map(|i| cheap::partition_size(&cheap::partition_files(pc, i), size))
        .collect()
}

async fn check_host(
    o: &DoctorOptions,
    access: &AgentAccess,
    (rank, ip, server_port): (usize, IpAddr, u16),
    need: Option<u64>,
    files: Option<&[pb::FileManifest]>,
) -> HostReport {
    let mut r = HostReport {
        machine: rank,
        ip,
        agent: Check::unknown(),
        interface: Check::unknown(),
        python: Check::unknown(),
        gpus: Check::unknown(),
        disk: Check::unknown(),
        ports: Check::unknown(),
        partition: Check::unknown(),
    };
    let host = match cluster::connect(rank, ip, access).await {
        Ok(h) => h,
        Err(e) => {
            r.agent = Check::bad(
                Status::Fail,
                "unreachable",
                format!(
                    "{e}. Start dgl-agent there (see deploy/), check --agent-port and the token"
                ),
            );
            return r;
        }
    };
    match cheap::timed_hello(&host).await {
        Ok((hello, offset)) => r.agent = cheap::agent_check(&hello, offset),
        // Connected, then silent (its link cut, the agent stopped): every other call would
        // wait as long, the partition check's without bound.
        Err(e) => {
            r.agent = Check::bad(Status::Fail, "no answer", e.to_string());
            return r;
        }
    }
    r.interface = interface_check(&host.hello, ip);
    let ports = cheap::server_ports(server_port, o.num_servers);
    let script = host_probe::script(o.setup.as_deref(), &o.python);
    // The partition check comes last: a PrepareFiles that finds files missing holds the
    // workspace for a copy, and the probe could not start there then.
    let (preflight, probe) = tokio::join!(
        host_facts(&host, &o.workspace, ip, &ports),
        crate::probe::run(&host, &o.workspace, &script, PROBE_TIMEOUT)
    );
    match preflight {
        Ok(reply) => {
            r.ports = cheap::ports_check(&reply.listening, &ports);
            r.disk = disk_check(host.hello.free_bytes, reply.shm_free_bytes, need);
        }
        Err(e) => {
            let c = Check::bad(Status::Fail, "cannot ask", format!("Preflight: {e}"));
            (r.ports, r.disk) = (c.clone(), c);
        }
    }
    match probe {
        Err(e) => {
            let c = Check::bad(
                Status::Fail,
                "probe failed",
                format!("{e:#}; see the agent's log"),
            );
            (r.python, r.gpus) = (c.clone(), c);
        }
        Ok(out) => {
            let f = host_probe::parse(&out);
            r.python = python_check(&f, &o.python);
            r.gpus = gpus_check(&f);
        }
    }
    if let Some(files) = files {
        r.partition = partition::check(&host, files).await;
    }
    r
}

/// What the agent itself reports of the host (who holds the server ports, /dev/shm).
async fn host_facts(
    host: &Host,
    workspace: &str,
    ip: IpAddr,
    ports: &[u16],
) -> Result<pb::PreflightReply, CallError> {
    let mut client = host.client.clone();
    cheap::bounded(client.preflight(pb::PreflightRequest {
        workspace: workspace.to_string(),
        listening_ports: ports.iter().map(|&p| p.into()).collect(),
        listening_ip: ip.to_string(),
        ..Default::default()
    }))
    .await
}

fn interface_check(hello: &pb::HelloReply, ip: IpAddr) -> Check {
    match address_on(&hello.interfaces, ip) {
        AddressOn::Interface(name) => Check::ok(name),
        AddressOn::Unknown => Check::bad(
            Status::Warn,
            "not reported",
            "an older dgl-agent: update it to learn the host's interfaces",
        ),
        AddressOn::Nowhere(list) => Check::bad(
            Status::Fail,
            format!("{ip} on no interface"),
            format!(
                "the host's addresses are {}; DGL finds its machine by its ip_config address: \
                 put one of them in ip_config",
                list.join("; ")
            ),
        ),
    }
}

fn python_check(f: &Facts, python: &str) -> Check {
    let Some(py) = &f.python else {
        return Check::bad(
            Status::Fail,
            format!("{python} did not run"),
            format!(
                "{}: install Python there or give --python PATH / --setup 'source .../activate'",
                f.python_error.as_deref().unwrap_or("no output")
            ),
        );
    };
    let detail = format!(
        "{} {}, dgl {}, torch {}",
        py.executable,
        py.version,
        py.dgl.as_deref().unwrap_or("missing"),
        py.torch.as_deref().unwrap_or("missing")
    );
    let missing: Vec<&str> = [("dgl", &py.dgl), ("torch", &py.torch)]
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|(n, _)| *n)
        .collect();
    if !missing.is_empty() {
        return Check::bad(
            Status::Fail,
            detail,
            format!(
                "{} cannot import {} ({}): install it there, or point --python / --setup at the \
                 environment that has it",
                py.executable,
                missing.join(" and "),
                py.import_error.as_deref().unwrap_or("import failed")
            ),
        );
    }
    Check::ok(detail)
}

fn gpus_check(f: &Facts) -> Check {
    if let Some(e) = &f.gpu_error {
        return Check::bad(
            Status::Fail,
            "nvidia-smi failed",
            format!("{e}: the NVIDIA driver there is not working; fix it or drop the host"),
        );
    }
    match &f.gpus {
        None => Check::ok("none (no nvidia-smi)"),
        Some(g) if g.is_empty() => Check::ok("none"),
        Some(g) => Check::ok(format!("{}", g.len())),
    }
}

pub(crate) fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

fn disk_check(root_free: u64, shm_free: Option<u64>, need: Option<u64>) -> Check {
    let shm = shm_free.map_or_else(|| "?".to_string(), gib);
    let detail = format!("root {} free, /dev/shm {shm} free", gib(root_free));
    let Some(need) = need else {
        return Check::ok(detail);
    };
    let detail = format!("{detail}, partition {}", gib(need));
    let mut fixes = Vec::new();
    if root_free < need {
        fixes.push(
            "the agent root cannot hold the partition this host loads: free space there"
                .to_string(),
        );
    }
    if let Some(shm) = cheap::shm_short(shm_free, Some(need)) {
        fixes.extend(shm.fix);
    }
    if fixes.is_empty() {
        return Check::ok(detail);
    }
    Check::bad(Status::Fail, detail, fixes.join("; "))
}

/// Python, dgl or torch versions that differ between hosts are flagged on every host that
/// differs from the first one.
fn flag_python_differences(reports: &mut [HostReport]) {
    let version = |r: &HostReport| {
        (r.python.status == Status::Ok).then(|| {
            // `path X.Y.Z, dgl A, torch B`: what must agree is everything after the path.
            r.python
                .detail
                .split_once(' ')
                .map(|(_, v)| v.to_string())
                .unwrap_or_default()
        })
    };
    let Some(first) = reports.iter().find_map(version) else {
        return;
    };
    for r in reports.iter_mut() {
        if let Some(v) = version(r) {
            if v != first {
                r.python.status = Status::Warn;
                r.python.fix = Some(format!(
                    "differs from the other hosts ({first}): install the same versions everywhere"
                ));
            }
        }
    }
}
