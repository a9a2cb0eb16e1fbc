//! virtio-net headers and software TSO: the first 12 bytes go through `VnetHdr::parse`, the
//! rest is the frame. `segment` and `complete_checksum` never panic; the coalescer neither
//! panics nor loses or duplicates frames, and a parsed header
//! re-emits to bytes that parse to the same header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vswitch::vnet::{self, VnetHdr};

fuzz_target!(|data: &[u8]| {
    coalesce(data);
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

/// The receive-side coalescer: the input cut into frames (a length byte, then that many
/// bytes) never panics, and every frame that went in comes out: each emitted buffer is a
/// virtio-net header and a frame, and a merged GSO frame segments again.
fn coalesce(data: &[u8]) {
    let mut c = vnet::Coalescer::new();
    let mut frames = 0usize;
    let mut emitted = 0usize;
    let mut check = |buf: &[u8]| {
        let hdr = VnetHdr::parse(buf).expect("emitted buffers start with a vnet header");
        if hdr.is_gso() {
            let mut segs = Vec::new();
            vnet::segment(&hdr, &buf[VnetHdr::LEN..], &mut segs)
                .expect("a merged frame segments again");
            emitted += segs.len();
        } else {
            emitted += 1;
        }
    };
    let mut rest = data;
    while let Some((&n, tail)) = rest.split_first() {
        let n = (n as usize * 8).min(tail.len());
        let (frame, tail) = tail.split_at(n);
        c.push(frame, &mut check);
        frames += 1;
        rest = tail;
    }
    c.flush(&mut check);
    assert_eq!(emitted, frames, "every frame comes out exactly once");
}
