//! Bounds on what a request may ask of the agent, each defined once. Job requests are parsed
//! against them in `jobs::spec`; file requests are checked here before any work starts.

use std::time::Duration;

use dglrun_proto::pb;
use tonic::Status;

/// PutFile streams served at once; more are refused, not queued.
pub const MAX_CONCURRENT_TRANSFERS: usize = 64;
/// Files one PrepareFiles may name.
pub const MAX_FILES_PER_PREPARE: usize = 100_000;
/// Files Preflight may read, and its free-port address length.
pub const MAX_PREFLIGHT_FILES: usize = 16;

/// Jobs an agent holds at once.
pub const MAX_JOBS: usize = 64;
/// Direct children an agent runs at once, across all jobs and Spawns.
pub const MAX_LIVE_PROCESSES: usize = 4096;
/// Watch streams an agent serves at once, and per job (a coordinator opens one per job and
/// agent, and another after each reconnect while the old one may linger half-open).
pub const MAX_WATCHES: usize = 256;
pub const MAX_WATCHES_PER_JOB: usize = 16;
/// Processes one Spawn may start.
pub const MAX_PROCESSES_PER_SPAWN: usize = 1024;
/// Bytes of one process's argv as the kernel counts them (each string with its NUL), or of
/// its shell command: the kernel refuses a single string over 128 KiB anyway.
pub const MAX_ARGV_BYTES: usize = 128 << 10;
/// Bytes of the environment a Spawn adds to one process (`NAME=value` and a NUL each).
pub const MAX_ENV_BYTES: usize = 128 << 10;
pub const MAX_ENV_VARS: usize = 1024;
/// A process label or role.
pub const MAX_LABEL_BYTES: usize = 128;
pub const MAX_JOB_ID_BYTES: usize = 128;
/// A workspace or working directory path.
pub const MAX_PATH_BYTES: usize = 4096;
/// Shortest lease: below this a coordinator could not renew in time.
pub const MIN_LEASE: Duration = Duration::from_millis(200);
/// Longest lease a coordinator may ask for.
pub const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);
/// Longest grace a Stop may ask for.
pub const MAX_GRACE: Duration = Duration::from_secs(600);

fn too_big(what: &str, limit: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{what} exceeds the agent's limit of {limit}"))
}

pub fn check_prepare(req: &pb::PrepareFilesRequest) -> Result<(), Status> {
    if req.files.len() > MAX_FILES_PER_PREPARE {
        return Err(too_big("files in one request", MAX_FILES_PER_PREPARE));
    }
    for f in &req.files {
        check_manifest(f)?;
    }
    Ok(())
}

/// A manifest's chunk list must match its size, and every hash must be 32 bytes.
pub fn check_manifest(f: &pb::FileManifest) -> Result<(), Status> {
    let expected = dglrun_proto::digest::chunk_count(f.size);
    if f.chunk_hashes.len() != expected {
        return Err(Status::invalid_argument(format!(
            "{}: {} chunk hashes for {} bytes, expected {expected}",
            f.path,
            f.chunk_hashes.len(),
            f.size
        )));
    }
    if f.digest.len() != 32 || f.chunk_hashes.iter().any(|h| h.len() != 32) {
        return Err(Status::invalid_argument(format!(
            "{}: hashes must be 32 bytes",
            f.path
        )));
    }
    if f.mode & !0o7777 != 0 {
        return Err(Status::invalid_argument(format!(
            "{}: invalid mode {:o}",
            f.path, f.mode
        )));
    }
    Ok(())
}

pub fn check_preflight(req: &pb::PreflightRequest) -> Result<(), Status> {
    if req.read_files.len() > MAX_PREFLIGHT_FILES {
        return Err(too_big("files to read", MAX_PREFLIGHT_FILES));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_must_match_its_size() {
        let m = pb::FileManifest {
            path: "f".into(),
            size: 10,
            digest: vec![0; 32],
            chunk_hashes: vec![],
            mode: 0o644,
        };
        assert!(check_manifest(&m).is_err());
        let ok = pb::FileManifest {
            chunk_hashes: vec![vec![0; 32]],
            ..m
        };
        assert!(check_manifest(&ok).is_ok());
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn manifests_are_checked_without_panicking(size in 0u64..(1 << 40), n in 0usize..4, dlen in 0usize..40, mode in any::<u32>()) {
            let m = pb::FileManifest { path: "f".into(), size, digest: vec![0; dlen], chunk_hashes: vec![vec![0; 32]; n], mode };
            if check_manifest(&m).is_ok() {
                prop_assert_eq!(dglrun_proto::digest::chunk_count(size), n);
                prop_assert_eq!(dlen, 32);
            }
        }
    }
}
