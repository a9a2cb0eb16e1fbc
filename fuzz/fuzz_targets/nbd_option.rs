//! NBD handshake: client flags, option headers and option payloads never panic.
#![no_main]

use blockd::nbdgw::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wire::parse_client_flags(data);
    let _ = wire::parse_option_header(data);
    if let Ok(req) = wire::parse_info_request(data) {
        assert!(req.name.len() + 2 * req.requests.len() + 6 <= data.len());
    }
    if let Ok(m) = wire::parse_meta_request(data) {
        for q in &m.queries {
            let _ = wire::query_matches_base_allocation(q, true);
        }
    }
});
