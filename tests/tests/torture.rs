//! Torture (issue 7): random faults during verified writes on namespace hosts.
//!
//! Four blockd hosts and volume-mgr (`--down-after 2s --out-after 4s`), one 3-replica 64 MiB
//! volume. Each cycle starts a writer on the current gateway host's NBD socket (a minimal NBD
//! client in this file, one request at a time: random 4 KiB-aligned writes of 4-256 KiB whose
//! content is derived from a per-write id, reads checked against the model, a FLUSH now and
//! then), injects one fault chosen by a seeded RNG, heals it, stops the writer, waits until
//! every replica is in service and `fabctl volume verify` finds them equal, and reads back the
//! WHOLE volume through the gateway.
//!
//! Faults: `kill` (SIGKILL a non-gateway host's blockd, restart it 1-4 s later: only the delta
//! is resynced), `kill-long` (the same, but the host stays dead until its replicas are
//! re-homed on the other hosts, then returns and drops them), `link` (cut a non-gateway host's
//! cable for 1-6 s), `manager` (SIGKILL volume-mgr, restart it 1-5 s later), `gateway`
//! (SIGKILL the gateway's blockd: the writer reconnects to another host, which takes the
//! lease; the old gateway returns 2-4 s later), `gateway-link` (cut the gateway host's cable
//! for 1-6 s: it reaches neither the other replicas nor the manager, so writes may fail). Each
//! round of six cycles runs every fault once, in a seeded random order.
//!
//! The model, per 4 KiB block: the set of write ids the block may hold. An acknowledged write
//! makes it exactly {id}. A write that got an error reply, or whose connection died before the
//! reply, adds its id (old or new, sector by sector: a failed write may be torn). After a
//! cycle's read-back on converged, verified-equal replicas, every block is pinned to what was
//! read (a failed write may not flip later). Every 512-byte sector read (during faults and in
//! the read-back) must equal one of its block's allowed contents exactly; each sector starts
//! with a tag (write id, block, sector) so a mismatch says what was found instead. Read errors
//! and failed writes are counted and reported (availability), data mismatches are errors.
//!
//! `TORTURE_SEED=N` replays a fault sequence (printed at the start), `TORTURE_CYCLES=N` (default
//! 12) and `TORTURE_MINUTES=M` (default 2 when TORTURE_CYCLES is unset: no new cycle starts
//! after M minutes; unlimited otherwise) size the run:
//!
//! ```sh
//! TORTURE_CYCLES=300 cargo test --release -p fabric-tests --test torture -- --nocapture
//! ```
//!
//! `TORTURE_FAULTS=kill,link,…` limits the faults to those named. `TORTURE_KEEP_LOGS=DIR`
//! copies the daemons' logs to DIR when the test fails.
//!
//! When the replicas stay different after a heal although all are recorded in service, the
//! test reads the volume back through every host's gateway (a gateway reads its own replica
//! first) and reports which of them returns data the model forbids.

use fabric_tests::multihost::Cluster;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HOSTS: usize = 4;
const VOL: &str = "tort";
const VOL_SIZE: u64 = 64 << 20;
const BLOCK: usize = 4096;
const SECTOR: usize = 512;
const FLAGS: &[&str] = &["--replica-timeout", "2s", "--min-replicas-wait", "10s"];
const OUT_AFTER: &str = "4s";
/// Longest an NBD request may take before the writer gives up on the connection.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

// ---- seeded RNG (splitmix64) -----------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
    /// Uniform in lo..=hi.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 4 KiB that write `id` puts in block `block` (id 0: never written, zeros). Each sector
/// starts with a tag (id, block, sector); the rest is pseudo-random.
fn block_data(id: u32, block: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    if id == 0 {
        return v;
    }
    let mut x = mix(((id as u64) << 32) ^ block ^ 0x0070_5775_7265);
    for (s, sector) in v.chunks_mut(SECTOR).enumerate() {
        let tag = ((id as u64) << 32) | (block << 3) | s as u64;
        sector[..8].copy_from_slice(&tag.to_le_bytes());
        for w in sector[8..].chunks_mut(8) {
            x = mix(x.wrapping_add(0x9e37_79b9_7f4a_7c15));
            w.copy_from_slice(&x.to_le_bytes());
        }
    }
    v
}

// ---- minimal NBD client (fixed newstyle, NBD_OPT_GO, simple replies) --------------------------

#[derive(Debug)]
enum IoError {
    /// The server answered with this NBD error: the request failed.
    Reply(u32),
    /// The connection broke or timed out: the outcome is unknown.
    Lost(String),
}

struct Nbd {
    s: UnixStream,
    cookie: u64,
}

impl Nbd {
    /// Connects to `socket` and opens export `VOL`, retrying (bounded) while the gateway is
    /// not there yet or refuses.
    fn connect(socket: &std::path::Path, limit: Duration) -> Result<Nbd, String> {
        let t = Instant::now();
        loop {
            match Nbd::try_connect(socket) {
                Ok(n) => return Ok(n),
                Err(e) if t.elapsed() > limit => {
                    return Err(format!("NBD connect to {}: {e}", socket.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn try_connect(socket: &std::path::Path) -> Result<Nbd, String> {
        let io = |e: std::io::Error| e.to_string();
        let mut s = UnixStream::connect(socket).map_err(io)?;
        s.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        s.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).map_err(io)?;
        if &greet[..16] != b"NBDMAGICIHAVEOPT" {
            return Err("bad greeting".into());
        }
        s.write_all(&3u32.to_be_bytes()).map_err(io)?; // FIXED_NEWSTYLE | NO_ZEROES
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        opt.extend_from_slice(&(4 + VOL.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(VOL.len() as u32).to_be_bytes());
        opt.extend_from_slice(VOL.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt).map_err(io)?;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).map_err(io)?;
            let rep = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            if len > 1 << 16 {
                return Err(format!("option reply of {len} bytes"));
            }
            let mut d = vec![0u8; len];
            s.read_exact(&mut d).map_err(io)?;
            match rep {
                1 => return Ok(Nbd { s, cookie: 0 }), // NBD_REP_ACK
                3 => continue,                        // NBD_REP_INFO
                e => {
                    return Err(format!(
                        "GO refused: {e:#x} {}",
                        String::from_utf8_lossy(&d)
                    ))
                }
            }
        }
    }

    fn request(&mut self, kind: u16, off: u64, len: u32, data: &[u8]) -> Result<(), IoError> {
        self.cookie += 1;
        let mut b = Vec::with_capacity(28 + data.len());
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&off.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        let lost = |e: std::io::Error| IoError::Lost(e.to_string());
        self.s.write_all(&b).map_err(lost)?;
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r).map_err(lost)?;
        if u32::from_be_bytes(r[..4].try_into().unwrap()) != 0x6744_6698 {
            return Err(IoError::Lost("bad reply magic".into()));
        }
        if u64::from_be_bytes(r[8..16].try_into().unwrap()) != self.cookie {
            return Err(IoError::Lost("reply for another request".into()));
        }
        match u32::from_be_bytes(r[4..8].try_into().unwrap()) {
            0 => Ok(()),
            e => Err(IoError::Reply(e)),
        }
    }

    fn write(&mut self, off: u64, data: &[u8]) -> Result<(), IoError> {
        self.request(1, off, data.len() as u32, data)
    }

    fn flush(&mut self) -> Result<(), IoError> {
        self.request(3, 0, 0, &[])
    }

    fn read(&mut self, off: u64, len: usize) -> Result<Vec<u8>, IoError> {
        self.request(0, off, len as u32, &[])?;
        let mut v = vec![0u8; len];
        self.s
            .read_exact(&mut v)
            .map_err(|e| IoError::Lost(e.to_string()))?;
        Ok(v)
    }
}

// ---- the model ----------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Acked,
    Failed,
    Unknown,
}

struct WriteRec {
    cycle: usize,
    off: u64,
    len: usize,
    outcome: Outcome,
}

struct Model {
    /// Per 4 KiB block, the write ids it may hold (0 = never written).
    allowed: Vec<Vec<u32>>,
    writes: Vec<WriteRec>,
}

impl Model {
    fn new() -> Model {
        Model {
            allowed: vec![vec![0]; (VOL_SIZE as usize) / BLOCK],
            writes: vec![WriteRec {
                cycle: 0,
                off: 0,
                len: 0,
                outcome: Outcome::Acked,
            }],
        }
    }

    fn record(&mut self, id: u32, outcome: Outcome) {
        let w = &mut self.writes[id as usize];
        w.outcome = outcome;
        let (first, n) = (w.off as usize / BLOCK, w.len / BLOCK);
        for a in &mut self.allowed[first..first + n] {
            if outcome == Outcome::Acked {
                *a = vec![id];
            } else if !a.contains(&id) {
                a.push(id);
            }
        }
    }

    /// Checks `data` read at `off` sector by sector; returns one line per bad sector (at most
    /// 20, then a count). With `pin`, every block that matched one write whole is pinned to it.
    fn check(&mut self, off: u64, data: &[u8], pin: bool) -> Vec<String> {
        let mut bad = Vec::new();
        let mut nbad = 0usize;
        for (i, got) in data.chunks(BLOCK).enumerate() {
            let b = off / BLOCK as u64 + i as u64;
            let cands: Vec<(u32, Vec<u8>)> = self.allowed[b as usize]
                .iter()
                .map(|&id| (id, block_data(id, b)))
                .collect();
            let mut whole = None;
            for (id, want) in &cands {
                if got == &want[..] {
                    whole = Some(*id);
                    break;
                }
            }
            if let Some(id) = whole {
                if pin {
                    self.allowed[b as usize] = vec![id];
                }
                continue;
            }
            for (s, gs) in got.chunks(SECTOR).enumerate() {
                if cands
                    .iter()
                    .any(|(_, want)| gs == &want[s * SECTOR..(s + 1) * SECTOR])
                {
                    continue;
                }
                nbad += 1;
                if bad.len() < 20 {
                    bad.push(self.describe(b, s, gs));
                }
            }
        }
        if nbad > bad.len() {
            bad.push(format!("... {} bad sectors in all", nbad));
        }
        bad
    }

    fn describe(&self, block: u64, sector: usize, got: &[u8]) -> String {
        let tag = u64::from_le_bytes(got[..8].try_into().unwrap());
        let (id, b, s) = (tag >> 32, (tag & 0xffff_ffff) >> 3, tag & 7);
        let found = if got.iter().all(|&x| x == 0) {
            "zeros (never written)".to_string()
        } else if let Some(w) = self.writes.get(id as usize).filter(|_| id > 0) {
            let exact =
                block_data(id as u32, b)[s as usize * SECTOR..(s as usize + 1) * SECTOR] == *got;
            format!(
                "the tag of write #{id} (cycle {}, {:?}, at {} +{}) for block {b} sector {s}{}",
                w.cycle,
                w.outcome,
                w.off,
                w.len,
                if exact { "" } else { " with other bytes" }
            )
        } else {
            format!("unknown bytes (tag {tag:#x})")
        };
        let allowed: Vec<String> = self.allowed[block as usize]
            .iter()
            .map(|&id| {
                let w = &self.writes[id as usize];
                format!("#{id} (cycle {}, {:?})", w.cycle, w.outcome)
            })
            .collect();
        format!(
            "offset {} (block {block} sector {sector}): found {found}; allowed {}",
            block * BLOCK as u64 + (sector * SECTOR) as u64,
            allowed.join(" or ")
        )
    }
}

// ---- the writer -------------------------------------------------------------------------------

#[derive(Default, Debug)]
struct Stats {
    writes_ok: u64,
    writes_failed: u64,
    writes_unknown: u64,
    bytes_written: u64,
    reads_ok: u64,
    reads_failed: u64,
    bytes_checked: u64,
    flushes_failed: u64,
    reconnects: u64,
    /// Longest time one request took (the stall a guest would see), and in which cycle.
    longest_io: Duration,
    longest_io_cycle: usize,
    /// Failed requests by kind and cause ("write: NBD error 5 (cycle 3)").
    failures: BTreeMap<String, u64>,
    errors: Vec<String>,
}

/// Runs random I/O on the gateway in `gateway` (re-read after a lost connection) until `stop`.
fn writer(
    cycle: usize,
    seed: u64,
    gateway: Arc<Mutex<PathBuf>>,
    stop: Arc<AtomicBool>,
    mut model: Model,
    mut st: Stats,
) -> (Model, Stats) {
    let mut rng = Rng(seed);
    let mut conn: Option<Nbd> = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = conn.as_mut() else {
            let sock = gateway.lock().unwrap().clone();
            match Nbd::connect(&sock, Duration::from_secs(60)) {
                Ok(n) => conn = Some(n),
                Err(e) => {
                    st.errors
                        .push(format!("cycle {cycle}: writer cannot reconnect: {e}"));
                    break;
                }
            }
            continue;
        };
        let op = rng.range(0, 99);
        let len = rng.range(1, 64) as usize * BLOCK;
        let off = rng.range(0, (VOL_SIZE as usize - len) as u64 / BLOCK as u64) * BLOCK as u64;
        let t = Instant::now();
        let res = if op < 70 {
            let id = model.writes.len() as u32;
            model.writes.push(WriteRec {
                cycle,
                off,
                len,
                outcome: Outcome::Unknown,
            });
            let mut data = Vec::with_capacity(len);
            for b in 0..(len / BLOCK) as u64 {
                data.extend_from_slice(&block_data(id, off / BLOCK as u64 + b));
            }
            let r = c.write(off, &data);
            match &r {
                Ok(()) => {
                    st.writes_ok += 1;
                    st.bytes_written += len as u64;
                    model.record(id, Outcome::Acked);
                }
                Err(IoError::Reply(_)) => {
                    st.writes_failed += 1;
                    model.record(id, Outcome::Failed);
                }
                Err(IoError::Lost(_)) => {
                    st.writes_unknown += 1;
                    model.record(id, Outcome::Unknown);
                }
            }
            r
        } else if op < 95 {
            let r = c.read(off, len);
            match r {
                Ok(data) => {
                    st.reads_ok += 1;
                    st.bytes_checked += len as u64;
                    for e in model.check(off, &data, false) {
                        st.errors
                            .push(format!("cycle {cycle}: read during the fault: {e}"));
                    }
                    Ok(())
                }
                Err(e) => {
                    st.reads_failed += 1;
                    Err(e)
                }
            }
        } else {
            let r = c.flush();
            if r.is_err() {
                st.flushes_failed += 1;
            }
            r
        };
        let took = t.elapsed();
        if let Err(e) = &res {
            let kind = ["write", "read", "flush"][(op >= 70) as usize + (op >= 95) as usize];
            let cause = match e {
                IoError::Reply(n) => format!("NBD error {n}"),
                IoError::Lost(m) => format!("connection lost ({m})"),
            };
            *st.failures
                .entry(format!("{kind}: {cause} in cycle {cycle}"))
                .or_default() += 1;
        }
        if took > st.longest_io {
            st.longest_io = took;
            st.longest_io_cycle = cycle;
        }
        if let Err(IoError::Lost(_)) = res {
            conn = None;
            st.reconnects += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    (model, st)
}

// ---- faults ------------------------------------------------------------------------------------

const FAULTS: [&str; 6] = [
    "kill",
    "kill-long",
    "link",
    "manager",
    "gateway",
    "gateway-link",
];

/// Sets of `VOL`: (in-service members, member nodes).
fn sets(c: &Cluster) -> Vec<(usize, Vec<String>)> {
    let v = c.json(&["volume", "show", VOL]).unwrap_or_default();
    v["sets"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    let m = s["members"].as_array().cloned().unwrap_or_default();
                    (
                        m.iter().filter(|m| m["in_service"] == true).count(),
                        m.iter()
                            .map(|m| m["node"].as_str().unwrap_or("").to_string())
                            .collect(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Reads the whole volume through `socket` and checks it against the model (pinning it with
/// `pin`).
fn read_back(
    socket: &std::path::Path,
    model: &mut Model,
    pin: bool,
) -> Result<(u64, Vec<String>), String> {
    let mut n = Nbd::connect(socket, Duration::from_secs(60))?;
    let mut errs = Vec::new();
    let step = 1 << 20;
    for off in (0..VOL_SIZE).step_by(step) {
        let data = n
            .read(off, step)
            .map_err(|e| format!("read-back at {off}: {e:?}"))?;
        errs.extend(model.check(off, &data, pin));
    }
    Ok((VOL_SIZE, errs))
}

/// Waits (bounded) until every replica of `VOL` is recorded in service and `fabctl volume
/// verify` finds them all equal; says which of the two did not happen.
fn converge(c: &Cluster, limit: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    loop {
        let in_service = c.all_in_service(VOL);
        let verify = in_service.then(|| c.verify(VOL));
        match verify {
            Some((true, _)) => return Ok(t.elapsed()),
            Some((false, out)) if t.elapsed() > limit => {
                return Err(format!(
                    "every replica is recorded in service but they still differ {limit:?} after \
                     the heal (a replica the gateway counts as up to date holds other data: \
                     reads served by it can return data no write put there):\n{out}"
                ))
            }
            None if t.elapsed() > limit => {
                return Err(format!(
                    "replicas not all back in service {limit:?} after the heal"
                ))
            }
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// Hosts to read through after a divergence: those holding a digest no other replica of the
/// chunk has (from `fabctl volume verify`'s `DIFF chunk N (…): hA: version V digest D, …`
/// lines), then the gateway `g`, then the rest.
fn read_order(verify: &str, g: usize) -> Vec<usize> {
    let mut first = Vec::new();
    for line in verify.lines().filter(|l| l.starts_with("DIFF")) {
        let rest = line.split_once("): ").map_or("", |x| x.1);
        let reps: Vec<(usize, &str)> = rest
            .split(", ")
            .filter_map(|r| {
                let (h, tail) = r.split_once(": ")?;
                let h = h.trim().strip_prefix('h')?.parse().ok()?;
                Some((h, tail.split_whitespace().nth(3)?))
            })
            .collect();
        for (h, d) in &reps {
            if reps.iter().filter(|(_, x)| x == d).count() == 1 && !first.contains(h) {
                first.push(*h);
            }
        }
    }
    let mut order = first.clone();
    order.extend(
        std::iter::once(g)
            .chain(1..=HOSTS)
            .filter(|h| !first.contains(h)),
    );
    order.dedup();
    let mut seen = Vec::new();
    order.retain(|h| {
        let new = !seen.contains(h);
        seen.push(*h);
        new
    });
    order
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

#[test]
fn torture_random_faults_during_verified_writes() {
    let seed = env_u64("TORTURE_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            ^ std::process::id() as u64
    });
    let cycles_env = env_u64("TORTURE_CYCLES");
    let cycles = cycles_env.unwrap_or(12) as usize;
    let minutes = env_u64("TORTURE_MINUTES").or(if cycles_env.is_none() { Some(2) } else { None });
    eprintln!(
        "torture seed {seed} (replay with TORTURE_SEED={seed}); up to {cycles} cycles{}",
        minutes.map_or(String::new(), |m| format!(", no new cycle after {m} min"))
    );
    let enabled: Vec<&str> = match std::env::var("TORTURE_FAULTS") {
        Ok(v) => v
            .split(',')
            .map(|f| {
                *FAULTS.iter().find(|x| **x == f.trim()).unwrap_or_else(|| {
                    panic!("TORTURE_FAULTS: unknown fault {f:?}, known: {FAULTS:?}")
                })
            })
            .collect(),
        Err(_) => FAULTS.to_vec(),
    };
    assert!(!enabled.is_empty(), "TORTURE_FAULTS names no fault");
    let mut rng = Rng(seed);
    let started = Instant::now();

    let mut c = Cluster::start(HOSTS, "1G", FLAGS);
    c.restart_manager_with(&["--out-after", OUT_AFTER]);
    c.fabctl_ok(&["volume", "create", VOL, "--size", "64M", "--replicas", "3"]);
    let guard = KeepLogs(c.log_dir());

    let mut g = 1usize; // the gateway host
    let gateway = Arc::new(Mutex::new(c.socket(g)));
    let mut model = Model::new();
    let mut st = Stats::default();
    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    let mut bag: Vec<&str> = Vec::new();
    let mut bytes_verified = 0u64;
    let mut done = 0usize;
    for cycle in 1..=cycles {
        if let Some(m) = minutes {
            if cycle > 1 && started.elapsed() > Duration::from_secs(m * 60) {
                break;
            }
        }
        if bag.is_empty() {
            bag = enabled.clone();
            for i in (1..bag.len()).rev() {
                let j = rng.range(0, i as u64) as usize;
                bag.swap(i, j);
            }
        }
        let fault = bag.pop().unwrap();
        // Victims among the other hosts that hold a replica (after a re-homing one may hold
        // none: a fault there would test nothing).
        let all_others: Vec<usize> = (1..=HOSTS).filter(|&h| h != g).collect();
        let holding = sets(&c);
        let mut others: Vec<usize> = all_others
            .iter()
            .copied()
            .filter(|h| holding.iter().any(|(_, n)| n.contains(&format!("h{h}"))))
            .collect();
        if others.is_empty() {
            others = all_others;
        }
        let victim = others[rng.range(0, others.len() as u64 - 1) as usize];
        let hold = Duration::from_millis(rng.range(1000, 4000));
        let t = Instant::now();

        let stop = Arc::new(AtomicBool::new(false));
        let w = {
            let (gw, stop, m, s) = (gateway.clone(), stop.clone(), model, st);
            let wseed = rng.next();
            std::thread::spawn(move || writer(cycle, wseed, gw, stop, m, s))
        };
        // Let the writer get going before the fault.
        std::thread::sleep(Duration::from_millis(rng.range(500, 1500)));
        let what = match fault {
            "kill" => {
                c.kill_node(victim);
                std::thread::sleep(hold);
                c.restart_node(victim);
                format!("kill -9 h{victim}'s blockd, back after {hold:?}")
            }
            "kill-long" => {
                c.kill_node(victim);
                let k = Instant::now();
                let who = format!("h{victim}");
                loop {
                    let s = sets(&c);
                    if !s.is_empty()
                        && s.iter()
                            .all(|(i, n)| *i == 3 && n.len() == 3 && !n.contains(&who))
                    {
                        break;
                    }
                    if k.elapsed() > Duration::from_secs(120) {
                        stop.store(true, Ordering::Relaxed);
                        let _ = w.join();
                        panic!(
                            "seed {seed} cycle {cycle}: replicas not re-homed off {who} 120 s after its kill: {s:?}\n{}",
                            c.logs()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                let rehomed = k.elapsed();
                c.restart_node(victim);
                format!("kill -9 h{victim}'s blockd until its replicas were re-homed ({rehomed:.1?}), then restart")
            }
            "link" => {
                let hold = hold + Duration::from_millis(rng.range(0, 2000));
                c.link_down(victim);
                std::thread::sleep(hold);
                c.link_up(victim);
                format!("cut h{victim}'s link for {hold:?}")
            }
            "manager" => {
                let hold = hold + Duration::from_millis(rng.range(0, 1000));
                c.kill_manager();
                std::thread::sleep(hold);
                c.restart_manager_with(&["--out-after", OUT_AFTER]);
                format!("kill -9 volume-mgr, back after {hold:?}")
            }
            "gateway-link" => {
                let hold = hold + Duration::from_millis(rng.range(0, 2000));
                c.link_down(g);
                std::thread::sleep(hold);
                c.link_up(g);
                format!("cut the gateway h{g}'s link for {hold:?}")
            }
            "gateway" => {
                let old = g;
                g = victim;
                *gateway.lock().unwrap() = c.socket(g);
                c.kill_node(old);
                let hold = Duration::from_millis(rng.range(2000, 4000));
                std::thread::sleep(hold);
                c.restart_node(old);
                format!("kill -9 the gateway h{old}'s blockd (writer moves to h{g}), back after {hold:?}")
            }
            _ => unreachable!(),
        };
        *faults.entry(fault).or_default() += 1;
        // Writes go on a little on the healed cluster (they race the resync), then stop.
        std::thread::sleep(Duration::from_millis(rng.range(500, 1500)));
        stop.store(true, Ordering::Relaxed);
        let (m, s) = w.join().expect("the writer panicked");
        model = m;
        st = s;
        let dead = c.exited();
        assert!(
            dead.is_empty(),
            "seed {seed} cycle {cycle}: daemons exited on their own: {dead:?}\n{}",
            c.logs()
        );
        c.wait_nodes_up();
        if let Err(e) = converge(&c, Duration::from_secs(120)) {
            st.errors.push(format!(
                "cycle {cycle} ({fault}: {what}): {e}\n(volume-mgr's record: {})",
                c.fabctl(&["volume", "show", VOL]).1
            ));
            // What a guest would read: through every host in turn (each attach takes the
            // lease; a gateway reads its own replica first), checked against the model. The
            // hosts whose digest is the odd one out go first: an attach may make the
            // replicas equal again.
            for h in read_order(&e, g) {
                let r = match read_back(&c.socket(h), &mut model, false) {
                    Ok((_, errs)) if errs.is_empty() => "matches the model".to_string(),
                    Ok((_, errs)) => format!(
                        "{} bad sectors, e.g.:\n    {}",
                        errs.len(),
                        errs.iter()
                            .take(4)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join("\n    ")
                    ),
                    Err(e) => e,
                };
                st.errors
                    .push(format!("cycle {cycle}: read through h{h}'s gateway: {r}"));
            }
            break;
        }
        let (n, errs) = read_back(&c.socket(g), &mut model, true).unwrap_or_else(|e| {
            panic!("seed {seed} cycle {cycle}: {e}\n{}", c.logs());
        });
        bytes_verified += n;
        for e in errs {
            st.errors.push(format!("cycle {cycle}: read-back: {e}"));
        }
        done = cycle;
        eprintln!(
            "cycle {cycle} [{:.0?}]: {fault}: {what}; cycle took {:.1?} (to converged and read back); writes so far {} ok / {} failed / {} unknown; errors {}",
            started.elapsed(),
            t.elapsed(),
            st.writes_ok,
            st.writes_failed,
            st.writes_unknown,
            st.errors.len()
        );
        if !st.errors.is_empty() {
            break;
        }
    }
    let faults_s: Vec<String> = faults.iter().map(|(k, v)| format!("{k}={v}")).collect();
    eprintln!(
        "torture summary: seed {seed}, {done} cycles in {:.0?}; faults {}; written {} MiB in {} acked writes ({} failed, {} unknown outcome), {} flushes failed; verified {} MiB read back + {} MiB read during faults ({} reads, {} failed, {} reconnects); longest request {:.1?} (cycle {}); errors {}",
        started.elapsed(),
        faults_s.join(" "),
        st.bytes_written >> 20,
        st.writes_ok,
        st.writes_failed,
        st.writes_unknown,
        st.flushes_failed,
        bytes_verified >> 20,
        st.bytes_checked >> 20,
        st.reads_ok + st.reads_failed,
        st.reads_failed,
        st.reconnects,
        st.longest_io,
        st.longest_io_cycle,
        st.errors.len()
    );
    if !st.failures.is_empty() {
        eprintln!(
            "failed requests (availability, not data errors): {:?}",
            st.failures
        );
    }
    assert!(
        st.errors.is_empty(),
        "seed {seed}: data differs from the model (replay with TORTURE_SEED={seed}):\n{}\n{}",
        st.errors.join("\n"),
        c.logs()
    );
    assert!(st.writes_ok > 0 && bytes_verified > 0);
    drop(guard);
}

/// Copies the daemons' logs to `TORTURE_KEEP_LOGS` when dropped during a panic.
struct KeepLogs(PathBuf);

impl Drop for KeepLogs {
    fn drop(&mut self) {
        let Ok(dst) = std::env::var("TORTURE_KEEP_LOGS") else {
            return;
        };
        if !std::thread::panicking() {
            return;
        }
        let _ = std::fs::create_dir_all(&dst);
        if let Ok(rd) = std::fs::read_dir(&self.0) {
            for e in rd.flatten() {
                if e.path().extension().is_some_and(|x| x == "log") {
                    let _ = std::fs::copy(e.path(), PathBuf::from(&dst).join(e.file_name()));
                }
            }
        }
        eprintln!("daemon logs copied to {dst}");
    }
}

/// The model itself: it must catch a lost acknowledged write, data from the wrong block and a
/// torn acknowledged write, and accept old-or-new (also torn) for a failed one.
#[test]
fn model_catches_what_it_must() {
    let mut m = Model::new();
    let add = |m: &mut Model, off: u64, len: usize, o: Outcome| {
        let id = m.writes.len() as u32;
        m.writes.push(WriteRec {
            cycle: 1,
            off,
            len,
            outcome: Outcome::Unknown,
        });
        m.record(id, o);
        id
    };
    let a = add(&mut m, 0, 2 * BLOCK, Outcome::Acked);
    let b = add(&mut m, BLOCK as u64, BLOCK, Outcome::Failed);
    let two = |x: u32, y: u32| [block_data(x, 0), block_data(y, 1)].concat();
    // Acked a in block 0; block 1 may hold a or b, also torn.
    assert!(m.check(0, &two(a, a), false).is_empty());
    assert!(m.check(0, &two(a, b), false).is_empty());
    let mut torn = two(a, a);
    torn[BLOCK + SECTOR..BLOCK + 2 * SECTOR].copy_from_slice(&block_data(b, 1)[SECTOR..2 * SECTOR]);
    assert!(m.check(0, &torn, false).is_empty());
    // Lost acknowledged write: block 0 still zeros.
    let e = m.check(0, &two(0, a), false);
    assert!(e.len() == 8 && e[0].contains("zeros"), "{e:?}");
    // Block 1's data in block 0.
    let e = m.check(0, &[block_data(a, 1), block_data(a, 1)].concat(), false);
    assert!(e[0].contains("for block 1"), "{e:?}");
    // A torn acknowledged write.
    let mut t = two(a, a);
    t[SECTOR..2 * SECTOR].fill(0);
    assert_eq!(m.check(0, &t, false).len(), 1);
    // Pinning: once read back as b, block 1 may not go back to a.
    assert!(m.check(0, &two(a, b), true).is_empty());
    assert_eq!(m.check(0, &two(a, a), false).len(), 8);
    // An acknowledged write over it makes it exact again.
    let c = add(&mut m, BLOCK as u64, BLOCK, Outcome::Acked);
    assert!(m.check(BLOCK as u64, &block_data(c, 1), false).is_empty());
    assert_eq!(m.check(BLOCK as u64, &block_data(b, 1), false).len(), 8);
}

#[test]
fn read_order_puts_the_odd_replica_first() {
    let v = "DIFF chunk 0 (offset 0): h3: version 4398046512281 digest bc498f78, h4: version \
             4398046512281 digest 0d2fa6f2, h1: version 4398046512281 digest bc498f78\n\
             volume tort: 1 of 16 chunks differ between replicas";
    assert_eq!(read_order(v, 3), vec![4, 3, 1, 2]);
    assert_eq!(read_order("", 2), vec![2, 1, 3, 4]);
}
