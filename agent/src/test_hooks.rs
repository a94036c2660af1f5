//! Faults that tests ask of a real agent through its environment. Inert unless the variable is
//! set; the agent's environment is its operator's, never a client's.

use std::sync::OnceLock;
use std::time::Duration;

/// Milliseconds every Spawn waits before it starts anything: a host whose Spawn is slow.
pub const SPAWN_DELAY_VAR: &str = "DGL_AGENT_TEST_SPAWN_DELAY_MS";
/// Longest delay honoured, so a stray setting cannot stall an agent for long.
const MAX_SPAWN_DELAY: Duration = Duration::from_secs(30);

fn spawn_delay() -> Option<Duration> {
    static DELAY: OnceLock<Option<Duration>> = OnceLock::new();
    *DELAY.get_or_init(|| {
        let ms: u64 = std::env::var(SPAWN_DELAY_VAR).ok()?.trim().parse().ok()?;
        let d = Duration::from_millis(ms).min(MAX_SPAWN_DELAY);
        tracing::warn!("{SPAWN_DELAY_VAR} is set: every Spawn waits {d:?} (a test setting)");
        Some(d)
    })
}

/// Called at the start of every Spawn.
pub async fn before_spawn() {
    if let Some(d) = spawn_delay() {
        tokio::time::sleep(d).await;
    }
}

/// Milliseconds (signed) added to the wall clock Hello reports: a host whose clock is off.
pub const CLOCK_OFFSET_VAR: &str = "DGL_AGENT_TEST_CLOCK_OFFSET_MS";
/// The version Hello reports instead of the agent's own: an agent of another release.
pub const VERSION_VAR: &str = "DGL_AGENT_TEST_VERSION";

/// `ms` moved by [`CLOCK_OFFSET_VAR`].
pub fn reported_clock(ms: u64) -> u64 {
    static OFFSET: OnceLock<i64> = OnceLock::new();
    let offset = *OFFSET.get_or_init(|| {
        let Some(o) = std::env::var(CLOCK_OFFSET_VAR)
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
        else {
            return 0;
        };
        tracing::warn!(
            "{CLOCK_OFFSET_VAR} is set: Hello reports a clock {o} ms off (a test setting)"
        );
        o
    });
    ms.saturating_add_signed(offset)
}

/// The version Hello reports.
pub fn reported_version() -> String {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION
        .get_or_init(|| match std::env::var(VERSION_VAR) {
            Ok(v) if !v.is_empty() => {
                tracing::warn!("{VERSION_VAR} is set: Hello reports version {v} (a test setting)");
                v
            }
            _ => dglrun_proto::VERSION.to_string(),
        })
        .clone()
}
