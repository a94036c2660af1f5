//! The agent served in-process on `127.0.0.1:0`, as the binary serves it: the same
//! authentication, the same service, a shutdown future instead of a signal.

use std::time::Duration;

use dglrun_agent::jobs::JobsConfig;
use dglrun_agent::server::{self, AgentConfig};
use dglrun_proto::meta::ClientMeta;
use dglrun_proto::pb::agent_client::AgentClient;
use dglrun_proto::pb::HelloRequest;
use dglrun_proto::token::Token;
use tokio::net::TcpListener;
use tonic::Code;

#[tokio::test]
async fn an_in_process_agent_answers_only_its_token_and_stops_on_shutdown() {
    let root = tempfile::tempdir().unwrap();
    let token = Token::parse(&"k".repeat(40), "test").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = AgentConfig {
        listen: addr,
        root: root.path().to_path_buf(),
        token: Some(token.clone()),
        insecure_plaintext: false,
        tls: None,
        metrics_listen: None,
        metrics_public: false,
        max_connections: 64,
        jobs: JobsConfig {
            lease_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(1),
            host_logs: Default::default(),
        },
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(server::run(config, listener, async {
        let _ = stopped.await;
    }));

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut with_token = AgentClient::with_interceptor(
        channel.clone(),
        ClientMeta::new(Some(token.as_str())).unwrap(),
    );
    let hello = with_token
        .hello(HelloRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hello.protocol_version, dglrun_proto::PROTOCOL_VERSION);
    assert_eq!(hello.pid, std::process::id());
    assert_eq!(
        std::path::Path::new(&hello.root).canonicalize().unwrap(),
        root.path().canonicalize().unwrap()
    );

    let wrong = "w".repeat(40);
    let mut other = AgentClient::with_interceptor(channel, ClientMeta::new(Some(&wrong)).unwrap());
    let refused = other.hello(HelloRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), agent)
        .await
        .expect("the agent returns once its shutdown future completes")
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "nothing listens on {addr} after shutdown"
    );
}
