//! `dgl-coord rsh`: one command on one host over its agent's Session call, with ssh's exit
//! rules (the remote exit code; 255 when the host cannot be reached or refuses).
//!
//! Local stdin is streamed to the command and closed when it ends; the command's stdout and
//! stderr are written here byte for byte. SIGINT, SIGTERM and SIGHUP are forwarded to it; a
//! second one ends `rsh` at once, which ends the stream, and the agent then stops the whole
//! remote tree (as it does when `rsh` is killed or the link is lost).

use std::net::{IpAddr, SocketAddr};

use dglrun_proto::pb::{self, session_input, session_output};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::cluster::{self, AgentAccess, ConnectError};

/// ssh's exit status for "the remote command did not run or did not report".
pub const FAILED: u8 = 255;
/// Bytes of stdin per message.
const STDIN_CHUNK: usize = 256 << 10;
/// Input messages queued for the stream (each at most [`STDIN_CHUNK`]).
const INPUT_MESSAGES: usize = 4;
/// How often the agent hears from a session's client: well within its lease (10 s default).
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(2);

/// One `rsh` invocation.
#[derive(Clone, Debug)]
pub struct RshOptions {
    /// A name or an address.
    pub host: String,
    /// Run by the remote `/bin/sh -c`.
    pub command: String,
    /// Stream local stdin (false with `-n`: the command reads end of file at once).
    pub stdin: bool,
    /// No notes of ours on stderr (`-q`).
    pub quiet: bool,
}

/// Why a session gave no exit status, worded as ssh words its own.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("Could not resolve hostname {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error(
        "dgl-agent {agent} has no sessions; run dgl-agent {} there",
        dglrun_proto::VERSION
    )]
    NoSessions { agent: String },
    /// The agent refused the session; its message says why.
    #[error("{}", .0.message())]
    Refused(Box<tonic::Status>),
    #[error("the agent ended the session without an exit status")]
    NoExit,
    #[error("connection lost: {}", .0.message())]
    Lost(Box<tonic::Status>),
    /// The local side could not take the output.
    #[error("{0}")]
    Output(#[from] std::io::Error),
}

/// The address of `host`: an address as given, else the first the resolver returns (IPv4
/// first, as ip_config holds IPv4 only).
pub async fn resolve(host: &str, port: u16) -> Result<IpAddr, SessionError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(ip);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
        .await
        .map_err(|e| SessionError::Resolve {
            host: host.to_string(),
            reason: e.to_string(),
        })?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .map(SocketAddr::ip)
        .ok_or_else(|| SessionError::Resolve {
            host: host.to_string(),
            reason: "no address".to_string(),
        })
}

/// Runs the session; returns the exit status `rsh` exits with. Messages go to stderr,
/// prefixed `dgl-coord rsh:`, as ssh prefixes its own.
pub async fn run(opts: RshOptions, access: &AgentAccess) -> u8 {
    let fail = |msg: String| {
        eprintln!("dgl-coord rsh: {msg}");
        FAILED
    };
    let ip = match resolve(&opts.host, access.port).await {
        Ok(ip) => ip,
        Err(e) => return fail(e.to_string()),
    };
    // No Hello first: the Session call itself carries the token and version checks, and one
    // round trip less is a good part of a short command's time.
    let opened = match cluster::open(0, ip, access).await {
        Ok(o) => o,
        Err(e) => return fail(connect_message(&opts.host, e)),
    };
    let (tx, rx) = mpsc::channel(INPUT_MESSAGES);
    let start = session_input::Msg::Start(pb::SessionStart {
        command: opts.command.clone(),
        requester: crate::ops::requester("dgl-coord rsh"),
    });
    // The channel is new and has room.
    let _ = tx.try_send(pb::SessionInput { msg: Some(start) });
    let signals = tokio::spawn(forward_signals(tx.clone()));
    let keepalive = tokio::spawn(keep_alive(tx.clone()));
    let with_stdin = opts.stdin;
    std::thread::spawn(move || pump_stdin(tx, with_stdin));
    let mut client = opened.client.clone();
    let outcome = match client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(resp) => receive(resp.into_inner())
            .await
            .map_err(|e| format!("{}: {e}", opts.host)),
        Err(s) if s.code() == tonic::Code::Unimplemented => {
            let version = match opened.hello().await {
                Ok(h) => h.hello.agent_version,
                Err(_) => "(unknown version)".to_string(),
            };
            Err(format!(
                "{}: dgl-agent {version} has no sessions; run dgl-agent {} there",
                opts.host,
                dglrun_proto::VERSION
            ))
        }
        Err(s) => Err(match opened.failure(&s) {
            // Refusals of the call itself (a blank command, the agent's session bound).
            ConnectError::Refused { .. }
                if !matches!(
                    s.code(),
                    tonic::Code::Unauthenticated | tonic::Code::FailedPrecondition
                ) =>
            {
                format!("{}: {}", opts.host, s.message())
            }
            e => connect_message(&opts.host, e),
        }),
    };
    signals.abort();
    keepalive.abort();
    match outcome {
        Ok(Ended::Code(c)) => (c & 0xff) as u8,
        Ok(Ended::Signal(s)) => {
            if !opts.quiet {
                eprintln!(
                    "dgl-coord rsh: remote command on {} killed by signal {s}",
                    opts.host
                );
            }
            FAILED
        }
        Ok(Ended::Interrupted) => FAILED,
        Err(e) => fail(e),
    }
}

/// ssh's words for a host that cannot be reached or refuses.
fn connect_message(host: &str, e: ConnectError) -> String {
    match e {
        ConnectError::Unreachable { addr, reason, .. } => {
            format!("connect to host {host} port {}: {reason}", addr.port())
        }
        ConnectError::Refused { addr, reason, .. } => {
            format!("{host} ({addr}): the agent refused: {reason}")
        }
    }
}

enum Ended {
    Code(i32),
    Signal(i32),
    /// A second signal here: the stream was dropped, the agent stops the command.
    Interrupted,
}

/// Writes the command's output here until its exit arrives.
async fn receive(mut out: tonic::Streaming<pb::SessionOutput>) -> Result<Ended, SessionError> {
    loop {
        let msg = match out.message().await {
            Ok(Some(m)) => m.msg,
            Ok(None) => return Err(SessionError::NoExit),
            Err(s) if s.code() == tonic::Code::Cancelled => return Ok(Ended::Interrupted),
            Err(s) => return Err(SessionError::Lost(Box::new(s))),
        };
        // A closed local stdout (`rsh host cmd | head`) ends the session, as with ssh.
        let written = match msg {
            Some(session_output::Msg::Stdout(b)) => write_out(b, true).await,
            Some(session_output::Msg::Stderr(b)) => write_out(b, false).await,
            Some(session_output::Msg::Exit(e)) if e.signal != 0 => {
                return Ok(Ended::Signal(e.signal))
            }
            Some(session_output::Msg::Exit(e)) => return Ok(Ended::Code(e.code)),
            Some(session_output::Msg::Started(_)) | None => Ok(()),
        };
        if written.is_err() {
            return Ok(Ended::Interrupted);
        }
    }
}

/// Writes `bytes` to stdout or stderr off the runtime's thread: a local reader that stops
/// reading (a pager) blocks only the write, never the keepalives that keep the session alive.
async fn write_out(bytes: impl AsRef<[u8]> + Send + 'static, stdout: bool) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        if stdout {
            let mut o = std::io::stdout().lock();
            o.write_all(bytes.as_ref()).and_then(|()| o.flush())
        } else {
            let mut e = std::io::stderr().lock();
            e.write_all(bytes.as_ref()).and_then(|()| e.flush())
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Streams local stdin, then its end of file. On a thread of its own, blocked in read(2):
/// `rsh` exits without waiting for it.
fn pump_stdin(tx: mpsc::Sender<pb::SessionInput>, enabled: bool) {
    use std::io::Read;
    if enabled {
        let mut stdin = std::io::stdin().lock();
        loop {
            let mut buf = vec![0u8; STDIN_CHUNK];
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
                Ok(n) => {
                    buf.truncate(n);
                    let msg = session_input::Msg::Stdin(buf.into());
                    if tx
                        .blocking_send(pb::SessionInput { msg: Some(msg) })
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    }
    let eof = session_input::Msg::StdinEof(true);
    let _ = tx.blocking_send(pb::SessionInput { msg: Some(eof) });
}

/// Tells the agent every [`KEEPALIVE`] that this end is still there: an agent that hears
/// nothing for its lease stops the command (a lost link, long before HTTP/2's keepalive).
async fn keep_alive(tx: mpsc::Sender<pb::SessionInput>) {
    let mut tick = tokio::time::interval(KEEPALIVE);
    tick.tick().await;
    loop {
        tick.tick().await;
        let msg = session_input::Msg::Keepalive(true);
        if tx.send(pb::SessionInput { msg: Some(msg) }).await.is_err() {
            return;
        }
    }
}

/// Forwards the first SIGINT, SIGTERM or SIGHUP; a second one ends `rsh` (the agent then
/// stops the remote tree).
async fn forward_signals(tx: mpsc::Sender<pb::SessionInput>) {
    let kinds = [
        (SignalKind::interrupt(), libc::SIGINT),
        (SignalKind::terminate(), libc::SIGTERM),
        (SignalKind::hangup(), libc::SIGHUP),
    ];
    let mut streams = Vec::new();
    for (kind, n) in kinds {
        if let Ok(s) = signal(kind) {
            streams.push((s, n));
        }
    }
    let mut forwarded = false;
    loop {
        let recv = streams
            .iter_mut()
            .map(|(s, n)| Box::pin(async move { s.recv().await.map(|_| *n) }));
        let (got, _, _) = futures::future::select_all(recv).await;
        let Some(n) = got else { return };
        if forwarded {
            // Exits without waiting for the remote command: dropping the connection is the
            // agent's cue to stop it.
            std::process::exit(i32::from(FAILED));
        }
        forwarded = true;
        let msg = session_input::Msg::Signal(n);
        let _ = tx.send(pb::SessionInput { msg: Some(msg) }).await;
    }
}

/// Runs `command` on `host` with no stdin, handing its stdout to `sink` (stderr is dropped);
/// its exit code, 128+N for signal N. For `rcp`'s questions to the host and its downloads.
pub async fn run_quietly(
    host: &mut crate::cluster::Host,
    command: &str,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<i32, SessionError> {
    let start = session_input::Msg::Start(pb::SessionStart {
        command: command.to_string(),
        requester: crate::ops::requester("dgl-coord rcp"),
    });
    let eof = session_input::Msg::StdinEof(true);
    let (tx, rx) = mpsc::channel(2);
    let _ = tx.try_send(pb::SessionInput { msg: Some(start) });
    let _ = tx.try_send(pb::SessionInput { msg: Some(eof) });
    let mut out = host
        .client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unimplemented => SessionError::NoSessions {
                agent: host.hello.agent_version.clone(),
            },
            _ => SessionError::Refused(Box::new(s)),
        })?
        .into_inner();
    loop {
        match out
            .message()
            .await
            .map_err(|s| SessionError::Refused(Box::new(s)))?
        {
            None => return Err(SessionError::NoExit),
            Some(m) => match m.msg {
                Some(session_output::Msg::Stdout(b)) => sink(&b)?,
                Some(session_output::Msg::Exit(e)) if e.signal != 0 => return Ok(128 + e.signal),
                Some(session_output::Msg::Exit(e)) => return Ok(e.code),
                _ => {}
            },
        }
    }
}
