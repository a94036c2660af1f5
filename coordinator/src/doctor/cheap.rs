//! Doctor's checks cheap enough for every launch to run in its preflight: the agent's clock
//! and version, DGL's server ports, /dev/shm against the partition. Their facts come from a
//! timed Hello and a Preflight (no probe process), read here for both commands.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dglrun_proto::pb;

use super::{gib, Check, Status};
use crate::cluster::call::{self, CallError};
use crate::cluster::Host;
use crate::config::part_config::NamedFile;
use crate::config::PartConfig;

/// A clock further off than this is warned about (logs of different hosts stop lining up).
const CLOCK_WARN_MS: i64 = 2000;
/// Past this, doctor fails the host and launch refuses it: no time sync runs there at all.
pub const CLOCK_FAIL_MS: i64 = 10_000;
/// Longest wait for one of these calls: a host that stops answering after it connected is
/// named, not waited for (HTTP/2 keepalive alone takes 15 s).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `call`'s reply, or why there is none (its error, or no answer within [`CALL_TIMEOUT`]).
pub async fn bounded<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CallError> {
    call::bounded(CALL_TIMEOUT, call).await
}

/// A Hello, timed: the agent's reply and its clock's offset from this host's (None: an agent
/// that does not report its clock), compared with the middle of the round trip.
pub async fn timed_hello(host: &Host) -> Result<(pb::HelloReply, Option<i64>), CallError> {
    let mut client = host.client.clone();
    let t0 = now_ms();
    let h = bounded(client.hello(pb::HelloRequest {
        protocol_version: dglrun_proto::PROTOCOL_VERSION,
        client_version: dglrun_proto::VERSION.to_string(),
    }))
    .await?;
    let t1 = now_ms();
    let offset = (h.unix_time_ms != 0).then(|| h.unix_time_ms as i64 - (t0 + t1) / 2);
    Ok((h, offset))
}

/// The agent's version and clock.
pub fn agent_check(h: &pb::HelloReply, offset: Option<i64>) -> Check {
    let version = format!("{} (protocol {})", h.agent_version, h.protocol_version);
    let Some(offset) = offset else {
        return Check::bad(
            Status::Warn,
            format!("{version}, clock unknown"),
            "an older dgl-agent: update it to the coordinator's version",
        );
    };
    let detail = format!("{version}, clock {offset:+} ms");
    let clock = clock_check(offset);
    let mut fixes: Vec<String> = clock.fix.into_iter().collect();
    let mut status = clock.status;
    if h.agent_version != dglrun_proto::VERSION {
        fixes.push(format!(
            "the agent is version {}, dgl-coord {}: install the same version everywhere",
            h.agent_version,
            dglrun_proto::VERSION
        ));
        if status == Status::Ok {
            status = Status::Warn;
        }
    }
    if fixes.is_empty() {
        return Check::ok(detail);
    }
    Check::bad(status, detail, fixes.join("; "))
}

/// The clock alone: warned past 2 s, failed past [`CLOCK_FAIL_MS`].
pub fn clock_check(offset: i64) -> Check {
    let detail = format!("clock {offset:+} ms");
    let status = match offset.abs() {
        o if o > CLOCK_FAIL_MS => Status::Fail,
        o if o > CLOCK_WARN_MS => Status::Warn,
        _ => return Check::ok(detail),
    };
    Check::bad(
        status,
        detail,
        "the host's clock is off from this one's: run NTP (chrony, systemd-timesyncd) there",
    )
}

/// DGL's server ports of a machine: `PORT` .. `PORT + num_servers - 1`.
pub fn server_ports(port: u16, num_servers: u32) -> Vec<u16> {
    (0..num_servers)
        .filter_map(|j| u16::try_from(j).ok().and_then(|j| port.checked_add(j)))
        .collect()
}

/// Whether something already listens on the server ports, and who.
pub fn ports_check(listening: &[pb::PortHolder], ports: &[u16]) -> Check {
    let list = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    if listening.is_empty() {
        return Check::ok(format!("{list} free"));
    }
    let who: Vec<String> = listening
        .iter()
        .map(|l| match l.pid {
            0 => format!(
                "{} by a process the agent cannot see (another user's?)",
                l.port
            ),
            pid => format!("{} by pid {pid} ({})", l.port, l.command),
        })
        .collect();
    Check::bad(
        Status::Fail,
        format!("held: {}", who.join("; ")),
        "a server of an earlier job? stop it (dgl-coord kill --ip_config ..., or kill the pid) \
         or use other ports in ip_config",
    )
}

/// Whether /dev/shm can hold the partition the host loads (`need` bytes; None: unknown).
/// None when there is nothing to say (either figure unknown, or it fits).
pub fn shm_short(shm_free: Option<u64>, need: Option<u64>) -> Option<Check> {
    let (free, need) = (shm_free?, need?);
    (free < need).then(|| {
        Check::bad(
            Status::Fail,
            format!("/dev/shm {} free, partition {}", gib(free), gib(need)),
            SHM_FIX,
        )
    })
}

pub(super) const SHM_FIX: &str = "DGL's servers load the partition into /dev/shm: free space \
     there or mount it larger (`mount -o remount,size=... /dev/shm`)";

/// The files machine `machine` loads: its partition's and those every machine loads.
pub fn partition_files(pc: &PartConfig, machine: usize) -> Vec<NamedFile> {
    let mut files = pc.shared_files();
    files.extend(pc.part_files(machine));
    files
}

/// Bytes of `files`, sized by `size_of`.
pub fn partition_size<E>(
    files: &[NamedFile],
    size_of: impl Fn(&NamedFile) -> Result<u64, E>,
) -> Result<u64, E> {
    files.iter().map(size_of).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(version: &str) -> pb::HelloReply {
        pb::HelloReply {
            agent_version: version.into(),
            protocol_version: dglrun_proto::PROTOCOL_VERSION,
            ..Default::default()
        }
    }

    #[test]
    fn clock_and_version_are_judged_together() {
        let me = dglrun_proto::VERSION;
        assert_eq!(agent_check(&hello(me), Some(5)).status, Status::Ok);
        assert_eq!(agent_check(&hello(me), Some(-3000)).status, Status::Warn);
        assert_eq!(agent_check(&hello(me), Some(60_000)).status, Status::Fail);
        assert_eq!(agent_check(&hello(me), None).status, Status::Warn);
        let both = agent_check(&hello("0.0.1"), Some(60_000));
        assert_eq!(both.status, Status::Fail);
        let fix = both.fix.unwrap();
        assert!(
            fix.contains("NTP") && fix.contains("version 0.0.1"),
            "{fix}"
        );
    }

    #[test]
    fn ports_past_the_last_one_are_not_made_up() {
        assert_eq!(server_ports(30050, 3), [30050, 30051, 30052]);
        assert_eq!(server_ports(65535, 2), [65535]);
    }

    #[test]
    fn shm_is_short_only_when_both_figures_are_known_and_too_small() {
        assert!(shm_short(Some(1), Some(2)).is_some());
        assert!(shm_short(Some(2), Some(2)).is_none());
        assert!(shm_short(None, Some(2)).is_none());
        assert!(shm_short(Some(1), None).is_none());
    }
}
