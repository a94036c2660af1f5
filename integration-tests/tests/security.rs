//! The agent authenticates every call before doing anything, and stays inside its root.

use std::path::Path;
use std::process::Command;

use dglrun_integration_tests::{bin, repo_dir, root_flag, TestCluster};
use dglrun_proto::digest::hash_reader;
use dglrun_proto::meta::ClientMeta;
use dglrun_proto::pb::agent_client::AgentClient;
use dglrun_proto::pb::{self, put_file_message::Msg};
use dglrun_proto::tls::TlsFiles;
use dglrun_proto::{PROTOCOL_VERSION, VERSION};
use tonic::transport::{Channel, Endpoint};

/// Files under `dir`, leaving out the agent's own state directory.
fn list_files(dir: &Path) -> Vec<std::path::PathBuf> {
    dglrun_integration_tests::list_files(dir)
        .into_iter()
        .filter(|p| !p.starts_with(".dglrun"))
        .collect()
}

fn hello() -> pb::HelloRequest {
    pb::HelloRequest {
        protocol_version: PROTOCOL_VERSION,
        client_version: VERSION.into(),
    }
}

async fn channel(cluster: &TestCluster, scheme: &str) -> Channel {
    let uri = format!("{scheme}://{}:{}", cluster.ip(0), cluster.port);
    Endpoint::from_shared(uri).unwrap().connect_lazy()
}

async fn client(
    cluster: &TestCluster,
    token: Option<&str>,
) -> AgentClient<tonic::service::interceptor::InterceptedService<Channel, ClientMeta>> {
    AgentClient::with_interceptor(
        channel(cluster, "http").await,
        ClientMeta::new(token).unwrap(),
    )
}

/// A PutFile stream for `data` at `path`: header, then one chunk.
fn put_stream(path: &str, data: &[u8]) -> impl tokio_stream::Stream<Item = pb::PutFileMessage> {
    let d = hash_reader(data, |_| {}).unwrap();
    let header = pb::PutFileMessage {
        msg: Some(Msg::Header(pb::PutFileHeader {
            manifest: Some(pb::FileManifest {
                path: path.into(),
                size: d.size,
                digest: d.digest.to_vec(),
                chunk_hashes: d.chunk_hashes.iter().map(|h| h.to_vec()).collect(),
                mode: 0o644,
            }),
            offset: 0,
        })),
    };
    let chunk = pb::PutFileMessage {
        msg: Some(Msg::Chunk(pb::Chunk {
            offset: 0,
            data: data.to_vec().into(),
            ..Default::default()
        })),
    };
    tokio_stream::iter(vec![header, chunk])
}

fn token_file(dir: &Path, token: &str) -> String {
    let p = dir.join("token");
    std::fs::write(&p, format!("{token}\n")).unwrap();
    p.display().to_string()
}

#[tokio::test]
async fn wrong_or_missing_token_is_refused_before_any_side_effect() {
    let secrets = tempfile::tempdir().unwrap();
    let tf = token_file(secrets.path(), "s3cret-token");
    let cluster = TestCluster::start_with(1, &["--token-file", &tf]);

    for token in [
        None,
        Some("wrong"),
        Some("s3cret-toke"),
        Some("s3cret-tokenX"),
    ] {
        let mut c = client(&cluster, token).await;
        let err = c.hello(hello()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "token {token:?}");
        let err = c
            .put_file(put_stream("ws/f.txt", b"data"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
    assert!(
        list_files(cluster.root(0)).is_empty(),
        "nothing may be written"
    );

    let mut c = client(&cluster, Some("s3cret-token")).await;
    let reply = c.hello(hello()).await.unwrap().into_inner();
    assert_eq!(reply.protocol_version, PROTOCOL_VERSION);
    let log = cluster.agent_log(0);
    assert!(
        !log.contains("s3cret-token"),
        "the token must never be logged"
    );
}

#[tokio::test]
async fn incompatible_protocol_versions_refuse_each_other_naming_both() {
    let cluster = TestCluster::start(1);
    let mut c = AgentClient::with_interceptor(
        channel(&cluster, "http").await,
        |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("dglrun-protocol", 999.into());
            Ok(req)
        },
    );
    let err = c.hello(hello()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("999"), "{}", err.message());
    assert!(
        err.message()
            .contains(&format!("speaks {PROTOCOL_VERSION}")),
        "{}",
        err.message()
    );
}

#[test]
fn unauthenticated_agent_refuses_non_loopback_addresses() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(bin("dgl-agent"))
        .args(["--listen", "0.0.0.0:0", "--root"])
        .arg(root.path())
        .args(root_flag())
        .env_remove("DGL_AGENT_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 without authentication"),
        "{err}"
    );
}

#[test]
fn agent_refuses_root_without_allow_root() {
    if !nix::unistd::geteuid().is_root() {
        // Only root can see this refusal.
        dglrun_integration_tests::cannot_run("agent_refuses_root_without_allow_root", "not root");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(bin("dgl-agent"))
        .args(["--listen", "127.0.0.1:0", "--root"])
        .arg(root.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to run as root"));
}

fn make_certs(dir: &Path, host: &str) {
    let st = Command::new(repo_dir().join("scripts/make-certs.sh"))
        .arg(dir)
        .arg(host)
        .status()
        .unwrap();
    assert!(st.success(), "make-certs.sh failed");
}

#[tokio::test]
async fn mutual_tls_accepts_our_ca_and_refuses_another() {
    // The agent's address must be known before its certificate is made.
    let probe = TestCluster::start(1);
    let ip = probe.ip(0).to_string();
    drop(probe);

    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    make_certs(ours.path(), &ip);
    make_certs(theirs.path(), &ip);
    let o = |f: &str| ours.path().join(f).display().to_string();
    let cluster = TestCluster::start_at(
        &ip,
        &[
            "--tls-cert",
            &o(&format!("agent-{ip}.pem")),
            "--tls-key",
            &o(&format!("agent-{ip}.key")),
            "--tls-ca",
            &o("ca.pem"),
        ],
    );

    let tls = |dir: &Path| TlsFiles {
        cert: dir.join("coordinator.pem"),
        key: dir.join("coordinator.key"),
        ca: ours.path().join("ca.pem"),
    };
    let connect = |files: TlsFiles| {
        let uri = format!("https://{}:{}", cluster.ip(0), cluster.port);
        let ip = ip.clone();
        async move {
            let ch = Endpoint::from_shared(uri)
                .unwrap()
                .tls_config(files.client(&ip).unwrap())
                .unwrap()
                .connect()
                .await?;
            let mut c = AgentClient::with_interceptor(ch, ClientMeta::new(None).unwrap());
            c.hello(hello())
                .await
                .map_err(|s| -> Box<dyn std::error::Error> { s.into() })?;
            Ok::<_, Box<dyn std::error::Error>>(())
        }
    };
    connect(tls(ours.path()))
        .await
        .expect("a certificate of our CA is accepted");
    assert!(
        connect(tls(theirs.path())).await.is_err(),
        "a client certificate from another CA must be refused"
    );
    // Plain text to a TLS agent gets nowhere either.
    let mut plain = client(&cluster, None).await;
    assert!(plain.hello(hello()).await.is_err());
    assert!(list_files(cluster.root(0)).is_empty());
}

#[tokio::test]
async fn oversized_messages_are_refused_and_write_nothing() {
    let cluster = TestCluster::start(1);
    let mut c = client(&cluster, None).await;
    // Larger than any message the agent decodes.
    let huge = vec![7u8; dglrun_proto::MAX_MESSAGE_BYTES + 1];
    let err = c
        .put_file(put_stream("ws/huge.bin", &huge))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{err:?}"
    );
    // Within the message limit but a chunk larger than the protocol's chunk size.
    let big = vec![7u8; dglrun_proto::CHUNK_SIZE * 2];
    let mut stream: Vec<pb::PutFileMessage> =
        futures::StreamExt::collect(put_stream("ws/big.bin", &big)).await;
    if let Some(Msg::Chunk(ch)) = stream.get_mut(1).and_then(|m| m.msg.as_mut()) {
        ch.data = big.clone().into();
    }
    let err = c.put_file(tokio_stream::iter(stream)).await.unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok);
    let files = list_files(cluster.root(0));
    assert!(
        files
            .iter()
            .all(|p| !p.ends_with("huge.bin") && !p.ends_with("big.bin")),
        "no file may appear: {files:?}"
    );
}

#[tokio::test]
async fn traversal_attempts_write_nothing_outside_the_root() {
    let cluster = TestCluster::start(1);
    let outside = cluster.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, cluster.root(0).join("planted")).unwrap();
    let mut c = client(&cluster, None).await;
    let long = format!("ws/{}", "n".repeat(5000));
    let abs_outside = outside.join("abs.txt").display().to_string();
    for path in [
        "../x.txt",
        "ws/../../x.txt",
        "/etc/dglrun-test-x",
        abs_outside.as_str(),
        "planted/x.txt",
        "ws/a\0b",
        long.as_str(),
        "",
    ] {
        let err = c.put_file(put_stream(path, b"data")).await;
        assert!(err.is_err(), "{path:?} must be refused");
        let prep = c
            .prepare_files(pb::PrepareFilesRequest {
                files: vec![pb::FileManifest {
                    path: path.into(),
                    size: 0,
                    digest: dglrun_proto::digest::digest_of(0, &[]).to_vec(),
                    chunk_hashes: vec![],
                    mode: 0o644,
                }],
            })
            .await;
        assert!(prep.is_err(), "prepare {path:?} must be refused");
    }
    assert!(
        list_files(&outside).is_empty(),
        "written outside the root: {:?}",
        list_files(&outside)
    );
    assert!(!Path::new("/etc/dglrun-test-x").exists());
    assert!(!cluster.dir.path().join("x.txt").exists());
}
