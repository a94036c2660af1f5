//! Following a detached job from any dgl-coord: `wait` asks machine 0's agent, which
//! supervises it, for its outcome (`WaitJob`, answered when the job is over).

use std::time::{Duration, Instant};

use dglrun_proto::pb;

use crate::cluster::{self, AgentAccess, Host};
use crate::config::IpConfig;

/// How long `wait` keeps trying to reach machine 0's agent before it gives up.
const UNREACHABLE_FOR: Duration = Duration::from_secs(60);
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Machine 0's agent: the one that supervises detached jobs.
pub async fn leader(ips: &IpConfig, access: &AgentAccess) -> anyhow::Result<Host> {
    let Some(m) = ips.machines.first() else {
        anyhow::bail!("no machines in ip_config");
    };
    Ok(cluster::connect(m.rank, m.ip, access).await?)
}

fn transient(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// Blocks until `job` is over and returns its outcome. A lost connection to machine 0's agent
/// is retried for a minute (a blip must not end a `wait` of a healthy job).
pub async fn wait(
    ips: &IpConfig,
    access: &AgentAccess,
    job: &str,
) -> anyhow::Result<pb::WaitJobReply> {
    let mut failing_since: Option<Instant> = None;
    loop {
        let error = match leader(ips, access).await {
            Ok(h) => {
                let req = pb::WaitJobRequest {
                    job_id: job.to_string(),
                };
                match h.client.clone().wait_job(req).await {
                    Ok(r) => return Ok(r.into_inner()),
                    Err(s) if s.code() == tonic::Code::Unimplemented => anyhow::bail!(
                        "the agent of {} knows no detached jobs (it is older than this \
                         dgl-coord): upgrade it",
                        h.name()
                    ),
                    Err(s) if !transient(&s) => {
                        anyhow::bail!("the agent of {}: {}", h.name(), s.message())
                    }
                    Err(s) => format!("the agent of {}: {}", h.name(), s.message()),
                }
            }
            Err(e) => format!("{e:#}"),
        };
        let since = *failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= UNREACHABLE_FOR {
            anyhow::bail!(
                "gave up waiting for job {job}: machine 0's agent, which supervises it, was out \
                 of reach for {} s: {error}",
                UNREACHABLE_FOR.as_secs()
            );
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}
