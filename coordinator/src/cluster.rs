//! Reaching the agents: one per ip_config machine, at `IP_m:agent_port`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use dglrun_proto::meta::ClientMeta;
use dglrun_proto::pb::agent_client::AgentClient;
use dglrun_proto::pb::{HelloReply, HelloRequest};
use dglrun_proto::tls::TlsFiles;
use dglrun_proto::token::{default_token_path, Token};
use dglrun_proto::token_tls::{self, TokenKeys};
use dglrun_proto::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION, VERSION};
use rustls::pki_types::ServerName;
use std::sync::Arc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

pub use dglrun_proto::error_chain;

use crate::config::IpConfig;

pub mod call;
mod transport;

pub use transport::{ConnectFailure, Peer};

pub type Client = AgentClient<InterceptedService<Channel, ClientMeta>>;
/// A `Client`'s connection as a plain service, for calls framed without the generated client
/// (`copy::put_wire`).
pub type Service = InterceptedService<Channel, ClientMeta>;

/// Environment variable naming the agent port when `--agent-port` is not given.
pub const AGENT_PORT_ENV: &str = "DGL_AGENT_PORT";
/// Environment variable holding the token when no `--token-file` is given.
pub const TOKEN_ENV: &str = dglrun_proto::token::TOKEN_ENV;

/// How to reach the agents, from the command line.
#[derive(Clone, Debug)]
pub struct AgentAccess {
    pub port: u16,
    pub token: Option<Token>,
    pub tls: Option<TlsFiles>,
    /// Plaintext h2c to non-loopback agents too (`--insecure-plaintext`).
    pub insecure_plaintext: bool,
    token_tls: Option<Arc<rustls::ClientConfig>>,
    user_tls: Option<Arc<rustls::ClientConfig>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(transparent)]
    Token(#[from] dglrun_proto::token::TokenError),
    #[error(
        "no token: {path} does not exist. dgl-agent creates it on its first start on this host; \
         otherwise copy the agents' token file here (mode 0600), or give --token-file or \
         DGL_AGENT_TOKEN_FILE"
    )]
    NoToken { path: std::path::PathBuf },
    #[error("cannot set up TLS from the token")]
    TokenTls(#[source] dglrun_proto::token_tls::TokenTlsError),
    #[error(transparent)]
    UserTls(dglrun_proto::tls::TlsError),
}

impl AgentAccess {
    /// The token: `token_file`, else `DGL_AGENT_TOKEN`, else none with user-supplied TLS,
    /// else the per-user default file (which must exist: only an agent creates it).
    pub fn new(
        port: u16,
        token_file: Option<&Path>,
        tls: Option<TlsFiles>,
        insecure_plaintext: bool,
    ) -> Result<Self, AccessError> {
        let env = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty());
        let token = match (token_file, env) {
            (Some(f), _) => Some(Token::read_file(f)?),
            (None, Some(t)) => Some(Token::parse(&t, &format!("in {TOKEN_ENV}"))?),
            (None, None) if tls.is_some() => None,
            (None, None) => {
                let path = default_token_path()?;
                if !path.exists() {
                    return Err(AccessError::NoToken { path });
                }
                Some(Token::read_file(&path)?)
            }
        };
        Self::with_token(port, token, tls, insecure_plaintext)
    }

    /// From a token already read (an agent reaching the others with its own).
    pub fn with_token(
        port: u16,
        token: Option<Token>,
        tls: Option<TlsFiles>,
        insecure_plaintext: bool,
    ) -> Result<Self, AccessError> {
        let token_tls = match &token {
            Some(t) => Some(Arc::new(
                TokenKeys::derive(t)
                    .and_then(|k| k.client_config())
                    .map_err(AccessError::TokenTls)?,
            )),
            None => None,
        };
        let user_tls = match &tls {
            Some(f) => Some(Arc::new(f.rustls_client().map_err(AccessError::UserTls)?)),
            None => None,
        };
        Ok(Self {
            port,
            token,
            tls,
            insecure_plaintext,
            token_tls,
            user_tls,
        })
    }

    /// The same access to agents listening on another port.
    pub fn with_port(&self, port: u16) -> Self {
        Self {
            port,
            ..self.clone()
        }
    }

    /// A connector for `addr`: the user's TLS for every address when given; otherwise TLS
    /// from the token for every non-loopback address, plaintext on loopback. Every connection
    /// to an agent is made through here, so none bypasses TLS.
    fn connector(&self, addr: SocketAddr) -> anyhow::Result<transport::Connector> {
        let loopback = addr.ip().to_canonical().is_loopback();
        let tls = if let Some(c) = &self.user_tls {
            let name = ServerName::IpAddress(addr.ip().into());
            Some((c.clone(), name))
        } else if loopback || self.insecure_plaintext {
            None
        } else {
            let c = self
                .token_tls
                .clone()
                .ok_or_else(|| anyhow::anyhow!("no token to set up TLS with"))?;
            Some((c, ServerName::try_from(token_tls::SERVER_NAME)?))
        };
        Ok(transport::Connector {
            addr,
            token_tls: self.user_tls.is_none(),
            tls,
            diag: Arc::default(),
        })
    }

    /// A new connection (not shared with other clients) to the agent at `addr`.
    pub async fn channel(&self, addr: SocketAddr) -> anyhow::Result<Channel> {
        endpoint(addr)
            .connect_with_connector(self.connector(addr)?)
            .await
            .map_err(|e| anyhow::anyhow!("{}", error_chain(&e)))
    }

    /// A connection made on first use (and remade after it breaks).
    pub fn lazy_channel(&self, addr: SocketAddr) -> anyhow::Result<Channel> {
        Ok(endpoint(addr).connect_with_connector_lazy(self.connector(addr)?))
    }

    /// A connection and what its first bytes said about the other end.
    async fn diagnosed_channel(
        &self,
        addr: SocketAddr,
    ) -> anyhow::Result<(Channel, transport::Diagnosis)> {
        let connector = self.connector(addr)?;
        let diag = connector.diag.clone();
        let ch = endpoint(addr)
            .connect_with_connector(connector)
            .await
            .map_err(|e| anyhow::anyhow!("{}", error_chain(&e)))?;
        Ok((ch, diag))
    }
}

/// One machine of the cluster and a connection to its agent.
#[derive(Clone)]
pub struct Host {
    pub rank: usize,
    pub ip: IpAddr,
    pub addr: SocketAddr,
    pub client: Client,
    /// The same connection as `client`.
    pub service: Service,
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

fn endpoint(addr: SocketAddr) -> Endpoint {
    // Large HTTP/2 windows keep a 4 MiB chunk stream from stalling on flow control. The
    // scheme is http whatever the transport: TLS, where used, is the connector's.
    Endpoint::from(
        tonic::transport::Uri::builder()
            .scheme("http")
            .authority(addr.to_string())
            .path_and_query("/")
            .build()
            .unwrap_or_default(),
    )
    // A dropped SYN is retried after 1 s and 3 s: 3 s covers a slow link, and a blackholed
    // host is named soon.
    .connect_timeout(Duration::from_secs(3))
    .tcp_nodelay(true)
    .http2_keep_alive_interval(Duration::from_secs(5))
    .keep_alive_timeout(Duration::from_secs(10))
    .keep_alive_while_idle(true)
    .initial_stream_window_size(Some(32 << 20))
    .initial_connection_window_size(Some(64 << 20))
}

pub fn client(channel: Channel, access: &AgentAccess) -> anyhow::Result<Client> {
    Ok(AgentClient::new(service(channel, access)?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

pub fn service(channel: Channel, access: &AgentAccess) -> anyhow::Result<Service> {
    let meta = ClientMeta::new(access.token.as_ref().map(Token::as_str))?;
    Ok(InterceptedService::new(channel, meta))
}

/// A connection to one agent before any call: the first call on it checks the token and the
/// version (every call does), so a single call needs no Hello first (`rsh`).
pub struct Opened {
    pub rank: usize,
    pub addr: SocketAddr,
    pub client: Client,
    pub service: Service,
    diag: transport::Diagnosis,
}

impl Opened {
    /// What a failed call on this connection says about the agent, as `connect` reports it:
    /// not an agent at all, unreachable, or refusing (token, version).
    pub fn failure(&self, s: &tonic::Status) -> ConnectError {
        let (rank, addr) = (self.rank, self.addr);
        let unreachable = |reason: String| ConnectError::Unreachable { rank, addr, reason };
        match (self.not_an_agent(), s.code()) {
            // What the server's first bytes said decides, whatever code the failed call got
            // (hyper reports the same garbage as unavailable, internal or cancelled).
            (Some(why), _) => unreachable(why),
            (None, tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal) => {
                unreachable(s.message().to_string())
            }
            _ => ConnectError::Refused {
                rank,
                addr,
                reason: s.message().to_string(),
            },
        }
    }

    fn not_an_agent(&self) -> Option<String> {
        let peer = self.diag.lock().ok().and_then(|d| *d)?;
        let what = match peer {
            Peer::Http1 => "an HTTP/1 server answered",
            Peer::NotHttp2 => "the server there does not speak HTTP/2",
        };
        Some(format!(
            "not a dgl-agent: {what} (is {} the agent's port? see --agent-port / {AGENT_PORT_ENV})",
            self.addr.port()
        ))
    }

    /// Shakes hands: the agent's Hello, or what its failure means.
    pub async fn hello(mut self) -> Result<Host, ConnectError> {
        let hello = self
            .client
            .hello(HelloRequest {
                protocol_version: PROTOCOL_VERSION,
                client_version: VERSION.to_string(),
            })
            .await
            .map_err(|s| self.failure(&s))?
            .into_inner();
        Ok(Host {
            rank: self.rank,
            ip: self.addr.ip(),
            addr: self.addr,
            client: self.client,
            service: self.service,
            hello,
        })
    }
}

/// Connects to one agent, without a call yet.
pub async fn open(rank: usize, ip: IpAddr, access: &AgentAccess) -> Result<Opened, ConnectError> {
    let addr = SocketAddr::new(ip, access.port);
    let unreachable = |reason: String| ConnectError::Unreachable { rank, addr, reason };
    let (channel, diag) = access
        .diagnosed_channel(addr)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let service = service(channel, access).map_err(|e| unreachable(e.to_string()))?;
    let client = AgentClient::new(service.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Ok(Opened {
        rank,
        addr,
        client,
        service,
        diag,
    })
}

/// Connects to one agent and shakes hands.
pub async fn connect(rank: usize, ip: IpAddr, access: &AgentAccess) -> Result<Host, ConnectError> {
    open(rank, ip, access).await?.hello().await
}

/// Connects to every machine's agent at once; fails naming every agent that could not be reached.
pub async fn connect_all(ips: &IpConfig, access: &AgentAccess) -> anyhow::Result<Vec<Host>> {
    let attempts = ips.machines.iter().map(|m| connect(m.rank, m.ip, access));
    all_or_every_error(futures::future::join_all(attempts).await)
}

/// Opens a connection to every machine's agent at once, without a call yet (TCP, and TLS
/// where it is used, so a wrong token fails here off loopback); fails naming every agent that
/// could not be reached.
pub async fn open_all(ips: &IpConfig, access: &AgentAccess) -> anyhow::Result<Vec<Opened>> {
    let attempts = ips.machines.iter().map(|m| open(m.rank, m.ip, access));
    all_or_every_error(futures::future::join_all(attempts).await)
}

/// Every opened agent's Hello; fails naming every agent that refused or failed.
pub async fn hello_all(opened: Vec<Opened>) -> anyhow::Result<Vec<Host>> {
    let attempts = opened.into_iter().map(Opened::hello);
    all_or_every_error(futures::future::join_all(attempts).await)
}

fn all_or_every_error<T>(results: Vec<Result<T, ConnectError>>) -> anyhow::Result<Vec<T>> {
    let mut oks = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(t) => oks.push(t),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        anyhow::bail!("{}", errors.join("\n"));
    }
    Ok(oks)
}
