//! `dgl-coord rcp`: scp's semantics for what DGL's copy_files.py does with it, over the
//! verified chunk transfer of `copy` (its plan, hashing and send, through their public API).
//!
//! Upload: `rcp [-r] SRC... HOST:DST`. DST names a directory when it ends with `/`, when
//! there are several sources, or when it is a directory on the host (asked through a
//! session); each source then lands at `DST/<its name>`, otherwise the one source becomes DST.
//! A directory is copied with `-r` only, whole: every regular file beneath it, modes kept.
//! Download: `rcp HOST:SRC LOCAL`: one file, read through a session (`cat`), written beside
//! LOCAL under a temporary name and renamed once whole.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::cluster::{self, AgentAccess};
use crate::copy::plan::{self, Content, CopyPlan, MachinePlan, Placement, Source};
use crate::copy::{hashing, scripts, send, Progress, ProgressMode, SendOptions};
use crate::launch::command::quote;
use crate::rsh::{resolve, run_quietly};

/// One upload.
#[derive(Clone, Debug)]
pub struct Upload {
    pub sources: Vec<PathBuf>,
    pub host: String,
    /// As given after `HOST:`; empty means the agent's root.
    pub dest: String,
    pub recursive: bool,
}

fn file_name(p: &Path) -> Result<String> {
    let name = p
        .canonicalize()
        .ok()
        .and_then(|c| c.file_name().map(|n| n.to_os_string()))
        .or_else(|| p.file_name().map(|n| n.to_os_string()))
        .with_context(|| format!("{}: no file name", p.display()))?;
    name.into_string()
        .map_err(|n| anyhow!("{}: not valid UTF-8", Path::new(&n).display()))
}

/// The files to send and where each lands on the host, below `dest_dir` or as `dest`.
fn placements(u: &Upload, dest_is_dir: bool) -> Result<(Vec<Source>, Vec<Placement>)> {
    use std::os::unix::fs::PermissionsExt;
    let dest = if u.dest.is_empty() {
        "."
    } else {
        u.dest.as_str()
    };
    let mut sources = Vec::new();
    let mut placed = Vec::new();
    for src in &u.sources {
        let meta = std::fs::metadata(src).with_context(|| src.display().to_string())?;
        let target = if dest_is_dir {
            plan::remote_join(&[dest, &file_name(src)?])
        } else {
            plan::remote_join(&[dest])
        };
        if meta.is_dir() {
            if !u.recursive {
                bail!("{}: not a regular file (use -r)", src.display());
            }
            let folder = scripts::scan(src)?;
            for f in folder.files {
                placed.push(Placement {
                    source: sources.len(),
                    remote: plan::remote_join(&[&target, &f.rel]),
                    mode: f.mode,
                });
                sources.push(Source {
                    origin: f.local.display().to_string(),
                    content: Content::File(f.local),
                });
            }
        } else if meta.is_file() {
            placed.push(Placement {
                source: sources.len(),
                remote: target,
                mode: meta.permissions().mode() & 0o7777,
            });
            sources.push(Source {
                origin: src.display().to_string(),
                content: Content::File(src.clone()),
            });
        } else {
            bail!("{}: not a regular file", src.display());
        }
    }
    Ok((sources, placed))
}

/// Sends `u`; the error, shown with `{:#}`, is one line for `dgl-coord rcp: ` to prefix.
pub async fn upload(u: Upload, access: &AgentAccess) -> Result<()> {
    let ip = resolve(&u.host, access.port).await?;
    let mut host = cluster::connect(0, ip, access)
        .await
        .with_context(|| u.host.clone())?;
    let dest_is_dir = u.dest.is_empty()
        || u.dest.ends_with('/')
        || u.sources.len() > 1
        || run_quietly(
            &mut host,
            &format!("test -d {}", quote(&u.dest)),
            |_| Ok(()),
        )
        .await
        .map_err(|e| anyhow!("{}: {e}", u.host))?
            == 0;
    let (sources, files) = placements(&u, dest_is_dir)?;
    if files.is_empty() {
        return Ok(());
    }
    let plan = CopyPlan {
        sources,
        machines: vec![MachinePlan { rank: 0, ip, files }],
        launch_part_config: String::new(),
        launch_ip_config: String::new(),
    };
    let progress = Progress::new(ProgressMode::Quiet);
    let digests = hashing::hash_sources(
        &plan.sources,
        hashing::default_cache_path(),
        progress.clone(),
    )
    .await?;
    let reports = send::send(
        &plan,
        &digests,
        send::Reached {
            hosts: vec![host],
            prepared: None,
        },
        send::Connections::Later(access),
        SendOptions::default(),
        progress,
        None,
    )
    .await
    .with_context(|| u.host.clone())?;
    let mut problems = Vec::new();
    for r in &reports {
        problems.extend(r.errors.iter().cloned());
        for f in &r.files {
            if let Some(e) = &f.error {
                problems.push(format!("{}: {e}", f.path));
            }
        }
    }
    if reports.iter().all(|r| r.ok()) {
        Ok(())
    } else {
        bail!("{}: {}", u.host, problems.join("; "))
    }
}

/// Fetches the file `src` from `host` into `local` (a directory: into it, under its name).
pub async fn download(
    host_name: &str,
    src: &str,
    local: &Path,
    access: &AgentAccess,
) -> Result<()> {
    use std::io::Write;
    let ip = resolve(host_name, access.port).await?;
    let mut host = cluster::connect(0, ip, access)
        .await
        .with_context(|| host_name.to_string())?;
    let target = if local.is_dir() {
        let name = src.rsplit('/').find(|s| !s.is_empty()).unwrap_or(src);
        local.join(name)
    } else {
        local.to_path_buf()
    };
    let tmp = target.with_file_name(format!(
        ".{}.dglrun-partial",
        target
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let mut file = std::fs::File::create(&tmp).with_context(|| tmp.display().to_string())?;
    let command = format!("test -f {q} && exec cat {q}", q = quote(src));
    let code = run_quietly(&mut host, &command, |b| file.write_all(b)).await;
    let done = match code {
        Ok(0) => file
            .sync_all()
            .and_then(|_| std::fs::rename(&tmp, &target))
            .with_context(|| target.display().to_string()),
        Ok(_) => Err(anyhow!("{host_name}:{src}: no such regular file")),
        Err(e) => Err(anyhow!("{host_name}: {e}")),
    };
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}
