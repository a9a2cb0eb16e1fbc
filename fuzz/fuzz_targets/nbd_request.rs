//! NBD transmission requests: header parsing and the semantic checks never panic, and a
//! request that passes the checks always lies inside the export.
#![no_main]

use blockd::nbdgw::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 10 {
        return;
    }
    let (ctl, rest) = data.split_at(10);
    let size = u64::from_le_bytes(ctl[..8].try_into().unwrap());
    if let Ok(r) = wire::parse_request(rest) {
        if wire::check_request(&r, size, ctl[8] & 1 != 0, ctl[9] & 1 != 0).is_ok() {
            assert!(
                r.offset
                    .checked_add(r.length as u64)
                    .is_some_and(|e| e <= size)
                    || r.length == 0
            );
            if matches!(r.kind, wire::CMD_READ | wire::CMD_WRITE) {
                assert!(r.length <= wire::MAX_PAYLOAD);
            }
        }
    }
});
