//! What Hello says about the host beyond the agent itself: its network interfaces (the
//! coordinator names the one holding the host's ip_config address to gloo, tensorpipe and
//! NCCL), which of the variables dglrun would set the agent's own environment already has,
//! and its wall clock (the coordinator's `doctor` shows the offset).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use dglrun_proto::pb;
use nix::ifaddrs::getifaddrs;
use nix::net::if_::InterfaceFlags;

/// Interfaces reported at most (a host with more still answers: the first ones by name).
const MAX_INTERFACES: usize = 256;
/// Addresses reported per interface at most.
const MAX_ADDRESSES: usize = 64;

/// Every interface with its addresses, by name; empty when getifaddrs fails (the coordinator
/// then says it cannot tell the interface).
pub fn interfaces() -> Vec<pb::NetInterface> {
    let Ok(addrs) = getifaddrs() else {
        return Vec::new();
    };
    let mut by_name: BTreeMap<String, pb::NetInterface> = BTreeMap::new();
    for a in addrs {
        let entry = by_name
            .entry(a.interface_name.clone())
            .or_insert_with(|| pb::NetInterface {
                name: a.interface_name.clone(),
                ..Default::default()
            });
        entry.up |= a.flags.contains(InterfaceFlags::IFF_UP);
        entry.loopback |= a.flags.contains(InterfaceFlags::IFF_LOOPBACK);
        let ip = a.address.as_ref().and_then(|s| {
            s.as_sockaddr_in()
                .map(|v4| std::net::IpAddr::V4(v4.ip()))
                .or_else(|| s.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())))
        });
        if let Some(ip) = ip {
            if entry.addresses.len() < MAX_ADDRESSES {
                entry.addresses.push(ip.to_string());
            }
        }
    }
    by_name.into_values().take(MAX_INTERFACES).collect()
}

/// The names of [`dglrun_proto::REPORTED_ENV`] set (non-empty) in this process's environment.
pub fn env_set() -> Vec<String> {
    dglrun_proto::REPORTED_ENV
        .iter()
        .filter(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()))
        .map(|k| k.to_string())
        .collect()
}

pub fn unix_time_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_reported_with_its_address() {
        let lo = interfaces()
            .into_iter()
            .find(|i| i.loopback)
            .expect("a loopback interface");
        assert!(lo.addresses.iter().any(|a| a == "127.0.0.1"), "{lo:?}");
    }
}
