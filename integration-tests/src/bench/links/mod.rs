//! Real link speeds: `dgl-coord copy` between network namespaces whose links are shaped with
//! token buckets, the utilisation of every link sampled over time.
//!
//! ```text
//!   dgT-co (master, 198.19.219.1) ─ eth0 ══ co ─┐
//!   dgT-h0 (198.19.219.10)        ─ eth0 ══ h0 ─┤ bridge in dgT-sw
//!   ...                                          │
//!   dgT-h3 (198.19.219.13)        ─ eth0 ══ h3 ─┘
//! ```
//!
//! Each link is shaped at both ends (`shape`): its host's `eth0` sends at the link's rate, and
//! so does its port on the switch, so the master's link is the bottleneck of a scatter when
//! every link runs at one rate. Counters are read at the switch ports (`sampler`). Scenarios:
//!
//! - (a) every link at R: 4 partitions, partition i to host i; the master's link must be at
//!   least 90% busy over the whole copy.
//! - (b) the master's link at 10 R, the hosts' at R: every host link at least 90% busy at
//!   once; against DGL's copy_files.py (scp host after host) on the same links.
//! - (c) (a) with 25 ms added to each direction of every path (`delay`): 50 ms round trips;
//!   the copy within 10% of (a)'s time.
//!
//! The coordinator's hash cache is warmed first, by a copy before the links are shaped (the
//! figures are about links, not hashing).

mod delay;
mod sampler;
mod shape;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use super::copy::timed_copy;
use super::sshd::NsSshd;
use super::{free_bytes, Opts, Row};
use crate::netns::{NetCluster, LINKS_BLOCK};
use delay::DelayLines;
use sampler::{Link, Sample, Sampler};

const HOSTS: usize = 4;
const MIB: u64 = 1 << 20;

/// Between two counter samples.
const PERIOD: Duration = Duration::from_millis(200);

/// Round trip added in (c), half on each direction.
const RTT: Duration = Duration::from_millis(50);

/// A shaped cluster. Fields drop in order: the sampler and delay lines (threads inside the
/// namespaces) before the cluster deletes the namespaces.
struct Net {
    sampler: Sampler,
    _delay: Option<DelayLines>,
    links: Vec<Link>,
    cluster: NetCluster,
}

impl Net {
    /// With `warm`, copies that set once before the links are shaped: the coordinator's hash
    /// cache then holds its hashes, and the measured copies only send.
    fn new(
        master_mbit: u64,
        host_mbit: u64,
        rtt: Option<Duration>,
        warm: Option<&Set>,
    ) -> Result<Net> {
        let cluster = NetCluster::start_in(LINKS_BLOCK, HOSTS, &[])?;
        if let Some(set) = warm {
            let ip = cluster.ip_config_file(30050);
            timed_copy(cluster.coord(), &set.pc, &ip, &set.cache, &[])?;
            for h in &cluster.hosts {
                let _ = fs::remove_dir_all(h.root.join("ws"));
            }
        }
        let sw = cluster.switch_ns().to_string();
        shape::shape(&cluster.coord_ns, "eth0", master_mbit)?;
        shape::shape(&sw, "co", master_mbit)?;
        let mut links = vec![Link {
            label: "master up".into(),
            port: "co".into(),
            uplink: true,
            mbit: master_mbit,
        }];
        for i in 0..HOSTS {
            shape::shape(&cluster.hosts[i].ns, "eth0", host_mbit)?;
            shape::shape(&sw, &format!("h{i}"), host_mbit)?;
            links.push(Link {
                label: format!("h{i} down"),
                port: format!("h{i}"),
                uplink: false,
                mbit: host_mbit,
            });
        }
        let delay = match rtt {
            Some(rtt) => {
                let mut all = vec![cluster.coord_ns.clone()];
                all.extend(cluster.hosts.iter().map(|h| h.ns.clone()));
                Some(DelayLines::start(&all, rtt / 2)?)
            }
            None => None,
        };
        Ok(Net {
            sampler: Sampler::start(&sw, PERIOD)?,
            _delay: delay,
            links,
            cluster,
        })
    }

    fn clear_roots(&self) {
        for h in &self.cluster.hosts {
            let _ = fs::remove_dir_all(h.root.join("ws"));
        }
    }
}

/// CPU time: the machine's (all cores), this process's reaped children's, the agents'.
#[derive(Clone, Copy, Default)]
struct Cpu {
    machine_busy: f64,
    machine_total: f64,
    children: f64,
    agents: f64,
}

fn cpu_now(net: &Net) -> Cpu {
    let tick = 100.0; // USER_HZ
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let total: f64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    let children = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(0.0);
    let agents = (0..net.cluster.len())
        .filter_map(|i| net.cluster.agent_pid(i))
        .map(|pid| {
            let s = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after the command's closing parenthesis: utime, stime are 12th and 13th.
            let after = s.rsplit_once(')').map_or("", |x| x.1);
            let v: Vec<f64> = after
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0.0))
                .collect();
            (v.get(11).copied().unwrap_or(0.0) + v.get(12).copied().unwrap_or(0.0)) / tick
        })
        .sum();
    Cpu {
        machine_busy: (total - idle) / tick,
        machine_total: total / tick,
        children,
        agents,
    }
}

/// One timed run on `net`: wall seconds, the counters at its start and end, CPU used.
struct Run {
    secs: f64,
    /// The 1-minute load average at the end.
    load: f64,
    start: Sample,
    end: Sample,
    cpu: Cpu,
}

fn measured(net: &Net, f: impl FnOnce() -> Result<()>) -> Result<Run> {
    let c0 = cpu_now(net);
    let start = net.sampler.now()?;
    let t = Instant::now();
    f()?;
    let secs = t.elapsed().as_secs_f64();
    let end = net.sampler.now()?;
    let c1 = cpu_now(net);
    Ok(Run {
        secs,
        load: load_average(),
        start,
        end,
        cpu: Cpu {
            machine_busy: c1.machine_busy - c0.machine_busy,
            machine_total: c1.machine_total - c0.machine_total,
            children: c1.children - c0.children,
            agents: c1.agents - c0.agents,
        },
    })
}

/// One `dgl-coord copy`: the run, and when each host got its last file (seconds after
/// sending began, from the copy's report).
fn dglrun(net: &Net, pc: &Path, cache: &Path) -> Result<(Run, Vec<f64>)> {
    net.clear_roots();
    let ip = net.cluster.ip_config_file(30050);
    let mut done = Vec::new();
    let run = measured(net, || {
        let (_, report) = timed_copy(net.cluster.coord(), pc, &ip, cache, &[])?;
        ensure!(report["ok"] == true, "copy failed: {report}");
        done = report["hosts"]
            .as_array()
            .map(|hs| hs.iter().filter_map(|h| h["seconds"].as_f64()).collect())
            .unwrap_or_default();
        Ok(())
    })?;
    net.clear_roots();
    Ok((run, done))
}

/// The 1-minute load average: a figure taken while other work held the cores is no link
/// figure.
fn load_average() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// DGL's copy_files.py, unmodified, from the master's namespace: for each host in turn,
/// `ssh mkdir` and one scp per file, to the sshd on port 22 of each host.
fn copy_files_py(net: &Net, sshd: &NsSshd, pc: &Path, work: &Path) -> Result<Run> {
    // DGL's tools: DGL_TOOLS, else `shared/dgl-tools` beside the checkout, else the path the
    // other DGL scripts default to.
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/dgl-tools");
    let tools = std::env::var_os("DGL_TOOLS")
        .map(PathBuf::from)
        .or_else(|| beside.is_dir().then_some(beside))
        .unwrap_or_else(|| PathBuf::from("/work/shared/dgl-tools"));
    let script = tools.join("copy_files.py");
    ensure!(
        script.is_file(),
        "no copy_files.py in {} (set DGL_TOOLS)",
        tools.display()
    );
    let ip = net.cluster.ip_config_file(30050);
    // Every host writes under this path in its own file system; here they share one, and
    // each host's partition has its own directory in it.
    let dest = work.join("scp-ws");
    let scripts = work.join("scp-scripts");
    fs::create_dir_all(&scripts)?;
    fs::write(scripts.join("train.py"), "print('train')\n")?;
    let run = measured(net, || {
        let out = Command::new("ip")
            .args(["netns", "exec", &net.cluster.coord_ns, "python3"])
            .arg(&script)
            .arg("--workspace")
            .arg(&dest)
            .args(["--rel_data_path", "data", "--part_config"])
            .arg(pc)
            .arg("--ip_config")
            .arg(&ip)
            .arg("--script_folder")
            .arg(&scripts)
            .env("PATH", sshd.path_env())
            // The part_config's paths are relative to its directory; copy_files.py opens them
            // as given, so it runs there, as its users do.
            .current_dir(pc.parent().unwrap_or(Path::new(".")))
            .stdin(Stdio::null())
            .output()
            .context("run copy_files.py")?;
        ensure!(
            out.status.success(),
            "copy_files.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    })?;
    let _ = fs::remove_dir_all(&dest);
    Ok(run)
}

fn print_run(title: &str, net: &Net, run: &Run, samples: &[Sample], bytes: u64) {
    print!(
        "{}",
        sampler::render(title, &net.links, samples, &run.start, &run.end)
    );
    let c = &run.cpu;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!(
        "  payload {:.0} MB/s; CPU: machine {:.0}% of {cores} cores busy (load average {:.1} \
         after), coordinator (and its children) {:.2} s, agents {:.2} s\n",
        bytes as f64 / run.secs / 1e6,
        100.0 * c.machine_busy / c.machine_total.max(1e-9),
        run.load,
        c.children,
        c.agents
    );
}

/// What one scenario measured, per rep.
#[derive(Default)]
struct Figures {
    secs: Vec<f64>,
    master_busy: Vec<f64>,
    /// The least busy host link of each rep.
    min_host_busy: Vec<f64>,
    machine_busy: Vec<f64>,
    baseline_secs: Vec<f64>,
}

struct Scenario {
    name: &'static str,
    master_mbit: u64,
    host_mbit: u64,
    rtt: Option<Duration>,
    baseline: bool,
}

fn scenario(s: &Scenario, set: &Set, reps: usize, ssh: bool, work: &Path) -> Result<Figures> {
    let warm = (!set.cache.exists()).then_some(set);
    let net = Net::new(s.master_mbit, s.host_mbit, s.rtt, warm)?;
    let sshd = if s.baseline && ssh {
        let hosts: Vec<_> = net
            .cluster
            .hosts
            .iter()
            .map(|h| (h.ns.clone(), h.ip))
            .collect();
        Some(NsSshd::start(&hosts, &net.cluster.coord_ns)?)
    } else {
        None
    };
    let mut fig = Figures::default();
    let mut shown = Vec::new();
    for rep in 0..reps {
        let (run, done) = dglrun(&net, &set.pc, &set.cache)?;
        let busy: Vec<f64> = net
            .links
            .iter()
            .map(|l| l.busy(&run.start, &run.end))
            .collect();
        eprintln!(
            "bench links ({}) rep {rep}: dglrun {:.2}s, busy {:?}, hosts done at {:?} s after \
             sending began; machine {:.0}% busy, load {:.1}",
            s.name,
            run.secs,
            busy.iter().map(|b| (b * 100.0).round()).collect::<Vec<_>>(),
            done.iter()
                .map(|t| (t * 100.0).round() / 100.0)
                .collect::<Vec<_>>(),
            100.0 * run.cpu.machine_busy / run.cpu.machine_total.max(1e-9),
            run.load
        );
        fig.secs.push(run.secs);
        fig.master_busy.push(busy[0]);
        fig.min_host_busy
            .push(busy[1..].iter().copied().fold(f64::INFINITY, f64::min));
        fig.machine_busy
            .push(run.cpu.machine_busy / run.cpu.machine_total.max(1e-9));
        shown.push(("dgl-coord copy", run));
        if let Some(sshd) = &sshd {
            let base = copy_files_py(&net, sshd, &set.pc, work)?;
            eprintln!(
                "bench links ({}) rep {rep}: copy_files.py {:.2}s",
                s.name, base.secs
            );
            fig.baseline_secs.push(base.secs);
            shown.push(("copy_files.py (scp host after host)", base));
        }
    }
    let samples = net.sampler.all()?;
    // The last rep of each tool, over time.
    for (tool, run) in shown
        .iter()
        .rev()
        .take(if sshd.is_some() { 2 } else { 1 })
        .rev()
    {
        let title = format!(
            "links ({}) master {} Mbit/s, hosts {} Mbit/s{}, {tool}, {} x {} MiB",
            s.name,
            s.master_mbit,
            s.host_mbit,
            s.rtt
                .map_or(String::new(), |r| format!(", +{} ms RTT", r.as_millis())),
            HOSTS,
            (set.part_bytes as f64 / MIB as f64).round()
        );
        print_run(&title, &net, run, &samples, set.bytes);
    }
    Ok(fig)
}

/// The partition set and the coordinator's (warm) hash cache.
struct Set {
    pc: PathBuf,
    cache: PathBuf,
    bytes: u64,
    part_bytes: u64,
}

fn make_set(work: &Path, part_mib: u64) -> Result<Set> {
    let per_file = part_mib * MIB / 3;
    let pc = crate::gen_partitions(&work.join("src"), HOSTS, per_file, "links")?;
    let cache = work.join("cache");
    Ok(Set {
        pc,
        cache,
        bytes: per_file * 3 * HOSTS as u64,
        part_bytes: per_file * 3,
    })
}

/// `mbit`: the hosts' link rate (the master's is 10x in (b)); `part_mib`: each partition.
/// `only`: the scenarios to run, by letter (`"ac"`: (a) and (c)).
pub fn run(opts: &Opts, mbit: u64, part_mib: u64, ssh: bool, only: &str) -> Result<Vec<Row>> {
    if let Some(why) = crate::netns::unavailable() {
        anyhow::bail!("cannot make network namespaces ({why})");
    }
    // Sources, the agents' copies, and copy_files.py's.
    let need = part_mib * MIB * HOSTS as u64 * 3 + (64 << 20);
    if let Some(free) = free_bytes(&opts.dir) {
        ensure!(
            free > need,
            "links needs {} MiB free in {} (has {})",
            need / MIB,
            opts.dir.display(),
            free / MIB
        );
    }
    let work = tempfile::tempdir_in(&opts.dir)?;
    // A gigabyte in memory (/dev/shm) by default: not left behind by Ctrl-C either.
    crate::netns::remove_on_signal(work.path());
    let set = make_set(work.path(), part_mib)?;
    let reps = opts.reps.clamp(1, 3);
    let rate = |m: u64| {
        if m >= 1000 && m.is_multiple_of(1000) {
            format!("{} Gbit/s", m / 1000)
        } else {
            format!("{m} Mbit/s")
        }
    };
    let pct = |v: &[f64]| v.iter().map(|x| x * 100.0).collect::<Vec<_>>();
    let size = format!("{HOSTS} x {} MiB", part_mib);
    let mut rows = Vec::new();

    let a = Scenario {
        name: "a",
        master_mbit: mbit,
        host_mbit: mbit,
        rtt: None,
        baseline: false,
    };
    let fa = if only.contains('a') {
        scenario(&a, &set, reps, ssh, work.path())
    } else {
        Err(anyhow::anyhow!("not run (--links-only {only})"))
    };
    match &fa {
        Err(_) if !only.contains('a') => {}
        Ok(f) => rows.extend([
            Row::new(
                format!(
                    "links (a) all {}: {size} scatter, master link busy",
                    rate(mbit)
                ),
                "%",
                &pct(&f.master_busy),
                ">= 90%",
                Some(&|x| x >= 90.0),
            ),
            Row::new("links (a): copy time", "s", &f.secs, "", None),
        ]),
        Err(e) => rows.push(Row::error("links (a)", e)),
    }

    let b = Scenario {
        name: "b",
        master_mbit: 10 * mbit,
        host_mbit: mbit,
        rtt: None,
        baseline: true,
    };
    match (only.contains('b')).then(|| scenario(&b, &set, reps, ssh, work.path())) {
        None => {}
        Some(Ok(f)) => {
            rows.extend([
                Row::new(
                    format!(
                        "links (b) master {}, hosts {}: least busy host link",
                        rate(10 * mbit),
                        rate(mbit)
                    ),
                    "%",
                    &pct(&f.min_host_busy),
                    ">= 90%",
                    Some(&|x| x >= 90.0),
                ),
                Row::new("links (b): copy time", "s", &f.secs, "", None),
                Row::new(
                    "links (b): machine CPU busy during the copy",
                    "%",
                    &pct(&f.machine_busy),
                    "",
                    None,
                ),
            ]);
            if ssh {
                rows.push(Row::new(
                    "links (b): copy_files.py time / dglrun time",
                    "x",
                    &f.baseline_secs
                        .iter()
                        .zip(&f.secs)
                        .map(|(b, d)| b / d)
                        .collect::<Vec<_>>(),
                    ">= 3.5x",
                    Some(&|x| x >= 3.5),
                ));
            }
        }
        Some(Err(e)) => rows.push(Row::error("links (b)", &e)),
    }

    let c = Scenario {
        name: "c",
        master_mbit: mbit,
        host_mbit: mbit,
        rtt: Some(RTT),
        baseline: false,
    };
    match (only.contains('c')).then(|| scenario(&c, &set, reps, ssh, work.path())) {
        None => {}
        Some(Ok(f)) => {
            rows.push(Row::new(
                format!(
                    "links (c) (a) + {} ms RTT: master link busy",
                    RTT.as_millis()
                ),
                "%",
                &pct(&f.master_busy),
                "",
                None,
            ));
            match &fa {
                Ok(fa) => {
                    let base = super::Stat::of(&fa.secs).map_or(f64::NAN, |s| s.median);
                    rows.push(Row::new(
                        "links (c): copy time / (a)'s",
                        "x",
                        &f.secs.iter().map(|t| t / base).collect::<Vec<_>>(),
                        "<= 1.10x",
                        Some(&|x| x <= 1.10),
                    ));
                }
                Err(_) => rows.push(Row::new("links (c): copy time", "s", &f.secs, "", None)),
            }
        }
        Some(Err(e)) => rows.push(Row::error("links (c)", &e)),
    }
    Ok(rows)
}
