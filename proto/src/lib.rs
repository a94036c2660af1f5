//! The dglrun wire protocol and the conventions both ends must share.
//!
//! Only this crate knows the wire format: the generated gRPC types live in [`pb`], and the
//! rules that are part of the protocol (chunking, the file digest, the metadata each call
//! carries) live next to them, so agent and coordinator cannot disagree.

pub mod busy;
pub mod compress;
pub mod digest;
mod error_chain;
pub mod meta;
pub mod tls;
pub mod token;
pub mod token_tls;

pub use error_chain::error_chain;

/// Generated protobuf and gRPC types.
pub mod pb {
    tonic::include_proto!("dglrun.v1");
}

/// Bumped on every incompatible change of `dglrun.proto`.
///
/// 2: chunks may be zstd-compressed (`Chunk.compression`). An agent of version 1 would take a
/// compressed chunk for raw bytes, so the two must not talk.
/// 3: a job's event stream carries `stopped` (who stopped it and why), StopRequest names its
/// requester; a coordinator of version 2 would take a `stopped` event for nothing and wait.
/// 4: WaitListening (trainers start once the servers listen); an agent of version 3 would
/// answer it UNIMPLEMENTED and fail every launch.
/// 5: Preflight reports who listens on the job's server ports, /dev/shm's free space and the
/// partition's size; an agent of version 4 would leave them out and every port look free.
/// Session clients send keepalives, without which an agent of version 5 ends a session.
pub const PROTOCOL_VERSION: u32 = 5;

/// Variables of the agent's environment whose presence (never value) Hello reports: a
/// process inherits them, and dglrun sets none of these itself where the agent already has it.
pub const REPORTED_ENV: &[&str] = &[
    "GLOO_SOCKET_IFNAME",
    "TP_SOCKET_IFNAME",
    "NCCL_SOCKET_IFNAME",
    "CUDA_VISIBLE_DEVICES",
];

/// The version of this build, reported in handshakes.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Files travel in chunks of this size; chunk hashes and resume offsets follow it.
pub const CHUNK_SIZE: usize = 4 << 20;

/// Largest gRPC message either side accepts: a chunk plus headroom for the header of a
/// very large file (its chunk hash list).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Default TCP port of dgl-agent; far from DGL's server ports (30050 and up).
pub const DEFAULT_AGENT_PORT: u16 = 47001;
