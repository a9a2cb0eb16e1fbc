//! volume-mgr: the Fabric control plane. Owns the cluster state (nodes, disks, volumes,
//! overlay networks, ports, vswitches, load-balanced VIPs),
//! serves the `/v1` HTTP/JSON API, and provides the client library the agents and fabctl use.

pub mod api;
pub mod auth;
pub mod client;
pub mod etcd_store;
pub mod humantime_serde;
pub mod leader;
pub mod metrics;
pub mod net;
pub mod openapi;
pub mod placement;
pub mod recovery;
pub mod server;
pub mod store;
pub mod tls;
pub mod vip;

pub use server::{serve, Config};
