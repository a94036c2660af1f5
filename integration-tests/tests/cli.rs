//! The command line as a user meets it: diagnostics of bad flags, exit codes, shell
//! completions run by the real shells, the man page. Runs the real `dgl-coord` binary.

// Test code throughout: a failed unwrap is a failed test, and a test may set its own
// environment and sleep; its helper modules are private to this test.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::process::{Command, Output};

use dglrun_integration_tests::bin;

fn coord(args: &[&str]) -> Output {
    Command::new(bin("dgl-coord"))
        .args(args)
        .env_remove("DGL_AGENT_TOKEN")
        .env_remove("DGL_AGENT_TOKEN_FILE")
        .output()
        .expect("run dgl-coord")
}

/// Runs `args`, expects a usage error (exit 2) whose stderr contains every one of `want` and
/// none of `not`.
fn usage_error(args: &[&str], want: &[&str], not: &[&str]) {
    let out = coord(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    for w in want {
        assert!(stderr.contains(w), "{args:?}: want {w:?} in\n{stderr}");
    }
    for n in not {
        assert!(!stderr.contains(n), "{args:?}: unwanted {n:?} in\n{stderr}");
    }
}

const BASE: &[&str] = &[
    "--workspace",
    "/tmp/ws",
    "--num_trainers",
    "1",
    "--num_servers",
    "1",
    "--part_config",
    "p.json",
    "--ip_config",
    "/nonexistent/ip_config.txt",
];

fn with(sub: &str, extra: &[&'static str]) -> Vec<&'static str> {
    let sub: &'static str = if sub == "launch" { "launch" } else { "run" };
    let mut v = vec![sub];
    v.extend_from_slice(BASE);
    v.extend_from_slice(extra);
    v
}

#[test]
fn a_mistyped_flag_is_diagnosed_as_one_not_as_a_quoting_error() {
    let args = with("launch", &["--num_sampler", "2", "python3 t.py"]);
    usage_error(
        &args,
        &["unexpected argument '--num_sampler'", "'--num_samplers'"],
        &["split", "quote"],
    );
    // The same after the command.
    let args = with("launch", &["python3 t.py", "--num_sampler", "2"]);
    usage_error(
        &args,
        &["unexpected argument '--num_sampler'", "'--num_samplers'"],
        &["split"],
    );
    let args = with("launch", &["--bogus", "python3 t.py"]);
    usage_error(
        &args,
        &["unexpected argument '--bogus'"],
        &["required arguments were not provided", "split"],
    );
    // copy diagnoses the same way (the reference).
    usage_error(
        &["copy", "--workspac", "/x"],
        &["unexpected argument '--workspac'"],
        &[],
    );
}

#[test]
fn missing_arguments_are_named_as_they_are() {
    usage_error(
        &["run", "--dry-run"],
        &["unexpected argument '--dry-run'"],
        &["user command"],
    );
    usage_error(
        &["launch", "--workspace", "/x", "python3 t.py"],
        &["--num_servers", "--part_config", "--ip_config"],
        &["\n  --workspace <DIR>", "split"],
    );
    // Only the command missing: said so, with the flags as given.
    usage_error(
        &with("launch", &[]),
        &[
            "missing the user command",
            "dgl-coord launch --workspace /tmp/ws",
        ],
        &[],
    );
}

#[test]
fn a_bad_extra_envs_word_is_named_not_taken_for_the_command() {
    usage_error(
        &with("launch", &["--extra_envs", "FOO", "python3 t.py"]),
        &["--extra_envs", "FOO", "K=V"],
        &["split", "quote"],
    );
}

#[test]
fn an_empty_command_is_a_usage_error_like_a_missing_one() {
    usage_error(&with("launch", &[""]), &["user command is empty"], &[]);
    usage_error(&with("launch", &["  "]), &["user command is empty"], &[]);
}

#[test]
fn a_split_command_is_still_explained_with_its_quoting() {
    usage_error(
        &with("launch", &["python3", "train.py", "--lr", "0.1"]),
        &["split it into 4 words", "'python3 train.py --lr 0.1'"],
        &[],
    );
}

#[test]
fn values_dgl_would_refuse_or_misuse_are_refused() {
    for (flag, value, want) in [
        ("--num_omp_threads", "0", "--num_omp_threads"),
        ("--num_server_threads", "0", "--num_server_threads"),
        ("--graph_format", "bogus", "csr, csc or coo"),
        ("--graph_format", "csr,", "csr, csc or coo"),
    ] {
        let mut args = with("launch", &[]);
        args.extend([flag, value, "python3 t.py"]);
        usage_error(&args, &[want, value], &[]);
    }
    let mut args = with("launch", &[]);
    args.extend(["--graph_format", "csr,coo", "--dry-run", "python3 t.py"]);
    // Accepted (the dry run then fails only on the missing ip_config file).
    let out = coord(&args);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("graph_format"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dgls_removed_server_reuse_flags_are_refused_with_the_reason() {
    for extra in [&["--keep_alive"][..], &["--server_name", "s1"][..]] {
        let mut args = with("launch", extra);
        args.push("python3 t.py");
        usage_error(&args, &[extra[0], "not supported", "server"], &[]);
    }
}

#[test]
fn extra_envs_that_dglrun_sets_itself_are_named_in_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let ip = dir.path().join("ip_config.txt");
    std::fs::write(&ip, "127.0.0.1\n").unwrap();
    let out = coord(&[
        "launch",
        "--workspace",
        "/tmp/ws",
        "--num_trainers",
        "1",
        "--num_servers",
        "1",
        "--part_config",
        "p.json",
        "--ip_config",
        ip.to_str().unwrap(),
        "--dry-run",
        "--extra_envs",
        "DGL_ROLE=x",
        "NCCL_DEBUG=INFO",
        "python3 t.py",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("DGL_ROLE"), "{stderr}");
    assert!(stderr.contains("dglrun sets"), "{stderr}");
    assert!(!stderr.contains("NCCL_DEBUG"), "{stderr}");
}

/// Whether `shell` is installed; without it the test fails under CI=true (`.ci/run` installs
/// it) and is skipped, loudly, elsewhere.
fn have_shell(shell: &str) -> bool {
    let found = Command::new(shell)
        .args(["-c", "exit 0"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        dglrun_integration_tests::cannot_run(
            &format!("completion in {shell}"),
            &format!("{shell} is not installed: .ci/run installs it (apt-get install {shell})"),
        );
    }
    found
}

/// The completions `shell` offers for the command line `line` (completing its last word),
/// from the script `dgl-coord completions SHELL` prints, run by the shell itself.
fn complete(shell: &str, line: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("completion");
    let out = coord(&["completions", shell]);
    assert!(out.status.success());
    std::fs::write(&script, &out.stdout).unwrap();
    let script = script.to_str().unwrap();
    let output = match shell {
        "bash" => {
            let words: Vec<&str> = line.split(' ').collect();
            let run = format!(
                "source {script}\n\
                 f=$(complete -p dgl-coord | sed -E 's/.*-F ([^ ]+).*/\\1/')\n\
                 COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}\n\
                 COMP_WORDS=({words}); COMP_CWORD={cword}\n\
                 $f dgl-coord '{cur}' '{prev}'\n\
                 printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                words = words.join(" "),
                cword = words.len() - 1,
                cur = words[words.len() - 1],
                prev = words[words.len() - 2],
            );
            Command::new("bash").args(["--norc", "-c", &run]).output()
        }
        "fish" => Command::new("fish")
            .args([
                "--no-config",
                "-c",
                &format!("source {script}; complete -C '{line}'"),
            ])
            .output(),
        "zsh" => {
            // zsh completes only inside its line editor: drive an interactive zsh in a pty
            // (zsh/zpty), type the line and a TAB, and read what it lists.
            let run = format!(
                r#"zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z 'PS1="%% "; autoload -U compinit; compinit -u -D'
zpty -w z 'fpath=({dir} $fpath); autoload -U _dgl-coord; compdef _dgl-coord dgl-coord'
zpty -w z 'zstyle ":completion:*" list-rows-first true; LISTMAX=1000; print READY'
zpty -r z out '*READY*'
zpty -r z out '*READY*'
zpty -w -n z $'{line}\t'
sleep 1
while zpty -r -t z chunk; do out+=$chunk; done
print -r -- $out"#,
                dir = dir.path().display()
            );
            std::fs::rename(dir.path().join("completion"), dir.path().join("_dgl-coord")).unwrap();
            Command::new("zsh").args(["-f", "-c", &run]).output()
        }
        _ => unreachable!(),
    }
    .expect("run the shell");
    let text = strip_terminal_codes(&String::from_utf8_lossy(&output.stdout));
    eprintln!(
        "{shell} {line:?}:\n{text}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    text.split_whitespace().map(str::to_string).collect()
}

/// The text of what zsh's line editor drew: CSI sequences (`ESC [ ... letter`) and other
/// control characters become spaces.
fn strip_terminal_codes(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for x in chars.by_ref() {
                    if x.is_ascii_alphabetic() || x == '~' {
                        break;
                    }
                }
            }
            out.push(' ');
        } else if c.is_control() {
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn completions_offer_subcommands_and_their_flags_in_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        if !have_shell(shell) {
            continue;
        }
        let subs = complete(shell, "dgl-coord la");
        assert!(subs.iter().any(|w| w == "launch"), "{shell}: {subs:?}");
        let flags = complete(shell, "dgl-coord launch --num_tr");
        assert!(
            flags.iter().any(|w| w.starts_with("--num_trainers")),
            "{shell}: {flags:?}"
        );
        let flags = complete(shell, "dgl-coord copy --script");
        assert!(
            flags.iter().any(|w| w.starts_with("--script_folder")),
            "{shell}: {flags:?}"
        );
    }
}

#[test]
fn the_man_page_name_line_says_what_dgl_coord_is_once() {
    let out = coord(&["man"]);
    let page = String::from_utf8_lossy(&out.stdout);
    let name = page
        .split(".SH NAME")
        .nth(1)
        .and_then(|rest| rest.split(".SH").next())
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(name.starts_with("dgl\\-coord \\- "), "{name}");
    let words: Vec<&str> = name.split_whitespace().collect();
    let mut seen = std::collections::HashSet::new();
    let repeated: Vec<&str> = words
        .iter()
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()))
        .filter(|w| w.len() > 3 && !seen.insert(*w))
        .collect();
    assert!(repeated.is_empty(), "NAME repeats {repeated:?}: {name}");
}

#[test]
fn a_workspace_with_an_unexpanded_tilde_is_refused_with_the_fix() {
    for sub in ["launch", "run"] {
        let mut args = vec![sub, "--workspace=~/dglrun/x"];
        args.extend_from_slice(&BASE[2..]);
        if sub == "run" {
            args.extend(["--rel_data_path", "data"]);
        }
        args.push("python3 t.py");
        let out = coord(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{sub}: {stderr}");
        assert!(stderr.contains("~/dglrun/x"), "{sub}: {stderr}");
        assert!(stderr.contains("not expanded"), "{sub}: {stderr}");
        assert!(stderr.contains("--workspace dglrun/x"), "{sub}: {stderr}");
    }
}

#[test]
fn a_compression_level_without_compression_is_refused() {
    usage_error(
        &[
            "copy",
            "--workspace",
            "ws",
            "--rel_data_path",
            "data",
            "--part_config",
            "p.json",
            "--ip_config",
            "ip.txt",
            "--compress-level",
            "5",
        ],
        &["--compress-level", "--compress <ALGO>"],
        &[],
    );
}

#[test]
fn bad_durations_are_usage_errors() {
    for (flag, value) in [("--grace", "-1"), ("--lease-timeout", "0.1")] {
        let mut args = with("launch", &[]);
        args.extend([flag, value, "python3 t.py"]);
        usage_error(&args, &[flag], &[]);
    }
}

/// `dgl-coord ARGS` run in `dir`, with no token and none of the environment the plan reads
/// (PYTHONPATH, OMP_NUM_THREADS): what any user's machine would print.
fn coord_in(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(bin("dgl-coord"))
        .args(args)
        .current_dir(dir)
        .env_remove("DGL_AGENT_TOKEN")
        .env_remove("DGL_AGENT_TOKEN_FILE")
        .env_remove("PYTHONPATH")
        .env_remove("OMP_NUM_THREADS")
        .output()
        .expect("run dgl-coord")
}

/// Exit code, stdout and stderr, as a snapshot shows them.
fn shown(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Snapshot settings with the volatile parts (job ids, pids, times) filtered out.
fn redacted() -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    for (re, with) in dglrun_integration_tests::redactions() {
        s.add_filter(&re, with);
    }
    s
}

/// A dry run's plan as a user reads it, and as a script reads it (`--json`).
#[test]
fn dry_run_output_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ip_config.txt"),
        "10.0.0.1 30050\n10.0.0.2 30050\n",
    )
    .unwrap();
    let args = |extra: &[&'static str]| {
        let mut a = vec![
            "launch",
            "--workspace",
            "/ws/job",
            "--num_trainers",
            "2",
            "--num_samplers",
            "1",
            "--num_servers",
            "1",
            "--num_omp_threads",
            "1",
            "--part_config",
            "data/g.json",
            "--ip_config",
            "ip_config.txt",
            "--dry-run",
            "--offline",
        ];
        a.extend_from_slice(extra);
        a.push("python3 train.py --lr 0.1");
        a
    };
    redacted().bind(|| {
        let human = coord_in(dir.path(), &args(&[]));
        assert_eq!(human.status.code(), Some(0), "{}", shown(&human));
        insta::assert_snapshot!("dry_run_human", shown(&human));
        let direct = coord_in(dir.path(), &args(&["--trainer-mode", "direct"]));
        assert_eq!(direct.status.code(), Some(0), "{}", shown(&direct));
        insta::assert_snapshot!("dry_run_direct_human", shown(&direct));
        let json = coord_in(dir.path(), &args(&["--json"]));
        assert_eq!(json.status.code(), Some(0), "{}", shown(&json));
        insta::assert_snapshot!("dry_run_json", shown(&json));
    });
}

/// The messages of input a launch refuses before it contacts any agent.
#[test]
fn bad_input_messages_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad_ip.txt"), "10.0.0.1\nnot-an-ip 30050\n").unwrap();
    std::fs::write(dir.path().join("ip_config.txt"), "10.0.0.1\n").unwrap();
    let launch = |ip_config: &'static str, extra: &[&'static str]| {
        let mut a = vec![
            "launch",
            "--workspace",
            "/ws/job",
            "--num_trainers",
            "1",
            "--num_servers",
            "1",
            "--part_config",
            "data/g.json",
            "--ip_config",
            ip_config,
            "--dry-run",
            "--offline",
        ];
        a.extend_from_slice(extra);
        a.push("python3 train.py");
        coord_in(dir.path(), &a)
    };
    redacted().bind(|| {
        let bad_line = launch("bad_ip.txt", &[]);
        assert_eq!(bad_line.status.code(), Some(1), "{}", shown(&bad_line));
        insta::assert_snapshot!("bad_ip_config_line", shown(&bad_line));
        let missing = launch("missing.txt", &[]);
        assert_eq!(missing.status.code(), Some(1), "{}", shown(&missing));
        insta::assert_snapshot!("missing_ip_config", shown(&missing));
        let envs = launch("ip_config.txt", &["--extra_envs", "FOO"]);
        assert_eq!(envs.status.code(), Some(2), "{}", shown(&envs));
        insta::assert_snapshot!("bad_extra_envs", shown(&envs));
    });
}
