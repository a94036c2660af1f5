//! DGL's configuration files, parsed and checked the way DGL itself reads them.

pub mod ip_config;
pub mod part_config;
pub mod workspace;

pub use ip_config::{IpConfig, Machine};
pub use part_config::{stays_inside, PartConfig};
