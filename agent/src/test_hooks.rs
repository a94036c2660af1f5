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
