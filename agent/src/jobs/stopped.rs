//! The `stopped` event: who stopped a job, told to its watchers before the first signal.

use dglrun_proto::pb;

use super::job::Job;

/// Longest requester text kept; a longer one is cut (it is only shown to people).
const MAX_REQUESTER: usize = 256;

/// Records the `stopped` event unless the job was already stopped or had nothing running;
/// returns whether any of its processes was still running.
pub(super) fn announce(job: &Job, cause: pb::StopCause, by: &str) -> bool {
    let (running, first) = {
        let st = job.state();
        let running = !st.clean && st.procs.iter().any(|p| p.exit.is_none());
        (running, !st.stopping)
    };
    if running && first {
        job.record_stopped(cause, &printable(by));
    }
    running
}

/// The requester as one printable line of bounded length: it comes from the network and ends
/// up on the launching user's terminal.
pub(super) fn printable(by: &str) -> String {
    let mut out = String::new();
    for c in by.chars() {
        if out.len() + c.len_utf8() > MAX_REQUESTER {
            break;
        }
        out.push(if c.is_control() { '?' } else { c });
    }
    if out.is_empty() {
        "an unnamed client".to_string()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn requester_text_is_one_bounded_printable_line() {
        assert_eq!(printable("a\x1b[2Jb\n"), "a?[2Jb?");
        assert_eq!(printable(""), "an unnamed client");
        assert_eq!(printable(&"é".repeat(300)).len(), 256);
    }
}
