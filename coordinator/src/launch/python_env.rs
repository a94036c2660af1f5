//! The job's Python environment (`--setup`, `--python`): before anything starts, every host
//! runs the interpreter the command would run, after the setup, in the job's workspace, and
//! must import dgl and torch; hosts where it cannot are refused, each named with the error.

use std::time::Duration;

use super::command;
use super::plan::LaunchOptions;
use crate::cluster::Host;

/// Importing torch and dgl from a cold page cache takes seconds.
const PROBE_TIMEOUT: Duration = Duration::from_secs(120);

const MARK: &str = "dglrun-python-ok";

/// The interpreter word of the command, when the user chose an environment.
fn interpreter(o: &LaunchOptions) -> Option<&str> {
    if o.setup.is_none() && o.python.is_none() {
        return None;
    }
    command::find_python(&o.udf_command).map(|r| &o.udf_command[r])
}

pub async fn check_all(hosts: &[Host], o: &LaunchOptions) -> anyhow::Result<()> {
    let Some(python) = interpreter(o) else {
        return Ok(());
    };
    let script = format!(
        "{}\n{python} -c {}",
        o.setup.as_deref().unwrap_or(""),
        command::quote(&format!(
            "import sys, dgl, torch; print('{MARK}', sys.executable, dgl.__version__, torch.__version__)"
        ))
    );
    let probes = hosts.iter().map(|h| {
        let script = script.clone();
        async move {
            let out = crate::probe::run(h, &o.workspace, &script, PROBE_TIMEOUT).await?;
            if out.code == 0 && out.stdout.iter().any(|l| l.starts_with(MARK)) {
                return Ok(());
            }
            let why = out
                .stderr
                .iter()
                .chain(&out.stdout)
                .rev()
                .find(|l| !l.trim().is_empty())
                .map_or("no output", String::as_str);
            anyhow::bail!(
                "{}: {python} cannot import dgl and torch there (exit {}): {why}",
                h.name(),
                out.code
            )
        }
    });
    let errors: Vec<String> = futures::future::join_all(probes)
        .await
        .into_iter()
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect();
    anyhow::ensure!(
        errors.is_empty(),
        "cannot launch: the job's Python environment is not usable on every host:\n  {}\n\
         Install dgl and torch there, or point --python / --setup at the environment that has them",
        errors.join("\n  ")
    );
    Ok(())
}
