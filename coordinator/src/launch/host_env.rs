//! What dglrun adds to DGL's environment from what each host's agent reports: the network
//! interface gloo, tensorpipe and NCCL must use (`GLOO_SOCKET_IFNAME`, `TP_SOCKET_IFNAME`,
//! `NCCL_SOCKET_IFNAME`), the interface holding the host's ip_config address.
//!
//! Without them each library picks its own: gloo and tensorpipe resolve the hostname, which on
//! many clusters (and Debian's default /etc/hosts) is a loopback address, so ranks on other
//! hosts never reach it and the job hangs at initialisation.

use std::net::IpAddr;

use dglrun_proto::pb::{HelloReply, NetInterface};

/// The variables naming the interface, all set to the same name.
pub const SOCKET_IFNAME_VARS: [&str; 3] = [
    "GLOO_SOCKET_IFNAME",
    "TP_SOCKET_IFNAME",
    "NCCL_SOCKET_IFNAME",
];

/// One machine as the plan needs to know it beyond ip_config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// The interface holding the machine's ip_config address; None: not known (no agent was
    /// asked, or none of its interfaces holds it), and then nothing is set.
    pub socket_ifname: Option<String>,
    /// Names of [`dglrun_proto::REPORTED_ENV`] the agent's own environment sets: its processes
    /// inherit those, so dglrun does not set them.
    pub agent_env: Vec<String>,
    /// Usable CPUs, asked only for `--num_omp_threads host`.
    pub cpus: Option<u32>,
}

/// Where the host's ip_config address is among its interfaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressOn {
    /// On this interface.
    Interface(String),
    /// On none of them (listed as `name addr,addr` for the message).
    Nowhere(Vec<String>),
    /// The agent reported no interfaces (an older agent, or getifaddrs failed).
    Unknown,
}

/// The interface whose addresses include `ip`; a loopback address belongs to the loopback
/// interface however it is numbered (127.0.0.0/8 is all local, though `lo` lists 127.0.0.1).
pub fn address_on(interfaces: &[NetInterface], ip: IpAddr) -> AddressOn {
    if interfaces.is_empty() {
        return AddressOn::Unknown;
    }
    let ip = ip.to_canonical();
    let holds = |i: &&NetInterface| {
        i.addresses
            .iter()
            .filter_map(|a| a.parse::<IpAddr>().ok())
            .any(|a| a.to_canonical() == ip)
    };
    if let Some(i) = interfaces.iter().find(holds) {
        return AddressOn::Interface(i.name.clone());
    }
    if ip.is_loopback() {
        if let Some(i) = interfaces.iter().find(|i| i.loopback) {
            return AddressOn::Interface(i.name.clone());
        }
    }
    AddressOn::Nowhere(
        interfaces
            .iter()
            .filter(|i| !i.addresses.is_empty())
            .map(|i| format!("{} {}", i.name, i.addresses.join(",")))
            .collect(),
    )
}

/// The facts of the host whose agent said `hello`, at ip_config address `ip`.
pub fn from_hello(hello: &HelloReply, ip: IpAddr) -> HostFacts {
    HostFacts {
        socket_ifname: match address_on(&hello.interfaces, ip) {
            AddressOn::Interface(name) => Some(name),
            _ => None,
        },
        agent_env: hello.env_set.clone(),
        cpus: None,
    }
}

/// A dry run's stand-in where no agent was asked.
pub fn placeholder(ip: IpAddr) -> HostFacts {
    HostFacts {
        socket_ifname: Some(format!("<interface of {ip}>")),
        agent_env: Vec::new(),
        cpus: None,
    }
}

/// Why a machine's processes get no interface variables, or None when they get them: a
/// warning for the launch to print.
pub fn unset_reason(name: &str, hello: &HelloReply, ip: IpAddr) -> Option<String> {
    match address_on(&hello.interfaces, ip) {
        AddressOn::Interface(_) => None,
        AddressOn::Unknown => Some(format!(
            "warning: {name}: its agent reported no network interfaces (an older dgl-agent?); \
             {} are not set there: give them with --extra_envs if the job hangs at start",
            SOCKET_IFNAME_VARS.join(", ")
        )),
        AddressOn::Nowhere(list) => Some(format!(
            "warning: {name}: none of its interfaces holds its ip_config address {ip} (it has: \
             {}); {} are not set there. DGL's servers bind that address: fix ip_config if the \
             job fails to start",
            list.join("; "),
            SOCKET_IFNAME_VARS.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, addrs: &[&str], loopback: bool) -> NetInterface {
        NetInterface {
            name: name.into(),
            addresses: addrs.iter().map(|a| a.to_string()).collect(),
            up: true,
            loopback,
        }
    }

    #[test]
    fn the_interface_holding_the_address_is_named() {
        let ifs = [
            iface("lo", &["127.0.0.1", "::1"], true),
            iface("wan0", &["10.1.0.5"], false),
            iface("ib0", &["192.168.7.2", "fe80::1"], false),
        ];
        let on = |ip: &str| address_on(&ifs, ip.parse().unwrap());
        assert_eq!(on("192.168.7.2"), AddressOn::Interface("ib0".into()));
        assert_eq!(on("127.0.0.3"), AddressOn::Interface("lo".into()));
        assert_eq!(on("::ffff:10.1.0.5"), AddressOn::Interface("wan0".into()));
        assert!(matches!(on("192.168.7.3"), AddressOn::Nowhere(l) if l.len() == 3));
        assert_eq!(
            address_on(&[], "10.1.0.5".parse().unwrap()),
            AddressOn::Unknown
        );
    }
}
