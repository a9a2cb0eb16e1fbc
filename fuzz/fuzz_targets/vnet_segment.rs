//! virtio-net headers and software TSO: the first 12 bytes go through `VnetHdr::parse`, the
//! rest is the frame. `segment` and `complete_checksum` never panic, and a parsed header
//! re-emits to bytes that parse to the same header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vswitch::vnet::{self, VnetHdr};

fuzz_target!(|data: &[u8]| {
    if data.len() < VnetHdr::LEN {
        return;
    }
    let (h, frame) = data.split_at(VnetHdr::LEN);
    let Ok(hdr) = VnetHdr::parse(h) else {
        return;
    };
    let mut out = Vec::new();
    let _ = vnet::segment(&hdr, frame, &mut out);
    let mut copy = frame.to_vec();
    let _ = vnet::complete_checksum(&hdr, &mut copy);
    let mut back = [0u8; VnetHdr::LEN];
    hdr.emit(&mut back).unwrap();
    assert_eq!(VnetHdr::parse(&back).unwrap(), hdr);
});
