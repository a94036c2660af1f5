//! Preflight: what a coordinator checks on a host before it starts anything there.

use std::io::Read;
use std::path::{Path, PathBuf};

use dglrun_proto::pb;
use tonic::Status;

/// Largest file Preflight returns.
const MAX_FILE_BYTES: u64 = 1 << 20;
/// Files one Preflight may ask for.
const MAX_FILES: usize = 32;

/// Reads the requested files and picks a free port. `resolve(base, p)` confines `p`.
pub fn check(
    workspace: &Path,
    req: &pb::PreflightRequest,
    resolve: impl Fn(&Path, &str) -> Result<PathBuf, Status>,
) -> Result<pb::PreflightReply, Status> {
    if req.read_files.len() > MAX_FILES {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_FILES} files per Preflight"
        )));
    }
    let exists = workspace.is_dir();
    let mut reply = pb::PreflightReply {
        workspace: if exists {
            workspace.display().to_string()
        } else {
            String::new()
        },
        workspace_exists: exists,
        ..Default::default()
    };
    for p in &req.read_files {
        let mut fc = pb::FileContent {
            path: p.clone(),
            ..Default::default()
        };
        match resolve(workspace, p) {
            Err(e) => fc.error = e.message().to_string(),
            Ok(path) => match read_small(&path) {
                Ok(Some(content)) => {
                    fc.exists = true;
                    fc.content = content;
                }
                Ok(None) => {}
                Err(e) => {
                    fc.exists = path.exists();
                    fc.error = e;
                }
            },
        }
        reply.files.push(fc);
    }
    if !req.free_port_on.is_empty() {
        reply.free_port = free_port(&req.free_port_on)?;
    }
    Ok(reply)
}

/// The file's bytes; None when it does not exist.
fn read_small(path: &Path) -> Result<Option<Vec<u8>>, String> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
    };
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{} is larger than {MAX_FILE_BYTES} bytes",
            path.display()
        ));
    }
    let mut buf = Vec::new();
    f.take(MAX_FILE_BYTES)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(Some(buf))
}

/// A port that could be bound on `ip` just now (the socket is closed again at once).
fn free_port(ip: &str) -> Result<u32, Status> {
    let ip: std::net::IpAddr = ip.parse().map_err(|_| {
        Status::invalid_argument(format!("free_port_on: {ip:?} is not an IP address"))
    })?;
    let listener = std::net::TcpListener::bind((ip, 0)).map_err(|e| {
        Status::failed_precondition(format!("cannot bind a port on {ip} on this host: {e}"))
    })?;
    let port = listener
        .local_addr()
        .map_err(|e| Status::internal(e.to_string()))?
        .port();
    Ok(port.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_read_bounded_and_missing_ones_reported() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("ip.txt"), "127.0.0.1\n").unwrap();
        std::fs::write(
            d.path().join("big"),
            vec![0u8; (MAX_FILE_BYTES + 1) as usize],
        )
        .unwrap();
        let req = pb::PreflightRequest {
            workspace: String::new(),
            read_files: vec!["ip.txt".into(), "nope".into(), "big".into()],
            free_port_on: "127.0.0.1".into(),
        };
        let r = check(d.path(), &req, |b, p| Ok(b.join(p))).unwrap();
        assert!(r.workspace_exists);
        assert_eq!(r.files[0].content, b"127.0.0.1\n");
        assert!(r.files[0].exists);
        assert!(!r.files[1].exists && r.files[1].error.is_empty());
        assert!(r.files[2].error.contains("larger than"));
        assert!(r.free_port > 0);
    }
}
