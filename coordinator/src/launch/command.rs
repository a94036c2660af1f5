//! The user's command: where its python is, how torchrun is wrapped around it, and whether it
//! can run as a plain argv or needs `sh -c`.

use serde::Serialize;

mod shell_words;

/// How a process is started on its host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandLine {
    /// Executed directly: no shell, so nothing in it is interpreted.
    Argv(Vec<String>),
    /// Run by `sh -c`: the user wrote a shell chain (`cd code && python3 ...`), redirections,
    /// variables or globs.
    Shell(String),
}

impl CommandLine {
    /// The command as one line, as a shell would read it (for display and comparisons).
    pub fn display(&self) -> String {
        match self {
            CommandLine::Shell(s) => s.clone(),
            CommandLine::Argv(args) => args.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" "),
        }
    }
}

/// `word` as a POSIX shell reads it back: bare when it has only characters no shell treats
/// specially (`--master_port=1` stays readable), else quoted by `shlex`.
pub fn quote(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        return word.to_string();
    }
    // No argv word or path holds a NUL; allowing it only makes quoting infallible.
    shlex::Quoter::new()
        .allow_nul(true)
        .quote(word)
        .map_or_else(|_| String::new(), std::borrow::Cow::into_owned)
}

/// Argv when the command is a plain list of words (quotes allowed), `sh -c` as soon as it uses
/// anything a shell would interpret: operators, redirections, expansions, globs, comments,
/// `~`, or a leading `NAME=value` assignment.
pub fn parse(command: &str) -> CommandLine {
    if needs_shell(command) {
        return CommandLine::Shell(command.to_string());
    }
    match shlex::split(command) {
        Some(words) if !words.is_empty() && !is_assignment(&words[0]) => CommandLine::Argv(words),
        // Unbalanced quotes and the like: let the shell report it in its own words.
        _ => CommandLine::Shell(command.to_string()),
    }
}

use shell_words::is_assignment;

/// True if a POSIX shell would do more with `s` than split it into (possibly quoted) words.
fn needs_shell(s: &str) -> bool {
    #[derive(PartialEq)]
    enum Q {
        None,
        Single,
        Double,
    }
    let mut q = Q::None;
    let mut escaped = false;
    let mut word_start = true;
    for c in s.chars() {
        if escaped {
            escaped = false;
            word_start = false;
            continue;
        }
        match q {
            Q::Single => {
                if c == '\'' {
                    q = Q::None;
                }
            }
            Q::Double => match c {
                '"' => q = Q::None,
                '\\' => escaped = true,
                '$' | '`' => return true,
                _ => {}
            },
            Q::None => match c {
                '\'' => q = Q::Single,
                '"' => q = Q::Double,
                '\\' => escaped = true,
                '|' | '&' | ';' | '<' | '>' | '(' | ')' | '$' | '`' | '*' | '?' | '[' | ']'
                | '{' | '}' | '\n' | '\r' => return true,
                '#' | '~' if word_start => return true,
                _ => {}
            },
        }
        word_start = q == Q::None && c.is_whitespace();
    }
    false
}

/// Where the python interpreter is in a command: the first word in command position (read as
/// shell words: after `&&`, `;`, `|`, assignments, `env`, `exec`, ...) whose file name is
/// `python`, `python3`, `python3.11`, ... (possibly a path such as `/usr/bin/python3`).
/// Returns the byte range of that word. An argument that merely names python
/// (`cd /opt/python3`) is never taken.
pub fn find_python(command: &str) -> Option<std::ops::Range<usize>> {
    shell_words::command_words(command)
        .into_iter()
        .find(|(_, value)| is_python_name(value.rsplit('/').next().unwrap_or(value)))
        .map(|(range, _)| range)
}

/// The command with its interpreter (see [`find_python`]) replaced by `python` (`--python`).
pub fn replace_python(command: &str, python: &str) -> Result<String, NoInterpreter> {
    let at = find_python(command).ok_or_else(|| NoInterpreter {
        command: command.to_string(),
    })?;
    Ok(format!(
        "{}{}{}",
        &command[..at.start],
        quote(python),
        &command[at.end..]
    ))
}

/// `command` run after `setup` in the same shell (`--setup`): always `sh -c`.
pub fn with_setup(command: CommandLine, setup: Option<&str>) -> CommandLine {
    match setup {
        Some(s) => CommandLine::Shell(format!("{s}\n{}", command.display())),
        None => command,
    }
}

/// `python\d*(\.\d+)?`
fn is_python_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("python") else {
        return false;
    };
    let (major, minor) = match rest.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (rest, None),
    };
    major.chars().all(|c| c.is_ascii_digit())
        && minor.is_none_or(|m| {
            !m.is_empty() && !major.is_empty() && m.chars().all(|c| c.is_ascii_digit())
        })
}

/// torchrun's options as DGL's launch.py passes them.
#[derive(Clone, Debug)]
pub struct TorchRun {
    pub nproc_per_node: u32,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: String,
}

/// A command torchrun mode cannot wrap.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "no python interpreter in command position in {command:?}: torchrun mode starts \
     `python -m torch.distributed.run` where the command runs python. Start the command \
     (or a command of its chain: `cd code && python3 train.py`) with the interpreter \
     (python, python3, python3.11 or a path to one), or use --trainer-mode direct"
)]
pub struct NoInterpreter {
    pub command: String,
}

/// Inserts `-m torch.distributed.run ...` right after the command's python interpreter.
///
/// DGL replaces every occurrence of the first allowlisted name it finds (so `python3.11` gets
/// wrapped as `python3 -m ... .11`); this wraps exactly the first interpreter word.
pub fn wrap_torchrun(command: &str, t: &TorchRun) -> Result<String, NoInterpreter> {
    let at = find_python(command).ok_or_else(|| NoInterpreter {
        command: command.to_string(),
    })?;
    let args = format!(
        " -m torch.distributed.run --nproc_per_node={} --nnodes={} --node_rank={} \
         --master_addr={} --master_port={}",
        t.nproc_per_node, t.nnodes, t.node_rank, t.master_addr, t.master_port
    );
    let mut out = String::with_capacity(command.len() + args.len());
    out.push_str(&command[..at.end]);
    out.push_str(&args);
    out.push_str(&command[at.end..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(v: &[&str]) -> CommandLine {
        CommandLine::Argv(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn quoting_round_trips() {
        for w in [
            "--x=1",
            "a b",
            "it's",
            "",
            "$HOME",
            "a\"b",
            "~/ws",
            "a'b\"c$`\\",
        ] {
            assert_eq!(shlex::split(&quote(w)).unwrap(), [w]);
        }
        assert_eq!(quote("--master_port=1"), "--master_port=1");
    }

    #[test]
    fn plain_words_run_without_a_shell() {
        assert_eq!(
            parse("python3 train.py --lr 0.1 --name 'my graph'"),
            argv(&["python3", "train.py", "--lr", "0.1", "--name", "my graph"])
        );
        assert_eq!(
            parse("python3 a.py --x=a#b"),
            argv(&["python3", "a.py", "--x=a#b"])
        );
        assert_eq!(
            parse("python3 'a;b' \"c&d\""),
            argv(&["python3", "a;b", "c&d"])
        );
    }

    #[test]
    fn shell_syntax_runs_under_sh() {
        for s in [
            "cd code && python3 train.py",
            "python3 a.py > log.txt",
            "python3 a.py; echo done",
            "python3 a.py $HOME",
            "python3 a.py \"$HOME\"",
            "python3 *.py",
            "python3 ~/a.py",
            "OMP_NUM_THREADS=1 python3 a.py",
            "python3 a.py # comment",
            "python3 a.py `date`",
            "python3 'unbalanced",
            "python3 a.py | tee x",
        ] {
            assert!(matches!(parse(s), CommandLine::Shell(_)), "{s}");
        }
    }

    #[test]
    fn the_interpreter_is_found_by_file_name() {
        let find = |s: &str| find_python(s).map(|r| s[r].to_string());
        assert_eq!(find("python3 a.py").as_deref(), Some("python3"));
        assert_eq!(
            find("cd x && python3.11 a.py").as_deref(),
            Some("python3.11")
        );
        assert_eq!(
            find("/usr/bin/python3 a.py").as_deref(),
            Some("/usr/bin/python3")
        );
        assert_eq!(find("python a.py").as_deref(), Some("python"));
        assert_eq!(find("ipython a.py"), None);
        assert_eq!(find("python3x a.py"), None);
        assert_eq!(find("python3. a.py"), None);
        assert_eq!(find("./mypython_script.py python3 x"), None);
        assert_eq!(
            find("cd /opt/python3 && python3 x").as_deref(),
            Some("python3")
        );
        assert_eq!(find("bash run.sh"), None);
    }

    #[test]
    fn the_interpreter_is_replaced_and_setup_runs_first() {
        assert_eq!(
            replace_python("cd code && python3 train.py --x", "/opt/env/bin/python").unwrap(),
            "cd code && /opt/env/bin/python train.py --x"
        );
        assert!(replace_python("./run.sh", "/usr/bin/python3").is_err());
        assert_eq!(
            with_setup(
                argv(&["python3", "a b.py"]),
                Some(". /opt/env/bin/activate")
            ),
            CommandLine::Shell(". /opt/env/bin/activate\npython3 'a b.py'".into())
        );
    }

    #[test]
    fn torchrun_goes_right_after_the_interpreter() {
        let t = TorchRun {
            nproc_per_node: 2,
            nnodes: 3,
            node_rank: 1,
            master_addr: "10.0.0.1".into(),
            master_port: "1234".into(),
        };
        let args = "-m torch.distributed.run --nproc_per_node=2 --nnodes=3 --node_rank=1 \
                    --master_addr=10.0.0.1 --master_port=1234";
        assert_eq!(
            wrap_torchrun("cd code && python3.11 train.py --x python3", &t).unwrap(),
            format!("cd code && python3.11 {args} train.py --x python3")
        );
        assert_eq!(
            wrap_torchrun("/opt/py/bin/python train.py", &t).unwrap(),
            format!("/opt/py/bin/python {args} train.py")
        );
        assert!(wrap_torchrun("./train.sh", &t)
            .unwrap_err()
            .to_string()
            .contains("--trainer-mode direct"));
    }
}
