//! The driver's state machine and end decisions, in-process: inputs with the times they
//! happen at, the actions and the ending they lead to. No agent, no terminal, no clock.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use dglrun_proto::pb::{self, job_event::Event};

use super::ending::{self, Ending, STOPPED_BY_OTHER_EXIT};
use super::stall::Watchdog;
use super::state::{Action, HostName, Input, Job, JobFacts, Proc, Reason, SpawnError};
use crate::launch::command::CommandLine;
use crate::launch::events::{Outcome, Who};
use crate::launch::internal_events::Msg;
use crate::launch::loss::Loss;
use crate::launch::plan::{PlannedProcess, Role};

const REQUESTER: &str = "dgl-coord launch from here (user u, pid 1)";

/// Two machines, each with `server0` (agent index 0) and a trainer (index 1).
struct Sim {
    job: Job,
    t0: Instant,
}

fn planned(machine: usize, role: Role, label: &str) -> PlannedProcess {
    PlannedProcess {
        machine,
        role,
        label: label.to_string(),
        command: CommandLine::Argv(vec!["python3".into(), "t.py".into()]),
        env: BTreeMap::new(),
        cwd: String::new(),
    }
}

const TRAINERS: [&str; 2] = ["trainer0", "trainer1"];

impl Sim {
    fn new() -> Self {
        Self::watched(Watchdog::default())
    }

    fn watched(watchdog: Watchdog) -> Self {
        let t0 = Instant::now();
        let plan: Vec<PlannedProcess> = (0..2)
            .flat_map(|m| {
                [
                    planned(m, Role::Server, "server0"),
                    planned(m, Role::Trainer, TRAINERS[m]),
                ]
            })
            .collect();
        let hosts = (0..2)
            .map(|m| HostName {
                name: format!("m{m} (10.0.0.{}:47001)", m + 1),
                ip: format!("10.0.0.{}", m + 1),
            })
            .collect();
        let facts = JobFacts {
            job_id: "dglrun-1-test".to_string(),
            lease: Duration::from_secs(10),
            requester: REQUESTER.to_string(),
            started: t0,
            restarts: 0,
            attempt_started: t0,
            watchdog,
        };
        Self {
            job: Job::new(&plan, hosts, facts),
            t0,
        }
    }

    /// Feeds `input` as if it happened `ms` after the command started.
    fn at(&mut self, ms: u64, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        self.job
            .handle(input, self.t0 + Duration::from_millis(ms), &mut out);
        out
    }

    /// Both Spawn phases succeed; pids are 100 + 10 * machine + index.
    fn started(&mut self) {
        for role in [Role::Server, Role::Trainer] {
            for (m, trainer) in TRAINERS.iter().enumerate() {
                let (index, label) = match role {
                    Role::Server => (0, "server0"),
                    _ => (1, *trainer),
                };
                let processes = vec![pb::ProcessStarted {
                    index,
                    label: label.to_string(),
                    pid: 100 + 10 * m as u32 + index,
                }];
                let acts = self.at(10, Input::Spawned { host: m, processes });
                assert!(matches!(&acts[..], [Action::Started { .. }]), "{acts:?}");
            }
        }
        self.at(20, Input::AllStarted);
    }

    fn ending(&self, ms: u64) -> Ending {
        ending::ending(&self.job, self.t0 + Duration::from_millis(ms), Vec::new())
    }
}

fn event(host: usize, event: Event) -> Input {
    Input::Msg(Msg::Event {
        host,
        ev: pb::JobEvent {
            seq: 1,
            event: Some(event),
        },
    })
}

fn exited(host: usize, index: u32, code: i32, signal: i32, by_agent: bool) -> Input {
    event(
        host,
        Event::Exited(pb::ProcessExited {
            index,
            code,
            signal,
            runtime_ms: 1500,
            stopped_by_agent: by_agent,
        }),
    )
}

/// The agent stopped this process (SIGTERM) during a teardown.
fn stopped_by_agent(host: usize, index: u32) -> Input {
    exited(host, index, -1, 15, true)
}

fn stop_returned(host: usize) -> Input {
    Input::Msg(Msg::Stopped {
        host,
        result: Ok(pb::StopReply::default()),
    })
}

fn stopped_event(host: usize, cause: pb::StopCause, by: &str) -> Input {
    event(
        host,
        Event::Stopped(pb::JobStopped {
            cause: cause as i32,
            by: by.to_string(),
        }),
    )
}

fn stderr_line(host: usize, index: u32, text: &str) -> Input {
    event(
        host,
        Event::Line(pb::OutputLine {
            index,
            stream: pb::OutputStream::Stderr as i32,
            text: text.as_bytes().to_vec(),
            partial: false,
        }),
    )
}

fn stops(acts: &[Action]) -> Vec<(Vec<usize>, bool)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Stop { hosts, force } => Some((hosts.clone(), *force)),
            _ => None,
        })
        .collect()
}

fn notes(acts: &[Action]) -> Vec<String> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Note(n) => Some(n.clone()),
            _ => None,
        })
        .collect()
}

/// Every process the teardown reached is reported stopped and every host confirms.
fn teardown(s: &mut Sim, ms: u64, hosts: &[usize], running: &[(usize, u32)]) {
    for &(h, i) in running {
        s.at(ms, stopped_by_agent(h, i));
    }
    for &h in hosts {
        s.at(ms, stop_returned(h));
    }
}

#[test]
fn all_trainers_exit_0_then_the_servers_are_stopped_and_the_job_succeeds() {
    let mut s = Sim::new();
    s.started();
    assert!(stops(&s.at(1000, exited(0, 1, 0, 0, false))).is_empty());
    assert!(!s.job.is_stopping(), "one trainer is still running");
    let acts = s.at(1200, exited(1, 1, 0, 0, false));
    assert_eq!(stops(&acts), vec![(vec![0, 1], false)]);
    assert!(
        notes(&acts).is_empty(),
        "success needs no message: {acts:?}"
    );
    assert!(!s.job.is_finished(), "the servers have not exited yet");
    s.at(1300, stop_returned(0));
    s.at(1350, stopped_by_agent(0, 0));
    s.at(1400, stop_returned(1));
    assert_eq!(
        s.job.drain_deadline(),
        Some(s.t0 + Duration::from_millis(1400) + Duration::from_secs(3)),
        "the last exits are awaited a while after every host confirmed"
    );
    assert!(!s.job.is_finished(), "m1's server0 exit is still due");
    s.at(1450, stopped_by_agent(1, 0));
    assert!(s.job.is_finished());

    let end = s.ending(1500);
    assert_eq!(end.code, 0);
    assert_eq!(end.summary.outcome, Outcome::Success);
    assert_eq!(end.note, None);
    assert_eq!(end.summary.teardown_ms, Some(200));
    assert_eq!(end.summary.all_started_ms, Some(20));
    assert_eq!(end.summary.elapsed_ms, 1500);
    insta::assert_snapshot!(end.text);
}

#[test]
fn a_failing_trainer_stops_everything_and_its_code_wins() {
    let mut s = Sim::new();
    s.started();
    s.at(500, stderr_line(1, 1, "loading partition 1"));
    s.at(600, stderr_line(1, 1, "ValueError: bad feature"));
    let acts = s.at(700, exited(1, 1, 7, 0, false));
    assert_eq!(stops(&acts), vec![(vec![0, 1], false)]);
    assert_eq!(
        notes(&acts),
        vec!["m1 (10.0.0.2:47001) trainer1 exit 7; stopping the job on every host"]
    );
    // The others end as the teardown's SIGTERM ends them: 143, which is not a failure.
    teardown(&mut s, 900, &[0, 1], &[(0, 0), (0, 1), (1, 0)]);
    assert!(s.job.is_finished());

    let end = s.ending(950);
    assert_eq!(end.code, 7);
    assert_eq!(end.summary.outcome, Outcome::Failed);
    assert_eq!(
        end.summary
            .failed_process
            .as_ref()
            .map(|w| w.label.as_str()),
        Some("trainer1")
    );
    assert_eq!(end.summary.failed_stderr_tail.len(), 2);
    assert_eq!(
        end.note, end.summary.error,
        "the failure is told at the end"
    );
    insta::assert_snapshot!(end.note.unwrap_or_default());
}

#[test]
fn a_second_failure_during_the_stop_keeps_the_first_as_the_cause() {
    let mut s = Sim::new();
    s.started();
    s.at(700, exited(1, 1, 3, 0, false));
    let acts = s.at(710, exited(0, 1, 9, 0, false));
    assert!(
        stops(&acts).is_empty() && notes(&acts).is_empty(),
        "{acts:?}"
    );
    teardown(&mut s, 900, &[0, 1], &[(0, 0), (1, 0)]);
    let end = s.ending(950);
    assert_eq!(
        end.summary.failed_process.map(|w| w.label),
        Some("trainer1".to_string())
    );
    // As srun: the worst code of a process that failed on its own.
    assert_eq!(end.code, 9);
}

#[test]
fn ctrl_c_once_stops_gracefully_and_exits_130() {
    let mut s = Sim::new();
    s.started();
    let acts = s.at(500, Input::Signal(libc::SIGINT));
    assert_eq!(stops(&acts), vec![(vec![0, 1], false)]);
    assert_eq!(
        notes(&acts),
        vec!["SIGINT: stopping the job on every host (again to kill at once)"]
    );
    teardown(&mut s, 800, &[0, 1], &[(0, 0), (0, 1), (1, 0), (1, 1)]);
    assert!(s.job.is_finished());
    let end = s.ending(800);
    assert_eq!(end.code, 130);
    assert_eq!(end.summary.outcome, Outcome::Signal);
    assert_eq!(end.summary.error.as_deref(), Some("job stopped by SIGINT"));
    assert_eq!(end.note, None, "the signal was announced when it came");
}

#[test]
fn a_second_ctrl_c_kills_at_once_and_a_third_leaves() {
    let mut s = Sim::new();
    s.started();
    s.at(500, Input::Signal(libc::SIGINT));
    s.at(600, stop_returned(0));
    let acts = s.at(700, Input::Signal(libc::SIGINT));
    assert_eq!(
        stops(&acts),
        vec![(vec![1], true)],
        "only the host that has not confirmed is stopped again, with force"
    );
    assert_eq!(
        notes(&acts),
        vec!["SIGINT again: killing every process now"]
    );
    assert!(!s.job.is_finished());
    let acts = s.at(800, Input::Signal(libc::SIGTERM));
    assert!(stops(&acts).is_empty(), "{acts:?}");
    assert!(notes(&acts)[0].starts_with("third signal: leaving without waiting"));
    assert!(
        s.job.is_finished(),
        "the third signal does not wait for the agents"
    );
    let end = s.ending(800);
    assert_eq!(end.code, 130, "the first signal is the reason");
    assert_eq!(end.summary.teardown_ms, None, "m1 never confirmed");
}

#[test]
fn a_lost_agent_fails_the_job_and_only_the_others_are_stopped() {
    let mut s = Sim::new();
    s.started();
    let acts = s.at(
        500,
        Input::Msg(Msg::Lost {
            host: 1,
            loss: Loss::Gone,
        }),
    );
    assert_eq!(stops(&acts), vec![(vec![0], false)]);
    assert_eq!(
        notes(&acts),
        vec![
            "lost the agent of m1 (10.0.0.2:47001): the agent is not running (connection \
             refused); stopping the job on every other host"
        ]
    );
    // Its watch task's own report of the same loss changes nothing.
    let again = s.at(
        510,
        Input::Msg(Msg::Lost {
            host: 1,
            loss: Loss::Gone,
        }),
    );
    assert!(again.is_empty(), "{again:?}");
    teardown(&mut s, 800, &[0], &[(0, 0), (0, 1)]);
    assert!(s.job.is_finished(), "m1's exits cannot come");
    let end = s.ending(800);
    assert_eq!(end.code, 1);
    assert_eq!(end.summary.outcome, Outcome::Lost);
    assert!(end
        .note
        .unwrap_or_default()
        .contains("job failed: lost the agent of m1 (10.0.0.2:47001): the agent is not running"));
}

#[test]
fn a_host_lost_while_stopping_is_not_waited_for() {
    let mut s = Sim::new();
    s.started();
    s.at(500, Input::Signal(libc::SIGTERM));
    s.at(600, stop_returned(0));
    // Its Stop may never return.
    let gone = Input::Msg(Msg::Lost {
        host: 1,
        loss: Loss::Gone,
    });
    let acts = s.at(700, gone);
    assert!(acts.is_empty(), "the stop goes on: {acts:?}");
    s.at(700, stopped_by_agent(0, 0));
    s.at(700, stopped_by_agent(0, 1));
    assert!(s.job.is_finished());
    assert_eq!(s.ending(700).code, 143);
}

#[test]
fn a_stop_requested_elsewhere_is_recorded_with_who_asked() {
    let mut s = Sim::new();
    s.started();
    let by = "dgl-coord kill from admin (user ops, pid 9)";
    let acts = s.at(500, stopped_event(0, pb::StopCause::Requested, by));
    assert_eq!(stops(&acts), vec![(vec![0, 1], false)]);
    assert_eq!(
        notes(&acts),
        vec![format!(
            "m0 (10.0.0.1:47001): the job was stopped by {by}; stopping it on every host"
        )]
    );
    // Our own Stop, announced by the other agent, changes nothing.
    assert!(s
        .at(510, stopped_event(1, pb::StopCause::Requested, REQUESTER))
        .is_empty());
    teardown(&mut s, 800, &[0, 1], &[(0, 0), (0, 1), (1, 0), (1, 1)]);
    let end = s.ending(800);
    assert_eq!(end.code, STOPPED_BY_OTHER_EXIT);
    assert_eq!(end.summary.outcome, Outcome::Stopped);
    assert_eq!(
        end.note.as_deref(),
        Some(format!("job stopped by {by} (seen by the agent of m0 (10.0.0.1:47001))").as_str())
    );
}

#[test]
fn a_spawn_aborted_by_a_stop_elsewhere_learns_who_from_the_stopped_event() {
    let mut s = Sim::new();
    let acts = s.at(
        10,
        Input::SpawnFailed {
            host: 1,
            error: SpawnError::StoppedElsewhere,
        },
    );
    assert_eq!(stops(&acts), vec![(vec![0, 1], false)]);
    assert!(s.job.is_stopping(), "the next phase must not start");
    s.at(20, stopped_event(1, pb::StopCause::Requested, REQUESTER));
    s.at(
        30,
        stopped_event(1, pb::StopCause::Requested, "dgl-coord kill from b"),
    );
    s.at(
        40,
        stopped_event(1, pb::StopCause::Requested, "a third client"),
    );
    teardown(&mut s, 50, &[0, 1], &[]);
    assert!(s.job.is_finished(), "nothing was started");
    let end = s.ending(50);
    assert_eq!(end.code, STOPPED_BY_OTHER_EXIT);
    assert!(
        end.note
            .unwrap_or_default()
            .starts_with("job stopped by dgl-coord kill from b "),
        "the first other stopper is named"
    );
}

#[test]
fn an_agent_that_stops_the_job_itself_is_a_lost_host() {
    for (cause, loss) in [
        (
            pb::StopCause::LeaseExpired,
            "no lease renewal reached it in time",
        ),
        (pb::StopCause::AgentShutdown, "the agent is shutting down"),
    ] {
        let mut s = Sim::new();
        s.started();
        let acts = s.at(500, stopped_event(1, cause, ""));
        assert!(notes(&acts)[0].contains(loss), "{acts:?}");
        assert!(matches!(
            s.job.stopping.as_ref().map(|st| &st.reason),
            Some(Reason::Lost { host: 1, .. })
        ));
    }
}

#[test]
fn a_failed_spawn_names_the_host_and_fails_the_job() {
    let mut s = Sim::new();
    let acts = s.at(
        10,
        Input::SpawnFailed {
            host: 0,
            error: SpawnError::Failed("cannot run python3: not found".to_string()),
        },
    );
    assert_eq!(
        notes(&acts),
        vec!["m0 (10.0.0.1:47001): cannot run python3: not found"]
    );
    // A later host's failure in the same phase is not a second cause.
    let later = s.at(
        10,
        Input::SpawnFailed {
            host: 1,
            error: SpawnError::Failed("other".to_string()),
        },
    );
    assert!(later.is_empty(), "{later:?}");
    teardown(&mut s, 30, &[0, 1], &[]);
    let end = s.ending(30);
    assert_eq!(end.code, 1);
    assert_eq!(
        end.summary.error.as_deref(),
        Some("job failed: m0 (10.0.0.1:47001): cannot run python3: not found")
    );
    assert_eq!(end.summary.all_started_ms, None);
}

#[test]
fn exit_code_from_the_reason_and_the_worst_failure() {
    let failed = Reason::Failed {
        host: 0,
        label: "trainer0".into(),
    };
    let lost = Reason::Lost {
        host: 0,
        loss: Loss::Gone,
    };
    let spawn = Reason::SpawnFailed {
        host: 0,
        message: "x".into(),
    };
    let by = Reason::StoppedBy {
        host: 0,
        by: "x".into(),
        named: true,
    };
    let cases: &[(Option<&Reason>, u8, u8)] = &[
        (None, 0, 0),
        (Some(&Reason::Success), 0, 0),
        (Some(&failed), 7, 7),
        // A failure whose process exited 0 by the time it was read still fails.
        (Some(&failed), 0, 1),
        (Some(&lost), 0, 1),
        (Some(&lost), 137, 137),
        (Some(&spawn), 0, 1),
        (Some(&Reason::Signal(2)), 0, 130),
        (Some(&Reason::Signal(15)), 0, 143),
        // A process that failed before the signal: its code, not the signal's.
        (Some(&Reason::Signal(2)), 3, 3),
        (Some(&by), 0, STOPPED_BY_OTHER_EXIT),
        (Some(&by), 5, 5),
    ];
    for &(reason, worst, want) in cases {
        assert_eq!(
            ending::exit_code(reason, worst),
            want,
            "{reason:?} worst {worst}"
        );
    }
}

#[test]
fn error_text_for_each_reason() {
    let who = Who {
        machine: 1,
        host: "10.0.0.2".into(),
        label: "trainer1".into(),
        role: "trainer".into(),
    };
    let quiet = Proc {
        role: Role::Trainer,
        who,
        pid: Some(4242),
        exit: Some(pb::ProcessExited {
            index: 1,
            code: -1,
            signal: 11,
            runtime_ms: 10,
            stopped_by_agent: false,
        }),
        stderr_tail: VecDeque::new(),
    };
    let lease = Duration::from_secs(10);
    let host = "m1 (10.0.0.2:47001)";
    let cases: Vec<(Reason, Option<&Proc>, Option<&str>)> = vec![
        (Reason::Success, None, None),
        (
            Reason::Failed {
                host: 1,
                label: "trainer1".into(),
            },
            Some(&quiet),
            Some(
                "job failed: m1 (10.0.0.2:47001) trainer1 (pid 4242): killed by SIGSEGV\n  \
                 (it wrote nothing to stderr)",
            ),
        ),
        (
            Reason::SpawnFailed {
                host: 1,
                message: "no such file".into(),
            },
            None,
            Some("job failed: m1 (10.0.0.2:47001): no such file"),
        ),
        (
            Reason::Lost {
                host: 1,
                loss: Loss::Forgot,
            },
            None,
            Some(
                "job failed: lost the agent of m1 (10.0.0.2:47001): the agent no longer knows \
                 the job (it was restarted); the restarted agent stopped what its previous run \
                 left there",
            ),
        ),
        (Reason::Signal(15), None, Some("job stopped by SIGTERM")),
        (
            Reason::StoppedBy {
                host: 1,
                by: "dgl-coord kill from b".into(),
                named: true,
            },
            None,
            Some("job stopped by dgl-coord kill from b (seen by the agent of m1 (10.0.0.2:47001))"),
        ),
    ];
    for (reason, failed, want) in cases {
        assert_eq!(
            ending::error_text(&reason, host, failed, lease).as_deref(),
            want,
            "{reason:?}"
        );
    }
}

#[test]
fn rows_follow_the_plan_and_say_what_each_process_did() {
    let mut s = Sim::new();
    s.at(
        10,
        Input::Spawned {
            host: 0,
            processes: vec![pb::ProcessStarted {
                index: 0,
                label: "server0".into(),
                pid: 100,
            }],
        },
    );
    s.at(
        10,
        Input::SpawnFailed {
            host: 1,
            error: SpawnError::Failed("x".into()),
        },
    );
    s.at(20, stopped_by_agent(0, 0));
    let rows = ending::rows(&s.job);
    let got: Vec<(String, String, Option<u32>, String)> = rows
        .iter()
        .map(|r| {
            (
                r.host.clone(),
                r.process.clone(),
                r.pid,
                crate::launch::summary::row_status(r),
            )
        })
        .collect();
    let want = [
        (
            "m0 (10.0.0.1:47001)",
            "server0",
            Some(100),
            "stopped (killed by SIGTERM)",
        ),
        ("m0 (10.0.0.1:47001)", "trainer0", None, "not started"),
        ("m1 (10.0.0.2:47001)", "server0", None, "not started"),
        ("m1 (10.0.0.2:47001)", "trainer1", None, "not started"),
    ];
    let want: Vec<(String, String, Option<u32>, String)> = want
        .iter()
        .map(|(h, p, pid, st)| (h.to_string(), p.to_string(), *pid, st.to_string()))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn timings_text_says_what_it_knows() {
    assert_eq!(ending::timings_text(4, None, None, 1), "exit code 1\n");
    assert_eq!(
        ending::timings_text(4, Some(812), Some(("servers stopped", 40)), 0),
        "all 4 processes started 812 ms after the command\n\
         servers stopped 40 ms after the stop began\nexit code 0\n"
    );
}

fn line(host: usize, index: u32, text: &str) -> Input {
    event(
        host,
        Event::Line(pb::OutputLine {
            index,
            stream: pb::OutputStream::Stdout as i32,
            text: text.as_bytes().to_vec(),
            partial: false,
        }),
    )
}

#[test]
fn a_job_without_progress_is_stalled_then_stopped_with_its_own_code() {
    let mut s = Sim::watched(Watchdog {
        stall_timeout: Some(Duration::from_secs(10)),
        start_timeout: None,
    });
    s.started();
    assert_eq!(s.job.wakeup(), Some(s.t0 + Duration::from_millis(10_020)));
    s.at(5_000, line(1, 1, "epoch 0"));
    // A server's line is no trainer's progress.
    s.at(6_000, line(0, 0, "serving"));
    assert_eq!(s.job.wakeup(), Some(s.t0 + Duration::from_secs(15)));
    assert!(s.at(14_999, Input::Tick).is_empty());
    let acts = s.at(15_000, Input::Tick);
    let note = match &acts[..] {
        [Action::Note(n), Action::DumpStacks, Action::Stop {
            hosts,
            force: false,
        }] => {
            assert_eq!(hosts, &vec![0, 1]);
            n.clone()
        }
        other => panic!("{other:?}"),
    };
    assert!(note.starts_with("stalled: no progress for 10s"), "{note}");
    assert!(
        note.contains("m1 (10.0.0.2:47001) trainer1: last line 10s ago: \"epoch 0\""),
        "{note}"
    );
    assert_eq!(s.job.wakeup(), None);
    let end = s.ending(16_000);
    assert_eq!((end.code, end.summary.outcome), (124, Outcome::Stalled));
    assert_eq!(
        end.summary.error.as_deref(),
        Some("stalled: no progress for 10s: no trainer wrote a line or used CPU time")
    );
}

#[test]
fn a_trainer_silent_past_the_start_timeout_fails_the_start() {
    let mut s = Sim::watched(Watchdog {
        stall_timeout: None,
        start_timeout: Some(Duration::from_secs(30)),
    });
    s.started();
    s.at(1_000, line(0, 1, "hello"));
    assert_eq!(s.job.wakeup(), Some(s.t0 + Duration::from_secs(30)));
    let acts = s.at(30_000, Input::Tick);
    assert!(
        matches!(&acts[..], [Action::Note(n), Action::DumpStacks, Action::Stop { .. }]
            if n == "start timeout: m1 (10.0.0.2:47001) trainer1 printed nothing within 30s of the start"),
        "{acts:?}"
    );
    let end = s.ending(31_000);
    assert_eq!(
        (end.code, end.summary.outcome),
        (124, Outcome::StartTimeout)
    );
}
