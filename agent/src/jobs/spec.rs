//! Job requests as the agent understands them, parsed once at the gRPC edge.
//!
//! `service.rs` turns each protobuf request into one of these with `TryFrom`; every bound
//! comes from `crate::limits`, and nothing past this module sees a `pb` request type. A value
//! of these types is within every bound, so the code that acts on it checks nothing again.

use std::fmt;
use std::time::Duration;

use dglrun_proto::pb;

use crate::limits::{
    MAX_ARGV_BYTES, MAX_ENV_BYTES, MAX_ENV_VARS, MAX_GRACE, MAX_JOB_ID_BYTES, MAX_LABEL_BYTES,
    MAX_LEASE, MAX_PATH_BYTES, MAX_PROCESSES_PER_SPAWN, MIN_LEASE,
};

/// A job id: 1 to [`MAX_JOB_ID_BYTES`] of `[A-Za-z0-9._-]`, never `.` or `..` (it names a
/// cgroup directory and ends up in environments and logs).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(String);

impl JobId {
    pub fn parse(id: String) -> Result<Self, InvalidRequest> {
        let ok = !id.is_empty()
            && id.len() <= MAX_JOB_ID_BYTES
            && id != "."
            && id != ".."
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(id))
        } else {
            Err(InvalidRequest::JobId(shorten(&id)))
        }
    }

    /// The id of session `n` of this agent's run: `rsh-<agent pid>-<n>`.
    pub fn session(n: u64) -> Self {
        Self(format!("rsh-{}-{n}", std::process::id()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for JobId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// What a process runs: an argv, or one `sh -c` string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Never empty; the program name is never empty.
    Argv(Vec<String>),
    /// Never blank.
    Shell(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessSpec {
    /// 1 to [`MAX_LABEL_BYTES`] printable characters.
    pub label: String,
    pub role: String,
    pub command: Command,
    /// Valid names (`[A-Za-z_][A-Za-z0-9_]*`), no NUL in values, sorted by name.
    pub env: Vec<(String, String)>,
    /// Relative to the workspace (or absolute inside the root); empty: the workspace.
    pub cwd: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpawnSpec {
    pub job_id: JobId,
    pub workspace: String,
    /// None: the agent's default lease. Within [`MIN_LEASE`]..=[`MAX_LEASE`].
    pub lease: Option<Duration>,
    /// 1 to [`MAX_PROCESSES_PER_SPAWN`].
    pub processes: Vec<ProcessSpec>,
    /// The job starts again: a finished job of the same id is replaced.
    pub restart: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchSpec {
    pub job_id: JobId,
    pub after_seq: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopSpec {
    pub job_id: JobId,
    /// At most [`MAX_GRACE`].
    pub grace: Duration,
    pub force: bool,
    /// Who asked, as the coordinator names itself (bounded when it is recorded).
    pub requester: String,
}

/// A request outside the agent's bounds or malformed; the message names what and where.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidRequest {
    #[error(
        "job id {0:?} must be 1-{MAX_JOB_ID_BYTES} characters of [A-Za-z0-9._-], not '.' or '..'"
    )]
    JobId(String),
    #[error("a Spawn must name 1 to {MAX_PROCESSES_PER_SPAWN} processes, not {0}")]
    ProcessCount(usize),
    #[error("{what} is longer than the agent's limit of {MAX_PATH_BYTES} bytes or has a NUL byte")]
    Path { what: &'static str },
    #[error("session: {0}")]
    Session(ProcessProblem),
    #[error("process {index} ({label:?}): {problem}")]
    Process {
        index: usize,
        label: String,
        problem: ProcessProblem,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProcessProblem {
    #[error("the label must be 1-{MAX_LABEL_BYTES} bytes of printable characters")]
    Label,
    #[error("the role must be at most {MAX_LABEL_BYTES} bytes of printable characters")]
    Role,
    #[error("no command")]
    NoCommand,
    #[error("empty argv")]
    EmptyArgv,
    #[error("the shell command is blank")]
    BlankShell,
    #[error("the command is {0} bytes, over the agent's limit of {MAX_ARGV_BYTES}")]
    CommandTooLarge(usize),
    #[error("the command has a NUL byte")]
    Nul,
    #[error("{0} environment variables, over the agent's limit of {MAX_ENV_VARS}")]
    TooManyVars(usize),
    #[error("the environment is {0} bytes, over the agent's limit of {MAX_ENV_BYTES}")]
    EnvTooLarge(usize),
    #[error("{0:?} is not an environment variable name")]
    EnvName(String),
    #[error("the value of {0} has a NUL byte")]
    EnvNul(String),
    #[error("the working directory is longer than {MAX_PATH_BYTES} bytes or has a NUL byte")]
    Cwd,
}

impl From<InvalidRequest> for tonic::Status {
    fn from(e: InvalidRequest) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// At most 64 characters of a value quoted back in an error.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`
pub fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn check_path(p: String, what: &'static str) -> Result<String, InvalidRequest> {
    if p.len() > MAX_PATH_BYTES || p.contains('\0') {
        return Err(InvalidRequest::Path { what });
    }
    Ok(p)
}

impl TryFrom<pb::ProcessSpec> for ProcessSpec {
    type Error = ProcessProblem;

    fn try_from(p: pb::ProcessSpec) -> Result<Self, ProcessProblem> {
        let printable = |s: &str| !s.chars().any(char::is_control);
        if p.label.is_empty() || p.label.len() > MAX_LABEL_BYTES || !printable(&p.label) {
            return Err(ProcessProblem::Label);
        }
        if p.role.len() > MAX_LABEL_BYTES || !printable(&p.role) {
            return Err(ProcessProblem::Role);
        }
        let command = match p.command {
            None => return Err(ProcessProblem::NoCommand),
            Some(pb::process_spec::Command::Argv(a)) => {
                if a.args.first().is_none_or(String::is_empty) {
                    return Err(ProcessProblem::EmptyArgv);
                }
                // As the kernel counts it: each string with its NUL.
                let bytes: usize = a.args.iter().map(|s| s.len() + 1).sum();
                if bytes > MAX_ARGV_BYTES {
                    return Err(ProcessProblem::CommandTooLarge(bytes));
                }
                if a.args.iter().any(|s| s.contains('\0')) {
                    return Err(ProcessProblem::Nul);
                }
                Command::Argv(a.args)
            }
            Some(pb::process_spec::Command::Shell(s)) => {
                if s.trim().is_empty() {
                    return Err(ProcessProblem::BlankShell);
                }
                if s.len() + 1 > MAX_ARGV_BYTES {
                    return Err(ProcessProblem::CommandTooLarge(s.len() + 1));
                }
                if s.contains('\0') {
                    return Err(ProcessProblem::Nul);
                }
                Command::Shell(s)
            }
        };
        if p.env.len() > MAX_ENV_VARS {
            return Err(ProcessProblem::TooManyVars(p.env.len()));
        }
        let env_bytes: usize = p.env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        if env_bytes > MAX_ENV_BYTES {
            return Err(ProcessProblem::EnvTooLarge(env_bytes));
        }
        let mut env: Vec<(String, String)> = p.env.into_iter().collect();
        env.sort();
        for (k, v) in &env {
            if !is_env_name(k) {
                return Err(ProcessProblem::EnvName(shorten(k)));
            }
            if v.contains('\0') {
                return Err(ProcessProblem::EnvNul(k.clone()));
            }
        }
        if p.cwd.len() > MAX_PATH_BYTES || p.cwd.contains('\0') {
            return Err(ProcessProblem::Cwd);
        }
        Ok(Self {
            label: p.label,
            role: p.role,
            command,
            env,
            cwd: p.cwd,
        })
    }
}

impl TryFrom<pb::SpawnRequest> for SpawnSpec {
    type Error = InvalidRequest;

    fn try_from(r: pb::SpawnRequest) -> Result<Self, InvalidRequest> {
        let job_id = JobId::parse(r.job_id)?;
        let workspace = check_path(r.workspace, "the workspace path")?;
        let n = r.processes.len();
        if n == 0 || n > MAX_PROCESSES_PER_SPAWN {
            return Err(InvalidRequest::ProcessCount(n));
        }
        let processes = r
            .processes
            .into_iter()
            .enumerate()
            .map(|(index, p)| {
                let label = shorten(&p.label);
                ProcessSpec::try_from(p).map_err(|problem| InvalidRequest::Process {
                    index,
                    label,
                    problem,
                })
            })
            .collect::<Result<_, _>>()?;
        let lease = match r.lease_ms {
            0 => None,
            ms => Some(Duration::from_millis(ms.into()).clamp(MIN_LEASE, MAX_LEASE)),
        };
        Ok(Self {
            job_id,
            workspace,
            lease,
            processes,
            restart: r.restart,
        })
    }
}

impl TryFrom<pb::WatchRequest> for WatchSpec {
    type Error = InvalidRequest;

    fn try_from(r: pb::WatchRequest) -> Result<Self, InvalidRequest> {
        Ok(Self {
            job_id: JobId::parse(r.job_id)?,
            after_seq: r.after_seq,
        })
    }
}

impl TryFrom<pb::RenewRequest> for JobId {
    type Error = InvalidRequest;

    fn try_from(r: pb::RenewRequest) -> Result<Self, InvalidRequest> {
        JobId::parse(r.job_id)
    }
}

impl TryFrom<pb::StopRequest> for StopSpec {
    type Error = InvalidRequest;

    fn try_from(r: pb::StopRequest) -> Result<Self, InvalidRequest> {
        Ok(Self {
            job_id: JobId::parse(r.job_id)?,
            grace: Duration::from_millis(r.grace_ms.into()).min(MAX_GRACE),
            force: r.force,
            requester: r.requester,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shell_spec(label: &str, script: &str) -> pb::ProcessSpec {
        pb::ProcessSpec {
            label: label.into(),
            role: "trainer".into(),
            command: Some(pb::process_spec::Command::Shell(script.into())),
            ..Default::default()
        }
    }

    fn spawn(id: &str, processes: Vec<pb::ProcessSpec>) -> pb::SpawnRequest {
        pb::SpawnRequest {
            job_id: id.into(),
            workspace: "ws".into(),
            processes,
            lease_ms: 0,
            restart: false,
        }
    }

    /// The limits that had drifted apart: one value each, enforced here.
    #[test]
    fn every_bound_is_the_one_in_limits() {
        let ok = |r| SpawnSpec::try_from(r).is_ok();
        let many = |n| vec![shell_spec("t", "true"); n];
        assert!(ok(spawn("j", many(MAX_PROCESSES_PER_SPAWN))));
        assert_eq!(
            SpawnSpec::try_from(spawn("j", many(MAX_PROCESSES_PER_SPAWN + 1))).unwrap_err(),
            InvalidRequest::ProcessCount(MAX_PROCESSES_PER_SPAWN + 1)
        );
        assert!(!ok(spawn("j", vec![])));
        let at_limit = "x".repeat(MAX_ARGV_BYTES - 1);
        assert!(ok(spawn("j", vec![shell_spec("t", &at_limit)])));
        let over = "x".repeat(MAX_ARGV_BYTES);
        let err = SpawnSpec::try_from(spawn("j", vec![shell_spec("t", &over)])).unwrap_err();
        assert!(err.to_string().contains("over the agent's limit"), "{err}");
        for id in ["a:b", ".", "..", "a/b", "", "ü"] {
            assert!(JobId::parse(id.into()).is_err(), "{id:?}");
        }
        for id in ["job-1", "a.b_c", "...", &"a".repeat(MAX_JOB_ID_BYTES)] {
            assert!(JobId::parse(id.into()).is_ok(), "{id:?}");
        }
        assert!(JobId::parse("a".repeat(MAX_JOB_ID_BYTES + 1)).is_err());
    }

    #[test]
    fn errors_name_the_process_and_the_problem() {
        let mut bad = shell_spec("server0", "true");
        bad.env.insert("A=B".into(), "1".into());
        let err = SpawnSpec::try_from(spawn("j", vec![shell_spec("t", "true"), bad])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "process 1 (\"server0\"): \"A=B\" is not an environment variable name"
        );
        let argv = pb::ProcessSpec {
            label: "x".into(),
            command: Some(pb::process_spec::Command::Argv(pb::Argv { args: vec![] })),
            ..Default::default()
        };
        let err = SpawnSpec::try_from(spawn("j", vec![argv])).unwrap_err();
        assert!(err.to_string().contains("empty argv"), "{err}");
        let s = StopSpec::try_from(pb::StopRequest {
            job_id: "j".into(),
            grace_ms: u32::MAX,
            force: false,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.grace, MAX_GRACE);
    }

    fn any_spec() -> impl Strategy<Value = pb::ProcessSpec> {
        (
            "[\\PC]{0,40}",
            "[\\PC\\t]{0,10}",
            proptest::collection::vec("[\\PC\\x00]{0,20}", 0..5),
            proptest::collection::hash_map("[\\PC=\\x00]{0,10}", "[\\PC\\x00]{0,10}", 0..5),
            0u8..3,
            "[\\PC]{0,10}",
        )
            .prop_map(|(label, role, args, env, kind, cwd)| pb::ProcessSpec {
                label,
                role,
                command: match kind {
                    0 => None,
                    1 => Some(pb::process_spec::Command::Shell(args.join(" "))),
                    _ => Some(pb::process_spec::Command::Argv(pb::Argv { args })),
                },
                env,
                cwd,
            })
    }

    fn check_accepted(s: &SpawnSpec) -> Result<(), TestCaseError> {
        prop_assert!(JobId::parse(s.job_id.as_str().to_string()).is_ok());
        prop_assert!(!s.processes.is_empty() && s.processes.len() <= MAX_PROCESSES_PER_SPAWN);
        if let Some(l) = s.lease {
            prop_assert!((MIN_LEASE..=MAX_LEASE).contains(&l));
        }
        for p in &s.processes {
            prop_assert!(!p.label.is_empty() && p.label.len() <= MAX_LABEL_BYTES);
            match &p.command {
                Command::Argv(a) => {
                    prop_assert!(!a.is_empty() && !a[0].is_empty());
                    prop_assert!(a.iter().map(|s| s.len() + 1).sum::<usize>() <= MAX_ARGV_BYTES);
                    prop_assert!(a.iter().all(|s| !s.contains('\0')));
                }
                Command::Shell(c) => {
                    prop_assert!(!c.trim().is_empty() && !c.contains('\0'));
                    prop_assert!(c.len() < MAX_ARGV_BYTES);
                }
            }
            prop_assert!(p.env.len() <= MAX_ENV_VARS);
            for (k, v) in &p.env {
                prop_assert!(is_env_name(k) && !v.contains('\0'));
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Parsing never panics, and whatever is accepted is within every bound.
        #[test]
        fn spawn_requests_parse_within_bounds(
            id in "[\\PC]{0,20}|[a-z.]{1,3}",
            workspace in "[\\PC\\x00]{0,20}",
            procs in proptest::collection::vec(any_spec(), 0..4),
            lease_ms in any::<u32>(),
        ) {
            let req = pb::SpawnRequest { job_id: id, workspace, processes: procs, lease_ms, restart: false };
            if let Ok(s) = SpawnSpec::try_from(req) {
                check_accepted(&s)?;
            }
        }

        #[test]
        fn watch_renew_and_stop_requests_parse_within_bounds(
            id in "[\\PC]{0,200}",
            after_seq in any::<u64>(),
            grace_ms in any::<u32>(),
            force in any::<bool>(),
        ) {
            if let Ok(w) = WatchSpec::try_from(pb::WatchRequest { job_id: id.clone(), after_seq }) {
                prop_assert_eq!(w.after_seq, after_seq);
                prop_assert!(w.job_id.as_str().len() <= MAX_JOB_ID_BYTES);
            }
            let renewed = JobId::try_from(pb::RenewRequest { job_id: id.clone() });
            prop_assert_eq!(renewed.is_ok(), JobId::parse(id.clone()).is_ok());
            if let Ok(s) = StopSpec::try_from(pb::StopRequest { job_id: id, grace_ms, force, requester: String::new() }) {
                prop_assert!(s.grace <= MAX_GRACE);
                prop_assert!(s.job_id.as_str() != "." && s.job_id.as_str() != "..");
            }
        }
    }
}
