//! Bounds on what a request may ask of the agent, each defined once. Job requests are parsed
//! against them in `jobs::spec`, file requests in `files::request` and `jobs::preflight`.

use std::time::Duration;

/// PutFile streams served at once; more are refused, not queued.
pub const MAX_CONCURRENT_TRANSFERS: usize = 64;
/// Files one PrepareFiles may name.
pub const MAX_FILES_PER_PREPARE: usize = 100_000;
/// Files Preflight may read, and its free-port address length.
pub const MAX_PREFLIGHT_FILES: usize = 16;
/// Server ports Preflight looks up (DGL's `--num_servers` of one machine is a handful).
pub const MAX_PREFLIGHT_PORTS: usize = 256;
/// Files whose sizes Preflight reports (one machine's partition files).
pub const MAX_PREFLIGHT_SIZES: usize = 64;

/// Jobs an agent holds at once.
pub const MAX_JOBS: usize = 64;
/// Direct children an agent runs at once, across all jobs and Spawns.
pub const MAX_LIVE_PROCESSES: usize = 4096;
/// Watch streams an agent serves at once, and per job (a coordinator opens one per job and
/// agent, and another after each reconnect while the old one may linger half-open).
pub const MAX_WATCHES: usize = 256;
pub const MAX_WATCHES_PER_JOB: usize = 16;
/// Sessions (`dgl-coord rsh`) an agent runs at once; each is a job besides the `MAX_JOBS`.
pub const MAX_SESSIONS: usize = 64;
/// ReadLogs streams open at once (each holds a blocking-pool thread while it follows).
pub const MAX_LOG_READS: usize = 64;
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
