//! blockd: the Fabric block daemon.

pub mod buf;
pub mod chunkstore;
pub mod export;
pub mod nbd;
pub mod sys;
pub mod volume;
pub mod uring;
