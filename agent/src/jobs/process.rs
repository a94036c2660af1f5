//! Turning a `ProcessSpec` into a `std::process::Command`.
//!
//! Each process leads its own process group, starts in its working directory inside the
//! workspace, and gets the agent's environment plus the spec's plus two marker variables
//! (`DGLRUN_JOB_ID`, `DGLRUN_AGENT`) by which the agent recognises the job's descendants.
//!
//! Environment values are expanded like DGL's launch.py has the remote shell do it: DGL exports
//! its variables in an unquoted `export K=V ...` line, so `LD_LIBRARY_PATH=/x:$LD_LIBRARY_PATH`
//! works there. The agent reproduces exactly that subset itself, without a shell: `$NAME` and
//! `${NAME}` take the value from the agent's own environment (empty when unset), `\$` is a
//! literal `$`, and everything else is kept as it is (no quotes, globs or `${NAME:-x}` forms).
//! Values are never spliced into a command line.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use super::spec::{self, JobId, ProcessSpec};
use crate::confine::Workdir;

/// Marker: the job id, inherited by every descendant.
pub const JOB_ID_VAR: &str = "DGLRUN_JOB_ID";
/// Marker: the agent's root, so agents sharing a host never claim each other's processes.
pub const AGENT_VAR: &str = "DGLRUN_AGENT";
/// Not passed on: a job has no business holding the agent's credentials.
const HIDDEN_VARS: &[&str] = &["DGL_AGENT_TOKEN"];

/// Expands `$NAME`, `${NAME}` and `\$` in `value` (see the module docs).
pub fn expand(value: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let bytes = value.as_bytes();
    let mut out = String::with_capacity(value.len());
    let mut i = 0;
    let name_len = |from: usize| {
        let rest = &value[from..];
        let first_ok = rest
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !first_ok {
            return 0;
        }
        rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len())
    };
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if bytes.get(i + 1) == Some(&b'$') => {
                out.push('$');
                i += 2;
            }
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                let n = name_len(i + 2);
                if n > 0 && bytes.get(i + 2 + n) == Some(&b'}') {
                    out.push_str(&lookup(&value[i + 2..i + 2 + n]).unwrap_or_default());
                    i += n + 3;
                } else {
                    out.push('$');
                    i += 1;
                }
            }
            b'$' => {
                let n = name_len(i + 1);
                if n > 0 {
                    out.push_str(&lookup(&value[i + 1..i + 1 + n]).unwrap_or_default());
                    i += n + 1;
                } else {
                    out.push('$');
                    i += 1;
                }
            }
            _ => {
                // Copy up to the next special byte; both are ASCII so this is a char boundary.
                let next = value[i..].find(['$', '\\']).map_or(bytes.len(), |j| {
                    if j == 0 {
                        i + 1
                    } else {
                        i + j
                    }
                });
                out.push_str(&value[i..next]);
                i = next;
            }
        }
    }
    out
}

/// The command for `spec`, ready to spawn. `cwd` was opened beneath the root; the child
/// changes into that fd, never into a path a symlink could redirect after the check.
pub fn command(spec: &ProcessSpec, cwd: Workdir, job_id: &JobId, agent_root: &Path) -> Command {
    let mut cmd = match &spec.command {
        spec::Command::Argv(a) => {
            // Never empty (see `spec`); an empty one would fail at exec with a clear error.
            let mut c = Command::new(a.first().map_or("", String::as_str));
            c.args(a.iter().skip(1));
            c
        }
        spec::Command::Shell(s) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(s);
            c
        }
    };
    // vars_os: a variable that is not UTF-8 must not make the agent panic.
    let agent_env: HashMap<std::ffi::OsString, std::ffi::OsString> = std::env::vars_os().collect();
    let lookup = |name: &str| {
        agent_env
            .get(std::ffi::OsStr::new(name))
            .map(|v| v.to_string_lossy().into_owned())
    };
    for v in HIDDEN_VARS {
        cmd.env_remove(v);
    }
    // Sorted (see `spec`) so that the child's environment order does not depend on hashing.
    for (k, v) in &spec.env {
        cmd.env(k, expand(v, lookup));
    }
    cmd.env(JOB_ID_VAR, job_id.as_str())
        .env(AGENT_VAR, agent_root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let dir = cwd.fd;
    // Each process leads a session of its own (and so its own process group, which the stop
    // signals as a whole), as every command launch.py starts over ssh does: with the kernel's
    // autogroup scheduling a session is the unit of CPU share, so a job's processes do not
    // share one slice of a loaded host between them.
    // SAFETY: setsid(2) and fchdir(2) are async-signal-safe; the closure owns the fd, which
    // lives as long as the command and is closed in the child at exec (O_CLOEXEC).
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setsid()?;
            rustix::process::fchdir(dir.as_fd()).map_err(Into::into)
        });
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOME" => Some("/home/u".into()),
            "LD_LIBRARY_PATH" => Some("/usr/lib".into()),
            _ => None,
        }
    }

    #[test]
    fn expansion_follows_the_shell_for_plain_forms() {
        assert_eq!(expand("/x:$LD_LIBRARY_PATH", env), "/x:/usr/lib");
        assert_eq!(expand("${HOME}/a", env), "/home/u/a");
        assert_eq!(expand("$HOME_DIR", env), "");
        assert_eq!(expand("a$UNSET-b", env), "a-b");
        assert_eq!(expand("cost \\$5", env), "cost $5");
        assert_eq!(expand("$ $1 ${ ${bad-x} $", env), "$ $1 ${ ${bad-x} $");
        assert_eq!(expand("a\\b", env), "a\\b");
        assert_eq!(expand("ünï$HOME€", env), "ünï/home/u€");
        assert_eq!(expand("", env), "");
    }
}
