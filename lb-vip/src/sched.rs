//! Schedulers: which backend a new connection (TCP) or flow (UDP) goes to. Pure code: no
//! sockets, no clocks (persistence takes `now_ms`), randomness from a seeded PRNG.
//!
//! A [`Scheduler`] holds the backend set (name, weight 1..=256 or 0 = drained, optional
//! connection limit) and the active-connection counts that the proxy reports through
//! [`Scheduler::conn_opened`] / [`Scheduler::conn_closed`]. [`Scheduler::pick`] takes the
//! flow and an `eligible` predicate (health, draining, anything else the caller knows); a
//! backend of weight 0 or at its `max_conns` is never picked whatever the predicate says.
//!
//! | algo          | choice                                                                |
//! |---------------|-----------------------------------------------------------------------|
//! | `rr`          | next eligible backend in order (weights ignored)                      |
//! | `wrr`         | smooth weighted round robin, as nginx (`ngx_http_upstream_round_robin`)|
//! | `lc`          | fewest active connections, round-robin among ties                     |
//! | `wlc`         | fewest active per unit of weight, smooth wrr among ties (nginx `least_conn`) |
//! | `p2c`         | two distinct eligible backends at random, the less loaded (per weight) |
//! | `source-hash` | client IP hash over the eligible backends' cumulative weights         |
//! | `maglev`      | [`MaglevTable`] over the flow's 5-tuple (or client IP), next table slot when the chosen backend is not eligible |
//!
//! [`Persist`] adds client-IP persistence on top of any of them.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::maglev::{siphash24, MaglevError, MaglevTable, DEFAULT_TABLE_SIZE};

/// Highest backend weight.
pub const MAX_WEIGHT: u32 = 256;
/// Most backends one scheduler takes.
pub const MAX_BACKENDS: usize = 4096;

/// SipHash keys for flow and client hashes (fixed: every lb-vip instance hashes alike).
const FLOW_KEY: (u64, u64) = (0x6c62_2d76_6970_2d66, 0x6c6f_772d_6861_7368);

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SchedError {
    #[error("backend {name:?}: weight {weight} is out of range 0..={MAX_WEIGHT}")]
    WeightOutOfRange { name: String, weight: u32 },
    #[error("backend {name:?} appears twice")]
    DuplicateBackend { name: String },
    #[error("{count} backends is more than the maximum {MAX_BACKENDS}")]
    TooManyBackends { count: usize },
    #[error(transparent)]
    Maglev(#[from] MaglevError),
    #[error("unknown scheduling algorithm {0:?} (expected rr, wrr, lc, wlc, p2c, source-hash or maglev)")]
    UnknownAlgo(String),
    #[error("unknown protocol {0:?} (expected tcp or udp)")]
    UnknownProto(String),
    #[error("unknown hash key {0:?} (expected flow or client-ip)")]
    UnknownHashKey(String),
}

/// Scheduling algorithm. Serialized in snake_case (`source_hash`); parsed from the CLI names
/// (`source-hash`; the snake_case spelling is accepted too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algo {
    #[default]
    Rr,
    Wrr,
    Lc,
    Wlc,
    P2c,
    SourceHash,
    Maglev,
}

impl Algo {
    pub const ALL: [Algo; 7] = [
        Algo::Rr,
        Algo::Wrr,
        Algo::Lc,
        Algo::Wlc,
        Algo::P2c,
        Algo::SourceHash,
        Algo::Maglev,
    ];

    /// The CLI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Algo::Rr => "rr",
            Algo::Wrr => "wrr",
            Algo::Lc => "lc",
            Algo::Wlc => "wlc",
            Algo::P2c => "p2c",
            Algo::SourceHash => "source-hash",
            Algo::Maglev => "maglev",
        }
    }
}

impl fmt::Display for Algo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algo {
    type Err = SchedError;
    fn from_str(s: &str) -> Result<Self, SchedError> {
        match s {
            "source_hash" => Ok(Algo::SourceHash),
            _ => Algo::ALL
                .into_iter()
                .find(|a| a.as_str() == s)
                .ok_or_else(|| SchedError::UnknownAlgo(s.to_string())),
        }
    }
}

/// Transport protocol of a VIP or flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Proto {
    type Err = SchedError;
    fn from_str(s: &str) -> Result<Self, SchedError> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(SchedError::UnknownProto(s.to_string())),
        }
    }
}

/// What the Maglev scheduler hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    /// The 5-tuple (client IP and port, VIP and port, protocol), as the paper does.
    #[default]
    Flow,
    /// The client IP only: all of a client's connections go to one backend.
    ClientIp,
}

impl FromStr for HashKey {
    type Err = SchedError;
    fn from_str(s: &str) -> Result<Self, SchedError> {
        match s {
            "flow" => Ok(HashKey::Flow),
            "client-ip" | "client_ip" => Ok(HashKey::ClientIp),
            _ => Err(SchedError::UnknownHashKey(s.to_string())),
        }
    }
}

/// The flow being scheduled: client address, VIP address and protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub proto: Proto,
}

impl FlowKey {
    pub fn new(client: SocketAddr, vip: SocketAddr, proto: Proto) -> Self {
        FlowKey { client, vip, proto }
    }

    /// Fixed hash of the 5-tuple (same on every host; IPv4-mapped IPv6 addresses hash as
    /// their IPv4 form, so dual-stack and IPv4 sockets agree).
    pub fn hash(&self) -> u64 {
        let mut buf = [0u8; 2 * 17 + 2 * 2 + 1];
        let mut n = put_ip(&mut buf, 0, self.client.ip());
        buf[n..n + 2].copy_from_slice(&self.client.port().to_be_bytes());
        n += 2;
        n = put_ip(&mut buf, n, self.vip.ip());
        buf[n..n + 2].copy_from_slice(&self.vip.port().to_be_bytes());
        n += 2;
        buf[n] = match self.proto {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        };
        siphash24(FLOW_KEY, &buf[..n + 1])
    }

    /// Fixed hash of the client IP alone.
    pub fn client_hash(&self) -> u64 {
        client_hash(self.client.ip())
    }
}

/// Fixed hash of a client IP (IPv4-mapped IPv6 hashes as IPv4).
pub fn client_hash(ip: IpAddr) -> u64 {
    let mut buf = [0u8; 17];
    let n = put_ip(&mut buf, 0, ip);
    siphash24(FLOW_KEY, &buf[..n])
}

/// Writes a family tag and the canonical address bytes at `at`; returns the end offset.
fn put_ip(buf: &mut [u8], at: usize, ip: IpAddr) -> usize {
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            buf[at] = 4;
            buf[at + 1..at + 5].copy_from_slice(&a.octets());
            at + 5
        }
        IpAddr::V6(a) => {
            buf[at] = 6;
            buf[at + 1..at + 17].copy_from_slice(&a.octets());
            at + 17
        }
    }
}

/// One backend as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BackendSpec {
    /// Unique name within the VIP (lb-vip uses `IP:PORT`); Maglev hashes it.
    pub name: String,
    /// 1..=256; 0 = drained (never picked, no Maglev slots).
    pub weight: u32,
    /// Never picked while this many connections are active.
    pub max_conns: Option<u32>,
}

impl BackendSpec {
    pub fn new(name: impl Into<String>, weight: u32) -> Self {
        BackendSpec {
            name: name.into(),
            weight,
            max_conns: None,
        }
    }

    pub fn with_max_conns(mut self, max: u32) -> Self {
        self.max_conns = Some(max);
        self
    }
}

/// Scheduler settings besides the algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedOptions {
    /// Seed of the PRNG behind `p2c` (any value; 0 is replaced by a constant).
    pub seed: u64,
    /// Maglev table size (prime, > backends).
    pub maglev_size: usize,
    /// What Maglev hashes.
    pub hash_key: HashKey,
}

impl Default for SchedOptions {
    fn default() -> Self {
        SchedOptions {
            seed: 0x853c_49e6_748f_ea9b,
            maglev_size: DEFAULT_TABLE_SIZE,
            hash_key: HashKey::Flow,
        }
    }
}

/// xorshift64* (Vigna): small, fast, seeded; good enough for choosing two backends.
#[derive(Debug, Clone)]
struct XorShift64(u64);

impl XorShift64 {
    fn new(seed: u64) -> Self {
        XorShift64(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-enough value in `0..n` (`n` > 0; the bias of 64-bit modulo is negligible).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Debug, Clone)]
struct Slot {
    spec: BackendSpec,
    active: u64,
    /// Smooth-wrr current weight.
    current: i64,
}

/// Whether backend `i` may take a new connection: weight > 0, under its limit, and eligible.
fn usable(slots: &[Slot], i: usize, eligible: &impl Fn(usize) -> bool) -> bool {
    let Some(s) = slots.get(i) else {
        return false;
    };
    s.spec.weight > 0 && s.spec.max_conns.is_none_or(|m| s.active < u64::from(m)) && eligible(i)
}

/// `a_active / a_weight < b_active / b_weight`, exactly (weights are > 0 where used).
fn less_loaded(a: &Slot, b: &Slot) -> bool {
    u128::from(a.active) * u128::from(b.spec.weight)
        < u128::from(b.active) * u128::from(a.spec.weight)
}

fn same_load(a: &Slot, b: &Slot) -> bool {
    u128::from(a.active) * u128::from(b.spec.weight)
        == u128::from(b.active) * u128::from(a.spec.weight)
}

/// The scheduler of one VIP.
#[derive(Debug, Clone)]
pub struct Scheduler {
    algo: Algo,
    opts: SchedOptions,
    slots: Vec<Slot>,
    /// Round-robin cursor (`rr`, tie-break of `lc`): the index to try first.
    next: usize,
    /// Built for [`Algo::Maglev`] only.
    maglev: Option<MaglevTable>,
    rng: XorShift64,
}

impl Scheduler {
    /// A scheduler with default options.
    pub fn new(algo: Algo, backends: &[BackendSpec]) -> Result<Self, SchedError> {
        Self::with_options(algo, backends, SchedOptions::default())
    }

    pub fn with_options(
        algo: Algo,
        backends: &[BackendSpec],
        opts: SchedOptions,
    ) -> Result<Self, SchedError> {
        if backends.len() > MAX_BACKENDS {
            return Err(SchedError::TooManyBackends {
                count: backends.len(),
            });
        }
        if let Some(b) = backends.iter().find(|b| b.weight > MAX_WEIGHT) {
            return Err(SchedError::WeightOutOfRange {
                name: b.name.clone(),
                weight: b.weight,
            });
        }
        let mut names: Vec<&str> = backends.iter().map(|b| b.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(SchedError::DuplicateBackend {
                name: w[0].to_string(),
            });
        }
        let maglev = if algo == Algo::Maglev {
            let b: Vec<(&str, u32)> = backends
                .iter()
                .map(|b| (b.name.as_str(), b.weight))
                .collect();
            Some(MaglevTable::new(&b, opts.maglev_size)?)
        } else {
            None
        };
        Ok(Scheduler {
            algo,
            opts,
            slots: backends
                .iter()
                .map(|b| Slot {
                    spec: b.clone(),
                    active: 0,
                    current: 0,
                })
                .collect(),
            next: 0,
            maglev,
            rng: XorShift64::new(opts.seed),
        })
    }

    /// Replaces the algorithm and backend set, keeping the active counts of backends whose
    /// name stays (established connections are not forgotten) and the PRNG state. Returns,
    /// for every old index, its new index (`None`: removed), for remapping state kept by
    /// index ([`Persist::remap`], per-connection records). On error nothing changes.
    pub fn reconfigure(
        &mut self,
        algo: Algo,
        backends: &[BackendSpec],
    ) -> Result<Vec<Option<usize>>, SchedError> {
        let mut new = Self::with_options(algo, backends, self.opts)?;
        let map: Vec<Option<usize>> = self
            .slots
            .iter()
            .map(|old| new.slots.iter().position(|s| s.spec.name == old.spec.name))
            .collect();
        for (old, to) in self.slots.iter().zip(&map) {
            if let Some(j) = to {
                new.slots[*j].active = old.active;
            }
        }
        new.rng = self.rng.clone();
        new.next = if new.slots.is_empty() {
            0
        } else {
            self.next % new.slots.len()
        };
        *self = new;
        Ok(map)
    }

    pub fn algo(&self) -> Algo {
        self.algo
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn backend(&self, i: usize) -> Option<&BackendSpec> {
        self.slots.get(i).map(|s| &s.spec)
    }

    /// Index of the backend named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.slots.iter().position(|s| s.spec.name == name)
    }

    /// Active connections of backend `i` (0 for an unknown index).
    pub fn active(&self, i: usize) -> u64 {
        self.slots.get(i).map_or(0, |s| s.active)
    }

    /// A connection to backend `i` was established (or a UDP flow created). Unknown indices
    /// are ignored.
    pub fn conn_opened(&mut self, i: usize) {
        if let Some(s) = self.slots.get_mut(i) {
            s.active += 1;
        }
    }

    /// A connection to backend `i` ended. Never goes below zero; unknown indices are ignored.
    pub fn conn_closed(&mut self, i: usize) {
        if let Some(s) = self.slots.get_mut(i) {
            s.active = s.active.saturating_sub(1);
        }
    }

    /// Whether backend `i` could be picked now (weight, limit and `eligible`).
    pub fn is_usable(&self, i: usize, eligible: impl Fn(usize) -> bool) -> bool {
        usable(&self.slots, i, &eligible)
    }

    /// Chooses the backend for a new connection or flow; `None` when no backend is usable.
    /// Does not count the connection: call [`conn_opened`](Self::conn_opened) once it is
    /// established (and [`conn_closed`](Self::conn_closed) when it ends).
    pub fn pick(&mut self, flow: &FlowKey, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        match self.algo {
            Algo::Rr => self.pick_rr(&eligible),
            Algo::Wrr => self.pick_wrr(&eligible, |_| true),
            Algo::Lc => self.pick_lc(&eligible),
            Algo::Wlc => self.pick_wlc(&eligible),
            Algo::P2c => self.pick_p2c(&eligible),
            Algo::SourceHash => self.pick_source_hash(flow, &eligible),
            Algo::Maglev => self.pick_maglev(flow, &eligible),
        }
    }

    fn pick_rr(&mut self, eligible: &impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.slots.len();
        let i = (0..n)
            .map(|k| (self.next + k) % n)
            .find(|&i| usable(&self.slots, i, eligible))?;
        self.next = (i + 1) % n;
        Some(i)
    }

    /// nginx's smooth weighted round robin over the usable backends that pass `among`: every
    /// candidate's current weight grows by its weight, the largest (first on ties) is chosen
    /// and loses the total.
    fn pick_wrr(
        &mut self,
        eligible: &impl Fn(usize) -> bool,
        among: impl Fn(&Slot) -> bool,
    ) -> Option<usize> {
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for i in 0..self.slots.len() {
            if !usable(&self.slots, i, eligible) || !among(&self.slots[i]) {
                continue;
            }
            let w = i64::from(self.slots[i].spec.weight);
            self.slots[i].current += w;
            total += w;
            if best.is_none_or(|b| self.slots[i].current > self.slots[b].current) {
                best = Some(i);
            }
        }
        let b = best?;
        self.slots[b].current -= total;
        Some(b)
    }

    fn pick_lc(&mut self, eligible: &impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.slots.len();
        let mut best: Option<usize> = None;
        for k in 0..n {
            let i = (self.next + k) % n;
            if usable(&self.slots, i, eligible)
                && best.is_none_or(|b| self.slots[i].active < self.slots[b].active)
            {
                best = Some(i);
            }
        }
        let b = best?;
        self.next = (b + 1) % n;
        Some(b)
    }

    fn pick_wlc(&mut self, eligible: &impl Fn(usize) -> bool) -> Option<usize> {
        let mut best: Option<usize> = None;
        for i in 0..self.slots.len() {
            if usable(&self.slots, i, eligible)
                && best.is_none_or(|b| less_loaded(&self.slots[i], &self.slots[b]))
            {
                best = Some(i);
            }
        }
        let least = self.slots[best?].clone();
        self.pick_wrr(eligible, |s| same_load(s, &least))
    }

    fn pick_p2c(&mut self, eligible: &impl Fn(usize) -> bool) -> Option<usize> {
        let n = (0..self.slots.len())
            .filter(|&i| usable(&self.slots, i, eligible))
            .count();
        let nth = |k: usize| {
            (0..self.slots.len())
                .filter(|&i| usable(&self.slots, i, eligible))
                .nth(k)
        };
        match n {
            0 => None,
            1 => nth(0),
            _ => {
                let r1 = self.rng.below(n);
                let mut r2 = self.rng.below(n - 1);
                if r2 >= r1 {
                    r2 += 1;
                }
                let (a, b) = (nth(r1)?, nth(r2)?);
                if less_loaded(&self.slots[b], &self.slots[a]) {
                    Some(b)
                } else {
                    Some(a)
                }
            }
        }
    }

    fn pick_source_hash(
        &mut self,
        flow: &FlowKey,
        eligible: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let total: u64 = (0..self.slots.len())
            .filter(|&i| usable(&self.slots, i, eligible))
            .map(|i| u64::from(self.slots[i].spec.weight))
            .sum();
        if total == 0 {
            return None;
        }
        let mut target = flow.client_hash() % total;
        for i in 0..self.slots.len() {
            if !usable(&self.slots, i, eligible) {
                continue;
            }
            let w = u64::from(self.slots[i].spec.weight);
            if target < w {
                return Some(i);
            }
            target -= w;
        }
        None
    }

    fn pick_maglev(&mut self, flow: &FlowKey, eligible: &impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.slots.len();
        // Nothing usable: answer at once instead of walking the whole table.
        if !(0..n).any(|i| usable(&self.slots, i, eligible)) {
            return None;
        }
        let h = match self.opts.hash_key {
            HashKey::Flow => flow.hash(),
            HashKey::ClientIp => flow.client_hash(),
        };
        let slots = &self.slots;
        if let Some(i) = self
            .maglev
            .as_ref()
            .and_then(|t| t.lookup_eligible(h, |i| usable(slots, i, eligible)))
        {
            return Some(i);
        }
        // A usable backend without table slots (weights summing beyond the table size):
        // the next usable backend from the hash's position.
        let start = (h % n as u64) as usize;
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| usable(slots, i, eligible))
    }
}

/// Client-IP persistence: a client keeps going to the backend it was last sent to while that
/// backend is usable and the entry has not expired. Every connection through the entry
/// renews it (`expires = now + timeout`), so the timeout counts from the client's last new
/// connection, as with LVS persistence.
#[derive(Debug, Clone)]
pub struct Persist {
    timeout_ms: u64,
    max_entries: usize,
    map: HashMap<IpAddr, PersistEntry>,
    last_sweep_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PersistEntry {
    backend: usize,
    expires_ms: u64,
}

impl Persist {
    /// Default bound on remembered clients (a flood of spoofed sources cannot grow the table
    /// without limit).
    pub const DEFAULT_MAX_ENTRIES: usize = 1 << 20;
    /// Minimum time between two full sweeps forced by a full table.
    const SWEEP_INTERVAL_MS: u64 = 1_000;

    /// Persistence for `timeout_ms` (0 disables it: every pick goes to the scheduler).
    pub fn new(timeout_ms: u64) -> Self {
        Self::with_max_entries(timeout_ms, Self::DEFAULT_MAX_ENTRIES)
    }

    pub fn with_max_entries(timeout_ms: u64, max_entries: usize) -> Self {
        Persist {
            timeout_ms,
            max_entries,
            map: HashMap::new(),
            last_sweep_ms: None,
        }
    }

    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms
    }

    /// Number of remembered clients (expired ones included until swept).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The backend `client` sticks to at `now_ms`, if any (usability not checked).
    pub fn get(&self, client: IpAddr, now_ms: u64) -> Option<usize> {
        self.map
            .get(&client.to_canonical())
            .filter(|e| now_ms < e.expires_ms)
            .map(|e| e.backend)
    }

    /// The backend for `flow`: its client's persisted backend when that is unexpired and
    /// usable, otherwise `sched`'s choice, which is then remembered.
    pub fn pick(
        &mut self,
        sched: &mut Scheduler,
        flow: &FlowKey,
        now_ms: u64,
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        if self.timeout_ms == 0 {
            return sched.pick(flow, eligible);
        }
        let client = flow.client.ip().to_canonical();
        let expires_ms = now_ms.saturating_add(self.timeout_ms);
        if let Some(e) = self.map.get_mut(&client) {
            if now_ms < e.expires_ms && sched.is_usable(e.backend, &eligible) {
                e.expires_ms = expires_ms;
                return Some(e.backend);
            }
        }
        let chosen = sched.pick(flow, &eligible)?;
        if !self.map.contains_key(&client) && self.map.len() >= self.max_entries {
            let due = self
                .last_sweep_ms
                .is_none_or(|t| now_ms >= t.saturating_add(Self::SWEEP_INTERVAL_MS));
            if due {
                self.expire(now_ms);
            }
        }
        if self.map.contains_key(&client) || self.map.len() < self.max_entries {
            self.map.insert(
                client,
                PersistEntry {
                    backend: chosen,
                    expires_ms,
                },
            );
        }
        Some(chosen)
    }

    /// Drops the entries expired at `now_ms`; returns how many.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let before = self.map.len();
        self.map.retain(|_, e| now_ms < e.expires_ms);
        self.last_sweep_ms = Some(now_ms);
        before - self.map.len()
    }

    /// Forgets every client of backend `i`.
    pub fn forget_backend(&mut self, i: usize) {
        self.map.retain(|_, e| e.backend != i);
    }

    /// Renumbers entries after [`Scheduler::reconfigure`] (`map[old] = new`); entries of
    /// removed backends are dropped.
    pub fn remap(&mut self, map: &[Option<usize>]) {
        self.map
            .retain(|_, e| match map.get(e.backend).copied().flatten() {
                Some(j) => {
                    e.backend = j;
                    true
                }
                None => false,
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn vip() -> SocketAddr {
        "198.18.0.100:80".parse().unwrap()
    }

    fn flow(i: u32) -> FlowKey {
        let ip = Ipv4Addr::from(0x0a00_0000 + (i >> 8));
        FlowKey::new(
            SocketAddr::new(ip.into(), 20_000 + (i & 0xff) as u16),
            vip(),
            Proto::Tcp,
        )
    }

    fn weighted(ws: &[u32]) -> Vec<BackendSpec> {
        ws.iter()
            .enumerate()
            .map(|(i, &w)| BackendSpec::new(format!("10.1.0.{}:8080", i + 1), w))
            .collect()
    }

    fn counts(s: &mut Scheduler, picks: u32) -> Vec<usize> {
        let mut c = vec![0; s.len()];
        for i in 0..picks {
            c[s.pick(&flow(i), |_| true).unwrap()] += 1;
        }
        c
    }

    fn assert_shares(c: &[usize], ws: &[u32]) {
        let total: usize = c.iter().sum();
        let wsum: u32 = ws.iter().sum();
        for (i, (&got, &w)) in c.iter().zip(ws).enumerate() {
            let want = total as f64 * f64::from(w) / f64::from(wsum);
            assert!(
                (got as f64 - want).abs() <= want * 0.05,
                "backend {i}: {got} picks, want {want:.0} ({c:?})"
            );
        }
    }

    #[test]
    fn algo_names() {
        for a in Algo::ALL {
            assert_eq!(a.as_str().parse::<Algo>().unwrap(), a);
            assert_eq!(a.to_string(), a.as_str());
            let json = serde_json::to_string(&a).unwrap();
            assert_eq!(json, format!("\"{}\"", a.as_str().replace('-', "_")));
            assert_eq!(serde_json::from_str::<Algo>(&json).unwrap(), a);
        }
        assert_eq!("source_hash".parse::<Algo>().unwrap(), Algo::SourceHash);
        assert_eq!(
            "RR".parse::<Algo>(),
            Err(SchedError::UnknownAlgo("RR".into()))
        );
        assert!("".parse::<Algo>().is_err());
        assert_eq!("udp".parse::<Proto>().unwrap(), Proto::Udp);
        assert!("sctp".parse::<Proto>().is_err());
        assert_eq!(serde_json::to_string(&Proto::Tcp).unwrap(), "\"tcp\"");
        assert_eq!("client-ip".parse::<HashKey>().unwrap(), HashKey::ClientIp);
        assert!("ip".parse::<HashKey>().is_err());
    }

    #[test]
    fn bad_backend_sets_are_errors() {
        assert_eq!(
            Scheduler::new(Algo::Rr, &weighted(&[1, 257])).err(),
            Some(SchedError::WeightOutOfRange {
                name: "10.1.0.2:8080".into(),
                weight: 257
            })
        );
        let mut dup = weighted(&[1, 1]);
        dup[1].name = dup[0].name.clone();
        assert!(matches!(
            Scheduler::new(Algo::Wrr, &dup),
            Err(SchedError::DuplicateBackend { .. })
        ));
        let many = weighted(&vec![1; MAX_BACKENDS + 1]);
        assert!(matches!(
            Scheduler::new(Algo::Lc, &many),
            Err(SchedError::TooManyBackends { .. })
        ));
        let opts = SchedOptions {
            maglev_size: 100,
            ..Default::default()
        };
        assert!(matches!(
            Scheduler::with_options(Algo::Maglev, &weighted(&[1, 1]), opts),
            Err(SchedError::Maglev(MaglevError::NotPrime { size: 100 }))
        ));
        // Counting errors of the caller never panic.
        let mut s = Scheduler::new(Algo::Lc, &weighted(&[1])).unwrap();
        s.conn_closed(0);
        s.conn_closed(7);
        s.conn_opened(7);
        assert_eq!(s.active(0), 0);
        assert_eq!(s.active(7), 0);
        // An empty set picks nothing.
        for a in Algo::ALL {
            let mut s = Scheduler::new(a, &[]).unwrap();
            assert_eq!(s.pick(&flow(1), |_| true), None, "{a}");
        }
    }

    #[test]
    fn rr_spreads_evenly_and_in_order() {
        let mut s = Scheduler::new(Algo::Rr, &weighted(&[1, 5, 1, 1])).unwrap();
        let seq: Vec<usize> = (0..8)
            .map(|i| s.pick(&flow(i), |_| true).unwrap())
            .collect();
        assert_eq!(seq, [0, 1, 2, 3, 0, 1, 2, 3]);
        let c = counts(&mut s, 10_000);
        assert_shares(&c, &[1, 1, 1, 1]);
    }

    #[test]
    fn wrr_follows_weights() {
        let ws = [1, 2, 3, 4, 10];
        let mut s = Scheduler::new(Algo::Wrr, &weighted(&ws)).unwrap();
        let c = counts(&mut s, 10_000);
        assert_shares(&c, &ws);
    }

    #[test]
    fn wrr_is_smooth_like_nginx() {
        let mut s = Scheduler::new(Algo::Wrr, &weighted(&[5, 1, 1])).unwrap();
        let seq: String = (0..14)
            .map(|i| (b'a' + s.pick(&flow(i), |_| true).unwrap() as u8) as char)
            .collect();
        assert_eq!(seq, "aabacaaaabacaa");
        // Heavier weights: never more than the weight ratio in a row.
        let mut s = Scheduler::new(Algo::Wrr, &weighted(&[3, 1])).unwrap();
        let seq: Vec<usize> = (0..400)
            .map(|i| s.pick(&flow(i), |_| true).unwrap())
            .collect();
        let longest = seq
            .chunk_by(|a, b| a == b)
            .filter(|r| r[0] == 0)
            .map(<[usize]>::len)
            .max()
            .unwrap();
        assert!(longest <= 3, "{longest} picks of backend 0 in a row");
    }

    /// Discrete-time simulation: one new connection per tick, a connection to backend i lasts
    /// `hold[i]` ticks. Returns the number of connections each backend got.
    fn simulate(s: &mut Scheduler, hold: &[u64], ticks: u64) -> Vec<usize> {
        let mut ends: Vec<(u64, usize)> = Vec::new();
        let mut got = vec![0; hold.len()];
        for t in 0..ticks {
            ends.retain(|&(end, i)| {
                if end <= t {
                    s.conn_closed(i);
                    false
                } else {
                    true
                }
            });
            let i = s.pick(&flow(t as u32), |_| true).unwrap();
            s.conn_opened(i);
            got[i] += 1;
            ends.push((t + hold[i], i));
        }
        got
    }

    #[test]
    fn lc_sends_less_to_the_slow_backend() {
        // Backend 0 holds connections ten times longer. Least-connections equalises the
        // active counts, so rates go as 1/hold: about 1:10:10, where rr gives 1:1:1.
        let hold = [30, 3, 3];
        let mut s = Scheduler::new(Algo::Lc, &weighted(&[1, 1, 1])).unwrap();
        let got = simulate(&mut s, &hold, 10_000);
        let share0 = got[0] as f64 / 10_000.0;
        assert!(share0 < 0.12, "slow backend got {got:?}");
        assert!((got[1] as f64 - got[2] as f64).abs() < 500.0, "{got:?}");
        let mut rr = Scheduler::new(Algo::Rr, &weighted(&[1, 1, 1])).unwrap();
        let rr_got = simulate(&mut rr, &hold, 10_000);
        assert!(rr_got[0] > 3_000, "{rr_got:?}");
        // Active counts stay level (within one of each other) under lc.
        let a: Vec<u64> = (0..3).map(|i| s.active(i)).collect();
        assert!(
            a.iter().max().unwrap() - a.iter().min().unwrap() <= 1,
            "{a:?}"
        );
    }

    #[test]
    fn lc_ties_rotate() {
        let mut s = Scheduler::new(Algo::Lc, &weighted(&[1, 1, 1])).unwrap();
        // Connections that close at once: all ties, so round robin.
        let seq: Vec<usize> = (0..6)
            .map(|i| s.pick(&flow(i), |_| true).unwrap())
            .collect();
        assert_eq!(seq, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn wlc_follows_weights_for_long_and_short_connections() {
        // Long-lived: active counts end up proportional to weights.
        let ws = [1, 3, 4];
        let mut s = Scheduler::new(Algo::Wlc, &weighted(&ws)).unwrap();
        for i in 0..8_000 {
            let b = s.pick(&flow(i), |_| true).unwrap();
            s.conn_opened(b);
        }
        assert_eq!(
            (s.active(0), s.active(1), s.active(2)),
            (1_000, 3_000, 4_000)
        );
        // Short-lived (always tied at zero): smooth wrr among the tied.
        let mut s = Scheduler::new(Algo::Wlc, &weighted(&ws)).unwrap();
        let c = counts(&mut s, 8_000);
        assert_shares(&c, &ws);
        // Unequal hold times with equal weights: like lc.
        let mut s = Scheduler::new(Algo::Wlc, &weighted(&[1, 1, 1])).unwrap();
        let got = simulate(&mut s, &[30, 3, 3], 10_000);
        assert!(got[0] < 1_200, "{got:?}");
    }

    #[test]
    fn p2c_balances() {
        // Without closes the gap between the most and least loaded stays tiny (the "power of
        // two choices": O(log log n)), where a single random choice drifts by ~sqrt(picks).
        let mut s = Scheduler::new(Algo::P2c, &weighted(&[1; 10])).unwrap();
        for i in 0..10_000 {
            let b = s.pick(&flow(i), |_| true).unwrap();
            s.conn_opened(b);
        }
        let a: Vec<u64> = (0..10).map(|i| s.active(i)).collect();
        let spread = a.iter().max().unwrap() - a.iter().min().unwrap();
        assert!(spread <= 4, "{a:?}");
        // The slow backend gets less.
        let mut s = Scheduler::new(Algo::P2c, &weighted(&[1, 1, 1])).unwrap();
        let got = simulate(&mut s, &[30, 3, 3], 10_000);
        assert!(got[0] < 2_500, "{got:?}");
        // Weights count: active per weight is what is compared.
        let mut s = Scheduler::new(Algo::P2c, &weighted(&[1, 3])).unwrap();
        for i in 0..4_000 {
            let b = s.pick(&flow(i), |_| true).unwrap();
            s.conn_opened(b);
        }
        assert!((s.active(1) as f64 / s.active(0) as f64 - 3.0).abs() < 0.1);
        // Seeded: the same seed gives the same sequence.
        let run = |seed| {
            let opts = SchedOptions {
                seed,
                ..Default::default()
            };
            let mut s = Scheduler::with_options(Algo::P2c, &weighted(&[1; 5]), opts).unwrap();
            (0..50)
                .map(|i| s.pick(&flow(i), |_| true).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn eligibility_weight_zero_and_max_conns_respected_by_every_algo() {
        let mut rng = XorShift64::new(99);
        for a in Algo::ALL {
            let mut specs = weighted(&[1, 2, 3, 0, 5, 1]);
            specs[5].max_conns = Some(2);
            let mut s = Scheduler::new(a, &specs).unwrap();
            for i in 0..2_000u32 {
                let mask = rng.next() & 0x3f;
                let elig = |b: usize| mask & (1 << b) != 0;
                let want_some = (0..6).any(|b| b != 3 && elig(b) && (b != 5 || s.active(5) < 2));
                match s.pick(&flow(i), elig) {
                    Some(b) => {
                        assert!(elig(b), "{a}: picked ineligible {b} (mask {mask:#b})");
                        assert_ne!(b, 3, "{a}: picked drained backend");
                        assert!(b != 5 || s.active(5) < 2, "{a}: over max_conns");
                        // Hold some connections so max_conns matters.
                        if i % 3 == 0 {
                            s.conn_opened(b);
                        }
                    }
                    None => assert!(!want_some, "{a}: nothing picked (mask {mask:#b})"),
                }
            }
            assert_eq!(s.active(5), 2, "{a}: backend 5 filled to its limit");
            assert_eq!(s.pick(&flow(1), |_| false), None, "{a}");
            assert_eq!(s.pick(&flow(1), |b| b == 3), None, "{a}");
        }
    }

    #[test]
    fn source_hash_is_stable_and_spreads() {
        let ws = [1, 1, 2];
        let mut s = Scheduler::new(Algo::SourceHash, &weighted(&ws)).unwrap();
        let mut c = [0usize; 3];
        for client in 0..6_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + client));
            let f = |port| FlowKey::new(SocketAddr::new(ip, port), vip(), Proto::Tcp);
            let b = s.pick(&f(1000), |_| true).unwrap();
            for port in [1001, 40_000, 65_535] {
                assert_eq!(s.pick(&f(port), |_| true), Some(b));
            }
            c[b] += 1;
        }
        // Weighted spread (by client, so looser than 5%).
        assert!((c[2] as f64 / c[0] as f64 - 2.0).abs() < 0.2, "{c:?}");
        // Two instances agree; an IPv4-mapped IPv6 client hashes as its IPv4 address.
        let mut t = Scheduler::new(Algo::SourceHash, &weighted(&ws)).unwrap();
        let v4 = Ipv4Addr::new(192, 0, 2, 7);
        let mapped = IpAddr::V6(v4.to_ipv6_mapped());
        let f4 = FlowKey::new(SocketAddr::new(v4.into(), 5), vip(), Proto::Tcp);
        let f6 = FlowKey::new(SocketAddr::new(mapped, 5), vip(), Proto::Tcp);
        assert_eq!(s.pick(&f4, |_| true), t.pick(&f6, |_| true));
        // A client whose backend is ineligible goes elsewhere, and back when it returns.
        let b = s.pick(&f4, |_| true).unwrap();
        let other = s.pick(&f4, |i| i != b).unwrap();
        assert_ne!(other, b);
        assert_eq!(s.pick(&f4, |_| true), Some(b));
    }

    #[test]
    fn maglev_instances_agree_and_only_ineligible_flows_move() {
        let specs = weighted(&[1; 5]);
        let mut a = Scheduler::new(Algo::Maglev, &specs).unwrap();
        let mut b = Scheduler::new(Algo::Maglev, &specs).unwrap();
        let mut c = vec![0usize; 5];
        let mut moved = 0;
        let mut on_3 = 0;
        for i in 0..10_000 {
            let f = flow(i);
            let x = a.pick(&f, |_| true).unwrap();
            assert_eq!(b.pick(&f, |_| true), Some(x));
            assert_eq!(a.pick(&f, |_| true), Some(x), "same flow, same backend");
            c[x] += 1;
            let y = a.pick(&f, |i| i != 3).unwrap();
            if x == 3 {
                on_3 += 1;
            }
            if y != x {
                moved += 1;
            }
        }
        assert_eq!(moved, on_3, "only backend 3's flows move");
        assert_shares(&c, &[1; 5]);
        // Client-IP key: every port of a client lands on one backend.
        let opts = SchedOptions {
            hash_key: HashKey::ClientIp,
            ..Default::default()
        };
        let mut s = Scheduler::with_options(Algo::Maglev, &specs, opts).unwrap();
        let ip: IpAddr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9).into();
        let first = s
            .pick(
                &FlowKey::new(SocketAddr::new(ip, 1), vip(), Proto::Udp),
                |_| true,
            )
            .unwrap();
        for port in 2..200 {
            let f = FlowKey::new(SocketAddr::new(ip, port), vip(), Proto::Udp);
            assert_eq!(s.pick(&f, |_| true), Some(first));
        }
    }

    #[test]
    fn maglev_reconfigure_removing_a_backend_moves_only_its_flows() {
        let specs = weighted(&[1; 5]);
        let mut s = Scheduler::new(Algo::Maglev, &specs).unwrap();
        let before: Vec<String> = (0..10_000)
            .map(|i| specs[s.pick(&flow(i), |_| true).unwrap()].name.clone())
            .collect();
        let mut four = specs.clone();
        four.remove(1);
        s.reconfigure(Algo::Maglev, &four).unwrap();
        let after: Vec<String> = (0..10_000)
            .map(|i| four[s.pick(&flow(i), |_| true).unwrap()].name.clone())
            .collect();
        let moved = before.iter().zip(&after).filter(|(x, y)| x != y).count();
        assert!(moved <= 2_500, "{moved}");
        s.reconfigure(Algo::Maglev, &specs).unwrap();
        let back: Vec<String> = (0..10_000)
            .map(|i| specs[s.pick(&flow(i), |_| true).unwrap()].name.clone())
            .collect();
        assert_eq!(back, before);
    }

    #[test]
    fn reconfigure_keeps_active_counts_and_maps_indices() {
        let mut s = Scheduler::new(Algo::Lc, &weighted(&[1, 1, 1])).unwrap();
        s.conn_opened(0);
        s.conn_opened(2);
        s.conn_opened(2);
        let mut specs = weighted(&[1, 1, 1]);
        specs.remove(0); // drop 10.1.0.1
        specs.push(BackendSpec::new("10.1.0.9:8080", 4));
        let map = s.reconfigure(Algo::Wlc, &specs).unwrap();
        assert_eq!(map, [None, Some(0), Some(1)]);
        assert_eq!(s.algo(), Algo::Wlc);
        assert_eq!((s.active(0), s.active(1), s.active(2)), (0, 2, 0));
        assert_eq!(s.index_of("10.1.0.9:8080"), Some(2));
        // A failed reconfiguration changes nothing.
        assert!(s.reconfigure(Algo::Rr, &weighted(&[300])).is_err());
        assert_eq!(s.algo(), Algo::Wlc);
        assert_eq!(s.active(1), 2);
    }

    #[test]
    fn persistence_holds_renews_and_expires() {
        let mut s = Scheduler::new(Algo::Rr, &weighted(&[1, 1, 1])).unwrap();
        let mut p = Persist::new(10_000);
        let client = |port| {
            FlowKey::new(
                SocketAddr::new(Ipv4Addr::new(192, 0, 2, 1).into(), port),
                vip(),
                Proto::Tcp,
            )
        };
        let b = p.pick(&mut s, &client(1), 0, |_| true).unwrap();
        // rr would rotate; persistence holds, and each connection renews the entry.
        for (k, now) in (1..20u16).zip((1..20u64).map(|t| t * 9_000)) {
            assert_eq!(p.pick(&mut s, &client(k), now, |_| true), Some(b));
        }
        assert_eq!(p.get(Ipv4Addr::new(192, 0, 2, 1).into(), 180_000), Some(b));
        // Other clients still rotate.
        let other = |i: u8| {
            FlowKey::new(
                SocketAddr::new(Ipv4Addr::new(192, 0, 2, 100 + i).into(), 1),
                vip(),
                Proto::Tcp,
            )
        };
        let o: Vec<usize> = (0..3)
            .map(|i| p.pick(&mut s, &other(i), 0, |_| true).unwrap())
            .collect();
        assert_eq!(o.len(), 3);
        assert!(o[0] != o[1] && o[1] != o[2] && o[0] != o[2], "{o:?}");
        // Expiry: last renewed at 171,000, so gone at 181,000.
        let last = 19 * 9_000;
        assert_eq!(
            p.get(Ipv4Addr::new(192, 0, 2, 1).into(), last + 9_999),
            Some(b)
        );
        assert_eq!(
            p.get(Ipv4Addr::new(192, 0, 2, 1).into(), last + 10_000),
            None
        );
        assert_eq!(p.expire(last + 10_000), 4);
        assert!(p.is_empty());
    }

    #[test]
    fn persistence_moves_off_an_ineligible_backend_and_sticks_there() {
        let mut s = Scheduler::new(Algo::Rr, &weighted(&[1, 1, 1])).unwrap();
        let mut p = Persist::new(60_000);
        let f = flow(1);
        let b = p.pick(&mut s, &f, 0, |_| true).unwrap();
        let c = p.pick(&mut s, &f, 1, |i| i != b).unwrap();
        assert_ne!(c, b);
        // It now sticks to the new backend even once the old one is back.
        for now in 2..10 {
            assert_eq!(p.pick(&mut s, &f, now, |_| true), Some(c));
        }
        // Max conns counts as ineligible too.
        let mut specs = weighted(&[1, 1, 1]);
        specs[c].max_conns = Some(1);
        let map = s.reconfigure(Algo::Rr, &specs).unwrap();
        p.remap(&map);
        s.conn_opened(c);
        assert_ne!(p.pick(&mut s, &f, 20, |_| true), Some(c));
        // Disabled persistence is just the scheduler.
        let mut off = Persist::new(0);
        let x = off.pick(&mut s, &f, 0, |_| true).unwrap();
        let y = off.pick(&mut s, &f, 0, |_| true).unwrap();
        assert_ne!(x, y);
        assert!(off.is_empty());
    }

    #[test]
    fn persistence_remap_and_forget() {
        let mut s = Scheduler::new(Algo::Rr, &weighted(&[1, 1, 1])).unwrap();
        let mut p = Persist::new(60_000);
        let picks: Vec<usize> = (0..3)
            .map(|i| p.pick(&mut s, &flow(i << 8), 0, |_| true).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2]);
        let mut specs = weighted(&[1, 1, 1]);
        specs.remove(1);
        let map = s.reconfigure(Algo::Rr, &specs).unwrap();
        p.remap(&map);
        assert_eq!(p.len(), 2);
        let ip = |i: u32| flow(i << 8).client.ip();
        assert_eq!(p.get(ip(0), 1), Some(0));
        assert_eq!(p.get(ip(1), 1), None);
        assert_eq!(p.get(ip(2), 1), Some(1));
        p.forget_backend(1);
        assert_eq!(p.get(ip(2), 1), None);
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn persistence_table_is_bounded() {
        let mut s = Scheduler::new(Algo::Rr, &weighted(&[1, 1])).unwrap();
        let mut p = Persist::with_max_entries(5_000, 100);
        for i in 0..1_000 {
            assert!(p.pick(&mut s, &flow(i << 8), 0, |_| true).is_some());
        }
        assert_eq!(p.len(), 100);
        // Once entries expire, a full table makes room (a sweep at most once a second).
        assert!(p.pick(&mut s, &flow(5_000 << 8), 6_000, |_| true).is_some());
        assert_eq!(p.len(), 1);
    }
}
