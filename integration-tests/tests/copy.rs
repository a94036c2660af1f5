//! `dgl-coord copy` against real agents on their own 127.x.y.z addresses and roots.

// Test code throughout: a failed unwrap is a failed test, and a test may set its own
// environment and sleep; its helper modules are private to this test.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use dglrun_integration_tests::bench::compress::dgl_like_partitions;
use dglrun_integration_tests::partitions::write_random;
use dglrun_integration_tests::{
    cannot_run, compat_dir, gen_partitions, list_files, sha256_file, TestCluster,
};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const PARTIAL_SUFFIX: &str = ".dglrun-partial";

struct Run {
    status: ExitStatus,
    json: Value,
    stderr: String,
}

/// `dgl-coord copy --json` with DGL's flags (workspace `ws`, data under `data`) plus `extra`;
/// a DGL flag given in `extra` replaces its default.
fn copy_cmd(
    cluster: &TestCluster,
    part_config: &Path,
    scripts: Option<&Path>,
    extra: &[&str],
) -> Command {
    let mut c = cluster.coord();
    c.env("XDG_CACHE_HOME", cluster.dir.path().join("cache"))
        .args(["copy", "--json", "--progress", "plain"]);
    let ip = cluster.ip_config_file();
    let defaults: [(&str, &std::ffi::OsStr); 4] = [
        ("--workspace", "ws".as_ref()),
        ("--rel_data_path", "data".as_ref()),
        ("--part_config", part_config.as_os_str()),
        ("--ip_config", ip.as_os_str()),
    ];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            c.arg(flag).arg(value);
        }
    }
    if let Some(s) = scripts {
        c.arg("--script_folder").arg(s);
    }
    c.args(extra);
    c
}

fn finish(out: std::process::Output) -> Run {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    Run {
        status: out.status,
        json,
        stderr,
    }
}

fn run(mut c: Command) -> Run {
    finish(c.output().expect("run dgl-coord"))
}

fn copy(cluster: &TestCluster, part_config: &Path, scripts: Option<&Path>) -> Run {
    run(copy_cmd(cluster, part_config, scripts, &[]))
}

fn assert_ok(r: &Run) {
    assert!(
        r.status.success(),
        "copy failed ({:?}):\n{}\n{}",
        r.status,
        r.stderr,
        r.json
    );
    assert_eq!(r.json["ok"], true, "{}", r.json);
}

/// Files under an agent's root, without the agent's own state.
fn host_files(root: &Path) -> Vec<PathBuf> {
    list_files(root)
        .into_iter()
        .filter(|p| !p.starts_with(".dglrun"))
        .collect()
}

fn partials(root: &Path) -> Vec<PathBuf> {
    host_files(root)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(PARTIAL_SUFFIX))
        .collect()
}

fn count(r: &Run, host: usize, key: &str) -> u64 {
    r.json["hosts"][host][key].as_u64().unwrap_or(u64::MAX)
}

fn file_report<'a>(r: &'a Run, host: usize, path: &str) -> &'a Value {
    r.json["hosts"][host]["files"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["path"] == path))
        .unwrap_or(&Value::Null)
}

/// A script folder: nested files, one executable.
fn scripts(dir: &Path) -> PathBuf {
    let code = dir.join("code");
    fs::create_dir_all(code.join("lib")).unwrap();
    fs::write(code.join("train.py"), "print('train')\n").unwrap();
    fs::set_permissions(code.join("train.py"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(code.join("lib/util.py"), "X = 1\n").unwrap();
    fs::set_permissions(code.join("lib/util.py"), fs::Permissions::from_mode(0o640)).unwrap();
    code
}

/// Checks machine `i` holds exactly what it should, byte for byte, and that the part_config
/// it got resolves (relative to its own directory, as DGL does) to the source files of part i.
fn check_machine(cluster: &TestCluster, i: usize, part_config: &Path, code: Option<&Path>) {
    let root = cluster.root(i);
    let ws = root.join("ws");
    let src: Value = serde_json::from_slice(&fs::read(part_config).unwrap()).unwrap();
    let src_dir = part_config.parent().unwrap();
    let name = part_config.file_name().unwrap();
    let landed = ws.join("data").join(name);
    let doc: Value = serde_json::from_slice(&fs::read(&landed).unwrap()).unwrap();
    let mut expected: Vec<PathBuf> = vec![
        PathBuf::from("ws/ip_config.txt"),
        Path::new("ws/data").join(name),
    ];
    let n = src["num_parts"].as_u64().unwrap() as usize;
    for p in 0..n {
        let key = format!("part-{p}");
        let here = doc[&key].as_object().unwrap();
        let there = src[&key].as_object().unwrap();
        assert_eq!(
            here.keys().collect::<Vec<_>>(),
            there.keys().collect::<Vec<_>>()
        );
        for (k, v) in here {
            let rel = v.as_str().unwrap();
            assert!(rel.starts_with(&format!("part{p}/")), "{key}.{k} = {rel}");
            if p == i {
                let on_host = landed.parent().unwrap().join(rel);
                let source = src_dir.join(there[k].as_str().unwrap());
                assert_eq!(
                    sha256_file(&on_host),
                    sha256_file(&source),
                    "m{i} {key}.{k}"
                );
                expected.push(on_host.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    for k in ["node_map", "edge_map", "graph_name", "num_parts"] {
        assert_eq!(doc[k], src[k], "m{i} {k}");
    }
    assert_eq!(
        fs::read(ws.join("ip_config.txt")).unwrap(),
        fs::read(cluster.ip_config_file()).unwrap()
    );
    if let Some(code) = code {
        for f in list_files(code) {
            let on_host = ws.join("code").join(&f);
            assert_eq!(
                sha256_file(&on_host),
                sha256_file(&code.join(&f)),
                "m{i} code/{}",
                f.display()
            );
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(
                mode(&on_host),
                mode(&code.join(&f)),
                "mode of code/{}",
                f.display()
            );
            expected.push(Path::new("ws/code").join(f));
        }
    }
    expected.sort();
    assert_eq!(host_files(root), expected, "files on m{i}");
}

#[test]
fn places_every_file_verifies_it_and_sends_nothing_the_second_time() {
    let cluster = TestCluster::start(4);
    let local = cluster.local();
    // 5 MiB + 3: two chunks, the last one short.
    let pc = gen_partitions(&local.join("out"), 4, 5 * MIB + 3, "synth").unwrap();
    let code = scripts(&local);
    let r = copy(&cluster, &pc, Some(&code));
    assert_ok(&r);
    for i in 0..4 {
        check_machine(&cluster, i, &pc, Some(&code));
        // Named as `status --json` names hosts.
        assert_eq!(count(&r, i, "machine"), i as u64);
        assert_eq!(
            r.json["hosts"][i]["address"],
            format!("{}:{}", cluster.ip(i), cluster.port)
        );
        assert_eq!(count(&r, i, "files_sent"), 7);
        assert_eq!(count(&r, i, "files_failed"), 0);
    }
    assert_eq!(r.json["launch"]["part_config"], "data/synth.json");
    assert_eq!(r.json["launch"]["ip_config"], "ip_config.txt");
    assert_eq!(r.json["hashing"]["from_cache"], 0);

    let again = copy(&cluster, &pc, Some(&code));
    assert_ok(&again);
    assert_eq!(again.json["bytes_sent"], 0, "{}", again.json);
    for i in 0..4 {
        assert_eq!(count(&again, i, "files_sent"), 0);
        assert_eq!(count(&again, i, "files_skipped"), 7);
    }
    // The coordinator did not read its files again either (but for ip_config.txt, which the
    // harness writes anew for every command).
    let ip_len = fs::metadata(cluster.ip_config_file()).unwrap().len();
    assert_eq!(
        again.json["hashing"]["bytes_read"], ip_len,
        "{}",
        again.json
    );

    // Without --json: a table and the flags for launch.
    let human = cluster
        .coord()
        .env("XDG_CACHE_HOME", cluster.dir.path().join("cache"))
        .args([
            "copy",
            "--workspace",
            "ws",
            "--rel_data_path",
            "data",
            "--progress",
            "quiet",
        ])
        .arg("--part_config")
        .arg(&pc)
        .arg("--ip_config")
        .arg(cluster.ip_config_file())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(human.status.success(), "{text}");
    assert!(
        text.contains("--part_config data/synth.json --ip_config ip_config.txt"),
        "{text}"
    );
    assert!(text.contains("skipped"), "{text}");
}

#[test]
fn a_corrupted_file_is_detected_and_repaired() {
    let cluster = TestCluster::start(3);
    let pc = gen_partitions(&cluster.local().join("out"), 3, 6 * MIB, "g").unwrap();
    assert_ok(&copy(&cluster, &pc, None));
    let victim = cluster.root(2).join("ws/data/part2/graph.dgl");
    let mut bytes = fs::read(&victim).unwrap();
    bytes[5 * MIB as usize] ^= 0x55; // same size, one bit pattern off, in the second chunk
    fs::write(&victim, &bytes).unwrap();
    fs::remove_file(cluster.root(1).join("ws/ip_config.txt")).unwrap();

    let r = copy(&cluster, &pc, None);
    assert_ok(&r);
    assert_eq!(
        file_report(&r, 2, "ws/data/part2/graph.dgl")["status"],
        "sent",
        "{}",
        r.json
    );
    assert_eq!(count(&r, 2, "files_sent"), 1);
    assert_eq!(count(&r, 1, "files_sent"), 1);
    assert_eq!(count(&r, 0, "files_sent"), 0);
    for i in 0..3 {
        check_machine(&cluster, i, &pc, None);
    }
}

/// Waits until machine `i` has a partial file of at least `min` bytes.
fn wait_for_partial(
    cluster: &TestCluster,
    i: usize,
    min: u64,
    child: &mut std::process::Child,
) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for p in partials(cluster.root(i)) {
            let full = cluster.root(i).join(&p);
            if fs::metadata(&full).map(|m| m.len()).unwrap_or(0) >= min {
                return full;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the copy ended before a partial file showed up"
        );
        assert!(Instant::now() < deadline, "no partial file on m{i}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Two machines; machine 1 gets one big file (several chunks) so a transfer can be cut.
fn big_set(cluster: &TestCluster) -> PathBuf {
    let pc = gen_partitions(&cluster.local().join("out"), 2, MIB, "g").unwrap();
    let big = pc.parent().unwrap().join("part1/graph.dgl");
    write_random(&big, 48 * MIB + 5, 77).unwrap();
    pc
}

#[test]
fn an_agent_killed_mid_copy_completes_on_rerun_without_a_visible_partial() {
    let mut cluster = TestCluster::start(2);
    let pc = big_set(&cluster);
    let mut child = copy_cmd(&cluster, &pc, None, &["--retries", "1", "--jobs", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_partial(&cluster, 1, 8 * MIB, &mut child);
    cluster.kill_agent(1);
    let r = finish(child.wait_with_output().unwrap());
    assert!(!r.status.success(), "the copy must fail: {}", r.json);
    assert_eq!(r.json["ok"], false);
    // The other machine finished and verified everything.
    assert_eq!(count(&r, 0, "files_failed"), 0, "{}", r.json);
    check_machine(&cluster, 0, &pc, None);
    let errors = r.json["hosts"][1].to_string();
    assert!(
        errors.contains("unreachable") || errors.contains("gave up"),
        "{errors}"
    );
    // Nothing half-written under a final name.
    let big = cluster.root(1).join("ws/data/part1/graph.dgl");
    if big.exists() {
        assert_eq!(
            sha256_file(&big),
            sha256_file(&pc.parent().unwrap().join("part1/graph.dgl"))
        );
    }

    cluster.restart_agent(1);
    let r = copy(&cluster, &pc, None);
    assert_ok(&r);
    let resumed = file_report(&r, 1, "ws/data/part1/graph.dgl")["resumed_from"]
        .as_u64()
        .unwrap();
    assert!(
        resumed >= 4 * MIB,
        "the rerun should resume the partial file: {}",
        r.json
    );
    for i in 0..2 {
        check_machine(&cluster, i, &pc, None);
        assert!(partials(cluster.root(i)).is_empty());
    }
}

#[test]
fn an_agent_back_within_the_retries_completes_in_the_same_run() {
    let mut cluster = TestCluster::start(2);
    let pc = big_set(&cluster);
    let mut child = copy_cmd(&cluster, &pc, None, &["--jobs", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_partial(&cluster, 1, 8 * MIB, &mut child);
    cluster.restart_agent(1);
    let r = finish(child.wait_with_output().unwrap());
    assert_ok(&r);
    assert!(r.stderr.contains("retrying"), "{}", r.stderr);
    for i in 0..2 {
        check_machine(&cluster, i, &pc, None);
        assert!(partials(cluster.root(i)).is_empty());
    }
}

#[test]
fn a_source_rewritten_during_the_copy_fails_at_once_naming_it() {
    use std::os::unix::fs::FileExt;
    let cluster = TestCluster::start(2);
    let pc = gen_partitions(&cluster.local().join("out"), 2, MIB, "g").unwrap();
    // Big enough that the copy is still running when the rewrite lands.
    let big = pc.parent().unwrap().join("part1/graph.dgl");
    write_random(&big, 192 * MIB + 5, 78).unwrap();
    let mut child = copy_cmd(&cluster, &pc, None, &["--jobs", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_partial(&cluster, 1, 4 * MIB, &mut child);
    // Rewritten in place near its end, as a partitioner still writing would.
    let f = fs::OpenOptions::new().write(true).open(&big).unwrap();
    f.write_all_at(b"rewritten", 190 * MIB).unwrap();
    drop(f);
    let rewritten = Instant::now();
    let r = finish(child.wait_with_output().unwrap());
    let took = rewritten.elapsed();
    assert_eq!(r.status.code(), Some(1), "{}\n{}", r.stderr, r.json);
    let want = format!(
        "{} changed while it was being copied; rerun the copy",
        big.display()
    );
    let error = file_report(&r, 1, "ws/data/part1/graph.dgl")["error"].to_string();
    assert!(error.contains(&want), "{error}\n{}", r.json);
    assert!(!r.stderr.contains("retrying"), "{}", r.stderr);
    // The old way retried a chunk that could never match: 15.5 s of backoff alone.
    assert!(
        took < Duration::from_secs(8),
        "took {took:?} after the rewrite"
    );
    // The other machine is unaffected.
    assert_eq!(count(&r, 0, "files_failed"), 0, "{}", r.json);
}

#[test]
fn ctrl_c_says_what_was_kept_and_the_rerun_resumes() {
    let cluster = TestCluster::start(2);
    let pc = gen_partitions(&cluster.local().join("out"), 2, MIB, "g").unwrap();
    let big = pc.parent().unwrap().join("part1/graph.dgl");
    write_random(&big, 192 * MIB + 5, 79).unwrap();
    let mut child = copy_cmd(&cluster, &pc, None, &["--jobs", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_partial(&cluster, 1, 4 * MIB, &mut child);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let r = finish(child.wait_with_output().unwrap());
    assert_eq!(r.status.code(), Some(130), "{}\n{}", r.stderr, r.json);
    // Per machine what is complete; machine 1 keeps its big file as a partial.
    for needle in [
        "copy interrupted",
        "m0 (",
        " of 5 files complete\n",
        "m1 (",
        " of 5 files complete; kept partial: ws/data/part1/graph.dgl\n",
        "rerun the same command to resume",
    ] {
        assert!(r.stderr.contains(needle), "no {needle:?} in:\n{}", r.stderr);
    }
    assert_eq!(r.json["interrupted"], true, "{}", r.json);
    let r = copy(&cluster, &pc, None);
    assert_ok(&r);
    let resumed = file_report(&r, 1, "ws/data/part1/graph.dgl")["resumed_from"]
        .as_u64()
        .unwrap();
    assert!(resumed >= 4 * MIB, "the rerun should resume: {}", r.json);
    check_machine(&cluster, 1, &pc, None);
}

#[test]
fn a_busy_agent_is_told_apart_by_its_mark_and_the_copy_waits_for_it() {
    use dglrun_proto::pb::{self, put_file_message::Msg};
    let cluster = TestCluster::start(1);
    let pc = gen_partitions(&cluster.local().join("out"), 1, MIB, "g").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(async { cluster.client(0) });
    // A PutFile that sends its header and then nothing: it holds one of the agent's transfers.
    let d = dglrun_proto::digest::hash_reader(&b"data"[..], |_| {}).unwrap();
    let stalled = move |i: usize| {
        let header = pb::PutFileMessage {
            msg: Some(Msg::Header(pb::PutFileHeader {
                manifest: Some(pb::FileManifest {
                    path: format!("held/{i}"),
                    size: d.size,
                    digest: d.digest.to_vec(),
                    chunk_hashes: d.chunk_hashes.iter().map(|h| h.to_vec()).collect(),
                    mode: 0o644,
                }),
                offset: 0,
            })),
        };
        futures::StreamExt::chain(tokio_stream::iter([header]), futures::stream::pending())
    };
    let mut held = Vec::new();
    let busy = rt.block_on(async {
        let mut i = 0;
        loop {
            let mut c = client.clone();
            let stream = stalled(i);
            let probe = tokio::spawn(async move { c.put_file(stream).await });
            tokio::time::sleep(Duration::from_millis(20)).await;
            if probe.is_finished() {
                break probe.await.unwrap().unwrap_err();
            }
            held.push(probe);
            i += 1;
            assert!(i < 1000, "the agent never said it was busy");
        }
    });
    // The mark, not the words, is what the coordinator goes by: it must cross the wire.
    assert_eq!(busy.code(), tonic::Code::ResourceExhausted, "{busy:?}");
    assert!(
        dglrun_proto::busy::retry_after(&busy).is_some(),
        "no busy mark: {busy:?}"
    );
    // Freed a moment after the copy starts: the copy waits for it instead of failing.
    let child = copy_cmd(&cluster, &pc, None, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    for h in &held {
        h.abort();
    }
    drop(rt);
    let r = finish(child.wait_with_output().unwrap());
    assert_ok(&r);
    assert!(r.stderr.contains("retrying"), "{}", r.stderr);
}

#[test]
fn ctrl_c_while_hashing_changes_no_host() {
    let cluster = TestCluster::start(1);
    let pc = gen_partitions(&cluster.local().join("out"), 1, MIB, "g").unwrap();
    // Long enough to hash that the signal lands before anything is sent.
    write_random(
        &pc.parent().unwrap().join("part0/graph.dgl"),
        1024 * MIB,
        80,
    )
    .unwrap();
    let child = copy_cmd(&cluster, &pc, None, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // After the handler is set up (a few ms), long before 1 GiB is hashed.
    std::thread::sleep(Duration::from_millis(150));
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let r = finish(child.wait_with_output().unwrap());
    assert_eq!(r.status.code(), Some(130), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("interrupted before anything was sent: no host was changed"),
        "{}",
        r.stderr
    );
    assert!(host_files(cluster.root(0)).is_empty());
}

/// Runs a copy that must fail before touching any host: non-zero, the message names what is
/// wrong, and every root is still empty.
fn check_refused(cluster: &TestCluster, c: Command, needles: &[&str]) {
    let r = run(c);
    assert!(!r.status.success(), "must fail: {}", r.stderr);
    for n in needles {
        assert!(r.stderr.contains(n), "stderr lacks {n:?}:\n{}", r.stderr);
    }
    for i in 0..cluster.len() {
        assert_eq!(
            host_files(cluster.root(i)),
            Vec::<PathBuf>::new(),
            "m{i} was touched"
        );
    }
}

#[test]
fn bad_input_is_refused_naming_it_and_changes_nothing() {
    let mut cluster = TestCluster::start(3);
    let local = cluster.local();
    let pc = gen_partitions(&local.join("out"), 3, 64 << 10, "g").unwrap();
    let ip = cluster.ip_config_file();
    let ip_text = fs::read_to_string(&ip).unwrap();
    let doc: Value = serde_json::from_slice(&fs::read(&pc).unwrap()).unwrap();

    // num_parts != machines: both files named.
    let two = gen_partitions(&local.join("two"), 2, 1024, "two").unwrap();
    check_refused(
        &cluster,
        copy_cmd(&cluster, &two, None, &[]),
        &[
            &format!("{} has num_parts 2", two.display()),
            "ip_config.txt lists 3 machine(s)",
        ],
    );

    // An ip_config line DGL cannot read, named by file and line.
    let bad_ip = local.join("bad_ip.txt");
    let lines: Vec<&str> = ip_text.lines().collect();
    fs::write(
        &bad_ip,
        format!(
            "{}\n{} 30050 extra\n{}\n",
            lines[0],
            cluster.ip(1),
            lines[2]
        ),
    )
    .unwrap();
    let bad_ip = bad_ip.to_str().unwrap();
    let c = copy_cmd(&cluster, &pc, None, &["--ip_config", bad_ip]);
    check_refused(&cluster, c, &["bad_ip.txt:2: 3 fields"]);

    // A missing partition file: its key and path.
    let missing = pc.parent().unwrap().join("part1/edge_feat.dgl");
    let keep = fs::read(&missing).unwrap();
    fs::remove_file(&missing).unwrap();
    check_refused(
        &cluster,
        copy_cmd(&cluster, &pc, None, &[]),
        &[
            "part-1.edge_feats",
            &missing.display().to_string(),
            "does not exist",
        ],
    );
    fs::write(&missing, keep).unwrap();

    // Paths in the part_config that leave its directory.
    for (value, needle) in [("../../etc/passwd", "`..`"), ("/etc/passwd", "absolute")] {
        let mut bad = doc.clone();
        bad["part-2"]["node_feats"] = Value::String(value.into());
        let bad_pc = pc.parent().unwrap().join("bad.json");
        fs::write(&bad_pc, serde_json::to_vec(&bad).unwrap()).unwrap();
        check_refused(
            &cluster,
            copy_cmd(&cluster, &bad_pc, None, &[]),
            &["part-2.node_feats", value, needle],
        );
    }

    // `..` in the data path; a workspace outside the agents' roots (each host named).
    let c = copy_cmd(&cluster, &pc, None, &["--rel_data_path", "../escape"]);
    check_refused(&cluster, c, &["--rel_data_path \"../escape\"", "`..`"]);
    let c = copy_cmd(&cluster, &pc, None, &["--workspace", "/tmp/elsewhere"]);
    let names: Vec<String> = (0..3)
        .map(|i| format!("m{i} ({}:", cluster.ip(i)))
        .collect();
    let mut needles: Vec<&str> = names.iter().map(String::as_str).collect();
    needles.push("outside the agent root");
    check_refused(&cluster, c, &needles);

    // A symlink loop in the script folder.
    let code = scripts(&local);
    std::os::unix::fs::symlink(&code, code.join("lib/again")).unwrap();
    check_refused(
        &cluster,
        copy_cmd(&cluster, &pc, Some(&code), &[]),
        &["lib/again", "loop"],
    );
    fs::remove_file(code.join("lib/again")).unwrap();

    // An unreachable agent: which one.
    cluster.kill_agent(2);
    check_refused(
        &cluster,
        copy_cmd(&cluster, &pc, None, &[]),
        &[
            &format!("agent of machine 2 at {}:", cluster.ip(2)),
            "unreachable",
        ],
    );
}

/// A small tmpfs mounted over an agent's root, unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(dir.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn too_little_disk_is_found_before_anything_is_sent() {
    let mut cluster = TestCluster::start(2);
    let Some(_disk) = SmallDisk::mount(cluster.root(1), "4m") else {
        cannot_run(
            "too_little_disk_is_found_before_anything_is_sent",
            "cannot mount a tmpfs here (needs root)",
        );
        return;
    };
    cluster.restart_agent(1);
    let pc = gen_partitions(&cluster.local().join("out"), 2, 2 * MIB, "g").unwrap();
    check_refused(
        &cluster,
        copy_cmd(&cluster, &pc, None, &[]),
        &[
            &format!("m1 ({}:", cluster.ip(1)),
            "not enough free disk",
            "nothing was sent",
        ],
    );
}

#[test]
fn an_absolute_workspace_inside_the_root_is_used_as_is() {
    let cluster = TestCluster::start(1);
    let pc = gen_partitions(&cluster.local().join("out"), 1, 1000, "g").unwrap();
    let ws = cluster.root(0).join("abs/ws");
    let r = run(copy_cmd(
        &cluster,
        &pc,
        None,
        &["--workspace", ws.to_str().unwrap()],
    ));
    assert_ok(&r);
    assert!(ws.join("data/g.json").exists());
    assert!(ws.join("data/part0/graph.dgl").exists());
}

/// The partitions DGL itself wrote (fixtures/dgl-compat), to 2 and 4 machines.
#[test]
fn real_dgl_partitions_land_where_dgl_loads_them() {
    let compat = compat_dir();
    for n in [2, 4] {
        let pc = compat.join(format!("dgl-partitions/p{n}/synth.json"));
        let cluster = TestCluster::start(n);
        let r = copy(&cluster, &pc, None);
        assert_ok(&r);
        assert_eq!(r.json["launch"]["part_config"], "data/synth.json");
        for i in 0..n {
            check_machine(&cluster, i, &pc, None);
        }
    }
}

/// `bytes_sent` and `wire_bytes` of host `i`, checked against the sum of its files.
fn host_bytes(r: &Run, i: usize) -> (u64, u64) {
    let files = r.json["hosts"][i]["files"].as_array().unwrap();
    let sum = |k: &str| files.iter().map(|f| f[k].as_u64().unwrap()).sum::<u64>();
    let (logical, wire) = (count(r, i, "bytes_sent"), count(r, i, "wire_bytes"));
    assert_eq!((logical, wire), (sum("bytes_sent"), sum("wire_bytes")));
    (logical, wire)
}

#[test]
fn compressed_copy_lands_byte_identical_and_puts_far_fewer_bytes_on_the_wire() {
    let cluster = TestCluster::start(2);
    let local = cluster.local();
    // Shaped like DGL's files (sparse float32 features, int64 ids), several chunks each.
    let pc = dgl_like_partitions(&local.join("out"), 2, 16 * MIB + 4099, "z").unwrap();
    let code = scripts(&local);
    let r = run(copy_cmd(
        &cluster,
        &pc,
        Some(&code),
        &["--compress", "zstd"],
    ));
    assert_ok(&r);
    assert_eq!(r.json["compression"], "zstd");
    for i in 0..2 {
        check_machine(&cluster, i, &pc, Some(&code));
        let (logical, wire) = host_bytes(&r, i);
        assert!(logical > 16 * MIB, "m{i}: {logical}");
        assert!(
            wire * 2 < logical,
            "m{i}: {wire} bytes on the wire for {logical}"
        );
    }
    let (logical, wire) = (
        r.json["bytes_sent"].as_u64().unwrap(),
        r.json["wire_bytes"].as_u64().unwrap(),
    );
    assert!(wire * 2 < logical, "{wire} on the wire for {logical}");

    // The agents keep nothing of the compression: an uncompressed re-copy sends nothing.
    let again = copy(&cluster, &pc, Some(&code));
    assert_ok(&again);
    assert_eq!(again.json["bytes_sent"], 0, "{}", again.json);
    assert_eq!(again.json["compression"], "none");
}

#[test]
fn incompressible_data_goes_raw_under_compress_zstd() {
    let cluster = TestCluster::start(2);
    let local = cluster.local();
    // Random data: every chunk of the partition files falls back to raw.
    let pc = gen_partitions(&local.join("out"), 2, 9 * MIB + 1, "r").unwrap();
    let r = run(copy_cmd(
        &cluster,
        &pc,
        None,
        &["--compress", "zstd", "--compress-level", "1"],
    ));
    assert_ok(&r);
    for i in 0..2 {
        check_machine(&cluster, i, &pc, None);
        let (logical, wire) = host_bytes(&r, i);
        assert!(logical >= 27 * MIB, "m{i}: {logical}");
        // Only the small JSON and ip_config shrink.
        assert!(
            wire <= logical && wire * 1000 >= logical * 999,
            "m{i}: {wire} bytes on the wire for {logical}"
        );
        let part = file_report(&r, i, &format!("ws/data/part{i}/graph.dgl"));
        assert_eq!(part["wire_bytes"], part["bytes_sent"], "{part}");
    }
}

#[test]
fn compress_flags_are_checked() {
    let cluster = TestCluster::start(1);
    let pc = gen_partitions(&cluster.local().join("out"), 1, 10, "c").unwrap();
    for (flags, needle) in [
        (&["--compress", "gzip"][..], "invalid value 'gzip'"),
        (&["--compress", "zstd", "--compress-level", "20"], "20"),
        (&["--compress", "zstd", "--compress-level", "0"], "0"),
    ] {
        let r = run(copy_cmd(&cluster, &pc, None, flags));
        assert_eq!(r.status.code(), Some(2), "{flags:?}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{flags:?}: {}", r.stderr);
    }
    assert!(host_files(cluster.root(0)).is_empty());
}
