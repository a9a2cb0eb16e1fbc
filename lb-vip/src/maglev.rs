//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, §3.4), as pure code.
//!
//! Every backend gets a permutation of the table's `M` slots from two hashes of its name
//! (`offset = h1 % M`, `skip = h2 % (M - 1) + 1`; `M` prime, so every permutation visits every
//! slot), and backends take turns claiming their next free preferred slot until the table is
//! full. A flow's hash indexes the table. Every backend ends up with about `M / N` slots, and
//! when one backend goes away the others keep almost all of their slots, so only the flows of
//! the removed backend (plus a small fraction) move.
//!
//! **Weights.** This is the "turns per round" variant: in every round of the population loop a
//! backend of weight `w` takes `w` turns (weights are first divided by their greatest common
//! divisor, so weights 2,2,2 build exactly the table that 1,1,1 builds). A backend therefore
//! gets about `M * w / Σw` slots. A backend of weight 0 takes no turns and gets no slots
//! (drained). When `Σw` exceeds `M` the table fills within the first round, and backends late
//! in the order get fewer slots than their share: keep `M` well above `Σw` (with the default
//! 65537, for example, 100 backends of any weights up to 256 fit with room to spare).
//!
//! **Determinism.** The hashes are SipHash-2-4 with fixed keys implemented here (no random
//! seeds, no `std` `RandomState`), so every process on every host builds the same table from
//! the same backend names and weights, and several lb-vip instances send a flow to the same
//! backend without sharing state.

use thiserror::Error;

/// Default table size: the prime the paper uses.
pub const DEFAULT_TABLE_SIZE: usize = 65_537;
/// Largest table size accepted (a prime just above 2^24 would be 16,777,259; we cap at 2^24 so
/// that a bad configuration cannot ask for gigabytes).
pub const MAX_TABLE_SIZE: usize = 1 << 24;

/// SipHash keys of the first permutation hash (offset).
const OFFSET_KEY: (u64, u64) = (0x6661_6272_6963_2d6d, 0x6167_6c65_762d_6f66);
/// SipHash keys of the second permutation hash (skip), independent of the first.
const SKIP_KEY: (u64, u64) = (0x6661_6272_6963_2d6d, 0x6167_6c65_762d_736b);

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MaglevError {
    #[error("Maglev table size {size} is not prime")]
    NotPrime { size: usize },
    #[error("Maglev table size {size} must be greater than the number of backends ({backends})")]
    TooSmall { size: usize, backends: usize },
    #[error("Maglev table size {size} is larger than the maximum {MAX_TABLE_SIZE}")]
    TooLarge { size: usize },
    #[error("backend {name:?} appears twice")]
    DuplicateBackend { name: String },
}

/// A populated Maglev lookup table. Entries are indices into the backend slice it was built
/// from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaglevTable {
    /// `entries[slot]` = backend index; empty when no backend has a weight above 0.
    entries: Vec<u32>,
    size: usize,
    backends: usize,
}

impl MaglevTable {
    /// Builds the table for `backends` (`(name, weight)`) with `size` slots (prime, greater
    /// than the number of backends, at most [`MAX_TABLE_SIZE`]). Names must be distinct.
    pub fn new(backends: &[(&str, u32)], size: usize) -> Result<Self, MaglevError> {
        if size > MAX_TABLE_SIZE {
            return Err(MaglevError::TooLarge { size });
        }
        if !is_prime(size) {
            return Err(MaglevError::NotPrime { size });
        }
        if size <= backends.len() {
            return Err(MaglevError::TooSmall {
                size,
                backends: backends.len(),
            });
        }
        let mut names: Vec<&str> = backends.iter().map(|b| b.0).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(MaglevError::DuplicateBackend {
                name: w[0].to_string(),
            });
        }
        let m = size as u64;
        // Normalised turns per round.
        let g = backends.iter().fold(0u32, |g, b| gcd(g, b.1));
        let turns: Vec<u32> = backends
            .iter()
            .map(|b| b.1.checked_div(g).unwrap_or(0))
            .collect();
        let total_turns: u64 = turns.iter().map(|&t| u64::from(t)).sum();
        let mut table = MaglevTable {
            entries: Vec::new(),
            size,
            backends: backends.len(),
        };
        if total_turns == 0 {
            return Ok(table);
        }
        let perm: Vec<(u64, u64)> = backends
            .iter()
            .map(|b| {
                let offset = siphash24(OFFSET_KEY, b.0.as_bytes()) % m;
                let skip = siphash24(SKIP_KEY, b.0.as_bytes()) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        // `next[i]`: how far backend i has walked its permutation. Its j-th preference is
        // (offset + j * skip) % M; kept incrementally as `pos[i]` to avoid the multiplication.
        let mut pos: Vec<u64> = perm.iter().map(|p| p.0).collect();
        const EMPTY: u32 = u32::MAX;
        let mut entries = vec![EMPTY; size];
        let mut filled = 0usize;
        'fill: loop {
            for (i, &t) in turns.iter().enumerate() {
                for _ in 0..t {
                    // The table is not full, and each permutation visits every slot, so this
                    // finds a free slot within M steps.
                    let mut c = pos[i];
                    while entries[c as usize] != EMPTY {
                        c = (c + perm[i].1) % m;
                    }
                    entries[c as usize] = i as u32;
                    pos[i] = (c + perm[i].1) % m;
                    filled += 1;
                    if filled == size {
                        break 'fill;
                    }
                }
            }
        }
        table.entries = entries;
        Ok(table)
    }

    /// The number of slots (M).
    pub fn size(&self) -> usize {
        self.size
    }

    /// The number of backends the table was built from (including weight-0 ones).
    pub fn backends(&self) -> usize {
        self.backends
    }

    /// The backend for a flow hash: `entries[hash % M]`; `None` when no backend has weight.
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        if self.entries.is_empty() {
            return None;
        }
        Some(self.entries[(hash % self.size as u64) as usize] as usize)
    }

    /// Like [`lookup`](Self::lookup), but when the chosen backend is not `eligible` walks on
    /// to the next slots of the table until it finds one that is (the same walk on every
    /// instance, so instances that agree on eligibility agree on the choice, and only flows
    /// of ineligible backends move). Gives up after `M` slots.
    pub fn lookup_eligible(&self, hash: u64, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        if self.entries.is_empty() {
            return None;
        }
        let start = (hash % self.size as u64) as usize;
        let (tail, head) = self.entries.split_at(start);
        head.iter()
            .chain(tail)
            .map(|&e| e as usize)
            .find(|&i| eligible(i))
    }

    /// How many slots backend `i` holds.
    pub fn slots_of(&self, i: usize) -> usize {
        self.entries.iter().filter(|&&e| e as usize == i).count()
    }
}

/// Whether `n` is prime (trial division; `n` is at most [`MAX_TABLE_SIZE`] here).
pub fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    if n < 4 {
        return true;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let mut d = 3usize;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// SipHash-2-4 (Aumasson & Bernstein) of `data` under the 128-bit key `(k0, k1)`: a fixed,
/// portable hash (same value on every host and run), used for Maglev permutations and for
/// flow hashing.
pub fn siphash24(key: (u64, u64), data: &[u8]) -> u64 {
    let (k0, k1) = key;
    let mut v0 = k0 ^ 0x736f_6d65_7073_6575;
    let mut v1 = k1 ^ 0x646f_7261_6e64_6f6d;
    let mut v2 = k0 ^ 0x6c79_6765_6e65_7261;
    let mut v3 = k1 ^ 0x7465_6462_7974_6573;

    #[inline(always)]
    fn round(v0: &mut u64, v1: &mut u64, v2: &mut u64, v3: &mut u64) {
        *v0 = v0.wrapping_add(*v1);
        *v1 = v1.rotate_left(13);
        *v1 ^= *v0;
        *v0 = v0.rotate_left(32);
        *v2 = v2.wrapping_add(*v3);
        *v3 = v3.rotate_left(16);
        *v3 ^= *v2;
        *v0 = v0.wrapping_add(*v3);
        *v3 = v3.rotate_left(21);
        *v3 ^= *v0;
        *v2 = v2.wrapping_add(*v1);
        *v1 = v1.rotate_left(17);
        *v1 ^= *v2;
        *v2 = v2.rotate_left(32);
    }

    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let m = u64::from_le_bytes(w);
        v3 ^= m;
        round(&mut v0, &mut v1, &mut v2, &mut v3);
        round(&mut v0, &mut v1, &mut v2, &mut v3);
        v0 ^= m;
    }
    let rest = chunks.remainder();
    let mut last = [0u8; 8];
    last[..rest.len()].copy_from_slice(rest);
    last[7] = data.len() as u8;
    let m = u64::from_le_bytes(last);
    v3 ^= m;
    round(&mut v0, &mut v1, &mut v2, &mut v3);
    round(&mut v0, &mut v1, &mut v2, &mut v3);
    v0 ^= m;
    v2 ^= 0xff;
    for _ in 0..4 {
        round(&mut v0, &mut v1, &mut v2, &mut v3);
    }
    v0 ^ v1 ^ v2 ^ v3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:8080", i + 1)).collect()
    }

    fn flows(n: u64) -> Vec<u64> {
        (0..n)
            .map(|i| siphash24((1, 2), &i.to_le_bytes()))
            .collect()
    }

    #[test]
    fn siphash_reference_vectors() {
        // From the SipHash paper's reference implementation (vectors.h): key 00..0f, message
        // 00..(len-1).
        let key = (
            u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]),
            u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]),
        );
        let msg: Vec<u8> = (0..64).collect();
        assert_eq!(siphash24(key, &msg[..0]), 0x726f_db47_dd0e_0e31);
        assert_eq!(siphash24(key, &msg[..1]), 0x74f8_39c5_93dc_67fd);
        assert_eq!(siphash24(key, &msg[..15]), 0xa129_ca61_49be_45e5);
        // Every length up to 63 agrees with std's (deprecated) SipHash-2-4.
        for len in 0..64 {
            #[allow(deprecated)]
            let mut h = std::hash::SipHasher::new_with_keys(key.0, key.1);
            std::hash::Hasher::write(&mut h, &msg[..len]);
            assert_eq!(
                siphash24(key, &msg[..len]),
                std::hash::Hasher::finish(&h),
                "len {len}"
            );
        }
    }

    #[test]
    fn primes() {
        let p: Vec<usize> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(p, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65_537));
        assert!(!is_prime(65_535));
        assert!(!is_prime(65_541)); // 3 * 21847
        assert!(is_prime(251));
        assert!(!is_prime(7 * 7));
    }

    #[test]
    fn bad_sizes_and_names_are_errors() {
        let b = [("a", 1), ("b", 1), ("c", 1)];
        assert_eq!(
            MaglevTable::new(&b, 65_535),
            Err(MaglevError::NotPrime { size: 65_535 })
        );
        assert_eq!(
            MaglevTable::new(&b, 0),
            Err(MaglevError::NotPrime { size: 0 })
        );
        assert_eq!(
            MaglevTable::new(&b, 1),
            Err(MaglevError::NotPrime { size: 1 })
        );
        assert_eq!(
            MaglevTable::new(&b, 3),
            Err(MaglevError::TooSmall {
                size: 3,
                backends: 3
            })
        );
        assert_eq!(
            MaglevTable::new(&b, usize::MAX),
            Err(MaglevError::TooLarge { size: usize::MAX })
        );
        assert_eq!(
            MaglevTable::new(&[("a", 1), ("b", 1), ("a", 2)], 7),
            Err(MaglevError::DuplicateBackend { name: "a".into() })
        );
        // Smallest legal table.
        let t = MaglevTable::new(&b, 5).unwrap();
        assert_eq!(t.size(), 5);
        assert!((0..3).all(|i| t.slots_of(i) >= 1));
    }

    #[test]
    fn empty_and_weightless_tables_choose_nothing() {
        let t = MaglevTable::new(&[], 7).unwrap();
        assert_eq!(t.lookup(42), None);
        let t = MaglevTable::new(&[("a", 0), ("b", 0)], 7).unwrap();
        assert_eq!(t.lookup(42), None);
        assert_eq!(t.lookup_eligible(42, |_| true), None);
    }

    #[test]
    fn every_backend_gets_its_share() {
        for n in [2usize, 3, 5, 7, 10] {
            let names = names(n);
            let b: Vec<(&str, u32)> = names.iter().map(|s| (s.as_str(), 1)).collect();
            let t = MaglevTable::new(&b, DEFAULT_TABLE_SIZE).unwrap();
            let share = DEFAULT_TABLE_SIZE as f64 / n as f64;
            let mut total = 0;
            for i in 0..n {
                let got = t.slots_of(i) as f64;
                assert!(
                    (got - share).abs() / share < 0.03,
                    "n={n} backend {i}: {got} slots, expected ~{share}"
                );
                total += t.slots_of(i);
            }
            assert_eq!(total, DEFAULT_TABLE_SIZE);
        }
    }

    #[test]
    fn identical_tables_from_two_constructions() {
        let names = names(5);
        let b: Vec<(&str, u32)> = names.iter().map(|s| (s.as_str(), 1)).collect();
        let t1 = MaglevTable::new(&b, DEFAULT_TABLE_SIZE).unwrap();
        let t2 = MaglevTable::new(&b, DEFAULT_TABLE_SIZE).unwrap();
        assert_eq!(t1, t2);
        // Pinned choices: the hash is fixed, so these hold in every process on every host
        // (a change here breaks agreement between lb-vip instances of different versions).
        let picks: Vec<usize> = (0..8u64).map(|h| t1.lookup(h).unwrap()).collect();
        assert_eq!(picks, [0, 4, 0, 4, 1, 2, 0, 4]);
        // Equal weights: slot counts differ by at most one.
        let slots: Vec<usize> = (0..5).map(|i| t1.slots_of(i)).collect();
        assert_eq!(slots, [13_108, 13_108, 13_107, 13_107, 13_107]);
        // Weights that differ only by a common factor build the same table.
        let b2: Vec<(&str, u32)> = names.iter().map(|s| (s.as_str(), 3)).collect();
        assert_eq!(MaglevTable::new(&b2, DEFAULT_TABLE_SIZE).unwrap(), t1);
    }

    #[test]
    fn removing_one_of_five_moves_few_flows_and_adding_it_back_restores_them() {
        let names = names(5);
        let all: Vec<(&str, u32)> = names.iter().map(|s| (s.as_str(), 1)).collect();
        let t5 = MaglevTable::new(&all, DEFAULT_TABLE_SIZE).unwrap();
        let removed = 2;
        let four: Vec<(&str, u32)> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != removed)
            .map(|(_, b)| *b)
            .collect();
        let t4 = MaglevTable::new(&four, DEFAULT_TABLE_SIZE).unwrap();
        let fl = flows(10_000);
        let before: Vec<&str> = fl.iter().map(|&h| all[t5.lookup(h).unwrap()].0).collect();
        let after: Vec<&str> = fl.iter().map(|&h| four[t4.lookup(h).unwrap()].0).collect();
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let on_removed = before.iter().filter(|&&b| b == all[removed].0).count();
        // Every flow of the removed backend moves; the others almost all stay.
        assert!(moved >= on_removed);
        assert!(moved <= 2_500, "{moved} of 10000 flows moved");
        assert!(
            moved - on_removed <= 300,
            "{} flows of surviving backends moved",
            moved - on_removed
        );
        // Adding it back gives the same table, so every flow returns to where it was.
        let t5b = MaglevTable::new(&all, DEFAULT_TABLE_SIZE).unwrap();
        assert_eq!(t5b, t5);
        let restored: Vec<&str> = fl.iter().map(|&h| all[t5b.lookup(h).unwrap()].0).collect();
        assert_eq!(restored, before);
    }

    #[test]
    fn weights_are_respected() {
        let b = [("a", 1), ("b", 2), ("c", 3), ("d", 0)];
        let t = MaglevTable::new(&b, DEFAULT_TABLE_SIZE).unwrap();
        let m = DEFAULT_TABLE_SIZE as f64;
        for (i, w) in [(0, 1.0), (1, 2.0), (2, 3.0)] {
            let share = m * w / 6.0;
            let got = t.slots_of(i) as f64;
            assert!(
                (got - share).abs() / share < 0.03,
                "backend {i}: {got} slots, expected ~{share}"
            );
        }
        assert_eq!(t.slots_of(3), 0);
        let fl = flows(10_000);
        let mut count = [0usize; 4];
        for &h in &fl {
            count[t.lookup(h).unwrap()] += 1;
        }
        assert_eq!(count[3], 0);
        assert!(
            (count[2] as f64 / count[0] as f64 - 3.0).abs() < 0.3,
            "{count:?}"
        );
    }

    #[test]
    fn lookup_eligible_walks_to_the_next_eligible_slot() {
        let names = names(5);
        let b: Vec<(&str, u32)> = names.iter().map(|s| (s.as_str(), 1)).collect();
        let t = MaglevTable::new(&b, 1_009).unwrap();
        let fl = flows(2_000);
        for &h in &fl {
            let first = t.lookup(h).unwrap();
            assert_eq!(t.lookup_eligible(h, |_| true), Some(first));
            let other = t.lookup_eligible(h, |i| i != 1).unwrap();
            assert_ne!(other, 1);
            if first != 1 {
                assert_eq!(other, first, "flows of eligible backends stay");
            }
            assert_eq!(t.lookup_eligible(h, |i| i == 4), Some(4));
            assert_eq!(t.lookup_eligible(h, |_| false), None);
        }
        // The walk wraps around the end of the table.
        let last = t.size() as u64 - 1;
        let from_last = t.lookup(last).unwrap();
        let avoid = t.lookup_eligible(last, |i| i != from_last).unwrap();
        assert_ne!(avoid, from_last);
    }
}
