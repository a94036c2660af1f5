//! `dgl-coord launch`: the flags of DGL's launch.py, plus dglrun's own.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{ArgAction, ValueEnum};
use dglrun_coordinator::cluster::AgentAccess;
use dglrun_coordinator::launch::{self, LaunchOptions, RunOptions, TrainerMode};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Mode {
    /// One `python -m torch.distributed.run` per machine, as DGL does.
    Torchrun,
    /// dglrun starts every trainer itself with torchrun's worker environment.
    Direct,
}

/// DGL's launch.py flags keep their names; kebab-case spellings work too.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example (DGL's own, with `dgl-coord launch` for `python3 tools/launch.py`):\n  \
    dgl-coord launch --workspace ~/graphsage/ --num_trainers 2 --num_samplers 4 --num_servers 1 \\\n    \
    --part_config data/ogb-product.json --ip_config ip_config.txt \\\n    \
    \"python3 code/train_dist.py --graph-name ogb-product --ip_config ip_config.txt --num-epochs 5\""
)]
pub struct LaunchArgs {
    /// Directory the processes run in on every host (absolute, or relative to the agent's root).
    #[arg(long, value_name = "DIR")]
    workspace: String,
    /// Trainer processes per machine.
    #[arg(
        long = "num_trainers",
        visible_alias = "num-trainers",
        value_name = "N"
    )]
    num_trainers: u32,
    /// Sampler processes per trainer (forked by the trainers themselves).
    #[arg(
        long = "num_samplers",
        visible_alias = "num-samplers",
        value_name = "N",
        default_value_t = 0
    )]
    num_samplers: u32,
    /// DGL server processes per machine.
    #[arg(long = "num_servers", visible_alias = "num-servers", value_name = "N")]
    num_servers: u32,
    /// Partition config JSON, relative to the workspace (as DGL passes it on).
    #[arg(
        long = "part_config",
        visible_alias = "part-config",
        value_name = "PATH"
    )]
    part_config: String,
    /// ip_config.txt: read here (relative to the current directory, or inside the workspace
    /// path) to find the machines, and in the workspace on every host by DGL.
    #[arg(long = "ip_config", visible_alias = "ip-config", value_name = "PATH")]
    ip_config: String,
    /// OMP threads of each server process.
    #[arg(
        long = "num_server_threads",
        visible_alias = "num-server-threads",
        value_name = "N",
        default_value_t = 1
    )]
    num_server_threads: u32,
    /// OMP threads of each trainer [default: max(CPUs / 2 / num_trainers, 1) of this machine;
    /// OMP_NUM_THREADS in this shell takes precedence, as in DGL].
    #[arg(
        long = "num_omp_threads",
        visible_alias = "num-omp-threads",
        value_name = "N"
    )]
    num_omp_threads: Option<u32>,
    /// Graph formats the servers keep.
    #[arg(
        long = "graph_format",
        visible_alias = "graph-format",
        default_value = "csc"
    )]
    graph_format: String,
    /// Extra environment variables, `K=V ...` (values may use $VAR of the host's environment).
    #[arg(long = "extra_envs", visible_alias = "extra-envs", value_name = "K=V", action = ArgAction::Append)]
    extra_envs: Vec<String>,
    /// Accepted for launch.py compatibility and ignored: dglrun does not use ssh.
    #[arg(
        long = "ssh_port",
        visible_alias = "ssh-port",
        value_name = "PORT",
        hide = true
    )]
    ssh_port: Option<String>,
    /// Accepted for launch.py compatibility and ignored: dglrun does not use ssh.
    #[arg(
        long = "ssh_username",
        visible_alias = "ssh-username",
        value_name = "USER",
        hide = true
    )]
    ssh_username: Option<String>,
    /// TCP port of the agents.
    #[arg(long = "agent-port", env = "DGL_AGENT_PORT", default_value_t = dglrun_proto::DEFAULT_AGENT_PORT)]
    agent_port: u16,
    /// File holding the agents' token [default: $DGL_AGENT_TOKEN].
    #[arg(long = "token-file", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// How trainers are started.
    #[arg(long = "trainer-mode", value_enum, default_value = "torchrun")]
    trainer_mode: Mode,
    /// Print the processes that would run, with their commands and environments, and exit.
    #[arg(long = "dry-run", visible_alias = "dry_run")]
    dry_run: bool,
    /// With --dry-run: print the plan as JSON.
    #[arg(long)]
    json: bool,
    /// Seconds between SIGTERM and SIGKILL when stopping processes.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    grace: f64,
    /// Seconds an agent keeps the job running without hearing from dgl-coord.
    #[arg(long = "lease-timeout", value_name = "SECONDS", default_value_t = 10.0)]
    lease_timeout: f64,
    /// Stop processes of earlier jobs still running in the same workspace instead of refusing.
    #[arg(long = "kill-stale")]
    kill_stale: bool,
    /// The command every process runs, as ONE quoted argument (as in DGL's launch.py).
    #[arg(value_name = "COMMAND", allow_hyphen_values = true)]
    command: Vec<String>,
}

/// The flags of `launch`: (every name including aliases, takes a value).
fn known_flags() -> Vec<(Vec<String>, bool)> {
    let cmd = <LaunchArgs as clap::Args>::augment_args(clap::Command::new("launch"));
    cmd.get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            let mut names = vec![format!("--{long}")];
            names.extend(
                a.get_all_aliases()
                    .unwrap_or_default()
                    .iter()
                    .map(|n| format!("--{n}")),
            );
            if let Some(s) = a.get_short() {
                names.push(format!("-{s}"));
            }
            Some((names, a.get_action().takes_values()))
        })
        .collect()
}

/// `NAME=value` with a shell-style variable name.
fn is_kv(word: &str) -> bool {
    word.split_once('=').is_some_and(|(k, _)| {
        let mut c = k.chars();
        matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
    })
}

/// A word for the user's shell to read back as-is (inside double quotes if needed).
fn shell_word(w: &str) -> String {
    if !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_@%+=:,./-~".contains(c))
    {
        w.to_string()
    } else {
        double_quote(w)
    }
}

fn double_quote(w: &str) -> String {
    let mut s = String::from("\"");
    for c in w.chars() {
        if matches!(c, '"' | '\\' | '$' | '`') {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}

/// Rewrites argv before clap sees it (DGL's `--extra_envs K=V...` ends at the first word
/// that is not `K=V`). Returns a clear message for arguments clap cannot explain well: a
/// missing user command, or one the shell split into several words.
pub fn preprocess_args(argv: Vec<OsString>) -> Result<Vec<OsString>, String> {
    // Only `dgl-coord [global flags] launch ...` is touched.
    let Some(sub) = argv
        .iter()
        .skip(1)
        .position(|a| !a.to_string_lossy().starts_with('-'))
        .map(|i| i + 1)
    else {
        return Ok(argv);
    };
    if argv[sub] != "launch" {
        return Ok(argv);
    }
    let mut words = Vec::new();
    for a in &argv[sub + 1..] {
        match a.to_str() {
            Some(s) => words.push(s.to_string()),
            None => return Err(format!("argument {a:?} is not valid UTF-8")),
        }
    }
    if words.iter().any(|w| w == "-h" || w == "--help") {
        return Ok(argv);
    }
    let flags = known_flags();
    let find = |name: &str| {
        flags
            .iter()
            .find(|(names, _)| names.iter().any(|n| n == name))
    };
    let is_extra_envs = |name: &str| name == "--extra_envs" || name == "--extra-envs";

    let mut out: Vec<String> = Vec::new();
    let mut positionals: Vec<String> = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = &words[i];
        i += 1;
        if w == "--" {
            positionals.extend(words[i..].iter().cloned());
            break;
        }
        if !w.starts_with('-') || w == "-" {
            positionals.push(w.clone());
            continue;
        }
        let (name, inline) = match w.split_once('=') {
            Some((n, _)) => (n, true),
            None => (w.as_str(), false),
        };
        if is_extra_envs(name) && !inline {
            let start = i;
            while i < words.len() && !words[i].starts_with('-') && is_kv(&words[i]) {
                i += 1;
            }
            let mut taken: Vec<String> = words[start..i].to_vec();
            // `--extra_envs A=1 "OMP_NUM_THREADS=2 python3 train.py"` with no other command:
            // the last word is the command, a shell assignment and all.
            let rest_has_positional = words[i..].iter().any(|x| !x.starts_with('-'));
            if !rest_has_positional
                && positionals.is_empty()
                && taken
                    .last()
                    .is_some_and(|t| t.contains(char::is_whitespace))
            {
                if let Some(cmd) = taken.pop() {
                    positionals.push(cmd);
                }
            }
            if taken.is_empty() {
                out.push(w.clone()); // clap says a value is missing
            }
            out.extend(taken.into_iter().map(|kv| format!("--extra_envs={kv}")));
            continue;
        }
        match find(name) {
            Some((_, takes_value)) => {
                out.push(w.clone());
                if *takes_value && !inline && i < words.len() {
                    out.push(words[i].clone());
                    i += 1;
                }
            }
            // An unknown flag after the command began is part of a split command.
            None if !positionals.is_empty() => positionals.push(w.clone()),
            None => out.push(w.clone()),
        }
    }

    let flags_shown: Vec<String> = out.iter().map(|w| shell_word(w)).collect();
    let example = |cmd: &str| format!("dgl-coord launch {} {cmd}", flags_shown.join(" "));
    match positionals.len() {
        1 => {}
        0 => {
            return Err(format!(
                "missing the user command. Give it as the last argument, quoted as one word:\n  {}",
                example("\"python3 train_dist.py --ip_config ip_config.txt ...\"")
            ))
        }
        n => {
            let joined: Vec<String> = positionals
                .iter()
                .map(|p| {
                    if p.contains(char::is_whitespace) {
                        shell_word(p)
                    } else {
                        p.clone()
                    }
                })
                .collect();
            return Err(format!(
                "the user command must be one argument, but the shell split it into {n} words \
                 ({}). Quote the whole command, as DGL's launch.py requires:\n  {}",
                positionals
                    .iter()
                    .map(|p| format!("`{p}`"))
                    .collect::<Vec<_>>()
                    .join(" "),
                example(&double_quote(&joined.join(" ")))
            ));
        }
    }
    let mut result: Vec<OsString> = argv[..=sub].to_vec();
    result.extend(out.into_iter().map(OsString::from));
    result.push("--".into());
    result.extend(positionals.into_iter().map(OsString::from));
    Ok(result)
}

fn seconds(name: &str, v: f64) -> anyhow::Result<Duration> {
    if (0.0..1e7).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        anyhow::bail!("--{name} must be a number of seconds, not {v}")
    }
}

fn parse_extra_envs(words: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    words
        .iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if is_kv(w) => Ok((k.to_string(), v.to_string())),
            _ => anyhow::bail!("--extra_envs takes K=V words, not {w:?}"),
        })
        .collect()
}

pub async fn run(args: LaunchArgs) -> anyhow::Result<u8> {
    let started = Instant::now();
    if args.ssh_port.is_some() || args.ssh_username.is_some() {
        launch::output::note(
            "note: --ssh_port/--ssh_username are ignored: dgl-coord talks to dgl-agent, not ssh",
        );
    }
    let udf_command = match args.command.as_slice() {
        [c] => c.clone(),
        // preprocess_args explains these; reached only when it was bypassed.
        _ => anyhow::bail!("give the user command as one quoted argument"),
    };
    let lease = seconds("lease-timeout", args.lease_timeout)?;
    anyhow::ensure!(
        lease >= Duration::from_millis(500),
        "--lease-timeout must be at least 0.5 seconds"
    );
    let options = LaunchOptions {
        workspace: args.workspace,
        num_trainers: args.num_trainers,
        num_samplers: args.num_samplers,
        num_servers: args.num_servers,
        part_config: args.part_config,
        ip_config: args.ip_config,
        num_server_threads: args.num_server_threads,
        num_omp_threads: args.num_omp_threads,
        graph_format: args.graph_format,
        extra_envs: parse_extra_envs(&args.extra_envs)?,
        udf_command,
        trainer_mode: match args.trainer_mode {
            Mode::Torchrun => TrainerMode::Torchrun,
            Mode::Direct => TrainerMode::Direct,
        },
    };
    let run = RunOptions {
        access: AgentAccess::new(args.agent_port, args.token_file.as_deref())?,
        grace: seconds("grace", args.grace)?,
        lease,
        kill_stale: args.kill_stale,
        dry_run: args.dry_run,
        json: args.json,
        started,
    };
    launch::run(options, run).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Splits like a shell that knows only single quotes (enough for these tests).
    fn words(s: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = String::new();
        let (mut quoted, mut any) = (false, false);
        for c in s.chars() {
            match c {
                '\'' => {
                    quoted = !quoted;
                    any = true;
                }
                c if c.is_whitespace() && !quoted => {
                    if any {
                        out.push(std::mem::take(&mut cur));
                    }
                    any = false;
                }
                c => {
                    cur.push(c);
                    any = true;
                }
            }
        }
        if any {
            out.push(cur);
        }
        out
    }

    fn pre(args: &str) -> Result<Vec<String>, String> {
        let mut argv: Vec<OsString> = vec!["dgl-coord".into()];
        argv.extend(words(args).into_iter().map(OsString::from));
        preprocess_args(argv).map(|v| v.into_iter().map(|a| a.into_string().unwrap()).collect())
    }

    const BASE: &str =
        "--workspace /ws --num_trainers 2 --num_servers 1 --part_config p.json --ip_config ip.txt";

    fn parse(args: &str) -> LaunchArgs {
        let argv = pre(&format!("launch {args}")).unwrap();
        match super::super::Cli::try_parse_from(argv).unwrap().command {
            super::super::Command::Launch(a) => a,
            _ => panic!("not launch"),
        }
    }

    #[test]
    fn the_seed_example_parses() {
        let a = parse(
            "--workspace ~/graphsage/ --num_trainers 2 --num_samplers 4 --num_servers 1 \
             --part_config data/ogb-product.json --ip_config ip_config.txt \
             'python3 code/train_dist.py --graph-name ogb-product --ip_config ip_config.txt --num-epochs 5'",
        );
        assert_eq!(a.num_samplers, 4);
        assert_eq!(a.workspace, "~/graphsage/");
        assert_eq!(
            a.command,
            ["python3 code/train_dist.py --graph-name ogb-product --ip_config ip_config.txt --num-epochs 5"]
        );
        assert_eq!(a.graph_format, "csc");
        assert_eq!(a.num_server_threads, 1);
    }

    #[test]
    fn extra_envs_end_at_the_first_word_that_is_not_k_v() {
        let a = parse(&format!(
            "{BASE} --extra_envs A=1 B=x:$y 'python3 t.py' --grace 1"
        ));
        assert_eq!(a.extra_envs, ["A=1", "B=x:$y"]);
        assert_eq!(a.command, ["python3 t.py"]);
        assert_eq!(a.grace, 1.0);
        let a = parse(&format!(
            "{BASE} --extra_envs A=1 --num_samplers 3 'python3 t.py'"
        ));
        assert_eq!(
            (a.extra_envs.as_slice(), a.num_samplers),
            (&["A=1".to_string()][..], 3)
        );
        // The command itself may start with an assignment when nothing else is positional.
        let a = parse(&format!(
            "{BASE} --extra_envs A=1 'OMP_NUM_THREADS=2 python3 t.py'"
        ));
        assert_eq!(a.extra_envs, ["A=1"]);
        assert_eq!(a.command, ["OMP_NUM_THREADS=2 python3 t.py"]);
        let a = parse(&format!("{BASE} --extra-envs=A=1 -- 'python3 t.py'"));
        assert_eq!(a.extra_envs, ["A=1"]);
        assert_eq!(
            parse_extra_envs(&a.extra_envs).unwrap(),
            [("A".into(), "1".into())]
        );
    }

    #[test]
    fn flags_may_follow_the_command_and_kebab_case_works() {
        let a = parse("'python3 t.py' --workspace w --num-trainers 1 --num-servers 1 --part-config p --ip-config i --trainer-mode direct --ssh_port 22");
        assert_eq!(a.command, ["python3 t.py"]);
        assert!(matches!(a.trainer_mode, Mode::Direct));
        assert_eq!(a.ssh_port.as_deref(), Some("22"));
    }

    #[test]
    fn a_split_command_gets_the_right_quoting_shown() {
        let err = pre(&format!(
            "launch {BASE} python3 train.py --graph-name 'my g' --lr 0.1"
        ))
        .unwrap_err();
        assert!(err.contains("split it into 6 words"), "{err}");
        assert!(
            err.contains(
                "--ip_config ip.txt \"python3 train.py --graph-name \\\"my g\\\" --lr 0.1\""
            ),
            "{err}"
        );
        let err = pre(&format!("launch {BASE} -- python3 train.py")).unwrap_err();
        assert!(err.contains("2 words"), "{err}");
    }

    #[test]
    fn a_missing_command_is_explained() {
        let err = pre(&format!("launch {BASE}")).unwrap_err();
        assert!(err.starts_with("missing the user command"), "{err}");
        assert!(err.contains("dgl-coord launch --workspace /ws"), "{err}");
        let err = pre(&format!("launch {BASE} --extra_envs A=1 B=2")).unwrap_err();
        assert!(err.starts_with("missing the user command"), "{err}");
    }

    #[test]
    fn other_subcommands_and_help_are_untouched() {
        assert_eq!(
            pre("copy --x a b").unwrap(),
            ["dgl-coord", "copy", "--x", "a", "b"]
        );
        assert_eq!(
            pre("launch --help").unwrap(),
            ["dgl-coord", "launch", "--help"]
        );
        assert_eq!(pre("").unwrap(), ["dgl-coord"]);
    }
}
