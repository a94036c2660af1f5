//! Labelled output: every line a process writes is printed as `[m1 server0] text`, to the
//! coordinator's stdout or stderr like the process wrote it, in one write per line so lines
//! of different processes never interleave mid-line.
//!
//! The agent splits lines longer than 64 KiB into pieces; each piece is printed as a line of
//! its own with the same label.

use std::io::Write;

use dglrun_proto::pb::OutputStream;

/// `[prefix] text\n`
pub fn format_line(prefix: &str, text: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(prefix.len() + text.len() + 4);
    buf.push(b'[');
    buf.extend_from_slice(prefix.as_bytes());
    buf.extend_from_slice(b"] ");
    buf.extend_from_slice(text);
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
    let _ = std::io::stderr()
        .lock()
        .write_all(format!("dgl-coord: {msg}\n").as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_labelled_and_terminated() {
        assert_eq!(format_line("m1 server0", b"hello"), b"[m1 server0] hello\n");
        assert_eq!(format_line("m0 trainers", b""), b"[m0 trainers] \n");
        assert_eq!(format_line("m0 t", b"\xff\xfe"), b"[m0 t] \xff\xfe\n");
    }
}
