//! Carries a plan out on the hosts: prepare everywhere, check free disk, send (each source
//! read once and fanned out), retry dropped streams, and verify at the end.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dglrun_proto::busy;
use dglrun_proto::digest::FileDigest;
use dglrun_proto::pb::{self, put_file_message::Msg, FileStatus};
use futures::StreamExt;
use indicatif::HumanBytes;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use super::budget::Budget;
use super::hashing::Digests;
use super::plan::{Content, CopyPlan};
use super::progress::Progress;
use super::reader::{self, ChunkMsg, Compression, Feed};
use super::summary::{FileOutcome, FileReport, HostReport};
use crate::cluster::{self, AgentAccess, Client, Host};

#[derive(Clone, Debug)]
pub struct SendOptions {
    /// Files in flight per host.
    pub jobs: usize,
    /// Further attempts after a transfer fails with a connection error.
    pub retries: u32,
    /// First backoff; doubled on each further attempt.
    pub backoff: Duration,
    /// HTTP/2 connections per host (streams are spread over them).
    pub connections: usize,
    /// PutFile streams open at once over all hosts (`max_in_flight` may allow fewer).
    pub max_streams: usize,
    /// How chunks travel.
    pub compression: Compression,
    /// Chunk bytes the coordinator holds at once over all hosts (read ahead, and encoded for a
    /// stream but not yet written to its connection); see `budget`.
    pub max_in_flight: usize,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            jobs: 4,
            retries: 5,
            backoff: Duration::from_millis(500),
            // Two connections let both of the agent's runtime threads receive (measured: a few
            // percent faster into one agent than one connection).
            connections: 2,
            max_streams: 64,
            compression: Compression::None,
            max_in_flight: 48 << 20,
        }
    }
}

/// A PrepareFiles request stays well under the message limit and the agent's file limit.
const PREPARE_BATCH_BYTES: usize = 4 << 20;
const PREPARE_BATCH_FILES: usize = 10_000;

struct HostCtx {
    name: String,
    root: String,
    clients: Vec<Client>,
    next_client: AtomicUsize,
    slots: Arc<Semaphore>,
    /// Set once the agent is given up on: its remaining files fail at once.
    dead: Mutex<Option<String>>,
    last_done: Mutex<Option<Instant>>,
}

impl HostCtx {
    fn client(&self) -> Client {
        let i = self.next_client.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        self.clients[i].clone()
    }

    fn dead(&self) -> Option<String> {
        self.dead.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn give_up(&self, reason: String) {
        let mut d = self.dead.lock().unwrap_or_else(|p| p.into_inner());
        d.get_or_insert(reason);
    }

    fn done_now(&self) {
        *self.last_done.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }
}

struct SourceCtx {
    content: Content,
    origin: String,
    size: u64,
    /// The file as it was hashed.
    seen: Option<std::fs::Metadata>,
}

impl SourceCtx {
    fn feeds(&self, offsets: &[u64], compression: Compression, budget: &Budget) -> Vec<Feed> {
        reader::spawn(
            self.content.clone(),
            self.origin.clone(),
            self.size,
            offsets,
            compression,
            self.seen.clone(),
            Some(budget.clone()),
        )
    }

    /// Why a chunk the agent found damaged is not worth sending again: the local file is no
    /// longer the one hashed.
    fn changed(&self) -> Option<String> {
        let (Content::File(p), Some(seen)) = (&self.content, &self.seen) else {
            return None;
        };
        match std::fs::metadata(p) {
            Ok(now) if dglrun_proto::digest::unchanged(seen, &now) => None,
            _ => Some(reader::changed_message(p)),
        }
    }
}

struct Ctx {
    hosts: Vec<HostCtx>,
    sources: Vec<SourceCtx>,
    /// Per host, per planned file: what is sent in PrepareFiles and PutFile headers.
    manifests: Vec<Vec<pb::FileManifest>>,
    progress: Arc<Progress>,
    opts: SendOptions,
    /// Turns true on Ctrl-C: every transfer stops where it is.
    interrupt: Option<watch::Receiver<bool>>,
    /// Chunk bytes held at once, over all sources and hosts.
    budget: Budget,
}

impl Ctx {
    fn interrupted(&self) -> bool {
        self.interrupt.as_ref().is_some_and(|r| *r.borrow())
    }
}

/// One file for one host: where it resumes.
#[derive(Clone, Copy)]
struct Target {
    host: usize,
    file: usize,
    offset: u64,
}

struct Delivered {
    host: usize,
    file: usize,
    result: Result<u64, String>,
    resumed_from: u64,
    /// Chunk bytes handed to the connection, every attempt included.
    wire_bytes: u64,
    /// Stopped by Ctrl-C before it completed.
    interrupted: bool,
}

impl Delivered {
    /// `t`, stopped by Ctrl-C before anything was sent.
    fn interrupted(t: &Target) -> Self {
        Self {
            host: t.host,
            file: t.file,
            result: Err("interrupted".into()),
            resumed_from: t.offset,
            wire_bytes: 0,
            interrupted: true,
        }
    }
}

/// Sends the plan to `hosts` (in ip_config order). Errors before anything is sent (a host
/// refusing a path, too little disk) are returned as `Err`; failures while sending are in the
/// reports.
pub async fn send(
    plan: &CopyPlan,
    hashed: &Digests,
    hosts: Vec<Host>,
    access: &AgentAccess,
    opts: SendOptions,
    progress: Arc<Progress>,
    interrupt: Option<watch::Receiver<bool>>,
) -> anyhow::Result<Vec<HostReport>> {
    let (digests, seen) = (&hashed.digests, &hashed.seen);
    let manifests: Vec<Vec<pb::FileManifest>> = plan
        .machines
        .iter()
        .map(|m| {
            m.files
                .iter()
                .map(|f| manifest(&f.remote, &digests[f.source], f.mode))
                .collect()
        })
        .collect();
    anyhow::ensure!(
        hosts.len() == plan.machines.len() && hosts.iter().enumerate().all(|(i, h)| h.rank == i),
        "internal error: hosts do not match the plan's machines"
    );

    // 1. What each host has, and whether it has room: nothing is sent before all agree.
    let prepared = futures::future::join_all(
        hosts
            .iter()
            .zip(&manifests)
            .map(|(h, ms)| prepare(h.client.clone(), ms)),
    )
    .await;
    let mut errors = Vec::new();
    let mut states = Vec::new();
    for ((h, ms), p) in hosts.iter().zip(&manifests).zip(prepared) {
        match p {
            Err(s) => errors.push(format!("{}: {}", h.name(), status_text(&s))),
            Ok((st, free)) => {
                let need: u64 = ms
                    .iter()
                    .zip(&st)
                    .filter(|(_, s)| s.status == FileStatus::Send as i32)
                    .map(|(m, s)| m.size.saturating_sub(s.resume_offset))
                    .sum();
                if need > free {
                    errors.push(format!(
                        "{}: not enough free disk: {} to send, {} free under {}",
                        h.name(),
                        HumanBytes(need),
                        HumanBytes(free),
                        h.hello.root
                    ));
                }
                states.push(st);
            }
        }
    }
    if !errors.is_empty() {
        anyhow::bail!("{}\nnothing was sent to any host", errors.join("\n"));
    }

    // 2. Reports start with what is already there; the rest is grouped by source.
    let mut reports: Vec<HostReport> = hosts
        .iter()
        .map(|h| HostReport {
            machine: h.rank,
            address: h.addr.to_string(),
            files_sent: 0,
            files_skipped: 0,
            files_failed: 0,
            bytes_sent: 0,
            wire_bytes: 0,
            seconds: 0.0,
            bytes_per_second: 0.0,
            errors: Vec::new(),
            files: Vec::new(),
        })
        .collect();
    let mut by_source: Vec<Vec<Target>> = vec![Vec::new(); plan.sources.len()];
    let mut total = 0u64;
    for (hi, m) in plan.machines.iter().enumerate() {
        for (fi, (f, st)) in m.files.iter().zip(&states[hi]).enumerate() {
            let size = digests[f.source].size;
            let present = st.status == FileStatus::Present as i32;
            reports[hi].files.push(FileReport {
                path: f.remote.clone(),
                status: if present {
                    FileOutcome::Skipped
                } else {
                    FileOutcome::Failed
                },
                size,
                bytes_sent: 0,
                wire_bytes: 0,
                resumed_from: 0,
                error: None,
            });
            if !present {
                let offset = st.resume_offset.min(size);
                total += size - offset;
                by_source[f.source].push(Target {
                    host: hi,
                    file: fi,
                    offset,
                });
            }
        }
    }

    // 3. Send.
    let mut host_ctxs = Vec::new();
    for h in &hosts {
        host_ctxs.push(HostCtx {
            name: h.name(),
            root: h.hello.root.clone(),
            clients: connections(h, access, opts.connections).await,
            next_client: AtomicUsize::new(0),
            slots: Arc::new(Semaphore::new(opts.jobs.max(1))),
            dead: Mutex::new(None),
            last_done: Mutex::new(None),
        });
    }
    let ctx = Arc::new(Ctx {
        hosts: host_ctxs,
        sources: plan
            .sources
            .iter()
            .zip(digests)
            .zip(seen)
            .map(|((s, d), seen)| SourceCtx {
                content: s.content.clone(),
                origin: s.origin.clone(),
                size: d.size,
                seen: seen.clone(),
            })
            .collect(),
        manifests,
        progress: progress.clone(),
        budget: Budget::new(opts.max_in_flight, dglrun_proto::CHUNK_SIZE),
        opts,
        interrupt,
    });
    let started = Instant::now();
    progress.phase("sending", total);
    // Every source is its own task; per-host slots bound what is in flight. Sources for several
    // hosts (configs, scripts: small) go first, while every host still has free slots.
    // A source goes to as many hosts at once as the in-flight bound has room for.
    let mut order: Vec<(usize, Vec<Target>)> = Vec::new();
    for (s, targets) in by_source.into_iter().enumerate() {
        let group = ctx
            .budget
            .group(ctx.sources[s].size)
            .min(ctx.opts.max_streams.max(1));
        order.extend(targets.chunks(group).map(|g| (s, g.to_vec())));
    }
    order.sort_by_key(|(_, t)| t.len() == 1);
    let tasks: Vec<_> = order
        .into_iter()
        .map(|(s, targets)| {
            (
                targets.clone(),
                tokio::spawn(transfer(ctx.clone(), s, targets)),
            )
        })
        .collect();
    for (targets, t) in tasks {
        for d in joined(&targets, t.await) {
            let r = &mut reports[d.host].files[d.file];
            r.resumed_from = d.resumed_from;
            r.wire_bytes = d.wire_bytes;
            match d.result {
                _ if d.interrupted => r.status = FileOutcome::Interrupted,
                Ok(n) => {
                    r.status = FileOutcome::Sent;
                    r.bytes_sent = n;
                }
                Err(e) => r.error = Some(e),
            }
        }
    }
    progress.finish_phase();

    // 4. Verify: every host must now report every file present (not after Ctrl-C: the user
    // wants out, and the report says what is incomplete).
    let stopped = ctx.interrupted();
    let verified = futures::future::join_all(ctx.hosts.iter().zip(&ctx.manifests).map(
        |(h, ms)| async move {
            if h.dead().is_some() || stopped {
                return None;
            }
            Some(prepare(h.client(), ms).await)
        },
    ))
    .await;
    for (hi, v) in verified.into_iter().enumerate() {
        let h = &ctx.hosts[hi];
        let r = &mut reports[hi];
        match v {
            None => r.errors.extend(h.dead()),
            Some(Err(s)) => r
                .errors
                .push(format!("cannot verify the files: {}", status_text(&s))),
            Some(Ok((st, _))) => {
                for (f, s) in r.files.iter_mut().zip(st) {
                    if f.status != FileOutcome::Failed && s.status != FileStatus::Present as i32 {
                        f.status = FileOutcome::Failed;
                        f.error = Some(format!(
                            "not present on the host after the copy (status {})",
                            s.status
                        ));
                    }
                }
            }
        }
        for f in r.files.iter_mut() {
            if f.status == FileOutcome::Failed && f.error.is_none() {
                f.error = Some("not sent".into());
            }
        }
        r.files_sent = r
            .files
            .iter()
            .filter(|f| f.status == FileOutcome::Sent)
            .count();
        r.files_skipped = r
            .files
            .iter()
            .filter(|f| f.status == FileOutcome::Skipped)
            .count();
        r.files_failed = r
            .files
            .iter()
            .filter(|f| f.status == FileOutcome::Failed)
            .count();
        r.bytes_sent = r.files.iter().map(|f| f.bytes_sent).sum();
        r.wire_bytes = r.files.iter().map(|f| f.wire_bytes).sum();
        let last = *h.last_done.lock().unwrap_or_else(|p| p.into_inner());
        r.seconds = last.map_or(0.0, |t| t.duration_since(started).as_secs_f64());
        r.bytes_per_second = if r.seconds > 0.0 {
            r.bytes_sent as f64 / r.seconds
        } else {
            0.0
        };
    }
    Ok(reports)
}

/// What the transfer task for `targets` delivered. A task that panicked or was cancelled
/// fails every one of its files with the reason, panic message included: a bug must show in
/// the report, not pass for "not sent".
fn joined(targets: &[Target], r: Result<Vec<Delivered>, tokio::task::JoinError>) -> Vec<Delivered> {
    let e = match r {
        Ok(d) => return d,
        Err(e) => e,
    };
    let why = if e.is_panic() {
        let p = e.into_panic();
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        format!("internal error: the transfer panicked: {msg}")
    } else {
        format!("internal error: the transfer was cancelled: {e}")
    };
    tracing::error!("{why}");
    targets
        .iter()
        .map(|t| Delivered {
            host: t.host,
            file: t.file,
            result: Err(why.clone()),
            resumed_from: t.offset,
            wire_bytes: 0,
            interrupted: false,
        })
        .collect()
}

pub(crate) fn manifest(remote: &str, d: &FileDigest, mode: u32) -> pb::FileManifest {
    pb::FileManifest {
        path: remote.to_string(),
        size: d.size,
        digest: d.digest.to_vec(),
        chunk_hashes: d.chunk_hashes.iter().map(|h| h.to_vec()).collect(),
        mode,
    }
}

/// The host's handshake connection plus `n - 1` more; a connection that cannot be made is
/// simply not used (the handshake one works).
async fn connections(h: &Host, access: &AgentAccess, n: usize) -> Vec<Client> {
    let mut out = vec![h.client.clone()];
    for _ in 1..n {
        if let Ok(ch) = access.channel(h.addr).await {
            if let Ok(c) = cluster::client(ch, access) {
                out.push(c);
            }
        }
    }
    out
}

/// PrepareFiles for all of `ms`, in batches; returns the states in order and the free bytes.
async fn prepare(
    client: Client,
    ms: &[pb::FileManifest],
) -> Result<(Vec<pb::FileState>, u64), Status> {
    let mut states = Vec::with_capacity(ms.len());
    let mut free = 0;
    let mut start = 0;
    while start < ms.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < ms.len() && end - start < PREPARE_BATCH_FILES {
            let cost = ms[end].path.len() + 32 * (ms[end].chunk_hashes.len() + 1) + 32;
            if end > start && bytes + cost > PREPARE_BATCH_BYTES {
                break;
            }
            bytes += cost;
            end += 1;
        }
        let batch = &ms[start..end];
        let reply = client
            .clone()
            .prepare_files(pb::PrepareFilesRequest {
                files: batch.to_vec(),
            })
            .await?
            .into_inner();
        if reply.files.len() != batch.len()
            || reply.files.iter().zip(batch).any(|(s, m)| s.path != m.path)
        {
            return Err(Status::internal(format!(
                "the agent answered for {} files of {} asked, or out of order",
                reply.files.len(),
                batch.len()
            )));
        }
        states.extend(reply.files);
        free = reply.free_bytes;
        start = end;
    }
    Ok((states, free))
}

/// Sends one source to all its targets: one reader, one stream per host.
async fn transfer(ctx: Arc<Ctx>, source: usize, mut targets: Vec<Target>) -> Vec<Delivered> {
    // Permits are taken in one order (global streams, then hosts by rank): two sources both
    // waiting for slots on the same hosts can then never hold one each of the other's.
    targets.sort_by_key(|t| t.host);
    let size = ctx.sources[source].size;
    let permits = async {
        let streams = ctx.budget.streams(size, targets.len()).await;
        let mut slots = Vec::with_capacity(targets.len());
        for t in &targets {
            slots.push(ctx.hosts[t.host].slots.clone().acquire_owned().await.ok());
        }
        (streams, slots)
    };
    let (_streams, permits) = tokio::select! {
        p = permits => p,
        () = super::interrupted(ctx.interrupt.clone()) => {
            return targets.iter().map(Delivered::interrupted).collect();
        }
    };
    let src = &ctx.sources[source];
    let offsets: Vec<u64> = targets.iter().map(|t| t.offset).collect();
    let feeds = src.feeds(&offsets, ctx.opts.compression, &ctx.budget);
    let deliveries = targets
        .into_iter()
        .zip(feeds)
        .zip(permits)
        .map(|((t, feed), permit)| deliver(ctx.clone(), source, t, feed, permit));
    futures::future::join_all(deliveries).await
}

/// Delivers one file to one host: the first attempt from the shared reader, then retries
/// (each re-preparing the file, so it resumes after the last verified chunk).
async fn deliver(
    ctx: Arc<Ctx>,
    source: usize,
    t: Target,
    first: Feed,
    _slot: Option<OwnedSemaphorePermit>,
) -> Delivered {
    let h = &ctx.hosts[t.host];
    let src = &ctx.sources[source];
    let m = &ctx.manifests[t.host][t.file];
    let mut offset = t.offset;
    let mut feed = Some(first);
    let mut attempt = 0u32;
    let wire = Arc::new(AtomicU64::new(0));
    let mut interrupted = false;
    let result = loop {
        if let Some(reason) = h.dead() {
            break Err(format!("not sent: {reason}"));
        }
        let try_once = async {
            match feed.take() {
                Some(f) => put(h, m, offset, f, &ctx, &wire).await,
                None => match prepare(h.client(), std::slice::from_ref(m)).await {
                    Ok((st, _))
                        if st
                            .first()
                            .is_some_and(|s| s.status == FileStatus::Present as i32) =>
                    {
                        // The previous attempt completed; only its reply was lost.
                        Ok(m.size - offset)
                    }
                    Ok((st, _)) => {
                        offset = st.first().map_or(0, |s| s.resume_offset.min(m.size));
                        let mut feeds = src.feeds(&[offset], ctx.opts.compression, &ctx.budget);
                        match feeds.pop() {
                            Some(f) => put(h, m, offset, f, &ctx, &wire).await,
                            None => Err(Put::Local("internal error: no reader".into())),
                        }
                    }
                    Err(s) => Err(Put::Remote(s)),
                },
            }
        };
        // Ctrl-C drops the stream mid-file: the agent keeps what it verified as the partial.
        let outcome = tokio::select! {
            o = try_once => o,
            () = super::interrupted(ctx.interrupt.clone()) => {
                interrupted = true;
                break Err("interrupted".into());
            }
        };
        let status = match outcome {
            Ok(n) => {
                ctx.progress.file_line(&format!(
                    "{}: {} ({}{})",
                    h.name,
                    m.path,
                    HumanBytes(n),
                    if offset > 0 {
                        format!(", resumed at {}", HumanBytes(offset))
                    } else {
                        String::new()
                    }
                ));
                break Ok(n);
            }
            Err(Put::Local(e)) => break Err(e),
            Err(Put::Remote(s)) => s,
        };
        // A chunk that fails its hash because the file changed would fail every time.
        if status.code() == Code::DataLoss {
            if let Some(e) = src.changed() {
                break Err(e);
            }
        }
        if !retryable(&status) || attempt >= ctx.opts.retries {
            let mut text = status_text(&status);
            if retryable(&status) {
                text = format!("{text} (gave up after {} attempts)", attempt + 1);
                if connection_lost(&status) {
                    h.give_up(format!("agent unreachable: {text}"));
                }
            }
            break Err(text);
        }
        let wait = (ctx.opts.backoff * 2u32.saturating_pow(attempt))
            .max(busy::retry_after(&status).unwrap_or_default());
        attempt += 1;
        ctx.progress.note(&format!(
            "{}: {}: {}; retrying in {:.1}s (attempt {} of {})",
            h.name,
            m.path,
            status_text(&status),
            wait.as_secs_f64(),
            attempt + 1,
            ctx.opts.retries + 1
        ));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = super::interrupted(ctx.interrupt.clone()) => {
                interrupted = true;
                break Err("interrupted".into());
            }
        }
    };
    h.done_now();
    if let Err(e) = &result {
        tracing::debug!(host = %h.name, root = %h.root, file = %m.path, "failed: {e}");
    }
    Delivered {
        host: t.host,
        file: t.file,
        result,
        resumed_from: offset,
        wire_bytes: wire.load(Ordering::Relaxed),
        interrupted,
    }
}

enum Put {
    /// The agent (or the connection to it) failed.
    Remote(Status),
    /// Reading the local file failed: retrying would not help.
    Local(String),
}

/// One PutFile stream: header, then the feed's chunks. Returns the bytes the agent wrote;
/// adds the chunk bytes handed to the connection to `wire`.
async fn put(
    h: &HostCtx,
    m: &pb::FileManifest,
    offset: u64,
    feed: Feed,
    ctx: &Ctx,
    wire: &Arc<AtomicU64>,
) -> Result<u64, Put> {
    let header = pb::PutFileMessage {
        msg: Some(Msg::Header(pb::PutFileHeader {
            manifest: Some(m.clone()),
            offset,
        })),
    };
    let progress = ctx.progress.clone();
    let wire = wire.clone();
    let chunks = ReceiverStream::new(feed.rx).map(move |c: ChunkMsg| {
        // Progress counts the file's bytes, so its rate and ETA stay comparable with and
        // without compression; the report has the wire bytes.
        progress.advance(c.len);
        wire.fetch_add(c.data.len() as u64, Ordering::Relaxed);
        pb::PutFileMessage {
            msg: Some(Msg::Chunk(pb::Chunk {
                offset: c.offset,
                data: c.data,
                compression: c.compression as i32,
            })),
        }
    });
    let stream = tokio_stream::once(header).chain(chunks);
    match h.client().put_file(stream).await {
        Ok(r) => Ok(r.into_inner().bytes_written),
        // A stream cut short by a local read error fails on the agent; the local cause is
        // the one worth reporting.
        Err(s) => match feed.error.get() {
            Some(e) => Err(Put::Local(e)),
            None => Err(Put::Remote(s)),
        },
    }
}

/// Failures that another attempt may get past: the connection or the agent went away, or
/// the agent's state moved under us (a partial changed; re-preparing sorts it out).
fn retryable(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Cancelled
        | Code::Aborted
        | Code::DeadlineExceeded
        | Code::Internal
        | Code::FailedPrecondition
        // A chunk that failed its hash on the agent was damaged on the way: send it again.
        | Code::DataLoss => true,
        // The agent serves a bounded number of transfers and marks the refusal as busy; any
        // other exhaustion is a bound the request broke.
        Code::ResourceExhausted => busy::retry_after(s).is_some(),
        _ => false,
    }
}

/// The agent cannot be reached at all.
fn connection_lost(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

/// A status as one line: the agent's message, or the transport's cause.
pub fn status_text(s: &Status) -> String {
    let mut text = s.message().to_string();
    let mut cur = std::error::Error::source(s);
    while let Some(e) = cur {
        let part = e.to_string();
        if !text.contains(&part) {
            text = if text.is_empty() {
                part
            } else {
                format!("{text}: {part}")
            };
        }
        cur = e.source();
    }
    if text.is_empty() {
        format!("{:?}", s.code())
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicked_transfer_fails_its_files_with_the_panic_message() {
        let targets = [
            Target {
                host: 0,
                file: 3,
                offset: 0,
            },
            Target {
                host: 2,
                file: 1,
                offset: 4096,
            },
        ];
        let r = tokio::spawn(async { panic!("chunk table out of step") }).await;
        let got = joined(&targets, r.map(|()| Vec::new()));
        assert_eq!(got.len(), 2);
        for (d, t) in got.iter().zip(&targets) {
            assert_eq!((d.host, d.file), (t.host, t.file));
            let e = d.result.as_ref().unwrap_err();
            assert!(
                e.contains("panicked") && e.contains("chunk table out of step"),
                "{e}"
            );
        }
    }

    #[test]
    fn busy_is_decided_by_its_code_not_its_words() {
        let busy = busy::status("no room for another transfer", Duration::from_millis(500));
        assert!(retryable(&busy));
        // A bound the request broke: the same code without the busy mark is final, whatever
        // its message says.
        assert!(!retryable(&Status::resource_exhausted(
            "the agent already serves 64 transfers; retry later"
        )));
    }
}
