//! volume-mgr: the Fabric control plane.

pub mod api;
