//! Builds the agent from its configuration and serves it on a listener until a shutdown
//! future completes (`run`, which tests call in-process on `127.0.0.1:0`), or on its
//! configured address until SIGTERM or SIGINT (`run_until_signal`, the binary's).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dglrun_proto::meta::ServerCheck;
use dglrun_proto::pb::agent_server::AgentServer;
use dglrun_proto::tls::TlsFiles;
use dglrun_proto::token::Token;
use dglrun_proto::token_tls::TokenKeys;
use dglrun_proto::MAX_MESSAGE_BYTES;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;

use crate::confine::Root;
use crate::files::Files;
use crate::jobs::{Jobs, JobsConfig};
use crate::listen::ListenPolicy;
use crate::service::AgentService;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub listen: SocketAddr,
    pub root: PathBuf,
    /// Every request must carry it, unless it came over user-supplied mutual TLS.
    pub token: Option<Token>,
    /// Accept plaintext h2c on non-loopback addresses (the token then crosses in clear).
    pub insecure_plaintext: bool,
    pub tls: Option<TlsFiles>,
    pub metrics_listen: Option<SocketAddr>,
    /// Allow `metrics_listen` on a non-loopback address.
    pub metrics_public: bool,
    pub max_connections: usize,
    pub jobs: JobsConfig,
}

/// How long a new connection has for its TLS handshake (or first plaintext byte).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may stay open without one authenticated request.
const AUTH_TIMEOUT: Duration = Duration::from_secs(30);

/// Which transports the listener accepts, from the configuration.
fn listen_policy(config: &AgentConfig) -> anyhow::Result<ListenPolicy> {
    let tls = match (&config.tls, &config.token) {
        (Some(files), _) => Some(files.rustls_server()?),
        (None, Some(token)) => Some(
            TokenKeys::derive(token)
                .and_then(|k| k.server_config())
                .context("cannot set up TLS from the token")?,
        ),
        (None, None) => None,
    };
    if tls.is_none() && config.token.is_none() {
        anyhow::bail!("no token and no TLS: the agent authenticates every request");
    }
    Ok(ListenPolicy {
        tls: tls.map(Arc::new),
        // Without a token only certified TLS peers get in, on loopback too.
        loopback_plaintext: config.token.is_some(),
        insecure_plaintext: config.insecure_plaintext && config.token.is_some(),
        max_connections: config.max_connections,
        handshake_timeout: HANDSHAKE_TIMEOUT,
        auth_timeout: AUTH_TIMEOUT,
    })
}

/// Binds `config.listen` and serves until SIGTERM or SIGINT.
pub async fn run_until_signal(config: AgentConfig) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    run(config, listener, wait_for_shutdown_signal()).await
}

/// Serves the agent on `listener` (`config.listen` is not used) until `shutdown` completes;
/// then stops every job and returns.
pub async fn run(
    config: AgentConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let policy = listen_policy(&config)?;
    if policy.insecure_plaintext {
        tracing::warn!(
            listen = %config.listen,
            "--insecure-plaintext: the token crosses the network in clear text on non-loopback \
             addresses; whoever sees one request can run commands as this user"
        );
    }
    if let Some(addr) = config.metrics_listen {
        if metrics_exposed(addr, config.metrics_public)? {
            tracing::warn!(%addr, "metrics are served without authentication on a non-loopback address");
        }
    }
    let root = Root::new(&config.root)
        .with_context(|| format!("cannot use {} as the agent root", config.root.display()))?;
    // Before anything else touches the root: a previous run's jobs may still hold its ports.
    let (r, grace) = (root.clone(), config.jobs.grace);
    let _root_lock = tokio::task::spawn_blocking(move || crate::restart::take_over(&r, grace))
        .await
        .context("start-up clean-up failed")??;
    let jobs = Jobs::start(root.clone(), config.jobs.clone())?;
    let files = Arc::new(Files::new(root.clone()).with_workspaces(jobs.workspaces().clone()));
    let access = match &config.token {
        Some(_) => dglrun_coordinator::cluster::AgentAccess::with_token(
            listener.local_addr()?.port(),
            config.token.clone(),
            config.tls.clone(),
            config.insecure_plaintext,
        )
        .map_err(crate::supervise::NoPeerAccess::Setup),
        None => Err(crate::supervise::NoPeerAccess::NoToken),
    };
    let supervisor = crate::supervise::Supervisor::start(root.state_dir(), access);
    let service = AgentService::new(root.clone(), files, jobs.clone()).with_supervisor(supervisor);
    if let Some(addr) = config.metrics_listen {
        let serving = crate::metrics::serve(crate::metrics::bind(addr).await?, jobs.gauges());
        tokio::spawn(async move {
            if let Err(e) = serving.await {
                tracing::error!("metrics server stopped: {e:#}");
            }
        });
    }
    let local = listener.local_addr()?;
    // One stdout line tests and scripts can wait for; logs go to stderr.
    println!(
        "dgl-agent listening on {local} root {}",
        root.path().display()
    );
    tracing::info!(
        %local,
        root = %root.path().display(),
        max_connections = config.max_connections,
        "dgl-agent ready"
    );

    serve(service, &config, listener, policy, jobs, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Metrics are not authenticated: served on loopback, or elsewhere only when the operator
/// said so (`Ok(true)`: exposed, worth a warning).
fn metrics_exposed(addr: SocketAddr, public: bool) -> anyhow::Result<bool> {
    if addr.ip().to_canonical().is_loopback() {
        return Ok(false);
    }
    if !public {
        anyhow::bail!(
            "refusing to serve metrics on {addr}: they are not authenticated, so only \
             loopback addresses are allowed; add --metrics-public to serve them there"
        );
    }
    Ok(true)
}

/// The gRPC server on `listener` until `shutdown`, which stops every job first.
async fn serve(
    service: AgentService,
    config: &AgentConfig,
    listener: TcpListener,
    policy: ListenPolicy,
    jobs: Arc<Jobs>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let svc = InterceptedService::new(
        AgentServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        ServerCheck::new(config.token.as_ref()),
    );
    // Jobs are stopped before the server stops accepting: open Watch streams would otherwise
    // hold the server up, and their coordinators should see the exits.
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: stopping jobs");
        jobs.shutdown().await;
    };
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // 1 MiB frames instead of 16 KiB: a 4 MiB chunk costs 4 frames, not 256 (about 20%
        // of the agent's CPU per received byte).
        .max_frame_size(Some(1 << 20))
        .initial_stream_window_size(Some(32 << 20))
        .initial_connection_window_size(Some(64 << 20))
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(svc)
        .serve_with_incoming_shutdown(crate::listen::incoming(listener, policy), shutdown)
        .await
        .context("agent server failed")
}

async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the agent still serves; it just cannot shut down gracefully.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_stay_on_loopback_unless_made_public() {
        for (addr, public, want) in [
            ("127.0.0.1:9100", false, Some(false)),
            ("[::1]:9100", false, Some(false)),
            ("[::ffff:127.0.0.1]:9100", false, Some(false)),
            ("10.0.0.1:9100", false, None),
            ("0.0.0.0:9100", false, None),
            ("10.0.0.1:9100", true, Some(true)),
            ("127.0.0.1:9100", true, Some(false)),
        ] {
            let got = metrics_exposed(addr.parse().unwrap(), public).ok();
            assert_eq!(got, want, "{addr} public {public}");
        }
    }
}
