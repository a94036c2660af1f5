//! The agent's file handlers never block its async runtime, and stalled transfers end.

// Test code throughout: a failed unwrap is a failed test, and a test may set its own
// environment and sleep; its helper modules are private to this test.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::time::{Duration, Instant};

use dglrun_integration_tests::{RawClient, TestCluster};
use dglrun_proto::pb::{self, put_file_message::Msg};
use dglrun_proto::{PROTOCOL_VERSION, VERSION};

type Client = RawClient;

async fn client(cluster: &TestCluster) -> Client {
    cluster.client(0)
}

async fn hello(c: &mut Client) -> Duration {
    let t = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(5),
        c.hello(pb::HelloRequest {
            protocol_version: PROTOCOL_VERSION,
            client_version: VERSION.into(),
        }),
    )
    .await
    .expect("Hello must answer while Preflights are handled")
    .unwrap();
    t.elapsed()
}

/// Lets whatever is stuck opening the FIFO go on (so the agent can stop cleanly).
struct FifoWriter(std::path::PathBuf);

impl Drop for FifoWriter {
    fn drop(&mut self) {
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fifo_at_ip_config_is_refused_naming_it_and_hello_stays_fast() {
    let cluster = TestCluster::start(1);
    let ws = cluster.root(0).join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    let fifo = ws.join("ip_config.txt");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let _unblock = FifoWriter(fifo.clone());
    let mut c = client(&cluster).await;
    hello(&mut c).await;
    // More Preflights than the agent has runtime workers: blocking ones would take them all.
    let preflights: Vec<_> = (0..4)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move {
                c.preflight(pb::PreflightRequest {
                    workspace: "ws".into(),
                    read_files: vec!["ip_config.txt".into()],
                    free_port_on: String::new(),
                    ..Default::default()
                })
                .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..5 {
        let took = hello(&mut c).await;
        assert!(took < Duration::from_millis(100), "Hello took {took:?}");
    }
    for p in preflights {
        let reply = tokio::time::timeout(Duration::from_secs(20), p)
            .await
            .expect("Preflight must answer, not wait for a writer on the FIFO")
            .unwrap()
            .unwrap()
            .into_inner();
        let f = &reply.files[0];
        assert!(f.content.is_empty());
        assert!(
            f.error.contains("ip_config.txt") && f.error.contains("not a regular file"),
            "{}",
            f.error
        );
    }
}

/// A PutFile stream that sends its header and then nothing is dropped after the idle timeout
/// (`DGL_AGENT_TRANSFER_IDLE_TIMEOUT`), naming the file, and frees its transfer permit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_put_file_stream_is_dropped_after_the_idle_timeout() {
    // The agent inherits it; nextest runs each test in its own process.
    std::env::set_var("DGL_AGENT_TRANSFER_IDLE_TIMEOUT", "1");
    let cluster = TestCluster::start(1);
    let c = client(&cluster).await;
    let data = b"stalled".to_vec();
    let header = |path: &str| dglrun_integration_tests::wire::put_header(path, &data);
    let mut senders = Vec::new();
    let mut calls = Vec::new();
    // Every permit taken by a stream that stalls after its header (distinct paths: transfers
    // of one path wait for each other's lock, not for the network).
    for i in 0..64 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(header(&format!("ws/stalled{i}.bin")))
            .await
            .unwrap();
        let mut c = c.clone();
        calls.push(tokio::spawn(async move {
            c.put_file(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        }));
        senders.push(tx);
    }
    for call in calls {
        let err = tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .expect("a stalled PutFile must end by itself")
            .unwrap()
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
        assert!(err.message().contains("ws/stalled"), "{}", err.message());
    }
    drop(senders);
    // The permits are free again: a whole transfer goes through.
    let chunk = pb::PutFileMessage {
        msg: Some(Msg::Chunk(pb::Chunk {
            offset: 0,
            data: data.clone().into(),
            ..Default::default()
        })),
    };
    c.clone()
        .put_file(tokio_stream::iter(vec![header("ws/stalled.bin"), chunk]))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(cluster.root(0).join("ws/stalled.bin")).unwrap(),
        data
    );
}
