//! Waits before trying again: copy's retries of a dropped stream and launch's restarts of a
//! failed job. Pure: the caller passes the random draw.

use std::time::Duration;

/// Exponential backoff with a cap and jitter: attempt `n` waits between half and all of
/// `min(cap, first * 2^n)`. The jitter keeps hosts that lost the same link from all coming
/// back in the same instant; the half kept fixed still gives an agent time to restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// The wait before retry `attempt` (0 for the first retry); `draw` in [0, 1] picks where
    /// in the jitter range it falls.
    pub fn delay(&self, attempt: u32, draw: f64) -> Duration {
        let full = self
            .first
            .checked_mul(2u32.saturating_pow(attempt))
            .unwrap_or(Duration::MAX)
            .min(self.cap);
        full.mul_f64(0.5 + 0.5 * draw.clamp(0.0, 1.0))
    }
}
