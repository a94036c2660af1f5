use clap::{CommandFactory, Parser};
use dglrun_agent::server;
use dglrun_agent::settings::{resolve_token, Args, Effective};
use std::io::IsTerminal;

/// Variables that must not reach the processes the agent starts.
const SECRET_ENV: &[&str] = &["DGL_AGENT_TOKEN", "DGL_AGENT_TOKEN_FILE"];

fn main() {
    let args = Args::parse();
    // Documentation first: it needs no settings (and must work where they are broken).
    if let Some(shell) = args.completions {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut Args::command(), "dgl-agent", &mut out);
        write_stdout(&out);
        return;
    }
    if args.man {
        // The man page's NAME line already says "dgl-agent -".
        let cmd = Args::command().about("runs DGL jobs for dgl-coord on every host, without ssh");
        let mut out = Vec::new();
        if let Err(e) = clap_mangen::Man::new(cmd).render(&mut out) {
            fail(e.into());
        }
        write_stdout(&out);
        return;
    }
    let settings = match Effective::resolve(&args, std::env::var_os("HOME").map(Into::into)) {
        Ok(s) => s,
        Err(e) => fail(e),
    };
    if args.print_config {
        print!("{}", settings.to_toml());
        return;
    }
    // Read the token, then scrub it before any thread exists: jobs inherit the agent's
    // environment.
    let user_tls = settings.tls_cert.is_some() || settings.tls_key.is_some();
    let token = resolve_token(
        settings.token_file.as_deref(),
        std::env::var("DGL_AGENT_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
        user_tls,
    )
    .unwrap_or_else(|e| fail(e));
    for k in SECRET_ENV {
        #[allow(clippy::disallowed_methods)] // main, before the runtime or any other thread starts
        std::env::remove_var(k);
    }
    if nix::unistd::geteuid().is_root() && !settings.allow_root {
        fail(anyhow::anyhow!(
            "refusing to run as root: every job would run as root. Start dgl-agent as an \
             ordinary user, or pass --allow-root"
        ));
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Escape codes only for a terminal: a log file or journald gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // Connections, files being written and job pipes all need fds: take all we may have.
    let nofile = dglrun_agent::listen::raise_nofile_limit();
    let config = settings
        .into_config(token, nofile)
        .unwrap_or_else(|e| fail(e));
    let runtime = tokio::runtime::Runtime::new().unwrap_or_else(|e| fail(e.into()));
    if let Err(e) = runtime.block_on(server::run_until_signal(config)) {
        fail(e);
    }
}

/// A closed pipe (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => fail(e.into()),
        _ => {}
    }
}

fn fail(e: anyhow::Error) -> ! {
    eprintln!("dgl-agent: error: {e:#}");
    std::process::exit(1);
}
