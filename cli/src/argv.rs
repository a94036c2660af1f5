//! The command line of `launch` and `run` before clap sees it. DGL's launch.py takes the user
//! command as ONE quoted argument and `--extra_envs K=V ...` as a list that ends at the first
//! word that is not `K=V`; clap cannot say either, so argv is rewritten here first, and a
//! command the shell split into words is explained with the quoting that fixes it.

use std::ffi::OsString;

use dglrun_coordinator::launch::command::quote;

/// Subcommands that take a user command the way launch.py does.
const WITH_COMMAND: &[&str] = &["launch", "run"];

/// The flags of subcommand `sub`: (every name including aliases, takes a value).
fn known_flags(sub: &str) -> Vec<(Vec<String>, bool)> {
    let cli = <crate::Cli as clap::CommandFactory>::command();
    let Some(cmd) = cli.find_subcommand(sub) else {
        return Vec::new();
    };
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
pub(crate) fn is_kv(word: &str) -> bool {
    word.split_once('=').is_some_and(|(k, _)| {
        let mut c = k.chars();
        matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
    })
}

/// What clap is to parse.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Prepared {
    /// The rewritten argv: flags first, then `--` and the user command.
    Rewritten(Vec<OsString>),
    /// The argv as given, to be parsed by [`strict_command`]: it holds a flag error (an
    /// unknown or mistyped flag, a missing required flag), and clap names it best.
    Verbatim(Vec<OsString>),
}

/// dgl-coord's parser with the user command unable to swallow flags, so that clap reports an
/// unknown flag as one ("a similar argument exists") instead of taking it for the command.
pub(crate) fn strict_command() -> clap::Command {
    let mut cli = <crate::Cli as clap::CommandFactory>::command();
    for sub in WITH_COMMAND {
        cli = cli.mut_subcommand(sub, |s| {
            s.mut_arg("command", |a| a.allow_hyphen_values(false))
        });
    }
    cli
}

/// Parses an argv that [`preprocess_args`] left as given (it holds a flag error) with
/// [`strict_command`]. clap's tip "to pass '--flag' as a value, use '-- --flag'" is dropped:
/// the user command is one quoted word, so the tip would only add a word to it. `run` has no
/// `--dry-run`; the tip names the command that has one.
pub(crate) fn parse_verbatim(argv: Vec<OsString>) -> Result<crate::Cli, clap::Error> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let is_run = argv
        .iter()
        .skip(1)
        .find(|a| !a.to_string_lossy().starts_with('-'))
        == Some(&OsString::from("run"));
    let matches = strict_command()
        .try_get_matches_from(argv)
        .map_err(|mut e| {
            if e.kind() != ErrorKind::UnknownArgument {
                return e;
            }
            let mut tips = match e.remove(ContextKind::Suggested) {
                Some(ContextValue::StyledStrs(tips)) => tips,
                _ => Vec::new(),
            };
            tips.retain(|t| !t.to_string().contains("as a value, use '"));
            let flag = match e.get(ContextKind::InvalidArg) {
                Some(ContextValue::String(f)) => f.clone(),
                _ => String::new(),
            };
            if is_run && flag.split('=').next() == Some("--dry-run") {
                tips.push(
                "`run` has no --dry-run; check the launch with `dgl-coord launch --dry-run` and \
                 the same flags"
                    .to_string()
                    .into(),
            );
            }
            if !tips.is_empty() {
                e.insert(ContextKind::Suggested, ContextValue::StyledStrs(tips));
            }
            e
        })?;
    <crate::Cli as clap::FromArgMatches>::from_arg_matches(&matches)
}

/// What `preprocess_args` explains itself; each message ends with the command line to run.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ArgvError {
    #[error("argument {0:?} is not valid UTF-8")]
    NotUtf8(OsString),
    #[error(
        "the user command is empty. Give the command every process runs, quoted as one \
         word:\n  {example}"
    )]
    EmptyCommand { example: String },
    #[error(
        "missing the user command. Give it as the last argument, quoted as one word:\n  {example}"
    )]
    MissingCommand { example: String },
    #[error(
        "the user command must be one argument, but the shell split it into {words} words \
         ({shown}). Quote the whole command, as DGL's launch.py requires:\n  {example}"
    )]
    SplitCommand {
        words: usize,
        shown: String,
        example: String,
    },
}

/// Rewrites argv before clap sees it (DGL's `--extra_envs K=V...` ends at the first word
/// that is not `K=V`). Returns a clear message for what clap cannot explain well: a missing or
/// empty user command, or one the shell split into several words. A flag error is never
/// turned into one of these: such an argv goes to clap as given.
pub(crate) fn preprocess_args(argv: Vec<OsString>) -> Result<Prepared, ArgvError> {
    let Some(Subcommand { sub, name, words }) = subcommand_words(&argv)? else {
        return Ok(Prepared::Rewritten(argv));
    };
    if words.iter().any(|w| w == "-h" || w == "--help") {
        return Ok(Prepared::Rewritten(argv));
    }
    let Some(Sorted { flags, positionals }) = sort_words(name, &words) else {
        return Ok(Prepared::Verbatim(argv));
    };
    let flags_shown: Vec<String> = flags.iter().map(|w| quote(w)).collect();
    let example = |cmd: &str| format!("dgl-coord {name} {} {cmd}", flags_shown.join(" "));
    let usage = "\"python3 train_dist.py --ip_config ip_config.txt ...\"";
    match positionals.len() {
        1 if positionals[0].trim().is_empty() => {
            return Err(ArgvError::EmptyCommand {
                example: example(usage),
            })
        }
        1 => {}
        // Missing required flags are clap's to name; only the command missing is ours.
        0 if strict_command().try_get_matches_from(&argv).is_err() => {
            return Ok(Prepared::Verbatim(argv))
        }
        0 => {
            return Err(ArgvError::MissingCommand {
                example: example(usage),
            })
        }
        n => return Err(split_command(n, &positionals, example)),
    }
    let mut result: Vec<OsString> = argv[..=sub].to_vec();
    result.extend(flags.into_iter().map(OsString::from));
    result.push("--".into());
    result.extend(positionals.into_iter().map(OsString::from));
    Ok(Prepared::Rewritten(result))
}

/// Where `launch` or `run` is in argv, which, and the words after it; `None` for every other
/// command line (only `dgl-coord [global flags] launch|run ...` is touched).
fn subcommand_words(argv: &[OsString]) -> Result<Option<Subcommand>, ArgvError> {
    let Some(sub) = argv
        .iter()
        .skip(1)
        .position(|a| !a.to_string_lossy().starts_with('-'))
        .map(|i| i + 1)
    else {
        return Ok(None);
    };
    let Some(&name) = WITH_COMMAND.iter().find(|n| argv[sub] == **n) else {
        return Ok(None);
    };
    let words = argv[sub + 1..]
        .iter()
        .map(|a| {
            a.to_str()
                .map(str::to_string)
                .ok_or_else(|| ArgvError::NotUtf8(a.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Subcommand { sub, name, words }))
}

/// `launch` or `run` at `argv[sub]`, and the words after it.
struct Subcommand {
    sub: usize,
    name: &'static str,
    words: Vec<String>,
}

/// The words after the subcommand, sorted into flags (rewritten for clap) and positionals.
struct Sorted {
    flags: Vec<String>,
    positionals: Vec<String>,
}

/// `None` when the words hold a flag error, for clap to name as given.
fn sort_words(name: &str, words: &[String]) -> Option<Sorted> {
    let flags = known_flags(name);
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
            i = take_extra_envs(w, words, i, &mut out, &mut positionals);
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
            // An unknown flag after a split command began is one of its words; before the
            // command, or after a whole (quoted) one, it is a flag error for clap to name.
            None if positionals.len() > 1
                || positionals
                    .first()
                    .is_some_and(|p| !p.contains(char::is_whitespace)) =>
            {
                positionals.push(w.clone())
            }
            None => return None,
        }
    }

    Some(Sorted {
        flags: out,
        positionals,
    })
}

/// DGL's `--extra_envs K=V ...` (the flag `w`, its words from `words[i]` on): each `K=V`
/// becomes `--extra_envs=K=V` in `out`. Returns where the words after it start.
fn take_extra_envs(
    w: &str,
    words: &[String],
    mut i: usize,
    out: &mut Vec<String>,
    positionals: &mut Vec<String>,
) -> usize {
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
        match words.get(i) {
            // Not `K=V`: clap's value check names the word and the form it needs.
            Some(v) if !v.starts_with('-') => {
                out.push(format!("{w}={v}"));
                i += 1;
            }
            _ => out.push(w.to_string()), // clap says a value is missing
        }
    }
    out.extend(taken.into_iter().map(|kv| format!("--extra_envs={kv}")));
    i
}

/// The message for a command the shell split into `n` words, with the quoting that keeps it
/// whole.
fn split_command(n: usize, positionals: &[String], example: impl Fn(&str) -> String) -> ArgvError {
    let joined: Vec<String> = positionals
        .iter()
        .map(|p| {
            if p.contains(char::is_whitespace) {
                quote(p)
            } else {
                p.clone()
            }
        })
        .collect();
    ArgvError::SplitCommand {
        words: n,
        shown: positionals
            .iter()
            .map(|p| format!("`{p}`"))
            .collect::<Vec<_>>()
            .join(" "),
        example: example(&quote(&joined.join(" "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch_cmd::{LaunchArgs, Mode};
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
        preprocess_args(argv)
            .map(|p| {
                let (Prepared::Rewritten(v) | Prepared::Verbatim(v)) = p;
                v.into_iter().map(|a| a.into_string().unwrap()).collect()
            })
            .map_err(|e| e.to_string())
    }

    const BASE: &str =
        "--workspace /ws --num_trainers 2 --num_servers 1 --part_config p.json --ip_config ip.txt";

    fn parse(args: &str) -> LaunchArgs {
        let argv = pre(&format!("launch {args}")).unwrap();
        match crate::Cli::try_parse_from(argv).unwrap().command {
            crate::Command::Launch(a) => a,
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
        assert_eq!(a.job.num_samplers, 4);
        assert_eq!(a.workspace, "~/graphsage/");
        assert_eq!(
            a.job.command,
            ["python3 code/train_dist.py --graph-name ogb-product --ip_config ip_config.txt --num-epochs 5"]
        );
        assert_eq!(a.job.graph_format, "csc");
        assert_eq!(a.job.num_server_threads, 1);
    }

    #[test]
    fn extra_envs_end_at_the_first_word_that_is_not_k_v() {
        let a = parse(&format!(
            "{BASE} --extra_envs A=1 B=x:$y 'python3 t.py' --grace 1"
        ));
        assert_eq!(a.job.extra_envs, ["A=1", "B=x:$y"]);
        assert_eq!(a.job.command, ["python3 t.py"]);
        assert_eq!(a.job.grace, 1.0);
        let a = parse(&format!(
            "{BASE} --extra_envs A=1 --num_samplers 3 'python3 t.py'"
        ));
        assert_eq!(
            (a.job.extra_envs.as_slice(), a.job.num_samplers),
            (&["A=1".to_string()][..], 3)
        );
        // The command itself may start with an assignment when nothing else is positional.
        let a = parse(&format!(
            "{BASE} --extra_envs A=1 'OMP_NUM_THREADS=2 python3 t.py'"
        ));
        assert_eq!(a.job.extra_envs, ["A=1"]);
        assert_eq!(a.job.command, ["OMP_NUM_THREADS=2 python3 t.py"]);
        let a = parse(&format!("{BASE} --extra-envs=A=1 -- 'python3 t.py'"));
        assert_eq!(a.job.extra_envs, ["A=1"]);
        assert_eq!(
            crate::launch_cmd::parse_extra_envs(&a.job.extra_envs).unwrap(),
            [("A".into(), "1".into())]
        );
    }

    #[test]
    fn flags_may_follow_the_command_and_kebab_case_works() {
        let a = parse("'python3 t.py' --workspace w --num-trainers 1 --num-servers 1 --part-config p --ip-config i --trainer-mode direct --ssh_port 22");
        assert_eq!(a.job.command, ["python3 t.py"]);
        assert!(matches!(a.job.trainer_mode, Mode::Direct));
        assert_eq!(a.job.ssh_port.as_deref(), Some("22"));
    }

    #[test]
    fn a_split_command_gets_the_right_quoting_shown() {
        let err = pre(&format!(
            "launch {BASE} python3 train.py --graph-name 'my g' --lr 0.1"
        ))
        .unwrap_err();
        assert!(err.contains("split it into 6 words"), "{err}");
        assert!(
            err.contains("--ip_config ip.txt \"python3 train.py --graph-name 'my g' --lr 0.1\""),
            "{err}"
        );
        let err = pre(&format!("launch {BASE} -- python3 train.py")).unwrap_err();
        assert!(err.contains("2 words"), "{err}");
    }

    #[test]
    fn hints_paste_back_as_given() {
        // The shell did not expand this `~` (it was quoted): the hint keeps it literal.
        let err = pre(
            "launch --workspace '~/ws' --num_trainers 1 --num_servers 1 \
                       --part_config p --ip_config i python3 t.py",
        )
        .unwrap_err();
        assert!(err.contains("--workspace '~/ws'"), "{err}");
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
    fn unknown_flags_get_no_tip_to_pass_them_as_a_value() {
        let err = |args: &str| {
            let argv: Vec<OsString> = std::iter::once("dgl-coord".to_string())
                .chain(words(args))
                .map(OsString::from)
                .collect();
            match parse_verbatim(argv) {
                Ok(_) => panic!("{args} parsed"),
                Err(e) => e.render().to_string(),
            }
        };
        let e = err("run --dry-run");
        assert!(e.contains("unexpected argument '--dry-run'"), "{e}");
        assert!(!e.contains("as a value"), "{e}");
        assert!(e.contains("dgl-coord launch --dry-run"), "{e}");
        let e = err(&format!("launch {BASE} --bogus \"python3 x.py\""));
        assert!(e.contains("'--bogus'") && !e.contains("as a value"), "{e}");
        let e = err(&format!("launch {BASE} --num_trainer 1 \"python3 x.py\""));
        assert!(
            e.contains("--num_trainers"),
            "a similar flag is still named: {e}"
        );
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
