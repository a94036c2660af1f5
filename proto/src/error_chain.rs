//! An error and its causes as one line, the form every reply and log line uses.

/// The message of `e` followed by each cause, `: `-separated; a cause that repeats the text
/// before it (tonic wraps errors that way) is written once.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct E {
        text: &'static str,
        #[source]
        source: Option<Box<E>>,
    }

    fn e(chain: &[&'static str]) -> E {
        let mut out: Option<Box<E>> = None;
        for text in chain.iter().rev() {
            out = Some(Box::new(E { text, source: out }));
        }
        *out.unwrap()
    }

    #[test]
    fn chains_read_as_one_line() {
        for (chain, line) in [
            (&["a"][..], "a"),
            (
                &["cannot read x", "permission denied"][..],
                "cannot read x: permission denied",
            ),
            (
                &["transport error", "transport error", "refused"][..],
                "transport error: refused",
            ),
            (&["a", "b", "a"][..], "a: b: a"),
        ] {
            assert_eq!(error_chain(&e(chain)), line, "{chain:?}");
        }
    }
}
