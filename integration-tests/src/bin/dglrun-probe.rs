//! A bare gRPC client for tests that must call an agent as another user: every call an
//! attacker without the token would make, over plaintext h2c. Prints one line per call,
//! `<call> <grpc code>`, and exits 0 once all were made.
//!
//! Usage: dglrun-probe IP:PORT MARKER_PATH [TOKEN]

// Test code throughout: a failed unwrap is a failed test, and a test may set its own
// environment and sleep.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use dglrun_proto::meta::ClientMeta;
use dglrun_proto::pb::{self, agent_client::AgentClient};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(addr), Some(marker)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: dglrun-probe IP:PORT MARKER_PATH [TOKEN]");
        std::process::exit(2);
    };
    let channel = match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
        Ok(e) => e.connect_lazy(),
        Err(e) => {
            eprintln!("bad address {addr}: {e}");
            std::process::exit(2);
        }
    };
    let meta = ClientMeta::new(args.get(3).map(String::as_str)).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2);
    });
    let mut c = AgentClient::with_interceptor(channel, meta);
    let code = |r: Result<(), tonic::Status>| match r {
        Ok(()) => "Ok".to_string(),
        Err(s) => format!("{:?}", s.code()),
    };
    let hello = c
        .hello(pb::HelloRequest {
            protocol_version: dglrun_proto::PROTOCOL_VERSION,
            client_version: "probe".into(),
        })
        .await
        .map(|_| ());
    println!("hello {}", code(hello));
    let list = c.list_jobs(pb::ListJobsRequest {}).await.map(|_| ());
    println!("list_jobs {}", code(list));
    let prep = c
        .prepare_files(pb::PrepareFilesRequest {
            files: vec![pb::FileManifest {
                // Outside the workspace the spawn uses: a pending copy holds its workspace.
                path: "upload/probe.txt".into(),
                size: 0,
                digest: dglrun_proto::digest::digest_of(0, &[]).to_vec(),
                chunk_hashes: vec![],
                mode: 0o644,
            }],
        })
        .await
        .map(|_| ());
    println!("prepare_files {}", code(prep));
    let spawn = c
        .spawn(pb::SpawnRequest {
            job_id: "probe".into(),
            workspace: "ws".into(),
            processes: vec![pb::ProcessSpec {
                label: "probe".into(),
                role: "server".into(),
                command: Some(pb::process_spec::Command::Shell(format!("id > {marker}"))),
                ..Default::default()
            }],
            lease_ms: 10_000,
            restart: false,
        })
        .await
        .map(|_| ());
    println!("spawn {}", code(spawn));
}
