//! One process as `/proc/<pid>/stat` describes it: the pid and start time that name it for
//! the life of the system, its parent, group and state.

use std::path::Path;

/// One process as `/proc/<pid>/stat` describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcEntry {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    /// The state letter: R, S, D, Z (zombie), T, X (dead), ...
    pub state: char,
    /// Start time in clock ticks after boot (field 22). With the pid it names one process for
    /// the life of the system: a pid may be reused, the pair never is.
    pub start: Option<u64>,
}

impl ProcEntry {
    /// A zombie has finished running; it only waits to be reaped, so it is not "left over".
    pub fn is_alive(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses the content of `/proc/<pid>/stat`: `pid (comm) state ppid pgrp ...`.
///
/// `comm` may contain spaces and parentheses, so the fields are taken after the *last* `)`.
pub fn parse_stat(text: &str) -> Option<ProcEntry> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text.get(..open)?.trim().parse().ok()?;
    let mut rest = text.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    let pgid = rest.next()?.parse().ok()?;
    // Fields 6..21 are not needed; starttime is field 22 (the 17th after pgrp).
    let start = rest.nth(16).and_then(|t| t.parse().ok());
    Some(ProcEntry {
        pid,
        ppid,
        pgid,
        state,
        start,
    })
}

/// Start time (clock ticks after boot) of `pid`, None when it is gone.
pub fn start_time(proc_root: &Path, pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    parse_stat(&text)?.start
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A live entry with no start time, for tests of what reads entries.
    pub(crate) fn p(pid: i32, ppid: i32, pgid: i32, state: char) -> ProcEntry {
        ProcEntry {
            pid,
            ppid,
            pgid,
            state,
            start: None,
        }
    }

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let e = parse_stat("1234 (python3) S 1 1234 1234 0 -1 4194560 100").unwrap();
        assert_eq!(e, p(1234, 1, 1234, 'S'));
        let e = parse_stat("77 (a) b (c)) Z 5 9 9 0").unwrap();
        assert_eq!(e, p(77, 5, 9, 'Z'));
        assert!(!e.is_alive());
        let full = "42 (x y) S 1 42 42 0 -1 4194560 9 0 0 0 3 1 0 0 20 0 1 0 987654 1000 20";
        assert_eq!(parse_stat(full).unwrap().start, Some(987654));
        let me = std::process::id() as i32;
        let mine = start_time(Path::new("/proc"), me).unwrap();
        assert_eq!(start_time(Path::new("/proc"), me), Some(mine));
        assert!(parse_stat("garbage").is_none());
        assert!(parse_stat("12 (x) S notanumber 3").is_none());
    }
}
