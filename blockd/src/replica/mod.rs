//! The replica protocol between blockd instances (issue 3, in progress): the wire format,
//! peer authentication with the cluster secret, a pipelined client and the replica server
//! over the local chunk store with epoch fencing. Not yet started by the daemon.

pub mod auth;
pub mod client;
pub mod conn;
pub mod server;
pub mod service;
pub mod wire;
