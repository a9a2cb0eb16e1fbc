//! vswitch: the Fabric virtual switch. Per-tenant L2 overlay networks (one VXLAN VNI each,
//! RFC 7348) across hosts; ports are tap devices it creates (`tap`) or interfaces someone else
//! created, such as QEMU's tap, attached through AF_PACKET (`netdev`). Forwarding tables come
//! from the control plane (volume-mgr's `/v1/netstate` watch).
//!
//! Pure code (no sockets, no files; unit tests and fuzz targets beside it): [`vxlan`],
//! [`switch`] (forwarding, port security, ARP responder, counters), [`dhcp`], [`vnet`]
//! (virtio-net header, software segmentation). I/O around it: [`tap`], [`packet`],
//! [`underlay`], [`daemon`].

pub mod config;
pub mod daemon;
pub mod dhcp;
pub mod packet;
pub mod switch;
pub mod sys;
pub mod tap;
pub mod underlay;
pub mod vnet;
pub mod vxlan;
