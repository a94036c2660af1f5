//! Prepare and put against a real gRPC server on 127.0.0.1 (PutFile needs a real stream).

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use dglrun_proto::digest::{hash_reader, FileDigest};
use dglrun_proto::pb::agent_client::AgentClient;
use dglrun_proto::pb::agent_server::AgentServer;
use dglrun_proto::pb::FileStatus;
use dglrun_proto::{CHUNK_SIZE, MAX_MESSAGE_BYTES};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Channel;
use tonic::Code;

use super::*;
use crate::jobs::{Jobs, JobsConfig};
use crate::service::AgentService;
use dglrun_proto::pb::put_file_message::Msg;
use std::fs;
use tonic::Status;

struct Agent {
    _dir: tempfile::TempDir,
    root: Root,
    client: AgentClient<Channel>,
}

impl Agent {
    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p)
    }
}

async fn agent() -> Agent {
    agent_with_idle_timeout(DEFAULT_IDLE_TIMEOUT).await
}

async fn agent_with_idle_timeout(idle: std::time::Duration) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let root = Root::new(&dir.path().join("root")).unwrap();
    let files = Arc::new(Files::new(root.clone()).with_idle_timeout(idle));
    let jobs = Jobs::start(
        root.clone(),
        JobsConfig {
            lease_timeout: std::time::Duration::from_secs(10),
            grace: std::time::Duration::from_secs(1),
            host_logs: Default::default(),
        },
    )
    .unwrap();
    let service = AgentService::new(root.clone(), files, jobs);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                AgentServer::new(service)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = AgentClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Agent {
        _dir: dir,
        root,
        client,
    }
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

fn manifest(path: &str, d: &FileDigest, mode: u32) -> pb::FileManifest {
    pb::FileManifest {
        path: path.into(),
        size: d.size,
        digest: d.digest.to_vec(),
        chunk_hashes: d.chunk_hashes.iter().map(|h| h.to_vec()).collect(),
        mode,
    }
}

fn digest(bytes: &[u8]) -> FileDigest {
    hash_reader(bytes, |_| {}).unwrap()
}

/// Header, then the chunks of `bytes` from `offset` (a chunk may be replaced by `tamper`).
fn messages(m: pb::FileManifest, bytes: &[u8], offset: u64) -> Vec<pb::PutFileMessage> {
    let mut out = vec![pb::PutFileMessage {
        msg: Some(Msg::Header(pb::PutFileHeader {
            manifest: Some(m),
            offset,
        })),
    }];
    let mut at = offset as usize;
    while at < bytes.len() {
        let end = (at + CHUNK_SIZE).min(bytes.len());
        out.push(pb::PutFileMessage {
            msg: Some(Msg::Chunk(pb::Chunk {
                offset: at as u64,
                data: bytes[at..end].to_vec().into(),
                ..Default::default()
            })),
        });
        at = end;
    }
    out
}

async fn put(a: &Agent, msgs: Vec<pb::PutFileMessage>) -> Result<pb::PutFileReply, Status> {
    a.client
        .clone()
        .put_file(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

async fn prepare(a: &Agent, files: Vec<pb::FileManifest>) -> Result<Vec<(i32, u64)>, Status> {
    let reply = a
        .client
        .clone()
        .prepare_files(pb::PrepareFilesRequest { files })
        .await?
        .into_inner();
    assert!(reply.free_bytes > 0);
    Ok(reply
        .files
        .iter()
        .map(|f| (f.status, f.resume_offset))
        .collect())
}

const SEND: i32 = FileStatus::Send as i32;
const PRESENT: i32 = FileStatus::Present as i32;

#[tokio::test]
async fn put_lands_whole_with_its_mode_and_then_is_present() {
    let a = agent().await;
    let bytes = data(2 * CHUNK_SIZE + 17, 1);
    let d = digest(&bytes);
    let m = manifest("ws/data/part0/graph.dgl", &d, 0o640);
    assert_eq!(prepare(&a, vec![m.clone()]).await.unwrap(), [(SEND, 0)]);
    let reply = put(&a, messages(m.clone(), &bytes, 0)).await.unwrap();
    assert_eq!(reply.bytes_written, bytes.len() as u64);
    let target = a.path("ws/data/part0/graph.dgl");
    assert_eq!(fs::read(&target).unwrap(), bytes);
    assert_eq!(
        fs::metadata(&target).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    assert!(!partial_path(&target).exists());
    assert_eq!(prepare(&a, vec![m.clone()]).await.unwrap(), [(PRESENT, 0)]);

    // Only the mode differs: fixed in place, nothing to send.
    let m755 = pb::FileManifest { mode: 0o755, ..m };
    assert_eq!(prepare(&a, vec![m755]).await.unwrap(), [(PRESENT, 0)]);
    assert_eq!(
        fs::metadata(&target).unwrap().permissions().mode() & 0o7777,
        0o755
    );
}

#[tokio::test]
async fn empty_files_are_sent_too() {
    let a = agent().await;
    let d = digest(b"");
    let m = manifest("ws/empty", &d, 0o644);
    assert_eq!(prepare(&a, vec![m.clone()]).await.unwrap(), [(SEND, 0)]);
    put(&a, messages(m.clone(), b"", 0)).await.unwrap();
    assert_eq!(fs::read(a.path("ws/empty")).unwrap(), b"");
    assert_eq!(prepare(&a, vec![m]).await.unwrap(), [(PRESENT, 0)]);
}

#[tokio::test]
async fn changed_target_is_sent_again() {
    let a = agent().await;
    let bytes = data(1000, 2);
    let m = manifest("ws/f", &digest(&bytes), 0o644);
    put(&a, messages(m.clone(), &bytes, 0)).await.unwrap();
    let mut other = bytes.clone();
    other[10] ^= 1;
    fs::write(a.path("ws/f"), &other).unwrap();
    assert_eq!(prepare(&a, vec![m]).await.unwrap(), [(SEND, 0)]);
}

#[tokio::test]
async fn a_bad_chunk_is_not_written_and_nothing_appears() {
    let a = agent().await;
    let bytes = data(3 * CHUNK_SIZE, 3);
    let m = manifest("ws/big", &digest(&bytes), 0o644);
    let mut msgs = messages(m.clone(), &bytes, 0);
    if let Some(Msg::Chunk(c)) = &mut msgs[2].msg {
        let mut v = c.data.to_vec();
        v[5] ^= 0xff;
        c.data = v.into();
    }
    let err = put(&a, msgs).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(
        err.message().contains("ws/big") && err.message().contains(&format!("offset {CHUNK_SIZE}")),
        "{}",
        err.message()
    );
    assert!(!a.path("ws/big").exists());
    // The verified first chunk is kept, so the next run resumes after it.
    assert_eq!(
        prepare(&a, vec![m.clone()]).await.unwrap(),
        [(SEND, CHUNK_SIZE as u64)]
    );
    put(&a, messages(m.clone(), &bytes, CHUNK_SIZE as u64))
        .await
        .unwrap();
    assert_eq!(fs::read(a.path("ws/big")).unwrap(), bytes);
    assert!(!partial_path(&a.path("ws/big")).exists());
}

#[tokio::test]
async fn resume_keeps_verified_chunks_and_drops_the_rest() {
    let a = agent().await;
    let bytes = data(3 * CHUNK_SIZE + 5, 4);
    let m = manifest("ws/r", &digest(&bytes), 0o644);
    fs::create_dir_all(a.path("ws")).unwrap();
    let partial = partial_path(&a.path("ws/r"));
    // Two good chunks, then garbage.
    let mut content = bytes[..2 * CHUNK_SIZE].to_vec();
    content.extend_from_slice(&[0u8; 1000]);
    fs::write(&partial, &content).unwrap();
    assert_eq!(
        prepare(&a, vec![m.clone()]).await.unwrap(),
        [(SEND, 2 * CHUNK_SIZE as u64)]
    );
    // A prepare only reads: the put that resumes cuts the garbage off.
    assert_eq!(fs::read(&partial).unwrap(), content);
    let reply = put(&a, messages(m, &bytes, 2 * CHUNK_SIZE as u64))
        .await
        .unwrap();
    assert_eq!(reply.bytes_written, CHUNK_SIZE as u64 + 5);
    assert_eq!(fs::read(a.path("ws/r")).unwrap(), bytes);
}

#[tokio::test]
async fn a_complete_partial_is_finished_without_data() {
    let a = agent().await;
    let bytes = data(CHUNK_SIZE + 3, 5);
    let m = manifest("ws/c", &digest(&bytes), 0o644);
    fs::create_dir_all(a.path("ws")).unwrap();
    fs::write(partial_path(&a.path("ws/c")), &bytes).unwrap();
    let size = bytes.len() as u64;
    assert_eq!(prepare(&a, vec![m.clone()]).await.unwrap(), [(SEND, size)]);
    put(&a, messages(m, &bytes, size)).await.unwrap();
    assert_eq!(fs::read(a.path("ws/c")).unwrap(), bytes);
}

#[tokio::test]
async fn resume_without_prepare_verifies_the_partial_first() {
    let a = agent().await;
    let bytes = data(2 * CHUNK_SIZE, 6);
    let m = manifest("ws/p", &digest(&bytes), 0o644);
    fs::create_dir_all(a.path("ws")).unwrap();
    let partial = partial_path(&a.path("ws/p"));
    let mut wrong = bytes[..CHUNK_SIZE].to_vec();
    wrong[0] ^= 1;
    fs::write(&partial, &wrong).unwrap();
    let err = put(&a, messages(m.clone(), &bytes, CHUNK_SIZE as u64))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("ws/p"), "{}", err.message());
    assert!(!a.path("ws/p").exists());

    fs::write(&partial, &bytes[..CHUNK_SIZE]).unwrap();
    put(&a, messages(m, &bytes, CHUNK_SIZE as u64))
        .await
        .unwrap();
    assert_eq!(fs::read(a.path("ws/p")).unwrap(), bytes);
}

#[tokio::test]
async fn a_partial_changed_after_prepare_is_verified_again() {
    let a = agent().await;
    let bytes = data(2 * CHUNK_SIZE, 7);
    let m = manifest("ws/q", &digest(&bytes), 0o644);
    fs::create_dir_all(a.path("ws")).unwrap();
    let partial = partial_path(&a.path("ws/q"));
    fs::write(&partial, &bytes[..CHUNK_SIZE]).unwrap();
    assert_eq!(
        prepare(&a, vec![m.clone()]).await.unwrap(),
        [(SEND, CHUNK_SIZE as u64)]
    );
    let mut wrong = bytes[..CHUNK_SIZE].to_vec();
    wrong[7] ^= 1;
    #[allow(clippy::disallowed_methods)] // a test
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(&partial, &wrong).unwrap();
    let err = put(&a, messages(m, &bytes, CHUNK_SIZE as u64))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

#[tokio::test]
async fn protocol_violations_are_refused() {
    let a = agent().await;
    let bytes = data(2 * CHUNK_SIZE, 8);
    let m = manifest("ws/v", &digest(&bytes), 0o644);
    let check = |msgs: Vec<pb::PutFileMessage>, needle: &'static str| {
        let a = &a;
        async move {
            let err = put(a, msgs).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
            assert!(
                err.message().contains(needle),
                "{:?} lacks {needle:?}",
                err.message()
            );
        }
    };
    // No header.
    let mut msgs = messages(m.clone(), &bytes, 0);
    msgs.remove(0);
    check(msgs, "first message").await;
    // Chunks out of order.
    let mut msgs = messages(m.clone(), &bytes, 0);
    msgs.swap(1, 2);
    check(msgs, "expected 0").await;
    // Stream ends early.
    let mut msgs = messages(m.clone(), &bytes, 0);
    msgs.pop();
    check(msgs, "ended at 4194304").await;
    // Offset not on a chunk boundary.
    check(messages(m.clone(), &bytes, 10), "not a chunk boundary").await;
    // A short chunk in the middle.
    let mut msgs = messages(m.clone(), &bytes, 0);
    if let Some(Msg::Chunk(c)) = &mut msgs[1].msg {
        c.data = c.data.slice(..100);
    }
    check(msgs, "has 100 bytes").await;
    // A manifest whose chunk list does not fit its size.
    let bad = pb::FileManifest {
        size: 5,
        ..m.clone()
    };
    check(messages(bad, &bytes, 0), "chunk hashes").await;
    assert!(!a.path("ws/v").exists());
}

#[tokio::test]
async fn escapes_are_refused_naming_the_path() {
    let a = agent().await;
    let d = digest(b"x");
    for p in ["../out", "/etc/x", "ws/../../x"] {
        let err = prepare(&a, vec![manifest(p, &d, 0o644)]).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains(p), "{}", err.message());
        let err = put(&a, messages(manifest(p, &d, 0o644), b"x", 0))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    }
    assert!(fs::read_dir(a.root.path()).unwrap().next().is_none());
}

#[tokio::test]
async fn a_directory_in_the_way_is_reported() {
    let a = agent().await;
    fs::create_dir_all(a.path("ws/d")).unwrap();
    let d = digest(b"x");
    let err = prepare(&a, vec![manifest("ws/d", &d, 0o644)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(err.message().contains("ws/d"), "{}", err.message());
}

#[tokio::test]
async fn concurrent_puts_of_one_path_do_not_mix() {
    let a = agent().await;
    let one = data(3 * CHUNK_SIZE, 9);
    let two = data(3 * CHUNK_SIZE, 10);
    let m1 = manifest("ws/same", &digest(&one), 0o644);
    let m2 = manifest("ws/same", &digest(&two), 0o644);
    let (r1, r2) = tokio::join!(
        put(&a, messages(m1.clone(), &one, 0)),
        put(&a, messages(m2.clone(), &two, 0))
    );
    r1.unwrap();
    r2.unwrap();
    let got = fs::read(a.path("ws/same")).unwrap();
    assert!(got == one || got == two, "the file mixes both transfers");
    assert!(!partial_path(&a.path("ws/same")).exists());
}

#[tokio::test]
async fn the_cache_survives_a_restart_and_spares_a_re_read() {
    let a = agent().await;
    let bytes = data(CHUNK_SIZE + 1, 11);
    let m = manifest("ws/k", &digest(&bytes), 0o644);
    put(&a, messages(m.clone(), &bytes, 0)).await.unwrap();
    assert_eq!(prepare(&a, vec![m.clone()]).await.unwrap(), [(PRESENT, 0)]);
    assert!(a.root.state_dir().join("hashes.json").exists());
    // A new agent on the same root finds the saved digest, so it need not read the file.
    let target = a.path("ws/k");
    let b = Files::new(a.root.clone());
    let meta = fs::symlink_metadata(&target).unwrap();
    assert_eq!(b.cache.lookup(&target, &meta), Some(digest(&bytes).digest));
}

/// The Prometheus counters follow what happened. They are process-wide and other tests run in
/// parallel, so only lower bounds of the increase are checked.
#[tokio::test]
async fn counters_count_bytes_files_skips_and_bad_chunks() {
    use crate::metrics::COUNTERS;
    use std::sync::atomic::Ordering::Relaxed;
    let read = || {
        (
            COUNTERS.bytes_received.load(Relaxed),
            COUNTERS.files_verified.load(Relaxed),
            COUNTERS.files_skipped.load(Relaxed),
            COUNTERS.verification_failures.load(Relaxed),
        )
    };
    let a = agent().await;
    let bytes = data(CHUNK_SIZE + 5, 4);
    let m = manifest("ws/counted", &digest(&bytes), 0o644);
    let before = read();
    let mut bad = messages(m.clone(), &bytes, 0);
    if let Some(Msg::Chunk(c)) = &mut bad[1].msg {
        let mut v = c.data.to_vec();
        v[0] ^= 1;
        c.data = v.into();
    }
    assert!(put(&a, bad).await.is_err());
    put(&a, messages(m.clone(), &bytes, 0)).await.unwrap();
    assert_eq!(prepare(&a, vec![m]).await.unwrap(), [(PRESENT, 0)]);
    let after = read();
    assert!(
        after.0 - before.0 >= bytes.len() as u64,
        "{before:?} {after:?}"
    );
    assert!(after.1 > before.1, "files verified: {before:?} {after:?}");
    assert!(after.2 > before.2, "files skipped: {before:?} {after:?}");
    assert!(
        after.3 > before.3,
        "verification failures: {before:?} {after:?}"
    );
}

/// `messages`, with the chunk at index `i` (0-based, after the header) sent as `frame` with
/// the given compression instead of raw.
fn with_chunk(
    mut msgs: Vec<pb::PutFileMessage>,
    i: usize,
    frame: Vec<u8>,
    compression: pb::Compression,
) -> Vec<pb::PutFileMessage> {
    if let Some(Msg::Chunk(c)) = &mut msgs[i + 1].msg {
        c.data = frame.into();
        c.compression = compression as i32;
    }
    msgs
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(bytes, 3).unwrap()
}

#[tokio::test]
async fn zstd_chunks_are_decompressed_verified_and_written() {
    let a = agent().await;
    let bytes = data(2 * CHUNK_SIZE + 17, 12);
    let m = manifest("ws/z", &digest(&bytes), 0o644);
    // Compressed, raw and compressed again (the short last chunk): any mix is fine.
    let c = CHUNK_SIZE;
    let mut msgs = messages(m.clone(), &bytes, 0);
    msgs = with_chunk(msgs, 0, zstd(&bytes[..c]), pb::Compression::Zstd);
    msgs = with_chunk(msgs, 2, zstd(&bytes[2 * c..]), pb::Compression::Zstd);
    let reply = put(&a, msgs).await.unwrap();
    assert_eq!(reply.bytes_written, bytes.len() as u64);
    assert_eq!(fs::read(a.path("ws/z")).unwrap(), bytes);
    assert_eq!(prepare(&a, vec![m.clone()]).await.unwrap(), [(PRESENT, 0)]);

    // A resumed transfer may be compressed too.
    fs::remove_file(a.path("ws/z")).unwrap();
    fs::write(partial_path(&a.path("ws/z")), &bytes[..c]).unwrap();
    assert_eq!(
        prepare(&a, vec![m.clone()]).await.unwrap(),
        [(SEND, c as u64)]
    );
    let msgs = with_chunk(
        messages(m, &bytes, c as u64),
        0,
        zstd(&bytes[c..2 * c]),
        pb::Compression::Zstd,
    );
    put(&a, msgs).await.unwrap();
    assert_eq!(fs::read(a.path("ws/z")).unwrap(), bytes);
}

#[tokio::test]
async fn a_zstd_frame_that_is_not_exactly_its_chunk_is_refused_and_nothing_of_it_written() {
    use crate::metrics::COUNTERS;
    use std::sync::atomic::Ordering::Relaxed;
    let a = agent().await;
    let c = CHUNK_SIZE;
    let bytes = data(3 * c, 13);
    let m = manifest("ws/bomb", &digest(&bytes), 0o644);
    let other = data(c, 14);
    let mut longer = bytes[c..2 * c].to_vec();
    longer.push(0);
    let cases: [(&str, Vec<u8>, &str); 6] = [
        // 256 MiB of zeros in a frame of a few KiB: must never be decompressed whole.
        (
            "bomb",
            zstd(&vec![0u8; 64 * c]),
            "does not decompress to its 4194304 bytes",
        ),
        (
            "one byte more",
            zstd(&longer),
            "does not decompress to its 4194304 bytes",
        ),
        (
            "one byte less",
            zstd(&bytes[c..2 * c - 1]),
            "decompresses to 4194303 bytes",
        ),
        (
            "garbage",
            b"this is not a zstd frame".to_vec(),
            "does not decompress",
        ),
        (
            "cut off",
            zstd(&bytes[c..2 * c])[..100].to_vec(),
            "does not decompress",
        ),
        ("another chunk", zstd(&other), "does not match its SHA-256"),
    ];
    let partial = partial_path(&a.path("ws/bomb"));
    for (what, frame, needle) in cases {
        let failures = COUNTERS.verification_failures.load(Relaxed);
        let msgs = with_chunk(
            messages(m.clone(), &bytes, 0),
            1,
            frame,
            pb::Compression::Zstd,
        );
        let err = put(&a, msgs).await.unwrap_err();
        assert_eq!(err.code(), Code::DataLoss, "{what}: {err:?}");
        let msg = err.message();
        assert!(
            msg.contains("ws/bomb") && msg.contains(&format!("offset {c}")) && msg.contains(needle),
            "{what}: {msg}"
        );
        assert!(msg.contains("nothing from it was written"), "{what}: {msg}");
        assert!(
            COUNTERS.verification_failures.load(Relaxed) > failures,
            "{what}: counted as a verification failure"
        );
        // The good first chunk is kept, nothing of the bad one is.
        assert_eq!(fs::metadata(&partial).unwrap().len(), c as u64, "{what}");
        assert_eq!(fs::read(&partial).unwrap(), bytes[..c], "{what}");
        assert!(!a.path("ws/bomb").exists(), "{what}");
    }
    // A bad first chunk leaves an empty partial.
    let msgs = with_chunk(
        messages(m.clone(), &bytes, 0),
        0,
        zstd(&vec![0u8; 64 * c]),
        pb::Compression::Zstd,
    );
    assert_eq!(put(&a, msgs).await.unwrap_err().code(), Code::DataLoss);
    assert_eq!(fs::metadata(&partial).unwrap().len(), 0);
    // Raw chunks still land as before.
    put(&a, messages(m, &bytes, 0)).await.unwrap();
    assert_eq!(fs::read(a.path("ws/bomb")).unwrap(), bytes);
}

#[tokio::test]
async fn oversized_frames_and_unknown_compressions_are_refused_before_the_writer() {
    let a = agent().await;
    let bytes = data(2 * CHUNK_SIZE, 15);
    let m = manifest("ws/w", &digest(&bytes), 0o644);
    let too_long = vec![0u8; dglrun_proto::compress::max_frame_len(CHUNK_SIZE) + 1];
    let msgs = with_chunk(
        messages(m.clone(), &bytes, 0),
        0,
        too_long,
        pb::Compression::Zstd,
    );
    let err = put(&a, msgs).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("ws/w") && err.message().contains("longer than any frame"),
        "{}",
        err.message()
    );
    let mut msgs = messages(m, &bytes, 0);
    if let Some(Msg::Chunk(c)) = &mut msgs[1].msg {
        c.compression = 7;
    }
    let err = put(&a, msgs).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("unknown compression (7)"),
        "{}",
        err.message()
    );
    assert!(!a.path("ws/w").exists());
}

/// A PutFile whose messages the test sends one by one; the call runs in the background.
struct Held {
    tx: tokio::sync::mpsc::Sender<pb::PutFileMessage>,
    call: tokio::task::JoinHandle<Result<pb::PutFileReply, Status>>,
}

fn held_put(a: &Agent) -> Held {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut client = a.client.clone();
    let call = tokio::spawn(async move {
        client
            .put_file(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner())
    });
    Held { tx, call }
}

/// Waits until the agent holds a lock on some path (its writer has started).
async fn settle() {
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_hard_linked_partial_or_target_never_changes_a_file_outside_the_root() {
    let a = agent().await;
    let outside = a._dir.path().join("outside.txt");
    fs::write(&outside, b"not yours").unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir_all(a.path("ws")).unwrap();
    fs::hard_link(&outside, a.path("ws/.f.txt.dglrun-partial")).unwrap();
    let bytes = data(CHUNK_SIZE + 5, 3);
    let m = manifest("ws/f.txt", &digest(&bytes), 0o644);
    prepare(&a, vec![m.clone()]).await.unwrap();
    assert_eq!(
        fs::read(&outside).unwrap(),
        b"not yours",
        "prepare truncated it"
    );
    put(&a, messages(m.clone(), &bytes, 0)).await.unwrap();
    assert_eq!(
        fs::read(&outside).unwrap(),
        b"not yours",
        "put wrote into it"
    );
    assert_eq!(fs::read(a.path("ws/f.txt")).unwrap(), bytes);

    // A target that is a hard link to an outside file with the right bytes: never chmodded.
    let same = a._dir.path().join("same.txt");
    fs::write(&same, &bytes).unwrap();
    fs::set_permissions(&same, fs::Permissions::from_mode(0o600)).unwrap();
    fs::hard_link(&same, a.path("ws/g.txt")).unwrap();
    let g = manifest("ws/g.txt", &digest(&bytes), 0o644);
    let states = prepare(&a, vec![g.clone()]).await.unwrap();
    assert_eq!(
        fs::metadata(&same).unwrap().permissions().mode() & 0o777,
        0o600
    );
    if states[0].0 == SEND {
        put(&a, messages(g, &bytes, 0)).await.unwrap();
    }
    assert_eq!(
        fs::metadata(&same).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(fs::read(&same).unwrap(), bytes);
}

#[tokio::test]
async fn a_directory_swapped_for_a_symlink_never_lets_a_file_out() {
    let a = agent().await;
    let outside = a._dir.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::create_dir_all(a.path("ws")).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (stop, ws, outside) = (stop.clone(), a.path("ws"), outside.clone());
        std::thread::spawn(move || {
            let (d, link) = (ws.join("d"), ws.join("link"));
            fs::create_dir(&d).unwrap();
            std::os::unix::fs::symlink(&outside, &link).unwrap();
            // `d` flips between a real directory and a symlink out of the root, atomically.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &d,
                    rustix::fs::CWD,
                    &link,
                    rustix::fs::RenameFlags::EXCHANGE,
                )
                .unwrap();
            }
        })
    };
    let bytes = b"escape?".to_vec();
    for i in 0..300 {
        let m = manifest(&format!("ws/d/f{i}"), &digest(&bytes), 0o644);
        let _ = prepare(&a, vec![m.clone()]).await;
        let _ = put(&a, messages(m, &bytes, 0)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().unwrap();
    let leaked: Vec<_> = fs::read_dir(&outside).unwrap().collect();
    assert!(
        leaked.is_empty(),
        "files created outside the root: {leaked:?}"
    );
}

#[tokio::test]
async fn reserved_names_are_refused_as_targets() {
    let a = agent().await;
    fs::create_dir_all(a.root.state_dir()).unwrap();
    fs::write(a.root.state_dir().join("jobs.json"), b"{}").unwrap();
    let bytes = b"[]".to_vec();
    let d = digest(&bytes);
    for p in [
        "ws/.a.dglrun-partial",
        ".dglrun/jobs.json",
        "./.dglrun/x",
        ".dglrun",
    ] {
        let err = put(&a, messages(manifest(p, &d, 0o644), &bytes, 0))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{p}: {err:?}");
        assert!(err.message().contains("reserved"), "{}", err.message());
        let err = prepare(&a, vec![manifest(p, &d, 0o644)]).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{p}: {err:?}");
    }
    // Through a symlink inside the root to the state directory: refused as well.
    std::os::unix::fs::symlink(".dglrun", a.path("state")).unwrap();
    let err = put(
        &a,
        messages(manifest("state/jobs.json", &d, 0o644), &bytes, 0),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(
        fs::read(a.root.state_dir().join("jobs.json")).unwrap(),
        b"{}"
    );
    assert!(!a.path("ws/.a.dglrun-partial").exists());
    // Nor anywhere beneath it, an existing subdirectory or a new one.
    fs::create_dir_all(a.root.state_dir().join("sub")).unwrap();
    for p in ["state/sub/x", "state/new/x"] {
        let err = put(&a, messages(manifest(p, &d, 0o644), &bytes, 0))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{p}: {err:?}");
        let err = prepare(&a, vec![manifest(p, &d, 0o644)]).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{p}: {err:?}");
    }
    assert!(!a.root.state_dir().join("sub/x").exists());
    assert!(!a.root.state_dir().join("new/x").exists());
}

#[tokio::test]
async fn prepare_never_truncates_a_file_that_holds_a_partial_name() {
    let a = agent().await;
    fs::create_dir_all(a.path("ws")).unwrap();
    fs::write(a.path("ws/.a.dglrun-partial"), b"someone's own bytes").unwrap();
    let bytes = data(100, 1);
    let m = manifest("ws/a", &digest(&bytes), 0o644);
    assert_eq!(prepare(&a, vec![m]).await.unwrap(), [(SEND, 0)]);
    assert_eq!(
        fs::read(a.path("ws/.a.dglrun-partial")).unwrap(),
        b"someone's own bytes"
    );
}

#[tokio::test]
async fn a_partial_swapped_mid_transfer_is_never_renamed_into_place_or_reported_present() {
    let a = agent().await;
    let good = data(2 * CHUNK_SIZE, 5);
    let evil = data(2 * CHUNK_SIZE, 6);
    let m = manifest("ws/a", &digest(&good), 0o644);
    let msgs = messages(m.clone(), &good, 0);
    let held = held_put(&a);
    held.tx.send(msgs[0].clone()).await.unwrap();
    held.tx.send(msgs[1].clone()).await.unwrap();
    settle().await;
    // A PutFile of the partial's name, same size: refused as reserved.
    let evil_m = manifest("ws/.a.dglrun-partial", &digest(&evil), 0o644);
    let err = put(&a, messages(evil_m, &evil, 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // A local user replacing the partial by hand: the writer notices the other inode.
    let swapped = a.path("ws/.evil");
    fs::write(&swapped, &evil).unwrap();
    fs::rename(&swapped, a.path("ws/.a.dglrun-partial")).unwrap();
    held.tx.send(msgs[2].clone()).await.unwrap();
    drop(held.tx);
    let result = held.call.await.unwrap();
    let on_disk = fs::read(a.path("ws/a")).ok();
    assert_ne!(
        on_disk.as_deref(),
        Some(&evil[..]),
        "the other bytes were renamed into place"
    );
    if result.is_ok() {
        assert_eq!(on_disk.as_deref(), Some(&good[..]));
    }
    let states = prepare(&a, vec![m]).await.unwrap();
    if states[0].0 == PRESENT {
        assert_eq!(fs::read(a.path("ws/a")).unwrap(), good);
    }
}

#[tokio::test]
async fn modes_follow_the_agent_umask() {
    // The umask is process-wide: this test sets it before the agent starts, as a user would.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o027));
    let a = agent().await;
    let bytes = b"x".to_vec();
    let m = manifest("ws/new/dir/f", &digest(&bytes), 0o666);
    put(&a, messages(m.clone(), &bytes, 0)).await.unwrap();
    let mode = |p: &str| fs::metadata(a.path(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("ws/new/dir/f"), 0o640);
    assert_eq!(mode("ws/new/dir"), 0o750);
    // A mode change alone (prepare of a present file) is masked as well.
    fs::set_permissions(a.path("ws/new/dir/f"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(prepare(&a, vec![m]).await.unwrap(), [(PRESENT, 0)]);
    assert_eq!(mode("ws/new/dir/f"), 0o640);
}

#[tokio::test]
async fn a_stalled_put_is_dropped_and_frees_its_permit() {
    let a = agent_with_idle_timeout(std::time::Duration::from_millis(500)).await;
    let bytes = data(CHUNK_SIZE + 1, 2);
    let m = manifest("ws/slow", &digest(&bytes), 0o644);
    let mut stalled = Vec::new();
    // Distinct paths: transfers of one path wait for each other's lock, not for the network.
    for i in 0..crate::limits::MAX_CONCURRENT_TRANSFERS {
        let h = held_put(&a);
        let m = manifest(&format!("ws/slow{i}"), &digest(&bytes), 0o644);
        h.tx.send(messages(m, &bytes, 0).remove(0)).await.unwrap();
        stalled.push(h);
    }
    for h in stalled {
        let err = tokio::time::timeout(std::time::Duration::from_secs(30), h.call)
            .await
            .expect("a stalled PutFile must end by itself")
            .unwrap()
            .unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
        assert!(err.message().contains("ws/slow"), "{}", err.message());
        drop(h.tx);
    }
    put(&a, messages(m, &bytes, 0)).await.unwrap();
    assert_eq!(fs::read(a.path("ws/slow")).unwrap(), bytes);
}
