//! blockd: the Fabric block daemon. A chunk store over the host's disks (io_uring, crc32 per
//! block, chunk versions) and the NBD gateway that serves volumes to the VMs on this host.

pub mod agent;
pub mod buf;
pub mod chunkstore;
pub mod config;
pub mod daemon;
pub mod export;
pub mod gateway;
pub mod nbdgw;
pub mod repair;
pub mod replica;
pub mod scrub;
pub mod sys;
pub mod throttle;
pub mod uring;
pub mod volume;
