//! `dgl-coord completions SHELL` and `dgl-coord man`: generated from the clap definitions, so
//! they can never disagree with the flags.

use std::io::Write;
use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::Shell;

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Install, for example (zsh: then add `fpath=(~/.zfunc $fpath)` before `compinit` in ~/.zshrc):
  mkdir -p ~/.local/share/bash-completion/completions && \\
    dgl-coord completions bash > ~/.local/share/bash-completion/completions/dgl-coord
  mkdir -p ~/.zfunc && dgl-coord completions zsh > ~/.zfunc/_dgl-coord
  mkdir -p ~/.config/fish/completions && \\
    dgl-coord completions fish > ~/.config/fish/completions/dgl-coord.fish")]
pub(crate) struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: Shell,
}

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Example (then `man dgl-coord-launch`, with ~/.local/share/man on your MANPATH):
  dgl-coord man --dir ~/.local/share/man/man1")]
pub(crate) struct ManArgs {
    /// Write dgl-coord.1 and one page per subcommand (dgl-coord-launch.1, ...) into DIR
    /// instead of printing dgl-coord.1 on stdout.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

pub(crate) fn completions(args: CompletionsArgs) -> anyhow::Result<u8> {
    let mut cmd = crate::Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "dgl-coord", &mut out);
    if args.shell == Shell::Bash {
        out = fix_bash_names(&out);
    }
    write_stdout(&out)
}

/// clap_complete's bash script turns the dash of `dgl-coord` into `__` where it tracks the
/// subcommand (`cmd="dgl__coord__subcmd__launch"`) but into `__subcmd__` in the case labels
/// that read it back (`dgl__subcmd__coord__subcmd__launch)`), so no subcommand's flags ever
/// completed. Both spellings name the same thing here; use the first.
fn fix_bash_names(script: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(script)
        .replace("dgl__subcmd__coord", "dgl__coord")
        .into_bytes()
}

pub(crate) fn man(args: ManArgs) -> anyhow::Result<u8> {
    let cmd = crate::Cli::command();
    match args.dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir)?;
            clap_mangen::generate_to(cmd, &dir)
                .map_err(|e| anyhow::anyhow!("cannot write man pages to {}: {e}", dir.display()))?;
            Ok(0)
        }
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            write_stdout(&out)
        }
    }
}

/// A closed pipe (`| head`) is not an error worth reporting.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<u8> {
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_know_every_subcommand_in_every_shell() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut crate::Cli::command(), "dgl-coord", &mut out);
            let text = String::from_utf8(out).unwrap();
            for word in [
                "launch",
                "copy",
                "run",
                "status",
                "num_trainers",
                "trainers-per-host",
            ] {
                assert!(text.contains(word), "{shell}: {word}");
            }
        }
    }

    #[test]
    fn man_pages_are_written_per_subcommand() {
        let d = tempfile_dir();
        man(ManArgs {
            dir: Some(d.clone()),
        })
        .unwrap();
        for page in ["dgl-coord.1", "dgl-coord-launch.1", "dgl-coord-run.1"] {
            let text = std::fs::read_to_string(d.join(page)).unwrap();
            assert!(text.contains(".TH"), "{page}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    fn tempfile_dir() -> PathBuf {
        std::env::temp_dir().join(format!("dglrun-man-{}", std::process::id()))
    }
}
