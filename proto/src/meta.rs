//! Metadata every call carries: protocol version and the bearer token.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

use crate::token::Token;

pub const PROTOCOL_HEADER: &str = "dglrun-protocol";
pub const AUTH_HEADER: &str = "authorization";

/// A token that cannot travel in an HTTP header.
#[derive(Debug, thiserror::Error)]
#[error("the token must be printable ASCII")]
pub struct TokenHeaderError(#[source] tonic::metadata::errors::InvalidMetadataValue);

/// Adds the protocol version and, when given, the token to an outgoing request.
#[derive(Clone)]
pub struct ClientMeta {
    auth: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl ClientMeta {
    pub fn new(token: Option<&str>) -> Result<Self, TokenHeaderError> {
        let auth = match token {
            Some(t) => {
                let mut v: MetadataValue<tonic::metadata::Ascii> =
                    format!("Bearer {t}").parse().map_err(TokenHeaderError)?;
                // Keeps it out of HPACK's tables and out of any debug output.
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        Ok(Self { auth })
    }
}

impl tonic::service::Interceptor for ClientMeta {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let md = req.metadata_mut();
        md.insert(
            PROTOCOL_HEADER,
            MetadataValue::from(crate::PROTOCOL_VERSION),
        );
        if let Some(a) = &self.auth {
            md.insert(AUTH_HEADER, a.clone());
        }
        Ok(req)
    }
}

/// What the agent knows about the connection a request came on; the agent's listener puts
/// it into every request (tonic's connect info). Clones share the flags.
#[derive(Clone, Debug)]
pub struct ConnAuth {
    pub remote: Option<SocketAddr>,
    flags: Arc<ConnFlags>,
}

#[derive(Debug, Default)]
struct ConnFlags {
    /// The TLS peer proved it holds the token's key or a certificate of the user's CA.
    peer_certified: AtomicBool,
    /// A request on this connection has passed the check.
    authenticated: AtomicBool,
}

impl ConnAuth {
    pub fn new(remote: Option<SocketAddr>, peer_certified: bool) -> Self {
        let c = Self {
            remote,
            flags: Arc::default(),
        };
        if peer_certified {
            c.set_peer_certified();
        }
        c
    }

    pub fn set_peer_certified(&self) {
        self.flags.peer_certified.store(true, Ordering::Release);
    }

    pub fn peer_certified(&self) -> bool {
        self.flags.peer_certified.load(Ordering::Acquire)
    }

    pub fn is_authenticated(&self) -> bool {
        self.flags.authenticated.load(Ordering::Acquire)
    }

    pub fn mark_authenticated(&self) {
        self.flags.authenticated.store(true, Ordering::Release);
    }
}

/// Checks token and version of an incoming request before any handler runs, the token
/// first: a caller without it learns nothing, not even the protocol version.
#[derive(Clone)]
pub struct ServerCheck {
    /// `Bearer <token>`; without a token only TLS-certified peers are let in.
    expected: Option<Vec<u8>>,
}

impl ServerCheck {
    pub fn new(token: Option<&Token>) -> Self {
        Self {
            expected: token.map(|t| format!("Bearer {}", t.as_str()).into_bytes()),
        }
    }

    fn authentic(&self, req: &Request<()>, conn: Option<&ConnAuth>) -> bool {
        match &self.expected {
            Some(expected) => {
                let given = req
                    .metadata()
                    .get(AUTH_HEADER)
                    .map(|v| v.as_bytes())
                    .unwrap_or(b"");
                token_matches(given, expected)
            }
            None => conn.is_some_and(ConnAuth::peer_certified),
        }
    }
}

/// Constant time in the content; a length difference fails without looking further (the
/// length of the token is not the secret).
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    bool::from(given.ct_eq(expected))
}

impl tonic::service::Interceptor for ServerCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let conn = req.extensions().get::<ConnAuth>().cloned();
        if !self.authentic(&req, conn.as_ref()) {
            return Err(Status::unauthenticated("missing or wrong token"));
        }
        if let Some(c) = &conn {
            c.mark_authenticated();
        }
        let theirs = req
            .metadata()
            .get(PROTOCOL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok());
        if theirs != Some(crate::PROTOCOL_VERSION) {
            let theirs = theirs.map_or("none".to_string(), |v| v.to_string());
            return Err(Status::failed_precondition(format!(
                "protocol version mismatch: client speaks {theirs}, agent {} speaks {}",
                crate::VERSION,
                crate::PROTOCOL_VERSION
            )));
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn check() -> ServerCheck {
        ServerCheck::new(Some(&Token::parse(TOKEN, "test").unwrap()))
    }

    fn request(auth: Option<&[u8]>, version: Option<&str>) -> Request<()> {
        let mut req = Request::new(());
        if let Some(a) = auth {
            req.metadata_mut()
                .insert(AUTH_HEADER, MetadataValue::try_from(a).unwrap());
        }
        if let Some(v) = version {
            req.metadata_mut()
                .insert(PROTOCOL_HEADER, v.parse().unwrap());
        }
        req
    }

    #[test]
    fn token_matches_only_equal() {
        let e = format!("Bearer {TOKEN}").into_bytes();
        assert!(token_matches(&e, &e));
        let mut wrong = e.clone();
        *wrong.last_mut().unwrap() ^= 1;
        assert!(!token_matches(&wrong, &e));
        assert!(!token_matches(&e[..e.len() - 1], &e));
        assert!(!token_matches(b"", &e));
        // The right token followed by 65,536 bytes of junk (a length that folds to 0 in
        // 16 bits) is not the right token.
        let mut long = e.clone();
        long.extend(std::iter::repeat_n(b'x', 65536));
        assert!(!token_matches(&long, &e));
        let mut long = e.clone();
        long.extend(std::iter::repeat_n(0u8, 1 << 16));
        assert!(!token_matches(&long, &e));
    }

    #[test]
    fn token_is_checked_before_the_version() {
        let v = crate::PROTOCOL_VERSION.to_string();
        // No token and a wrong version: unauthenticated, and the reply names no version.
        let err = check().call(request(None, Some("999"))).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(!err.message().contains(&v), "{}", err.message());
        assert!(!err.message().contains("999"), "{}", err.message());
        let err = check()
            .call(request(Some(b"Bearer wrong"), None))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        // With the token, the version mismatch is reported.
        let auth = format!("Bearer {TOKEN}");
        let err = check()
            .call(request(Some(auth.as_bytes()), Some("999")))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(check()
            .call(request(Some(auth.as_bytes()), Some(&v)))
            .is_ok());
    }

    #[test]
    fn without_a_token_only_certified_peers_pass() {
        let v = crate::PROTOCOL_VERSION.to_string();
        let mut c = ServerCheck::new(None);
        assert!(c.call(request(None, Some(&v))).is_err());
        let conn = ConnAuth::new(None, false);
        let mut req = request(None, Some(&v));
        req.extensions_mut().insert(conn.clone());
        assert!(c.call(req).is_err());
        assert!(!conn.is_authenticated());
        let conn = ConnAuth::new(None, true);
        let mut req = request(None, Some(&v));
        req.extensions_mut().insert(conn.clone());
        assert!(c.call(req).is_ok());
        assert!(conn.is_authenticated());
    }
}
