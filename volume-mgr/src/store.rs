//! The control-plane store: a small key/value trait with atomic, conditional batches and a
//! revision that every commit bumps (what watches follow). `RedbStore` is the embedded,
//! crash-safe default (each commit is fsynced before it returns); an etcd backend can
//! implement the same trait and run the same conformance suite (`conformance`).

use std::path::Path;

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
}

impl Kind {
    fn prefix(self) -> &'static str {
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
        }
    }
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
/// - kinds are separate namespaces.
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
}

const OBJECTS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("objects");
const REVISION: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("revision");

/// The embedded store: one redb file.
pub struct RedbStore {
    db: redb::Database,
}

fn be<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn key(kind: Kind, name: &str) -> String {
    format!("{}{}", kind.prefix(), name)
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let db = redb::Database::create(path)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(be)?;
        {
            tx.open_table(OBJECTS).map_err(be)?;
            tx.open_table(REVISION).map_err(be)?;
        }
        tx.commit().map_err(be)?;
        Ok(RedbStore { db })
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
            for op in ops {
                match op {
                    Op::Put(kind, name, v) => {
                        t.insert(key(*kind, name).as_str(), v.as_slice())
                            .map_err(be)?;
                    }
                    Op::Delete(kind, name) => {
                        t.remove(key(*kind, name).as_str()).map_err(be)?;
                    }
                }
            }
            let mut r = tx.open_table(REVISION).map_err(be)?;
            let cur = r.get("rev").map_err(be)?.map(|v| v.value()).unwrap_or(0);
            rev = cur + 1;
            r.insert("rev", rev).map_err(be)?;
        }
        tx.commit().map_err(be)?;
        Ok(rev)
    }

    fn revision(&self) -> Result<u64, StoreError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read().map_err(be)?;
        let r = tx.open_table(REVISION).map_err(be)?;
        Ok(r.get("rev").map_err(be)?.map(|v| v.value()).unwrap_or(0))
    }
}

/// The behaviour every `Store` must have; each backend runs it from its tests on a fresh,
/// empty store (see the contract on [`Store`]).
pub fn conformance(s: &dyn Store) {
    let r0 = s.revision().unwrap();
    for kind in [
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
    ] {
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
    fn a_second_open_of_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.redb");
        let _s = RedbStore::open(&p).unwrap();
        let e = RedbStore::open(&p).err().expect("second open must fail");
        assert!(e.to_string().contains("state.redb"), "{e}");
    }
}
