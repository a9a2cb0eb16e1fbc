//! Replica protocol frames: parsing arbitrary bytes never panics, and any frame that parses
//! re-emits to exactly the bytes it was parsed from; chunk images in payloads parse safely.
#![no_main]

use blockd::replica::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((f, used)) = wire::parse_frame(data) {
        let mut out = Vec::new();
        wire::emit_frame(&mut out, f.id, &f.msg, &f.payload);
        assert_eq!(&out[..], &data[..used]);
        // Chunk images (install requests, fetch answers) parse without panicking, and a
        // valid one holds exactly one block per bit.
        if let Ok((bm, blocks)) = wire::parse_image(&f.payload) {
            let n = (0..wire::CHUNK_BLOCKS).filter(|b| wire::bit(&bm, *b)).count();
            assert_eq!(blocks.len(), n * wire::BLOCK);
        }
    }
});
