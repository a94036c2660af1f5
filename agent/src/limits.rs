//! Bounds on what one request may ask of the agent, checked before any work starts.

use dglrun_proto::pb;
use tonic::Status;

/// PutFile streams served at once; more are refused, not queued.
pub const MAX_CONCURRENT_TRANSFERS: usize = 64;
/// Jobs an agent holds at once.
pub const MAX_JOBS: usize = 64;
/// Processes one Spawn may start.
pub const MAX_PROCESSES_PER_SPAWN: usize = 1024;
/// Files one PrepareFiles may name.
pub const MAX_FILES_PER_PREPARE: usize = 100_000;
/// Total bytes of one process's argv (or shell command), and of its environment.
pub const MAX_ARGV_BYTES: usize = 128 << 10;
pub const MAX_ENV_BYTES: usize = 128 << 10;
pub const MAX_ENV_VARS: usize = 1024;
pub const MAX_LABEL_BYTES: usize = 128;
pub const MAX_JOB_ID_BYTES: usize = 128;
/// Files Preflight may read, and its free-port address length.
pub const MAX_PREFLIGHT_FILES: usize = 16;

fn too_big(what: &str, limit: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{what} exceeds the agent's limit of {limit}"))
}

pub fn check_job_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("empty job id"));
    }
    if id.len() > MAX_JOB_ID_BYTES {
        return Err(too_big("job id", format!("{MAX_JOB_ID_BYTES} bytes")));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(Status::invalid_argument(format!(
            "job id {id:?} may hold only letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

pub fn check_spawn(req: &pb::SpawnRequest) -> Result<(), Status> {
    check_job_id(&req.job_id)?;
    if req.processes.len() > MAX_PROCESSES_PER_SPAWN {
        return Err(too_big("processes in one spawn", MAX_PROCESSES_PER_SPAWN));
    }
    for p in &req.processes {
        let label = &p.label;
        if label.len() > MAX_LABEL_BYTES {
            return Err(too_big("process label", format!("{MAX_LABEL_BYTES} bytes")));
        }
        let argv_bytes = match &p.command {
            Some(pb::process_spec::Command::Argv(a)) => {
                if a.args.is_empty() || a.args[0].is_empty() {
                    return Err(Status::invalid_argument(format!(
                        "process {label}: empty argv"
                    )));
                }
                a.args.iter().map(|s| s.len() + 1).sum()
            }
            Some(pb::process_spec::Command::Shell(s)) => s.len(),
            None => {
                return Err(Status::invalid_argument(format!(
                    "process {label}: no command"
                )))
            }
        };
        if argv_bytes > MAX_ARGV_BYTES {
            return Err(too_big(
                &format!("process {label}: command"),
                format!("{MAX_ARGV_BYTES} bytes"),
            ));
        }
        if p.env.len() > MAX_ENV_VARS {
            return Err(too_big(
                &format!("process {label}: environment"),
                format!("{MAX_ENV_VARS} variables"),
            ));
        }
        let env_bytes: usize = p.env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        if env_bytes > MAX_ENV_BYTES {
            return Err(too_big(
                &format!("process {label}: environment"),
                format!("{MAX_ENV_BYTES} bytes"),
            ));
        }
        for (k, v) in &p.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(Status::invalid_argument(format!(
                    "process {label}: invalid environment variable {k:?}"
                )));
            }
        }
        let has_nul = match &p.command {
            Some(pb::process_spec::Command::Argv(a)) => a.args.iter().any(|s| s.contains('\0')),
            Some(pb::process_spec::Command::Shell(s)) => s.contains('\0'),
            None => false,
        };
        if has_nul {
            return Err(Status::invalid_argument(format!(
                "process {label}: NUL byte in command"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn spawn(args: Vec<&str>, env: Vec<(&str, &str)>) -> pb::SpawnRequest {
        pb::SpawnRequest {
            job_id: "job-1".into(),
            workspace: "ws".into(),
            lease_ms: 0,
            processes: vec![pb::ProcessSpec {
                label: "trainer0".into(),
                role: "trainer".into(),
                command: Some(pb::process_spec::Command::Argv(pb::Argv {
                    args: args.into_iter().map(String::from).collect(),
                })),
                env: env
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<HashMap<_, _>>(),
                cwd: String::new(),
            }],
        }
    }

    #[test]
    fn accepts_ordinary_requests() {
        assert!(check_spawn(&spawn(vec!["python3", "t.py"], vec![("A", "1")])).is_ok());
    }

    #[test]
    fn refuses_oversized_or_malformed_requests() {
        let long = "x".repeat(MAX_ARGV_BYTES + 1);
        for (req, needle) in [
            (spawn(vec![], vec![]), "empty argv"),
            (spawn(vec![&long], vec![]), "exceeds"),
            (spawn(vec!["a"], vec![("A=B", "1")]), "invalid environment"),
            (spawn(vec!["a\0b"], vec![]), "NUL"),
        ] {
            let err = check_spawn(&req).unwrap_err();
            assert!(err.message().contains(needle), "{}", err.message());
        }
        assert!(check_job_id("../x").is_err());
        assert!(check_job_id("").is_err());
        assert!(check_job_id(&"a".repeat(200)).is_err());
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn spec() -> impl Strategy<Value = pb::ProcessSpec> {
        (
            "[\\PC]{0,40}",
            proptest::collection::vec("[\\PC]{0,20}", 0..5),
            proptest::collection::hash_map("[\\PC]{0,10}", "[\\PC]{0,10}", 0..5),
            any::<bool>(),
        )
            .prop_map(|(label, args, env, shell)| pb::ProcessSpec {
                label,
                role: "trainer".into(),
                command: Some(if shell {
                    pb::process_spec::Command::Shell(args.join(" "))
                } else {
                    pb::process_spec::Command::Argv(pb::Argv { args })
                }),
                env,
                cwd: String::new(),
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Accepted requests satisfy every invariant the spawner relies on; none panics.
        #[test]
        fn accepted_spawns_are_well_formed(id in "[\\PC]{0,20}", procs in proptest::collection::vec(spec(), 0..4)) {
            let req = pb::SpawnRequest { job_id: id, workspace: "ws".into(), processes: procs, lease_ms: 0 };
            if check_spawn(&req).is_ok() {
                prop_assert!(!req.job_id.is_empty() && !req.job_id.contains('/'));
                for p in &req.processes {
                    for (k, v) in &p.env {
                        prop_assert!(!k.is_empty() && !k.contains('=') && !k.contains('\0') && !v.contains('\0'));
                    }
                    if let Some(pb::process_spec::Command::Argv(a)) = &p.command {
                        prop_assert!(!a.args.is_empty() && !a.args[0].is_empty());
                    }
                }
            }
        }
    }
}
