//! The partition config JSON written by `dgl.distributed.partition_graph`.
//!
//! Paths inside it are resolved by DGL relative to the JSON file's own directory.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

#[derive(Clone, Debug)]
pub struct PartConfig {
    /// Where the JSON was read from.
    pub path: PathBuf,
    pub graph_name: Option<String>,
    pub num_parts: usize,
    /// The whole document, kept so it can be rewritten without losing unknown keys.
    pub doc: Map<String, Value>,
}

/// A file named by the part_config, as written in it and as resolved on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedFile {
    /// JSON key path, e.g. `part-1.node_feats` or `node_map._N`.
    pub key: String,
    pub written: String,
    pub local: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum PartConfigError {
    #[error("cannot read part_config {path}: {error}")]
    Read {
        path: String,
        // Not `source`: the message already carries it, and error chains would repeat it.
        error: std::io::Error,
    },
    #[error("{path}:{line}:{column}: not valid JSON: {reason}")]
    Json {
        path: String,
        line: usize,
        column: usize,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

impl PartConfig {
    pub fn load(path: &Path) -> Result<Self, PartConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| PartConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, PartConfigError> {
        let origin = path.display().to_string();
        let invalid = |reason: String| PartConfigError::Invalid {
            path: origin.clone(),
            reason,
        };
        let value: Value = serde_json::from_str(text).map_err(|e| PartConfigError::Json {
            path: origin.clone(),
            line: e.line(),
            column: e.column(),
            reason: e.to_string(),
        })?;
        let Value::Object(doc) = value else {
            return Err(invalid("the top level must be a JSON object".into()));
        };
        let num_parts = match doc.get("num_parts") {
            Some(Value::Number(n)) => {
                n.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                    invalid(format!("num_parts must be a positive integer, not {n}"))
                })? as usize
            }
            Some(other) => return Err(invalid(format!("num_parts must be a number, not {other}"))),
            None => return Err(invalid("num_parts is missing".into())),
        };
        for i in 0..num_parts {
            match doc.get(&format!("part-{i}")) {
                Some(Value::Object(_)) => {}
                Some(_) => return Err(invalid(format!("part-{i} must be an object"))),
                None => {
                    return Err(invalid(format!(
                        "part-{i} is missing (num_parts is {num_parts})"
                    )))
                }
            }
        }
        let graph_name = doc
            .get("graph_name")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(Self {
            path: path.to_path_buf(),
            graph_name,
            num_parts,
            doc,
        })
    }

    /// Directory that relative paths inside the JSON are resolved against.
    pub fn base_dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Files of partition `i`: every string value under `part-{i}`, at any depth.
    pub fn part_files(&self, i: usize) -> Vec<NamedFile> {
        let key = format!("part-{i}");
        let mut out = Vec::new();
        if let Some(v) = self.doc.get(&key) {
            self.collect(&key, v, &mut out);
        }
        out
    }

    /// Files every machine needs: `node_map` / `edge_map` when given as paths (older DGL).
    pub fn shared_files(&self) -> Vec<NamedFile> {
        let mut out = Vec::new();
        for key in ["node_map", "edge_map"] {
            if let Some(v) = self.doc.get(key) {
                if !v.is_object() {
                    self.collect(key, v, &mut out);
                }
            }
        }
        out
    }

    fn collect(&self, key: &str, v: &Value, out: &mut Vec<NamedFile>) {
        match v {
            Value::String(s) => out.push(NamedFile {
                key: key.to_string(),
                written: s.clone(),
                local: self.base_dir().join(s),
            }),
            Value::Object(m) => {
                for (k, v) in m {
                    self.collect(&format!("{key}.{k}"), v, out);
                }
            }
            Value::Array(a) => {
                for (n, v) in a.iter().enumerate() {
                    self.collect(&format!("{key}[{n}]"), v, out);
                }
            }
            _ => {}
        }
    }
}

/// Whether relative path `p` stays below its starting directory, read lexically as DGL's
/// `os.path.join` + open does on a tree without symlinks: `part0/../part0/g.dgl` does,
/// `part0/../../g.dgl` does not. An absolute path never does.
pub fn stays_inside(p: &Path) -> bool {
    let mut depth = 0usize;
    for c in p.components() {
        match c {
            std::path::Component::Normal(_) => depth += 1,
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            std::path::Component::RootDir | std::path::Component::Prefix(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMPAT_P2: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../integration-tests/fixtures/dgl-compat/dgl-partitions/p2/synth.json"
    );

    #[test]
    fn reads_real_dgl_output() {
        let p = Path::new(COMPAT_P2);
        let cfg = PartConfig::load(p).unwrap();
        assert_eq!(cfg.num_parts, 2);
        assert_eq!(cfg.graph_name.as_deref(), Some("synth"));
        let files: Vec<String> = cfg.part_files(1).into_iter().map(|f| f.written).collect();
        assert_eq!(
            files,
            [
                "part1/node_feat.dgl",
                "part1/edge_feat.dgl",
                "part1/graph.dgl"
            ]
        );
        assert!(cfg.shared_files().is_empty());
        assert!(cfg.part_files(1).iter().all(|f| f.local.exists()));
    }

    fn check_err(text: &str, needle: &str) {
        let err = PartConfig::parse(text, Path::new("/d/g.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{err:?} should contain {needle:?}");
    }

    #[test]
    fn paths_that_stay_inside_after_dot_dot() {
        for (p, inside) in [
            ("part0/../part0/graph.dgl", true),
            ("a/./b/../c", true),
            ("part0/../../g.dgl", false),
            ("../g", false),
            ("a/..", true),
            ("/etc/passwd", false),
        ] {
            assert_eq!(stays_inside(Path::new(p)), inside, "{p}");
        }
    }

    #[test]
    fn refuses_bad_documents() {
        check_err("{\"num_parts\": 1,\n  oops}", "/d/g.json:2:");
        check_err("[]", "top level must be a JSON object");
        check_err("{}", "num_parts is missing");
        check_err("{\"num_parts\": 0}", "positive integer");
        check_err("{\"num_parts\": \"2\"}", "must be a number");
        check_err("{\"num_parts\": 2, \"part-0\": {}}", "part-1 is missing");
    }

    #[test]
    fn finds_every_path_valued_key_and_old_style_maps() {
        let text = r#"{"num_parts": 1, "node_map": "node_map.npy", "edge_map": {"_E": [[0, 1]]},
            "part-0": {"node_feats": "p0/n.dgl", "gb": {"graph": "p0/fused.pt"}, "count": 3}}"#;
        let cfg = PartConfig::parse(text, Path::new("/d/g.json")).unwrap();
        let keys: Vec<(String, PathBuf)> = cfg
            .part_files(0)
            .into_iter()
            .map(|f| (f.key, f.local))
            .collect();
        assert_eq!(
            keys,
            [
                (
                    "part-0.node_feats".to_string(),
                    PathBuf::from("/d/p0/n.dgl")
                ),
                (
                    "part-0.gb.graph".to_string(),
                    PathBuf::from("/d/p0/fused.pt")
                ),
            ]
        );
        let shared: Vec<String> = cfg.shared_files().into_iter().map(|f| f.key).collect();
        assert_eq!(shared, ["node_map"]);
    }
}
