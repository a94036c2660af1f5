//! A throwaway sshd on 127.0.0.1:<port> (its own host key, config and authorized key, in a
//! temp dir), and the client arguments to reach it. Listens on 127.0.0.1 only.

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

pub struct Sshd {
    pub port: u16,
    pub key: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

fn find(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .chain(extra.iter().map(PathBuf::from))
        .find(|p| p.exists())
}

/// Installs openssh-server/client and rsync from the distribution's packages when sshd, ssh,
/// scp or rsync is missing (`apt-get update` once, then `apt-get install`).
pub fn ensure_installed() -> Result<()> {
    let have = find("sshd", &["/usr/sbin/sshd"]).is_some()
        && ["ssh", "scp", "ssh-keygen", "rsync"]
            .iter()
            .all(|b| find(b, &[]).is_some());
    if have {
        return Ok(());
    }
    const PACKAGES: [&str; 3] = ["openssh-server", "openssh-client", "rsync"];
    eprintln!("bench: installing {} (apt-get)", PACKAGES.join(", "));
    let st = Command::new("apt-get").arg("update").status()?;
    ensure!(st.success(), "apt-get update failed");
    let st = Command::new("apt-get")
        .args(["install", "-y"])
        .args(PACKAGES)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    ensure!(
        st.success(),
        "apt-get install {} failed",
        PACKAGES.join(" ")
    );
    Ok(())
}

/// A client key and a host key (ed25519, no passphrase) in `dir`, and `authorized_keys`
/// holding the client's: (client key, host key, authorized_keys).
fn make_keys(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let key = dir.join("id");
    let hostkey = dir.join("hostkey");
    for k in [&key, &hostkey] {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(k)
            .stdout(Stdio::null())
            .status()?;
        ensure!(st.success(), "ssh-keygen failed");
    }
    let auth = dir.join("authorized_keys");
    fs::copy(dir.join("id.pub"), &auth)?;
    Ok((key, hostkey, auth))
}

/// What every client of these sshds passes: the key, no host key checks, no prompts.
fn client_opts(key: &Path) -> Vec<String> {
    [
        "-i",
        &key.display().to_string(),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "LogLevel=ERROR",
    ]
    .map(String::from)
    .to_vec()
}

/// An sshd_config listening on port `port` of each of `addrs` only, with `hostkey` and `auth`.
fn config(addrs: &[String], port: u16, hostkey: &Path, auth: &Path) -> String {
    let listen: String = addrs
        .iter()
        .map(|a| format!("ListenAddress {a}\n"))
        .collect();
    format!(
        "Port {port}\n{listen}HostKey {}\nAuthorizedKeysFile {}\n\
         PidFile none\nStrictModes no\nPermitRootLogin yes\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nUsePAM no\nUseDNS no\nMaxStartups 1000\n\
         MaxSessions 1000\nLogLevel ERROR\nSubsystem sftp internal-sftp\n",
        hostkey.display(),
        auth.display()
    )
}

/// `sshd -D -f config`, started so that the shells it runs read no `~/.bashrc`: sshd runs each
/// command through the login shell, and bash reads `~/.bashrc` then; whatever that does (here:
/// pyenv's init, hundreds of milliseconds on a loaded machine) would be counted against every
/// ssh. As root, in a mount namespace of its own an empty file stands in for it. `prefix`
/// (`ip netns exec NS`) runs first.
fn sshd_command(prefix: &[&str], sshd: &Path, config: &Path, empty: &Path) -> Command {
    use std::ffi::OsStr;
    let mut words: Vec<&OsStr> = prefix.iter().map(OsStr::new).collect();
    if nix::unistd::geteuid().is_root() {
        words
            .extend(["unshare", "--mount", "--propagation", "private", "sh", "-c"].map(OsStr::new));
        words.push(OsStr::new(
            "if [ -f \"$HOME/.bashrc\" ]; then mount --bind \"$1\" \"$HOME/.bashrc\" \
             || exit 1; fi; shift; exec \"$@\"",
        ));
        words.push(OsStr::new("sshd"));
        words.push(empty.as_os_str());
    }
    words.extend([
        sshd.as_os_str(),
        OsStr::new("-D"),
        OsStr::new("-f"),
        config.as_os_str(),
    ]);
    let mut cmd = Command::new(words[0]);
    cmd.args(&words[1..]);
    cmd
}

/// `ssh` and `scp` wrappers in `dir` that add the client options for `key`: first on PATH,
/// they let a tool that runs plain `ssh IP CMD` and `scp FILE IP:DIR` reach these sshds.
fn write_wrappers(dir: &Path, key: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    // Temp dir paths hold no quote.
    let opts = client_opts(key)
        .iter()
        .map(|o| format!("'{o}'"))
        .collect::<Vec<_>>()
        .join(" ");
    for tool in ["ssh", "scp"] {
        let real = find(tool, &[]).with_context(|| format!("{tool} not found"))?;
        let w = dir.join(tool);
        fs::write(
            &w,
            format!("#!/bin/sh\nexec {} {opts} \"$@\"\n", real.display()),
        )?;
        fs::set_permissions(&w, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    Ok(())
}

/// `dir` first on PATH.
fn path_with(dir: &Path) -> std::ffi::OsString {
    let rest = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![dir.to_path_buf()];
    paths.extend(std::env::split_paths(&rest));
    std::env::join_paths(paths).unwrap_or(rest)
}

/// The sshd binary, after installing it if missing; as root, with its privilege separation
/// directory (made by its service unit otherwise).
fn sshd_binary() -> Result<PathBuf> {
    ensure_installed()?;
    let sshd = find("sshd", &["/usr/sbin/sshd"]).context("sshd not found")?;
    if nix::unistd::geteuid().is_root() {
        fs::create_dir_all("/run/sshd")?;
    }
    Ok(sshd)
}

impl Sshd {
    /// An sshd on 127.0.0.1.
    pub fn start() -> Result<Sshd> {
        Self::start_on(&["127.0.0.1".to_string()])
    }

    /// An sshd on one port of each of `addrs` (loopback addresses), with `ssh`/`scp` wrappers
    /// for callers of plain `ssh -p PORT ADDR` ([`Sshd::path_env`]).
    pub fn start_on(addrs: &[String]) -> Result<Sshd> {
        let sshd = sshd_binary()?;
        let dir = tempfile::tempdir()?;
        let (key, hostkey, auth) = make_keys(dir.path())?;
        write_wrappers(&dir.path().join("bin"), &key)?;
        let empty = dir.path().join("empty-bashrc");
        fs::write(&empty, "")?;
        let port = super::free_port()?;
        let config = dir.path().join("sshd_config");
        fs::write(&config, self::config(addrs, port, &hostkey, &auth))?;
        let child = sshd_command(&[], &sshd, &config, &empty)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.path().join("sshd.log"))?)
            .spawn()
            .context("spawn sshd")?;
        let mut s = Sshd {
            port,
            key,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        for addr in addrs {
            loop {
                if TcpStream::connect((addr.as_str(), port)).is_ok() {
                    break;
                }
                if let Ok(Some(st)) = s.child.try_wait() {
                    bail!("sshd exited at start ({st})");
                }
                if Instant::now() > deadline {
                    bail!("sshd not listening on {addr}:{port}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // One login to make sure keys and config work.
        let first = addrs.first().context("no address for sshd")?;
        let st = s.ssh_to(first).arg("true").status()?;
        ensure!(st.success(), "ssh to the loopback sshd failed");
        Ok(s)
    }

    /// PATH with the `ssh`/`scp` wrappers first (the port is the caller's to give: `-p`).
    pub fn path_env(&self) -> std::ffi::OsString {
        path_with(&self._dir.path().join("bin"))
    }

    fn client_opts(&self, port_flag: &str) -> Vec<String> {
        let mut o = vec![port_flag.into(), self.port.to_string()];
        o.extend(client_opts(&self.key));
        o
    }

    /// `ssh <opts> 127.0.0.1` (append the remote command).
    pub fn ssh(&self) -> Command {
        self.ssh_to("127.0.0.1")
    }

    /// `ssh <opts> ADDR` (append the remote command).
    pub fn ssh_to(&self, addr: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args(self.client_opts("-p")).arg(addr);
        c
    }

    /// `scp <opts> -q` (append sources and `127.0.0.1:dest`).
    pub fn scp(&self) -> Command {
        let mut c = Command::new("scp");
        c.args(self.client_opts("-P")).arg("-q");
        c
    }

    /// `rsync -a` over this sshd (append sources and `127.0.0.1:dest`).
    pub fn rsync(&self) -> Command {
        let mut c = Command::new("rsync");
        let ssh = std::iter::once("ssh".to_string())
            .chain(self.client_opts("-p"))
            .collect::<Vec<_>>()
            .join(" ");
        c.args(["-a", "--mkpath", "-e"]).arg(ssh);
        c
    }

    /// The remote-path prefix for scp and rsync.
    pub fn remote(&self, path: &Path) -> String {
        format!("127.0.0.1:{}", path.display())
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An sshd on port 22 of each of some hosts in network namespaces, all taking one client key,
/// and a directory of `ssh` and `scp` wrappers that add it: first on PATH, they let a tool
/// that runs plain `ssh IP CMD` and `scp FILE IP:DIR` (DGL's copy_files.py) reach the hosts.
pub struct NsSshd {
    pub path_dir: PathBuf,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl NsSshd {
    /// sshds for `hosts` (namespace, address), checked with one login each from `client_ns`.
    pub fn start(hosts: &[(String, std::net::Ipv4Addr)], client_ns: &str) -> Result<NsSshd> {
        let sshd = sshd_binary()?;
        let dir = tempfile::tempdir()?;
        let (key, hostkey, auth) = make_keys(dir.path())?;
        let path_dir = dir.path().join("bin");
        write_wrappers(&path_dir, &key)?;
        let empty = dir.path().join("empty-bashrc");
        fs::write(&empty, "")?;
        let mut s = NsSshd {
            path_dir,
            children: Vec::new(),
            _dir: dir,
        };
        for (i, (ns, addr)) in hosts.iter().enumerate() {
            let config = s._dir.path().join(format!("sshd{i}_config"));
            fs::write(
                &config,
                self::config(&[addr.to_string()], 22, &hostkey, &auth),
            )?;
            let child = sshd_command(&["ip", "netns", "exec", ns], &sshd, &config, &empty)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(
                    s._dir.path().join(format!("sshd{i}.log")),
                )?)
                .spawn()
                .context("spawn sshd")?;
            s.children.push(child);
        }
        for (ns, addr) in hosts {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let ok = s
                    .ssh_in(client_ns)
                    .arg(addr.to_string())
                    .arg("true")
                    .stderr(Stdio::null())
                    .status()?
                    .success();
                if ok {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("no ssh login to {addr} (sshd in {ns})");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(s)
    }

    /// `ssh` (the wrapper) run in namespace `ns`; append the host and command.
    fn ssh_in(&self, ns: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(self.path_dir.join("ssh"));
        c
    }

    /// PATH with the wrappers first.
    pub fn path_env(&self) -> std::ffi::OsString {
        path_with(&self.path_dir)
    }
}

impl Drop for NsSshd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
