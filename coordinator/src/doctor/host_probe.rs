//! The probe doctor runs on each host (`sh -c`), and what it printed, parsed. Each line starts
//! with a keyword, so output of the user's `--setup` or of a noisy import is ignored.

use serde::Deserialize;

use crate::probe::ProbeOutput;

/// Prints the Python, its version and the dgl and torch versions as one JSON line.
const PYTHON_PROBE: &str = r#"import json, sys
r = {"executable": sys.executable, "version": sys.version.split()[0]}
for m in ("dgl", "torch"):
    try:
        r[m] = str(getattr(__import__(m), "__version__", "unknown"))
    except BaseException as e:
        r.setdefault("import_error", (m + ": " + type(e).__name__ + ": " + str(e))[:300])
print("doctor-python " + json.dumps(r), flush=True)
"#;

/// The probe's shell text: `setup` first (it may change PATH), then the GPUs, then `python`.
/// (Ports and /dev/shm the agent reports itself, in Preflight.)
pub(super) fn script(setup: Option<&str>, python: &str) -> String {
    let py = shlex::try_quote(PYTHON_PROBE).map_or_else(|_| "''".into(), |q| q.to_string());
    format!(
        r#"{setup}
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>&1)
  rc=$?
  printf '%s\n' "$gpus" | sed -n 's/^GPU /doctor-gpu GPU /p'
  [ "$rc" = 0 ] || printf '%s\n' "$gpus" | tail -n 1 | sed 's/^/doctor-gpu-error /'
  echo "doctor-gpus-listed $rc"
fi
{python} -c {py}
"#,
        setup = setup.unwrap_or(""),
    )
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub(super) struct Python {
    pub executable: String,
    pub version: String,
    pub dgl: Option<String>,
    pub torch: Option<String>,
    pub import_error: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Facts {
    /// None: no nvidia-smi on the PATH.
    pub gpus: Option<Vec<String>>,
    /// nvidia-smi is there but failed (a driver problem).
    pub gpu_error: Option<String>,
    pub python: Option<Python>,
    /// Why there is no `python` (its last line of stderr).
    pub python_error: Option<String>,
}

pub(super) fn parse(out: &ProbeOutput) -> Facts {
    let mut f = Facts::default();
    let mut gpus = Vec::new();
    for line in &out.stdout {
        let (key, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match key {
            "doctor-gpu" => gpus.push(rest.to_string()),
            "doctor-gpus-listed" => {
                f.gpus = Some(std::mem::take(&mut gpus));
                if rest.trim() != "0" {
                    f.gpu_error = Some(format!(
                        "nvidia-smi -L exited {}: {}",
                        rest.trim(),
                        f.gpu_error.take().unwrap_or_default()
                    ));
                }
            }
            "doctor-gpu-error" => f.gpu_error = Some(rest.to_string()),
            "doctor-python" => f.python = serde_json::from_str(rest).ok(),
            _ => {}
        }
    }
    if f.python.is_none() {
        f.python_error = out.stderr.last().cloned();
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probes_lines_are_read_and_others_ignored() {
        let out = ProbeOutput {
            stdout: [
                "activating env",
                "doctor-gpu GPU 0: NVIDIA A100 (UUID: GPU-1)",
                "doctor-gpu GPU 1: NVIDIA A100 (UUID: GPU-2)",
                "doctor-gpus-listed 0",
                r#"doctor-python {"executable": "/usr/bin/python3", "version": "3.11.2", "dgl": "2.1.0", "import_error": "torch: ModuleNotFoundError: x"}"#,
            ]
            .map(String::from)
            .to_vec(),
            stderr: vec![],
            code: 0,
        };
        let f = parse(&out);
        assert_eq!(f.gpus.as_ref().map(Vec::len), Some(2));
        let py = f.python.unwrap();
        assert_eq!((py.dgl.as_deref(), py.torch), (Some("2.1.0"), None));
    }
}
