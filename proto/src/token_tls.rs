//! Mutual TLS from the shared token alone: both sides derive one Ed25519 key pair from the
//! token (HKDF-SHA256) and present its public key as a raw public key (RFC 7250, TLS 1.3).
//! Each side accepts a peer only if the peer's key is that same key and the peer proved it
//! holds the private key in the handshake, which only a holder of the token can. Nothing but
//! the token file has to be managed, and the token itself never crosses the network.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature_with_raw_key, CryptoProvider};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer,
    UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use subtle::ConstantTimeEq;

use crate::token::Token;

/// Separates this use of the token from any other use it may ever have.
const HKDF_SALT: &[u8] = b"dglrun token tls v1";
const HKDF_INFO: &[u8] = b"ed25519 identity key";
/// PKCS#8 v1 wrapping of an Ed25519 seed (RFC 8410): this prefix, then the 32-byte seed.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The name a client asks for; the agent's key, not a name, is what is checked.
pub const SERVER_NAME: &str = "dgl-agent";

#[derive(Debug, thiserror::Error)]
pub enum TokenTlsError {
    #[error("cannot derive the TLS key from the token: HKDF failed")]
    Hkdf,
    #[error("cannot derive the TLS key from the token")]
    Key(#[source] rustls::Error),
    #[error("cannot derive the TLS key from the token: the key has no public half")]
    NoPublicKey,
    #[error("cannot build the TLS configuration")]
    Config(#[source] rustls::Error),
}

/// The key pair every holder of the token derives alike.
#[derive(Clone)]
pub struct TokenKeys {
    key: Arc<CertifiedKey>,
    spki: Vec<u8>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(..)")
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TokenKeys {
    pub fn derive(token: &Token) -> Result<Self, TokenTlsError> {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, HKDF_SALT);
        let prk = salt.extract(token.as_str().as_bytes());
        let mut seed = [0u8; 32];
        prk.expand(&[HKDF_INFO], SeedLen)
            .and_then(|okm| okm.fill(&mut seed))
            .map_err(|_| TokenTlsError::Hkdf)?;
        let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
        pkcs8.extend_from_slice(&seed);
        let provider = provider();
        let signing = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8)))
            .map_err(TokenTlsError::Key)?;
        let spki = signing
            .public_key()
            .ok_or(TokenTlsError::NoPublicKey)?
            .as_ref()
            .to_vec();
        let key = Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(spki.clone())],
            signing,
        ));
        Ok(Self {
            key,
            spki,
            provider,
        })
    }

    fn verifier(&self) -> Arc<SameKey> {
        Arc::new(SameKey {
            spki: self.spki.clone(),
            provider: self.provider.clone(),
        })
    }

    /// The agent's side: TLS 1.3, the token key, and clients must present it too.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TokenTlsError> {
        let mut c = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TokenTlsError::Config)?
            .with_client_cert_verifier(self.verifier())
            .with_cert_resolver(Arc::new(
                rustls::server::AlwaysResolvesServerRawPublicKeys::new(self.key.clone()),
            ));
        c.alpn_protocols = vec![b"h2".to_vec()];
        Ok(c)
    }

    /// The coordinator's side.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TokenTlsError> {
        let mut c = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TokenTlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(self.verifier())
            .with_client_cert_resolver(Arc::new(
                rustls::client::AlwaysResolvesClientRawPublicKeys::new(self.key.clone()),
            ));
        c.alpn_protocols = vec![b"h2".to_vec()];
        Ok(c)
    }
}

struct SeedLen;

impl ring::hkdf::KeyType for SeedLen {
    fn len(&self) -> usize {
        32
    }
}

/// Accepts exactly the token's public key, on either side.
#[derive(Debug)]
struct SameKey {
    spki: Vec<u8>,
    provider: Arc<CryptoProvider>,
}

impl SameKey {
    fn check(&self, presented: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if bool::from(presented.as_ref().ct_eq(&self.spki)) {
            Ok(())
        } else {
            Err(rustls::Error::General(
                "the peer's key is not derived from our token (different token file?)".into(),
            ))
        }
    }

    fn signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(cert.as_ref()),
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

impl ServerCertVerifier for SameKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for SameKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    fn token(c: char) -> Token {
        Token::parse(&c.to_string().repeat(40), "test").unwrap()
    }

    async fn handshake(server: &Token, client: &Token) -> Result<(), String> {
        let s = TokenKeys::derive(server).unwrap().server_config().unwrap();
        let c = TokenKeys::derive(client).unwrap().client_config().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = TlsAcceptor::from(Arc::new(s))
                .accept(tcp)
                .await
                .map_err(|e| e.to_string())?;
            let mut b = [0u8; 4];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(b)
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from(SERVER_NAME).unwrap();
        let client_side = async {
            let mut tls = TlsConnector::from(Arc::new(c))
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        };
        let c = client_side.await;
        let s = srv.await.unwrap();
        c?;
        assert_eq!(&s?, b"ping");
        Ok(())
    }

    #[tokio::test]
    async fn same_token_shakes_hands_and_another_is_refused() {
        handshake(&token('a'), &token('a')).await.unwrap();
        assert!(handshake(&token('a'), &token('b')).await.is_err());
        assert!(handshake(&token('b'), &token('a')).await.is_err());
    }

    #[test]
    fn derivation_is_deterministic() {
        let a = TokenKeys::derive(&token('a')).unwrap();
        let b = TokenKeys::derive(&token('a')).unwrap();
        let c = TokenKeys::derive(&token('c')).unwrap();
        assert_eq!(a.spki, b.spki);
        assert_ne!(a.spki, c.spki);
    }
}
