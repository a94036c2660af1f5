//! Whether a finished attempt starts the job again, and after how long. Pure: the random
//! draw of the backoff's jitter is passed in.

use std::time::Duration;

use super::state::Reason;
use crate::backoff::Backoff;

/// Python's (and DGL's argparse's) exit code for a usage error: the same command would fail
/// the same way again, so it does not restart by default.
pub const USAGE_ERROR_EXIT: u8 = 2;

/// The longest wait between attempts, whatever `--restart-backoff` asks for first.
const BACKOFF_CAP: Duration = Duration::from_secs(300);

/// `--max-restarts`, `--restart-backoff`, `--restart-on`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restarts allowed after the first attempt; 0: none.
    pub max_restarts: u32,
    /// The wait before the first restart; it doubles for each further one.
    pub first_backoff: Duration,
    /// Only failures with these exit codes restart; None: every failure but a usage error.
    pub restart_on: Option<Vec<u8>>,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 0,
            first_backoff: Duration::from_secs(1),
            restart_on: None,
        }
    }
}

impl RestartPolicy {
    fn backoff(&self) -> Backoff {
        Backoff {
            first: self.first_backoff,
            cap: BACKOFF_CAP.max(self.first_backoff),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// The job ends here.
    Finish,
    /// It would restart, but every allowed restart was used.
    Exhausted,
    /// Start the whole job again after this wait.
    Restart(Duration),
}

/// After an attempt that ended for `reason` with dgl-coord's exit code `code`, `done`
/// restarts having happened before it.
pub(crate) fn decide(
    policy: &RestartPolicy,
    reason: Option<&Reason>,
    code: u8,
    done: u32,
    draw: f64,
) -> Decision {
    let failure = match reason {
        // A user's Ctrl-C or `dgl-coord kill` means stop, and success needs nothing more.
        None | Some(Reason::Success | Reason::Signal(_) | Reason::StoppedBy { .. }) => false,
        Some(
            Reason::Failed { .. }
            | Reason::SpawnFailed { .. }
            | Reason::Lost { .. }
            | Reason::Stalled { .. }
            | Reason::StartTimeout { .. },
        ) => true,
    };
    let wanted = match &policy.restart_on {
        Some(codes) => codes.contains(&code),
        None => code != USAGE_ERROR_EXIT,
    };
    if policy.max_restarts == 0 || !failure || !wanted {
        Decision::Finish
    } else if done >= policy.max_restarts {
        Decision::Exhausted
    } else {
        Decision::Restart(policy.backoff().delay(done, draw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> Reason {
        Reason::Failed {
            host: 0,
            label: "trainer0".into(),
        }
    }

    fn policy(max: u32, on: Option<Vec<u8>>) -> RestartPolicy {
        RestartPolicy {
            max_restarts: max,
            first_backoff: Duration::from_secs(2),
            restart_on: on,
        }
    }

    #[test]
    fn failures_restart_until_the_limit_with_a_growing_wait() {
        let p = policy(2, None);
        let r = failed();
        assert_eq!(
            decide(&p, Some(&r), 3, 0, 1.0),
            Decision::Restart(Duration::from_secs(2))
        );
        assert_eq!(
            decide(&p, Some(&r), 137, 1, 0.0),
            Decision::Restart(Duration::from_secs(2))
        );
        assert_eq!(
            decide(&p, Some(&r), 137, 1, 1.0),
            Decision::Restart(Duration::from_secs(4))
        );
        assert_eq!(decide(&p, Some(&r), 3, 2, 1.0), Decision::Exhausted);
    }

    #[test]
    fn usage_errors_signals_stops_and_success_never_restart() {
        let p = policy(5, None);
        assert_eq!(decide(&p, Some(&failed()), 2, 0, 0.5), Decision::Finish);
        assert_eq!(
            decide(&p, Some(&Reason::Signal(2)), 130, 0, 0.5),
            Decision::Finish
        );
        let kill = Reason::StoppedBy {
            host: 0,
            by: "dgl-coord kill".into(),
            named: true,
        };
        assert_eq!(decide(&p, Some(&kill), 143, 0, 0.5), Decision::Finish);
        assert_eq!(
            decide(&p, Some(&Reason::Success), 0, 0, 0.5),
            Decision::Finish
        );
        assert_eq!(
            decide(&policy(0, None), Some(&failed()), 3, 0, 0.5),
            Decision::Finish
        );
    }

    #[test]
    fn restart_on_chooses_the_codes() {
        let p = policy(5, Some(vec![1, 137]));
        assert!(matches!(
            decide(&p, Some(&failed()), 137, 0, 0.5),
            Decision::Restart(_)
        ));
        assert_eq!(decide(&p, Some(&failed()), 3, 0, 0.5), Decision::Finish);
        let stalled = Reason::Stalled {
            after: Duration::from_secs(1),
        };
        assert_eq!(decide(&p, Some(&stalled), 124, 0, 0.5), Decision::Finish);
        let p = policy(5, Some(vec![2, 124]));
        assert!(matches!(
            decide(&p, Some(&failed()), 2, 0, 0.5),
            Decision::Restart(_)
        ));
        assert!(matches!(
            decide(&p, Some(&stalled), 124, 0, 0.5),
            Decision::Restart(_)
        ));
    }
}
