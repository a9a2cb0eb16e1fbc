//! lb-vip: load-balanced virtual IPs. Pure parts (no sockets, no clocks: time is an argument):
//! [`maglev`] (consistent-hash lookup table), [`sched`] (the schedulers), [`proxy_v2`] (PROXY
//! protocol v2 header).

pub mod maglev;
pub mod proxy_v2;
pub mod sched;
