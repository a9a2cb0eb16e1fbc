//! The control-plane store: a small key/value trait with atomic, conditional batches, a
//! revision that every commit bumps, and a change feed by revision (what watches follow, also
//! across managers). `RedbStore` is the embedded, crash-safe default (each commit is fsynced
//! before it returns); `crate::etcd_store::EtcdStore` implements the same trait for clusters.
//! Both run the same conformance suite ([`conformance`], [`conformance_compacted`]).

use std::path::Path;
use tokio::sync::broadcast;

/// Kinds of objects (the first part of a key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Node,
    Disk,
    Volume,
    Lease,
    Meta,
    /// Overlay networks, by name.
    Network,
    /// Ports of overlay networks, by name.
    Port,
    /// Registered vswitches, by node name.
    Switch,
    /// Uniqueness and reference indexes of networks and ports (`vni/N`, `mac/NET/MAC`,
    /// `ip/NET/IP`, `ifname/NODE/IF` hold the owner's name; `ports/NET` the port count):
    /// committed with the object under `Cond`s, so no two objects ever share a VNI, address or
    /// interface, and no network is deleted while it has ports.
    NetIndex,
    /// Load-balanced VIPs (with their backends), by name.
    Vip,
    /// Uniqueness index of VIPs: `addr/PROTO/IP:PORT` holds the owner's name, committed with
    /// the VIP under a `Cond`, so no two VIPs ever share an address and protocol.
    VipIndex,
    /// Holder leases of VIPs (`api::VipLease`), by VIP name.
    VipLease,
    /// Leader-election keys (`crate::leader`): written by the election with an etcd lease, not
    /// by `commit`; read in `Cond`s to fence a leader's writes. Not part of the change feed.
    Leader,
}

impl Kind {
    /// Every kind, in key order of their prefixes' first use (tests iterate it).
    pub const ALL: [Kind; 13] = [
        Kind::Node,
        Kind::Disk,
        Kind::Volume,
        Kind::Lease,
        Kind::Meta,
        Kind::Network,
        Kind::Port,
        Kind::Switch,
        Kind::NetIndex,
        Kind::Vip,
        Kind::VipIndex,
        Kind::VipLease,
        Kind::Leader,
    ];

    /// The key prefix of the kind (ends in '/').
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Node => "node/",
            Kind::Disk => "disk/",
            Kind::Volume => "volume/",
            Kind::Lease => "lease/",
            Kind::Meta => "meta/",
            Kind::Network => "network/",
            Kind::Port => "port/",
            Kind::Switch => "switch/",
            Kind::NetIndex => "netindex/",
            Kind::Vip => "vip/",
            Kind::VipIndex => "vipindex/",
            Kind::VipLease => "viplease/",
            Kind::Leader => "leader/",
        }
    }

    /// Splits a store key (`kind/name`, without any backend prefix) into kind and name.
    pub fn parse_key(key: &str) -> Option<(Kind, &str)> {
        let (p, name) = key.split_at(key.find('/')? + 1);
        Kind::ALL
            .into_iter()
            .find(|k| k.prefix() == p)
            .map(|k| (k, name))
    }
}

/// One change in the feed: the object `name` of `kind` got `value` (`None`: deleted) in the
/// commit that produced revision `rev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub rev: u64,
    pub kind: Kind,
    pub name: String,
    pub value: Option<Vec<u8>>,
}

/// One change in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(Kind, String, Vec<u8>),
    Delete(Kind, String),
}

/// A condition the batch needs; if any fails nothing is applied (compare-and-swap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// The key holds exactly this value (`None`: the key is absent).
    Equals(Kind, String, Option<Vec<u8>>),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("precondition failed on {0}")]
    Conflict(String),
    #[error("store: {0}")]
    Backend(String),
    /// The history asked for is gone: only changes from this revision on are kept. The caller
    /// re-lists (and follows the feed from the listing's revision).
    #[error("store history compacted: changes are kept from revision {0} on")]
    Compacted(u64),
}

/// `(revision, [(name, value)])`.
pub type Listing = (u64, Vec<(String, Vec<u8>)>);

/// The control-plane store. Deliberately small, so that an etcd backend (issue 8) maps onto it
/// one to one: `get`/`list` are range reads, `commit` is a `Txn` whose compares are `conds`
/// and whose success branch is `ops`, and `revision` is the store revision.
///
/// Contract (checked by [`conformance`]):
/// - a commit is atomic: every op applies, or (a condition failed, or an error) none does;
/// - a commit that returns `Ok` is durable: it survives a crash of the process right after;
/// - every commit that applies ops returns a revision greater than any revision seen before;
///   a failed commit changes no revision;
/// - `list` is sorted by name and consistent with the revision it returns;
/// - kinds are separate namespaces;
/// - `changes(since, _)` returns, in revision order, every op of every commit with a revision
///   greater than `since` (a put as `Some(value)`, a delete as `None`), whole commits at a time,
///   or `Compacted` when part of that history is no longer kept;
/// - `subscribe` receivers get the revision of every later commit, by any writer of the store.
pub trait Store: Send + Sync + 'static {
    /// The value of one object, `None` if absent.
    fn get(&self, kind: Kind, name: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// All objects of a kind, sorted by name, with the revision they were read at.
    fn list(&self, kind: Kind) -> Result<Listing, StoreError>;
    /// Applies `ops` atomically if every condition holds; returns the new revision.
    /// A failed condition is `StoreError::Conflict` (and nothing is applied).
    fn commit(&self, conds: &[Cond], ops: &[Op]) -> Result<u64, StoreError>;
    /// The revision of the last commit (0 for an empty store).
    fn revision(&self) -> Result<u64, StoreError>;
    /// The changes of the commits after revision `since`, oldest first. Stops at the first
    /// commit boundary once `limit` changes are collected (so a commit is never split: the
    /// result can exceed `limit` by the size of its last commit); empty when nothing is newer.
    /// `StoreError::Compacted(oldest)` when changes after `since` have been discarded
    /// (`since + 1 < oldest`): re-list instead. Changes of `Kind::Leader` are not included.
    fn changes(&self, since: u64, limit: usize) -> Result<Vec<Change>, StoreError>;
    /// A receiver of the revision of every commit made after this call, by any writer of the
    /// store (other managers too, for a shared backend). A wake-up only: read `changes` (or
    /// re-list) for the content; a lagged receiver (`RecvError::Lagged`) just reads on.
    fn subscribe(&self) -> broadcast::Receiver<u64>;
}

const OBJECTS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("objects");
const REVISION: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("revision");
/// The change log: `(revision, index in the commit)` -> `(key, value or None for a delete)`.
type LogKey = (u64, u32);
type LogEntry<'a> = (&'a str, Option<&'a [u8]>);
const CHANGES: redb::TableDefinition<LogKey, LogEntry> = redb::TableDefinition::new("changes");
/// In `REVISION`: the oldest revision whose changes the log still holds (set when a store
/// made before the change log is opened, and by `compact`).
const LOG_FROM: &str = "log_from";

/// How many revisions of changes `RedbStore::open` keeps.
pub const DEFAULT_HISTORY: u64 = 10_000;

/// The embedded store: one redb file.
pub struct RedbStore {
    db: redb::Database,
    history: u64,
    commits: broadcast::Sender<u64>,
    /// Held from the start of a write transaction until its revision is sent to the
    /// subscribers, so they hear the revisions in commit order.
    writer: std::sync::Mutex<()>,
}

fn be<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn key(kind: Kind, name: &str) -> String {
    format!("{}{}", kind.prefix(), name)
}

/// Capacity of the commit broadcast channels (a slower receiver sees `Lagged`).
pub(crate) const SUBSCRIBE_CAPACITY: usize = 1024;

impl RedbStore {
    /// Opens (creating) the store, keeping the changes of the last [`DEFAULT_HISTORY`]
    /// revisions.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        RedbStore::open_with_history(path, DEFAULT_HISTORY)
    }

    /// Opens (creating) the store, keeping the changes of the last `history` revisions
    /// (at least 1).
    pub fn open_with_history(path: &Path, history: u64) -> Result<RedbStore, StoreError> {
        use redb::ReadableTable;
        let db = redb::Database::create(path)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(be)?;
        {
            tx.open_table(OBJECTS).map_err(be)?;
            tx.open_table(CHANGES).map_err(be)?;
            let mut r = tx.open_table(REVISION).map_err(be)?;
            if r.get(LOG_FROM).map_err(be)?.is_none() {
                // A new store, or one from before the change log: it starts after now.
                let cur = r.get("rev").map_err(be)?.map(|v| v.value()).unwrap_or(0);
                r.insert(LOG_FROM, cur + 1).map_err(be)?;
            }
        }
        tx.commit().map_err(be)?;
        Ok(RedbStore {
            db,
            history: history.max(1),
            commits: broadcast::channel(SUBSCRIBE_CAPACITY).0,
            writer: std::sync::Mutex::new(()),
        })
    }

    /// Discards the changes of revisions below `rev` (as etcd's compaction does): `changes`
    /// with `since + 1 < rev` then returns `Compacted`.
    pub fn compact(&self, rev: u64) -> Result<(), StoreError> {
        use redb::ReadableTable;
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut tx = self.db.begin_write().map_err(be)?;
        tx.set_durability(redb::Durability::Immediate).map_err(be)?;
        {
            let mut r = tx.open_table(REVISION).map_err(be)?;
            let from = r.get(LOG_FROM).map_err(be)?.map(|v| v.value()).unwrap_or(1);
            if rev > from {
                r.insert(LOG_FROM, rev).map_err(be)?;
                let mut c = tx.open_table(CHANGES).map_err(be)?;
                c.retain_in(..(rev, 0u32), |_, _| false).map_err(be)?;
            }
        }
        tx.commit().map_err(be)
    }
}

impl Store for RedbStore {
    fn get(&self, kind: Kind, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read().map_err(be)?;
        let t = tx.open_table(OBJECTS).map_err(be)?;
        Ok(t.get(key(kind, name).as_str())
            .map_err(be)?
            .map(|v| v.value().to_vec()))
    }

    fn list(&self, kind: Kind) -> Result<Listing, StoreError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read().map_err(be)?;
        let t = tx.open_table(OBJECTS).map_err(be)?;
        let r = tx.open_table(REVISION).map_err(be)?;
        let rev = r.get("rev").map_err(be)?.map(|v| v.value()).unwrap_or(0);
        let p = kind.prefix();
        // Every prefix ends in '/'; the keys of a kind are exactly those in [`kind/`, `kind0`).
        let end = format!("{}0", &p[..p.len() - 1]);
        let mut out = Vec::new();
        for item in t.range(p..end.as_str()).map_err(be)? {
            let (k, v) = item.map_err(be)?;
            out.push((k.value()[p.len()..].to_string(), v.value().to_vec()));
        }
        Ok((rev, out))
    }

    fn commit(&self, conds: &[Cond], ops: &[Op]) -> Result<u64, StoreError> {
        use redb::ReadableTable;
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut tx = self.db.begin_write().map_err(be)?;
        // Explicit although it is redb's default: the commit is on disk when `commit` returns.
        tx.set_durability(redb::Durability::Immediate).map_err(be)?;
        let rev;
        {
            let mut t = tx.open_table(OBJECTS).map_err(be)?;
            for c in conds {
                let Cond::Equals(kind, name, want) = c;
                let k = key(*kind, name);
                let have = t.get(k.as_str()).map_err(be)?.map(|v| v.value().to_vec());
                if &have != want {
                    return Err(StoreError::Conflict(k));
                }
            }
            let mut r = tx.open_table(REVISION).map_err(be)?;
            let cur = r.get("rev").map_err(be)?.map(|v| v.value()).unwrap_or(0);
            rev = cur + 1;
            r.insert("rev", rev).map_err(be)?;
            let mut log = tx.open_table(CHANGES).map_err(be)?;
            for (i, op) in ops.iter().enumerate() {
                let i = u32::try_from(i).map_err(|_| be("too many ops in one commit"))?;
                match op {
                    Op::Put(kind, name, v) => {
                        let k = key(*kind, name);
                        t.insert(k.as_str(), v.as_slice()).map_err(be)?;
                        log.insert((rev, i), (k.as_str(), Some(v.as_slice())))
                            .map_err(be)?;
                    }
                    Op::Delete(kind, name) => {
                        let k = key(*kind, name);
                        t.remove(k.as_str()).map_err(be)?;
                        log.insert((rev, i), (k.as_str(), None)).map_err(be)?;
                    }
                }
            }
            // Keep the last `history` revisions: this commit drops at most one out of it.
            if rev > self.history {
                let old = rev - self.history;
                log.retain_in((old, 0u32)..(old + 1, 0u32), |_, _| false)
                    .map_err(be)?;
            }
        }
        tx.commit().map_err(be)?;
        // No receivers is fine.
        let _ = self.commits.send(rev);
        Ok(rev)
    }

    fn revision(&self) -> Result<u64, StoreError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read().map_err(be)?;
        let r = tx.open_table(REVISION).map_err(be)?;
        Ok(r.get("rev").map_err(be)?.map(|v| v.value()).unwrap_or(0))
    }

    fn changes(&self, since: u64, limit: usize) -> Result<Vec<Change>, StoreError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read().map_err(be)?;
        let r = tx.open_table(REVISION).map_err(be)?;
        let cur = r.get("rev").map_err(be)?.map(|v| v.value()).unwrap_or(0);
        let from = r.get(LOG_FROM).map_err(be)?.map(|v| v.value()).unwrap_or(1);
        let oldest = from.max((cur + 1).saturating_sub(self.history));
        if since >= cur {
            return Ok(Vec::new());
        }
        if since + 1 < oldest {
            return Err(StoreError::Compacted(oldest));
        }
        let log = tx.open_table(CHANGES).map_err(be)?;
        let mut out: Vec<Change> = Vec::new();
        for item in log.range((since + 1, 0u32)..).map_err(be)? {
            let (k, v) = item.map_err(be)?;
            let (rev, _) = k.value();
            if out.len() >= limit && out.last().is_some_and(|c| c.rev != rev) {
                break;
            }
            let (full, value) = v.value();
            let Some((kind, name)) = Kind::parse_key(full) else {
                continue;
            };
            if kind == Kind::Leader {
                continue;
            }
            out.push(Change {
                rev,
                kind,
                name: name.to_string(),
                value: value.map(<[u8]>::to_vec),
            });
        }
        Ok(out)
    }

    fn subscribe(&self) -> broadcast::Receiver<u64> {
        self.commits.subscribe()
    }
}

/// The behaviour every `Store` must have; each backend runs it from its tests on a fresh,
/// empty store (see the contract on [`Store`]).
pub fn conformance(s: &dyn Store) {
    let mut sub = s.subscribe();
    let r0 = s.revision().unwrap();
    assert_eq!(
        s.changes(r0, 100).unwrap(),
        vec![],
        "nothing after the start"
    );
    for kind in Kind::ALL {
        assert!(s.list(kind).unwrap().1.is_empty(), "fresh store: {kind:?}");
    }
    assert_eq!(s.get(Kind::Volume, "a").unwrap(), None);
    let r1 = s
        .commit(
            &[Cond::Equals(Kind::Volume, "a".into(), None)],
            &[Op::Put(Kind::Volume, "a".into(), b"1".to_vec())],
        )
        .unwrap();
    assert!(r1 > r0);
    assert_eq!(s.revision().unwrap(), r1);
    assert_eq!(s.get(Kind::Volume, "a").unwrap(), Some(b"1".to_vec()));
    // A failed condition applies nothing and does not bump the revision.
    let e = s.commit(
        &[Cond::Equals(Kind::Volume, "a".into(), None)],
        &[Op::Put(Kind::Volume, "b".into(), b"2".to_vec())],
    );
    assert!(matches!(e, Err(StoreError::Conflict(_))));
    let e = s.commit(
        &[Cond::Equals(Kind::Volume, "zz".into(), Some(b"1".to_vec()))],
        &[Op::Put(Kind::Volume, "b".into(), b"2".to_vec())],
    );
    assert!(matches!(e, Err(StoreError::Conflict(_))), "absent != Some");
    assert_eq!(s.get(Kind::Volume, "b").unwrap(), None);
    assert_eq!(s.revision().unwrap(), r1);
    // Compare-and-swap on a value; several ops over several kinds in one commit.
    let r2 = s
        .commit(
            &[Cond::Equals(Kind::Volume, "a".into(), Some(b"1".to_vec()))],
            &[
                Op::Put(Kind::Volume, "a".into(), b"3".to_vec()),
                Op::Put(Kind::Node, "n".into(), b"x".to_vec()),
            ],
        )
        .unwrap();
    assert!(r2 > r1);
    assert_eq!(s.get(Kind::Node, "n").unwrap(), Some(b"x".to_vec()));
    // All conditions must hold, not just one.
    assert!(s
        .commit(
            &[
                Cond::Equals(Kind::Volume, "a".into(), Some(b"3".to_vec())),
                Cond::Equals(Kind::Volume, "a".into(), Some(b"1".to_vec())),
            ],
            &[Op::Delete(Kind::Volume, "a".into())]
        )
        .is_err());
    assert_eq!(s.get(Kind::Volume, "a").unwrap(), Some(b"3".to_vec()));
    // Kinds are separate namespaces (also for names holding ':' and '/', like disk keys);
    // lists are sorted and carry the revision.
    let r3 = s
        .commit(
            &[],
            &[
                Op::Put(Kind::Volume, "0z".into(), b"z".to_vec()),
                Op::Put(Kind::Disk, "n:/dev/sdb".into(), b"d".to_vec()),
                Op::Put(Kind::Disk, "n".into(), b"e".to_vec()),
            ],
        )
        .unwrap();
    assert!(r3 > r2);
    let (rev, items) = s.list(Kind::Volume).unwrap();
    assert_eq!(rev, s.revision().unwrap());
    assert_eq!(
        items.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        vec!["0z", "a"]
    );
    assert_eq!(
        s.list(Kind::Node).unwrap().1,
        vec![("n".into(), b"x".to_vec())]
    );
    assert_eq!(
        s.list(Kind::Disk).unwrap().1,
        vec![
            ("n".into(), b"e".to_vec()),
            ("n:/dev/sdb".into(), b"d".to_vec())
        ]
    );
    assert_eq!(s.get(Kind::Node, "n:/dev/sdb").unwrap(), None);
    // Deletes are changes too.
    let r4 = s
        .commit(&[], &[Op::Delete(Kind::Volume, "a".into())])
        .unwrap();
    assert!(r4 > r3);
    assert_eq!(s.get(Kind::Volume, "a").unwrap(), None);
    assert_eq!(s.get(Kind::Volume, "0z").unwrap(), Some(b"z".to_vec()));
    // Concurrent read-modify-write through compare-and-swap loses no update.
    const THREADS: u64 = 4;
    const EACH: u64 = 25;
    let before = s.revision().unwrap();
    std::thread::scope(|sc| {
        for _ in 0..THREADS {
            sc.spawn(|| {
                for _ in 0..EACH {
                    loop {
                        let cur = s.get(Kind::Meta, "counter").unwrap();
                        let n: u64 = cur
                            .as_deref()
                            .map(|b| String::from_utf8_lossy(b).parse().unwrap())
                            .unwrap_or(0);
                        match s.commit(
                            &[Cond::Equals(Kind::Meta, "counter".into(), cur)],
                            &[Op::Put(
                                Kind::Meta,
                                "counter".into(),
                                (n + 1).to_string().into_bytes(),
                            )],
                        ) {
                            Ok(_) => break,
                            Err(StoreError::Conflict(_)) => continue,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            });
        }
    });
    assert_eq!(
        s.get(Kind::Meta, "counter").unwrap(),
        Some((THREADS * EACH).to_string().into_bytes())
    );
    assert!(s.revision().unwrap() >= before + THREADS * EACH);

    // The change feed: every op of every commit after r0, in order, a commit at a time.
    let put = |rev, kind, name: &str, v: &[u8]| Change {
        rev,
        kind,
        name: name.into(),
        value: Some(v.to_vec()),
    };
    let all = s.changes(r0, usize::MAX).unwrap();
    let first = [
        put(r1, Kind::Volume, "a", b"1"),
        put(r2, Kind::Volume, "a", b"3"),
        put(r2, Kind::Node, "n", b"x"),
        put(r3, Kind::Volume, "0z", b"z"),
        put(r3, Kind::Disk, "n:/dev/sdb", b"d"),
        put(r3, Kind::Disk, "n", b"e"),
        Change {
            rev: r4,
            kind: Kind::Volume,
            name: "a".into(),
            value: None,
        },
    ];
    assert_eq!(all[..first.len()], first[..]);
    let counted = &all[first.len()..];
    assert_eq!(
        counted.len() as u64,
        THREADS * EACH,
        "one change per counter commit"
    );
    for (i, c) in counted.iter().enumerate() {
        assert_eq!((c.kind, c.name.as_str()), (Kind::Meta, "counter"));
        assert!(c.rev > before && c.rev <= s.revision().unwrap());
        // Each commit of the counter wrote the next number: the feed replays them in order.
        assert_eq!(c.value, Some((i + 1).to_string().into_bytes()));
    }
    assert_eq!(all.last().unwrap().rev, s.revision().unwrap());
    // `limit` cuts at commit boundaries only; `since` is exclusive.
    assert_eq!(s.changes(r0, 1).unwrap(), first[..1]);
    assert_eq!(
        s.changes(r1, 1).unwrap(),
        first[1..3],
        "a commit is never split"
    );
    assert_eq!(s.changes(r0, 2).unwrap(), first[..3]);
    assert_eq!(s.changes(r3, 1).unwrap(), first[6..7]);
    assert_eq!(s.changes(s.revision().unwrap(), 10).unwrap(), vec![]);
    // Subscribers hear of every commit (for a shared store possibly a little later).
    let last = s.revision().unwrap();
    let mut heard = Vec::new();
    let t = std::time::Instant::now();
    while heard.last() != Some(&last) {
        match sub.try_recv() {
            Ok(rev) => heard.push(rev),
            Err(broadcast::error::TryRecvError::Empty) => {
                assert!(
                    t.elapsed() < std::time::Duration::from_secs(10),
                    "subscriber heard {heard:?}, not {last}"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("subscriber: {e}"),
        }
    }
    assert!(heard.windows(2).all(|w| w[0] < w[1]), "{heard:?}");
    for r in [r1, r2, r3, r4] {
        assert!(heard.contains(&r), "{r} not in {heard:?}");
    }
    assert_eq!(heard.len() as u64, 4 + THREADS * EACH, "{heard:?}");
}

/// `changes` after a compaction: `compact(rev)` must make the history before `rev` unavailable
/// (`RedbStore::compact`, `EtcdStore::compact`). Run on a store that `conformance` may have
/// used.
pub fn conformance_compacted(s: &dyn Store, compact: &dyn Fn(u64)) {
    let mut revs = Vec::new();
    for i in 0..3 {
        let v = format!("v{i}").into_bytes();
        revs.push(
            s.commit(&[], &[Op::Put(Kind::Meta, "compacted".into(), v)])
                .unwrap(),
        );
    }
    let (ra, rb, rc) = (revs[0], revs[1], revs[2]);
    compact(rb);
    match s.changes(ra - 1, 100) {
        Err(StoreError::Compacted(oldest)) => assert_eq!(oldest, rb),
        other => panic!("changes before the compaction: {other:?}"),
    }
    assert!(matches!(
        s.changes(0, 100),
        Err(StoreError::Compacted(o)) if o == rb
    ));
    // From the compaction revision on, the feed is complete.
    let after = s.changes(rb - 1, 100).unwrap();
    assert_eq!(
        after
            .iter()
            .map(|c| (c.rev, c.value.clone()))
            .collect::<Vec<_>>(),
        vec![(rb, Some(b"v1".to_vec())), (rc, Some(b"v2".to_vec()))]
    );
    assert_eq!(s.changes(rc, 100).unwrap(), vec![]);
    // Reads and commits are unaffected.
    assert_eq!(
        s.get(Kind::Meta, "compacted").unwrap(),
        Some(b"v2".to_vec())
    );
    assert!(
        s.commit(&[], &[Op::Delete(Kind::Meta, "compacted".into())])
            .unwrap()
            > rc
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redb_conformance_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.redb");
        let (rev, volumes, disks) = {
            let s = RedbStore::open(&p).unwrap();
            conformance(&s);
            (
                s.revision().unwrap(),
                s.list(Kind::Volume).unwrap(),
                s.list(Kind::Disk).unwrap(),
            )
        };
        // Reopened after drop: the same objects at the same revision, and it moves on.
        let s = RedbStore::open(&p).unwrap();
        assert_eq!(s.revision().unwrap(), rev);
        assert_eq!(s.list(Kind::Volume).unwrap(), volumes);
        assert_eq!(s.list(Kind::Disk).unwrap(), disks);
        assert_eq!(s.get(Kind::Meta, "counter").unwrap(), Some(b"100".to_vec()));
        assert!(
            s.commit(&[], &[Op::Delete(Kind::Node, "n".into())])
                .unwrap()
                > rev
        );
    }

    #[test]
    fn redb_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(&dir.path().join("state.redb")).unwrap();
        conformance_compacted(&s, &|rev| s.compact(rev).unwrap());
    }

    #[test]
    fn redb_keeps_a_bounded_history_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.redb");
        {
            let s = RedbStore::open_with_history(&p, 5).unwrap();
            for i in 0..10u8 {
                s.commit(&[], &[Op::Put(Kind::Volume, format!("v{i}"), vec![i])])
                    .unwrap();
            }
            assert!(matches!(s.changes(4, 100), Err(StoreError::Compacted(6))));
            let c = s.changes(5, 100).unwrap();
            assert_eq!(
                c.iter().map(|c| c.rev).collect::<Vec<_>>(),
                [6, 7, 8, 9, 10]
            );
            assert_eq!(c[0].name, "v5");
        }
        // The log survives a reopen; the window moves on with new commits.
        let s = RedbStore::open_with_history(&p, 5).unwrap();
        assert_eq!(s.changes(5, 100).unwrap().len(), 5);
        s.commit(&[], &[Op::Delete(Kind::Volume, "v0".into())])
            .unwrap();
        assert!(matches!(s.changes(5, 100), Err(StoreError::Compacted(7))));
        let c = s.changes(10, 100).unwrap();
        assert_eq!(
            c,
            vec![Change {
                rev: 11,
                kind: Kind::Volume,
                name: "v0".into(),
                value: None
            }]
        );
    }

    #[test]
    fn a_store_from_before_the_change_log_starts_its_feed_at_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.redb");
        {
            // What an older volume-mgr left: objects and a revision, no change log.
            let db = redb::Database::create(&p).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut t = tx.open_table(OBJECTS).unwrap();
                t.insert("volume/old", b"o".as_slice()).unwrap();
                let mut r = tx.open_table(REVISION).unwrap();
                r.insert("rev", 7).unwrap();
            }
            tx.commit().unwrap();
        }
        let s = RedbStore::open(&p).unwrap();
        assert!(matches!(s.changes(0, 10), Err(StoreError::Compacted(8))));
        assert_eq!(s.changes(7, 10).unwrap(), vec![]);
        let r = s
            .commit(&[], &[Op::Put(Kind::Volume, "new".into(), b"n".to_vec())])
            .unwrap();
        assert_eq!(r, 8);
        assert_eq!(s.changes(7, 10).unwrap().len(), 1);
    }

    #[test]
    fn keys_parse_back_into_kinds() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse_key(&key(k, "a/b:c")), Some((k, "a/b:c")));
        }
        assert_eq!(Kind::parse_key("rev"), None);
        assert_eq!(Kind::parse_key("nokind/x"), None);
    }

    #[test]
    fn a_second_open_of_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.redb");
        let _s = RedbStore::open(&p).unwrap();
        let e = RedbStore::open(&p).err().expect("second open must fail");
        assert!(e.to_string().contains("state.redb"), "{e}");
    }
}
