//! lb-vip: load-balanced virtual IPs. Pure parts (no sockets, no clocks: time is an argument):
//! [`maglev`] (consistent-hash lookup table), [`sched`] (the schedulers), [`proxy_v2`] (PROXY
//! protocol v2 header), the [`health`] state machine. I/O around them: [`proxy`] (TCP),
//! [`udp`], health probes, and the [`daemon`] that follows the control plane.

pub mod config;
pub mod daemon;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod proxy;
pub mod proxy_v2;
pub mod sched;
pub mod udp;
