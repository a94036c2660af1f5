//! dgl-coord's library: everything but the command line.
//!
//! `config` reads DGL's own files, `cluster` reaches the agents, `copy` and `launch` are the
//! two commands, each a pure plan plus a driver that carries the plan out.

pub mod attach;
pub mod backoff;
pub mod cluster;
pub mod config;
pub mod copy;
pub mod detached;
pub mod doctor;
pub mod job_history;
pub mod job_logs;
pub mod launch;
pub mod ops;
pub mod probe;
pub mod rcp;
pub mod rsh;
pub mod stacks;
