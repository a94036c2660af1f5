//! The deploy files (deploy/) validate with the tools `deploy/validate.sh` runs, the script
//! catches broken files, and the files agree with the code: the agent port, the agent's flags
//! and variables, the user, the grace times.
//!
//! `deploy/validate.sh --install` installs the tools (CI runs it first); without them the
//! checks that need them are reported as skipped. Under CI=true a skipped check fails.

// Test code throughout: a failed unwrap is a failed test, and a test may set its own
// environment and sleep; its helper modules are private to this test.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use dglrun_integration_tests::{bin_dir, repo_dir};
use dglrun_proto::DEFAULT_AGENT_PORT;

fn deploy_dir() -> PathBuf {
    repo_dir().join("deploy")
}

fn read(rel: &str) -> String {
    let p = deploy_dir().join(rel);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// What one run of validate.sh reported.
struct Report {
    success: bool,
    output: String,
    /// (status, check, file) per result line: status is "ok", "FAIL" or "skip".
    lines: Vec<(String, String, String)>,
}

impl Report {
    fn with(&self, status: &str) -> Vec<String> {
        self.lines
            .iter()
            .filter(|(s, _, _)| s == status)
            .map(|(_, c, f)| format!("{c} {f}"))
            .collect()
    }

    /// Whether `check` on `file` has a line with `status` (check names may carry a suffix,
    /// as in "k8s-schema 1.37.0").
    fn has(&self, status: &str, check: &str, file: &str) -> bool {
        self.lines.iter().any(|(s, c, f)| {
            s == status && (c == check || c.starts_with(&format!("{check} "))) && f == file
        })
    }
}

fn validate(args: &[&str]) -> Report {
    let script = deploy_dir().join("validate.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = output
        .lines()
        .filter_map(|l| {
            let status = ["ok", "FAIL", "skip"]
                .into_iter()
                .find(|s| l.starts_with(&format!("{s} ")))?;
            // "STATUS  CHECK  FILE[  (reason)]": fields apart by two spaces or more.
            let mut fields = l[status.len()..]
                .split("  ")
                .map(str::trim)
                .filter(|f| !f.is_empty());
            let check = fields.next().unwrap_or("");
            let file = fields.next().unwrap_or("");
            Some((status.to_string(), check.to_string(), file.to_string()))
        })
        .collect();
    Report {
        success: out.status.success(),
        output,
        lines,
    }
}

#[test]
fn deploy_files_validate() {
    let r = validate(&[]);
    println!("{}", r.output);
    assert!(
        r.success,
        "deploy/validate.sh failed:\n{}\nfailed: {:?}",
        r.output,
        r.with("FAIL")
    );
    assert!(
        !r.with("ok").is_empty(),
        "validate.sh reported no check:\n{}",
        r.output
    );
    // The checks that need no tool beyond bash, awk and sed.
    for must in ["env-file", "agent-env-names", "bash-n", "dockerfile"] {
        assert!(
            r.lines.iter().any(|(s, c, _)| s == "ok" && c == must),
            "check {must} did not pass:\n{}",
            r.output
        );
    }
    let skipped = r.with("skip");
    if !skipped.is_empty() {
        // Reached only outside CI (under CI=true validate.sh fails on a skip).
        eprintln!(
            "NOTE: {} deploy check(s) SKIPPED because their tools are not installed here; \
             `deploy/validate.sh --install` installs them (CI does):\n  {}",
            skipped.len(),
            skipped.join("\n  ")
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            fs::copy(e.path(), target).unwrap();
        }
    }
}

fn edit(dir: &Path, rel: &str, from: &str, to: &str) {
    let p = dir.join(rel);
    let text = fs::read_to_string(&p).unwrap();
    assert!(text.contains(from), "{rel} has no {from:?} to break");
    fs::write(p, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn validate_rejects_broken_files() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("deploy");
    copy_dir(&deploy_dir(), &copy);
    let expose = format!("EXPOSE {DEFAULT_AGENT_PORT}");
    // One error per file, each of a kind the named check exists to catch.
    let breaks = [
        (
            "kubernetes/dgl-agent.yaml",
            "      hostNetwork: true\n",
            "      hostNetwork: true\n      hostNetwrk: true\n",
            "k8s-schema",
        ),
        (
            "systemd/dgl-agent.service",
            "KillMode=mixed\n",
            "KillMode mixed\n",
            "systemd-verify|unit-syntax",
        ),
        (
            "systemd/agent.env.example",
            "DGL_AGENT_LISTEN=",
            "DGL_AGENT_LISTN=",
            "agent-env-names",
        ),
        ("slurm/dglrun.sbatch", "then\n", "then (\n", "bash-n"),
        (
            "docker/Dockerfile",
            expose.as_str(),
            "EXPOSE 8080",
            "dockerfile",
        ),
        (
            "docker/Dockerfile.dockerignore",
            ".git\n",
            ".git\nCargo.lock\n",
            "dockerignore",
        ),
    ];
    for (file, from, to, _) in &breaks {
        edit(&copy, file, from, to);
    }
    let r = validate(&["--no-strict", copy.to_str().unwrap()]);
    println!("{}", r.output);
    assert!(!r.success, "validate.sh passed broken files:\n{}", r.output);
    for (file, _, _, checks) in &breaks {
        // The env-name check reports all of deploy/ as its file.
        let reported = if *checks == "agent-env-names" {
            "*"
        } else {
            *file
        };
        let failed = checks.split('|').any(|c| r.has("FAIL", c, reported));
        let skipped = checks.split('|').all(|c| r.has("skip", c, reported));
        if skipped {
            eprintln!("NOTE: {checks} skipped here, so the broken {file} went unnoticed");
            continue;
        }
        assert!(
            failed,
            "{checks} did not reject the broken {file}:\n{}",
            r.output
        );
        if *checks == "agent-env-names" {
            assert!(r
                .output
                .contains("DGL_AGENT_LISTN is not read by dgl-agent"));
        }
    }
}

/// The value after `key` up to the end of its line, trimmed of quotes.
fn value_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let i = text.find(key)? + key.len();
    Some(text[i..].lines().next()?.trim().trim_matches('"'))
}

fn secs(v: &str) -> f64 {
    v.trim_end_matches('s')
        .parse()
        .unwrap_or_else(|_| panic!("not seconds: {v}"))
}

#[test]
fn kubernetes_manifest_matches_the_agent() {
    let y = read("kubernetes/dgl-agent.yaml");
    let port = DEFAULT_AGENT_PORT.to_string();
    for must in [
        "kind: DaemonSet",
        "kind: Secret",
        "hostNetwork: true",
        "dnsPolicy: ClusterFirstWithHostNet",
        "fieldPath: status.hostIP",
        "runAsNonRoot: true",
        "medium: Memory",
        "mountPath: /dev/shm",
        "allowPrivilegeEscalation: false",
    ] {
        assert!(y.contains(must), "dgl-agent.yaml lacks {must:?}");
    }
    assert!(
        y.contains(&format!("- $(NODE_IP):{port}\n")),
        "--listen is not $(NODE_IP):{port}"
    );
    assert!(y.contains(&format!("containerPort: {port}\n")));
    let probe = &y[y.find("readinessProbe:").expect("a readiness probe")..];
    assert_eq!(
        value_after(probe, "port:"),
        Some(port.as_str()),
        "readiness probe port"
    );
    assert!(probe
        .trim_start_matches("readinessProbe:")
        .trim_start()
        .starts_with("tcpSocket:"));

    // The token: the Secret's name is the one mounted, and --token-file is in the mount.
    let secret = &y[y.find("kind: Secret").unwrap()..];
    let name = value_after(secret, "name:").unwrap();
    assert_eq!(value_after(&y, "secretName:"), Some(name));
    let token_file = value_after(&y, "- --token-file\n")
        .unwrap()
        .trim_start_matches("- ");
    let mount = &y[y
        .find("- name: token\n              mountPath:")
        .expect("token mount")..];
    let mount_path = value_after(mount, "mountPath:").unwrap();
    assert_eq!(Path::new(token_file).parent(), Some(Path::new(mount_path)));
    assert_eq!(
        value_after(&y, "--root\n").map(|v| v.trim_start_matches("- ")),
        Some("/var/lib/dglrun")
    );

    // Stopping: the kubelet waits longer than the agent's grace.
    let grace = value_after(
        &y[y.find("name: DGL_AGENT_GRACE")
            .expect("DGL_AGENT_GRACE set")..],
        "value:",
    )
    .unwrap();
    let period = value_after(&y, "terminationGracePeriodSeconds:").unwrap();
    assert!(
        secs(period) >= secs(grace) + 10.0,
        "terminationGracePeriodSeconds {period} vs grace {grace}"
    );

    // The pod's user is the image's.
    let uid = value_after(&y, "runAsUser:").unwrap();
    let d = read("docker/Dockerfile");
    let user = value_after(&d, "\nUSER ").unwrap();
    assert_eq!(
        user.split(':').next(),
        Some(uid),
        "pod runAsUser vs the image's USER"
    );
}

#[test]
fn systemd_unit_matches_the_agent() {
    let u = read("systemd/dgl-agent.service");
    let port = DEFAULT_AGENT_PORT.to_string();
    fn values<'a>(unit: &'a str, k: &str) -> Vec<&'a str> {
        let prefix = format!("{k}=");
        unit.lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str()))
            .collect()
    }
    let key = |k: &str| values(&u, k);
    assert_eq!(key("User"), ["dglrun"]);
    assert_eq!(key("Group"), ["dglrun"]);
    assert_eq!(key("DynamicUser"), ["no"]);
    assert_eq!(key("ProtectSystem"), ["strict"]);
    assert_eq!(key("KillMode"), ["mixed"]);
    assert_eq!(key("Restart"), ["on-failure"]);
    assert_eq!(key("NoNewPrivileges"), ["yes"]);
    assert!(
        key("PrivateDevices").iter().all(|v| *v == "no"),
        "PrivateDevices hides GPUs"
    );
    let rw_lines = key("ReadWritePaths");
    let rw: Vec<&str> = rw_lines.iter().flat_map(|v| v.split_whitespace()).collect();
    assert!(
        rw.contains(&"/var/lib/dglrun") && rw.contains(&"/dev/shm"),
        "ReadWritePaths {rw:?}"
    );
    let exec = key("ExecStart");
    assert_eq!(exec.len(), 1);
    assert!(exec[0].starts_with("/usr/local/bin/dgl-agent "));
    assert!(exec[0].contains("--root /var/lib/dglrun"));
    assert!(exec[0].contains("--token-file /etc/dglrun/token"));
    let env: Vec<&str> = key("Environment");
    assert!(
        env.contains(&format!("DGL_AGENT_LISTEN=127.0.0.1:{port}").as_str()),
        "{env:?}"
    );
    let grace = env
        .iter()
        .find_map(|e| e.strip_prefix("DGL_AGENT_GRACE="))
        .expect("DGL_AGENT_GRACE in Environment=");
    let stop = key("TimeoutStopSec");
    assert!(
        secs(stop[0]) >= secs(grace) + 10.0,
        "TimeoutStopSec {stop:?} vs grace {grace}"
    );

    let example = read("systemd/agent.env.example");
    let listen =
        value_after(&example, "\nDGL_AGENT_LISTEN=").expect("DGL_AGENT_LISTEN in the example");
    assert!(listen.ends_with(&format!(":{port}")), "{listen}");
}

#[test]
fn slurm_and_docker_use_the_agent_port() {
    let port = DEFAULT_AGENT_PORT;
    assert!(
        read("slurm/dglrun.sbatch").contains(&format!("agent_port=${{DGLRUN_AGENT_PORT:-{port}}}"))
    );
    assert!(read("docker/Dockerfile").contains(&format!("\nEXPOSE {port}\n")));
    assert!(read("docker/Dockerfile").contains("ENTRYPOINT [\"/usr/local/bin/dgl-agent\"]"));
}

/// `--flags` in a text's lines that pass `keep`, continuation lines joined.
fn flags_in(text: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let joined = text.replace("\\\n", " ");
    let mut flags: Vec<String> = joined
        .lines()
        .filter(|l| keep(l))
        .flat_map(|l| l.split(|c: char| c.is_whitespace() || "\"'()[]".contains(c)))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.split('=').next().unwrap().to_string())
        .collect();
    flags.sort();
    flags.dedup();
    flags
}

fn help(bin: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new(bin).args(args).arg("--help").output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn deploy_files_use_flags_the_binaries_have() {
    let agent = bin_dir().join("dgl-agent");
    let coord = bin_dir().join("dgl-coord");
    if !agent.exists() || !coord.exists() {
        eprintln!(
            "SKIPPED: {} has no dgl-agent/dgl-coord (build the workspace to check the flags \
             the deploy files pass them)",
            bin_dir().display()
        );
        return;
    }
    // dgl-agent's flags, wherever the deploy files start it.
    let mut used = flags_in(&read("systemd/dgl-agent.service"), |l| {
        l.starts_with("ExecStart=")
    });
    used.extend(flags_in(&read("slurm/dglrun.sbatch"), |l| {
        l.contains("exec dgl-agent")
    }));
    let y = read("kubernetes/dgl-agent.yaml");
    let args = &y[y.find("          args:\n").expect("agent args")..];
    let args = &args[..args.find("          env:").unwrap()];
    used.extend(flags_in(args, |l| l.trim_start().starts_with("- --")));
    let agent_help = help(&agent, &[]).unwrap_or_default();
    for f in &used {
        assert!(
            agent_help.contains(f.as_str()),
            "dgl-agent has no {f}:\n{agent_help}"
        );
    }

    // dgl-coord's, in the Slurm recipe.
    let s = read("slurm/dglrun.sbatch");
    for sub in ["copy", "launch"] {
        let h = help(&coord, &[sub]).unwrap_or_default();
        assert!(
            h.contains("--workspace"),
            "dgl-coord {sub} --help shows no --workspace:\n{h}"
        );
        let used = flags_in(&s, |l| {
            l.contains(&format!("dgl-coord {sub}")) || l.starts_with("coord=(")
        });
        assert!(
            used.len() > 3,
            "no dgl-coord {sub} flags found in the Slurm recipe"
        );
        for f in &used {
            // DGL's spelling (--num_trainers) or clap's (--num-trainers).
            assert!(
                h.contains(f.as_str()) || h.contains(&f.replace('_', "-")),
                "dgl-coord {sub} has no {f}:\n{h}"
            );
        }
    }
}
