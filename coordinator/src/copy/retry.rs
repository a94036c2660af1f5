//! When a failed transfer is tried again, and after how long.
//!
//! Pure: the caller passes the random draw, so every decision is testable as a table.

use std::time::Duration;

pub use crate::backoff::Backoff;
use dglrun_proto::busy;
use tonic::{Code, Status};

/// What to do after an attempt failed with a status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    Retry(Duration),
    GiveUp {
        text: String,
        /// The agent cannot be reached at all: the host's other files fail at once.
        unreachable: bool,
    },
}

/// The decision after attempt `attempt` (0 for the first) failed with `status`, `retries`
/// further attempts being allowed in all. A busy agent's own wait is a floor.
pub fn next(status: &Status, attempt: u32, retries: u32, backoff: &Backoff, draw: f64) -> Next {
    let text = status_text(status);
    if !retryable(status) {
        return Next::GiveUp {
            text,
            unreachable: false,
        };
    }
    if attempt >= retries {
        return Next::GiveUp {
            text: format!("{text} (gave up after {} attempts)", attempt + 1),
            unreachable: connection_lost(status),
        };
    }
    let wait = backoff.delay(attempt, draw);
    Next::Retry(wait.max(busy::retry_after(status).unwrap_or_default()))
}

/// Failures that another attempt may get past: the connection or the agent went away, or
/// the agent's state moved under us (a partial changed; re-preparing sorts it out).
pub fn retryable(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Cancelled
        | Code::Aborted
        | Code::DeadlineExceeded
        | Code::Internal
        | Code::FailedPrecondition
        // A chunk that failed its hash on the agent was damaged on the way: send it again.
        | Code::DataLoss => true,
        // The agent serves a bounded number of transfers and marks the refusal as busy; any
        // other exhaustion is a bound the request broke.
        Code::ResourceExhausted => busy::retry_after(s).is_some(),
        _ => false,
    }
}

/// The agent cannot be reached at all.
fn connection_lost(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

/// A status as one line: the agent's message, or the transport's cause.
pub fn status_text(s: &Status) -> String {
    let mut text = s.message().to_string();
    let mut cur = std::error::Error::source(s);
    while let Some(e) = cur {
        let part = e.to_string();
        if !text.contains(&part) {
            text = if text.is_empty() {
                part
            } else {
                format!("{text}: {part}")
            };
        }
        cur = e.source();
    }
    if text.is_empty() {
        format!("{:?}", s.code())
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn backoff() -> Backoff {
        Backoff {
            first: MS(500),
            cap: MS(10_000),
        }
    }

    #[test]
    fn delays_double_from_half_to_whole_and_stop_at_the_cap() {
        // (attempt, draw, wait)
        let table = [
            (0, 0.0, 250),
            (0, 1.0, 500),
            (0, 0.5, 375),
            (1, 1.0, 1_000),
            (3, 1.0, 4_000),
            (3, 0.0, 2_000),
            (5, 1.0, 10_000),
            (5, 0.0, 5_000),
            (20, 1.0, 10_000),
            (u32::MAX, 1.0, 10_000),
            // A draw out of range is clamped, never a longer wait than the cap.
            (9, 7.0, 10_000),
            (0, -1.0, 250),
        ];
        for (attempt, draw, want) in table {
            assert_eq!(
                backoff().delay(attempt, draw),
                MS(want),
                "attempt {attempt}, draw {draw}"
            );
        }
    }

    #[test]
    fn each_failure_is_retried_or_given_up_by_its_code() {
        let busy = busy::status("no room for another transfer", MS(7_000));
        // (status, attempt, retries, expected)
        let table: Vec<(Status, u32, u32, Next)> = vec![
            (Status::unavailable("refused"), 0, 5, Next::Retry(MS(500))),
            (Status::data_loss("chunk 3"), 2, 5, Next::Retry(MS(2_000))),
            (Status::aborted("moved"), 4, 5, Next::Retry(MS(8_000))),
            // The busy agent's wait is a floor over the backoff.
            (busy.clone(), 0, 5, Next::Retry(MS(7_000))),
            (
                Status::unavailable("refused"),
                5,
                5,
                Next::GiveUp {
                    text: "refused (gave up after 6 attempts)".into(),
                    unreachable: true,
                },
            ),
            (
                Status::data_loss("chunk 3"),
                1,
                1,
                Next::GiveUp {
                    text: "chunk 3 (gave up after 2 attempts)".into(),
                    unreachable: false,
                },
            ),
            (
                Status::permission_denied("outside the root"),
                0,
                5,
                Next::GiveUp {
                    text: "outside the root".into(),
                    unreachable: false,
                },
            ),
            (
                Status::resource_exhausted("the agent already serves 64 transfers"),
                0,
                5,
                Next::GiveUp {
                    text: "the agent already serves 64 transfers".into(),
                    unreachable: false,
                },
            ),
        ];
        for (status, attempt, retries, want) in table {
            assert_eq!(
                next(&status, attempt, retries, &backoff(), 1.0),
                want,
                "{status:?} at attempt {attempt} of {retries}"
            );
        }
    }

    #[test]
    fn busy_is_decided_by_its_code_not_its_words() {
        let busy = busy::status("no room for another transfer", MS(500));
        assert!(retryable(&busy));
        // A bound the request broke: the same code without the busy mark is final, whatever
        // its message says.
        assert!(!retryable(&Status::resource_exhausted(
            "the agent already serves 64 transfers; retry later"
        )));
    }
}
