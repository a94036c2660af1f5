//! `dgl-coord shims --dir DIR`: `ssh` and `scp` executables that run `dgl-coord rsh` and `rcp` with this
//! command's agent port and credentials, so that tools which shell out to ssh (DGL's
//! launch.py, dispatch_data.py, mpirun's rsh agent) run over the agents unmodified.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use dglrun_coordinator::launch::command::quote;

use crate::access::AccessArgs;

#[derive(clap::Args, Debug)]
pub(crate) struct ShimsArgs {
    /// Directory to write `ssh` and `scp` into (created if missing); put it first on PATH.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,

    #[command(flatten)]
    access: AccessArgs,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ShimsError {
    #[error("cannot find this dgl-coord executable")]
    OwnPath(#[source] std::io::Error),
    #[error("cannot write {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
    #[error("path {} is not valid UTF-8", .0.display())]
    NotUtf8(PathBuf),
}

/// The words after `dgl-coord rsh` that carry the access flags into the shim.
fn access_words(a: &AccessArgs) -> Result<Vec<String>, ShimsError> {
    let mut words = vec!["--agent-port".to_string(), a.agent_port.to_string()];
    let paths = [
        ("--token-file", &a.token_file),
        ("--tls-cert", &a.tls_cert),
        ("--tls-key", &a.tls_key),
        ("--tls-ca", &a.tls_ca),
    ];
    for (flag, path) in paths {
        if let Some(p) = path {
            let abs = std::path::absolute(p).map_err(|e| ShimsError::Write(p.clone(), e))?;
            let s = abs
                .to_str()
                .ok_or_else(|| ShimsError::NotUtf8(abs.clone()))?;
            words.push(flag.to_string());
            words.push(s.to_string());
        }
    }
    if a.insecure_plaintext {
        words.push("--insecure-plaintext".to_string());
    }
    Ok(words)
}

/// The shell script of the `ssh` (`sub` = rsh) or `scp` (rcp) shim.
fn script(exe: &str, sub: &str, access: &[String]) -> String {
    let mut line = vec![quote(exe), sub.to_string()];
    line.extend(access.iter().map(|w| quote(w)));
    format!(
        "#!/bin/sh\n# Written by `dgl-coord shims`: runs over dgl-agent, not ssh.\nexec {} \"$@\"\n",
        line.join(" ")
    )
}

fn write_executable(path: &Path, text: &str) -> Result<(), ShimsError> {
    let err = |e| ShimsError::Write(path.to_path_buf(), e);
    // A new inode each time: a shim being executed is never rewritten in place.
    let tmp = path.with_extension("dglrun-tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o755)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)
}

pub(crate) fn run(args: ShimsArgs) -> anyhow::Result<u8> {
    let exe = std::env::current_exe().map_err(ShimsError::OwnPath)?;
    let exe_s = exe
        .to_str()
        .ok_or_else(|| ShimsError::NotUtf8(exe.clone()))?;
    let access = access_words(&args.access)?;
    std::fs::create_dir_all(&args.dir).map_err(|e| ShimsError::Write(args.dir.clone(), e))?;
    for (name, sub) in [("ssh", "rsh"), ("scp", "rcp")] {
        let path = args.dir.join(name);
        write_executable(&path, &script(exe_s, sub, &access))?;
        println!("{}", path.display());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ssh_shim_passes_every_word_on() {
        let s = script(
            "/opt/dgl coord",
            "rsh",
            &["--agent-port".into(), "7".into()],
        );
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.ends_with("exec '/opt/dgl coord' rsh --agent-port 7 \"$@\"\n"));
    }
}
