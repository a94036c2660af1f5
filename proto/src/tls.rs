//! Mutual TLS from user-supplied files: both sides present a certificate signed by the
//! cluster's own CA. (Without such files, TLS comes from the token: `token_tls`.)

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// `--tls-cert --tls-key --tls-ca`, all three or none.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> Result<Option<Self>, String> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(Self { cert, key, ca })),
            _ => {
                Err("--tls-cert, --tls-key and --tls-ca go together: give all three or none".into())
            }
        }
    }

    fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
        std::fs::read(path).map_err(|e| format!("cannot read TLS {what} {}: {e}", path.display()))
    }

    fn identity(&self) -> Result<Identity, String> {
        Ok(Identity::from_pem(
            Self::read(&self.cert, "certificate")?,
            Self::read(&self.key, "key")?,
        ))
    }

    fn ca(&self) -> Result<Certificate, String> {
        Ok(Certificate::from_pem(Self::read(
            &self.ca,
            "CA certificate",
        )?))
    }

    /// The agent side: its certificate, and clients must present one signed by the CA.
    pub fn server(&self) -> Result<ServerTlsConfig, String> {
        Ok(ServerTlsConfig::new()
            .identity(self.identity()?)
            .client_ca_root(self.ca()?))
    }

    fn pem_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("cannot read TLS {what} {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "TLS {what} {} holds no PEM certificate",
                path.display()
            ));
        }
        Ok(certs)
    }

    fn pem_key(&self) -> Result<PrivateKeyDer<'static>, String> {
        PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| format!("cannot read TLS key {}: {e}", self.key.display()))
    }

    fn roots(&self) -> Result<rustls::RootCertStore, String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in Self::pem_certs(&self.ca, "CA certificate")? {
            roots
                .add(c)
                .map_err(|e| format!("invalid CA certificate {}: {e}", self.ca.display()))?;
        }
        Ok(roots)
    }

    /// The agent side as a rustls configuration, for agents that choose per connection.
    pub fn rustls_server(&self) -> Result<rustls::ServerConfig, String> {
        let provider = crate::token_tls::provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("invalid CA certificate {}: {e}", self.ca.display()))?;
        let mut c = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(Self::pem_certs(&self.cert, "certificate")?, self.pem_key()?)
            .map_err(|e| {
                format!(
                    "invalid TLS certificate or key {}: {e}",
                    self.cert.display()
                )
            })?;
        c.alpn_protocols = vec![b"h2".to_vec()];
        Ok(c)
    }

    /// The coordinator side as a rustls configuration; the agent's certificate must name
    /// the address the coordinator connects to.
    pub fn rustls_client(&self) -> Result<rustls::ClientConfig, String> {
        let provider = crate::token_tls::provider();
        let mut c = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(Self::pem_certs(&self.cert, "certificate")?, self.pem_key()?)
            .map_err(|e| {
                format!(
                    "invalid TLS certificate or key {}: {e}",
                    self.cert.display()
                )
            })?;
        c.alpn_protocols = vec![b"h2".to_vec()];
        Ok(c)
    }

    /// The coordinator side; `host` (an IP or DNS name) must be in the agent's certificate.
    pub fn client(&self, host: &str) -> Result<ClientTlsConfig, String> {
        Ok(ClientTlsConfig::new()
            .ca_certificate(self.ca()?)
            .identity(self.identity()?)
            .domain_name(host))
    }
}
