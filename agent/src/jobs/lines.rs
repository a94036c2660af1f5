//! A byte stream cut into lines: what the agent reads from a process's pipe and from its log
//! files alike.
//!
//! Lines are capped at [`MAX_LINE`]: a longer one comes in pieces marked partial, so a
//! process that never writes a newline cannot make the agent buffer without bound.

/// Longest piece of a line sent as one event.
pub const MAX_LINE: usize = 64 << 10;

/// A complete line (without its newline) or a piece of an over-long one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub text: Vec<u8>,
    /// More of the same line follows.
    pub partial: bool,
}

/// Splits a byte stream into lines of at most `max` bytes.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max: max.max(1),
        }
    }

    /// Feeds `data`; completed lines and full pieces are appended to `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<Piece>) {
        while !data.is_empty() {
            let (segment, newline) = match data.iter().position(|&b| b == b'\n') {
                Some(i) => (&data[..i], true),
                None => (data, false),
            };
            self.append(segment, out);
            if newline {
                out.push(Piece {
                    text: std::mem::take(&mut self.buf),
                    partial: false,
                });
                data = &data[segment.len() + 1..];
            } else {
                data = &[];
            }
        }
    }

    /// A piece is emitted only once more bytes of the same line arrive, so a line of exactly
    /// `max` bytes is still sent whole.
    fn append(&mut self, mut segment: &[u8], out: &mut Vec<Piece>) {
        while !segment.is_empty() {
            if self.buf.len() == self.max {
                out.push(Piece {
                    text: std::mem::take(&mut self.buf),
                    partial: true,
                });
            }
            let take = (self.max - self.buf.len()).min(segment.len());
            self.buf.extend_from_slice(&segment[..take]);
            segment = &segment[take..];
        }
    }

    /// The unterminated rest, as a complete line (the writer exited or closed the stream).
    pub fn finish(&mut self) -> Option<Piece> {
        if self.buf.is_empty() {
            None
        } else {
            Some(Piece {
                text: std::mem::take(&mut self.buf),
                partial: false,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<(String, bool)> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        out.extend(s.finish());
        out.into_iter()
            .map(|p| (String::from_utf8(p.text).unwrap(), p.partial))
            .collect()
    }

    fn whole(v: &[&str]) -> Vec<(String, bool)> {
        v.iter().map(|s| (s.to_string(), false)).collect()
    }

    #[test]
    fn lines_are_reassembled_across_reads() {
        assert_eq!(
            split(100, &[b"ab", b"c\nde", b"f\n"]),
            whole(&["abc", "def"])
        );
        assert_eq!(split(100, &[b"\n\nx\n"]), whole(&["", "", "x"]));
        assert_eq!(split(100, &[b"no newline"]), whole(&["no newline"]));
        assert_eq!(split(100, &[b"a\r\n"]), whole(&["a\r"]));
        assert!(split(100, &[]).is_empty());
    }

    #[test]
    fn long_lines_come_in_capped_pieces() {
        assert_eq!(
            split(4, &[b"abcdefghij\nxy\n"]),
            vec![
                ("abcd".into(), true),
                ("efgh".into(), true),
                ("ij".into(), false),
                ("xy".into(), false)
            ]
        );
        // Exactly max bytes is one whole line, even when the newline arrives later.
        assert_eq!(split(4, &[b"abcd", b"\n"]), whole(&["abcd"]));
        assert_eq!(
            split(4, &[b"abcd", b"e"]),
            vec![("abcd".into(), true), ("e".into(), false)]
        );
    }

    #[test]
    fn a_never_ending_line_uses_bounded_memory() {
        let mut s = LineSplitter::new(1024);
        let mut out = Vec::new();
        let chunk = vec![b'x'; 10_000];
        for _ in 0..100 {
            s.push(&chunk, &mut out);
            assert!(s.buf.len() <= 1024);
            out.clear();
        }
    }
}
