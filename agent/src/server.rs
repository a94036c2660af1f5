//! Builds the agent from its configuration and serves it until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dglrun_proto::meta::ServerCheck;
use dglrun_proto::pb::agent_server::AgentServer;
use dglrun_proto::tls::TlsFiles;
use dglrun_proto::MAX_MESSAGE_BYTES;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;

use crate::confine::Root;
use crate::files::Files;
use crate::jobs::{Jobs, JobsConfig};
use crate::service::AgentService;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub listen: SocketAddr,
    pub root: PathBuf,
    pub token: Option<String>,
    pub insecure: bool,
    pub tls: Option<TlsFiles>,
    pub metrics_listen: Option<SocketAddr>,
    pub jobs: JobsConfig,
}

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let authenticated = config.token.is_some() || config.tls.is_some();
    if !authenticated && !config.listen.ip().is_loopback() && !config.insecure {
        anyhow::bail!(
            "refusing to listen on {} without authentication: give --token-file or \
             --tls-cert/--tls-key/--tls-ca, or --insecure to accept commands from anyone who \
             can reach this address",
            config.listen
        );
    }
    if !authenticated {
        if config.insecure && !config.listen.ip().is_loopback() {
            tracing::warn!(listen = %config.listen, "no token: anyone who can reach this address can run commands as this user");
        } else {
            tracing::info!("no token: listening on loopback only");
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
    let service = AgentService::new(root.clone(), files, jobs.clone());
    if let Some(addr) = config.metrics_listen {
        let serving = crate::metrics::serve(crate::metrics::bind(addr).await?, jobs.clone());
        tokio::spawn(async move {
            if let Err(e) = serving.await {
                tracing::error!("metrics server stopped: {e:#}");
            }
        });
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let local = listener.local_addr()?;
    // One stdout line tests and scripts can wait for; logs go to stderr.
    println!(
        "dgl-agent listening on {local} root {}",
        root.path().display()
    );
    tracing::info!(%local, root = %root.path().display(), "dgl-agent ready");

    let svc = InterceptedService::new(
        AgentServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        ServerCheck::new(config.token.clone()),
    );
    // Jobs are stopped before the server stops accepting: open Watch streams would otherwise
    // hold the server up, and their coordinators should see the exits.
    let jobs_at_shutdown = jobs.clone();
    let shutdown = async move {
        wait_for_shutdown_signal().await;
        tracing::info!("shutting down: stopping jobs");
        jobs_at_shutdown.shutdown().await;
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder
            .tls_config(tls.server().map_err(anyhow::Error::msg)?)
            .context("invalid TLS configuration")?;
    }
    builder
        .tcp_nodelay(true)
        // 1 MiB frames instead of 16 KiB: a 4 MiB chunk costs 4 frames, not 256 (about 20%
        // of the agent's CPU per received byte).
        .max_frame_size(Some(1 << 20))
        .initial_stream_window_size(Some(32 << 20))
        .initial_connection_window_size(Some(64 << 20))
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await
        .context("agent server failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Accepted connections with Nagle off: the builder's `tcp_nodelay` does not reach sockets we
/// accept ourselves, and every small unary reply would wait for a delayed ACK.
fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
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
