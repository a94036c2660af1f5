//! `--log-dir DIR`: what a launch leaves on disk for later.
//!
//! - `m<machine>-<label>.out` and `.err`: one pair per started process, its lines as written;
//! - `launch.log`: the merged labelled log, what a terminal shows (both streams, dgl-coord's
//!   own messages, the summary table);
//! - `events.jsonl`: the `--json` event stream;
//! - `summary.txt` and `summary.json`: the summary, as text and as the `summary` event.
//!
//! Files are buffered and flushed about once a second and at the end. A write error (full
//! disk) never stops the job: it is reported once and the log dir is given up.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

type Out = BufWriter<File>;

pub struct LogDir {
    dir: PathBuf,
    merged: Out,
    events: Out,
    /// (machine, label) -> (.out, .err)
    procs: HashMap<(usize, String), (Out, Out)>,
}

fn create(path: &Path) -> std::io::Result<Out> {
    File::create(path).map(BufWriter::new)
}

/// `m1-server0`: labels are dglrun's own (`server0`, `trainer1`, `trainers`), but a label
/// seen only through an agent is sanitized anyway so it can never name another path.
pub fn stem(machine: usize, label: &str) -> String {
    let safe: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("m{machine}-{safe}")
}

impl LogDir {
    /// Creates DIR (and parents) and the merged files; earlier files of the same names are
    /// replaced. Fails before anything starts when DIR cannot be written.
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create --log-dir {}", dir.display()))?;
        let open = |name: &str| {
            let p = dir.join(name);
            create(&p).with_context(|| format!("cannot write {}", p.display()))
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            merged: open("launch.log")?,
            events: open("events.jsonl")?,
            procs: HashMap::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn proc_files(&mut self, machine: usize, label: &str) -> std::io::Result<&mut (Out, Out)> {
        let key = (machine, label.to_string());
        if !self.procs.contains_key(&key) {
            let s = stem(machine, label);
            let out = create(&self.dir.join(format!("{s}.out")))?;
            let err = create(&self.dir.join(format!("{s}.err")))?;
            self.procs.insert(key.clone(), (out, err));
        }
        self.procs
            .get_mut(&key)
            .ok_or_else(|| std::io::Error::other("log files vanished"))
    }

    /// A process started: its two files exist from now on, even if it never writes.
    pub fn started(&mut self, machine: usize, label: &str) -> std::io::Result<()> {
        self.proc_files(machine, label).map(|_| ())
    }

    /// One line of a process: into its own file, and labelled into the merged log.
    pub fn line(
        &mut self,
        machine: usize,
        label: &str,
        stderr: bool,
        labelled: &[u8],
        text: &[u8],
    ) -> std::io::Result<()> {
        let (out, err) = self.proc_files(machine, label)?;
        let f = if stderr { err } else { out };
        f.write_all(text)?;
        f.write_all(b"\n")?;
        self.merged.write_all(labelled)
    }

    /// Text for the merged log only (dgl-coord's messages, the summary table).
    pub fn merged(&mut self, text: &[u8]) -> std::io::Result<()> {
        self.merged.write_all(text)
    }

    pub fn event(&mut self, line: &str) -> std::io::Result<()> {
        self.events.write_all(line.as_bytes())?;
        self.events.write_all(b"\n")
    }

    /// `summary.txt` and `summary.json`, written whole.
    pub fn summary(&mut self, text: &str, json: &str) -> std::io::Result<()> {
        std::fs::write(self.dir.join("summary.txt"), text)?;
        std::fs::write(self.dir.join("summary.json"), format!("{json}\n"))
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.merged.flush()?;
        self.events.flush()?;
        for (out, err) in self.procs.values_mut() {
            out.flush()?;
            err.flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_never_leave_the_directory() {
        assert_eq!(stem(0, "server0"), "m0-server0");
        assert_eq!(stem(2, "trainers"), "m2-trainers");
        assert_eq!(stem(1, "../x/y"), "m1-___x_y");
        assert_eq!(stem(1, "#3"), "m1-_3");
    }

    #[test]
    fn files_hold_what_was_written() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("logs/run1");
        let mut l = LogDir::create(&dir).unwrap();
        l.started(0, "server0").unwrap();
        l.line(1, "trainer0", false, b"[m1 trainer0] hi\n", b"hi")
            .unwrap();
        l.line(1, "trainer0", true, b"[m1 trainer0] oops\n", b"oops")
            .unwrap();
        l.merged(b"dgl-coord: note\n").unwrap();
        l.event("{\"event\":\"x\"}").unwrap();
        l.summary("table\n", "{}").unwrap();
        l.flush().unwrap();
        let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
        assert_eq!(read("m0-server0.out"), "");
        assert_eq!(read("m0-server0.err"), "");
        assert_eq!(read("m1-trainer0.out"), "hi\n");
        assert_eq!(read("m1-trainer0.err"), "oops\n");
        assert_eq!(
            read("launch.log"),
            "[m1 trainer0] hi\n[m1 trainer0] oops\ndgl-coord: note\n"
        );
        assert_eq!(read("events.jsonl"), "{\"event\":\"x\"}\n");
        assert_eq!(read("summary.txt"), "table\n");
        assert_eq!(read("summary.json"), "{}\n");
    }
}
