//! What goes where: from DGL's copy flags and the parsed configs to, for every machine, the
//! list of local files (or generated contents) and the path each lands at on the host.
//!
//! Pure: no file is read here (the script folder is listed by `scripts`, files are checked by
//! the driver), so every placement rule is testable as data.
//!
//! Layout (DGL's copy_files.py, with a part_config DGL can load from where it lands):
//! - every machine: `<ws>/<ip_config name>`, `<ws>/<rel>/<part_config name>` (rewritten),
//!   node_map / edge_map files given as paths at `<ws>/<rel>/<name>`, the script folder at
//!   `<ws>/<folder name>/...`;
//! - machine i only: every file named under `part-{i}` at `<ws>/<rel>/part{i}/<name>`.
//!
//! The rewritten part_config names those files relative to its own directory (`part1/x.dgl`,
//! `node_map.npy`), which is how DGL resolves them, and is the same on every machine.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value};

use crate::config::{IpConfig, PartConfig};

/// Mode of the data files (configs, partitions): readable by all, like a fresh copy.
pub const DATA_MODE: u32 = 0o644;

/// The script folder, as listed on the master host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScriptFolder {
    /// Name of the folder itself: it lands at `<ws>/<name>`.
    pub name: String,
    pub files: Vec<ScriptFile>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScriptFile {
    /// Path inside the folder, `/`-separated.
    pub rel: String,
    pub local: PathBuf,
    pub mode: u32,
}

/// Where the bytes of a source come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    File(PathBuf),
    /// Generated here: the rewritten part_config.
    Bytes(Vec<u8>),
}

/// One thing to send, read and hashed once however many machines get it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// What it is, for messages: `ip_config`, `part-1.node_feats`, `script_folder/train.py`.
    pub origin: String,
    pub content: Content,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Index into [`CopyPlan::sources`].
    pub source: usize,
    /// Path on the host: relative to the agent's root, or absolute when the workspace is.
    pub remote: String,
    pub mode: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachinePlan {
    pub rank: usize,
    pub ip: IpAddr,
    pub files: Vec<Placement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyPlan {
    pub sources: Vec<Source>,
    pub machines: Vec<MachinePlan>,
    /// `--part_config` for `dgl-coord launch` (relative to the workspace).
    pub launch_part_config: String,
    /// `--ip_config` for `dgl-coord launch` (relative to the workspace).
    pub launch_ip_config: String,
}

/// The copy flags, with the configs already parsed.
pub struct PlanInput<'a> {
    pub workspace: &'a str,
    pub rel_data_path: &'a str,
    pub ip_config_path: &'a Path,
    pub ip_config: &'a IpConfig,
    pub part_config: &'a PartConfig,
    pub scripts: Option<&'a ScriptFolder>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(
        "{part_config} has num_parts {num_parts} but {ip_config} lists {machines} machine(s): \
         DGL needs one partition per machine"
    )]
    PartCount {
        part_config: String,
        num_parts: usize,
        ip_config: String,
        machines: usize,
    },
    #[error("{part_config}: {key} is {value:?}, {reason}")]
    BadPartPath {
        part_config: String,
        key: String,
        value: String,
        reason: &'static str,
    },
    #[error("--{flag} {value:?}: {reason}")]
    BadFlag {
        flag: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{part_config}: cannot write the rewritten part_config")]
    Rewrite {
        part_config: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: the name is not valid UTF-8")]
    NotUtf8 { path: String },
    /// A workspace that means something else than it says (`~` not expanded).
    #[error("{0}")]
    Workspace(String),
    #[error("{first} and {second} would both land at {remote} on machine {rank}")]
    Collision {
        rank: usize,
        remote: String,
        first: String,
        second: String,
    },
}

pub fn plan(input: &PlanInput) -> Result<CopyPlan, PlanError> {
    check_input(input)?;
    let pc = input.part_config;
    let ws = input.workspace;
    let data_dir = remote_join(&[ws, input.rel_data_path]);
    let ip_name = file_name(input.ip_config_path)?;
    let pc_name = file_name(&pc.path)?;

    let mut b = Builder::new(input.ip_config.len(), input.ip_config);
    let mut doc = pc.doc.clone();

    let ip = b.source(
        "ip_config",
        Content::File(input.ip_config_path.to_path_buf()),
    );
    b.place_everywhere(ip, &remote_join(&[ws, &ip_name]), DATA_MODE)?;
    place_shared_maps(&mut b, pc, &data_dir, &mut doc)?;
    place_partitions(&mut b, pc, &data_dir, &mut doc)?;
    let pc_src = b.source("part_config (rewritten)", rewritten(pc, doc)?);
    b.place_everywhere(pc_src, &remote_join(&[&data_dir, &pc_name]), DATA_MODE)?;
    if let Some(scripts) = input.scripts {
        place_scripts(&mut b, ws, scripts)?;
    }

    Ok(CopyPlan {
        sources: b.sources,
        machines: b.machines,
        launch_part_config: remote_join(&[input.rel_data_path, &pc_name]),
        launch_ip_config: ip_name,
    })
}

/// One partition per machine, and flags that stay inside the workspace.
fn check_input(input: &PlanInput) -> Result<(), PlanError> {
    let pc = input.part_config;
    let machines = input.ip_config.len();
    if pc.num_parts != machines {
        return Err(PlanError::PartCount {
            part_config: pc.path.display().to_string(),
            num_parts: pc.num_parts,
            ip_config: input.ip_config_path.display().to_string(),
            machines,
        });
    }
    check_flag("workspace", input.workspace, true)?;
    check_flag("rel_data_path", input.rel_data_path, false)
}

/// Old DGL formats: node_map / edge_map as paths to .npy files every machine needs.
fn place_shared_maps(
    b: &mut Builder,
    pc: &PartConfig,
    data_dir: &str,
    doc: &mut Map<String, Value>,
) -> Result<(), PlanError> {
    let mut new_value = HashMap::new();
    for f in pc.shared_files() {
        check_part_path(pc, &f.key, &f.written)?;
        let name = file_name(&f.local)?;
        let src = b.source(&f.key, Content::File(f.local.clone()));
        b.place_everywhere(src, &remote_join(&[data_dir, &name]), DATA_MODE)?;
        new_value.insert(f.written.clone(), name);
    }
    for key in ["node_map", "edge_map"] {
        // Dict-valued maps hold ranges, not paths, and stay as they are.
        match doc.get_mut(key) {
            Some(Value::Object(_)) | None => {}
            Some(v) => rewrite_strings(v, &new_value),
        }
    }
    Ok(())
}

/// Every file under `part-{i}` goes to machine i only, in `part{i}/`.
fn place_partitions(
    b: &mut Builder,
    pc: &PartConfig,
    data_dir: &str,
    doc: &mut Map<String, Value>,
) -> Result<(), PlanError> {
    for rank in 0..b.machines.len() {
        let dir = format!("part{rank}");
        let mut new_value = HashMap::new();
        for f in pc.part_files(rank) {
            check_part_path(pc, &f.key, &f.written)?;
            let name = file_name(&f.local)?;
            let src = b.source(&f.key, Content::File(f.local.clone()));
            let remote = remote_join(&[data_dir, &dir, &name]);
            b.place_on(rank, src, &remote, DATA_MODE)?;
            new_value.insert(f.written.clone(), format!("{dir}/{name}"));
        }
        if let Some(part) = doc.get_mut(&format!("part-{rank}")) {
            rewrite_strings(part, &new_value);
        }
    }
    Ok(())
}

/// The part_config with its paths rewritten: pretty, like DGL's own json.dump(indent=4), and
/// key order kept.
fn rewritten(pc: &PartConfig, doc: Map<String, Value>) -> Result<Content, PlanError> {
    let mut json =
        serde_json::to_vec_pretty(&Value::Object(doc)).map_err(|source| PlanError::Rewrite {
            part_config: pc.path.display().to_string(),
            source,
        })?;
    json.push(b'\n');
    Ok(Content::Bytes(json))
}

/// The script folder lands whole at `<ws>/<folder name>` on every machine.
fn place_scripts(b: &mut Builder, ws: &str, scripts: &ScriptFolder) -> Result<(), PlanError> {
    for f in &scripts.files {
        let origin = format!(
            "script_folder {}",
            Path::new(&scripts.name).join(&f.rel).display()
        );
        let src = b.source(&origin, Content::File(f.local.clone()));
        b.place_everywhere(src, &remote_join(&[ws, &scripts.name, &f.rel]), f.mode)?;
    }
    Ok(())
}

/// Collects sources (one per local file) and placements, refusing two sources at one path.
struct Builder {
    sources: Vec<Source>,
    by_local: HashMap<PathBuf, usize>,
    machines: Vec<MachinePlan>,
    placed: Vec<HashMap<String, usize>>,
}

impl Builder {
    fn new(n: usize, ips: &IpConfig) -> Self {
        Self {
            sources: Vec::new(),
            by_local: HashMap::new(),
            machines: ips
                .machines
                .iter()
                .map(|m| MachinePlan {
                    rank: m.rank,
                    ip: m.ip,
                    files: Vec::new(),
                })
                .collect(),
            placed: vec![HashMap::new(); n],
        }
    }

    /// The same local file named twice (two keys, or two parts) is read once.
    fn source(&mut self, origin: &str, content: Content) -> usize {
        if let Content::File(p) = &content {
            if let Some(&i) = self.by_local.get(p) {
                return i;
            }
            self.by_local.insert(p.clone(), self.sources.len());
        }
        self.sources.push(Source {
            origin: origin.to_string(),
            content,
        });
        self.sources.len() - 1
    }

    fn place_everywhere(
        &mut self,
        source: usize,
        remote: &str,
        mode: u32,
    ) -> Result<(), PlanError> {
        for rank in 0..self.machines.len() {
            self.place_on(rank, source, remote, mode)?;
        }
        Ok(())
    }

    fn place_on(
        &mut self,
        rank: usize,
        source: usize,
        remote: &str,
        mode: u32,
    ) -> Result<(), PlanError> {
        if let Some(&other) = self.placed[rank].get(remote) {
            if other == source {
                return Ok(());
            }
            return Err(PlanError::Collision {
                rank,
                remote: remote.to_string(),
                first: self.sources[other].origin.clone(),
                second: self.sources[source].origin.clone(),
            });
        }
        self.placed[rank].insert(remote.to_string(), source);
        self.machines[rank].files.push(Placement {
            source,
            remote: remote.to_string(),
            mode,
        });
        Ok(())
    }
}

/// `..` never; an absolute path only for the workspace (the agent checks it is in its root).
fn check_flag(flag: &'static str, value: &str, absolute_ok: bool) -> Result<(), PlanError> {
    let bad = |reason| PlanError::BadFlag {
        flag,
        value: value.to_string(),
        reason,
    };
    if value.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    if flag == "workspace" && value.is_empty() {
        return Err(bad("must not be empty (use . for the agent's root)"));
    }
    if flag == "workspace" {
        if let Some(why) = crate::config::workspace::unexpanded_tilde(value) {
            return Err(PlanError::Workspace(why));
        }
    }
    let p = Path::new(value);
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(bad("must not contain `..`: it would leave the workspace"));
    }
    if p.is_absolute() && !absolute_ok {
        return Err(bad("must be relative to the workspace"));
    }
    Ok(())
}

/// Paths inside the part_config must stay below its directory: that is all DGL's own
/// partitioner writes, and anything else could not be placed inside the workspace.
fn check_part_path(pc: &PartConfig, key: &str, value: &str) -> Result<(), PlanError> {
    let bad = |reason| PlanError::BadPartPath {
        part_config: pc.path.display().to_string(),
        key: key.to_string(),
        value: value.to_string(),
        reason,
    };
    let p = Path::new(value);
    if value.is_empty() {
        return Err(bad("an empty path"));
    }
    if p.is_absolute() {
        return Err(bad(
            "an absolute path; DGL's partitioner writes paths relative to the JSON file",
        ));
    }
    if !crate::config::stays_inside(p) {
        return Err(bad(
            "a path with `..` that leaves the directory of the JSON file",
        ));
    }
    Ok(())
}

/// Replaces every string in `v` that `new_value` knows: the strings of a `part-{i}` object
/// are exactly the file paths `PartConfig` listed, at any depth.
fn rewrite_strings(v: &mut Value, new_value: &HashMap<String, String>) {
    match v {
        Value::String(s) => {
            if let Some(n) = new_value.get(s.as_str()) {
                *s = n.clone();
            }
        }
        Value::Object(m) => m.values_mut().for_each(|v| rewrite_strings(v, new_value)),
        Value::Array(a) => a.iter_mut().for_each(|v| rewrite_strings(v, new_value)),
        _ => {}
    }
}

fn file_name(p: &Path) -> Result<String, PlanError> {
    let name = p.file_name().unwrap_or(p.as_os_str());
    name.to_str()
        .map(str::to_string)
        .ok_or_else(|| PlanError::NotUtf8 {
            path: p.display().to_string(),
        })
}

/// Joins path pieces with `/`, dropping empty and `.` components (`ws/./data/` -> `ws/data`);
/// a leading `/` of the first piece is kept.
pub fn remote_join(pieces: &[&str]) -> String {
    let absolute = pieces.first().is_some_and(|p| p.starts_with('/'));
    let parts: Vec<&str> = pieces
        .iter()
        .flat_map(|p| p.split('/'))
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    let joined = parts.join("/");
    match (absolute, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

#[cfg(test)]
mod tests;
