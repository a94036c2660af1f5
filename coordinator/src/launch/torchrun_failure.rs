//! What torchrun says about a failed rank. torchrun exits 1 whatever its worker did and
//! prints the root cause as a `ChildFailedError` report on its stderr (torch's
//! `elastic/multiprocessing/errors`): the rank, its local rank, its exit code (negative for a
//! signal), its error file. That report is the only place a plain `sys.exit(7)` of a rank is
//! told (a rank writes an error file only from a `@record`-decorated entry point, and then
//! with its exception, never its exit code), so the trainer group's stderr is read for it.

/// The first observed failure of a torchrun's workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootCause {
    pub rank: u32,
    pub local_rank: u32,
    /// As torchrun reports it: the exit code, or minus the signal.
    pub exitcode: i32,
    /// The rank's error file, when it wrote one.
    pub error_file: Option<String>,
}

impl RootCause {
    /// The code dgl-coord exits with for it: the rank's code, or 128 + signal.
    pub fn exit_code(&self) -> u8 {
        match self.exitcode {
            c if c < 0 => (128 + c.unsigned_abs()).min(255) as u8,
            c => c.clamp(1, 255) as u8,
        }
    }

    /// One line: `rank 3 (local_rank 1) exited with code 7`.
    pub fn describe(&self) -> String {
        let how = if self.exitcode < 0 {
            format!("was killed by signal {}", self.exitcode.unsigned_abs())
        } else {
            format!("exited with code {}", self.exitcode)
        };
        let file = self
            .error_file
            .as_ref()
            .map_or(String::new(), |f| format!(" (its error file: {f})"));
        format!(
            "rank {} (local_rank {}) {how}{file}",
            self.rank, self.local_rank
        )
    }
}

/// Reads a torchrun's stderr line by line and keeps the root cause of its report.
#[derive(Debug, Default)]
pub struct Reader {
    in_root_cause: bool,
    rank: Option<(u32, u32)>,
    exitcode: Option<i32>,
    error_file: Option<String>,
    found: Option<RootCause>,
}

impl Reader {
    pub fn feed(&mut self, line: &str) {
        let line = line.trim();
        if line.starts_with("Root Cause (first observed failure)") {
            *self = Reader {
                in_root_cause: true,
                found: self.found.take(),
                ..Reader::default()
            };
            return;
        }
        if !self.in_root_cause {
            return;
        }
        let Some((key, value)) = line.split_once(':') else {
            if line.starts_with("====") {
                self.finish();
            }
            return;
        };
        let value = value.trim();
        match key.trim() {
            // `3 (local_rank: 1)`
            "rank" => {
                let rank = value.split_whitespace().next().and_then(|r| r.parse().ok());
                let local = value
                    .split_once("local_rank:")
                    .and_then(|(_, l)| l.trim().trim_end_matches(')').parse().ok());
                self.rank = rank.zip(local);
            }
            // `7 (pid: 1234)`
            "exitcode" => {
                self.exitcode = value.split_whitespace().next().and_then(|c| c.parse().ok());
            }
            "error_file" if value != "<N/A>" => self.error_file = Some(value.to_string()),
            _ => {}
        }
    }

    fn finish(&mut self) {
        self.in_root_cause = false;
        if let (Some((rank, local_rank)), Some(exitcode)) = (self.rank, self.exitcode) {
            self.found = Some(RootCause {
                rank,
                local_rank,
                exitcode,
                error_file: self.error_file.take(),
            });
        }
    }

    /// The root cause of the last complete report.
    pub fn root_cause(&self) -> Option<&RootCause> {
        self.found.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torch 2.x's report, as `torch.distributed.elastic.multiprocessing.errors` prints it.
    const REPORT: &str = "\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
============================================================
code/train_dist.py FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2024-05-01_12:00:01
  host      : node1
  rank      : 2 (local_rank: 0)
  exitcode  : -15 (pid: 4321)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 4321
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2024-05-01_12:00:00
  host      : node1
  rank      : 3 (local_rank: 1)
  exitcode  : 7 (pid: 1234)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================";

    fn read(text: &str) -> Option<RootCause> {
        let mut r = Reader::default();
        text.lines().for_each(|l| r.feed(l));
        r.root_cause().cloned()
    }

    #[test]
    fn the_root_cause_is_read_from_torchruns_report() {
        let c = read(REPORT).unwrap();
        assert_eq!((c.rank, c.local_rank, c.exitcode), (3, 1, 7));
        assert_eq!(c.exit_code(), 7);
        assert_eq!(c.describe(), "rank 3 (local_rank 1) exited with code 7");
        let signalled = REPORT
            .replace("exitcode  : 7 (pid: 1234)", "exitcode  : -11 (pid: 1234)")
            .replace(
                "error_file: <N/A>\n  traceback : To",
                "error_file: /tmp/x/error.json\n  traceback : To",
            );
        let c = read(&signalled).unwrap();
        assert_eq!(c.exit_code(), 139);
        assert_eq!(c.error_file.as_deref(), Some("/tmp/x/error.json"));
        assert!(c.describe().contains("killed by signal 11"));
        assert_eq!(
            read("Traceback (most recent call last):\nexitcode : 3"),
            None
        );
        // A report cut before its end says nothing.
        assert_eq!(read(&REPORT[..REPORT.len() - 61]), None);
    }
}
