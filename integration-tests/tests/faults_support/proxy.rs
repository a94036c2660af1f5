//! A TCP proxy between dgl-coord and one agent that corrupts the transfer once: it flips one
//! byte of the HTTP/2 DATA payload (the gRPC messages, that is the file chunks) a given number
//! of bytes into the connection's data, then passes everything through untouched.
//!
//! It follows HTTP/2 framing (the 24-byte client preface, then 9-byte frame headers) so the
//! flipped byte is never part of a frame header: the connection stays valid and only the
//! chunk's content is wrong, as a memory or NIC fault on the way would make it.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const PREFACE: usize = 24;
const FRAME_HEADER: usize = 9;
const DATA: u8 = 0;
const PADDED: u8 = 0x8;

/// What the proxy did, shared with the test.
#[derive(Default)]
pub struct Tally {
    pub flipped: AtomicBool,
    /// Position of the flipped byte in its connection's DATA payload.
    pub flipped_at: AtomicU64,
    pub connections: AtomicU64,
    pub bytes_up: AtomicU64,
}

/// Follows the client-to-server byte stream of one connection.
struct Corrupter {
    preface_left: usize,
    header: [u8; FRAME_HEADER],
    header_len: usize,
    payload_left: usize,
    in_data: bool,
    data_seen: u64,
    flip_at: u64,
    tally: Arc<Tally>,
}

impl Corrupter {
    fn new(flip_at: u64, tally: Arc<Tally>) -> Self {
        Self {
            preface_left: PREFACE,
            header: [0; FRAME_HEADER],
            header_len: 0,
            payload_left: 0,
            in_data: false,
            data_seen: 0,
            flip_at,
            tally,
        }
    }

    fn process(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() {
            let left = buf.len() - i;
            if self.preface_left > 0 {
                let n = self.preface_left.min(left);
                self.preface_left -= n;
                i += n;
            } else if self.payload_left == 0 {
                let n = (FRAME_HEADER - self.header_len).min(left);
                self.header[self.header_len..self.header_len + n].copy_from_slice(&buf[i..i + n]);
                self.header_len += n;
                i += n;
                if self.header_len == FRAME_HEADER {
                    let h = self.header;
                    self.payload_left =
                        (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    self.in_data = h[3] == DATA && h[4] & PADDED == 0;
                    self.header_len = 0;
                }
            } else {
                let n = self.payload_left.min(left);
                if self.in_data {
                    let end = self.data_seen + n as u64;
                    if (self.data_seen..end).contains(&self.flip_at)
                        && !self.tally.flipped.swap(true, Ordering::SeqCst)
                    {
                        buf[i + (self.flip_at - self.data_seen) as usize] ^= 0xFF;
                        self.tally.flipped_at.store(self.flip_at, Ordering::SeqCst);
                    }
                    self.data_seen = end;
                }
                self.payload_left -= n;
                i += n;
            }
        }
    }
}

pub struct Proxy {
    stop: Arc<AtomicBool>,
    pub tally: Arc<Tally>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Listens on `listen`, forwards to `upstream`; to be called on a thread inside the
    /// coordinator's namespace (see `NetCluster::spawn_in_coord_ns`).
    pub fn start(listen: SocketAddr, upstream: SocketAddr, flip_at: u64) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let (s, t) = (stop.clone(), tally.clone());
        // Threads started from a thread in a namespace inherit it.
        let thread = std::thread::spawn(move || accept_loop(listener, upstream, flip_at, s, t));
        Ok(Self {
            stop,
            tally,
            thread: Some(thread),
        })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    flip_at: u64,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    while !stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(_) => return,
        };
        let _ = client.set_nonblocking(false);
        let Ok(server) = TcpStream::connect(upstream) else {
            continue;
        };
        tally.connections.fetch_add(1, Ordering::SeqCst);
        let _ = (client.set_nodelay(true), server.set_nodelay(true));
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        let mut corrupter = Corrupter::new(flip_at, tally.clone());
        let t = tally.clone();
        std::thread::spawn(move || {
            pump(client, server, |buf| {
                t.bytes_up.fetch_add(buf.len() as u64, Ordering::Relaxed);
                corrupter.process(buf)
            })
        });
        std::thread::spawn(move || pump(s2, c2, |_| {}));
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, mut inspect: impl FnMut(&mut [u8])) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        inspect(&mut buf[..n]);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A preface, a SETTINGS frame, a DATA frame of 10 bytes split across reads.
    #[test]
    fn only_data_payload_bytes_are_flipped_once() {
        let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        stream.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0]);
        stream.extend_from_slice(&[1; 6]);
        stream.extend_from_slice(&[0, 0, 10, DATA, 0, 0, 0, 0, 1]);
        stream.extend_from_slice(&[7; 10]);
        let tally = Arc::new(Tally::default());
        let mut c = Corrupter::new(4, tally.clone());
        let mut out = stream.clone();
        for piece in out.chunks_mut(5) {
            c.process(piece);
        }
        let diff: Vec<usize> = (0..stream.len()).filter(|&i| stream[i] != out[i]).collect();
        let data_start = PREFACE + FRAME_HEADER + 6 + FRAME_HEADER;
        assert_eq!(diff, [data_start + 4]);
        assert!(tally.flipped.load(Ordering::SeqCst));
    }
}
