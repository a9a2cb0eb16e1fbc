//! blockd: the Fabric block daemon.

pub mod buf;
pub mod export;
pub mod nbd;
