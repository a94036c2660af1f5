//! The agent authenticates every call before doing anything, and stays inside its root.

// Test code throughout: a failed unwrap is a failed test, and a test may set its own
// environment and sleep; its helper modules are private to this test.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use dglrun_integration_tests::run::run;
use dglrun_integration_tests::{bin, repo_dir, root_flag, TestCluster};
use dglrun_proto::meta::ClientMeta;
use dglrun_proto::pb::agent_client::AgentClient;
use dglrun_proto::pb::{self, put_file_message::Msg};
use dglrun_proto::tls::TlsFiles;
use dglrun_proto::{PROTOCOL_VERSION, VERSION};
use std::time::Duration;
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
    tokio_stream::iter(dglrun_integration_tests::wire::put_messages(path, data))
}

/// Runs `cmd` as user `nobody`; with `CI=true` a host that cannot do so fails the test.
fn as_nobody(cmd: &Path, args: &[&str]) -> Option<std::process::Output> {
    let ci = dglrun_integration_tests::in_ci();
    let usable = nix::unistd::geteuid().is_root()
        && Command::new("runuser")
            .args(["-u", "nobody", "--", "true"])
            .status()
            .is_ok_and(|s| s.success());
    if !usable {
        assert!(!ci, "CI=true: this test needs root and `runuser -u nobody`");
        eprintln!("SKIPPED: needs root and `runuser -u nobody`");
        return None;
    }
    Some(
        Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(cmd)
            .args(args)
            .output()
            .unwrap(),
    )
}

/// Another user of the same host, without the token, can neither look nor write nor run
/// anything through the agent, although it listens on loopback with no token given: the agent
/// made a per-user token of its own.
#[test]
fn another_local_user_without_the_token_can_do_nothing() {
    let cluster = TestCluster::start_zero_setup(1, &[]);
    // A directory everyone may write to: only the agent's refusal keeps the marker out.
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::create_dir_all(cluster.root(0).join("ws")).unwrap();
    let marker = open.path().join("id.txt");
    let addr = format!("{}:{}", cluster.ip(0), cluster.port);
    let marker_s = marker.display().to_string();
    let Some(out) = as_nobody(&bin("dglrun-probe"), &[&addr, &marker_s]) else {
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    std::thread::sleep(std::time::Duration::from_millis(500));
    for call in ["hello", "list_jobs", "prepare_files", "spawn"] {
        assert!(
            stdout.contains(&format!("{call} Unauthenticated")),
            "{call} must be refused:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        !marker.exists(),
        "a command ran: {:?}",
        std::fs::read_to_string(&marker)
    );
    assert!(list_files(cluster.root(0)).is_empty());
    // The owner, through the default token file, gets in.
    let st = cluster
        .coord()
        .args(["status", "--ip_config"])
        .arg(cluster.ip_config_file())
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
}

/// Zero setup: the agent creates a private token file where dgl-coord looks by default.
#[test]
fn default_token_file_is_created_private_and_found_by_dgl_coord() {
    let cluster = TestCluster::start_zero_setup(2, &[]);
    let tf = &cluster.token_file;
    assert_eq!(tf, &cluster.config_home().join("dglrun/token"));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(tf), 0o600);
    assert_eq!(mode(tf.parent().unwrap()), 0o700);
    assert_eq!(cluster.token().len(), 64, "256 bits in hex");
    let st = cluster
        .coord()
        .args(["status", "--ip_config"])
        .arg(cluster.ip_config_file())
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
}

#[tokio::test]
async fn wrong_or_missing_token_is_refused_before_any_side_effect() {
    let cluster = TestCluster::start(1);
    let token = cluster.token();
    let short = token[..token.len() - 1].to_string();
    let long = format!("{token}X");
    for t in [
        None,
        Some("wrong"),
        Some(short.as_str()),
        Some(long.as_str()),
    ] {
        let mut c = client(&cluster, t).await;
        let err = c.hello(hello()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "token {t:?}");
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

    let mut c = client(&cluster, Some(&token)).await;
    let reply = c.hello(hello()).await.unwrap().into_inner();
    assert_eq!(reply.protocol_version, PROTOCOL_VERSION);
    let log = cluster.agent_log(0);
    assert!(!log.contains(&token), "the token must never be logged");
}

#[tokio::test]
async fn incompatible_protocol_versions_refuse_each_other_naming_both() {
    let cluster = TestCluster::start(1);
    let auth: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", cluster.token()).parse().unwrap();
    let mut c = AgentClient::with_interceptor(
        channel(&cluster, "http").await,
        move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("dglrun-protocol", 999.into());
            req.metadata_mut().insert("authorization", auth.clone());
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
    // Without the token, the same call learns nothing about versions.
    let mut c = AgentClient::with_interceptor(
        channel(&cluster, "http").await,
        |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("dglrun-protocol", 999.into());
            Ok(req)
        },
    );
    let err = c.hello(hello()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(!err.message().contains("speaks"), "{}", err.message());
}

fn write_mode(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Token files readable by others, and tokens under 128 bits, are refused by both sides,
/// naming the file and the fix.
#[test]
fn open_or_short_token_files_are_refused_by_agent_and_coordinator() {
    let d = tempfile::tempdir().unwrap();
    let open = d.path().join("open");
    write_mode(&open, &"ab".repeat(32), 0o644);
    let short = d.path().join("short");
    write_mode(&short, "abc\n", 0o600);
    for (file, must) in [(&open, "chmod 600"), (&short, "too short")] {
        let mut agent = Command::new(bin("dgl-agent"));
        agent
            .args(["--listen", "127.0.0.1:0", "--root"])
            .arg(d.path())
            .arg("--token-file")
            .arg(file)
            .args(root_flag());
        let out = run(agent, Duration::from_secs(20));
        assert_ne!(out.code(), 0, "{out:?}");
        let err = &out.stderr;
        assert!(
            err.contains(&file.display().to_string()) && err.contains(must),
            "{err}"
        );
        let ipc = d.path().join("ip_config.txt");
        std::fs::write(&ipc, "127.0.0.1\n").unwrap();
        let out = Command::new(bin("dgl-coord"))
            .args(["status", "--ip_config"])
            .arg(&ipc)
            .env("DGL_AGENT_TOKEN_FILE", file)
            .env_remove("DGL_AGENT_TOKEN")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&file.display().to_string()) && err.contains(must),
            "{err}"
        );
    }
    // A short token in the environment is refused too.
    let mut agent = Command::new(bin("dgl-agent"));
    agent
        .args(["--listen", "127.0.0.1:0", "--root"])
        .arg(d.path())
        .args(root_flag())
        .env("DGL_AGENT_TOKEN", "abc");
    let out = run(agent, Duration::from_secs(20));
    assert_ne!(out.code(), 0, "{out:?}");
    assert!(out.stderr.contains("too short"), "{out:?}");
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
    let token = cluster.token();
    let connect = |files: TlsFiles| {
        let token = token.clone();
        let uri = format!("https://{}:{}", cluster.ip(0), cluster.port);
        let ip = ip.clone();
        async move {
            let ch = Endpoint::from_shared(uri)
                .unwrap()
                .tls_config(files.client(&ip).unwrap())
                .unwrap()
                .connect()
                .await?;
            let mut c = AgentClient::with_interceptor(ch, ClientMeta::new(Some(&token)).unwrap());
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
    // Plain text without the token gets nowhere either.
    let mut plain = client(&cluster, None).await;
    assert!(plain.hello(hello()).await.is_err());
    assert!(list_files(cluster.root(0)).is_empty());
    // dgl-coord with the user's certificates, with and without the token.
    for with_token in [true, false] {
        let mut cmd = cluster.coord();
        cmd.args(["status", "--ip_config"])
            .arg(cluster.ip_config_file())
            .arg("--tls-cert")
            .arg(ours.path().join("coordinator.pem"))
            .arg("--tls-key")
            .arg(ours.path().join("coordinator.key"))
            .arg("--tls-ca")
            .arg(ours.path().join("ca.pem"));
        if !with_token {
            cmd.env_remove("DGL_AGENT_TOKEN_FILE");
        }
        let r = run(cmd, Duration::from_secs(60));
        if with_token {
            assert_eq!(r.code(), 0, "{r:?}");
        } else {
            // The agent has a token, so a certificate alone is not enough.
            assert_ne!(r.code(), 0, "{r:?}");
        }
    }
}

#[tokio::test]
async fn oversized_messages_are_refused_and_write_nothing() {
    let cluster = TestCluster::start(1);
    let mut c = client(&cluster, Some(&cluster.token())).await;
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
    let mut c = client(&cluster, Some(&cluster.token())).await;
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

/// An IPv4 address of this host that is not loopback, or why there is none.
fn non_loopback_ip() -> Option<String> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.split_whitespace().nth(3))
        .and_then(|cidr| cidr.split('/').next())
        .map(str::to_string)
}

/// An agent on 0.0.0.0:0 with `token_file`; returns it, its port and its log.
fn agent_on_all_addresses(
    dir: &Path,
    token_file: &Path,
    extra: &[&str],
) -> (std::process::Child, u16, std::path::PathBuf) {
    let mut args = vec!["--listen", "0.0.0.0:0", "--token-file"];
    let tf = token_file.display().to_string();
    args.push(&tf);
    args.extend_from_slice(extra);
    agent_with(dir, &args)
}

/// An agent with `args` (which must include --listen with port 0), its own root under `dir`
/// and `dir/config` as its XDG_CONFIG_HOME; returns it, its port and its log.
fn agent_with(dir: &Path, args: &[&str]) -> (std::process::Child, u16, std::path::PathBuf) {
    use std::io::BufRead;
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("ws")).unwrap();
    let log = dir.join("agent.log");
    let mut child = Command::new(bin("dgl-agent"))
        .arg("--root")
        .arg(&root)
        .args(args)
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env_remove("DGL_AGENT_TOKEN")
        .env_remove("DGL_AGENT_TOKEN_FILE")
        .args(root_flag())
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .split_whitespace()
        .nth(3)
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no port in {line:?}: {}",
                std::fs::read_to_string(&log).unwrap()
            )
        });
    (child, port, log)
}

fn probe(addr: &str, marker: &Path, token: Option<&str>) -> String {
    let mut c = Command::new(bin("dglrun-probe"));
    c.arg(addr).arg(marker).args(token);
    let r = run(c, Duration::from_secs(60));
    format!("{}{}", r.stdout, r.stderr)
}

fn status(
    port: u16,
    ip: &str,
    token_file: &Path,
    dir: &Path,
) -> dglrun_integration_tests::run::Run {
    let ipc = dir.join("ip_config.txt");
    std::fs::write(&ipc, format!("{ip}\n")).unwrap();
    let mut c = Command::new(bin("dgl-coord"));
    c.args(["status", "--agent-port", &port.to_string(), "--ip_config"])
        .arg(&ipc)
        .env("DGL_AGENT_TOKEN_FILE", token_file)
        .env_remove("DGL_AGENT_TOKEN");
    run(c, Duration::from_secs(60))
}

/// One agent on 0.0.0.0: plaintext with the token works on loopback only; on its other
/// address the same plaintext request is refused before anything is read, dgl-coord gets in
/// over TLS derived from the token, and a coordinator with another token is refused at the
/// TLS handshake.
#[test]
fn non_loopback_addresses_require_tls_from_the_token() {
    let Some(ext) = non_loopback_ip() else {
        dglrun_integration_tests::cannot_run(
            "non_loopback_addresses_require_tls_from_the_token",
            "this host needs a non-loopback IPv4 address",
        );
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let tf = d.path().join("token");
    let token = dglrun_integration_tests::write_token_file(&tf).unwrap();
    let (mut agent, port, log) = agent_on_all_addresses(d.path(), &tf, &[]);
    let marker = d.path().join("marker");

    let local = probe(
        &format!("127.0.0.1:{port}"),
        &d.path().join("local-marker"),
        Some(&token),
    );
    assert!(
        local.contains("hello Ok") && local.contains("spawn Ok"),
        "{local}"
    );

    let remote = probe(&format!("{ext}:{port}"), &marker, Some(&token));
    for call in ["hello", "list_jobs", "prepare_files", "spawn"] {
        assert!(
            remote.contains(&format!("{call} ")) && !remote.contains(&format!("{call} Ok")),
            "plaintext to {ext} must be refused: {remote}"
        );
    }
    assert!(!marker.exists(), "a command ran");

    let ok = status(port, &ext, &tf, d.path());
    assert_eq!(ok.code(), 0, "{ok:?}");

    let other = d.path().join("other-token");
    dglrun_integration_tests::write_token_file(&other).unwrap();
    let refused = status(port, &ext, &other, d.path());
    assert_ne!(refused.code(), 0, "{refused:?}");
    assert!(
        format!("{}{}", refused.stdout, refused.stderr).contains("different token"),
        "{refused:?}"
    );

    dglrun_integration_tests::terminate(&mut agent, Duration::from_secs(10));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.contains(&token), "the token must never be logged");
    assert!(!log.contains("\x1b["), "no ANSI colours in a log file");
}

/// `--insecure-plaintext` on both sides: plaintext with the token works on a non-loopback
/// address, and the agent says loudly what it costs.
#[test]
fn insecure_plaintext_is_explicit_and_loud() {
    let Some(ext) = non_loopback_ip() else {
        dglrun_integration_tests::cannot_run(
            "insecure_plaintext_is_explicit_and_loud",
            "this host needs a non-loopback IPv4 address",
        );
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let tf = d.path().join("token");
    let token = dglrun_integration_tests::write_token_file(&tf).unwrap();
    let (mut agent, port, log) = agent_on_all_addresses(d.path(), &tf, &["--insecure-plaintext"]);
    let out = probe(&format!("{ext}:{port}"), &d.path().join("m"), Some(&token));
    assert!(out.contains("hello Ok"), "{out}");
    dglrun_integration_tests::terminate(&mut agent, Duration::from_secs(10));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("clear text"), "{log}");
}

/// A wrong port (nothing listening) and an HTTP/1 server on the port are named as such.
#[test]
fn wrong_port_and_non_agent_servers_are_named() {
    let d = tempfile::tempdir().unwrap();
    let tf = d.path().join("token");
    dglrun_integration_tests::write_token_file(&tf).unwrap();
    // A port nobody listens on: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = status(port, "127.0.0.1", &tf, d.path());
    assert_ne!(r.code(), 0);
    let said = format!("{}{}", r.stdout, r.stderr);
    assert!(
        said.contains("--agent-port") && said.contains(&port.to_string()),
        "{r:?}"
    );
    // An HTTP/1 server that answers everything with 400, as most web servers would.
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = http.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in http.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut conn = conn;
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            });
        }
    });
    let r = status(port, "127.0.0.1", &tf, d.path());
    assert_ne!(r.code(), 0);
    let said = format!("{}{}", r.stdout, r.stderr);
    assert!(
        said.contains("not a dgl-agent") && said.contains("--agent-port"),
        "{r:?}"
    );
}

/// Ten times the connection cap of idle TCP connections, held open, under an fd limit of
/// 256: a real launch still succeeds, and Hello is answered promptly.
#[test]
fn idle_connection_flood_does_not_lock_out_the_coordinator() {
    let c = TestCluster::start_with_nofile(1, &[], 256);
    let ip_config = std::fs::read(c.ip_config_file()).unwrap();
    dglrun_integration_tests::fake_dgl::write_workspace(c.root(0), &ip_config, 1);
    // The "ready" log line follows the stdout line the harness waited for.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !c.agent_log(0).contains("max_connections=") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let cap: usize = c
        .agent_log(0)
        .split("max_connections=")
        .nth(1)
        .and_then(|s| s.split(|ch: char| !ch.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no max_connections in the log: {}", c.agent_log(0)));
    assert_eq!(cap, 64, "a quarter of 256");
    // Our own fd limit must hold the flood.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let started = std::time::Instant::now();
    assert_eq!(status_with(&c).code(), 0);
    let quiet = started.elapsed();
    let addr = std::net::SocketAddr::new(c.ip(0), c.port);
    let flood: Vec<std::net::TcpStream> = (0..cap * 10)
        .filter_map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok())
        .collect();
    assert!(
        flood.len() >= cap * 10 / 2,
        "only {} connections made",
        flood.len()
    );
    let started = std::time::Instant::now();
    let st = status_with(&c);
    let hello = started.elapsed();
    eprintln!(
        "hello answered (dgl-coord status, process start included) in {:.0} ms with {} idle \
         connections held, cap {cap}; {:.0} ms without them",
        hello.as_secs_f64() * 1000.0,
        flood.len(),
        quiet.as_secs_f64() * 1000.0
    );
    assert_eq!(st.code(), 0, "{st:?}");
    let r = run(
        c.launch_direct("1", &[], "python3 fake_dgl.py"),
        Duration::from_secs(120),
    );
    assert_eq!(r.code(), 0, "{r:?}\n{}", c.agent_log(0));
    drop(flood);
}

fn status_with(c: &TestCluster) -> dglrun_integration_tests::run::Run {
    let mut cmd = c.coord();
    cmd.args(["status", "--ip_config"]).arg(c.ip_config_file());
    run(cmd, Duration::from_secs(60))
}

/// Metrics are not authenticated: a non-loopback metrics address needs --metrics-public.
#[test]
fn metrics_stay_on_loopback_unless_made_public() {
    let d = tempfile::tempdir().unwrap();
    let tf = d.path().join("token");
    dglrun_integration_tests::write_token_file(&tf).unwrap();
    let mut agent = Command::new(bin("dgl-agent"));
    agent
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "0.0.0.0:0",
            "--root",
        ])
        .arg(d.path())
        .arg("--token-file")
        .arg(&tf)
        .args(root_flag());
    let out = run(agent, Duration::from_secs(20));
    assert_ne!(out.code(), 0, "{out:?}");
    assert!(
        out.stderr.contains("0.0.0.0:0") && out.stderr.contains("--metrics-public"),
        "{out:?}"
    );
}

/// Metrics on loopback answer, also to a burst of scrapes.
#[test]
fn loopback_metrics_answer() {
    use std::io::{Read, Write};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let c = TestCluster::start_with(1, &["--metrics-listen", &metrics]);
    let get = || {
        let mut s = std::net::TcpStream::connect(&metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let pages: Vec<String> = (0..20).map(|_| get()).collect();
    assert!(
        pages[0].contains("dglrun_agent_jobs_running 0"),
        "{}\n{}",
        pages[0],
        c.agent_log(0)
    );
}

/// User-supplied mutual TLS without a token: the certificate alone authenticates, so TLS is
/// required on loopback too, and no token file is created.
#[test]
fn user_certificates_without_a_token_authenticate_alone() {
    let d = tempfile::tempdir().unwrap();
    let certs = d.path().join("certs");
    make_certs(&certs, "127.0.0.1");
    let p = |f: &str| certs.join(f).display().to_string();
    let (mut agent, port, _log) = agent_with(
        d.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &p("agent-127.0.0.1.pem"),
            "--tls-key",
            &p("agent-127.0.0.1.key"),
            "--tls-ca",
            &p("ca.pem"),
        ],
    );
    assert!(!d.path().join("config/dglrun/token").exists());
    let plain = probe(&format!("127.0.0.1:{port}"), &d.path().join("m"), None);
    assert!(!plain.contains("hello Ok"), "{plain}");
    let ipc = d.path().join("ip_config.txt");
    std::fs::write(&ipc, "127.0.0.1\n").unwrap();
    let mut cmd = Command::new(bin("dgl-coord"));
    cmd.args(["status", "--agent-port", &port.to_string(), "--ip_config"])
        .arg(&ipc)
        .args(["--tls-cert", &p("coordinator.pem")])
        .args(["--tls-key", &p("coordinator.key")])
        .args(["--tls-ca", &p("ca.pem")])
        .env("XDG_CONFIG_HOME", d.path().join("config"))
        .env_remove("DGL_AGENT_TOKEN")
        .env_remove("DGL_AGENT_TOKEN_FILE");
    let r = run(cmd, Duration::from_secs(60));
    assert_eq!(r.code(), 0, "{r:?}");
    dglrun_integration_tests::terminate(&mut agent, Duration::from_secs(10));
}

/// The soft open-file limit is raised to the hard one at start, the connection cap follows
/// it, and a connection that never sends a byte is closed by the agent (handshake deadline,
/// 10 s; bound here 60 s).
#[test]
fn fd_limit_is_raised_and_silent_connections_are_closed() {
    use std::io::Read;
    let d = tempfile::tempdir().unwrap();
    let tf = d.path().join("token");
    dglrun_integration_tests::write_token_file(&tf).unwrap();
    let log = d.path().join("agent.log");
    let mut agent = Command::new("prlimit")
        .arg("--nofile=256:2048")
        .arg(bin("dgl-agent"))
        .args(["--listen", "127.0.0.1:0", "--root"])
        .arg(d.path())
        .arg("--token-file")
        .arg(&tf)
        .args(root_flag())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(agent.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr: std::net::SocketAddr = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.id())).unwrap();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect::<Vec<_>>();
    assert_eq!(nofile, ["2048", "2048"], "{limits}");
    // The "ready" log line follows the stdout line.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("max_connections") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(text.contains("max_connections=512"), "{text}");
    let mut silent = std::net::TcpStream::connect(addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut b = [0u8; 1];
    match silent.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("a silent connection must be closed by the agent: {other:?}"),
    }
    dglrun_integration_tests::terminate(&mut agent, Duration::from_secs(10));
}
