//! The coordinator's connections: plaintext h2c to loopback agents, TLS to every other
//! address (from the token, or the user's certificates), and what went wrong in words a user
//! can act on when the other end is not a dgl-agent.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// What the first bytes from the server said about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// An HTTP/1 server (it answered the HTTP/2 preface with a status line).
    Http1,
    /// Something that does not speak HTTP/2 at all.
    NotHttp2,
}

/// Shared between a connector and whoever reports a failed call on its channel.
pub(super) type Diagnosis = Arc<Mutex<Option<Peer>>>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    #[error(
        "connection refused: nothing listens on {addr}. Is dgl-agent running on that host, \
         and is {port} its port (--agent-port / DGL_AGENT_PORT)?",
        port = addr.port()
    )]
    Refused {
        addr: SocketAddr,
        /// Kept: callers tell a stopped agent from other failures by this error's kind.
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to {addr}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "{addr} holds a different token: the TLS handshake showed a key not derived from ours \
         (give both sides the same token file)"
    )]
    WrongToken { addr: SocketAddr },
    #[error(
        "{addr} is not a dgl-agent: it did not answer the TLS handshake (is {port} the agent's \
         port, --agent-port?)",
        port = addr.port()
    )]
    NotTls { addr: SocketAddr },
    #[error("the TLS handshake with {addr} failed")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A connection, watching the first bytes it reads.
pub(super) struct Conn {
    stream: Stream,
    diag: Option<Diagnosis>,
}

impl Conn {
    fn sniff(&mut self, bytes: &[u8]) {
        let Some(diag) = self.diag.take() else { return };
        if bytes.is_empty() {
            self.diag = Some(diag);
            return;
        }
        // An HTTP/2 server's first frame is SETTINGS: type 4 in the fourth byte.
        let peer = if bytes.starts_with(b"HTTP/") {
            Some(Peer::Http1)
        } else if bytes.len() >= 4 && bytes[3] != 4 {
            Some(Peer::NotHttp2)
        } else {
            None
        };
        if let Some(p) = peer {
            if let Ok(mut d) = diag.lock() {
                *d = Some(p);
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if self.diag.is_some() {
            if let Poll::Ready(Ok(())) = &r {
                let new = buf.filled()[before..].to_vec();
                self.sniff(&new);
            }
        }
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Connects every new connection of one channel to one agent.
#[derive(Clone)]
pub(super) struct Connector {
    pub addr: SocketAddr,
    /// With the server name the certificate must carry.
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// The TLS keys come from the token (not from the user's certificates).
    pub token_tls: bool,
    pub diag: Diagnosis,
}

impl tower_service::Service<tonic::transport::Uri> for Connector {
    type Response = TokioIo<Conn>;
    type Error = ConnectFailure;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: tonic::transport::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect().await.map(TokioIo::new) })
    }
}

impl Connector {
    async fn connect(self) -> Result<Conn, ConnectFailure> {
        let addr = self.addr;
        let tcp = TcpStream::connect(addr).await.map_err(|e| {
            if e.kind() == io::ErrorKind::ConnectionRefused {
                ConnectFailure::Refused { addr, source: e }
            } else {
                ConnectFailure::Io { addr, source: e }
            }
        })?;
        let _ = tcp.set_nodelay(true);
        let stream = match self.tls {
            None => Stream::Plain(tcp),
            Some((config, name)) => {
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| tls_failure(addr, self.token_tls, e))?;
                Stream::Tls(Box::new(tls))
            }
        };
        Ok(Conn {
            stream,
            diag: Some(self.diag),
        })
    }
}

fn tls_failure(addr: SocketAddr, token_tls: bool, e: io::Error) -> ConnectFailure {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        // Our verifier refused the agent's key, or the agent refused ours: with keys derived
        // from the token, that means the tokens differ.
        Some(rustls::Error::General(_) | rustls::Error::AlertReceived(_)) if token_tls => {
            ConnectFailure::WrongToken { addr }
        }
        Some(rustls::Error::InvalidMessage(_))
        | Some(rustls::Error::InappropriateMessage { .. }) => ConnectFailure::NotTls { addr },
        _ => ConnectFailure::Tls { addr, source: e },
    }
}
