//! Metadata every call carries: protocol version and the bearer token.

use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

pub const PROTOCOL_HEADER: &str = "dglrun-protocol";
pub const AUTH_HEADER: &str = "authorization";

/// Reads a token file (both sides use the same rule): surrounding whitespace is not part of
/// the token, and an empty file is an error rather than "no token".
pub fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("token file {} is empty", path.display()));
    }
    Ok(token.to_string())
}

/// Adds the protocol version and, when given, the token to an outgoing request.
#[derive(Clone)]
pub struct ClientMeta {
    auth: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl ClientMeta {
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        let auth = match token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| "the token must be printable ASCII".to_string())?,
            ),
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

/// Checks version and token of an incoming request before any handler runs.
#[derive(Clone)]
pub struct ServerCheck {
    token: Option<Vec<u8>>,
}

impl ServerCheck {
    pub fn new(token: Option<String>) -> Self {
        Self {
            token: token.map(|t| format!("Bearer {t}").into_bytes()),
        }
    }
}

impl tonic::service::Interceptor for ServerCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let md = req.metadata();
        let theirs = md
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
        if let Some(expected) = &self.token {
            let given = md.get(AUTH_HEADER).map(|v| v.as_bytes()).unwrap_or(b"");
            if !constant_time_eq(given, expected) {
                return Err(Status::unauthenticated("missing or wrong token"));
            }
        }
        Ok(req)
    }
}

/// Compares without an early exit, so response timing says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | ((a.len() ^ b.len()) >> 8) as u8;
    for (i, &x) in b.iter().enumerate() {
        diff |= x ^ a.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_matches_only_equal() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"abcd", b"abc"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
