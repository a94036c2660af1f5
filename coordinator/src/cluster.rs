//! Reaching the agents: one per ip_config machine, at `IP_m:agent_port`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use dglrun_proto::meta::ClientMeta;
use dglrun_proto::pb::agent_client::AgentClient;
use dglrun_proto::pb::{HelloReply, HelloRequest};
use dglrun_proto::tls::TlsFiles;
use dglrun_proto::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION, VERSION};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::config::IpConfig;

pub type Client = AgentClient<InterceptedService<Channel, ClientMeta>>;

/// Environment variable naming the agent port when `--agent-port` is not given.
pub const AGENT_PORT_ENV: &str = "DGL_AGENT_PORT";
/// Environment variable holding the token when no `--token-file` is given.
pub const TOKEN_ENV: &str = "DGL_AGENT_TOKEN";

/// How to reach the agents, from the command line.
#[derive(Clone, Debug, Default)]
pub struct AgentAccess {
    pub port: u16,
    pub token: Option<String>,
    pub tls: Option<TlsFiles>,
}

impl AgentAccess {
    /// Token from `token_file` if given, else from `DGL_AGENT_TOKEN`.
    pub fn new(port: u16, token_file: Option<&Path>) -> anyhow::Result<Self> {
        let token = match token_file {
            Some(f) => Some(read_token(f)?),
            None => std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()),
        };
        Ok(Self {
            port,
            token,
            tls: None,
        })
    }

    /// Use mutual TLS (`--tls-cert --tls-key --tls-ca`).
    pub fn with_tls(mut self, tls: Option<TlsFiles>) -> Self {
        self.tls = tls;
        self
    }

    /// The endpoint of the agent at `addr`, with TLS when configured. Every connection to an
    /// agent must be made from here, so none bypasses TLS.
    pub fn endpoint(&self, addr: SocketAddr) -> anyhow::Result<Endpoint> {
        match &self.tls {
            None => Ok(endpoint(addr, "http")),
            Some(tls) => {
                let config = tls
                    .client(&addr.ip().to_string())
                    .map_err(anyhow::Error::msg)?;
                Ok(endpoint(addr, "https").tls_config(config)?)
            }
        }
    }

    /// A new connection (not shared with other clients) to the agent at `addr`.
    pub async fn channel(&self, addr: SocketAddr) -> anyhow::Result<Channel> {
        self.endpoint(addr)?
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("{}", error_chain(&e)))
    }
}

pub fn read_token(path: &Path) -> anyhow::Result<String> {
    dglrun_proto::meta::read_token_file(path).map_err(anyhow::Error::msg)
}

/// One machine of the cluster and a connection to its agent.
#[derive(Clone)]
pub struct Host {
    pub rank: usize,
    pub ip: IpAddr,
    pub addr: SocketAddr,
    pub client: Client,
    pub hello: HelloReply,
}

impl Host {
    /// `m0 (10.0.0.1:47001)`: how a host is named in messages.
    pub fn name(&self) -> String {
        format!("m{} ({})", self.rank, self.addr)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("agent of machine {rank} at {addr} is unreachable: {reason}")]
    Unreachable {
        rank: usize,
        addr: SocketAddr,
        reason: String,
    },
    #[error("agent of machine {rank} at {addr} refused the coordinator: {reason}")]
    Refused {
        rank: usize,
        addr: SocketAddr,
        reason: String,
    },
}

fn endpoint(addr: SocketAddr, scheme: &str) -> Endpoint {
    // Large HTTP/2 windows keep a 4 MiB chunk stream from stalling on flow control.
    Endpoint::from(
        tonic::transport::Uri::builder()
            .scheme(scheme)
            .authority(addr.to_string())
            .path_and_query("/")
            .build()
            .unwrap_or_default(),
    )
    .connect_timeout(Duration::from_secs(5))
    .tcp_nodelay(true)
    .http2_keep_alive_interval(Duration::from_secs(5))
    .keep_alive_timeout(Duration::from_secs(10))
    .keep_alive_while_idle(true)
    .initial_stream_window_size(Some(32 << 20))
    .initial_connection_window_size(Some(64 << 20))
}

pub fn client(channel: Channel, access: &AgentAccess) -> anyhow::Result<Client> {
    let meta = ClientMeta::new(access.token.as_deref()).map_err(anyhow::Error::msg)?;
    Ok(AgentClient::with_interceptor(channel, meta)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Connects to one agent and shakes hands.
pub async fn connect(rank: usize, ip: IpAddr, access: &AgentAccess) -> Result<Host, ConnectError> {
    let addr = SocketAddr::new(ip, access.port);
    let unreachable = |reason: String| ConnectError::Unreachable { rank, addr, reason };
    let channel = access
        .channel(addr)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let mut client = client(channel, access).map_err(|e| unreachable(e.to_string()))?;
    let hello = client
        .hello(HelloRequest {
            protocol_version: PROTOCOL_VERSION,
            client_version: VERSION.to_string(),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown => unreachable(s.message().to_string()),
            _ => ConnectError::Refused {
                rank,
                addr,
                reason: s.message().to_string(),
            },
        })?
        .into_inner();
    Ok(Host {
        rank,
        ip,
        addr,
        client,
        hello,
    })
}

/// Connects to every machine's agent at once; fails naming every agent that could not be reached.
pub async fn connect_all(ips: &IpConfig, access: &AgentAccess) -> anyhow::Result<Vec<Host>> {
    let attempts = ips.machines.iter().map(|m| connect(m.rank, m.ip, access));
    let results = futures::future::join_all(attempts).await;
    let mut hosts = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(h) => hosts.push(h),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        anyhow::bail!("{}", errors.join("\n"));
    }
    Ok(hosts)
}

/// The innermost causes of an error, joined: tonic's top-level transport error says little.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}
