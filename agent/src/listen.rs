//! Accepting connections: how many, how fast they must prove themselves, and in which
//! transport.
//!
//! - At most `max_connections` at once. When full, a new connection takes the place of the
//!   oldest one that has not yet carried an authenticated request; if every connection is
//!   authenticated the new one is closed. Idle sockets therefore never lock out a
//!   coordinator, and never use the fds jobs and file writes need.
//! - A connection must finish its TLS handshake (or send its first byte in plaintext) within
//!   `handshake_timeout`, and carry an authenticated request within `auth_timeout` of being
//!   accepted, or it is closed.
//! - Transport is decided per connection from the local address it arrived on: plaintext
//!   h2c only on loopback, TLS everywhere else (unless `insecure_plaintext`). A TLS
//!   connection starts with a handshake record (0x16), which is how the two are told apart
//!   on one port.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use dglrun_proto::meta::ConnAuth;
use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

#[derive(Clone, Debug)]
pub struct ListenPolicy {
    /// TLS for connections that start with a handshake; `None`: plaintext only.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Plaintext is accepted on loopback (the token then authenticates each request).
    pub loopback_plaintext: bool,
    /// Plaintext is accepted on every address (`--insecure-plaintext`).
    pub insecure_plaintext: bool,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub auth_timeout: Duration,
}

/// The connection cap for an open-file limit: a quarter of it, so that three quarters stay
/// for files being written, job pipes and /proc scans.
pub fn max_connections_for(nofile: u64) -> usize {
    (nofile / 4).clamp(16, 4096) as usize
}

/// Raises the soft open-file limit to the hard one; returns the limit in force.
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// One place in the connection table; freed when the connection is dropped.
struct Slot {
    id: u64,
    evicted: AtomicBool,
    waker: AtomicWaker,
    auth: ConnAuth,
}

#[derive(Default)]
struct Table {
    /// Oldest first.
    slots: Mutex<VecDeque<Arc<Slot>>>,
    next_id: AtomicU64,
}

/// Removes its slot from the table when the connection ends, however it ends.
struct SlotGuard {
    slot: Arc<Slot>,
    table: Arc<Table>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.table.slots.lock().retain(|x| x.id != self.slot.id);
    }
}

impl Table {
    /// A place for a new connection, making room by evicting the oldest unauthenticated
    /// one; `None` when every place holds an authenticated connection.
    fn admit(self: &Arc<Self>, cap: usize, remote: SocketAddr) -> Option<SlotGuard> {
        let mut slots = self.slots.lock();
        if slots.len() >= cap {
            let victim = slots.iter().position(|s| !s.auth.is_authenticated())?;
            if let Some(v) = slots.remove(victim) {
                v.evicted.store(true, Ordering::Release);
                v.waker.wake();
            }
        }
        let slot = Arc::new(Slot {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            evicted: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            auth: ConnAuth::new(Some(remote), false),
        });
        slots.push_back(slot.clone());
        Some(SlotGuard {
            slot,
            table: self.clone(),
        })
    }
}

/// Resolves when the slot is evicted.
struct Evicted<'a>(&'a Slot);

impl Future for Evicted<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.waker.register(cx.waker());
        if self.0.evicted.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection as tonic serves it.
pub struct AgentConn {
    io: Transport,
    guard: SlotGuard,
    auth: ConnAuth,
    /// Until the first authenticated request; dropped once one came.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AgentConn {
    /// Fails reads once the connection was evicted or missed its authentication deadline.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let slot = &self.guard.slot;
        slot.waker.register(cx.waker());
        if slot.evicted.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection evicted: the agent is at its connection limit",
            ));
        }
        if let Some(d) = &mut self.deadline {
            if self.auth.is_authenticated() {
                self.deadline = None;
            } else if d.as_mut().poll(cx).is_ready() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no authenticated request in time",
                ));
            }
        }
        Ok(())
    }
}

impl Connected for AgentConn {
    type ConnectInfo = ConnAuth;
    fn connect_info(&self) -> ConnAuth {
        self.auth.clone()
    }
}

impl AsyncRead for AgentConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        match &mut self.io {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for AgentConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepted, admitted connections whose transport is established, as a stream for tonic.
pub fn incoming(
    listener: TcpListener,
    policy: ListenPolicy,
) -> impl tokio_stream::Stream<Item = io::Result<AgentConn>> {
    // Ready connections wait here only until tonic takes them; the table bounds how many.
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, Arc::new(policy), tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    policy: Arc<ListenPolicy>,
    tx: mpsc::Sender<io::Result<AgentConn>>,
) {
    let table = Arc::new(Table::default());
    let mut refused_logged = false;
    loop {
        // The server dropped the stream (shutdown): close the listening socket with it, not
        // at the next connection attempt.
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = tx.closed() => return,
        };
        let (tcp, remote) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: wait rather than spin; the cap makes this rare.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if tx.is_closed() {
            return;
        }
        let Some(guard) = table.admit(policy.max_connections, remote) else {
            if !refused_logged {
                tracing::warn!(
                    max = policy.max_connections,
                    "connection limit reached with every connection authenticated: refusing new ones"
                );
                refused_logged = true;
            }
            continue;
        };
        let (policy, tx) = (policy.clone(), tx.clone());
        tokio::spawn(async move {
            if let Some(conn) = establish(tcp, remote, guard, &policy).await {
                let _ = tx.send(Ok(conn)).await;
            }
        });
    }
}

/// The handshake phase of one connection; `None` when it is refused, evicted or too slow.
async fn establish(
    tcp: TcpStream,
    remote: SocketAddr,
    guard: SlotGuard,
    policy: &ListenPolicy,
) -> Option<AgentConn> {
    let deadline = tokio::time::Instant::now() + policy.auth_timeout;
    let local = tcp.local_addr().ok()?;
    let _ = tcp.set_nodelay(true);
    let loopback = local.ip().to_canonical().is_loopback();
    let handshake = async {
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await.ok()? == 0 {
            return None;
        }
        if first[0] == TLS_HANDSHAKE {
            let config = policy.tls.clone()?;
            let tls = tokio_rustls::TlsAcceptor::from(config)
                .accept(tcp)
                .await
                .map_err(|e| tracing::debug!(%remote, "TLS handshake failed: {e}"))
                .ok()?;
            Some((Transport::Tls(Box::new(tls)), true))
        } else if policy.insecure_plaintext || (loopback && policy.loopback_plaintext) {
            Some((Transport::Plain(tcp), false))
        } else {
            tracing::debug!(%remote, %local, "plaintext refused on a non-loopback address");
            None
        }
    };
    let (io, certified) = tokio::select! {
        r = tokio::time::timeout(policy.handshake_timeout, handshake) => r.ok()??,
        _ = Evicted(&guard.slot) => return None,
    };
    let auth = guard.slot.auth.clone();
    if certified {
        // It proved it holds the token's key (or a certificate of the user's CA).
        auth.set_peer_certified();
        auth.mark_authenticated();
    }
    Some(AgentConn {
        io,
        auth,
        guard,
        deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    #[test]
    fn full_table_evicts_the_oldest_unauthenticated() {
        let t = Arc::new(Table::default());
        let a = t.admit(2, addr()).unwrap();
        let b = t.admit(2, addr()).unwrap();
        // a authenticated: b is the one to go.
        a.slot.auth.mark_authenticated();
        let c = t.admit(2, addr()).unwrap();
        assert!(!a.slot.evicted.load(Ordering::Acquire));
        assert!(b.slot.evicted.load(Ordering::Acquire));
        c.slot.auth.mark_authenticated();
        assert!(t.admit(2, addr()).is_none(), "all authenticated: refused");
        drop(c);
        assert!(
            t.admit(2, addr()).is_some(),
            "a dropped connection frees its place"
        );
    }

    #[test]
    fn cap_follows_the_fd_limit() {
        assert_eq!(max_connections_for(256), 64);
        assert_eq!(max_connections_for(16), 16);
        assert_eq!(max_connections_for(1 << 20), 4096);
    }
}
