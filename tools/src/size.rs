//! Sizes on the command line: bytes, or a decimal number with a binary unit.
//!
//! Accepted: `4096`, `64K`, `512M`, `10G`, `1.5G`, `1T`, `1P`; units are binary (K = 1024,
//! M = 1024², …), case-insensitive, and may be written `KiB`, `MiB`, … or with a trailing `B`
//! alone for bytes (`4096B`). Arithmetic is exact: `1.5G` is 1610612736 bytes, and a value
//! that is not a whole number of bytes (`1.3K`) is refused rather than rounded. `KB`, `MB`, …
//! are refused as ambiguous (decimal or binary?). Volume sizes must also be a multiple of
//! 4 KiB; the manager checks that.

const UNITS: [(char, u32); 5] = [('K', 10), ('M', 20), ('G', 30), ('T', 40), ('P', 50)];

fn usage(s: &str) -> String {
    format!("invalid size {s:?}: use bytes or a number with a binary unit, e.g. 4096, 512M, 10G, 1.5T (K = 1024)")
}

/// Parses a size; see the module documentation for the accepted forms.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        u => {
            let mut cs = u.chars();
            let letter = cs.next().unwrap_or(' ');
            let rest: String = cs.collect();
            let Some(&(_, shift)) = UNITS.iter().find(|(c, _)| *c == letter) else {
                return Err(usage(s));
            };
            match rest.as_str() {
                "" | "IB" => shift,
                "B" => {
                    return Err(format!(
                    "ambiguous size unit in {s:?}: write {letter} or {letter}iB (binary, K = 1024)"
                ))
                }
                _ => return Err(usage(s)),
            }
        }
    };
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int.is_empty() && frac.is_empty() || frac.contains('.') || frac.len() > 30 {
        return Err(usage(s));
    }
    // value = (int . frac) << shift, exactly: (int·10ⁿ + frac) · 2^shift / 10ⁿ.
    let too_big = || format!("size {s:?} is too large");
    let digits = format!("{int}{frac}");
    let scaled: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| too_big())?
    };
    let den = 10u128.pow(frac.len() as u32);
    let num = scaled
        .checked_shl(shift)
        .filter(|v| v >> shift == scaled)
        .ok_or_else(too_big)?;
    if num % den != 0 {
        return Err(format!("size {s:?} is not a whole number of bytes"));
    }
    u64::try_from(num / den).map_err(|_| too_big())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn accepted_forms() {
        for (s, want) in [
            ("4096", 4096),
            ("0", 0),
            ("4096B", 4096),
            ("64K", 64 << 10),
            ("64k", 64 << 10),
            ("512M", 512 << 20),
            ("10G", 10 << 30),
            ("10GiB", 10 << 30),
            ("10gib", 10 << 30),
            ("1.5G", 3 << 29),
            ("1.5T", 3 << 39),
            ("0.5K", 512),
            (".5K", 512),
            ("2.K", 2048),
            ("1T", 1 << 40),
            ("1P", 1 << 50),
            ("  8M ", 8 << 20),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(parse_size(s), Ok(want), "{s}");
        }
        assert_eq!(parse_size("15999P"), Ok(15999 << 50));
        assert_eq!(
            parse_size("1.000000000001T"),
            Err("size \"1.000000000001T\" is not a whole number of bytes".into())
        );
    }

    #[test]
    fn refused_with_a_reason() {
        for s in [
            "", "lots", "G", ".", "1..5G", "1.5.1G", "-1G", "+1G", "1e3", "1 G x", "10X", "10Gi",
            "10GiBs", "inf", "NaN", "0x10", "1,5G",
        ] {
            let e = parse_size(s).unwrap_err();
            assert!(
                e.contains("invalid size") && e.contains("K = 1024"),
                "{s}: {e}"
            );
        }
        assert!(parse_size("10GB").unwrap_err().contains("ambiguous"));
        assert!(parse_size("1.3K")
            .unwrap_err()
            .contains("whole number of bytes"));
        assert!(parse_size("0.1").unwrap_err().contains("whole number"));
        for s in [
            "16384P",
            "18446744073709551616",
            "99999999999999999999999999999999999999999T",
        ] {
            assert!(parse_size(s).unwrap_err().contains("too large"), "{s}");
        }
    }
}
