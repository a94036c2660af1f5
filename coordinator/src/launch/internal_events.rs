//! What the per-host tasks (`follow`, the stop calls) tell the driver. Its own module so the
//! tasks and the driver both depend on it and not on each other.

use dglrun_proto::pb;

use super::loss::Loss;

pub(crate) enum Msg {
    Event {
        host: usize,
        ev: pb::JobEvent,
    },
    /// The agent ended the event stream without saying why the job stopped (it forgot the
    /// job); an agent that shuts down says so first in a `stopped` event.
    StreamEnded {
        host: usize,
    },
    Lost {
        host: usize,
        loss: Loss,
    },
    /// A Stop call of the driver's came back: its reply, or why it failed.
    Stopped {
        host: usize,
        result: Result<pb::StopReply, String>,
    },
    /// CPU time of the job's running processes on `host`, as its agent measured it.
    Cpu {
        host: usize,
        processes: Vec<pb::ProcessCpu>,
    },
}
