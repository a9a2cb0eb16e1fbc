use super::*;

fn req_bytes(magic: u32, flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&magic.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&length.to_be_bytes());
    b
}

fn name_payload(name: &str) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b
}

#[test]
fn greeting_and_client_flags() {
    let mut out = Vec::new();
    emit_greeting(&mut out);
    assert_eq!(&out[..8], b"NBDMAGIC");
    assert_eq!(&out[8..16], b"IHAVEOPT");
    assert_eq!(out.len(), 18);
    assert_eq!(parse_client_flags(&[0, 0, 0, 3]), Ok(true));
    assert_eq!(parse_client_flags(&[0, 0, 0, 1]), Ok(false));
    assert_eq!(
        parse_client_flags(&[0, 0, 0, 2]),
        Err(WireError::NotFixedNewstyle)
    );
    assert_eq!(
        parse_client_flags(&[0, 0, 0, 8 | 1]),
        Err(WireError::UnknownClientFlags(9))
    );
    assert!(matches!(
        parse_client_flags(&[0, 0]),
        Err(WireError::Truncated { .. })
    ));
}

#[test]
fn option_header() {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&7u32.to_be_bytes());
    assert_eq!(parse_option_header(&b), Ok((OPT_GO, 7)));
    assert!(matches!(
        parse_option_header(&b[..10]),
        Err(WireError::Truncated { .. })
    ));
    b[0] = 0;
    assert!(matches!(
        parse_option_header(&b),
        Err(WireError::BadMagic(_))
    ));
}

#[test]
fn info_request_parsing_and_errors() {
    let mut p = name_payload("vol");
    p.extend_from_slice(&2u16.to_be_bytes());
    p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    p.extend_from_slice(&INFO_NAME.to_be_bytes());
    assert_eq!(
        parse_info_request(&p),
        Ok(InfoRequest {
            name: "vol".into(),
            requests: vec![3, 1]
        })
    );
    // Zero info requests is valid.
    let mut z = name_payload("");
    z.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(parse_info_request(&z).unwrap().requests, Vec::<u16>::new());
    // Name length larger than the payload.
    let mut bad = 100u32.to_be_bytes().to_vec();
    bad.extend_from_slice(b"abc");
    assert!(matches!(
        parse_info_request(&bad),
        Err(WireError::Invalid(_))
    ));
    // Huge name length must not overflow.
    let huge = u32::MAX.to_be_bytes().to_vec();
    assert!(parse_info_request(&huge).is_err());
    // Missing count, short requests, trailing bytes, bad UTF-8.
    assert!(parse_info_request(&name_payload("v")).is_err());
    let mut short = name_payload("v");
    short.extend_from_slice(&3u16.to_be_bytes());
    short.extend_from_slice(&1u16.to_be_bytes());
    assert!(parse_info_request(&short).is_err());
    let mut trailing = z.clone();
    trailing.push(0);
    assert!(parse_info_request(&trailing).is_err());
    let mut utf = 2u32.to_be_bytes().to_vec();
    utf.extend_from_slice(&[0xff, 0xfe, 0, 0]);
    assert!(parse_info_request(&utf).is_err());
    assert!(parse_info_request(&[]).is_err());
}

#[test]
fn meta_request_parsing_and_errors() {
    let mut p = name_payload("vol");
    p.extend_from_slice(&2u32.to_be_bytes());
    p.extend_from_slice(&name_payload("base:allocation"));
    p.extend_from_slice(&name_payload("qemu:dirty-bitmap:x"));
    let m = parse_meta_request(&p).unwrap();
    assert_eq!(
        m.queries,
        vec![
            "base:allocation".to_string(),
            "qemu:dirty-bitmap:x".to_string()
        ]
    );
    assert!(query_matches_base_allocation("base:allocation", false));
    assert!(query_matches_base_allocation("base:", true));
    assert!(!query_matches_base_allocation("base:", false));
    assert!(!query_matches_base_allocation("qemu:x", true));
    // Count larger than the queries present.
    let mut bad = name_payload("vol");
    bad.extend_from_slice(&5u32.to_be_bytes());
    bad.extend_from_slice(&name_payload("base:allocation"));
    assert!(parse_meta_request(&bad).is_err());
    let mut trailing = name_payload("vol");
    trailing.extend_from_slice(&0u32.to_be_bytes());
    trailing.push(1);
    assert!(parse_meta_request(&trailing).is_err());
    assert!(parse_meta_request(&name_payload("vol")).is_err());
}

#[test]
fn request_header_parsing() {
    let b = req_bytes(REQUEST_MAGIC, CMD_FLAG_FUA, CMD_WRITE, 42, 4096, 512);
    assert_eq!(
        parse_request(&b),
        Ok(Request {
            flags: 1,
            kind: 1,
            cookie: 42,
            offset: 4096,
            length: 512
        })
    );
    assert!(matches!(
        parse_request(&b[..27]),
        Err(WireError::Truncated { need: 28, have: 27 })
    ));
    let bad = req_bytes(0xdeadbeef, 0, 0, 0, 0, 0);
    assert_eq!(parse_request(&bad), Err(WireError::BadMagic(0xdeadbeef)));
}

#[test]
fn request_checks_follow_the_spec() {
    let size = 1 << 20;
    let r = |kind, flags, offset, length| Request {
        flags,
        kind,
        cookie: 1,
        offset,
        length,
    };
    assert_eq!(
        check_request(&r(CMD_READ, 0, 0, 4096), size, false, false),
        Ok(())
    );
    // Unknown command and unknown flags.
    assert_eq!(
        check_request(&r(99, 0, 0, 1), size, true, true),
        Err(Refusal::Errno(EINVAL))
    );
    assert_eq!(
        check_request(&r(CMD_READ, CMD_FLAG_FUA, 0, 1), size, true, true),
        Err(Refusal::Errno(EINVAL))
    );
    assert_eq!(
        check_request(&r(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), size, true, true),
        Err(Refusal::Errno(EINVAL))
    );
    // DF only with structured replies.
    assert_eq!(
        check_request(&r(CMD_READ, CMD_FLAG_DF, 0, 1), size, false, false),
        Err(Refusal::Errno(EINVAL))
    );
    assert_eq!(
        check_request(&r(CMD_READ, CMD_FLAG_DF, 0, 1), size, true, false),
        Ok(())
    );
    // Past the end: reads/trims EINVAL, writes ENOSPC.
    assert_eq!(
        check_request(&r(CMD_READ, 0, size - 1, 2), size, false, false),
        Err(Refusal::Errno(EINVAL))
    );
    assert_eq!(
        check_request(&r(CMD_TRIM, 0, size, 1), size, false, false),
        Err(Refusal::Errno(EINVAL))
    );
    assert_eq!(
        check_request(&r(CMD_WRITE, 0, size - 1, 2), size, false, false),
        Err(Refusal::Errno(ENOSPC))
    );
    assert_eq!(
        check_request(&r(CMD_WRITE_ZEROES, 0, size, 4096), size, false, false),
        Err(Refusal::Errno(ENOSPC))
    );
    assert_eq!(
        check_request(&r(CMD_READ, 0, u64::MAX, 2), size, false, false),
        Err(Refusal::Errno(EINVAL))
    );
    // Over the maximum payload.
    assert_eq!(
        check_request(&r(CMD_READ, 0, 0, MAX_PAYLOAD + 1), u64::MAX, false, false),
        Err(Refusal::Errno(EINVAL))
    );
    assert_eq!(
        check_request(&r(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1), u64::MAX, false, false),
        Err(Refusal::Errno(EINVAL))
    );
    // Zero lengths.
    assert_eq!(
        check_request(&r(CMD_WRITE, 0, 0, 0), size, false, false),
        Err(Refusal::Errno(EINVAL))
    );
    assert_eq!(
        check_request(&r(CMD_FLUSH, 0, 0, 0), size, false, false),
        Ok(())
    );
    assert_eq!(
        check_request(&r(CMD_FLUSH, 0, 8, 0), size, false, false),
        Err(Refusal::Errno(EINVAL))
    );
    // BLOCK_STATUS needs a negotiated context.
    assert_eq!(
        check_request(&r(CMD_BLOCK_STATUS, 0, 0, 10), size, true, false),
        Err(Refusal::Errno(EINVAL))
    );
    assert_eq!(
        check_request(
            &r(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 10),
            size,
            true,
            true
        ),
        Ok(())
    );
    // Large TRIM (no payload) is fine.
    assert_eq!(
        check_request(&r(CMD_TRIM, 0, 0, 64 << 20), 1 << 30, false, false),
        Ok(())
    );
}

#[test]
fn replies_encode() {
    let mut o = Vec::new();
    emit_simple_reply(&mut o, EIO, 7);
    assert_eq!(
        o,
        [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 7]
    );
    o.clear();
    emit_offset_data_header(&mut o, 9, 4096, 512);
    assert_eq!(o.len(), 28);
    assert_eq!(&o[4..6], &REPLY_FLAG_DONE.to_be_bytes());
    assert_eq!(&o[6..8], &REPLY_TYPE_OFFSET_DATA.to_be_bytes());
    assert_eq!(u32::from_be_bytes(o[16..20].try_into().unwrap()), 520);
    o.clear();
    emit_structured_error(&mut o, 1, EINVAL, "bad");
    assert_eq!(u32::from_be_bytes(o[16..20].try_into().unwrap()), 9);
    assert_eq!(&o[26..], b"bad");
    o.clear();
    emit_block_status(&mut o, 1, 1, &[(4096, STATE_HOLE | STATE_ZERO), (8192, 0)]);
    assert_eq!(u32::from_be_bytes(o[16..20].try_into().unwrap()), 4 + 16);
    o.clear();
    emit_export_name_reply(&mut o, 10, 1, false);
    assert_eq!(o.len(), 8 + 2 + 124);
    o.clear();
    emit_export_name_reply(&mut o, 10, 1, true);
    assert_eq!(o.len(), 10);
}

/// Stable CI stand-in for the fuzz targets: parsers never panic on arbitrary bytes.
#[test]
fn parsers_survive_random_input() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..20_000 {
        let len = (next() % 64) as usize;
        let b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let _ = parse_request(&b);
        let _ = parse_option_header(&b);
        let _ = parse_client_flags(&b);
        let _ = parse_info_request(&b);
        let _ = parse_meta_request(&b);
        if let Ok(r) = parse_request(&req_bytes(
            REQUEST_MAGIC,
            next() as u16,
            (next() % 12) as u16,
            0,
            next(),
            next() as u32,
        )) {
            let _ = check_request(&r, next(), next() % 2 == 0, next() % 2 == 0);
        }
    }
}
