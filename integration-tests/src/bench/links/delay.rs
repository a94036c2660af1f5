//! Added latency without netem (a module this kernel lacks): every packet arriving on `eth0`
//! of a namespace goes to a netfilter queue (`iptables ... -j NFQUEUE`) and a thread of this
//! process, inside that namespace, lets it on after the delay. Arriving packets, because
//! those have left the sender's socket accounting: a packet held on its way out would count
//! against TCP's small-queue limit and throttle the sender far below the link's rate.

use std::collections::VecDeque;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

const QUEUE: u16 = 0;

/// The iptables rule, as appended (`-A`) and deleted (`-D`).
const RULE: [&str; 9] = [
    "-t",
    "raw",
    "PREROUTING",
    "-i",
    "eth0",
    "-j",
    "NFQUEUE",
    "--queue-num",
    "0",
];

fn iptables(ns: &str, op: &str) -> Result<()> {
    let mut args = vec!["netns", "exec", ns, "iptables", RULE[0], RULE[1], op];
    args.extend(&RULE[2..]);
    let out = Command::new("ip")
        .args(&args)
        .output()
        .context("run iptables")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Installs iptables from the distribution's packages when it is missing.
fn ensure_iptables() -> Result<()> {
    if Command::new("iptables").arg("-V").output().is_ok() {
        return Ok(());
    }
    eprintln!("bench: installing iptables (apt-get)");
    let st = Command::new("apt-get").arg("update").status()?;
    ensure!(st.success(), "apt-get update failed");
    let st = Command::new("apt-get")
        .args(["install", "-y", "iptables"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    ensure!(st.success(), "apt-get install iptables failed");
    Ok(())
}

/// The delay lines of some namespaces; removed (rules, then threads) on drop.
pub(super) struct DelayLines {
    namespaces: Vec<String>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
}

impl DelayLines {
    /// Holds every packet arriving on `eth0` in each of `namespaces` for `delay`.
    pub(super) fn start(namespaces: &[String], delay: Duration) -> Result<DelayLines> {
        ensure_iptables()?;
        let mut lines = DelayLines {
            namespaces: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        for ns in namespaces {
            let (ready_tx, ready) = mpsc::channel();
            let path = Path::new("/var/run/netns").join(ns);
            let stop = lines.stop.clone();
            lines.threads.push(std::thread::spawn(move || {
                hold(&path, delay, &stop, &ready_tx)
            }));
            // The queue is bound before the rule sends packets to it: a packet queued with
            // nobody bound is dropped.
            ready
                .recv()
                .with_context(|| format!("delay line in {ns} failed to start"))??;
            iptables(ns, "-A")?;
            lines.namespaces.push(ns.clone());
        }
        Ok(lines)
    }
}

impl Drop for DelayLines {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            if let Err(e) = iptables(ns, "-D") {
                eprintln!("delay line: {e:#}");
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            match t.join() {
                Ok(Err(e)) => eprintln!("delay line: {e:#}"),
                Err(_) => eprintln!("delay line: thread panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// The thread of one namespace: binds queue 0 there, then lets each packet on `delay` after it
/// arrived, in arrival order, until `stop` (when it lets on all it holds).
fn hold(
    ns: &Path,
    delay: Duration,
    stop: &AtomicBool,
    ready: &mpsc::Sender<Result<()>>,
) -> Result<()> {
    let bound = (|| -> Result<nfq::Queue> {
        let f = fs::File::open(ns).with_context(|| format!("open {}", ns.display()))?;
        // SAFETY: setns on a valid namespace descriptor; it changes only this thread's network
        // namespace, so the netlink socket opened next is that namespace's.
        if unsafe { nix::libc::setns(f.as_raw_fd(), nix::libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        let mut q = nfq::Queue::open().context("open a netfilter queue socket")?;
        q.bind(QUEUE).context("bind netfilter queue 0")?;
        // Metadata only (the verdict needs the packet's id, not its bytes); whole offloaded
        // packets (64 KiB) rather than each segment: a few thousand a second at 1 Gbit/s.
        q.set_copy_range(QUEUE, 0)?;
        q.set_recv_gso(QUEUE, true)?;
        // Room for far more than 25 ms at 10 Gbit/s in 1500-byte packets.
        q.set_queue_max_len(QUEUE, 1 << 16)?;
        q.set_nonblocking(true);
        Ok(q)
    })();
    let mut q = match bound {
        Ok(q) => {
            let _ = ready.send(Ok(()));
            q
        }
        Err(e) => {
            let msg = format!("{e:#}");
            let _ = ready.send(Err(e));
            bail!("{msg}");
        }
    };
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    loop {
        loop {
            match q.recv() {
                Ok(m) => held.push_back((Instant::now() + delay, m)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("netfilter queue receive"),
            }
        }
        let stopping = stop.load(Ordering::SeqCst);
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| stopping || *due <= now) {
            if let Some((_, mut m)) = held.pop_front() {
                m.set_verdict(nfq::Verdict::Accept);
                q.verdict(m).context("netfilter queue verdict")?;
            }
        }
        if stopping {
            return Ok(());
        }
        // The queue's socket is not exposed to poll: look again within a millisecond, the
        // delay's precision.
        let next = held
            .front()
            .map_or(Duration::from_millis(1), |(due, _)| {
                due.saturating_duration_since(now)
            })
            .min(Duration::from_millis(1));
        std::thread::sleep(next);
    }
}
