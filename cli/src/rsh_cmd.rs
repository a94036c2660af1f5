//! `dgl-coord rsh`: ssh's command line, parsed by hand. ssh's syntax (clustered short
//! options, values glued on, options again after the host, the command as the remaining
//! words) is not clap's, and the tools that call ssh pass whatever their authors' ssh took.

use std::ffi::OsString;

use dglrun_coordinator::rsh::{self, RshOptions, FAILED};

use crate::access::AccessArgs;

const USAGE: &str = "usage: dgl-coord rsh [--agent-port PORT] [--token-file FILE] \
[ssh options] [user@]HOST COMMAND [ARG...]";

const HELP: &str = "\
Run COMMAND on HOST through its dgl-agent, the way ssh runs it: `/bin/sh -c COMMAND` in the
agent's root, stdin streamed to it, its stdout and stderr back byte for byte, SIGINT, SIGTERM
and SIGHUP forwarded (a second one ends rsh). Exits with the remote exit status, 255 when HOST
cannot be reached or refuses, or the command died by a signal. When rsh ends for any reason,
the agent stops everything the command started.

dglrun options (before HOST): --agent-port PORT, --token-file FILE, --tls-cert PEM,
--tls-key PEM, --tls-ca PEM, --insecure-plaintext (as for every dgl-coord command, with the
same environment variables).

ssh options are accepted: -n (stdin from /dev/null) and -q (quiet) are honoured; -p PORT (the
agent port comes from --agent-port), -o, -i, -F, -c, -m, -E, -b, -4, -6, -C, -T, -x, -a, -v, -y
are ignored; -l USER and USER@ are ignored (the command runs as the agent's user); the others
(forwardings, -t, -N, -f ...) are ignored with a note on stderr.";

/// ssh's short options that take a value.
const WITH_VALUE: &str = "BbcDEeFIiJLlmOoPpQRSWw";
/// ssh's short options without one.
const WITHOUT_VALUE: &str = "46AaCfGgKkMNnqsTtVvXxYy";
/// Options that change nothing here.
const QUIETLY_IGNORED: &str = "46aCTvxyopiFcmEbl";

/// A parsed `rsh` command line.
#[derive(Debug, Default, PartialEq, Eq)]
struct Parsed {
    help: bool,
    host: String,
    user: Option<String>,
    command: Vec<String>,
    no_stdin: bool,
    quiet: bool,
    /// dglrun's own long options, for clap.
    access: Vec<OsString>,
    /// Options accepted but not honoured, for the note on stderr.
    ignored: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum RshUsage {
    #[error("argument {0:?} is not valid UTF-8")]
    NotUtf8(OsString),
    #[error("option -{0} needs a value")]
    MissingValue(char),
    #[error("unknown option -{0}")]
    Unknown(char),
    #[error("option {0} needs a value")]
    MissingLongValue(String),
    #[error("unknown option {0}")]
    UnknownLong(String),
    #[error("no host")]
    NoHost,
    #[error("no command: rsh runs commands, not interactive shells")]
    NoCommand,
}

/// dglrun's long options that take a value.
const LONG_WITH_VALUE: &[&str] = &[
    "--agent-port",
    "--agent_port",
    "--token-file",
    "--token_file",
    "--tls-cert",
    "--tls-key",
    "--tls-ca",
];

fn parse(args: Vec<OsString>) -> Result<Parsed, RshUsage> {
    let mut words = Vec::with_capacity(args.len());
    for a in args {
        words.push(a.into_string().map_err(RshUsage::NotUtf8)?);
    }
    let mut p = Parsed::default();
    let mut it = words.into_iter().peekable();
    // Options come before the host and, as with OpenSSH, again right after it.
    while let Some(word) = it.next() {
        if word == "--" {
            if p.host.is_empty() {
                p.host = it.next().ok_or(RshUsage::NoHost)?;
            }
            break;
        }
        if word == "--help" || word == "-h" {
            p.help = true;
            return Ok(p);
        }
        if let Some(long) = word.strip_prefix("--") {
            let name = format!("--{}", long.split('=').next().unwrap_or_default());
            if name == "--insecure-plaintext" {
                p.access.push(word.into());
            } else if LONG_WITH_VALUE.contains(&name.as_str()) {
                p.access.push(word.clone().into());
                if !long.contains('=') {
                    let v = it.next().ok_or(RshUsage::MissingLongValue(name))?;
                    p.access.push(v.into());
                }
            } else {
                return Err(RshUsage::UnknownLong(word));
            }
            continue;
        }
        if let Some(cluster) = word.strip_prefix('-').filter(|c| !c.is_empty()) {
            short_options(cluster, &mut it, &mut p)?;
            continue;
        }
        if !p.host.is_empty() {
            p.command.push(word);
            break;
        }
        match word.split_once('@') {
            Some((user, host)) => {
                p.user = Some(user.to_string());
                p.host = host.to_string();
            }
            None => p.host = word,
        }
        if p.host.is_empty() {
            return Err(RshUsage::NoHost);
        }
        // After the host, options only while the next word is one.
        if !it.peek().is_some_and(|w| w.starts_with('-')) {
            break;
        }
    }
    if p.host.is_empty() {
        return Err(RshUsage::NoHost);
    }
    p.command.extend(it);
    if p.command.is_empty() {
        return Err(RshUsage::NoCommand);
    }
    Ok(p)
}

/// One word of clustered short options (`-nT`, `-oKey=value`, `-p22`, `-tt`).
fn short_options(
    cluster: &str,
    rest: &mut impl Iterator<Item = String>,
    p: &mut Parsed,
) -> Result<(), RshUsage> {
    for (i, c) in cluster.char_indices() {
        if WITH_VALUE.contains(c) {
            let glued = &cluster[i + c.len_utf8()..];
            let value = if glued.is_empty() {
                rest.next().ok_or(RshUsage::MissingValue(c))?
            } else {
                glued.to_string()
            };
            match c {
                'l' => p.user = Some(value),
                _ if QUIETLY_IGNORED.contains(c) => {}
                _ => p.ignored.push(format!("-{c} {value}")),
            }
            return Ok(());
        }
        if !WITHOUT_VALUE.contains(c) {
            return Err(RshUsage::Unknown(c));
        }
        match c {
            'n' => p.no_stdin = true,
            'q' => p.quiet = true,
            _ if QUIETLY_IGNORED.contains(c) => {}
            _ => {
                let shown = format!("-{c}");
                if !p.ignored.contains(&shown) {
                    p.ignored.push(shown);
                }
            }
        }
    }
    Ok(())
}

/// dglrun's access flags, parsed by clap (with their environment variables).
#[derive(clap::Parser, Debug)]
#[command(disable_help_flag = true)]
struct AccessOnly {
    #[command(flatten)]
    access: AccessArgs,
}

/// The access flags `rsh` and `rcp` found among ssh's or scp's words, parsed by clap for
/// `tool` (`dgl-coord rsh`); a bad one is printed and the exit status returned.
pub(crate) fn parse_access(tool: &'static str, words: &[OsString]) -> Result<AccessArgs, u8> {
    use clap::{CommandFactory, FromArgMatches};
    let argv = std::iter::once(OsString::from(tool)).chain(words.iter().cloned());
    AccessOnly::command()
        .name(tool)
        .try_get_matches_from(argv)
        .and_then(|m| AccessOnly::from_arg_matches(&m))
        .map(|a| a.access)
        .map_err(|e| {
            eprintln!("{tool}: {}", e.to_string().trim_end());
            FAILED
        })
}

/// Runs `dgl-coord rsh ARGS`; returns the exit status.
pub(crate) fn main(args: Vec<OsString>) -> u8 {
    let p = match parse(args) {
        Ok(p) if p.help => {
            println!("{USAGE}\n\n{HELP}");
            return 0;
        }
        Ok(p) => p,
        Err(e) => {
            eprintln!("dgl-coord rsh: {e}\n{USAGE}");
            return FAILED;
        }
    };
    let access = match parse_access("dgl-coord rsh", &p.access) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if !p.quiet {
        for o in &p.ignored {
            eprintln!("dgl-coord rsh: option {o} is not supported over dgl-agent; ignored");
        }
        let me = std::env::var("USER").unwrap_or_default();
        if let Some(u) = p.user.as_deref().filter(|u| *u != me) {
            eprintln!("dgl-coord rsh: the command runs as the agent's user, not {u}");
        }
    }
    let access = match access.access() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("dgl-coord rsh: {e:#}");
            return FAILED;
        }
    };
    let opts = RshOptions {
        host: p.host,
        // As ssh does: the words joined by spaces, for the remote shell to split again.
        command: p.command.join(" "),
        stdin: !p.no_stdin,
        quiet: p.quiet,
    };
    // One thread: a session is one stream, and worker threads would only add their start.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match runtime {
        Ok(rt) => rt.block_on(rsh::run(opts, &access)),
        Err(e) => {
            eprintln!("dgl-coord rsh: cannot start the async runtime: {e}");
            FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<OsString> {
        s.split(' ').map(OsString::from).collect()
    }

    #[test]
    fn takes_what_dgl_tools_pass() {
        let p = parse(words(
            "-o StrictHostKeyChecking=no -p 22 10.0.0.1 cd /w; python3 x.py",
        ))
        .unwrap();
        assert_eq!(p.host, "10.0.0.1");
        assert_eq!(p.command.join(" "), "cd /w; python3 x.py");
        assert!(p.ignored.is_empty());
        let p = parse(words("-nTx -oBatchMode=yes -tt bob@h1 -q true")).unwrap();
        assert_eq!((p.host.as_str(), p.user.as_deref()), ("h1", Some("bob")));
        assert!(p.no_stdin && p.quiet);
        assert_eq!(p.ignored, vec!["-t"]);
        assert_eq!(p.command, vec!["true"]);
        let p = parse(words("--agent-port 5 --token-file=/t -L 1:h:2 h -- -x")).unwrap();
        assert_eq!(p.access, words("--agent-port 5 --token-file=/t"));
        assert_eq!(p.ignored, vec!["-L 1:h:2"]);
        assert_eq!(p.command, vec!["-x"]);
    }

    #[test]
    fn bad_input_is_named() {
        assert_eq!(parse(words("-p")), Err(RshUsage::MissingValue('p')));
        assert_eq!(parse(words("-Z h true")), Err(RshUsage::Unknown('Z')));
        assert_eq!(parse(words("h")), Err(RshUsage::NoCommand));
        assert_eq!(parse(words("-n")), Err(RshUsage::NoHost));
        assert_eq!(
            parse(words("--bogus h true")),
            Err(RshUsage::UnknownLong("--bogus".into()))
        );
    }
}
