//! Just enough of POSIX shell grammar to know which word of a command line is a command:
//! words (with quotes, escapes and substitutions kept inside them), control operators and
//! redirections, each with its byte range in the original text.

use std::ops::Range;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Token {
    /// A word; `value` has its quotes and backslashes removed (substitutions are kept as
    /// written, they are never a plain interpreter name).
    Word { range: Range<usize>, value: String },
    /// `&&`, `||`, `;`, `&`, `|`, `|&`, `(`, `)`, a newline: a new command starts after it.
    Control,
    /// `<`, `>`, `>>`, `2>`, `<&`, ...: the next word is a file name, not part of the command.
    Redirect,
}

/// Splits `s` into tokens. Unbalanced quotes end the text (the shell reports them at run time).
pub(crate) fn tokens(s: &str) -> Vec<Token> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' => i += 1,
            b'\n' | b';' | b'(' | b')' => {
                out.push(Token::Control);
                i += 1;
            }
            b'&' | b'|' => {
                // `&&`, `||`, `|&`, `&>` (a redirection in bash)
                if c == b'&' && b.get(i + 1) == Some(&b'>') {
                    out.push(Token::Redirect);
                    i += 2 + usize::from(b.get(i + 2) == Some(&b'>'));
                } else {
                    out.push(Token::Control);
                    i += 1 + usize::from(matches!(b.get(i + 1), Some(b'&' | b'|')));
                }
            }
            b'<' | b'>' => {
                out.push(Token::Redirect);
                i += 1;
                while matches!(b.get(i), Some(b'<' | b'>' | b'&' | b'|')) {
                    i += 1;
                }
            }
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            _ => {
                let start = i;
                let (end, value) = word(s, i);
                // `2>file`: digits straight before a redirection are its fd, not a word.
                if matches!(b.get(end), Some(b'<' | b'>'))
                    && value.bytes().all(|d| d.is_ascii_digit())
                {
                    i = end;
                    continue;
                }
                out.push(Token::Word {
                    range: start..end,
                    value,
                });
                i = end;
            }
        }
    }
    out
}

/// The word starting at byte `i`: where it ends and its unquoted value.
fn word(s: &str, mut i: usize) -> (usize, String) {
    let b = s.as_bytes();
    let mut value = String::new();
    while i < b.len() {
        match b[i] {
            b' ' | b'\t' | b'\n' | b';' | b'&' | b'|' | b'<' | b'>' | b'(' | b')' => break,
            b'\'' => {
                let end = s[i + 1..].find('\'').map_or(b.len(), |e| i + 1 + e);
                value.push_str(&s[i + 1..end]);
                i = (end + 1).min(b.len());
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    let ch = char_at(s, i);
                    value.push(ch);
                    i += ch.len_utf8();
                }
                i = (i + 1).min(b.len());
            }
            b'\\' => {
                i += 1;
                if i < b.len() {
                    let ch = char_at(s, i);
                    if ch != '\n' {
                        value.push(ch);
                    }
                    i += ch.len_utf8();
                }
            }
            b'$' if matches!(b.get(i + 1), Some(b'(' | b'{')) => {
                let end = balanced(s, i + 1);
                value.push_str(&s[i..end]);
                i = end;
            }
            b'`' => {
                let end = s[i + 1..].find('`').map_or(b.len(), |e| i + 2 + e);
                value.push_str(&s[i..end]);
                i = end;
            }
            _ => {
                let ch = char_at(s, i);
                value.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    (i, value)
}

/// The end of the bracketed group opening at byte `open` (`(` or `{`), nesting counted.
fn balanced(s: &str, open: usize) -> usize {
    let b = s.as_bytes();
    let (o, c) = if b[open] == b'(' {
        (b'(', b')')
    } else {
        (b'{', b'}')
    };
    let mut depth = 0usize;
    for (j, &x) in b.iter().enumerate().skip(open) {
        if x == o {
            depth += 1;
        } else if x == c {
            depth -= 1;
            if depth == 0 {
                return j + 1;
            }
        }
    }
    b.len()
}

fn char_at(s: &str, i: usize) -> char {
    s[i..].chars().next().unwrap_or('\0')
}

/// Words that keep the next word in command position, with their options that take a value.
fn precommand(word: &str) -> Option<&'static [&'static str]> {
    Some(match word {
        "env" => &["-u", "--unset", "-C", "--chdir", "-S", "--split-string"],
        "exec" => &["-a"],
        "nice" => &["-n", "--adjustment"],
        "nohup" | "command" | "builtin" | "time" | "stdbuf" => &["-i", "-o", "-e"],
        // Reserved words after which a command starts.
        "!" | "{" | "then" | "do" | "else" | "elif" | "if" | "while" | "until" => &[],
        _ => return None,
    })
}

/// `NAME=value` with a shell-style variable name.
pub(crate) fn is_assignment(word: &str) -> bool {
    word.split_once('=').is_some_and(|(name, _)| {
        let mut c = name.chars();
        matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
    })
}

/// The byte range and value of every word in command position: the first word of each simple
/// command after its assignments (`FOO=1`) and precommands (`env A=1`, `exec`, `nohup`, ...).
pub(crate) fn command_words(s: &str) -> Vec<(Range<usize>, String)> {
    let mut out = Vec::new();
    let mut at_command = true;
    // Some(options taking a value) while after a precommand such as `env`.
    let mut after: Option<&[&str]> = None;
    let mut skip_next = false;
    for t in tokens(s) {
        match t {
            Token::Control => {
                at_command = true;
                after = None;
                skip_next = false;
            }
            Token::Redirect => skip_next = true,
            Token::Word { range, value } => {
                if std::mem::take(&mut skip_next) || !at_command {
                    continue;
                }
                if let Some(opts) = after {
                    if value.starts_with('-') {
                        skip_next = opts.contains(&value.as_str());
                        continue;
                    }
                }
                if is_assignment(&value) {
                    continue;
                }
                if let Some(opts) = precommand(&value) {
                    after = Some(opts);
                    continue;
                }
                out.push((range, value));
                at_command = false;
                after = None;
            }
        }
    }
    out
}
