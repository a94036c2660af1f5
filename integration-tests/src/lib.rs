//! Test harness: real `dgl-agent` processes on their own 127.x.y.z addresses, each with its own
//! root directory, as if each were a separate machine. `netns` builds truly separate hosts
//! (network namespaces on a bridge) for tests that cut links; `slurm` a real Slurm cluster.

// Test code throughout: a failed unwrap is a failed test, and a test may set its own
// environment and sleep.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod bench;
pub mod fake_dgl;
mod fresh_bins;
pub mod netns;
pub mod partitions;
pub mod run;
pub mod slurm;
pub mod wire;

pub use partitions::gen_partitions;

/// The workspace directory (under each agent root) of [`TestCluster::with_workspace`].
pub const WS: &str = "ws";

/// Directory holding the built binaries (`target/debug` or `target/release`), with the agent
/// and `dgl-coord` built there through cargo if they are missing or stale.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // Test binaries live in target/<profile>/deps, other binaries in target/<profile>.
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.ends_with("deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    };
    fresh_bins::ensure(&dir);
    dir
}

/// Path of a workspace binary; panics with the command to run when it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build the workspace (`cargo build --workspace --bins`)",
        p.display()
    );
    p
}

/// The repository's root directory.
pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// DGL's real launch behaviour and real DGL partition sets (see its README.md).
pub fn compat_dir() -> PathBuf {
    fixtures_dir().join("dgl-compat")
}

/// True when running under CI (`CI` set to anything but empty, `0` or `false`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"))
}

/// Reports that `test` cannot run here. Outside CI it is skipped with the reason; under CI a
/// test that cannot run fails, so a missing capability never passes as green.
pub fn cannot_run(test: &str, why: &str) {
    assert!(
        !in_ci(),
        "{test} cannot run here ({why}); under CI every test must run: .ci/run provides what it needs"
    );
    eprintln!("SKIPPED {test}: {why}");
}

/// Snapshot filters (regex, replacement) for what changes from run to run on any machine:
/// pids, job ids, durations in ms. See [`TestCluster::redactions`] for a cluster's own.
pub fn redactions() -> Vec<(String, String)> {
    [
        (r"\bpid \d+", "pid [PID]"),
        (r"dglrun-\d+-[0-9a-f]{8}", "[JOB]"),
        (r"\b\d+ ms\b", "[N] ms"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect()
}

/// Python fixtures (stand-in DGL workload and torchrun).
pub fn fixtures_dir() -> PathBuf {
    repo_dir().join("integration-tests/fixtures")
}

/// `PYTHON -c ... TOOL` for one of DGL's tools (`fixtures/dgl-tools`), unmodified, with
/// multiprocessing's "spawn" start method.
///
/// launch.py and distgraphlaunch.py fork their clean-up process (the default "fork") while
/// their threads are starting `ssh` through subprocess. A fork inside one thread's window
/// between pipe() and exec() keeps that thread's exec-status pipe open in the clean-up process:
/// the thread never returns and the tool deadlocks, over ssh as over the shims (seen under
/// load). A spawned clean-up process inherits no such pipe.
pub fn dgl_tool(python: &str, tool: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(python);
    cmd.arg("-c")
        .arg(
            "import multiprocessing, runpy, sys\n\
             multiprocessing.set_start_method('spawn')\n\
             sys.argv = sys.argv[1:]\n\
             runpy.run_path(sys.argv[0], run_name='__main__')\n",
        )
        .arg(fixtures_dir().join("dgl-tools").join(tool));
    cmd
}

/// `dgl-coord shims --dir DIR` run as `coord` (a `dgl-coord` set up for some agents); panics
/// naming what it printed when it fails. Returns DIR.
pub fn write_shims(mut coord: std::process::Command, dir: PathBuf) -> PathBuf {
    let out = coord
        .arg("shims")
        .arg("--dir")
        .arg(&dir)
        .output()
        .expect("run dgl-coord shims");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("ssh").exists(), "no ssh shim in {}", dir.display());
    dir
}

/// A block of loopback addresses no other test uses: 127.B.C.2, 127.B.C.3, ...
fn unique_ip_block() -> (u8, u8) {
    // Tests run as separate processes in parallel; a random block makes collisions unlikely,
    // and agents fail loudly (address in use) if one happens.
    let b = rand::random_range(16u8..250);
    let c = rand::random_range(0u8..=255);
    (b, c)
}

pub struct Agent {
    pub ip: IpAddr,
    pub root: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    extra_args: Vec<String>,
    /// Set in the agent's environment (see [`TestCluster::set_agent_env`]).
    env: Vec<(String, String)>,
}

impl Agent {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub agents: Vec<Agent>,
    /// The token file every agent of the cluster uses and `coord()` hands to dgl-coord.
    pub token_file: PathBuf,
    /// False when the agents were left to find (and create) the per-user default token file
    /// under the cluster's own `XDG_CONFIG_HOME`.
    explicit_token: bool,
    /// Open-file limit (soft and hard) the agents run under, via prlimit.
    nofile: Option<u64>,
}

/// Writes a fresh 256-bit hex token to `path` with mode 0600, as `openssl rand -hex 32`
/// into a private file would; returns the token.
pub fn write_token_file(path: &Path) -> Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let token: String = (0..2)
        .map(|_| format!("{:032x}", rand::random::<u128>()))
        .collect();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create token file {}", path.display()))?;
    writeln!(f, "{token}")?;
    Ok(token)
}

/// The token in a token file (surrounding whitespace trimmed).
pub fn read_token(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_string()
}

/// A bare gRPC client of one agent, carrying the cluster's token (loopback: plaintext h2c).
pub type RawClient = dglrun_proto::pb::agent_client::AgentClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        dglrun_proto::meta::ClientMeta,
    >,
>;

impl TestCluster {
    /// A raw client of agent `m` for tests that call the agent directly. It connects on first
    /// use, so it must be made inside a tokio runtime.
    pub fn client(&self, m: usize) -> RawClient {
        let uri = format!("http://{}:{}", self.ip(m), self.port);
        let channel = tonic::transport::Endpoint::from_shared(uri)
            .expect("an agent address is a valid URI")
            .connect_lazy();
        let meta = dglrun_proto::meta::ClientMeta::new(Some(&self.token()))
            .expect("the cluster's token is printable ASCII");
        dglrun_proto::pb::agent_client::AgentClient::with_interceptor(channel, meta)
    }

    /// Starts `n` agents, machine i on 127.B.C.(i+2), root `<dir>/host<i>`.
    pub fn start(n: usize) -> Self {
        Self::start_with(n, &[])
    }

    /// As [`start`](Self::start), with extra `dgl-agent` flags for every agent.
    pub fn start_with(n: usize, extra_args: &[&str]) -> Self {
        Self::start_inner(n, extra_args, true)
    }

    /// As [`start_with`](Self::start_with), but no token is given to anyone: the agents use
    /// (and the first creates) the per-user default token file, with `XDG_CONFIG_HOME` set to
    /// the cluster's own directory; `coord()` finds it the same way.
    pub fn start_zero_setup(n: usize, extra_args: &[&str]) -> Self {
        Self::start_inner(n, extra_args, false)
    }

    fn new_empty(explicit_token: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let token_file = if explicit_token {
            let p = dir.path().join("token");
            write_token_file(&p).expect("token file");
            p
        } else {
            dir.path().join("config/dglrun/token")
        };
        Self {
            dir,
            port: dglrun_proto::DEFAULT_AGENT_PORT,
            agents: Vec::new(),
            token_file,
            explicit_token,
            nofile: None,
        }
    }

    /// As [`start_with`](Self::start_with), each agent under `prlimit --nofile=N:N`.
    pub fn start_with_nofile(n: usize, extra_args: &[&str], nofile: u64) -> Self {
        let (b, c) = unique_ip_block();
        let mut cluster = Self::new_empty(true);
        cluster.nofile = Some(nofile);
        cluster.add_agents(n, (b, c), extra_args);
        cluster
    }

    /// `XDG_CONFIG_HOME` of every process the cluster starts: never the user's own.
    pub fn config_home(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    /// The token every agent of the cluster requires.
    pub fn token(&self) -> String {
        read_token(&self.token_file)
    }

    fn start_inner(n: usize, extra_args: &[&str], explicit_token: bool) -> Self {
        let mut cluster = Self::new_empty(explicit_token);
        cluster.add_agents(n, unique_ip_block(), extra_args);
        cluster
    }

    fn add_agents(&mut self, n: usize, (b, c): (u8, u8), extra_args: &[&str]) {
        let cluster = self;
        for i in 0..n {
            let ip = IpAddr::V4(Ipv4Addr::new(127, b, c, i as u8 + 2));
            let root = cluster.dir.path().join(format!("host{i}"));
            fs::create_dir_all(&root).expect("agent root");
            cluster.agents.push(Agent {
                ip,
                root,
                log: cluster.dir.path().join(format!("agent{i}.log")),
                child: None,
                extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
                env: Vec::new(),
            });
            cluster.spawn_agent(i).expect("start agent");
        }
    }

    /// One agent at a given loopback address (for certificates that must name it).
    pub fn start_at(ip: &str, extra_args: &[&str]) -> Self {
        let mut cluster = Self::new_empty(true);
        let root = cluster.dir.path().join("host0");
        fs::create_dir_all(&root).expect("agent root");
        cluster.agents.push(Agent {
            ip: ip.parse().expect("an IP address"),
            root,
            log: cluster.dir.path().join("agent0.log"),
            child: None,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
        });
        cluster.spawn_agent(0).expect("start agent");
        cluster
    }

    fn spawn_agent(&mut self, i: usize) -> Result<()> {
        let port = self.port;
        let token = self.explicit_token.then(|| self.token_file.clone());
        let config_home = self.config_home();
        let nofile = self.nofile;
        let a = &mut self.agents[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&a.log)?;
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(bin("dgl-agent"));
                c
            }
            None => Command::new(bin("dgl-agent")),
        };
        cmd.arg("--listen")
            .arg(format!("{}:{}", a.ip, port))
            .arg("--root")
            .arg(&a.root);
        // A test that names its own token file means that one.
        if let Some(t) = token.filter(|_| !a.extra_args.iter().any(|x| x == "--token-file")) {
            cmd.arg("--token-file").arg(t);
        }
        let child = cmd
            .args(&a.extra_args)
            .args(root_flag())
            .envs(a.env.iter().map(|(k, v)| (k, v)))
            .env("XDG_CONFIG_HOME", config_home)
            .env_remove("DGL_AGENT_TOKEN")
            .env_remove("DGL_AGENT_TOKEN_FILE")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("spawn dgl-agent")?;
        let child = wait_until_listening(child, &a.log, Duration::from_secs(20))
            .with_context(|| format!("agent {i} at {}", a.ip))?;
        a.child = Some(child);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    pub fn ip(&self, i: usize) -> IpAddr {
        self.agents[i].ip
    }

    pub fn root(&self, i: usize) -> &Path {
        &self.agents[i].root
    }

    /// A scratch directory on the "master host" (outside every agent root).
    pub fn local(&self) -> PathBuf {
        let p = self.dir.path().join("local");
        fs::create_dir_all(&p).expect("local dir");
        p
    }

    /// Writes `<local>/ip_config.txt` listing every agent with DGL server port `server_port`.
    pub fn ip_config_file_with_port(&self, server_port: u16) -> PathBuf {
        let p = self.local().join("ip_config.txt");
        let mut f = fs::File::create(&p).expect("ip_config");
        for a in &self.agents {
            writeln!(f, "{} {}", a.ip, server_port).expect("write ip_config");
        }
        p
    }

    pub fn ip_config_file(&self) -> PathBuf {
        self.ip_config_file_with_port(30050)
    }

    /// A `dgl-coord` command aimed at this cluster's agents.
    pub fn coord(&self) -> Command {
        let mut c = Command::new(bin("dgl-coord"));
        c.env("DGL_AGENT_PORT", self.port.to_string())
            .env_remove("DGL_AGENT_TOKEN")
            .env("XDG_CONFIG_HOME", self.config_home())
            .current_dir(self.local());
        if self.explicit_token {
            c.env("DGL_AGENT_TOKEN_FILE", &self.token_file);
        } else {
            c.env_remove("DGL_AGENT_TOKEN_FILE");
        }
        c
    }

    /// Starts `n` agents whose workspace [`WS`] holds what `dgl-coord copy` would have left
    /// (see [`fake_dgl::write_workspace`]).
    pub fn with_workspace(n: usize) -> Self {
        Self::with_workspace_on_port(n, 30050)
    }

    /// [`with_workspace`](Self::with_workspace) with DGL's servers on `server_port`: tests
    /// running at the same time then never share a server port number (an agent's socket
    /// table shows a port's listeners on every address of the machine).
    pub fn with_workspace_on_port(n: usize, server_port: u16) -> Self {
        let c = Self::start(n);
        let ip_config = fs::read(c.ip_config_file_with_port(server_port)).expect("ip_config");
        for i in 0..c.len() {
            fake_dgl::write_workspace(c.root(i), &ip_config, c.len());
        }
        c
    }

    /// `dgl-coord launch` of `command` on the [`with_workspace`](Self::with_workspace) layout
    /// (see [`fake_dgl::launch`]).
    pub fn launch(&self, flags: &[&str], command: &str) -> Command {
        fake_dgl::launch(self.coord(), flags, command)
    }

    /// [`launch`](Self::launch) in direct mode with `trainers` trainers per machine.
    pub fn launch_direct(&self, trainers: &str, flags: &[&str], command: &str) -> Command {
        let mut all = vec!["--num_trainers", trainers, "--trainer-mode", "direct"];
        all.extend_from_slice(flags);
        self.launch(&all, command)
    }

    /// Snapshot filters (regex, replacement) for what changes from run to run: the temporary
    /// directory, each agent's address (`[IP0]`, ...), the agent port, pids, job ids and
    /// durations. For `insta::Settings::add_filter`.
    pub fn redactions(&self) -> Vec<(String, String)> {
        let escape = |s: &str| s.replace('.', r"\.");
        let mut f = vec![(
            escape(&self.dir.path().display().to_string()),
            "[TMP]".to_string(),
        )];
        for (i, a) in self.agents.iter().enumerate() {
            f.push((
                format!(r"{}\b", escape(&a.ip.to_string())),
                format!("[IP{i}]"),
            ));
        }
        f.push((format!(r"\b{}\b", self.port), "[PORT]".to_string()));
        f.extend(redactions());
        f
    }

    /// SIGKILLs agent i (no clean-up: as if the host crashed).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM to agent i and waits for it to exit.
    pub fn stop_agent(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let mut c = self.agents[i].child.take()?;
        terminate(&mut c, Duration::from_secs(20))
    }

    pub fn restart_agent(&mut self, i: usize) {
        self.kill_agent(i);
        self.spawn_agent(i).expect("restart agent");
    }

    pub fn agent_log(&self, i: usize) -> String {
        fs::read_to_string(&self.agents[i].log).unwrap_or_default()
    }

    /// Restarts agent i with `env` added to its environment (e.g. a PATH holding stand-ins).
    pub fn set_agent_env(&mut self, i: usize, env: &[(&str, &str)]) {
        self.agents[i].env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.restart_agent(i);
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            if let Some(mut c) = a.child.take() {
                terminate(&mut c, Duration::from_secs(10));
            }
        }
    }
}

/// Waits for the first stdout line of a freshly spawned `dgl-agent` ("listening on ...") and
/// keeps draining the rest so the agent never blocks on a full pipe. On failure the agent is
/// killed and the error carries its log.
pub fn wait_until_listening(mut child: Child, log: &Path, timeout: Duration) -> Result<Child> {
    let stdout = child.stdout.take().context("agent stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        for _ in lines {}
    });
    match rx.recv_timeout(timeout) {
        Ok(line) if line.contains("listening on") => Ok(child),
        other => {
            let _ = child.kill();
            let _ = child.wait();
            let log = fs::read_to_string(log).unwrap_or_default();
            bail!("did not start ({other:?}); log:\n{log}")
        }
    }
}

/// Tests and CI run as root; the agent refuses that unless told.
pub fn root_flag() -> Option<&'static str> {
    nix::unistd::geteuid().is_root().then_some("--allow-root")
}

/// SIGTERM, wait up to `grace`, then SIGKILL.
pub fn terminate(c: &mut Child, grace: Duration) -> Option<std::process::ExitStatus> {
    let pid = nix::unistd::Pid::from_raw(c.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = c.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    c.wait().ok()
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Waits until none of `pids` is alive; returns those still alive after `timeout`.
pub fn wait_gone(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let live: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if live.is_empty() || Instant::now() >= deadline {
            return live;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every live process whose environment carries `KEY=VALUE`.
pub fn pids_with_env(key: &str, value: &str) -> Vec<u32> {
    let needle = format!("{key}={value}");
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(env) = fs::read(format!("/proc/{pid}/environ")) {
            if env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()) && alive(pid) {
                out.push(pid);
            }
        }
    }
    out
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    std::io::copy(&mut f, &mut h).expect("read");
    hex::encode(h.finalize())
}

/// Every regular file under `dir`, relative to it, sorted.
pub fn list_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else if let Ok(rel) = p.strip_prefix(base) {
                out.push(rel.to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    /// nextest runs every test in its own process, so setting CI here reaches no other test.
    #[test]
    fn a_test_that_cannot_run_fails_under_ci_and_is_skipped_elsewhere() {
        std::env::set_var("CI", "false");
        super::cannot_run("probe", "nothing needed");
        std::env::set_var("CI", "true");
        let under_ci = std::panic::catch_unwind(|| super::cannot_run("probe", "no namespaces"));
        let message = under_ci.expect_err("under CI=true a test that cannot run must fail");
        let text = message
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(
            text.contains("probe cannot run here (no namespaces)"),
            "{text}"
        );
    }

    #[test]
    fn the_compat_data_is_in_the_repository() {
        let dir = super::compat_dir();
        assert!(dir.join("launch_cases.json").is_file(), "{}", dir.display());
        for n in [2, 4] {
            assert!(dir
                .join(format!("dgl-partitions/p{n}/synth.json"))
                .is_file());
        }
    }
}
