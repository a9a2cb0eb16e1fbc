//! On-disk chunk-store records: decoding arbitrary bytes never panics, and whatever decodes
//! re-encodes to the same record.
#![no_main]

use blockd::chunkstore::layout::{SlotRecord, Superblock, COPY_SIZE, RECORD_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Superblock::decode(data);
    let mut slot = vec![0u8; RECORD_SIZE as usize];
    let n = data.len().min(slot.len());
    slot[..n].copy_from_slice(&data[..n]);
    if let Ok((_, Some(r))) = SlotRecord::decode_slot(&slot) {
        let again = r.encode();
        assert_eq!(again.len(), COPY_SIZE as usize);
        assert_eq!(SlotRecord::decode(&again).unwrap().1, Some(r));
    }
});
