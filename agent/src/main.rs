use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use dglrun_agent::jobs::JobsConfig;
use dglrun_agent::server::{self, AgentConfig};

/// dgl-agent: runs on every host of a DGL cluster; dgl-coord sends it files and processes.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Address to listen on, IP:PORT. Without a token only loopback addresses are allowed.
    #[arg(long, env = "DGL_AGENT_LISTEN", default_value_t = SocketAddr::from(([127, 0, 0, 1], dglrun_proto::DEFAULT_AGENT_PORT)))]
    listen: SocketAddr,

    /// The only directory tree this agent writes to and runs processes in [default: $HOME].
    #[arg(long, env = "DGL_AGENT_ROOT")]
    root: Option<PathBuf>,

    /// File holding the shared token every call must carry.
    #[arg(long, env = "DGL_AGENT_TOKEN_FILE")]
    token_file: Option<PathBuf>,

    /// Listen on a non-loopback address without a token (anyone who reaches it can run commands).
    #[arg(long)]
    insecure: bool,

    /// This agent's certificate (PEM), for mutual TLS; with --tls-key and --tls-ca.
    #[arg(long, env = "DGL_AGENT_TLS_CERT")]
    tls_cert: Option<PathBuf>,

    /// This agent's private key (PEM).
    #[arg(long, env = "DGL_AGENT_TLS_KEY")]
    tls_key: Option<PathBuf>,

    /// CA certificate (PEM) that coordinators' certificates must be signed by.
    #[arg(long, env = "DGL_AGENT_TLS_CA")]
    tls_ca: Option<PathBuf>,

    /// Run although the agent is root (every job would run as root).
    #[arg(long)]
    allow_root: bool,

    /// A job whose coordinator has not renewed its lease for this long is stopped, in seconds.
    #[arg(long, env = "DGL_AGENT_LEASE_TIMEOUT", default_value_t = 10.0)]
    lease_timeout: f64,

    /// Time between SIGTERM and SIGKILL when the agent stops a job on its own, in seconds.
    #[arg(long, env = "DGL_AGENT_GRACE", default_value_t = 3.0)]
    grace: f64,
}

/// Variables that must not reach the processes the agent starts.
const SECRET_ENV: &[&str] = &["DGL_AGENT_TOKEN", "DGL_AGENT_TOKEN_FILE"];

fn main() {
    let args = Args::parse();
    // Read the token before scrubbing, and scrub before any thread exists: jobs inherit the
    // agent's environment.
    let token = match token(&args) {
        Ok(t) => t,
        Err(e) => fail(e),
    };
    for k in SECRET_ENV {
        std::env::remove_var(k);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => fail(e.into()),
    };
    if let Err(e) = runtime.block_on(run(args, token)) {
        fail(e);
    }
}

fn fail(e: anyhow::Error) -> ! {
    eprintln!("dgl-agent: error: {e:#}");
    std::process::exit(1);
}

fn token(args: &Args) -> anyhow::Result<Option<String>> {
    Ok(match &args.token_file {
        Some(f) => Some(read_token(f)?),
        None => std::env::var("DGL_AGENT_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
    })
}

async fn run(args: Args, token: Option<String>) -> anyhow::Result<()> {
    if nix::unistd::geteuid().is_root() && !args.allow_root {
        anyhow::bail!(
            "refusing to run as root: every job would run as root. Start dgl-agent as an \
             ordinary user, or pass --allow-root"
        );
    }
    let root = match args.root {
        Some(r) => r,
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .ok_or_else(|| anyhow::anyhow!("--root not given and HOME is not set"))?,
    };
    let tls = dglrun_proto::tls::TlsFiles::from_flags(args.tls_cert, args.tls_key, args.tls_ca)
        .map_err(anyhow::Error::msg)?;
    let secs = |name: &str, v: f64| {
        if v.is_finite() && v > 0.0 {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(anyhow::anyhow!(
                "--{name} must be a positive number of seconds, not {v}"
            ))
        }
    };
    server::run(AgentConfig {
        listen: args.listen,
        root,
        token,
        insecure: args.insecure,
        tls,
        jobs: JobsConfig {
            lease_timeout: secs("lease-timeout", args.lease_timeout)?,
            grace: secs("grace", args.grace)?,
        },
    })
    .await
}

fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read token file {}: {e}", path.display()))?;
    let token = text.trim().to_string();
    anyhow::ensure!(!token.is_empty(), "token file {} is empty", path.display());
    Ok(token)
}
