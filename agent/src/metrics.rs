//! Prometheus metrics, served on `--metrics-listen` when given: without authentication, so
//! only on loopback unless `--metrics-public` says otherwise.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// What the gauges read at scrape time; the server hands `serve` a function that fills it
/// (from the jobs), so this module depends on nothing of the agent's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    pub jobs_running: usize,
    pub processes_running: usize,
}

/// Reads the gauges; may block (it reads /proc), so it runs on the blocking pool.
pub type ReadGauges = Arc<dyn Fn() -> Gauges + Send + Sync>;

/// Counters the rest of the agent bumps; gauges are read at scrape time.
pub struct Counters {
    pub bytes_received: AtomicU64,
    pub files_verified: AtomicU64,
    pub files_skipped: AtomicU64,
    pub verification_failures: AtomicU64,
    pub processes_started: AtomicU64,
    exits: Mutex<BTreeMap<&'static str, u64>>,
}

pub static COUNTERS: Counters = Counters {
    bytes_received: AtomicU64::new(0),
    files_verified: AtomicU64::new(0),
    files_skipped: AtomicU64::new(0),
    verification_failures: AtomicU64::new(0),
    processes_started: AtomicU64::new(0),
    exits: Mutex::new(BTreeMap::new()),
};

pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Records a process exit under `status`: "success", "failure", "signal" or "stopped".
pub fn process_exited(code: i32, signal: i32, stopped_by_agent: bool) {
    let status = if stopped_by_agent {
        "stopped"
    } else if signal != 0 {
        "signal"
    } else if code == 0 {
        "success"
    } else {
        "failure"
    };
    *COUNTERS.exits.lock().entry(status).or_default() += 1;
}

/// The text exposition format.
pub fn render(gauges: Gauges) -> String {
    let Gauges {
        jobs_running,
        processes_running,
    } = gauges;
    let c = &COUNTERS;
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    };
    counter(
        "dglrun_agent_bytes_received_total",
        "File bytes received and verified.",
        c.bytes_received.load(Ordering::Relaxed),
    );
    counter(
        "dglrun_agent_files_verified_total",
        "Files written after their digest matched.",
        c.files_verified.load(Ordering::Relaxed),
    );
    counter(
        "dglrun_agent_files_skipped_total",
        "Files already present with the same digest.",
        c.files_skipped.load(Ordering::Relaxed),
    );
    counter(
        "dglrun_agent_verification_failures_total",
        "Chunks or files whose hash did not match; never written.",
        c.verification_failures.load(Ordering::Relaxed),
    );
    counter(
        "dglrun_agent_processes_started_total",
        "Processes spawned for jobs.",
        c.processes_started.load(Ordering::Relaxed),
    );
    let _ = writeln!(out, "# HELP dglrun_agent_process_exits_total Process exits by status.\n# TYPE dglrun_agent_process_exits_total counter");
    for (status, n) in c.exits.lock().iter() {
        let _ = writeln!(
            out,
            "dglrun_agent_process_exits_total{{status=\"{status}\"}} {n}"
        );
    }
    let _ = writeln!(out, "# HELP dglrun_agent_jobs_running Jobs with live processes.\n# TYPE dglrun_agent_jobs_running gauge\ndglrun_agent_jobs_running {jobs_running}");
    let _ = writeln!(out, "# HELP dglrun_agent_processes_running Job processes running.\n# TYPE dglrun_agent_processes_running gauge\ndglrun_agent_processes_running {processes_running}");
    out
}

/// Binds the metrics address; failing here fails the agent's start, not a later scrape.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))
}

/// A rendered page is served again for this long: a scrape storm costs one /proc scan a
/// second, not one per request.
const CACHE_FOR: Duration = Duration::from_secs(1);

/// The last rendered page; the lock also makes concurrent scrapes share one computation.
type Cached = tokio::sync::Mutex<Option<(Instant, String)>>;

async fn page(gauges: &ReadGauges, cache: &Cached) -> String {
    let mut c = cache.lock().await;
    if let Some((at, text)) = c.as_ref() {
        if at.elapsed() < CACHE_FOR {
            return text.clone();
        }
    }
    let gauges = gauges.clone();
    // Reading the gauges reads /proc: never on a runtime worker.
    let text = tokio::task::spawn_blocking(move || render(gauges()))
        .await
        .unwrap_or_else(|e| format!("# metrics unavailable: {e}\n"));
    *c = Some((Instant::now(), text.clone()));
    text
}

/// Serves `/metrics` until the runtime shuts down.
pub async fn serve(listener: tokio::net::TcpListener, gauges: ReadGauges) -> anyhow::Result<()> {
    tracing::info!(addr = ?listener.local_addr().ok(), "serving metrics");
    let cache: Arc<Cached> = Arc::default();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (gauges, cache) = (gauges.clone(), cache.clone());
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    page(&gauges, &cache).await,
                )
            }
        }),
    );
    axum::serve(listener, app).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_exits() {
        add(&COUNTERS.bytes_received, 42);
        process_exited(0, 0, false);
        process_exited(-1, 9, false);
        let text = render(Gauges {
            jobs_running: 1,
            processes_running: 3,
        });
        assert!(
            text.contains("dglrun_agent_bytes_received_total "),
            "{text}"
        );
        assert!(text.contains("dglrun_agent_process_exits_total{status=\"signal\"}"));
        assert!(text.contains("dglrun_agent_processes_running 3"));
        assert!(text.contains("# TYPE dglrun_agent_jobs_running gauge"));
    }
}
