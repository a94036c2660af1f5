//! dgl-agent: one per host. Receives files into its root and runs supervised jobs there.
//!
//! `service` is the gRPC surface and only translates; `files` owns transfers and the hash
//! cache, `jobs` owns processes and leases, `confine` decides which paths are allowed,
//! `restart` cleans up after a previous run of the agent before this one serves.

pub mod blocking;
pub mod confine;
pub mod files;
pub mod host_facts;
pub mod jobs;
pub mod limits;
pub mod listen;
pub mod metrics;
pub mod restart;
pub mod server;
pub mod service;
pub mod settings;
pub mod status;
pub mod supervise;
pub mod test_hooks;
pub mod workspace;
