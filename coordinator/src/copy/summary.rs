//! The outcome of a copy: per host and per file, as a table for people and JSON for scripts.

use std::fmt::Write;

use indicatif::HumanBytes;
use serde::Serialize;

use super::hashing::HashStats;
use super::reader::Compression;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileOutcome {
    /// Sent (whole or resumed) and verified by the agent.
    Sent,
    /// Already on the host with the same size and digest.
    Skipped,
    Failed,
    /// Not complete when the copy was interrupted. What the host verified of it is kept (a
    /// partial file) when `wire_bytes` or `resumed_from` is above 0; a rerun resumes there.
    Interrupted,
}

#[derive(Clone, Debug, Serialize)]
pub struct FileReport {
    /// Path on the host (relative to the agent's root unless the workspace is absolute).
    pub path: String,
    pub status: FileOutcome,
    pub size: u64,
    /// Bytes sent in this run (less than `size` when a transfer resumed).
    pub bytes_sent: u64,
    /// What that took on the wire: chunk bytes as sent (compressed or not), every attempt
    /// included, so a retried transfer counts what it sent again.
    pub wire_bytes: u64,
    /// Where the last attempt started: > 0 when it resumed a partial file.
    pub resumed_from: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct HostReport {
    /// The machine's rank: its line in ip_config, from 0 (as `status` names it).
    pub machine: usize,
    /// The agent's address, `ip:port`.
    pub address: String,
    pub files_sent: usize,
    pub files_skipped: usize,
    pub files_failed: usize,
    pub bytes_sent: u64,
    /// The sum of the files' `wire_bytes`.
    pub wire_bytes: u64,
    pub seconds: f64,
    pub bytes_per_second: f64,
    /// Problems of the host as a whole (unreachable, not verified).
    pub errors: Vec<String>,
    pub files: Vec<FileReport>,
}

impl HostReport {
    pub fn name(&self) -> String {
        format!("m{} ({})", self.machine, self.address)
    }

    pub fn ok(&self) -> bool {
        self.files_failed == 0
            && self.errors.is_empty()
            && self
                .files
                .iter()
                .all(|f| f.status != FileOutcome::Interrupted)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LaunchHint {
    pub workspace: String,
    pub part_config: String,
    pub ip_config: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct CopyReport {
    /// True only if every host verified every file.
    pub ok: bool,
    /// Stopped by Ctrl-C (SIGINT) while sending: see [`CopyReport::kept`].
    pub interrupted: bool,
    pub hosts: Vec<HostReport>,
    pub bytes_sent: u64,
    /// Chunk bytes put on the wire for `bytes_sent` (see `FileReport::wire_bytes`).
    pub wire_bytes: u64,
    /// How chunks travelled: "none" or "zstd" in JSON.
    pub compression: Compression,
    pub seconds: f64,
    pub hashing: HashStats,
    /// The values to pass to `dgl-coord launch`.
    pub launch: LaunchHint,
}

impl CopyReport {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// After an interruption: what each host kept, and that a rerun resumes.
    pub fn kept(&self) -> String {
        let mut out = String::from("copy interrupted: nothing more is sent\n");
        for h in &self.hosts {
            let complete = h
                .files
                .iter()
                .filter(|f| matches!(f.status, FileOutcome::Sent | FileOutcome::Skipped))
                .count();
            let _ = write!(
                out,
                "{}: {complete} of {} files complete",
                h.name(),
                h.files.len()
            );
            let partial: Vec<&str> = h
                .files
                .iter()
                .filter(|f| {
                    f.status == FileOutcome::Interrupted && (f.wire_bytes > 0 || f.resumed_from > 0)
                })
                .map(|f| f.path.as_str())
                .collect();
            if !partial.is_empty() {
                let _ = write!(out, "; kept partial: {}", partial.join(", "));
            }
            out.push('\n');
        }
        out.push_str(
            "rerun the same command to resume: complete files are skipped, partial ones \
             continue from their last verified chunk\n",
        );
        out
    }

    /// The table printed at the end of a copy.
    pub fn to_human(&self) -> String {
        let mut out = self.table();
        self.write_errors(&mut out);
        if self.ok {
            self.write_success(&mut out);
        } else {
            let bad = self.hosts.iter().filter(|h| !h.ok()).count();
            let _ = writeln!(out, "copy failed on {bad} of {} hosts", self.hosts.len());
        }
        out
    }

    /// One line per host; the wire column only when compressed (otherwise it would repeat
    /// `bytes`).
    fn table(&self) -> String {
        let mut out = String::new();
        let width = self
            .hosts
            .iter()
            .map(|h| h.name().len())
            .max()
            .unwrap_or(4)
            .max(4);
        let compressed = self.compression != Compression::None;
        let wire = |text: String| {
            if compressed {
                format!("  {text:>11}")
            } else {
                String::new()
            }
        };
        let _ = writeln!(
            out,
            "{:width$}  {:>6}  {:>7}  {:>6}  {:>11}{}  {:>8}  {:>12}",
            "host",
            "sent",
            "skipped",
            "failed",
            "bytes",
            wire("on the wire".into()),
            "time",
            "rate"
        );
        for h in &self.hosts {
            let _ = writeln!(
                out,
                "{:width$}  {:>6}  {:>7}  {:>6}  {:>11}{}  {:>7.2}s  {:>10}/s",
                h.name(),
                h.files_sent,
                h.files_skipped,
                h.files_failed,
                HumanBytes(h.bytes_sent).to_string(),
                wire(HumanBytes(h.wire_bytes).to_string()),
                h.seconds,
                HumanBytes(h.bytes_per_second as u64).to_string(),
            );
        }
        out
    }

    /// Every host problem and failed file, one line each.
    fn write_errors(&self, out: &mut String) {
        for h in self.hosts.iter().filter(|h| !h.ok()) {
            for e in &h.errors {
                let _ = writeln!(out, "error: {}: {e}", h.name());
            }
            for f in h.files.iter().filter(|f| f.status == FileOutcome::Failed) {
                let why = f.error.as_deref().unwrap_or("failed");
                let _ = writeln!(out, "error: {}: {}: {why}", h.name(), f.path);
            }
        }
    }

    /// What was verified, and the flags to launch with.
    fn write_success(&self, out: &mut String) {
        let files: usize = self.hosts.iter().map(|h| h.files.len()).sum();
        let on_wire = if self.compression != Compression::None {
            format!(
                ", {} on the wire with {}",
                HumanBytes(self.wire_bytes),
                self.compression.name()
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "all {} hosts verified all {files} files ({} sent in {:.2}s{on_wire})",
            self.hosts.len(),
            HumanBytes(self.bytes_sent),
            self.seconds
        );
        let _ = writeln!(
            out,
            "launch with: dgl-coord launch --workspace {} --part_config {} --ip_config {} ...",
            // Shell-quoted: the hint is for pasting.
            crate::launch::command::quote(&self.launch.workspace),
            crate::launch::command::quote(&self.launch.part_config),
            crate::launch::command::quote(&self.launch.ip_config)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(compression: Compression) -> CopyReport {
        let file = |path: &str, bytes_sent, wire_bytes| FileReport {
            path: path.into(),
            status: FileOutcome::Sent,
            size: bytes_sent,
            bytes_sent,
            wire_bytes,
            resumed_from: 0,
            error: None,
        };
        let (bytes_sent, wire_bytes) = (8 << 20, 2 << 20);
        CopyReport {
            ok: true,
            interrupted: false,
            hosts: vec![HostReport {
                machine: 0,
                address: "10.0.0.1:47001".into(),
                files_sent: 2,
                files_skipped: 0,
                files_failed: 0,
                bytes_sent,
                wire_bytes,
                seconds: 1.0,
                bytes_per_second: bytes_sent as f64,
                errors: vec![],
                files: vec![file("ws/a", 4 << 20, 4 << 20), file("ws/b", 4 << 20, 0)],
            }],
            bytes_sent,
            wire_bytes,
            compression,
            seconds: 1.0,
            hashing: HashStats::default(),
            launch: LaunchHint {
                workspace: "ws".into(),
                part_config: "data/g.json".into(),
                ip_config: "ip_config.txt".into(),
            },
        }
    }

    #[test]
    fn a_host_is_named_with_the_keys_status_uses() {
        let copy = serde_json::to_value(report(Compression::None)).unwrap();
        let status = serde_json::to_value(crate::ops::HostStatus {
            machine: 0,
            address: "10.0.0.1:47001".into(),
            reachable: true,
            error: None,
            agent: None,
            jobs: vec![],
        })
        .unwrap();
        let host = &copy["hosts"][0];
        for key in ["machine", "address"] {
            assert_eq!(host[key], status[key], "{key} in {host}");
        }
        assert!(
            host.get("rank").is_none() && host.get("addr").is_none(),
            "{host}"
        );
    }

    #[test]
    fn wire_bytes_are_shown_only_when_compressed() {
        let text = report(Compression::Zstd { level: 3 }).to_human();
        assert!(text.contains("on the wire"), "{text}");
        assert!(text.contains("8.00 MiB     2.00 MiB"), "{text}");
        assert!(text.contains("2.00 MiB on the wire with zstd"), "{text}");
        let text = report(Compression::None).to_human();
        assert!(!text.contains("on the wire"), "{text}");
        let json: serde_json::Value =
            serde_json::from_str(&report(Compression::Zstd { level: 3 }).to_json()).unwrap();
        assert_eq!(json["wire_bytes"], 2 << 20);
        assert_eq!(json["compression"], "zstd");
        assert_eq!(json["hosts"][0]["wire_bytes"], 2 << 20);
        assert_eq!(json["hosts"][0]["files"][1]["wire_bytes"], 0);
    }

    /// The report as a user reads it: a host that got everything (one file resumed, one
    /// already there) and one that failed.
    #[test]
    fn copy_report_snapshot() {
        let mut r = report(Compression::None);
        r.hosts[0].files[1].status = FileOutcome::Skipped;
        r.hosts[0].files[0].resumed_from = 1 << 20;
        r.hosts[0].files_sent = 1;
        r.hosts[0].files_skipped = 1;
        r.hosts.push(HostReport {
            machine: 1,
            address: "10.0.0.2:47001".into(),
            files_sent: 0,
            files_skipped: 0,
            files_failed: 1,
            bytes_sent: 0,
            wire_bytes: 0,
            seconds: 30.0,
            bytes_per_second: 0.0,
            errors: vec!["cannot reach the agent: connection refused".into()],
            files: vec![FileReport {
                path: "ws/a".into(),
                status: FileOutcome::Failed,
                size: 4 << 20,
                bytes_sent: 0,
                wire_bytes: 0,
                resumed_from: 0,
                error: Some("connection refused".into()),
            }],
        });
        r.ok = false;
        insta::assert_snapshot!(r.to_human());
    }
}
