//! Real separate hosts for fault tests: Linux network namespaces joined by veth pairs to a
//! bridge, each host running its own `dgl-agent` on its own address, and a coordinator
//! namespace from which `dgl-coord` runs (`ip netns exec`).
//!
//! Layout of one cluster, `T` being its 4-hex-digit id and `198.A.B.0/24` its block (inside
//! the RFC 2544 benchmarking range 198.18.0.0/15, never any other):
//!
//! ```text
//!   netns dgT-sw:  bridge br0 ── veth co ─┬─ netns dgT-co: eth0 198.A.B.1   (dgl-coord)
//!                              ── veth h0 ─┼─ netns dgT-h0: eth0 198.A.B.10  (dgl-agent 0)
//!                              ── veth h1 ─┴─ netns dgT-h1: eth0 198.A.B.11  (dgl-agent 1) ...
//! ```
//!
//! Nothing is created in the root namespace: each veth pair is made inside the switch
//! namespace with its peer placed straight into its host's namespace, so interface names
//! (all short, well under Linux's 15 characters) can clash with nothing outside the cluster,
//! and all test traffic stays inside these namespaces (and their loopbacks). Deleting the
//! namespaces on drop removes every link with them.
//!
//! Processes in the namespaces share the test's pid namespace and file system: /proc scans and
//! record files work as on one host.

use std::fs;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{alive, bin, root_flag, terminate, wait_until_listening};

/// The agents' port in every host namespace (each namespace has its own ports).
pub const AGENT_PORT: u16 = dglrun_proto::DEFAULT_AGENT_PORT;

/// Why namespaces cannot be made here, or None when they can. Only these reasons justify
/// skipping a test: anything failing after this check fails the test.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => {}
        _ => return Some("the `ip` command (iproute2) is not available".into()),
    }
    let probe = format!("dg{:04x}-pr", rand::random::<u16>());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Ok(o) if o.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).output();
            None
        }
        Ok(o) => Some(format!(
            "`ip netns add` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run `ip netns add`: {e}")),
    }
}

/// Namespaces of this process's live clusters, for [`delete_on_signal`].
static LIVE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<String>> {
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Directories [`delete_on_signal`] removes too (large generated data).
static DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// After [`delete_on_signal`], a signal also removes `dir` (gone already is fine).
pub fn remove_on_signal(dir: &Path) {
    DIRS.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(dir.to_path_buf());
}

/// Live pids in namespace `ns`.
fn pids_in(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .filter(|&p| alive(p))
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILLs everything in `namespaces` (a namespace lives on while a process is in it), then
/// deletes them.
fn delete_namespaces(namespaces: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids: Vec<u32> = namespaces.iter().flat_map(|ns| pids_in(ns)).collect();
        if pids.is_empty() || Instant::now() >= deadline {
            break;
        }
        for p in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for ns in namespaces.iter().rev() {
        if let Err(e) = ip(&["netns", "del", ns]) {
            eprintln!("netns teardown: {e:#}");
        }
    }
}

/// Write end of the socket [`on_signal`] writes the signal's number to.
static SIGNAL_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(sig: nix::libc::c_int) {
    let fd = SIGNAL_FD.load(std::sync::atomic::Ordering::SeqCst);
    let b = sig as u8;
    // SAFETY: write(2) on a descriptor kept open for the process's life, from a one-byte
    // buffer on the stack; it is async-signal-safe.
    unsafe { nix::libc::write(fd, (&b as *const u8).cast(), 1) };
}

/// From now on SIGINT and SIGTERM delete every namespace of this process's clusters, and what
/// runs in them, before it exits (with 128 + the signal): a benchmark stopped with Ctrl-C
/// leaves nothing behind. A handler, not a blocked mask: child processes inherit a mask, and
/// an agent with SIGTERM blocked would never stop.
pub fn delete_on_signal() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    use std::io::Read;
    use std::os::fd::IntoRawFd;
    let (mut rx, tx) = std::os::unix::net::UnixStream::pair().context("socketpair")?;
    SIGNAL_FD.store(tx.into_raw_fd(), std::sync::atomic::Ordering::SeqCst);
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only calls write(2), which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.context("install a signal handler")?;
    }
    std::thread::spawn(move || {
        let mut b = [0u8];
        if rx.read_exact(&mut b).is_err() {
            return;
        }
        let namespaces = live().clone();
        eprintln!("signal {}: deleting {} namespaces", b[0], namespaces.len());
        delete_namespaces(&namespaces);
        for d in DIRS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            let _ = fs::remove_dir_all(d);
        }
        std::process::exit(128 + i32::from(b[0]));
    });
    Ok(())
}

/// The /24 of the link benchmark (`bench links`): 198.19.219.0/24. No other cluster is given
/// it, so a packet that leaks from one is told apart by its address.
pub const LINKS_BLOCK: (u8, u8) = (19, 219);

/// The third octet of the Slurm cluster's block (`slurm`), 198.18.255.0/24: its host link lives
/// in the root namespace, so no cluster here is ever given it.
pub const SLURM_BLOCK: u8 = 255;

/// Starts a cluster, or prints why the test is skipped and returns None.
pub fn start_or_skip(test: &str, hosts: usize, agent_args: &[&str]) -> Option<NetCluster> {
    if let Some(why) = unavailable() {
        crate::cannot_run(
            test,
            &format!("cannot make network namespaces here ({why}); run as root with iproute2"),
        );
        return None;
    }
    Some(NetCluster::start(hosts, agent_args).expect("build the namespace cluster"))
}

pub struct NsHost {
    pub ns: String,
    pub ip: Ipv4Addr,
    pub root: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

pub struct NetCluster {
    pub dir: tempfile::TempDir,
    /// The token every agent requires; the coordinator gets its file through
    /// `DGL_AGENT_TOKEN_FILE`. Agents and coordinator talk TLS derived from it.
    pub token: String,
    pub token_file: PathBuf,
    pub hosts: Vec<NsHost>,
    pub coord_ns: String,
    pub coord_ip: Ipv4Addr,
    switch_ns: String,
    /// Namespaces made so far, deleted on drop (also after a failure half-way).
    made: Vec<String>,
    agent_args: Vec<String>,
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl NetCluster {
    /// `hosts` host namespaces, each with an agent started with `agent_args` (plus its
    /// address, root, token and, as root, `--allow-root`).
    pub fn start(hosts: usize, agent_args: &[&str]) -> Result<Self> {
        // Any /24 inside 198.18.0.0/15 but the link benchmark's and the Slurm cluster's (whose
        // host link is in the root namespace); the namespaces keep clusters
        // apart anyway, the random block just keeps a leak from one test visible as a
        // different address.
        let block = loop {
            let block = (18 + rand::random_range(0u8..2), rand::random::<u8>());
            if block != LINKS_BLOCK && block != (18, SLURM_BLOCK) {
                break block;
            }
        };
        Self::start_in(block, hosts, agent_args)
    }

    /// [`NetCluster::start`] in the block 198.A.B.0/24, `block` being (A, B).
    pub fn start_in(block: (u8, u8), hosts: usize, agent_args: &[&str]) -> Result<Self> {
        assert!(hosts <= 200, "at most 200 hosts per block");
        assert!(
            (18..=19).contains(&block.0),
            "only 198.18.0.0/15 inside namespaces"
        );
        let dir = tempfile::tempdir().context("temp dir")?;
        // The agents' roots: what a benchmark copied there goes with the namespaces.
        remove_on_signal(dir.path());
        let token_file = dir.path().join("token");
        let token = crate::write_token_file(&token_file)?;
        let (a, b) = block;
        let mut c = Self {
            dir,
            token,
            token_file,
            hosts: Vec::new(),
            coord_ns: String::new(),
            coord_ip: Ipv4Addr::new(198, a, b, 1),
            switch_ns: String::new(),
            made: Vec::new(),
            agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
        };
        let id = c.make_switch()?;
        c.coord_ns = format!("dg{id}-co");
        c.make_host_ns(&c.coord_ns.clone(), "co", c.coord_ip)?;
        for i in 0..hosts {
            let ns = format!("dg{id}-h{i}");
            let host_ip = Ipv4Addr::new(198, a, b, 10 + i as u8);
            c.make_host_ns(&ns, &format!("h{i}"), host_ip)?;
            let root = c.dir.path().join(format!("host{i}"));
            fs::create_dir_all(&root)?;
            c.hosts.push(NsHost {
                ns,
                ip: host_ip,
                root,
                log: c.dir.path().join(format!("agent{i}.log")),
                child: None,
            });
        }
        for i in 0..hosts {
            c.spawn_agent(i)?;
        }
        Ok(c)
    }

    /// Creates the switch namespace under a fresh id; returns the id.
    fn make_switch(&mut self) -> Result<String> {
        for _ in 0..20 {
            let id = format!("{:04x}", rand::random::<u16>());
            let ns = format!("dg{id}-sw");
            // `ip netns add` refuses a name in use: that is how ids stay unique per test.
            if ip(&["netns", "add", &ns]).is_err() {
                continue;
            }
            self.made.push(ns.clone());
            live().push(ns.clone());
            self.switch_ns = ns.clone();
            ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", &ns, "link", "set", "br0", "up"])?;
            return Ok(id);
        }
        bail!("no free namespace name after 20 tries")
    }

    /// A namespace with `lo`, and `eth0` at `addr` joined to the bridge by the veth `port`.
    fn make_host_ns(&mut self, ns: &str, port: &str, addr: Ipv4Addr) -> Result<()> {
        ip(&["netns", "add", ns])?;
        self.made.push(ns.to_string());
        live().push(ns.to_string());
        let sw = self.switch_ns.clone();
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["-n", &sw, "link", "set", port, "master", "br0"])?;
        ip(&["-n", &sw, "link", "set", port, "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    fn spawn_agent(&mut self, i: usize) -> Result<()> {
        let h = &mut self.hosts[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&h.log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &h.ns])
            .arg(bin("dgl-agent"))
            .arg("--listen")
            .arg(format!("{}:{AGENT_PORT}", h.ip))
            .arg("--root")
            .arg(&h.root)
            .arg("--token-file")
            .arg(&self.token_file)
            .args(&self.agent_args)
            .args(root_flag())
            .env("RUST_LOG", "info")
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            .env_remove("DGL_AGENT_TOKEN")
            .env_remove("DGL_AGENT_TOKEN_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("spawn dgl-agent")?;
        let child = wait_until_listening(child, &h.log, Duration::from_secs(30))
            .with_context(|| format!("agent {i} in {}", h.ns))?;
        h.child = Some(child);
        Ok(())
    }

    /// The namespace of the bridge, where the switch end of every link (`co`, `h0`, ...) is.
    pub fn switch_ns(&self) -> &str {
        &self.switch_ns
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    pub fn ip(&self, i: usize) -> Ipv4Addr {
        self.hosts[i].ip
    }

    pub fn root(&self, i: usize) -> &Path {
        &self.hosts[i].root
    }

    /// How dgl-coord names host i in its messages.
    pub fn host_name(&self, i: usize) -> String {
        format!("m{i} ({}:{AGENT_PORT})", self.hosts[i].ip)
    }

    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.hosts[i].child.as_ref().map(Child::id)
    }

    pub fn agent_log(&self, i: usize) -> String {
        fs::read_to_string(&self.hosts[i].log).unwrap_or_default()
    }

    /// A scratch directory of the coordinator (outside every agent root).
    pub fn local(&self) -> PathBuf {
        let p = self.dir.path().join("local");
        let _ = fs::create_dir_all(&p);
        p
    }

    /// Writes `<local>/ip_config.txt` listing every host with DGL server port `server_port`.
    pub fn ip_config_file(&self, server_port: u16) -> PathBuf {
        let p = self.local().join("ip_config.txt");
        let text: String = self
            .hosts
            .iter()
            .map(|h| format!("{} {server_port}\n", h.ip))
            .collect();
        fs::write(&p, text).expect("write ip_config");
        p
    }

    /// `dgl-coord` in the coordinator namespace, with the agents' port and token.
    pub fn coord(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.coord_ns])
            .arg(bin("dgl-coord"))
            .env("DGL_AGENT_PORT", AGENT_PORT.to_string())
            .env("DGL_AGENT_TOKEN_FILE", &self.token_file)
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            .env_remove("DGL_AGENT_TOKEN")
            .current_dir(self.local());
        c
    }

    /// Gives host i a second interface, `wan0` (one end of a veth pair whose other end, `wan1`,
    /// stays in the namespace too; at 10.254.i.2/24), carrying its
    /// default route: as on a cluster node whose ip_config address is on a private network
    /// while the default route leaves through another interface.
    pub fn add_default_route_link(&self, i: usize) {
        let ns = &self.hosts[i].ns;
        let addr = format!("10.254.{i}.2/24");
        ip(&[
            "-n", ns, "link", "add", "wan0", "type", "veth", "peer", "name", "wan1",
        ])
        .expect("add wan0");
        ip(&["-n", ns, "link", "set", "wan1", "up"]).expect("wan1 up");
        ip(&["-n", ns, "addr", "add", &addr, "dev", "wan0"]).expect("address wan0");
        ip(&["-n", ns, "link", "set", "wan0", "up"]).expect("wan0 up");
        ip(&["-n", ns, "route", "add", "default", "dev", "wan0"]).expect("default route");
    }

    /// An address that host i accepts as its own (a `local` route) but that none of its
    /// interfaces lists, as with an anycast or NAT-ed address; the coordinator's namespace
    /// routes it to host i. Returns the address.
    pub fn add_route_only_address(&self, i: usize) -> Ipv4Addr {
        let o = self.coord_ip.octets();
        let addr = Ipv4Addr::new(o[0], o[1], o[2], 200 + i as u8);
        ip(&[
            "-n",
            &self.hosts[i].ns,
            "route",
            "add",
            "local",
            &format!("{addr}/32"),
            "dev",
            "lo",
        ])
        .expect("local route");
        ip(&[
            "-n",
            &self.coord_ns,
            "route",
            "add",
            &format!("{addr}/32"),
            "via",
            &self.hosts[i].ip.to_string(),
        ])
        .expect("route from the coordinator");
        addr
    }

    /// Takes host i's link down (at the switch): its packets are dropped both ways, nothing is
    /// refused or reset, as when a cable is pulled.
    pub fn cut_link(&self, i: usize) {
        ip(&[
            "-n",
            &self.switch_ns,
            "link",
            "set",
            &format!("h{i}"),
            "down",
        ])
        .expect("cut link");
    }

    pub fn restore_link(&self, i: usize) {
        ip(&["-n", &self.switch_ns, "link", "set", &format!("h{i}"), "up"]).expect("restore link");
    }

    /// SIGKILLs agent i: no clean-up, its jobs' processes are orphaned.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.hosts[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERMs agent i and waits for it to exit (SIGKILL after `grace`).
    pub fn stop_agent(&mut self, i: usize, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.hosts[i].child.take()?;
        terminate(&mut c, grace)
    }

    /// Starts agent i again (same address, root and flags); returns once it listens, that is
    /// after its start-up clean-up.
    pub fn restart_agent(&mut self, i: usize) {
        self.kill_agent(i);
        self.spawn_agent(i).expect("restart agent");
    }

    /// Runs `f` on a thread inside the coordinator's namespace (sockets it opens live there),
    /// e.g. a proxy between dgl-coord and an agent.
    pub fn spawn_in_coord_ns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        let path = Path::new("/var/run/netns").join(&self.coord_ns);
        std::thread::spawn(move || {
            let ns = fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
            // SAFETY: setns on a valid namespace descriptor; it changes only this thread's
            // network namespace (threads it spawns inherit it).
            let r = unsafe { nix::libc::setns(ns.as_raw_fd(), nix::libc::CLONE_NEWNET) };
            if r != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
    }

    /// Pids of every live process in the cluster's namespaces (agents, jobs, dgl-coord).
    pub fn pids_in_namespaces(&self) -> Vec<u32> {
        self.made.iter().flat_map(|ns| pids_in(ns)).collect()
    }
}

impl Drop for NetCluster {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            if let Some(mut c) = h.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // A test that failed half-way may leave jobs behind; they die with the cluster.
        delete_namespaces(&self.made);
        live().retain(|ns| !self.made.contains(ns));
    }
}
