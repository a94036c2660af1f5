//! The kernel's TCP socket tables of the agent's network namespace (`/proc/net/tcp`, `tcp6`):
//! which address and port each listening socket is bound to, and which process holds it.
//! Read, never probed by connecting: a DGL server counts every connection as a client.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Bytes read of one table (150 per socket: enough for hundreds of thousands of sockets).
const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Socket tables of the agent's network namespace.
const TABLES: [&str; 2] = ["/proc/net/tcp", "/proc/net/tcp6"];
/// `st` of a listening socket in those tables (`TCP_LISTEN`).
const LISTEN: &str = "0A";
/// Bytes of a holder's command line reported.
const MAX_COMMAND_BYTES: usize = 100;

#[derive(Debug, thiserror::Error)]
#[error("cannot read the socket table {path}")]
pub struct TableError {
    path: &'static str,
    #[source]
    source: std::io::Error,
}

/// A listening socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub ip: IpAddr,
    pub port: u16,
    pub inode: u64,
}

impl Listener {
    /// Whether a bind of `ip` on this port would collide with it: same address, or either
    /// is the wildcard address.
    pub fn blocks(&self, ip: Option<IpAddr>) -> bool {
        let mine = self.ip.to_canonical();
        match ip.map(|i| i.to_canonical()) {
            None => true,
            Some(want) => mine == want || mine.is_unspecified() || want.is_unspecified(),
        }
    }
}

/// Whether a server binding `ip:port` as DGL's does (SO_REUSEADDR, so connections in
/// TIME_WAIT do not count) would fail now because the port is taken. An address not on this
/// host, or any other failure, says nothing about the port: false.
pub fn bind_fails(ip: IpAddr, port: u16) -> bool {
    // std sets SO_REUSEADDR before the bind; the socket is closed at once.
    matches!(
        std::net::TcpListener::bind((ip, port)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse
    )
}

/// Every socket in LISTEN state in either table; a missing tcp6 (IPv6 disabled) adds none.
pub fn listeners() -> Result<Vec<Listener>, TableError> {
    let mut all = Vec::new();
    for path in TABLES {
        let mut text = String::new();
        match std::fs::File::open(path) {
            Ok(f) => f
                .take(MAX_TABLE_BYTES)
                .read_to_string(&mut text)
                .map_err(|source| TableError { path, source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(TableError { path, source }),
        };
        all.extend(parse_table(&text));
    }
    Ok(all)
}

/// The LISTEN rows of a `/proc/net/tcp[6]` table (header line skipped; `local_address` is
/// `HEXADDR:HEXPORT`, `st` the fourth field, `inode` the tenth).
pub fn parse_table(text: &str) -> impl Iterator<Item = Listener> + '_ {
    text.lines().skip(1).filter_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (local, st, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
        if *st != LISTEN {
            return None;
        }
        let (addr, port) = local.rsplit_once(':')?;
        Some(Listener {
            ip: parse_addr(addr)?,
            port: u16::from_str_radix(port, 16).ok()?,
            inode: inode.parse().ok()?,
        })
    })
}

/// The kernel prints each 32-bit word of the address as the integer whose bytes in memory
/// are the address in network order.
fn parse_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Which process holds each socket inode of `inodes`, with its command line: one pass over
/// `/proc/*/fd`. Processes whose fds the agent may not read (another user's) are skipped, so
/// their sockets have no entry.
pub fn holders(inodes: &BTreeSet<u64>) -> HashMap<u64, (u32, String)> {
    let mut found = HashMap::new();
    if inodes.is_empty() {
        return found;
    }
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in proc_dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            if let Some(inode) = inode.filter(|i| inodes.contains(i)) {
                found
                    .entry(inode)
                    .or_insert_with(|| (pid, command_line(pid)));
            }
        }
        if found.len() == inodes.len() {
            break;
        }
    }
    found
}

/// `/proc/PID/cmdline` with spaces for its NULs, cut to [`MAX_COMMAND_BYTES`].
fn command_line(pid: u32) -> String {
    let mut buf = Vec::new();
    if let Ok(f) = std::fs::File::open(format!("/proc/{pid}/cmdline")) {
        let _ = f.take(MAX_COMMAND_BYTES as u64).read_to_end(&mut buf);
    }
    let text = String::from_utf8_lossy(&buf).replace('\0', " ");
    text.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:7582 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:7583 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 024D12C6:B7D9 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0
";

    #[test]
    fn listening_rows_are_read_with_address_and_inode() {
        let v: Vec<Listener> = parse_table(TCP).collect();
        // 0x7583 is an established connection, not a listener.
        assert_eq!(
            v,
            vec![
                Listener {
                    ip: "127.0.0.1".parse().unwrap(),
                    port: 0x7582,
                    inode: 1
                },
                Listener {
                    ip: "198.18.77.2".parse().unwrap(),
                    port: 47065,
                    inode: 3
                },
            ]
        );
        let v6: Vec<Listener> = parse_table(TCP6).collect();
        assert_eq!((v6[0].ip, v6[0].port), ("::".parse().unwrap(), 22));
        assert_eq!(parse_table("header only\n").count(), 0);
        assert_eq!(parse_table("h\n 0: garbage\n").count(), 0);
    }

    #[test]
    fn a_wildcard_listener_blocks_every_address_and_others_only_their_own() {
        let on = |ip: &str| Listener {
            ip: ip.parse().unwrap(),
            port: 1,
            inode: 0,
        };
        let a = Some("10.0.0.1".parse().unwrap());
        assert!(on("0.0.0.0").blocks(a));
        assert!(on("::").blocks(a));
        assert!(on("::ffff:10.0.0.1").blocks(a));
        assert!(on("10.0.0.1").blocks(a));
        assert!(!on("127.0.0.1").blocks(a));
        assert!(on("127.0.0.1").blocks(None));
    }

    #[test]
    fn a_bound_port_fails_a_bind_and_a_closed_one_does_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let ip = "127.0.0.1".parse().unwrap();
        assert!(bind_fails(ip, port));
        drop(l);
        assert!(!bind_fails(ip, port));
    }

    #[test]
    fn the_holder_of_a_socket_of_this_process_is_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mine = listeners()
            .unwrap()
            .into_iter()
            .find(|x| x.port == port)
            .unwrap();
        let found = holders(&BTreeSet::from([mine.inode]));
        assert_eq!(found[&mine.inode].0, std::process::id());
    }
}
