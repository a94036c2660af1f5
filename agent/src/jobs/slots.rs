//! Aggregate bounds: counted slots that are given back when dropped.
//!
//! A slot travels with what it pays for (a child's supervisor task, a Watch stream), so it is
//! released however that ends: exit, error, a client that goes away mid-stream.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::limits::{MAX_LIVE_PROCESSES, MAX_WATCHES, MAX_WATCHES_PER_JOB};

/// What the agent as a whole may hold at once (jobs are bounded by `limits::MAX_JOBS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AggregateLimits {
    /// Direct children not yet reaped, across all jobs.
    pub live_processes: usize,
    /// Open Watch streams, across all jobs.
    pub watches: usize,
    /// Open Watch streams of one job.
    pub watches_per_job: usize,
}

impl Default for AggregateLimits {
    fn default() -> Self {
        Self {
            live_processes: MAX_LIVE_PROCESSES,
            watches: MAX_WATCHES,
            watches_per_job: MAX_WATCHES_PER_JOB,
        }
    }
}

#[derive(Debug)]
pub struct Counter {
    used: AtomicUsize,
    limit: usize,
}

impl Counter {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    /// `n` slots, or None (nothing taken) when they would pass the limit.
    pub fn take(self: &Arc<Self>, n: usize) -> Option<Slots> {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                u.checked_add(n).filter(|&t| t <= self.limit)
            })
            .ok()?;
        Some(Slots {
            counter: self.clone(),
            n,
        })
    }
}

/// Slots of one counter, released on drop.
#[derive(Debug)]
pub struct Slots {
    counter: Arc<Counter>,
    n: usize,
}

impl Slots {
    /// Moves one slot out into a value of its own; None when none is left.
    pub fn split_one(&mut self) -> Option<Slots> {
        self.n = self.n.checked_sub(1)?;
        Some(Slots {
            counter: self.counter.clone(),
            n: 1,
        })
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        self.counter.used.fetch_sub(self.n, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_given_back_on_drop() {
        let c = Counter::new(3);
        let mut two = c.take(2).unwrap();
        assert!(c.take(2).is_none());
        let one = two.split_one().unwrap();
        let other = c.take(1).unwrap();
        assert_eq!(c.used(), 3);
        drop(two);
        assert_eq!(c.used(), 2);
        drop((one, other));
        assert_eq!(c.used(), 0);
        assert!(c.take(4).is_none());
    }
}
