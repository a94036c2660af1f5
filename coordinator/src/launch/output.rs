//! Labelled output: every line a process writes is printed as `[m1 server0] text`, to the
//! coordinator's stdout or stderr like the process wrote it, in one write per line so lines
//! of different processes never interleave mid-line.
//!
//! The agent splits lines longer than 64 KiB into pieces; each piece is printed as a line of
//! its own with the same label.
//!
//! A job's bytes never drive the terminal: every control character but tab (C0, DEL, C1 such
//! as the 8-bit CSI U+009B) and every byte that is not UTF-8 is shown as `\xNN`, one per
//! byte (the UTF-8 bytes for C1), as journalctl shows unprintable output. A backslash is
//! left as it is. JSON output escapes by JSON's rules instead.

use std::borrow::Cow;
use std::io::Write;

/// `text` with every byte a terminal would act on written as `\xNN` (see the module doc);
/// `\n` is kept when `keep_newlines` (dgl-coord's own multi-line messages).
pub fn escape_controls(text: &[u8], keep_newlines: bool) -> Cow<'_, [u8]> {
    let plain = |b: u8| (0x20..0x7f).contains(&b) || b == b'\t' || (keep_newlines && b == b'\n');
    if text.iter().all(|&b| plain(b)) {
        return Cow::Borrowed(text);
    }
    let mut out = Vec::with_capacity(text.len() + 16);
    let hex = |out: &mut Vec<u8>, b: u8| out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
    for chunk in text.utf8_chunks() {
        for ch in chunk.valid().chars() {
            let mut buf = [0; 4];
            let bytes = ch.encode_utf8(&mut buf).as_bytes();
            if ch.is_control() && ch != '\t' && !(keep_newlines && ch == '\n') {
                bytes.iter().for_each(|&b| hex(&mut out, b));
            } else {
                out.extend_from_slice(bytes);
            }
        }
        chunk.invalid().iter().for_each(|&b| hex(&mut out, b));
    }
    Cow::Owned(out)
}

use dglrun_proto::pb::OutputStream;

/// `[prefix] text\n`
pub fn format_line(prefix: &str, text: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(prefix.len() + text.len() + 4);
    buf.push(b'[');
    buf.extend_from_slice(prefix.as_bytes());
    buf.extend_from_slice(b"] ");
    buf.extend_from_slice(&escape_controls(text, false));
    buf.push(b'\n');
    buf
}

/// Writes one labelled line. Errors (a closed pipe) are ignored: the job goes on.
pub fn print_line(prefix: &str, stream: OutputStream, text: &[u8]) {
    let buf = format_line(prefix, text);
    if stream == OutputStream::Stderr {
        let _ = std::io::stderr().lock().write_all(&buf);
    } else {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&buf);
        let _ = out.flush();
    }
}

/// A message of dgl-coord itself, on stderr.
pub fn note(msg: &str) {
    let _ = std::io::stderr().lock().write_all(&escape_controls(
        format!("dgl-coord: {msg}\n").as_bytes(),
        true,
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_labelled_and_terminated() {
        assert_eq!(format_line("m1 server0", b"hello"), b"[m1 server0] hello\n");
        assert_eq!(format_line("m0 trainers", b""), b"[m0 trainers] \n");
        assert_eq!(format_line("m0 t", b"\xff\xfe"), b"[m0 t] \\xff\\xfe\n");
    }

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        let e = |t: &[u8], nl| String::from_utf8(escape_controls(t, nl).into_owned()).unwrap();
        assert_eq!(e(b"plain\ttext \\x", false), "plain\ttext \\x");
        assert_eq!(e(b"\x1b[2J\x07\r\0\x7f", false), r"\x1b[2J\x07\x0d\x00\x7f");
        assert_eq!(e("\u{9b}é".as_bytes(), false), r"\xc2\x9bé");
        assert_eq!(e(b"a\nb\xff", false), r"a\x0ab\xff");
        assert_eq!(e(b"a\nb", true), "a\nb");
    }
}
