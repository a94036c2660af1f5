//! What each host ends a copy with: reports that start from what the agents already have,
//! take in what each transfer delivered and what the final check found, and are counted.
//!
//! Pure: the sender hands in the agents' answers; nothing here talks to a host.

use dglrun_proto::pb::{self, FileStatus};
use indicatif::HumanBytes;

use super::plan::CopyPlan;
use super::summary::{FileOutcome, FileReport, HostReport};

/// One file for one host: where it resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) host: usize,
    pub(super) file: usize,
    pub(super) offset: u64,
}

/// What one transfer of one file to one host came to.
#[derive(Debug)]
pub(super) struct Delivered {
    pub(super) host: usize,
    pub(super) file: usize,
    pub(super) result: Result<u64, String>,
    pub(super) resumed_from: u64,
    /// Chunk bytes handed to the connection, every attempt included.
    pub(super) wire_bytes: u64,
    /// Stopped by Ctrl-C before it completed.
    pub(super) interrupted: bool,
}

impl Delivered {
    /// `t`, failed before anything was sent.
    pub(super) fn failed(t: &Target, why: String) -> Self {
        Self {
            host: t.host,
            file: t.file,
            result: Err(why),
            resumed_from: t.offset,
            wire_bytes: 0,
            interrupted: false,
        }
    }

    /// `t`, stopped by Ctrl-C before anything was sent.
    pub(super) fn interrupted(t: &Target) -> Self {
        Self {
            interrupted: true,
            ..Self::failed(t, "interrupted".into())
        }
    }
}

/// Where a host identifies itself in its report.
pub(super) struct HostId {
    pub(super) machine: usize,
    pub(super) address: String,
}

/// The bytes a host lacks, and the refusal when its free disk cannot hold them.
pub(super) fn room_error(
    host: &str,
    root: &str,
    manifests: &[pb::FileManifest],
    states: &[pb::FileState],
    free: u64,
) -> Option<String> {
    let need: u64 = manifests
        .iter()
        .zip(states)
        .filter(|(_, s)| s.status == FileStatus::Send as i32)
        .map(|(m, s)| m.size.saturating_sub(s.resume_offset))
        .sum();
    (need > free).then(|| {
        format!(
            "{host}: not enough free disk: {} to send, {} free under {root}",
            HumanBytes(need),
            HumanBytes(free)
        )
    })
}

/// The reports before sending (files present are skipped, the rest failed until delivered),
/// what is to be sent grouped by source, and its total bytes.
pub(super) fn start(
    plan: &CopyPlan,
    hosts: Vec<HostId>,
    states: &[Vec<pb::FileState>],
    sizes: &[u64],
) -> (Vec<HostReport>, Vec<Vec<Target>>, u64) {
    let mut reports: Vec<HostReport> = hosts.into_iter().map(empty_report).collect();
    let mut by_source: Vec<Vec<Target>> = vec![Vec::new(); plan.sources.len()];
    let mut total = 0u64;
    for (hi, m) in plan.machines.iter().enumerate() {
        for (fi, (f, st)) in m.files.iter().zip(&states[hi]).enumerate() {
            let size = sizes[f.source];
            let present = st.status == FileStatus::Present as i32;
            reports[hi].files.push(FileReport {
                path: f.remote.clone(),
                status: if present {
                    FileOutcome::Skipped
                } else {
                    FileOutcome::Failed
                },
                size,
                bytes_sent: 0,
                wire_bytes: 0,
                resumed_from: 0,
                error: None,
            });
            if !present {
                let offset = st.resume_offset.min(size);
                total += size - offset;
                by_source[f.source].push(Target {
                    host: hi,
                    file: fi,
                    offset,
                });
            }
        }
    }
    (reports, by_source, total)
}

fn empty_report(h: HostId) -> HostReport {
    HostReport {
        machine: h.machine,
        address: h.address,
        files_sent: 0,
        files_skipped: 0,
        files_failed: 0,
        bytes_sent: 0,
        wire_bytes: 0,
        seconds: 0.0,
        bytes_per_second: 0.0,
        errors: Vec::new(),
        files: Vec::new(),
    }
}

/// Takes in one delivery.
pub(super) fn record(reports: &mut [HostReport], d: Delivered) {
    let r = &mut reports[d.host].files[d.file];
    r.resumed_from = d.resumed_from;
    r.wire_bytes = d.wire_bytes;
    match d.result {
        _ if d.interrupted => r.status = FileOutcome::Interrupted,
        Ok(n) => {
            r.status = FileOutcome::Sent;
            r.bytes_sent = n;
        }
        Err(e) => r.error = Some(e),
    }
}

/// The files the final PrepareFiles asks about: those found present before sending, which must
/// still be. A file sent in this run needs no second look: the agent answered its PutFile only
/// once it had checked the digest, fsynced and renamed it. So a fresh copy ends without one
/// more round trip to every host.
pub(super) fn to_verify(files: &[FileReport]) -> Vec<usize> {
    (0..files.len())
        .filter(|&i| files[i].status == FileOutcome::Skipped)
        .collect()
}

/// Takes in the final PrepareFiles about `asked` (from [`to_verify`]): each must be present.
pub(super) fn check_present(files: &mut [FileReport], asked: &[usize], states: &[pb::FileState]) {
    for (&i, s) in asked.iter().zip(states) {
        let Some(f) = files.get_mut(i) else { continue };
        if f.status != FileOutcome::Failed && s.status != FileStatus::Present as i32 {
            f.status = FileOutcome::Failed;
            f.error = Some(format!(
                "not present on the host after the copy (status {})",
                s.status
            ));
        }
    }
}

/// Counts a host's files and bytes; `seconds` is when its last file was done.
pub(super) fn count(r: &mut HostReport, seconds: f64) {
    for f in r.files.iter_mut() {
        if f.status == FileOutcome::Failed && f.error.is_none() {
            f.error = Some("not sent".into());
        }
    }
    let with = |s| r.files.iter().filter(|f| f.status == s).count();
    (r.files_sent, r.files_skipped, r.files_failed) = (
        with(FileOutcome::Sent),
        with(FileOutcome::Skipped),
        with(FileOutcome::Failed),
    );
    r.bytes_sent = r.files.iter().map(|f| f.bytes_sent).sum();
    r.wire_bytes = r.files.iter().map(|f| f.wire_bytes).sum();
    r.seconds = seconds;
    r.bytes_per_second = if seconds > 0.0 {
        r.bytes_sent as f64 / seconds
    } else {
        0.0
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::plan::{Content, MachinePlan, Placement, Source};

    fn state(path: &str, status: FileStatus, resume_offset: u64) -> pb::FileState {
        pb::FileState {
            path: path.into(),
            status: status as i32,
            resume_offset,
        }
    }

    fn manifest(path: &str, size: u64) -> pb::FileManifest {
        pb::FileManifest {
            path: path.into(),
            size,
            ..Default::default()
        }
    }

    fn file(status: FileOutcome, bytes_sent: u64, error: Option<&str>) -> FileReport {
        FileReport {
            path: "ws/f".into(),
            status,
            size: 100,
            bytes_sent,
            wire_bytes: bytes_sent,
            resumed_from: 0,
            error: error.map(Into::into),
        }
    }

    fn host(files: Vec<FileReport>) -> HostReport {
        HostReport {
            files,
            ..empty_report(HostId {
                machine: 1,
                address: "10.0.0.2:47001".into(),
            })
        }
    }

    #[test]
    fn free_disk_must_hold_what_is_sent_not_what_is_present() {
        let ms = [manifest("a", 100), manifest("b", 50), manifest("c", 30)];
        // (states of a, b, c; free; refused)
        let table = [
            (
                [
                    (FileStatus::Send, 0),
                    (FileStatus::Send, 0),
                    (FileStatus::Present, 0),
                ],
                150,
                false,
            ),
            (
                [
                    (FileStatus::Send, 0),
                    (FileStatus::Send, 0),
                    (FileStatus::Present, 0),
                ],
                149,
                true,
            ),
            (
                [
                    (FileStatus::Send, 60),
                    (FileStatus::Present, 0),
                    (FileStatus::Send, 0),
                ],
                70,
                false,
            ),
            (
                [
                    (FileStatus::Send, 60),
                    (FileStatus::Present, 0),
                    (FileStatus::Send, 0),
                ],
                69,
                true,
            ),
            // A resume offset past the size needs nothing, not an underflow.
            (
                [
                    (FileStatus::Send, 900),
                    (FileStatus::Present, 0),
                    (FileStatus::Present, 0),
                ],
                0,
                false,
            ),
        ];
        for (st, free, refused) in table {
            let states: Vec<_> = st
                .iter()
                .zip(&ms)
                .map(|(&(s, o), m)| state(&m.path, s, o))
                .collect();
            let got = room_error("m1 (h)", "/srv", &ms, &states, free);
            assert_eq!(got.is_some(), refused, "{st:?} with {free} free: {got:?}");
            if let Some(e) = got {
                assert!(
                    e.starts_with("m1 (h): not enough free disk") && e.ends_with("/srv"),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn present_files_are_skipped_and_the_rest_grouped_by_source() {
        let place = |source, remote: &str| Placement {
            source,
            remote: remote.into(),
            mode: 0o644,
        };
        let machine = |rank, files| MachinePlan {
            rank,
            ip: "127.0.0.1".parse().unwrap(),
            files,
        };
        let src = |origin: &str| Source {
            origin: origin.into(),
            content: Content::Bytes(Vec::new()),
        };
        let plan = CopyPlan {
            sources: vec![src("ip_config"), src("part-1")],
            machines: vec![
                machine(0, vec![place(0, "ws/ip")]),
                machine(1, vec![place(0, "ws/ip"), place(1, "ws/part1/g")]),
            ],
            launch_part_config: String::new(),
            launch_ip_config: String::new(),
        };
        let states = vec![
            vec![state("ws/ip", FileStatus::Present, 0)],
            vec![
                state("ws/ip", FileStatus::Send, 0),
                state("ws/part1/g", FileStatus::Send, 4096),
            ],
        ];
        let ids = (0..2)
            .map(|i| HostId {
                machine: i,
                address: format!("127.0.0.{}:1", i + 1),
            })
            .collect();
        let (reports, by_source, total) = start(&plan, ids, &states, &[10, 10_000]);
        assert_eq!(total, 10 + 10_000 - 4096);
        assert_eq!(
            by_source[0],
            [Target {
                host: 1,
                file: 0,
                offset: 0
            }]
        );
        assert_eq!(
            by_source[1],
            [Target {
                host: 1,
                file: 1,
                offset: 4096
            }]
        );
        let statuses: Vec<Vec<FileOutcome>> = reports
            .iter()
            .map(|r| r.files.iter().map(|f| f.status).collect())
            .collect();
        assert_eq!(
            statuses,
            [
                vec![FileOutcome::Skipped],
                vec![FileOutcome::Failed, FileOutcome::Failed]
            ]
        );
        assert_eq!(reports[1].address, "127.0.0.2:1");
    }

    #[test]
    fn each_delivery_sets_its_file_outcome() {
        let t = Target {
            host: 0,
            file: 0,
            offset: 7,
        };
        let sent = Delivered {
            result: Ok(93),
            wire_bytes: 120,
            ..Delivered::failed(&t, String::new())
        };
        let interrupted_after_sending = Delivered {
            result: Ok(93),
            interrupted: true,
            ..Delivered::failed(&t, String::new())
        };
        // (delivery, status, bytes_sent, error)
        let table = [
            (sent, FileOutcome::Sent, 93, None),
            (
                Delivered::failed(&t, "refused".into()),
                FileOutcome::Failed,
                0,
                Some("refused"),
            ),
            (
                Delivered::interrupted(&t),
                FileOutcome::Interrupted,
                0,
                None,
            ),
            (interrupted_after_sending, FileOutcome::Interrupted, 0, None),
        ];
        for (d, status, bytes, error) in table {
            let mut reports = vec![host(vec![file(FileOutcome::Failed, 0, None)])];
            let why = format!("{d:?}");
            record(&mut reports, d);
            let f = &reports[0].files[0];
            assert_eq!(
                (f.status, f.bytes_sent, f.error.as_deref()),
                (status, bytes, error),
                "{why}"
            );
            assert_eq!(f.resumed_from, 7, "{why}");
        }
    }

    #[test]
    fn the_final_check_fails_what_the_host_does_not_have() {
        // (outcome before, status on the host, outcome after, error after)
        let table = [
            (
                FileOutcome::Sent,
                FileStatus::Present,
                FileOutcome::Sent,
                None,
            ),
            // Not asked: its PutFile's answer said it was written and verified.
            (FileOutcome::Sent, FileStatus::Send, FileOutcome::Sent, None),
            (
                FileOutcome::Skipped,
                FileStatus::Present,
                FileOutcome::Skipped,
                None,
            ),
            (
                FileOutcome::Skipped,
                FileStatus::Send,
                FileOutcome::Failed,
                Some("not present"),
            ),
            // Failed keeps its own reason.
            (
                FileOutcome::Failed,
                FileStatus::Send,
                FileOutcome::Failed,
                Some("refused"),
            ),
        ];
        for (before, on_host, after, error) in table {
            let err = (before == FileOutcome::Failed).then_some("refused");
            let mut files = vec![file(before, 0, err)];
            let asked = to_verify(&files);
            let states = vec![state("ws/f", on_host, 0); asked.len()];
            check_present(&mut files, &asked, &states);
            assert_eq!(files[0].status, after, "{before:?} / {on_host:?}");
            match error {
                None => assert_eq!(files[0].error, None),
                Some(e) => assert!(files[0].error.as_deref().is_some_and(|x| x.starts_with(e))),
            }
        }
    }

    #[test]
    fn a_host_is_counted_from_its_files() {
        // (files, sent, skipped, failed, bytes, seconds, rate)
        let table = [
            (vec![], 0, 0, 0, 0, 0.0, 0.0),
            (
                vec![
                    file(FileOutcome::Sent, 100, None),
                    file(FileOutcome::Skipped, 0, None),
                ],
                1,
                1,
                0,
                100,
                2.0,
                50.0,
            ),
            (
                vec![
                    file(FileOutcome::Failed, 0, None),
                    file(FileOutcome::Interrupted, 0, None),
                    file(FileOutcome::Sent, 40, None),
                ],
                1,
                0,
                1,
                40,
                0.0,
                0.0,
            ),
        ];
        for (files, sent, skipped, failed, bytes, seconds, rate) in table {
            let mut r = host(files);
            count(&mut r, seconds);
            assert_eq!(
                (
                    r.files_sent,
                    r.files_skipped,
                    r.files_failed,
                    r.bytes_sent,
                    r.wire_bytes
                ),
                (sent, skipped, failed, bytes, bytes)
            );
            assert_eq!((r.seconds, r.bytes_per_second), (seconds, rate));
            // A failed file always says why.
            for f in r.files.iter().filter(|f| f.status == FileOutcome::Failed) {
                assert_eq!(f.error.as_deref(), Some("not sent"));
            }
        }
    }
}
