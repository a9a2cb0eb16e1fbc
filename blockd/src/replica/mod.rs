//! The replica protocol between blockd instances (issue 3). So far: the wire format.

pub mod wire;
