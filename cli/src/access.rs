//! Flags every subcommand that talks to agents shares.

use std::path::PathBuf;

use dglrun_coordinator::cluster::AgentAccess;

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct AccessArgs {
    /// TCP port of dgl-agent on every machine.
    #[arg(long = "agent-port", alias = "agent_port", value_name = "PORT", env = "DGL_AGENT_PORT", default_value_t = dglrun_proto::DEFAULT_AGENT_PORT)]
    pub agent_port: u16,

    /// File with the agents' shared token [default: the DGL_AGENT_TOKEN variable if set, else
    /// $XDG_CONFIG_HOME/dglrun/token or ~/.config/dglrun/token]. Mode 0600, 128 bits or more.
    #[arg(
        long = "token-file",
        alias = "token_file",
        value_name = "FILE",
        env = "DGL_AGENT_TOKEN_FILE"
    )]
    pub token_file: Option<PathBuf>,

    /// Coordinator certificate (PEM) for mutual TLS; with --tls-key and --tls-ca.
    #[arg(long = "tls-cert", value_name = "PEM", env = "DGL_COORD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Coordinator private key (PEM).
    #[arg(long = "tls-key", value_name = "PEM", env = "DGL_COORD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// CA certificate (PEM) the agents' certificates are signed by.
    #[arg(long = "tls-ca", value_name = "PEM", env = "DGL_COORD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Talk plaintext h2c to non-loopback agents too (they need --insecure-plaintext): the
    /// token then crosses the network in clear text.
    #[arg(long = "insecure-plaintext", env = "DGL_COORD_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
}

impl AccessArgs {
    pub(crate) fn access(&self) -> anyhow::Result<AgentAccess> {
        let tls = dglrun_proto::tls::TlsFiles::from_flags(
            self.tls_cert.clone(),
            self.tls_key.clone(),
            self.tls_ca.clone(),
        )?;
        if self.insecure_plaintext {
            eprintln!(
                "dgl-coord: warning: --insecure-plaintext: the token crosses the network in \
                 clear text"
            );
        }
        Ok(AgentAccess::new(
            self.agent_port,
            self.token_file.as_deref(),
            tls,
            self.insecure_plaintext,
        )?)
    }
}
