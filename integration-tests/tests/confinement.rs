//! A real dgl-agent never writes outside its root nor onto its own files, whatever the
//! coordinator names and whatever a local user plants or swaps under the root.

// Test code throughout: a failed unwrap is a failed test, and a test may set its own
// environment and sleep; its helper modules are private to this test.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dglrun_integration_tests::wire::{manifest, put_messages};
use dglrun_integration_tests::{RawClient, TestCluster};
use dglrun_proto::pb;

type Client = RawClient;

async fn client(cluster: &TestCluster) -> Client {
    cluster.client(0)
}

async fn put(c: &mut Client, path: &str, data: &[u8]) -> Result<(), tonic::Status> {
    c.put_file(tokio_stream::iter(put_messages(path, data)))
        .await
        .map(|_| ())
}

async fn prepare(c: &mut Client, path: &str, data: &[u8]) -> Result<(), tonic::Status> {
    c.prepare_files(pb::PrepareFilesRequest {
        files: vec![manifest(path, data)],
    })
    .await
    .map(|_| ())
}

#[tokio::test]
async fn planted_hard_links_and_reserved_names_never_redirect_a_write() {
    let cluster = TestCluster::start(1);
    let root = cluster.root(0).to_path_buf();
    let outside = cluster.dir.path().join("outside.txt");
    std::fs::write(&outside, b"not yours").unwrap();
    std::fs::create_dir_all(root.join("ws")).unwrap();
    std::fs::hard_link(&outside, root.join("ws/.f.txt.dglrun-partial")).unwrap();
    let mut c = client(&cluster).await;
    prepare(&mut c, "ws/f.txt", b"new bytes").await.unwrap();
    put(&mut c, "ws/f.txt", b"new bytes").await.unwrap();
    assert_eq!(std::fs::read(&outside).unwrap(), b"not yours");
    assert_eq!(std::fs::read(root.join("ws/f.txt")).unwrap(), b"new bytes");

    // The agent's job record seeds its restart kill scan: never a target.
    let jobs = root.join(".dglrun/jobs.json");
    let before = std::fs::read(&jobs).ok();
    for path in [".dglrun/jobs.json", "ws/.g.dglrun-partial"] {
        let err = put(&mut c, path, b"{\"jobs\":[]}").await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{path}: {err:?}");
        assert!(err.message().contains("reserved"), "{}", err.message());
    }
    assert_eq!(std::fs::read(&jobs).ok(), before);
    assert!(!root.join("ws/.g.dglrun-partial").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_swapped_for_a_symlink_never_lets_a_file_out_of_the_root() {
    let cluster = TestCluster::start(1);
    let root = cluster.root(0).to_path_buf();
    let outside = cluster.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(root.join("ws/d")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("ws/link")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, ws) = (stop.clone(), root.join("ws"));
        std::thread::spawn(move || {
            // `ws/d` flips between a real directory and a symlink out of the root, atomically.
            while !stop.load(Ordering::Relaxed) {
                nix::fcntl::renameat2(
                    nix::fcntl::AT_FDCWD,
                    &ws.join("d"),
                    nix::fcntl::AT_FDCWD,
                    &ws.join("link"),
                    nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                )
                .unwrap();
            }
        })
    };
    let mut c = client(&cluster).await;
    for i in 0..300 {
        let path = format!("ws/d/sub/f{i}");
        let _ = prepare(&mut c, &path, b"escape?").await;
        let _ = put(&mut c, &path, b"escape?").await;
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    let leaked = dglrun_integration_tests::list_files(&outside);
    assert!(leaked.is_empty(), "written outside the root: {leaked:?}");
    assert!(!Path::new(&outside).join("sub").exists());
}
