//! lb-vip: load-balanced virtual IPs. Pure parts (no sockets, no clocks: time is an argument):
//! [`maglev`] (consistent-hash lookup table), [`sched`] (the schedulers), [`proxy_v2`] (PROXY
//! protocol v2 header), the [`health`] state machine. I/O around them: [`proxy`] (TCP),
//! [`udp`], health probes, the [`daemon`] that follows the control plane, and [`ha`] (VIP
//! leases: one holder per VIP across hosts, fencing by time).

pub mod config;
pub mod daemon;
pub mod ha;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod overlay;
pub mod proxy;
pub mod proxy_v2;
pub mod sched;
pub mod udp;
