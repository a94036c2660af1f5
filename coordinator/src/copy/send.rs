//! Carries a plan out on the hosts: prepare everywhere, check free disk, send (each source
//! read once and fanned out), retry dropped streams, and verify at the end.

use std::cmp::Reverse;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::task::Poll;
use std::time::{Duration, Instant};

use dglrun_proto::digest::FileDigest;
use dglrun_proto::pb::{self, put_file_message::Msg, FileStatus};
use futures::StreamExt;
use indicatif::HumanBytes;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use super::budget::Budget;
use super::connections::Further;
use super::hashing::Digests;
use super::plan::{Content, CopyPlan};
use super::progress::Progress;
use super::put_wire;
use super::reader::{self, ChunkMsg, Compression, Feed};
use super::retry::{self, status_text, Backoff};
use super::summary::HostReport;
use super::tally::{self, Delivered, Target};
use crate::cluster::{AgentAccess, Client, Host, Service};

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
    /// Hosts a file for several hosts (configs, scripts) is sent to at once: one reader, one
    /// PutFile stream each; more hosts get it in further groups.
    pub max_streams: usize,
    /// How chunks travel.
    pub compression: Compression,
    /// Chunk bytes the coordinator holds at once over all hosts: read, and not yet written to
    /// every connection they go to; see `budget`. Also sets how many jobs read at once
    /// ([`max_reading`]).
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

/// How many jobs may read at once within a bound of `max_in_flight` bytes: two per three
/// chunks. A job runs at its link's pace with one chunk in h2's send buffer and about half of
/// one queued behind it. On 50 ms links (`bench links`, 48 MiB, 4 hosts) 8 jobs took (c) from
/// 1.08x to 1.07x (a)'s time: a host whose flows got less of the master's link keeps a second
/// file in flight; 4 left it one flow, 12 left each job too little room (1.09x).
fn max_reading(max_in_flight: usize, chunk: usize) -> usize {
    (2 * max_in_flight / (3 * chunk.max(1))).max(1)
}

/// A PrepareFiles request stays well under the message limit and the agent's file limit.
const PREPARE_BATCH_BYTES: usize = 4 << 20;
const PREPARE_BATCH_FILES: usize = 10_000;

struct HostCtx {
    name: String,
    root: String,
    /// The host's connections, each as a client and as a plain service (for PutFile).
    clients: Vec<(Client, Service)>,
    /// Per connection: PutFile bodies it is carrying, and when it was last given one.
    carrying: Vec<ConnUse>,
    next_client: AtomicUsize,
    slots: Arc<Semaphore>,
    /// Set once the agent is given up on: its remaining files fail at once.
    dead: Mutex<Option<String>>,
    last_done: Mutex<Option<Instant>>,
    /// Bytes not yet handed to a connection.
    left: AtomicU64,
}

/// How busy one connection is, for [`HostCtx::put_connection`].
#[derive(Default)]
struct ConnUse {
    bodies: AtomicUsize,
    last: AtomicU64,
}

/// One body on a connection, counted until the body ends or is dropped.
struct Carrying {
    ctx: Arc<Ctx>,
    host: usize,
    conn: usize,
}

impl Drop for Carrying {
    fn drop(&mut self) {
        if let Some(u) = self.ctx.hosts[self.host].carrying.get(self.conn) {
            u.bodies.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl HostCtx {
    fn connection(&self) -> &(Client, Service) {
        let i = self.next_client.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        &self.clients[i]
    }

    /// The connection for a PutFile: the one carrying the fewest bodies, and of those the one
    /// used last. A connection idle for longer than its retransmission timeout starts again
    /// from TCP's initial window (`tcp_slow_start_after_idle`), so a host's files one after
    /// another stay on the connection that is up to speed; turn by turn, every second file
    /// started on a cold one (about 6 round trips to reach the link's rate, 0.3 s at 50 ms).
    fn put_connection(&self) -> usize {
        let tick = self.next_client.fetch_add(1, Ordering::Relaxed) as u64;
        let i = (0..self.carrying.len())
            .min_by_key(|&i| {
                let u = &self.carrying[i];
                (
                    u.bodies.load(Ordering::Relaxed),
                    Reverse(u.last.load(Ordering::Relaxed)),
                )
            })
            .unwrap_or(0);
        if let Some(u) = self.carrying.get(i) {
            u.bodies.fetch_add(1, Ordering::Relaxed);
            u.last.store(tick, Ordering::Relaxed);
        }
        i
    }

    fn client(&self) -> Client {
        self.connection().0.clone()
    }

    fn dead(&self) -> Option<String> {
        self.dead.lock().clone()
    }

    fn give_up(&self, reason: String) {
        let mut d = self.dead.lock();
        d.get_or_insert(reason);
    }

    fn done_now(&self) {
        *self.last_done.lock() = Some(Instant::now());
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
    /// What the dispatcher orders by, and how many jobs may read at once ([`max_reading`]).
    turns: Mutex<Turns>,
    max_reading: usize,
    /// Wakes the dispatcher: a stream's body ended or a transfer ended, so room, a slot or a
    /// host's turn may be free.
    wake: Notify,
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

/// Where the hosts' further connections come from.
pub enum Connections<'a> {
    /// Already being opened (by [`Further::open`], for `hosts` in the same order).
    Opening(Further),
    /// Opened once the hosts are prepared.
    Later(&'a AgentAccess),
}

/// The agents a copy goes to, in ip_config order.
pub struct Reached {
    pub hosts: Vec<Host>,
    /// Their answers to PrepareFiles (from [`prepare_each`] with [`manifests`]) when asked
    /// already; else `send` asks.
    pub prepared: Option<Vec<Prepared>>,
}

/// Sends the plan to the hosts reached. Errors before anything is sent (a host refusing a
/// path, too little disk) are returned as `Err`; failures while sending are in the reports.
pub async fn send(
    plan: &CopyPlan,
    hashed: &Digests,
    Reached { hosts, prepared }: Reached,
    further: Connections<'_>,
    opts: SendOptions,
    progress: Arc<Progress>,
    interrupt: Option<watch::Receiver<bool>>,
) -> anyhow::Result<Vec<HostReport>> {
    anyhow::ensure!(
        hosts.len() == plan.machines.len() && hosts.iter().enumerate().all(|(i, h)| h.rank == i),
        "internal error: hosts do not match the plan's machines"
    );
    let manifests = manifests(plan, &hashed.digests);
    let t0 = Instant::now();
    let prepared = match prepared {
        Some(p) => p,
        None => {
            let clients: Vec<Client> = hosts.iter().map(|h| h.client.clone()).collect();
            prepare_each(&clients, &manifests).await
        }
    };
    let states = judge(&hosts, &manifests, prepared)?;
    tracing::debug!("prepared every host in {:?}", t0.elapsed());
    let sizes: Vec<u64> = hashed.digests.iter().map(|d| d.size).collect();
    let ids = hosts
        .iter()
        .map(|h| tally::HostId {
            machine: h.rank,
            address: h.addr.to_string(),
        })
        .collect();
    let (mut reports, by_source, total) = tally::start(plan, ids, &states, &sizes);

    let further = match further {
        Connections::Opening(f) => f,
        Connections::Later(access) => {
            let addrs: Vec<_> = hosts.iter().map(|h| h.addr).collect();
            Further::open(&addrs, access, opts.connections)
        }
    };
    let mut host_ctxs = host_ctxs(&hosts, further, opts.jobs).await;
    for (h, left) in host_ctxs.iter_mut().zip(bytes_left(&by_source, &sizes)) {
        h.left = AtomicU64::new(left);
    }
    let max_reading = max_reading(opts.max_in_flight, dglrun_proto::CHUNK_SIZE);
    let hosts_len = host_ctxs.len();
    let ctx = Arc::new(Ctx {
        hosts: host_ctxs,
        sources: source_ctxs(plan, hashed),
        manifests,
        progress: progress.clone(),
        budget: Budget::new(opts.max_in_flight, dglrun_proto::CHUNK_SIZE),
        opts,
        interrupt,
        turns: Mutex::new(Turns {
            reading: 0,
            sending: vec![0; hosts_len],
        }),
        max_reading,
        wake: Notify::new(),
    });
    let started = Instant::now();
    tracing::debug!(
        "every host's connections ready {:?} after PrepareFiles",
        t0.elapsed()
    );
    progress.phase("sending", total);
    for d in transfer_all(&ctx, by_source).await {
        tally::record(&mut reports, d);
    }
    progress.finish_phase();
    tracing::debug!("sent in {:?}", started.elapsed());
    verify(&ctx, &mut reports).await;
    tracing::debug!("verified {:?} after sending began", started.elapsed());
    for (h, r) in ctx.hosts.iter().zip(&mut reports) {
        let last = *h.last_done.lock();
        tally::count(
            r,
            last.map_or(0.0, |t| t.duration_since(started).as_secs_f64()),
        );
    }
    Ok(reports)
}

/// Per host, per planned file: what is sent in PrepareFiles and PutFile headers.
pub fn manifests(plan: &CopyPlan, digests: &[FileDigest]) -> Vec<Vec<pb::FileManifest>> {
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

/// One host's answer to PrepareFiles: each file's state, and the free bytes of its root.
pub type Prepared = Result<(Vec<pb::FileState>, u64), Status>;

/// Asks every host what it has of its files, all at once (`clients` in the hosts' order).
pub async fn prepare_each(
    clients: &[Client],
    manifests: &[Vec<pb::FileManifest>],
) -> Vec<Prepared> {
    futures::future::join_all(
        clients
            .iter()
            .zip(manifests)
            .map(|(c, ms)| prepare(c.clone(), ms)),
    )
    .await
}

/// What each host has, and whether it has room: nothing is sent before all agree.
fn judge(
    hosts: &[Host],
    manifests: &[Vec<pb::FileManifest>],
    prepared: Vec<Prepared>,
) -> anyhow::Result<Vec<Vec<pb::FileState>>> {
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

async fn host_ctxs(hosts: &[Host], further: Further, jobs: usize) -> Vec<HostCtx> {
    let further = further.take().await;
    let mut out = Vec::with_capacity(hosts.len());
    for (i, h) in hosts.iter().enumerate() {
        let mut clients = vec![(h.client.clone(), h.service.clone())];
        clients.extend(further.get(i).cloned().unwrap_or_default());
        out.push(HostCtx {
            name: h.name(),
            root: h.hello.root.clone(),
            carrying: clients.iter().map(|_| ConnUse::default()).collect(),
            clients,
            next_client: AtomicUsize::new(0),
            slots: Arc::new(Semaphore::new(jobs.max(1))),
            dead: Mutex::new(None),
            last_done: Mutex::new(None),
            left: AtomicU64::new(0),
        });
    }
    out
}

/// Per host, the bytes its transfers will send.
fn bytes_left(by_source: &[Vec<Target>], sizes: &[u64]) -> Vec<u64> {
    let hosts = by_source
        .iter()
        .flatten()
        .map(|t| t.host + 1)
        .max()
        .unwrap_or(0);
    let mut left = vec![0u64; hosts];
    for (s, targets) in by_source.iter().enumerate() {
        for t in targets {
            if let Some(l) = left.get_mut(t.host) {
                *l += sizes[s].saturating_sub(t.offset);
            }
        }
    }
    left
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

/// A source and the targets one transfer sends it to.
struct Job {
    source: usize,
    targets: Vec<Target>,
}

/// What a started transfer holds: its hosts' slots until it ends; per target, the end of its
/// body, which gives back the host's count as sending and, with the job's last body, its place
/// among the readers (also when dropped unfired, so a transfer that panicked frees them).
struct Permits {
    ends: Vec<Arc<BodyEnd>>,
    slots: Vec<OwnedSemaphorePermit>,
}

/// What the dispatcher orders by. Both counts change under one lock: a job's place among the
/// readers is never free while its host still counts as sending. (When they were two atomics,
/// given back in the other order, a busier host with more bytes left could take the place the
/// dispatcher was woken for, and the host whose file had just ended idled for a whole file.)
struct Turns {
    /// Jobs whose bodies are still being handed over.
    reading: usize,
    /// Per host: its streams still handing chunks to a connection (a stream whose body has
    /// ended only waits for the agent's reply).
    sending: Vec<usize>,
}

/// Starts transfers as readers, host slots and hosts' turns allow. Sources for several hosts
/// (configs, scripts: small) go first, in plan order, each to up to `max_streams` hosts at
/// once. Then single-host sources (partitions): whenever a reader's place frees, the next
/// file goes to the host with the fewest streams still sending, and of those to the one with
/// the most bytes left. With a first-come queue the place a host's stream freed went to
/// whichever file queued first, often another host's: one host got two streams while another
/// idled for a second or more (`bench links`). A host's next file starts once its previous
/// one's body has been handed over, not after the agent's reply: on a link 50 ms away that
/// reply is a round trip in which the host got nothing.
async fn transfer_all(ctx: &Arc<Ctx>, by_source: Vec<Vec<Target>>) -> Vec<Delivered> {
    let mut shared: VecDeque<Job> = VecDeque::new();
    let mut own: Vec<VecDeque<Job>> = (0..ctx.hosts.len()).map(|_| VecDeque::new()).collect();
    for (s, targets) in by_source.into_iter().enumerate() {
        match targets.as_slice() {
            [] => {}
            [one] => own[one.host].push_back(Job { source: s, targets }),
            _ => {
                let group = ctx.opts.max_streams.max(1);
                shared.extend(targets.chunks(group).map(|g| Job {
                    source: s,
                    targets: g.to_vec(),
                }));
            }
        }
    }
    let mut running = Vec::new();
    let mut out = Vec::new();
    loop {
        // Armed before looking, so a wake between the look and the wait is not lost.
        let woken = ctx.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        while let Some((job, permits)) = next_job(ctx, &mut shared, &mut own) {
            let targets = job.targets.clone();
            running.push((
                targets,
                tokio::spawn(transfer(ctx.clone(), job.source, job.targets, permits)),
            ));
        }
        if shared.is_empty() && own.iter().all(VecDeque::is_empty) {
            break;
        }
        tokio::select! {
            () = &mut woken => {}
            () = super::interrupted(ctx.interrupt.clone()) => {
                let waiting = shared.drain(..).chain(own.iter_mut().flat_map(|q| q.drain(..)));
                for job in waiting {
                    out.extend(job.targets.iter().map(Delivered::interrupted));
                }
                break;
            }
        }
    }
    for (targets, t) in running {
        out.extend(joined(&targets, t.await));
    }
    out
}

/// The next job that can start now, with what it holds, taken off its queue.
fn next_job(
    ctx: &Arc<Ctx>,
    shared: &mut VecDeque<Job>,
    own: &mut [VecDeque<Job>],
) -> Option<(Job, Permits)> {
    let mut t = ctx.turns.lock();
    if let Some(job) = shared.front() {
        let permits = try_permits(ctx, &mut t, job)?;
        return shared.pop_front().map(|j| (j, permits));
    }
    let waiting: Vec<HostTurn> = (0..own.len())
        .filter(|&h| !own[h].is_empty())
        .map(|h| HostTurn {
            host: h,
            sending: t.sending.get(h).copied().unwrap_or(0),
            left: ctx.hosts[h].left.load(Ordering::Relaxed),
        })
        .collect();
    for h in turns(waiting.into_iter()) {
        if let Some(permits) = own[h].front().and_then(|j| try_permits(ctx, &mut t, j)) {
            return own[h].pop_front().map(|j| (j, permits));
        }
    }
    None
}

/// Where a host with files waiting stands.
#[derive(Clone, Copy, Debug)]
struct HostTurn {
    host: usize,
    /// Its streams still handing chunks over.
    sending: usize,
    /// Its bytes not yet handed over.
    left: u64,
}

/// The order in which hosts get their next file: fewest streams sending first (a host whose
/// stream just ended before one still busy), then the most bytes left (so the hosts finish
/// together rather than one alone at the end: a single stream far away is held to a fraction
/// of the link by the kernel's send buffer).
fn turns(hosts: impl Iterator<Item = HostTurn>) -> Vec<usize> {
    let mut hosts: Vec<HostTurn> = hosts.collect();
    hosts.sort_by_key(|t| (t.sending, Reverse(t.left), t.host));
    hosts.into_iter().map(|t| t.host).collect()
}

/// A place among the readers and a slot on each of the job's hosts, if all are free now;
/// taken in `t` (the dispatcher's lock, held by the caller).
fn try_permits(ctx: &Arc<Ctx>, t: &mut Turns, job: &Job) -> Option<Permits> {
    if t.reading >= ctx.max_reading {
        return None;
    }
    let slots = job
        .targets
        .iter()
        .map(|t| ctx.hosts[t.host].slots.clone().try_acquire_owned().ok())
        .collect::<Option<Vec<_>>>()?;
    t.reading += 1;
    let bodies = Arc::new(AtomicUsize::new(job.targets.len()));
    let ends = job
        .targets
        .iter()
        .map(|target| {
            if let Some(n) = t.sending.get_mut(target.host) {
                *n += 1;
            }
            Arc::new(BodyEnd {
                ctx: ctx.clone(),
                host: target.host,
                bodies: bodies.clone(),
                ended: AtomicBool::new(false),
            })
        })
        .collect();
    Some(Permits { ends, slots })
}

/// Every host must still have the files it had before sending (not after Ctrl-C: the user
/// wants out, and the report says what is incomplete). A host with none is not asked.
async fn verify(ctx: &Ctx, reports: &mut [HostReport]) {
    let stopped = ctx.interrupted();
    let asks: Vec<Vec<usize>> = reports.iter().map(|r| tally::to_verify(&r.files)).collect();
    let verified = futures::future::join_all(ctx.hosts.iter().zip(&ctx.manifests).zip(&asks).map(
        |((h, ms), ask)| async move {
            if h.dead().is_some() || stopped {
                return None;
            }
            if ask.is_empty() {
                return Some(Ok(Vec::new()));
            }
            let asked: Vec<_> = ask.iter().filter_map(|&i| ms.get(i).cloned()).collect();
            Some(prepare(h.client(), &asked).await.map(|(st, _)| st))
        },
    ))
    .await;
    for (((h, r), v), ask) in ctx.hosts.iter().zip(reports).zip(verified).zip(&asks) {
        match v {
            None => r.errors.extend(h.dead()),
            Some(Err(s)) => r
                .errors
                .push(format!("cannot verify the files: {}", status_text(&s))),
            Some(Ok(st)) => tally::check_present(&mut r.files, ask, &st),
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
async fn transfer(
    ctx: Arc<Ctx>,
    source: usize,
    mut targets: Vec<Target>,
    permits: Permits,
) -> Vec<Delivered> {
    let Permits { mut ends, slots } = permits;
    // The feeds come in the targets' order.
    targets.sort_by_key(|t| t.host);
    ends.sort_by_key(|e| e.host);
    let src = &ctx.sources[source];
    let offsets: Vec<u64> = targets.iter().map(|t| t.offset).collect();
    let feeds = src.feeds(&offsets, ctx.opts.compression, &ctx.budget);
    let deliveries = targets
        .into_iter()
        .zip(feeds)
        .zip(slots)
        .zip(ends)
        .map(|(((t, feed), slot), end)| deliver(ctx.clone(), source, t, feed, slot, end));
    let out = futures::future::join_all(deliveries).await;
    ctx.wake.notify_one();
    out
}

/// Once a stream's whole body is handed to the connection its host no longer counts it as
/// sending, and once every body of its job is, the job no longer counts among the readers:
/// the host's next file may start while this one waits for the agent's reply. What h2 still
/// holds of this one keeps its room in the bound until written (see `budget`), so the next
/// file's reader reads as that room frees, with no gap on the link between the two files.
struct BodyEnd {
    ctx: Arc<Ctx>,
    host: usize,
    /// Bodies of its job not ended yet: the last one gives up the job's place.
    bodies: Arc<AtomicUsize>,
    ended: AtomicBool,
}

impl BodyEnd {
    fn fire(&self) {
        if self.ended.swap(true, Ordering::Relaxed) {
            return;
        }
        {
            let mut t = self.ctx.turns.lock();
            if let Some(n) = t.sending.get_mut(self.host) {
                *n = n.saturating_sub(1);
            }
            if self.bodies.fetch_sub(1, Ordering::Relaxed) == 1 {
                t.reading = t.reading.saturating_sub(1);
            }
        }
        self.ctx.wake.notify_one();
    }
}

impl Drop for BodyEnd {
    fn drop(&mut self) {
        self.fire();
    }
}

/// Delivers one file to one host: the first attempt from the shared reader, then retries
/// (each re-preparing the file, so it resumes after the last verified chunk).
async fn deliver(
    ctx: Arc<Ctx>,
    source: usize,
    t: Target,
    first: Feed,
    _slot: OwnedSemaphorePermit,
    end: Arc<BodyEnd>,
) -> Delivered {
    let f = OneFile {
        ctx: &ctx,
        src: &ctx.sources[source],
        h: &ctx.hosts[t.host],
        m: &ctx.manifests[t.host][t.file],
        wire: Arc::new(AtomicU64::new(0)),
        end,
    };
    let (h, m) = (f.h, f.m);
    let mut offset = t.offset;
    let mut feed = Some(first);
    let mut attempt = 0u32;
    let result = loop {
        if let Some(reason) = h.dead() {
            break Err(Stop::Failed(format!("not sent: {reason}")));
        }
        // Ctrl-C drops the stream mid-file: the agent keeps what it verified as the partial.
        let Some(outcome) = ctx
            .unless_interrupted(try_once(&f, &mut offset, feed.take()))
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
        let wait = match after_failure(&f, &status, attempt) {
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
        wire_bytes: f.wire.load(Ordering::Relaxed),
    }
}

/// One file going to one host: what every attempt at it uses.
struct OneFile<'a> {
    ctx: &'a Ctx,
    src: &'a SourceCtx,
    h: &'a HostCtx,
    m: &'a pb::FileManifest,
    /// Chunk bytes handed to a connection, over all attempts.
    wire: Arc<AtomicU64>,
    end: Arc<BodyEnd>,
}

/// After attempt `attempt` failed with `status`: the wait before the next one (announced),
/// or why there is none.
fn after_failure(f: &OneFile<'_>, status: &Status, attempt: u32) -> Result<Duration, String> {
    let OneFile { ctx, src, h, m, .. } = *f;
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
async fn try_once(f: &OneFile<'_>, offset: &mut u64, feed: Option<Feed>) -> Result<u64, Put> {
    if let Some(feed) = feed {
        return put(f, *offset, feed).await;
    }
    let OneFile { ctx, src, h, m, .. } = *f;
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
        Some(feed) => put(f, *offset, feed).await,
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
/// adds the chunk bytes handed to the connection to `f.wire`; fires `f.end` once the body is
/// all handed over.
async fn put(f: &OneFile<'_>, offset: u64, feed: Feed) -> Result<u64, Put> {
    let OneFile { ctx, h, m, .. } = *f;
    let header = put_wire::message_frame(&pb::PutFileMessage {
        msg: Some(Msg::Header(pb::PutFileHeader {
            manifest: Some(m.clone()),
            offset,
        })),
    });
    let progress = ctx.progress.clone();
    let wire = f.wire.clone();
    let end = f.end.clone();
    let host = end.host;
    let ctx_left = end.ctx.clone();
    let chunks = ReceiverStream::new(feed.rx).flat_map(move |c: ChunkMsg| {
        // Progress counts the file's bytes, so its rate and ETA stay comparable with and
        // without compression; the report has the wire bytes.
        progress.advance(c.len);
        wire.fetch_add(c.data.len() as u64, Ordering::Relaxed);
        let left = &ctx_left.hosts[host].left;
        let _ = left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
            Some(l.saturating_sub(c.len))
        });
        futures::stream::iter(put_wire::chunk_frames(
            c.offset,
            c.compression as i32,
            c.data,
        ))
    });
    let conn = h.put_connection();
    let mut carrying = Some(Carrying {
        ctx: end.ctx.clone(),
        host: end.host,
        conn,
    });
    let ended = futures::stream::poll_fn(move |_| {
        carrying.take();
        end.fire();
        Poll::Ready(None)
    });
    let stream = tokio_stream::once(header).chain(chunks).chain(ended);
    match put_wire::put_file(&h.clients[conn].1, stream).await {
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

    fn turn(host: usize, sending: usize, left: u64) -> HostTurn {
        HostTurn {
            host,
            sending,
            left,
        }
    }

    #[test]
    fn a_host_whose_stream_ended_goes_before_hosts_still_sending() {
        // Host 1's stream handed its last chunk over; hosts 0 and 2 are mid-file with more
        // left. First come, first served gave host 0 a second stream here and host 1 none.
        let order = turns([turn(0, 1, 500), turn(1, 0, 100), turn(2, 1, 900)].into_iter());
        assert_eq!(order, [1, 2, 0]);
    }

    #[test]
    fn among_hosts_equally_busy_the_one_with_most_left_goes_first() {
        let order = turns([turn(0, 0, 300), turn(1, 0, 700), turn(3, 0, 700)].into_iter());
        assert_eq!(order, [1, 3, 0]);
    }

    /// A dispatcher's context for `hosts` hosts with no connections (nothing is sent).
    fn dispatch_ctx(hosts: usize, max_reading: usize) -> Arc<Ctx> {
        let host = |i: usize| HostCtx {
            name: format!("m{i}"),
            root: String::new(),
            clients: Vec::new(),
            carrying: Vec::new(),
            next_client: AtomicUsize::new(0),
            slots: Arc::new(Semaphore::new(4)),
            dead: Mutex::new(None),
            last_done: Mutex::new(None),
            left: AtomicU64::new(0),
        };
        Arc::new(Ctx {
            hosts: (0..hosts).map(host).collect(),
            sources: Vec::new(),
            manifests: Vec::new(),
            progress: Progress::new(super::super::ProgressMode::Quiet),
            opts: SendOptions::default(),
            interrupt: None,
            budget: Budget::new(0, 1024),
            turns: Mutex::new(Turns {
                reading: 0,
                sending: vec![0; hosts],
            }),
            max_reading,
            wake: Notify::new(),
        })
    }

    fn one_file(host: usize) -> Job {
        Job {
            source: 0,
            targets: vec![Target {
                host,
                file: 0,
                offset: 0,
            }],
        }
    }

    #[test]
    fn the_place_a_body_frees_goes_to_its_host_and_an_unfired_end_frees_it_too() {
        let ctx = dispatch_ctx(2, 2);
        ctx.hosts[0].left.store(100, Ordering::Relaxed);
        ctx.hosts[1].left.store(900, Ordering::Relaxed);
        let mut shared = VecDeque::new();
        let mut own = vec![
            VecDeque::from([one_file(0), one_file(0)]),
            VecDeque::from([one_file(1), one_file(1)]),
        ];
        let mut next =
            || next_job(&ctx, &mut shared, &mut own).map(|(j, p)| (j.targets[0].host, p));
        let (first, p_first) = next().unwrap();
        let (second, p_second) = next().unwrap();
        assert_eq!(
            (first, second),
            (1, 0),
            "most left first, then the idle host"
        );
        assert!(next().is_none(), "both places are taken");
        // Host 0's body is handed over: the place goes back to host 0, though host 1 has more
        // bytes left and a file waiting too.
        p_second.ends[0].fire();
        let (third, _p_third) = next().unwrap();
        assert_eq!(third, 0);
        // A transfer that ended without firing (it panicked) frees its place when dropped.
        assert!(next().is_none());
        drop(p_first);
        assert_eq!(next().map(|(h, _)| h), Some(1));
    }

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
