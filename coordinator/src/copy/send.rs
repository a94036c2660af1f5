//! Carries a plan out on the hosts: prepare everywhere, check free disk, send (each source
//! read once and fanned out), retry dropped streams, and verify at the end.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use super::put_wire;
use super::reader::{self, ChunkMsg, Compression, Feed};
use super::retry::{self, status_text, Backoff};
use super::summary::HostReport;
use super::tally::{self, Delivered, Target};
use crate::cluster::{self, AgentAccess, Client, Host, Service};

#[derive(Clone, Debug)]
pub struct SendOptions {
    /// Files in flight per host.
    pub jobs: usize,
    /// Further attempts after a transfer fails with a connection error.
    pub retries: u32,
    /// First backoff; doubled on each further attempt, up to `backoff_cap` (each wait is
    /// jittered between half and all of that).
    pub backoff: Duration,
    pub backoff_cap: Duration,
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
            backoff_cap: Duration::from_secs(10),
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
    /// The host's connections, each as a client and as a plain service (for PutFile).
    clients: Vec<(Client, Service)>,
    next_client: AtomicUsize,
    slots: Arc<Semaphore>,
    /// Set once the agent is given up on: its remaining files fail at once.
    dead: Mutex<Option<String>>,
    last_done: Mutex<Option<Instant>>,
}

impl HostCtx {
    fn connection(&self) -> &(Client, Service) {
        let i = self.next_client.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        &self.clients[i]
    }

    fn client(&self) -> Client {
        self.connection().0.clone()
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

    /// `f`'s output, or `None` once Ctrl-C is pressed.
    async fn unless_interrupted<T>(&self, f: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            o = f => Some(o),
            () = super::interrupted(self.interrupt.clone()) => None,
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff {
            first: self.opts.backoff,
            cap: self.opts.backoff_cap,
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
    anyhow::ensure!(
        hosts.len() == plan.machines.len() && hosts.iter().enumerate().all(|(i, h)| h.rank == i),
        "internal error: hosts do not match the plan's machines"
    );
    let manifests = manifests(plan, &hashed.digests);
    let states = prepare_all(&hosts, &manifests).await?;
    let sizes: Vec<u64> = hashed.digests.iter().map(|d| d.size).collect();
    let ids = hosts
        .iter()
        .map(|h| tally::HostId {
            machine: h.rank,
            address: h.addr.to_string(),
        })
        .collect();
    let (mut reports, by_source, total) = tally::start(plan, ids, &states, &sizes);

    let ctx = Arc::new(Ctx {
        hosts: host_ctxs(&hosts, access, opts.connections, opts.jobs).await,
        sources: source_ctxs(plan, hashed),
        manifests,
        progress: progress.clone(),
        budget: Budget::new(opts.max_in_flight, dglrun_proto::CHUNK_SIZE),
        opts,
        interrupt,
    });
    let started = Instant::now();
    progress.phase("sending", total);
    for d in transfer_all(&ctx, by_source).await {
        tally::record(&mut reports, d);
    }
    progress.finish_phase();
    verify(&ctx, &mut reports).await;
    for (h, r) in ctx.hosts.iter().zip(&mut reports) {
        let last = *h.last_done.lock().unwrap_or_else(|p| p.into_inner());
        tally::count(
            r,
            last.map_or(0.0, |t| t.duration_since(started).as_secs_f64()),
        );
    }
    Ok(reports)
}

/// Per host, per planned file: what is sent in PrepareFiles and PutFile headers.
fn manifests(plan: &CopyPlan, digests: &[FileDigest]) -> Vec<Vec<pb::FileManifest>> {
    plan.machines
        .iter()
        .map(|m| {
            m.files
                .iter()
                .map(|f| manifest(&f.remote, &digests[f.source], f.mode))
                .collect()
        })
        .collect()
}

/// What each host has, and whether it has room: nothing is sent before all agree.
async fn prepare_all(
    hosts: &[Host],
    manifests: &[Vec<pb::FileManifest>],
) -> anyhow::Result<Vec<Vec<pb::FileState>>> {
    let prepared = futures::future::join_all(
        hosts
            .iter()
            .zip(manifests)
            .map(|(h, ms)| prepare(h.client.clone(), ms)),
    )
    .await;
    let mut errors = Vec::new();
    let mut states = Vec::new();
    for ((h, ms), p) in hosts.iter().zip(manifests).zip(prepared) {
        match p {
            Err(s) => errors.push(format!("{}: {}", h.name(), status_text(&s))),
            Ok((st, free)) => {
                errors.extend(tally::room_error(&h.name(), &h.hello.root, ms, &st, free));
                states.push(st);
            }
        }
    }
    if !errors.is_empty() {
        anyhow::bail!("{}\nnothing was sent to any host", errors.join("\n"));
    }
    Ok(states)
}

async fn host_ctxs(
    hosts: &[Host],
    access: &AgentAccess,
    connections_per_host: usize,
    jobs: usize,
) -> Vec<HostCtx> {
    // Every host's further connections at once: one host after another, their handshakes
    // (TCP, TLS, HTTP/2: a few round trips each) came before anything was sent, 0.6 s for 4
    // hosts 50 ms away.
    let clients = futures::future::join_all(
        hosts
            .iter()
            .map(|h| connections(h, access, connections_per_host)),
    )
    .await;
    let mut out = Vec::with_capacity(hosts.len());
    for (h, clients) in hosts.iter().zip(clients) {
        out.push(HostCtx {
            name: h.name(),
            root: h.hello.root.clone(),
            clients,
            next_client: AtomicUsize::new(0),
            slots: Arc::new(Semaphore::new(jobs.max(1))),
            dead: Mutex::new(None),
            last_done: Mutex::new(None),
        });
    }
    out
}

fn source_ctxs(plan: &CopyPlan, hashed: &Digests) -> Vec<SourceCtx> {
    plan.sources
        .iter()
        .zip(&hashed.digests)
        .zip(&hashed.seen)
        .map(|((s, d), seen)| SourceCtx {
            content: s.content.clone(),
            origin: s.origin.clone(),
            size: d.size,
            seen: seen.clone(),
        })
        .collect()
}

/// Every source is its own task; per-host slots bound what is in flight. Sources for several
/// hosts (configs, scripts: small) go first, while every host still has free slots. A source
/// goes to as many hosts at once as the in-flight bound has room for.
async fn transfer_all(ctx: &Arc<Ctx>, by_source: Vec<Vec<Target>>) -> Vec<Delivered> {
    let mut order: Vec<(usize, Vec<Target>)> = Vec::new();
    for (s, targets) in by_source.into_iter().enumerate() {
        let group = ctx
            .budget
            .group(ctx.sources[s].size)
            .min(ctx.opts.max_streams.max(1));
        order.extend(targets.chunks(group).map(|g| (s, g.to_vec())));
    }
    // Single-host sources (partitions) take turns by host: every host's first file, then
    // every host's second. In plan order each host's files queued behind the previous host's,
    // and the streams the bound allows all went to one host: on links slower than the
    // master's, one host link busy at a time (`bench links`, scenario b).
    let mut nth = vec![0usize; ctx.hosts.len()];
    let mut turn = |t: &[Target]| match t {
        [one] => {
            nth[one.host] += 1;
            nth[one.host]
        }
        _ => 0,
    };
    let turns: Vec<usize> = order.iter().map(|(_, t)| turn(t)).collect();
    let mut order: Vec<_> = turns.into_iter().zip(order).collect();
    order.sort_by_key(|(k, _)| *k);
    let order = order.into_iter().map(|(_, o)| o);
    let tasks: Vec<_> = order
        .into_iter()
        .map(|(s, targets)| {
            (
                targets.clone(),
                tokio::spawn(transfer(ctx.clone(), s, targets)),
            )
        })
        .collect();
    let mut out = Vec::new();
    for (targets, t) in tasks {
        out.extend(joined(&targets, t.await));
    }
    out
}

/// Every host must now report every file present (not after Ctrl-C: the user wants out, and
/// the report says what is incomplete).
async fn verify(ctx: &Ctx, reports: &mut [HostReport]) {
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
    for ((h, r), v) in ctx.hosts.iter().zip(reports).zip(verified) {
        match v {
            None => r.errors.extend(h.dead()),
            Some(Err(s)) => r
                .errors
                .push(format!("cannot verify the files: {}", status_text(&s))),
            Some(Ok((st, _))) => tally::check_present(&mut r.files, &st),
        }
    }
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
        .map(|t| Delivered::failed(t, why.clone()))
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
async fn connections(h: &Host, access: &AgentAccess, n: usize) -> Vec<(Client, Service)> {
    let mut out = vec![(h.client.clone(), h.service.clone())];
    for _ in 1..n {
        if let Ok(ch) = access.channel(h.addr).await {
            if let (Ok(c), Ok(s)) = (
                cluster::client(ch.clone(), access),
                cluster::service(ch, access),
            ) {
                out.push((c, s));
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
    let result = loop {
        if let Some(reason) = h.dead() {
            break Err(Stop::Failed(format!("not sent: {reason}")));
        }
        // Ctrl-C drops the stream mid-file: the agent keeps what it verified as the partial.
        let Some(outcome) = ctx
            .unless_interrupted(try_once(&ctx, src, h, m, &mut offset, feed.take(), &wire))
            .await
        else {
            break Err(Stop::Interrupted);
        };
        let status = match outcome {
            Ok(n) => {
                ctx.progress.file_line(&done_line(h, m, n, offset));
                break Ok(n);
            }
            Err(Put::Local(e)) => break Err(Stop::Failed(e)),
            Err(Put::Remote(s)) => s,
        };
        let wait = match after_failure(&ctx, src, h, m, &status, attempt) {
            Ok(wait) => wait,
            Err(e) => break Err(Stop::Failed(e)),
        };
        attempt += 1;
        if ctx
            .unless_interrupted(tokio::time::sleep(wait))
            .await
            .is_none()
        {
            break Err(Stop::Interrupted);
        }
    };
    h.done_now();
    if let Err(e) = &result {
        tracing::debug!(host = %h.name, root = %h.root, file = %m.path, "failed: {e}");
    }
    Delivered {
        host: t.host,
        file: t.file,
        interrupted: matches!(result, Err(Stop::Interrupted)),
        result: result.map_err(|e| e.to_string()),
        resumed_from: offset,
        wire_bytes: wire.load(Ordering::Relaxed),
    }
}

/// After attempt `attempt` failed with `status`: the wait before the next one (announced),
/// or why there is none.
fn after_failure(
    ctx: &Ctx,
    src: &SourceCtx,
    h: &HostCtx,
    m: &pb::FileManifest,
    status: &Status,
    attempt: u32,
) -> Result<Duration, String> {
    // A chunk that fails its hash because the file changed would fail every time.
    if status.code() == Code::DataLoss {
        if let Some(e) = src.changed() {
            return Err(e);
        }
    }
    let retries = ctx.opts.retries;
    match retry::next(status, attempt, retries, &ctx.backoff(), rand::random()) {
        retry::Next::Retry(wait) => {
            ctx.progress.note(&format!(
                "{}: {}: {}; retrying in {:.1}s (attempt {} of {})",
                h.name,
                m.path,
                status_text(status),
                wait.as_secs_f64(),
                attempt + 2,
                retries + 1
            ));
            Ok(wait)
        }
        retry::Next::GiveUp { text, unreachable } => {
            if unreachable {
                h.give_up(format!("agent unreachable: {text}"));
            }
            Err(text)
        }
    }
}

/// Why a delivery ended without the file.
#[derive(Debug, thiserror::Error)]
enum Stop {
    #[error("interrupted")]
    Interrupted,
    #[error("{0}")]
    Failed(String),
}

/// One attempt: the shared reader's feed on the first, else the file re-prepared (moving
/// `offset` to where the agent resumes) and read again from there.
async fn try_once(
    ctx: &Ctx,
    src: &SourceCtx,
    h: &HostCtx,
    m: &pb::FileManifest,
    offset: &mut u64,
    feed: Option<Feed>,
    wire: &Arc<AtomicU64>,
) -> Result<u64, Put> {
    if let Some(f) = feed {
        return put(h, m, *offset, f, ctx, wire).await;
    }
    let (st, _) = prepare(h.client(), std::slice::from_ref(m))
        .await
        .map_err(Put::Remote)?;
    let state = st.first();
    if state.is_some_and(|s| s.status == FileStatus::Present as i32) {
        // The previous attempt completed; only its reply was lost.
        return Ok(m.size - *offset);
    }
    *offset = state.map_or(0, |s| s.resume_offset.min(m.size));
    match src
        .feeds(&[*offset], ctx.opts.compression, &ctx.budget)
        .pop()
    {
        Some(f) => put(h, m, *offset, f, ctx, wire).await,
        None => Err(Put::Local("internal error: no reader".into())),
    }
}

/// The progress line of a file delivered.
fn done_line(h: &HostCtx, m: &pb::FileManifest, n: u64, offset: u64) -> String {
    let resumed = if offset > 0 {
        format!(", resumed at {}", HumanBytes(offset))
    } else {
        String::new()
    };
    format!("{}: {} ({}{resumed})", h.name, m.path, HumanBytes(n))
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
    let header = put_wire::message_frame(&pb::PutFileMessage {
        msg: Some(Msg::Header(pb::PutFileHeader {
            manifest: Some(m.clone()),
            offset,
        })),
    });
    let progress = ctx.progress.clone();
    let wire = wire.clone();
    let chunks = ReceiverStream::new(feed.rx).flat_map(move |c: ChunkMsg| {
        // Progress counts the file's bytes, so its rate and ETA stay comparable with and
        // without compression; the report has the wire bytes.
        progress.advance(c.len);
        wire.fetch_add(c.data.len() as u64, Ordering::Relaxed);
        futures::stream::iter(put_wire::chunk_frames(
            c.offset,
            c.compression as i32,
            c.data,
        ))
    });
    let stream = tokio_stream::once(header).chain(chunks);
    match put_wire::put_file(&h.connection().1, stream).await {
        Ok(r) => Ok(r.bytes_written),
        // A stream cut short by a local read error fails on the agent; the local cause is
        // the one worth reporting.
        Err(s) => match feed.error.get() {
            Some(e) => Err(Put::Local(e)),
            None => Err(Put::Remote(s)),
        },
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
}
