//! "Busy, come back later": how an agent refuses work it has no room for at the moment, so
//! that a client can tell it from every other `ResourceExhausted` (a bound the request itself
//! broke, which no retry gets past) without reading the message text.
//!
//! The refusal is `ResourceExhausted` carrying the metadata key [`RETRY_AFTER_KEY`], whose
//! value is how long the client should wait first, in milliseconds.

use std::time::Duration;

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// Metadata key of a busy refusal; the value is a wait in milliseconds (ASCII digits).
pub const RETRY_AFTER_KEY: &str = "dglrun-retry-after-ms";

/// A refusal that says: retry after `after`.
pub fn status(message: impl Into<String>, after: Duration) -> Status {
    let mut meta = MetadataMap::new();
    let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
    meta.insert(RETRY_AFTER_KEY, MetadataValue::from(ms));
    Status::with_metadata(Code::ResourceExhausted, message, meta)
}

/// The wait a busy refusal asks for; `None` for any other status.
pub fn retry_after(s: &Status) -> Option<Duration> {
    if s.code() != Code::ResourceExhausted {
        return None;
    }
    let ms = s
        .metadata()
        .get(RETRY_AFTER_KEY)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_busy_refusal_says_when_to_retry() {
        let busy = status(
            "the agent already serves 64 transfers",
            Duration::from_millis(250),
        );
        assert_eq!(retry_after(&busy), Some(Duration::from_millis(250)));
        // The words are not the signal.
        assert_eq!(
            retry_after(&Status::resource_exhausted("retry later")),
            None
        );
        let mut meta = MetadataMap::new();
        meta.insert(RETRY_AFTER_KEY, MetadataValue::from(5u64));
        assert_eq!(
            retry_after(&Status::with_metadata(Code::Unavailable, "x", meta)),
            None
        );
    }
}
