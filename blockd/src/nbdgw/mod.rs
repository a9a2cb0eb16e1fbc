//! The NBD gateway: wire format (pure), metrics, and the async server.

pub mod metrics;
pub mod server;
pub mod wire;

pub use metrics::NbdMetrics;
pub use server::{serve_connection, serve_tcp, serve_unix};
