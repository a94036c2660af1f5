//! The agent's settings: flags, then `DGL_AGENT_*` environment variables, then an optional
//! TOML file (`--config`), then defaults. The first that gives a value wins.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde::{Deserialize, Serialize};

use dglrun_proto::token::{default_token_path, read_or_create, Token, TOKEN_ENV};

use crate::jobs::host_log::HostLogConfig;
use crate::jobs::retention::Retention;
use crate::jobs::JobsConfig;
use crate::server::AgentConfig;

const DEFAULT_LEASE_SECS: f64 = 10.0;
const DEFAULT_GRACE_SECS: f64 = 3.0;
const DEFAULT_LOG_MAX_FILE_SIZE: &str = "256M";
const DEFAULT_LOG_MAX_TOTAL_SIZE: &str = "4G";
const DEFAULT_LOG_RETENTION_DAYS: f64 = 14.0;

/// dgl-agent: runs on every host of a DGL cluster; dgl-coord sends it files and processes.
///
/// Settings come from flags, then DGL_AGENT_* environment variables, then the --config TOML
/// file, then defaults. `--print-config` shows the result.
#[derive(Parser, Debug, Default)]
#[command(name = "dgl-agent", version, about, long_about)]
pub struct Args {
    /// TOML file with any of the settings below (keys as the flags, with `_`: lease_timeout).
    #[arg(long, value_name = "FILE", env = "DGL_AGENT_CONFIG")]
    pub config: Option<PathBuf>,

    /// Print the effective settings as TOML and exit.
    #[arg(long)]
    pub print_config: bool,

    /// Print a shell completion script for SHELL (bash, zsh, fish, ...) and exit.
    #[arg(long, value_name = "SHELL")]
    pub completions: Option<clap_complete::Shell>,

    /// Print the man page (dgl-agent.1) and exit.
    #[arg(long)]
    pub man: bool,

    /// Address to listen on, IP:PORT [default: 127.0.0.1:47001]. Loopback connections may
    /// use plaintext; every other address requires TLS (derived from the token).
    #[arg(long, value_name = "IP:PORT", env = "DGL_AGENT_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// The only directory tree this agent writes to and runs processes in [default: $HOME].
    #[arg(long, value_name = "DIR", env = "DGL_AGENT_ROOT")]
    pub root: Option<PathBuf>,

    /// File holding the shared token every call must carry (or set DGL_AGENT_TOKEN)
    /// [default: $XDG_CONFIG_HOME/dglrun/token, else ~/.config/dglrun/token, created on
    /// first start]. It must not be readable by group or others, and hold 128 bits or more.
    #[arg(long, value_name = "FILE", env = "DGL_AGENT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// This agent's certificate (PEM), for mutual TLS; with --tls-key and --tls-ca.
    #[arg(long, value_name = "PEM", env = "DGL_AGENT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// This agent's private key (PEM).
    #[arg(long, value_name = "PEM", env = "DGL_AGENT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// CA certificate (PEM) that coordinators' certificates must be signed by.
    #[arg(long, value_name = "PEM", env = "DGL_AGENT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Accept plaintext (h2c) on non-loopback addresses too: the token then crosses the
    /// network in clear text, and whoever sees it can run commands as this user.
    #[arg(long, env = "DGL_AGENT_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,

    /// Most connections open at once [default: a quarter of the open-file limit, 16-4096].
    #[arg(long, value_name = "N", env = "DGL_AGENT_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Run although the agent is root (every job would run as root).
    #[arg(long, env = "DGL_AGENT_ALLOW_ROOT")]
    pub allow_root: bool,

    /// Seconds a job survives without its coordinator renewing the lease [default: 10].
    #[arg(long, value_name = "SECONDS", env = "DGL_AGENT_LEASE_TIMEOUT")]
    pub lease_timeout: Option<f64>,

    /// Seconds between SIGTERM and SIGKILL when the agent stops a job on its own [default: 3].
    #[arg(long, value_name = "SECONDS", env = "DGL_AGENT_GRACE")]
    pub grace: Option<f64>,

    /// Serve Prometheus metrics at http://IP:PORT/metrics (off by default). They are not
    /// authenticated: loopback addresses only, unless --metrics-public.
    #[arg(long, value_name = "IP:PORT", env = "DGL_AGENT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Allow --metrics-listen on a non-loopback address (anyone who reaches it reads them).
    #[arg(long, env = "DGL_AGENT_METRICS_PUBLIC")]
    pub metrics_public: bool,

    /// Size at which a process's kept stdout or stderr file (`<root>/.dglrun/jobs/<job>/`) is
    /// rotated; one rotated file is kept. Bytes, or with a K, M or G suffix [default: 256M].
    #[arg(long, value_name = "SIZE", env = "DGL_AGENT_LOG_MAX_FILE_SIZE")]
    pub log_max_file_size: Option<String>,

    /// Finished jobs' logs and records are deleted, oldest first, while all jobs' logs take
    /// more than this [default: 4G].
    #[arg(long, value_name = "SIZE", env = "DGL_AGENT_LOG_MAX_TOTAL_SIZE")]
    pub log_max_total_size: Option<String>,

    /// Finished jobs' logs and records are deleted this many days after the job ended
    /// (fractions allowed) [default: 14].
    #[arg(long, value_name = "DAYS", env = "DGL_AGENT_LOG_RETENTION_DAYS")]
    pub log_retention_days: Option<f64>,
}

/// The TOML file: every key optional, unknown keys refused (a typo must not be ignored).
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub insecure_plaintext: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_root: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_timeout: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_public: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_max_file_size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_max_total_size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_retention_days: Option<f64>,
}

impl FileSettings {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }
}

/// Settings after precedence, before secrets are read.
#[derive(Debug, Serialize, PartialEq)]
pub struct Effective {
    pub listen: SocketAddr,
    pub root: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    pub insecure_plaintext: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    pub allow_root: bool,
    pub lease_timeout: f64,
    pub grace: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    pub metrics_public: bool,
    pub log_max_file_size: String,
    pub log_max_total_size: String,
    pub log_retention_days: f64,
}

impl Effective {
    pub fn resolve(args: &Args, home: Option<PathBuf>) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(p) => FileSettings::load(p)?,
            None => FileSettings::default(),
        };
        let root = match args.root.clone().or(file.root) {
            Some(r) => r,
            None => home.ok_or_else(|| anyhow::anyhow!("--root not given and HOME is not set"))?,
        };
        let eff = Self {
            listen: args.listen.or(file.listen).unwrap_or(SocketAddr::from((
                [127, 0, 0, 1],
                dglrun_proto::DEFAULT_AGENT_PORT,
            ))),
            root,
            token_file: args.token_file.clone().or(file.token_file),
            tls_cert: args.tls_cert.clone().or(file.tls_cert),
            tls_key: args.tls_key.clone().or(file.tls_key),
            tls_ca: args.tls_ca.clone().or(file.tls_ca),
            // A flag can only switch these on; the file decides when no flag is given.
            insecure_plaintext: args.insecure_plaintext || file.insecure_plaintext.unwrap_or(false),
            max_connections: args.max_connections.or(file.max_connections),
            allow_root: args.allow_root || file.allow_root.unwrap_or(false),
            lease_timeout: args
                .lease_timeout
                .or(file.lease_timeout)
                .unwrap_or(DEFAULT_LEASE_SECS),
            grace: args.grace.or(file.grace).unwrap_or(DEFAULT_GRACE_SECS),
            metrics_listen: args.metrics_listen.or(file.metrics_listen),
            metrics_public: args.metrics_public || file.metrics_public.unwrap_or(false),
            log_max_file_size: args
                .log_max_file_size
                .clone()
                .or(file.log_max_file_size)
                .unwrap_or_else(|| DEFAULT_LOG_MAX_FILE_SIZE.to_string()),
            log_max_total_size: args
                .log_max_total_size
                .clone()
                .or(file.log_max_total_size)
                .unwrap_or_else(|| DEFAULT_LOG_MAX_TOTAL_SIZE.to_string()),
            log_retention_days: args
                .log_retention_days
                .or(file.log_retention_days)
                .unwrap_or(DEFAULT_LOG_RETENTION_DAYS),
        };
        if eff.max_connections == Some(0) {
            anyhow::bail!("max-connections must be at least 1");
        }
        secs("lease-timeout", eff.lease_timeout)?;
        secs("grace", eff.grace)?;
        eff.host_logs()?;
        Ok(eff)
    }

    fn host_logs(&self) -> anyhow::Result<HostLogConfig> {
        let days = self.log_retention_days;
        let age = secs("log-retention-days", days * 86_400.0).map_err(|_| {
            anyhow::anyhow!("log-retention-days must be a positive number of days, not {days}")
        })?;
        Ok(HostLogConfig {
            max_file_bytes: size("log-max-file-size", &self.log_max_file_size)?,
            retention: Retention {
                max_total_bytes: size("log-max-total-size", &self.log_max_total_size)?,
                max_age: age,
            },
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// The server configuration, with the token already read and the open-file limit known.
    pub fn into_config(self, token: Option<Token>, nofile: u64) -> anyhow::Result<AgentConfig> {
        let host_logs = self.host_logs()?;
        let tls =
            dglrun_proto::tls::TlsFiles::from_flags(self.tls_cert, self.tls_key, self.tls_ca)?;
        Ok(AgentConfig {
            listen: self.listen,
            root: self.root,
            token,
            insecure_plaintext: self.insecure_plaintext,
            tls,
            metrics_listen: self.metrics_listen,
            metrics_public: self.metrics_public,
            max_connections: self
                .max_connections
                .unwrap_or_else(|| crate::listen::max_connections_for(nofile)),
            jobs: JobsConfig {
                lease_timeout: secs("lease-timeout", self.lease_timeout)?,
                grace: secs("grace", self.grace)?,
                host_logs,
            },
        })
    }
}

/// A size in bytes: digits, optionally followed by K, M or G (powers of 1024).
fn size(name: &str, v: &str) -> anyhow::Result<u64> {
    let t = v.trim();
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let shift = match unit.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => anyhow::bail!("{name} must be a size such as 4096, 64K, 256M or 4G, not {v:?}"),
    };
    digits
        .parse::<u64>()
        .ok()
        .filter(|&n| n > 0)
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{name} must be a positive size such as 4096, 64K, 256M or 4G, not {v:?}"
            )
        })
}

fn secs(name: &str, v: f64) -> anyhow::Result<Duration> {
    if v.is_finite() && v > 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        anyhow::bail!("{name} must be a positive number of seconds, not {v}")
    }
}

/// Where the token comes from, first match wins: `--token-file` (or `DGL_AGENT_TOKEN_FILE`),
/// `DGL_AGENT_TOKEN`, nothing when user-supplied TLS authenticates instead, else the per-user
/// default file, created on first start.
pub fn resolve_token(
    token_file: Option<&Path>,
    token_env: Option<String>,
    user_tls: bool,
) -> anyhow::Result<Option<Token>> {
    if let Some(f) = token_file {
        return Ok(Some(Token::read_file(f)?));
    }
    if let Some(t) = token_env {
        return Ok(Some(Token::parse(&t, &format!("in {TOKEN_ENV}"))?));
    }
    if user_tls {
        return Ok(None);
    }
    let path = default_token_path()?;
    let (token, created) = read_or_create(&path)?;
    if created {
        eprintln!(
            "dgl-agent: created the token file {} (dgl-coord of this user reads it by default; \
             copy it, mode 0600, to every host and to the coordinator's)",
            path.display()
        );
    }
    Ok(Some(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("agent.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn flags_beat_file_beats_defaults() {
        let d = tempfile::tempdir().unwrap();
        let cfg = write(
            d.path(),
            "listen = \"127.0.0.9:5000\"\nroot = \"/srv/r\"\ngrace = 7.5\n",
        );
        let args = Args {
            config: Some(cfg),
            listen: Some("127.0.0.2:6000".parse().unwrap()),
            ..Args::default()
        };
        let eff = Effective::resolve(&args, Some("/home/u".into())).unwrap();
        assert_eq!(eff.listen, "127.0.0.2:6000".parse().unwrap());
        assert_eq!(eff.root, PathBuf::from("/srv/r"));
        assert_eq!(eff.grace, 7.5);
        assert_eq!(eff.lease_timeout, DEFAULT_LEASE_SECS);
    }

    #[test]
    fn defaults_without_file() {
        let eff = Effective::resolve(&Args::default(), Some("/home/u".into())).unwrap();
        assert_eq!(eff.root, PathBuf::from("/home/u"));
        assert_eq!(eff.listen.port(), dglrun_proto::DEFAULT_AGENT_PORT);
        assert!(!eff.insecure_plaintext);
    }

    #[test]
    fn file_errors_name_the_file() {
        let d = tempfile::tempdir().unwrap();
        let cfg = write(d.path(), "lease_timout = 3\n");
        let args = Args {
            config: Some(cfg.clone()),
            ..Args::default()
        };
        let err = Effective::resolve(&args, None).unwrap_err().to_string();
        assert!(
            err.contains(&cfg.display().to_string()) && err.contains("lease_timout"),
            "{err}"
        );
        let bad = Args {
            grace: Some(-1.0),
            ..Args::default()
        };
        assert!(Effective::resolve(&bad, Some("/h".into())).is_err());
    }

    #[test]
    fn log_sizes_take_suffixes_and_refuse_nonsense() {
        assert_eq!(size("s", "4096").unwrap(), 4096);
        assert_eq!(size("s", "64K").unwrap(), 64 << 10);
        assert_eq!(size("s", "256MiB").unwrap(), 256 << 20);
        assert_eq!(size("s", "4g").unwrap(), 4 << 30);
        for bad in ["", "0", "-1", "12T", "M", "1.5G"] {
            let e = size("log-max-file-size", bad).unwrap_err().to_string();
            assert!(e.contains("log-max-file-size"), "{e}");
        }
        let bad = Args {
            log_retention_days: Some(0.0),
            ..Args::default()
        };
        assert!(Effective::resolve(&bad, Some("/h".into())).is_err());
    }

    #[test]
    fn printed_config_reads_back() {
        let eff = Effective::resolve(&Args::default(), Some("/home/u".into())).unwrap();
        let back: FileSettings = toml::from_str(&eff.to_toml()).unwrap();
        assert_eq!(back.root, Some(PathBuf::from("/home/u")));
        assert_eq!(back.lease_timeout, Some(DEFAULT_LEASE_SECS));
    }
}
