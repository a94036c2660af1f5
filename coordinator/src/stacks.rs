//! The Python stack of every process of a running job, from every host at once (each agent
//! runs `py-spy dump`, see the agent's `jobs/stacks.rs`). `dgl-coord stacks` prints it; a
//! launch that sees its job stall calls [`dump`] with the hosts it holds.

use std::time::Duration;

use dglrun_proto::pb;
use serde::Serialize;

use crate::cluster::{self, AgentAccess, Host};
use crate::config::IpConfig;
use crate::launch::events::escape_del_c1;
use crate::launch::output::escape_controls;

/// How long one agent may take to dump a job: it runs at most 8 py-spy at once, 20 s each at
/// worst, for up to 128 processes.
pub const DUMP_TIMEOUT: Duration = Duration::from_secs(330);

/// One process's stack, as a host's agent dumped it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ProcessStack {
    pub job_id: String,
    /// ip_config line, from 0.
    pub machine: usize,
    /// Its agent, `IP:port`.
    pub address: String,
    /// The host's name as its agent reports it.
    pub hostname: String,
    /// As the launch labels it (`server0`, `trainer1`, `trainers`); a torchrun worker
    /// `trainer<LOCAL_RANK>`, a trainer's Python child `<trainer> sampler<k>`.
    pub label: String,
    /// `server`, `trainer`, `sampler`, `torchrun`, `helper`, `child`, `process` or `orphan`.
    pub role: String,
    pub pid: u32,
    pub command: String,
    /// py-spy's output; None when the dump failed.
    pub stack: Option<String>,
    /// The stack was cut at the agent's bound (64 KiB).
    pub truncated: bool,
    /// Where the main thread is: its innermost frame, e.g. `sleep_forever (train.py:249)`.
    pub location: Option<String>,
    /// Why there is no stack.
    pub error: Option<String>,
}

/// What one host answered.
#[derive(Clone, Debug, Serialize)]
pub struct HostStacks {
    pub machine: usize,
    pub address: String,
    pub hostname: String,
    /// The agent knows the job.
    pub knows_job: bool,
    /// Why the host gave no stacks (unreachable, py-spy missing, ...).
    pub error: Option<String>,
    pub processes: Vec<ProcessStack>,
    /// Python processes past the agent's bound, not dumped.
    pub omitted: u32,
    /// Processes of the job that are not Python, not dumped.
    pub not_python: u32,
}

/// Every host's answer; it succeeded when `errors` is empty.
#[derive(Clone, Debug, Serialize)]
pub struct StacksReport {
    pub job_id: String,
    pub hosts: Vec<HostStacks>,
    /// One line per problem, naming the host (and the process).
    pub errors: Vec<String>,
}

/// `text` with every control character but newline and tab shown as `\xNN`: a process's
/// command line and py-spy's output must not drive the terminal.
fn terminal_safe(text: &str) -> String {
    String::from_utf8_lossy(&escape_controls(text.as_bytes(), true)).into_owned()
}

/// The innermost frame of the main thread (else of the first thread) in py-spy's text:
/// frames are the indented lines under a `Thread ...` line, innermost first.
pub fn location(stack: &str) -> Option<String> {
    let lines: Vec<&str> = stack.lines().collect();
    let threads: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("Thread "))
        .map(|(i, _)| i)
        .collect();
    let main = threads
        .iter()
        .find(|&&i| lines[i].contains("\"MainThread\""))
        .or(threads.first())?;
    let frame = lines.get(main + 1)?;
    (frame.starts_with(' ') && !frame.trim().is_empty()).then(|| frame.trim().to_string())
}

impl StacksReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// Every process's stack, host by host.
    pub fn processes(&self) -> impl Iterator<Item = &ProcessStack> {
        self.hosts.iter().flat_map(|h| h.processes.iter())
    }

    /// Each stack under a header naming the host and the process, then where each one is.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for p in self.processes() {
            // py-spy's own first line names the command.
            out.push_str(&format!(
                "==> m{} ({}, {}) {} [{}], pid {}\n",
                p.machine, p.address, p.hostname, p.label, p.role, p.pid
            ));
            match (&p.stack, &p.error) {
                (Some(s), _) => {
                    out.push_str(s.trim_end());
                    out.push('\n');
                    if p.truncated {
                        out.push_str("(cut at the agent's 64 KiB bound)\n");
                    }
                }
                (None, Some(e)) => out.push_str(&format!("{}\nno stack: {e}\n", p.command)),
                (None, None) => out.push_str("no stack\n"),
            }
            out.push('\n');
        }
        for h in &self.hosts {
            if h.omitted > 0 {
                out.push_str(&format!(
                    "m{} {}: {} more Python processes not dumped (the agent's bound)\n",
                    h.machine, h.address, h.omitted
                ));
            }
        }
        out.push_str(&self.render_summary());
        terminal_safe(&out)
    }

    /// One line per process: where its main thread is.
    pub fn render_summary(&self) -> String {
        let rows: Vec<[String; 3]> = self
            .processes()
            .map(|p| {
                [
                    format!("m{} {}", p.machine, p.label),
                    format!("pid {}", p.pid),
                    p.location
                        .clone()
                        .or_else(|| p.error.as_ref().map(|e| format!("no stack: {e}")))
                        .unwrap_or_else(|| "no frame".into()),
                ]
            })
            .collect();
        if rows.is_empty() {
            return String::new();
        }
        let w0 = rows.iter().map(|r| r[0].len()).max().unwrap_or(0);
        let w1 = rows.iter().map(|r| r[1].len()).max().unwrap_or(0);
        let mut out = format!("where each process of job {} is:\n", self.job_id);
        for [a, b, c] in rows {
            out.push_str(&format!("  {a:<w0$}  {b:<w1$}  {c}\n"));
        }
        terminal_safe(&out)
    }

    /// One JSON object per process, one a line.
    pub fn render_json_lines(&self) -> String {
        self.processes()
            .filter_map(|p| serde_json::to_string(p).ok())
            .map(|l| escape_del_c1(l) + "\n")
            .collect()
    }
}

/// What a host's DumpStacks answered, as that host's part of the report.
fn host_stacks(
    host: &Host,
    job_id: &str,
    reply: Result<pb::DumpStacksReply, tonic::Status>,
) -> HostStacks {
    let address = host.addr.to_string();
    let mut h = HostStacks {
        machine: host.rank,
        address: address.clone(),
        hostname: host.hello.hostname.clone(),
        knows_job: true,
        error: None,
        processes: Vec::new(),
        omitted: 0,
        not_python: 0,
    };
    match reply {
        Ok(r) => {
            if !r.hostname.is_empty() {
                h.hostname = r.hostname;
            }
            h.omitted = r.omitted;
            h.not_python = r.not_python;
            h.processes = r
                .processes
                .into_iter()
                .map(|p| {
                    let stack = (p.error.is_empty() || !p.stack.is_empty()).then_some(p.stack);
                    ProcessStack {
                        job_id: job_id.to_string(),
                        machine: host.rank,
                        address: address.clone(),
                        hostname: h.hostname.clone(),
                        location: stack.as_deref().and_then(location),
                        stack,
                        label: p.label,
                        role: p.role,
                        pid: p.pid,
                        command: p.command,
                        truncated: p.truncated,
                        error: (!p.error.is_empty()).then_some(p.error),
                    }
                })
                .collect();
        }
        Err(s) if s.code() == tonic::Code::NotFound => h.knows_job = false,
        Err(s) if s.code() == tonic::Code::Unimplemented => {
            h.error = Some(format!(
                "the agent (version {}) cannot dump stacks: upgrade it",
                host.hello.agent_version
            ));
        }
        Err(s) => h.error = Some(s.message().to_string()),
    }
    h
}

/// The stacks of job `job_id` from every host in `hosts`, at once. A host that fails is
/// reported in the result, never in the way of the others.
pub async fn dump(hosts: &[Host], job_id: &str, native: bool) -> StacksReport {
    let calls = hosts.iter().map(|host| async move {
        let mut client = host.client.clone();
        let call = client.dump_stacks(pb::DumpStacksRequest {
            job_id: job_id.to_string(),
            native,
        });
        let reply = match tokio::time::timeout(DUMP_TIMEOUT, call).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer within {} s",
                DUMP_TIMEOUT.as_secs()
            ))),
        };
        host_stacks(host, job_id, reply)
    });
    let hosts = futures::future::join_all(calls).await;
    report(job_id, hosts)
}

/// [`dump`] on every machine of `ips`, connecting first; an unreachable host is reported.
pub async fn dump_cluster(
    ips: &IpConfig,
    access: &AgentAccess,
    job_id: &str,
    native: bool,
) -> StacksReport {
    let per_host = ips.machines.iter().map(|m| async move {
        let connect = cluster::connect(m.rank, m.ip, access);
        let host = match tokio::time::timeout(crate::ops::ANSWER_TIMEOUT, connect).await {
            Ok(Ok(host)) => host,
            Ok(Err(e)) => return Err((m.rank, format!("{}:{}", m.ip, access.port), e.to_string())),
            Err(_) => {
                return Err((
                    m.rank,
                    format!("{}:{}", m.ip, access.port),
                    format!(
                        "agent of machine {} at {}:{} is unreachable: no answer within {:.1} s",
                        m.rank,
                        m.ip,
                        access.port,
                        crate::ops::ANSWER_TIMEOUT.as_secs_f64()
                    ),
                ))
            }
        };
        Ok(dump(std::slice::from_ref(&host), job_id, native).await)
    });
    let mut hosts = Vec::new();
    for r in futures::future::join_all(per_host).await {
        match r {
            Ok(mut part) => hosts.append(&mut part.hosts),
            Err((machine, address, error)) => hosts.push(HostStacks {
                machine,
                address,
                hostname: String::new(),
                knows_job: false,
                error: Some(error),
                processes: Vec::new(),
                omitted: 0,
                not_python: 0,
            }),
        }
    }
    report(job_id, hosts)
}

/// The report of `hosts`' answers, with one error line per problem.
fn report(job_id: &str, hosts: Vec<HostStacks>) -> StacksReport {
    let mut errors = Vec::new();
    for h in &hosts {
        if let Some(e) = &h.error {
            errors.push(format!("m{} ({}): {e}", h.machine, h.address));
        }
        for p in &h.processes {
            if let Some(e) = &p.error {
                errors.push(format!(
                    "m{} ({}): {} (pid {}): {e}",
                    h.machine, h.address, p.label, p.pid
                ));
            }
        }
    }
    let answered = hosts.iter().any(|h| h.error.is_none());
    if answered && !hosts.iter().any(|h| h.knows_job && h.error.is_none()) {
        let asked: Vec<String> = hosts
            .iter()
            .filter(|h| h.error.is_none())
            .map(|h| format!("m{} ({})", h.machine, h.address))
            .collect();
        errors.push(format!(
            "no agent knows job {job_id:?} (asked {}); `dgl-coord status` lists the jobs",
            asked.join(", ")
        ));
    }
    let knowing = hosts.iter().filter(|h| h.knows_job && h.error.is_none());
    if knowing.clone().next().is_some() && knowing.clone().all(|h| h.processes.is_empty()) {
        let others: u32 = knowing.map(|h| h.not_python).sum();
        errors.push(format!(
            "job {job_id:?} has no Python process running ({others} other processes)"
        ));
    }
    StacksReport {
        job_id: job_id.to_string(),
        hosts,
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "Process 4250: python3 fake_dgl.py --hang\n\
        Python v3.11.7 (/usr/bin/python3.11)\n\
        \n\
        Thread 4260 (idle): \"Thread-1\"\n    \
        wait (threading.py:327)\n\
        \n\
        Thread 4250 (idle): \"MainThread\"\n    \
        sleep_forever (fake_dgl.py:249)\n    \
        run_trainer (fake_dgl.py:571)\n";

    #[test]
    fn the_location_is_the_main_threads_innermost_frame() {
        assert_eq!(
            location(DUMP).as_deref(),
            Some("sleep_forever (fake_dgl.py:249)")
        );
        let other = "Thread 7 (idle): \"worker\"\n    poll (x.py:3)\n";
        assert_eq!(location(other).as_deref(), Some("poll (x.py:3)"));
        assert_eq!(location("Process 1: python3\n"), None);
        assert_eq!(location("Thread 1 (idle): \"MainThread\"\n"), None);
    }

    fn process(
        machine: usize,
        label: &str,
        stack: Option<&str>,
        error: Option<&str>,
    ) -> ProcessStack {
        ProcessStack {
            job_id: "j".into(),
            machine,
            address: format!("10.0.0.{}:47001", machine + 1),
            hostname: format!("node{machine}"),
            label: label.into(),
            role: "trainer".into(),
            pid: 4250,
            command: "python3 fake_dgl.py --hang \x1b[2J".into(),
            stack: stack.map(str::to_string),
            truncated: false,
            location: stack.and_then(location),
            error: error.map(str::to_string),
        }
    }

    fn host(
        machine: usize,
        processes: Vec<ProcessStack>,
        error: Option<&str>,
        knows: bool,
    ) -> HostStacks {
        HostStacks {
            machine,
            address: format!("10.0.0.{}:47001", machine + 1),
            hostname: format!("node{machine}"),
            knows_job: knows,
            error: error.map(str::to_string),
            processes,
            omitted: 0,
            not_python: 0,
        }
    }

    #[test]
    fn a_report_names_each_process_and_where_it_is() {
        let r = report(
            "j",
            vec![
                host(
                    0,
                    vec![process(0, "trainer0", Some(DUMP), None)],
                    None,
                    true,
                ),
                host(
                    1,
                    vec![process(
                        1,
                        "trainer0",
                        None,
                        Some("py-spy failed (exit 1): gone"),
                    )],
                    None,
                    true,
                ),
                host(
                    2,
                    Vec::new(),
                    Some("py-spy is not installed on node2 ..."),
                    true,
                ),
            ],
        );
        insta::assert_snapshot!(r.render_text());
        assert_eq!(
            r.errors,
            [
                "m1 (10.0.0.2:47001): trainer0 (pid 4250): py-spy failed (exit 1): gone",
                "m2 (10.0.0.3:47001): py-spy is not installed on node2 ...",
            ]
        );
        let lines: Vec<serde_json::Value> = r
            .render_json_lines()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["label"], "trainer0");
        assert_eq!(lines[0]["location"], "sleep_forever (fake_dgl.py:249)");
        assert_eq!(lines[1]["stack"], serde_json::Value::Null);
    }

    #[test]
    fn a_job_no_agent_knows_is_an_error_naming_the_hosts_asked() {
        let r = report(
            "nope",
            vec![
                host(0, Vec::new(), None, false),
                host(1, Vec::new(), None, false),
            ],
        );
        assert_eq!(
            r.errors,
            ["no agent knows job \"nope\" (asked m0 (10.0.0.1:47001), m1 (10.0.0.2:47001)); `dgl-coord status` lists the jobs"]
        );
        // Known on one host is enough: the others may hold no part of it.
        let trainer = process(0, "trainer0", Some(DUMP), None);
        let r = report(
            "j",
            vec![
                host(0, vec![trainer], None, true),
                host(1, Vec::new(), None, false),
            ],
        );
        assert!(r.ok(), "{:?}", r.errors);
        let r = report("j", vec![host(0, Vec::new(), None, true)]);
        assert_eq!(
            r.errors,
            ["job \"j\" has no Python process running (0 other processes)"]
        );
    }
}
