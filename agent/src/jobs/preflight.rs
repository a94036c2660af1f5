//! Preflight: what a coordinator checks on a host before it starts anything there.
//!
//! The request is parsed once ([`Preflight::parse`]); the checks run on the blocking pool
//! with a timeout, so a FIFO, a device or a hung mount at a path the coordinator names
//! cannot stall the agent.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::IpAddr;

use dglrun_proto::pb;

use super::sockets::{self, TableError};
use crate::blocking::{self, BlockingError};
use crate::confine::{ConfineError, Root, WirePath};
use crate::limits::{MAX_PREFLIGHT_FILES, MAX_PREFLIGHT_PORTS, MAX_PREFLIGHT_SIZES};

/// Largest file Preflight returns.
const MAX_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("{0} files to read exceed the agent's limit of {MAX_PREFLIGHT_FILES}")]
    TooManyFiles(usize),
    #[error("{0} ports to look up exceed the agent's limit of {MAX_PREFLIGHT_PORTS}")]
    TooManyPorts(usize),
    #[error("{0} file sizes asked exceed the agent's limit of {MAX_PREFLIGHT_SIZES}")]
    TooManySizes(usize),
    #[error("listening_ports: {0} is not a port")]
    BadPort(u32),
    #[error("{field}: {value:?} is not an IP address")]
    BadAddress { field: &'static str, value: String },
    #[error(transparent)]
    Sockets(#[from] TableError),
    #[error("workspace: {0}")]
    Workspace(#[source] ConfineError),
    #[error("cannot bind a port on {ip} on this host: {source}")]
    Bind {
        ip: IpAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Blocking(#[from] BlockingError),
}

/// A Preflight request, checked.
#[derive(Debug)]
pub struct Preflight {
    pub workspace: WirePath,
    pub read_files: Vec<ReadFile>,
    pub free_port_on: Option<IpAddr>,
    /// Ports whose listeners to report, on `listening_ip` (None: any address).
    pub listening_ports: BTreeSet<u16>,
    pub listening_ip: Option<IpAddr>,
    pub sizes_of: Vec<ReadFile>,
}

/// A file Preflight is asked to read: relative to the workspace (or absolute inside the
/// root). A path that is not allowed does not fail the request: its entry in the reply says
/// why, as for a file that cannot be read.
#[derive(Debug)]
pub struct ReadFile {
    /// As the coordinator wrote it.
    pub shown: String,
    pub path: Result<WirePath, ConfineError>,
}

impl Preflight {
    pub fn parse(root: &Root, req: pb::PreflightRequest) -> Result<Self, PreflightError> {
        if req.read_files.len() > MAX_PREFLIGHT_FILES {
            return Err(PreflightError::TooManyFiles(req.read_files.len()));
        }
        if req.listening_ports.len() > MAX_PREFLIGHT_PORTS {
            return Err(PreflightError::TooManyPorts(req.listening_ports.len()));
        }
        if req.sizes_of.len() > MAX_PREFLIGHT_SIZES {
            return Err(PreflightError::TooManySizes(req.sizes_of.len()));
        }
        let workspace = root
            .parse(&req.workspace)
            .map_err(PreflightError::Workspace)?;
        let ip = |field: &'static str, value: String| match value.as_str() {
            "" => Ok(None),
            v => v
                .parse()
                .map(Some)
                .map_err(|_| PreflightError::BadAddress { field, value }),
        };
        let free_port_on = ip("free_port_on", req.free_port_on)?;
        let listening_ip = ip("listening_ip", req.listening_ip)?;
        let listening_ports = req
            .listening_ports
            .iter()
            .map(|&p| match u16::try_from(p) {
                Ok(port) if port != 0 => Ok(port),
                _ => Err(PreflightError::BadPort(p)),
            })
            .collect::<Result<_, _>>()?;
        let in_workspace = |p: String| {
            let path = workspace
                .join(root, &p)
                .and_then(|w| w.check_not_reserved().map(|()| w));
            ReadFile { shown: p, path }
        };
        let read_files = req.read_files.into_iter().map(in_workspace).collect();
        let sizes_of = req.sizes_of.into_iter().map(in_workspace).collect();
        Ok(Self {
            workspace,
            read_files,
            free_port_on,
            listening_ports,
            listening_ip,
            sizes_of,
        })
    }
}

/// Reads the requested files and picks a free port, off the runtime.
pub async fn check(root: &Root, req: Preflight) -> Result<pb::PreflightReply, PreflightError> {
    let root = root.clone();
    let what = format!("preflight of workspace {}", req.workspace.shown());
    blocking::run(what, blocking::FS_TIMEOUT, move || {
        check_blocking(&root, &req)
    })
    .await?
}

fn check_blocking(root: &Root, req: &Preflight) -> Result<pb::PreflightReply, PreflightError> {
    let ws = &req.workspace;
    let exists = match root.open_dir(ws.shown(), ws.rel(), false) {
        Ok(_) => true,
        Err(e) if e.is_not_found() => false,
        // Outside the root through a symlink, not a directory, unreadable: say so.
        Err(e) => return Err(PreflightError::Workspace(e)),
    };
    let mut reply = pb::PreflightReply {
        workspace: if exists {
            root.path().join(ws.rel()).display().to_string()
        } else {
            String::new()
        },
        workspace_exists: exists,
        ..Default::default()
    };
    for f in &req.read_files {
        let mut fc = pb::FileContent {
            path: f.shown.clone(),
            ..Default::default()
        };
        match read_small(root, f) {
            Ok(Some(content)) => {
                fc.exists = true;
                fc.content = content;
            }
            Ok(None) => {}
            Err((exists, e)) => {
                fc.exists = exists;
                fc.error = e;
            }
        }
        reply.files.push(fc);
    }
    for f in &req.sizes_of {
        let mut fs = pb::FileSize {
            path: f.shown.clone(),
            ..Default::default()
        };
        match size(root, f) {
            Ok(Some(n)) => (fs.exists, fs.size) = (true, n),
            Ok(None) => {}
            Err(e) => (fs.exists, fs.error) = (true, e),
        }
        reply.sizes.push(fs);
    }
    if let Some(ip) = req.free_port_on {
        reply.free_port = free_port(ip)?;
    }
    if !req.listening_ports.is_empty() {
        reply.listening = port_holders(&req.listening_ports, req.listening_ip)?;
        reply.shm_free_bytes = shm_free();
    }
    Ok(reply)
}

/// Size of a regular file; None when it does not exist.
fn size(root: &Root, file: &ReadFile) -> Result<Option<u64>, String> {
    let p = &file.shown;
    let wire = file.path.as_ref().map_err(|e| e.to_string())?;
    match root.open_regular(p, wire.rel()) {
        Ok(f) => f
            .metadata()
            .map(|m| Some(m.len()))
            .map_err(|e| format!("cannot stat {p}: {e}")),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(format!("cannot open {p}: {e}")),
    }
}

/// What listens on `ports` where a bind of `ip` would collide, and which process holds it.
/// With an address, a port that can be bound there is free without a look at the socket
/// tables, whose `/proc` text costs the kernel milliseconds to write on a busy host.
fn port_holders(
    ports: &BTreeSet<u16>,
    ip: Option<IpAddr>,
) -> Result<Vec<pb::PortHolder>, PreflightError> {
    let busy: BTreeSet<u16> = match ip {
        Some(ip) => ports
            .iter()
            .copied()
            .filter(|&p| sockets::bind_fails(ip, p))
            .collect(),
        None => ports.clone(),
    };
    if busy.is_empty() {
        return Ok(Vec::new());
    }
    let held: Vec<sockets::Listener> = sockets::listeners()?
        .into_iter()
        .filter(|l| busy.contains(&l.port) && l.blocks(ip))
        .collect();
    let who = sockets::holders(&held.iter().map(|l| l.inode).collect());
    let mut out: Vec<pb::PortHolder> = held
        .iter()
        .map(|l| {
            let (pid, command) = who.get(&l.inode).cloned().unwrap_or_default();
            pb::PortHolder {
                port: l.port.into(),
                pid,
                command,
            }
        })
        .collect();
    // In use, yet no listener: a socket bound there and not listening holds it all the same.
    for &port in &busy {
        if ip.is_some() && !out.iter().any(|h| h.port == u32::from(port)) {
            out.push(pb::PortHolder {
                port: port.into(),
                ..Default::default()
            });
        }
    }
    // A dual-stack server has a socket in each table: one line per port and holder.
    out.sort_by_key(|h| (h.port, h.pid));
    out.dedup_by(|a, b| (a.port, a.pid) == (b.port, b.pid));
    Ok(out)
}

/// Free bytes of /dev/shm, where DGL's servers keep the partition they serve.
fn shm_free() -> Option<u64> {
    rustix::fs::statvfs("/dev/shm")
        .ok()
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
}

/// The file's bytes; None when it does not exist. Only regular files are read (a FIFO or a
/// device is refused without blocking), at most [`MAX_FILE_BYTES`].
fn read_small(root: &Root, file: &ReadFile) -> Result<Option<Vec<u8>>, (bool, String)> {
    let p = &file.shown;
    let wire = file.path.as_ref().map_err(|e| (false, e.to_string()))?;
    let f = match root.open_regular(p, wire.rel()) {
        Ok(f) => f,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err((true, format!("cannot read {p}: {e}"))),
    };
    let meta = f
        .metadata()
        .map_err(|e| (true, format!("cannot stat {p}: {e}")))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err((true, format!("{p} is larger than {MAX_FILE_BYTES} bytes")));
    }
    let mut buf = Vec::new();
    f.take(MAX_FILE_BYTES)
        .read_to_end(&mut buf)
        .map_err(|e| (true, format!("cannot read {p}: {e}")))?;
    Ok(Some(buf))
}

/// A port that could be bound on `ip` just now (the socket is closed again at once).
fn free_port(ip: IpAddr) -> Result<u32, PreflightError> {
    let bind = |source| PreflightError::Bind { ip, source };
    let listener = std::net::TcpListener::bind((ip, 0)).map_err(bind)?;
    let port = listener.local_addr().map_err(bind)?.port();
    Ok(port.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(ws: &str, files: &[&str]) -> pb::PreflightRequest {
        pb::PreflightRequest {
            workspace: ws.into(),
            read_files: files.iter().map(|s| s.to_string()).collect(),
            free_port_on: "127.0.0.1".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn files_are_read_bounded_and_missing_ones_reported() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path()).unwrap();
        std::fs::create_dir_all(d.path().join("ws")).unwrap();
        std::fs::write(d.path().join("ws/ip.txt"), "127.0.0.1\n").unwrap();
        std::fs::write(
            d.path().join("ws/big"),
            vec![0u8; (MAX_FILE_BYTES + 1) as usize],
        )
        .unwrap();
        let req = Preflight::parse(&root, request("ws", &["ip.txt", "nope", "big"])).unwrap();
        let r = check(&root, req).await.unwrap();
        assert!(r.workspace_exists);
        assert_eq!(r.files[0].content, b"127.0.0.1\n");
        assert!(r.files[0].exists);
        assert!(!r.files[1].exists && r.files[1].error.is_empty());
        assert!(r.files[2].error.contains("larger than"));
        assert!(r.free_port > 0);
    }

    #[tokio::test]
    async fn fifos_escapes_and_reserved_names_are_refused_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(&d.path().join("root")).unwrap();
        std::fs::create_dir_all(root.path().join("ws")).unwrap();
        std::fs::create_dir_all(root.state_dir()).unwrap();
        std::fs::write(root.state_dir().join("jobs.json"), "{}").unwrap();
        std::fs::write(d.path().join("secret"), "s").unwrap();
        nix::unistd::mkfifo(
            &root.path().join("ws/ip_config.txt"),
            nix::sys::stat::Mode::S_IRWXU,
        )
        .unwrap();
        std::os::unix::fs::symlink(d.path().join("secret"), root.path().join("ws/out")).unwrap();
        let state = root.state_dir().join("jobs.json").display().to_string();
        std::os::unix::fs::symlink("../.dglrun/jobs.json", root.path().join("ws/j")).unwrap();
        let files = ["ip_config.txt", "out", "../../secret", state.as_str(), "j"];
        let req = Preflight::parse(&root, request("ws", &files)).unwrap();
        let r = check(&root, req).await.unwrap();
        for (f, needle) in r.files.iter().zip([
            "not a regular file",
            "leads out",
            "..",
            "reserved",
            "reserved",
        ]) {
            assert!(f.content.is_empty(), "{}", f.path);
            assert!(f.error.contains(needle), "{}: {}", f.path, f.error);
        }
        assert!(
            r.files[0].error.contains("ip_config.txt"),
            "{}",
            r.files[0].error
        );
    }

    #[test]
    fn bounds_are_checked_once_at_parse() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path()).unwrap();
        let many: Vec<String> = (0..=MAX_PREFLIGHT_FILES).map(|i| format!("f{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(
            Preflight::parse(&root, request("ws", &many)),
            Err(PreflightError::TooManyFiles(_))
        ));
        let mut bad = request("ws", &[]);
        bad.free_port_on = "nope".into();
        assert!(Preflight::parse(&root, bad).is_err());
        assert!(Preflight::parse(&root, request("../x", &[])).is_err());
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use std::path::Component;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Parse never panics; what it accepts is within bounds and its workspace confined.
        #[test]
        fn preflight_parses_without_panicking(
            ws in "[\\PC]{0,16}",
            files in proptest::collection::vec("[\\PC]{0,12}", 0..24),
            ip in "[0-9a-f.:]{0,16}",
        ) {
            let d = tempfile::tempdir().unwrap();
            let root = Root::new(d.path()).unwrap();
            let req = pb::PreflightRequest { workspace: ws, read_files: files, free_port_on: ip, ..Default::default() };
            if let Ok(p) = Preflight::parse(&root, req) {
                prop_assert!(p.read_files.len() <= MAX_PREFLIGHT_FILES);
                prop_assert!(p.workspace.rel().components().all(|c| matches!(c, Component::Normal(_))));
                for f in &p.read_files {
                    if let Ok(w) = &f.path {
                        prop_assert!(w.rel().components().all(|c| matches!(c, Component::Normal(_))));
                        prop_assert!(w.check_not_reserved().is_ok());
                    }
                }
            }
        }
    }
}
