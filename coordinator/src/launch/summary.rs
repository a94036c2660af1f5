//! The end of a launch: exit statuses, the exit code, and the summary table.

use std::time::Duration;

use dglrun_proto::pb::ProcessExited;

/// How one process of the plan ended, for the table.
#[derive(Clone, Debug)]
pub struct Row {
    pub host: String,
    pub process: String,
    pub pid: Option<u32>,
    pub exit: Option<ProcessExited>,
    pub started: bool,
}

pub fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {sig}"))
}

/// A process ended badly on its own: non-zero exit or a signal it was not sent by dglrun.
pub fn is_failure(e: &ProcessExited) -> bool {
    !e.stopped_by_agent && (e.code != 0 || e.signal != 0)
}

/// The exit code srun would give for this process: its code, or 128+signal.
pub fn exit_code(e: &ProcessExited) -> u8 {
    if e.signal != 0 {
        (128 + e.signal).clamp(0, 255) as u8
    } else {
        e.code.clamp(0, 255) as u8
    }
}

pub fn status_text(e: &ProcessExited) -> String {
    let what = if e.signal != 0 {
        format!("killed by {}", signal_name(e.signal))
    } else if e.code == -1 {
        "exit status unknown".to_string()
    } else {
        format!("exit {}", e.code)
    };
    if e.stopped_by_agent {
        format!("stopped ({what})")
    } else {
        what
    }
}

fn runtime_text(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        let t = d.as_secs();
        format!("{}m{:02}s", t / 60, t % 60)
    }
}

/// The STATUS column of a row.
pub fn row_status(r: &Row) -> String {
    match (&r.exit, r.started) {
        (Some(e), _) => status_text(e),
        (None, true) => "no exit reported".to_string(),
        (None, false) => "not started".to_string(),
    }
}

/// The table, columns aligned.
pub fn render(rows: &[Row]) -> String {
    let mut cells = vec![[
        "HOST".to_string(),
        "PROCESS".to_string(),
        "PID".to_string(),
        "STATUS".to_string(),
        "RUNTIME".to_string(),
    ]];
    for r in rows {
        let status = row_status(r);
        let runtime = r.exit.as_ref().map_or("-".to_string(), |e| {
            runtime_text(Duration::from_millis(e.runtime_ms))
        });
        cells.push([
            r.host.clone(),
            r.process.clone(),
            r.pid.map_or("-".to_string(), |p| p.to_string()),
            status,
            runtime,
        ]);
    }
    let mut widths = [0usize; 5];
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for row in &cells {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(code: i32, signal: i32, stopped: bool) -> ProcessExited {
        ProcessExited {
            index: 0,
            code,
            signal,
            runtime_ms: 1500,
            stopped_by_agent: stopped,
        }
    }

    #[test]
    fn exit_codes_follow_srun() {
        assert_eq!(exit_code(&ex(3, 0, false)), 3);
        assert_eq!(exit_code(&ex(-1, 9, false)), 137);
        assert_eq!(exit_code(&ex(-1, 15, true)), 143);
        assert!(is_failure(&ex(1, 0, false)));
        assert!(is_failure(&ex(-1, 11, false)));
        assert!(!is_failure(&ex(-1, 15, true)));
        assert!(!is_failure(&ex(0, 0, false)));
    }

    #[test]
    fn table_is_aligned_and_says_what_happened() {
        let rows = vec![
            Row {
                host: "m0 (127.0.0.1)".into(),
                process: "server0".into(),
                pid: Some(42),
                exit: Some(ex(-1, 15, true)),
                started: true,
            },
            Row {
                host: "m1 (127.0.0.2)".into(),
                process: "trainer1".into(),
                pid: None,
                exit: None,
                started: false,
            },
        ];
        let t = render(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "HOST            PROCESS   PID  STATUS                       RUNTIME"
        );
        assert_eq!(
            lines[1],
            "m0 (127.0.0.1)  server0   42   stopped (killed by SIGTERM)  1.5s"
        );
        assert!(lines[2].contains("not started"));
    }

    /// Every kind of row the table shows, as a user reads it.
    #[test]
    fn summary_table_snapshot() {
        let row = |host: &str, process: &str, pid, exit, started| Row {
            host: host.into(),
            process: process.into(),
            pid,
            exit,
            started,
        };
        let long = ProcessExited {
            runtime_ms: 754_000,
            ..ex(0, 0, false)
        };
        let rows = vec![
            row(
                "m0 (10.0.0.1)",
                "server0",
                Some(4101),
                Some(ex(-1, 15, true)),
                true,
            ),
            row("m0 (10.0.0.1)", "trainer0", Some(4102), Some(long), true),
            row(
                "m1 (10.0.0.2)",
                "server1",
                Some(977),
                Some(ex(-1, 9, false)),
                true,
            ),
            row(
                "m1 (10.0.0.2)",
                "trainer1",
                Some(978),
                Some(ex(3, 0, false)),
                true,
            ),
            row(
                "m2 (10.0.0.3)",
                "trainer2",
                Some(12),
                Some(ex(-1, 0, false)),
                true,
            ),
            row("m2 (10.0.0.3)", "trainer3", Some(13), None, true),
            row("m3 (10.0.0.4)", "trainer4", None, None, false),
        ];
        insta::assert_snapshot!(render(&rows));
    }
}
