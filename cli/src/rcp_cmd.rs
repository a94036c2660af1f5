//! `dgl-coord rcp`: scp's command line, parsed by hand as `rsh` parses ssh's.

use std::ffi::OsString;
use std::path::PathBuf;

use dglrun_coordinator::rcp::{self, Upload};

/// scp's exit status for any failure.
const FAILED: u8 = 1;

const USAGE: &str = "usage: dgl-coord rcp [--agent-port PORT] [--token-file FILE] [-r] \
[scp options] SRC... [user@]HOST:DST | [user@]HOST:SRC LOCAL";

const HELP: &str = "\
Copy files to a host through its dgl-agent with scp's semantics, over the verified chunk
transfer of `dgl-coord copy`: DST is a directory when it ends with `/`, when several SRCs are
given, or when it is one on the host (each SRC lands in it under its name); otherwise the one
SRC becomes DST. Directories need -r. HOST:SRC LOCAL fetches one file. Relative remote paths
are relative to the agent's root. -P PORT and the other scp options (-o, -i, -F, -p, -q, -C, -B,
-v, -3, -4, -6) are accepted and ignored.";

/// scp's short options that take a value.
const WITH_VALUE: &str = "cFiJloPS";
/// Those without one.
const WITHOUT_VALUE: &str = "346ABCpqrTv";

#[derive(Debug, Default, PartialEq, Eq)]
struct Parsed {
    help: bool,
    recursive: bool,
    words: Vec<String>,
    access: Vec<OsString>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum RcpUsage {
    #[error("argument {0:?} is not valid UTF-8")]
    NotUtf8(OsString),
    #[error("option -{0} needs a value")]
    MissingValue(char),
    #[error("unknown option -{0}")]
    Unknown(char),
    #[error("unknown option {0}")]
    UnknownLong(String),
    #[error("need a source and a destination")]
    TooFew,
    #[error("one of the source and the destination must be HOST:PATH, not both")]
    OneRemote,
    #[error("a download takes one remote file")]
    OneDownload,
}

const LONG_WITH_VALUE: &[&str] = &[
    "--agent-port",
    "--agent_port",
    "--token-file",
    "--token_file",
    "--tls-cert",
    "--tls-key",
    "--tls-ca",
];

fn parse(args: Vec<OsString>) -> Result<Parsed, RcpUsage> {
    let mut p = Parsed::default();
    let mut it = args.into_iter();
    let mut options = true;
    while let Some(a) = it.next() {
        let w = a.into_string().map_err(RcpUsage::NotUtf8)?;
        if !options || !w.starts_with('-') || w == "-" {
            p.words.push(w);
            continue;
        }
        if w == "--" {
            options = false;
        } else if w == "--help" || w == "-h" {
            p.help = true;
            return Ok(p);
        } else if let Some(long) = w.strip_prefix("--") {
            let name = format!("--{}", long.split('=').next().unwrap_or_default());
            if name == "--insecure-plaintext" {
                p.access.push(w.into());
            } else if LONG_WITH_VALUE.contains(&name.as_str()) {
                p.access.push(w.clone().into());
                if !long.contains('=') {
                    let v = it.next().ok_or(RcpUsage::UnknownLong(name))?;
                    p.access.push(v);
                }
            } else {
                return Err(RcpUsage::UnknownLong(w));
            }
        } else {
            let cluster = &w[1..];
            for (i, c) in cluster.char_indices() {
                if WITH_VALUE.contains(c) {
                    if cluster[i + 1..].is_empty() {
                        it.next().ok_or(RcpUsage::MissingValue(c))?;
                    }
                    break;
                }
                if !WITHOUT_VALUE.contains(c) {
                    return Err(RcpUsage::Unknown(c));
                }
                if c == 'r' {
                    p.recursive = true;
                }
            }
        }
    }
    Ok(p)
}

/// `[user@]host:path` as (host, path); None for a local path (scp's rule: a colon before any
/// slash).
fn remote(word: &str) -> Option<(String, String)> {
    let (host, path) = word.split_once(':')?;
    if host.is_empty() || host.contains('/') {
        return None;
    }
    let host = host.rsplit('@').next().unwrap_or(host);
    Some((host.to_string(), path.to_string()))
}

enum Plan {
    Up(Upload),
    Down {
        host: String,
        src: String,
        local: PathBuf,
    },
}

fn plan(p: Parsed) -> Result<Plan, RcpUsage> {
    let Some((last, sources)) = p.words.split_last() else {
        return Err(RcpUsage::TooFew);
    };
    if sources.is_empty() {
        return Err(RcpUsage::TooFew);
    }
    let remote_sources: Vec<_> = sources.iter().filter_map(|s| remote(s)).collect();
    match (remote(last), remote_sources.len()) {
        (Some((host, dest)), 0) => Ok(Plan::Up(Upload {
            sources: sources.iter().map(PathBuf::from).collect(),
            host,
            dest,
            recursive: p.recursive,
        })),
        (None, n) if n == sources.len() => {
            let [(host, src)] =
                <[_; 1]>::try_from(remote_sources).map_err(|_| RcpUsage::OneDownload)?;
            Ok(Plan::Down {
                host,
                src,
                local: PathBuf::from(last),
            })
        }
        _ => Err(RcpUsage::OneRemote),
    }
}

/// Runs `dgl-coord rcp ARGS`; returns the exit status.
pub(crate) fn main(args: Vec<OsString>) -> u8 {
    let parsed = match parse(args) {
        Ok(p) if p.help => {
            println!("{USAGE}\n\n{HELP}");
            return 0;
        }
        Ok(p) => p,
        Err(e) => {
            eprintln!("dgl-coord rcp: {e}\n{USAGE}");
            return FAILED;
        }
    };
    let access = match crate::rsh_cmd::parse_access("dgl-coord rcp", &parsed.access) {
        Ok(a) => match a.access() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("dgl-coord rcp: {e:#}");
                return FAILED;
            }
        },
        Err(code) => return code,
    };
    let plan = match plan(parsed) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("dgl-coord rcp: {e}\n{USAGE}");
            return FAILED;
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dgl-coord rcp: cannot start the async runtime: {e}");
            return FAILED;
        }
    };
    let done = rt.block_on(async {
        match plan {
            Plan::Up(u) => rcp::upload(u, &access).await,
            Plan::Down { host, src, local } => rcp::download(&host, &src, &local, &access).await,
        }
    });
    match done {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("dgl-coord rcp: {e:#}");
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
    fn takes_what_copy_files_py_passes() {
        let p = parse(words("-r -P 22 -o A=b code 10.0.0.1:ws/")).unwrap();
        assert!(p.recursive);
        let Plan::Up(u) = plan(p).unwrap() else {
            panic!("an upload")
        };
        assert_eq!((u.host.as_str(), u.dest.as_str()), ("10.0.0.1", "ws/"));
        assert_eq!(u.sources, vec![PathBuf::from("code")]);
        let p = parse(words("bob@h:/r/f.txt ./here")).unwrap();
        assert!(matches!(plan(p).unwrap(), Plan::Down { host, .. } if host == "h"));
        assert!(remote("./a:b").is_none() && remote("/x/y").is_none());
    }

    #[test]
    fn bad_input_is_named() {
        assert!(matches!(
            plan(parse(words("a")).unwrap()),
            Err(RcpUsage::TooFew)
        ));
        assert!(matches!(
            plan(parse(words("h:a g:b")).unwrap()),
            Err(RcpUsage::OneRemote)
        ));
        assert!(matches!(
            plan(parse(words("a b")).unwrap()),
            Err(RcpUsage::OneRemote)
        ));
        assert_eq!(parse(words("-Z a h:b")), Err(RcpUsage::Unknown('Z')));
    }
}
