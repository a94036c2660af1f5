//! /proc readings (RSS, peak RSS, CPU time) and a set of agents at chosen loopback addresses.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), in bytes.
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3 (index 0 here); utime 14, stime 15.
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    Some(ut + st)
}

/// Clock ticks per second (USER_HZ); 100 on every Linux this runs on.
pub const TICKS: f64 = 100.0;

/// Agents started by the benchmark at given addresses, each with its own root.
pub struct Agents {
    pub port: u16,
    pub ips: Vec<Ipv4Addr>,
    pub roots: Vec<PathBuf>,
    /// The token file every agent uses; give it to dgl-coord as `DGL_AGENT_TOKEN_FILE`.
    pub token_file: PathBuf,
    children: Vec<Child>,
}

impl Agents {
    /// Starts one agent per address, all at once, and waits until every one accepts TCP.
    pub fn start(dir: &Path, ips: Vec<Ipv4Addr>, port: u16, timeout: Duration) -> Result<Agents> {
        let agent = super::release_bin("dgl-agent")?;
        let token_file = dir.join("token");
        crate::write_token_file(&token_file)?;
        let mut a = Agents {
            port,
            ips: Vec::new(),
            roots: Vec::new(),
            token_file,
            children: Vec::new(),
        };
        for (i, ip) in ips.iter().enumerate() {
            let root = dir.join(format!("host{i}"));
            fs::create_dir_all(&root)?;
            let log = fs::File::create(dir.join(format!("agent{i}.log")))?;
            let child = Command::new(&agent)
                .arg("--listen")
                .arg(format!("{ip}:{port}"))
                .arg("--root")
                .arg(&root)
                .arg("--token-file")
                .arg(&a.token_file)
                .args(crate::root_flag())
                .env_remove("DGL_AGENT_TOKEN")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("spawn agent {ip}"))?;
            a.children.push(child);
            a.ips.push(*ip);
            a.roots.push(root);
        }
        let deadline = Instant::now() + timeout;
        for (i, ip) in a.ips.clone().iter().enumerate() {
            let addr = SocketAddr::from((*ip, port));
            loop {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    break;
                }
                if let Ok(Some(st)) = a.children[i].try_wait() {
                    let log =
                        fs::read_to_string(dir.join(format!("agent{i}.log"))).unwrap_or_default();
                    bail!("agent {ip} exited during startup ({st}): {log}");
                }
                if Instant::now() > deadline {
                    bail!("agent {ip}:{port} not listening after {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(a)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.id()).collect()
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &self.children {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for c in &mut self.children {
            loop {
                if matches!(c.try_wait(), Ok(Some(_)) | Err(_)) {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// 127.0.0.2, 127.0.0.3, ... (`n` addresses, skipping .0 and .255 of each /24 would change
/// the numbering the issue asks for, so they are consecutive: 127.0.0.2 ... 127.0.1.1 for 256).
pub fn loopback_ips(first: u32, n: usize) -> Vec<Ipv4Addr> {
    let base = u32::from(Ipv4Addr::new(127, 0, 0, 0)) + first;
    (0..n as u32).map(|i| Ipv4Addr::from(base + i)).collect()
}
