//! Mutual TLS from user-supplied files: both sides present a certificate signed by the
//! cluster's own CA. (Without such files, TLS comes from the token: `token_tls`.)

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// What is wrong with the user's TLS files; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-cert, --tls-key and --tls-ca go together: give all three or none")]
    Incomplete,
    #[error("cannot read TLS {what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read TLS {what} {}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS {what} {} holds no PEM certificate", path.display())]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("invalid CA certificate {}", path.display())]
    InvalidCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("invalid CA certificate {}", path.display())]
    InvalidCaVerifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("invalid TLS certificate or key {}", path.display())]
    InvalidIdentity {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the TLS configuration")]
    Config(#[source] rustls::Error),
}

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
    ) -> Result<Option<Self>, TlsError> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(Self { cert, key, ca })),
            _ => Err(TlsError::Incomplete),
        }
    }

    fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
        std::fs::read(path).map_err(|source| TlsError::Read {
            what,
            path: path.into(),
            source,
        })
    }

    fn identity(&self) -> Result<Identity, TlsError> {
        Ok(Identity::from_pem(
            Self::read(&self.cert, "certificate")?,
            Self::read(&self.key, "key")?,
        ))
    }

    fn ca(&self) -> Result<Certificate, TlsError> {
        Ok(Certificate::from_pem(Self::read(
            &self.ca,
            "CA certificate",
        )?))
    }

    /// The agent side: its certificate, and clients must present one signed by the CA.
    pub fn server(&self) -> Result<ServerTlsConfig, TlsError> {
        Ok(ServerTlsConfig::new()
            .identity(self.identity()?)
            .client_ca_root(self.ca()?))
    }

    fn pem_certs(
        path: &Path,
        what: &'static str,
    ) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsError::Pem {
                what,
                path: path.into(),
                source,
            })?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate {
                what,
                path: path.into(),
            });
        }
        Ok(certs)
    }

    fn pem_key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_file(&self.key).map_err(|source| TlsError::Pem {
            what: "key",
            path: self.key.clone(),
            source,
        })
    }

    fn invalid_identity(&self) -> impl FnOnce(rustls::Error) -> TlsError + '_ {
        |source| TlsError::InvalidIdentity {
            path: self.cert.clone(),
            source,
        }
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in Self::pem_certs(&self.ca, "CA certificate")? {
            roots.add(c).map_err(|source| TlsError::InvalidCa {
                path: self.ca.clone(),
                source,
            })?;
        }
        Ok(roots)
    }

    /// The agent side as a rustls configuration, for agents that choose per connection.
    pub fn rustls_server(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = crate::token_tls::provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            provider.clone(),
        )
        .build()
        .map_err(|source| TlsError::InvalidCaVerifier {
            path: self.ca.clone(),
            source,
        })?;
        let mut c = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(Self::pem_certs(&self.cert, "certificate")?, self.pem_key()?)
            .map_err(self.invalid_identity())?;
        c.alpn_protocols = vec![b"h2".to_vec()];
        Ok(c)
    }

    /// The coordinator side as a rustls configuration; the agent's certificate must name
    /// the address the coordinator connects to.
    pub fn rustls_client(&self) -> Result<rustls::ClientConfig, TlsError> {
        let provider = crate::token_tls::provider();
        let mut c = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(Self::pem_certs(&self.cert, "certificate")?, self.pem_key()?)
            .map_err(self.invalid_identity())?;
        c.alpn_protocols = vec![b"h2".to_vec()];
        Ok(c)
    }

    /// The coordinator side; `host` (an IP or DNS name) must be in the agent's certificate.
    pub fn client(&self, host: &str) -> Result<ClientTlsConfig, TlsError> {
        Ok(ClientTlsConfig::new()
            .ca_certificate(self.ca()?)
            .identity(self.identity()?)
            .domain_name(host))
    }
}
