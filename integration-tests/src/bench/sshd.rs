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

impl Sshd {
    pub fn start() -> Result<Sshd> {
        ensure_installed()?;
        let sshd = find("sshd", &["/usr/sbin/sshd"]).context("sshd not found")?;
        if nix::unistd::geteuid().is_root() {
            // sshd insists on its privilege separation directory, made by its service unit.
            fs::create_dir_all("/run/sshd")?;
        }
        let dir = tempfile::tempdir()?;
        let key = dir.path().join("id");
        let hostkey = dir.path().join("hostkey");
        for k in [&key, &hostkey] {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(k)
                .stdout(Stdio::null())
                .status()?;
            ensure!(st.success(), "ssh-keygen failed");
        }
        let auth = dir.path().join("authorized_keys");
        fs::copy(dir.path().join("id.pub"), &auth)?;
        let port = super::free_port()?;
        let config = dir.path().join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
                 PidFile none\nStrictModes no\nPermitRootLogin yes\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nUseDNS no\nMaxStartups 1000\n\
                 MaxSessions 1000\nLogLevel ERROR\nSubsystem sftp internal-sftp\n",
                hostkey.display(),
                auth.display()
            ),
        )?;
        let child = Command::new(&sshd)
            .arg("-D")
            .arg("-f")
            .arg(&config)
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
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if let Ok(Some(st)) = s.child.try_wait() {
                bail!("sshd exited at start ({st})");
            }
            if Instant::now() > deadline {
                bail!("sshd not listening on 127.0.0.1:{port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // One login to make sure keys and config work.
        let st = s.ssh().arg("true").status()?;
        ensure!(st.success(), "ssh to the loopback sshd failed");
        Ok(s)
    }

    fn client_opts(&self, port_flag: &str) -> Vec<String> {
        vec![
            port_flag.into(),
            self.port.to_string(),
            "-i".into(),
            self.key.display().to_string(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ]
    }

    /// `ssh <opts> 127.0.0.1` (append the remote command).
    pub fn ssh(&self) -> Command {
        let mut c = Command::new("ssh");
        c.args(self.client_opts("-p")).arg("127.0.0.1");
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
