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
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use dglrun_proto::pb::{process_spec, ProcessSpec};

/// Marker: the job id, inherited by every descendant.
pub const JOB_ID_VAR: &str = "DGLRUN_JOB_ID";
/// Marker: the agent's root, so agents sharing a host never claim each other's processes.
pub const AGENT_VAR: &str = "DGLRUN_AGENT";
/// Not passed on: a job has no business holding the agent's credentials.
const HIDDEN_VARS: &[&str] = &["DGL_AGENT_TOKEN"];

const MAX_ARGS: usize = 4096;
const MAX_COMMAND_BYTES: usize = 1 << 20;
const MAX_ENV: usize = 1024;
const MAX_LABEL: usize = 128;

/// Checks what a coordinator sent before anything is spawned; the error names the problem.
pub fn validate(spec: &ProcessSpec) -> Result<(), String> {
    let label = &spec.label;
    if label.is_empty() || label.len() > MAX_LABEL || label.chars().any(char::is_control) {
        return Err(format!(
            "process label {label:?} must be 1-{MAX_LABEL} printable characters"
        ));
    }
    if spec.role.len() > MAX_LABEL {
        return Err(format!("{label}: role is too long"));
    }
    let nul = |s: &str| s.contains('\0');
    match &spec.command {
        None => return Err(format!("{label}: no command")),
        Some(process_spec::Command::Argv(a)) => {
            if a.args.is_empty() || a.args[0].is_empty() {
                return Err(format!("{label}: empty argv"));
            }
            let bytes: usize = a.args.iter().map(String::len).sum();
            if a.args.len() > MAX_ARGS || bytes > MAX_COMMAND_BYTES {
                return Err(format!("{label}: argv is too large"));
            }
            if a.args.iter().any(|s| nul(s)) {
                return Err(format!("{label}: argv contains a NUL byte"));
            }
        }
        Some(process_spec::Command::Shell(s)) => {
            if s.trim().is_empty() || s.len() > MAX_COMMAND_BYTES || nul(s) {
                return Err(format!(
                    "{label}: the shell command is empty, too long or has a NUL"
                ));
            }
        }
    }
    if spec.env.len() > MAX_ENV {
        return Err(format!(
            "{label}: more than {MAX_ENV} environment variables"
        ));
    }
    for (k, v) in &spec.env {
        if !is_env_name(k) {
            return Err(format!(
                "{label}: {k:?} is not an environment variable name"
            ));
        }
        if nul(v) || v.len() > MAX_COMMAND_BYTES {
            return Err(format!(
                "{label}: the value of {k} has a NUL byte or is too long"
            ));
        }
    }
    Ok(())
}

/// `[A-Za-z_][A-Za-z0-9_]*`
pub fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

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

/// The command for `spec`, ready to spawn. `cwd` is already resolved inside the root.
pub fn command(spec: &ProcessSpec, cwd: &Path, job_id: &str, agent_root: &Path) -> Command {
    let mut cmd = match &spec.command {
        Some(process_spec::Command::Argv(a)) => {
            let mut c = Command::new(&a.args[0]);
            c.args(&a.args[1..]);
            c
        }
        Some(process_spec::Command::Shell(s)) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(s);
            c
        }
        // `validate` refuses this; an argv-less command fails at exec with a clear error.
        None => Command::new(""),
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
    // Sorted so that the child's environment order does not depend on hashing.
    let mut vars: Vec<(&String, &String)> = spec.env.iter().collect();
    vars.sort();
    for (k, v) in vars {
        cmd.env(k, expand(v, lookup));
    }
    cmd.env(JOB_ID_VAR, job_id)
        .env(AGENT_VAR, agent_root)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
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

    #[test]
    fn specs_are_checked() {
        let ok = ProcessSpec {
            label: "server0".into(),
            role: "server".into(),
            command: Some(process_spec::Command::Shell("true".into())),
            ..Default::default()
        };
        assert!(validate(&ok).is_ok());
        let mut bad = ok.clone();
        bad.env.insert("A=B".into(), "1".into());
        assert!(validate(&bad)
            .unwrap_err()
            .contains("not an environment variable name"));
        let mut bad = ok.clone();
        bad.command = Some(process_spec::Command::Argv(Default::default()));
        assert!(validate(&bad).unwrap_err().contains("empty argv"));
        let mut bad = ok.clone();
        bad.label = String::new();
        assert!(validate(&bad).is_err());
        let mut bad = ok;
        bad.command = None;
        assert!(validate(&bad).is_err());
    }
}
