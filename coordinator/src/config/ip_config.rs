//! `ip_config.txt`: one machine a line, `IP [PORT]`.
//!
//! DGL splits each line on whitespace and accepts one or two fields; anything else (a blank
//! line, a third field, a `#` comment) makes DGL fail late, on some host. We refuse it up
//! front, naming the line. IPv6 is refused too: DGL's RPC sockets are IPv4 only
//! (`src/rpc/network/tcp_socket.cc` opens `AF_INET` sockets and parses with
//! `inet_pton(AF_INET, ...)`), so its servers could never listen on such an address.

use std::net::IpAddr;
use std::path::Path;

/// DGL's default server port when a line gives only the IP.
pub const DEFAULT_SERVER_PORT: u16 = 30050;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// Rank: the line's position among machines, from 0.
    pub rank: usize,
    pub ip: IpAddr,
    /// Port of DGL server 0 on this machine; server j listens on `port + j`.
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpConfig {
    pub machines: Vec<Machine>,
}

#[derive(Debug, thiserror::Error)]
pub enum IpConfigError {
    #[error("cannot read ip_config {path}: {error}")]
    Read {
        path: String,
        // Not `source`: the message already carries it, and error chains would repeat it.
        error: std::io::Error,
    },
    #[error("{path}:{line}: {reason} (DGL expects `IP [PORT]` on every line)")]
    Line {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{path}: no machines listed")]
    Empty { path: String },
    #[error("{path}:{line}: {ip} is listed twice (first on line {first}); each machine needs its own address")]
    Duplicate {
        path: String,
        line: usize,
        first: usize,
        ip: IpAddr,
    },
}

impl IpConfig {
    pub fn load(path: &Path) -> Result<Self, IpConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| IpConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// `origin` names the file in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Self, IpConfigError> {
        let mut machines: Vec<Machine> = Vec::new();
        let mut lines_of = Vec::new();
        // `str::lines` drops the final newline, as Python's `for line in f` does.
        for (i, line) in text.lines().enumerate() {
            let lineno = i + 1;
            let bad = |reason: String| IpConfigError::Line {
                path: origin.to_string(),
                line: lineno,
                reason,
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.iter().any(|f| f.starts_with('#')) {
                return Err(bad(
                    "a comment: comments are not allowed, DGL reads every line as \
                     `IP [PORT]` (line.split()); delete the comment"
                        .into(),
                ));
            }
            let (ip, port) = match fields.as_slice() {
                [] => return Err(bad("blank line".into())),
                [ip] => (*ip, None),
                [ip, port] => (*ip, Some(*port)),
                more => return Err(bad(format!("{} fields, at most 2 allowed", more.len()))),
            };
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| bad(format!("`{ip}` is not an IP address")))?;
            if ip.is_ipv6() {
                return Err(bad(format!(
                    "`{ip}` is an IPv6 address, and DGL's RPC is IPv4 only (its sockets are \
                     AF_INET); give the machine's IPv4 address"
                )));
            }
            let port = match port {
                None => DEFAULT_SERVER_PORT,
                Some(p) => match p.parse::<u16>() {
                    Ok(p) if p > 0 => p,
                    _ => return Err(bad(format!("`{p}` is not a port (1-65535)"))),
                },
            };
            if let Some(first) = machines.iter().position(|m| m.ip == ip) {
                return Err(IpConfigError::Duplicate {
                    path: origin.to_string(),
                    line: lineno,
                    first: lines_of[first],
                    ip,
                });
            }
            lines_of.push(lineno);
            machines.push(Machine {
                rank: machines.len(),
                ip,
                port,
            });
        }
        if machines.is_empty() {
            return Err(IpConfigError::Empty {
                path: origin.to_string(),
            });
        }
        Ok(Self { machines })
    }

    pub fn len(&self) -> usize {
        self.machines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.machines.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_ok(text: &str, expected: &[(&str, u16)]) {
        let cfg = IpConfig::parse(text, "ip.txt").unwrap();
        let got: Vec<(String, u16)> = cfg
            .machines
            .iter()
            .map(|m| (m.ip.to_string(), m.port))
            .collect();
        let expected: Vec<(String, u16)> =
            expected.iter().map(|(i, p)| (i.to_string(), *p)).collect();
        assert_eq!(got, expected);
    }

    fn check_err(text: &str, needle: &str) {
        let err = IpConfig::parse(text, "ip.txt").unwrap_err().to_string();
        assert!(err.contains(needle), "{err:?} should contain {needle:?}");
    }

    #[test]
    fn parses_like_dgl() {
        check_ok(
            "10.0.0.1 30050\n10.0.0.2 30060\n",
            &[("10.0.0.1", 30050), ("10.0.0.2", 30060)],
        );
        check_ok("10.0.0.1\n", &[("10.0.0.1", 30050)]);
        check_ok("  10.0.0.1\t 4000  ", &[("10.0.0.1", 4000)]);
    }

    #[test]
    fn says_why_dgl_cannot_read_comments_and_ipv6() {
        check_err(
            "# cluster\n10.0.0.1\n",
            "ip.txt:1: a comment: comments are not allowed, DGL reads every line as `IP [PORT]`",
        );
        check_err("10.0.0.1 30050 # m0\n", "ip.txt:1: a comment");
        check_err("::1 5000\n", "ip.txt:1: `::1` is an IPv6 address");
        check_err("fe80::1\n", "IPv4 only");
    }

    #[test]
    fn refuses_what_dgl_cannot_read() {
        check_err("10.0.0.1\n\n10.0.0.2\n", "ip.txt:2: blank line");
        check_err("10.0.0.1 1 2\n", "ip.txt:1: 3 fields");
        check_err("host-a 30050\n", "ip.txt:1: `host-a` is not an IP");
        check_err("10.0.0.1 99999\n", "`99999` is not a port");
        check_err("10.0.0.1 0\n", "`0` is not a port");
        check_err("", "no machines");
        check_err(
            "10.0.0.1\n10.0.0.1 4000\n",
            "ip.txt:2: 10.0.0.1 is listed twice (first on line 1)",
        );
    }
}
