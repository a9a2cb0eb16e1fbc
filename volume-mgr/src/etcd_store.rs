//! The etcd backend of [`Store`]: every key lives under a prefix (`/fabric/` by default, so
//! several clusters or test runs can share one etcd), `get`/`list` are linearizable range reads,
//! `commit` is one etcd `Txn` (compares = conditions, success = ops plus a put of the prefix's
//! revision key), and revisions are etcd's own. The change feed reads etcd's MVCC history with
//! a watch; `subscribe` follows the revision key with a background watch that reconnects.
//!
//! The trait is synchronous and is called from async handlers: the async client runs on a
//! runtime this store owns, and a call hands it a future and blocks on a channel, so calling
//! from inside any tokio runtime (a worker of a multi-thread runtime, or a current-thread one)
//! is fine. Every call is bounded by the store's timeout: unreachable etcd, a member without a
//! leader (the client requires one) or lost quorum is `StoreError::Backend`, never a hang and
//! never stale data.

use crate::store::{Change, Cond, Kind, Listing, Op, Store, StoreError};
use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KvClient,
    Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::broadcast;

/// The key prefix `volume-mgr --store etcd` uses unless told otherwise.
pub const DEFAULT_PREFIX: &str = "/fabric/";
/// The bound on every etcd call unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Name (within the prefix) of the key every commit writes: its mod revision is the revision
/// of the prefix's last commit, its create revision that of its first.
const REV_KEY: &str = "rev";
/// Big enough for a listing of every object of a kind (10k volumes are a few MB).
const MAX_MESSAGE: usize = 256 << 20;

/// The etcd-backed store. Cheap to share (`Arc`); dropping it stops its runtime (and with it
/// any `Leadership` campaigning through it).
pub struct EtcdStore {
    rt: Option<Runtime>,
    handle: Handle,
    client: Client,
    kv: KvClient,
    prefix: String,
    timeout: Duration,
    commits: broadcast::Sender<u64>,
    /// The recent changes under the prefix, as the long-lived watch of `follow_commits`
    /// delivered them (at commit time): `changes` is served from here when it covers the
    /// range, instead of opening a watch on past revisions (which etcd serves only from its
    /// 100 ms background sync).
    ring: Arc<Mutex<Ring>>,
}

/// Changes with revision in (`from`, `upto`], complete: every commit up to `upto` is in.
#[derive(Default)]
struct Ring {
    from: u64,
    upto: u64,
    changes: std::collections::VecDeque<Change>,
}

/// Changes the ring keeps (whole commits are dropped from the front beyond this).
const RING_MAX: usize = 20_000;

impl Ring {
    fn reset(&mut self, rev: u64) {
        self.changes.clear();
        self.from = rev;
        self.upto = rev;
    }

    /// Drops whole commits from the front until at most `max` changes are kept, or until
    /// nothing at or below `below` is left.
    fn trim(&mut self, max: usize, below: u64) {
        while let Some(front) = self.changes.front() {
            if self.changes.len() <= max && front.rev >= below {
                break;
            }
            let r = front.rev;
            while self.changes.front().is_some_and(|c| c.rev == r) {
                self.changes.pop_front();
            }
            self.from = self.from.max(r);
        }
        if below > 0 {
            self.from = self.from.max(below - 1);
        }
    }

    /// The changes after `since` up to `upto`, cut at a commit boundary after `limit`;
    /// `None` when the ring does not cover `since`..`cur`.
    fn after(&self, since: u64, cur: u64, limit: usize) -> Option<Vec<Change>> {
        if since < self.from || self.upto < cur {
            return None;
        }
        let mut out: Vec<Change> = Vec::new();
        for c in self
            .changes
            .iter()
            .filter(|c| c.rev > since && c.rev <= cur)
        {
            if out.len() >= limit && out.last().is_some_and(|l| l.rev != c.rev) {
                break;
            }
            out.push(c.clone());
        }
        Some(out)
    }
}

pub(crate) fn etcd_err(what: &str, e: etcd_client::Error) -> StoreError {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            StoreError::Backend(format!("etcd {what}: {:?}: {}", s.code(), s.message()))
        }
        e => StoreError::Backend(format!("etcd {what}: {e}")),
    }
}

/// Pause between attempts of a call that failed to reach a member.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Whether a failed call may be sent again: for a read, any unavailability (a member down or
/// without a leader: the client's balancer may pick another); for a write only a failure to
/// connect, when the request cannot have been applied.
fn retryable(e: &etcd_client::Error, write: bool) -> bool {
    match e {
        // 14: gRPC UNAVAILABLE.
        etcd_client::Error::GRpcStatus(s) if s.code() as i32 == 14 => {
            !write || s.message().contains("connect")
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => !write,
        _ => false,
    }
}

/// Calls `f` until it succeeds, fails for good, or `within` (a little less than the call's
/// timeout, so that the last real error is what the caller sees) has passed.
pub(crate) async fn with_retry<T, Fut>(
    within: Duration,
    write: bool,
    mut f: impl FnMut() -> Fut,
) -> Result<T, etcd_client::Error>
where
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + within * 9 / 10;
    loop {
        match f().await {
            Err(e)
                if retryable(&e, write) && tokio::time::Instant::now() + RETRY_PAUSE < deadline =>
            {
                tokio::time::sleep(RETRY_PAUSE).await
            }
            r => return r,
        }
    }
}

/// Runs `f` on `handle` within `timeout` and waits for it from this (any) thread.
pub(crate) fn block_on<T: Send + 'static>(
    handle: &Handle,
    timeout: Duration,
    what: &'static str,
    f: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let r = match tokio::time::timeout(timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Backend(format!(
                "etcd {what}: no answer within {timeout:?}"
            ))),
        };
        let _ = tx.send(r);
    });
    rx.recv()
        .unwrap_or_else(|_| Err(StoreError::Backend("etcd client stopped".into())))
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (`http://host:port`), checks that it answers a
    /// linearizable read within `timeout`, and starts following commits for `subscribe`.
    /// `prefix` (non-empty; `DEFAULT_PREFIX` normally; a '/' is added if it does not end in one)
    /// is put before every key.
    pub fn connect(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
    ) -> Result<EtcdStore, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Backend("no etcd endpoints given".into()));
        }
        if prefix.is_empty() {
            return Err(StoreError::Backend("empty etcd key prefix".into()));
        }
        // Keys are `PREFIX/kind/name`: a prefix without its '/' would also match its siblings'
        // keys (`/fabric` vs `/fabric2/`).
        let prefix = if prefix.ends_with('/') {
            prefix.to_string()
        } else {
            format!("{prefix}/")
        };
        if timeout.is_zero() {
            return Err(StoreError::Backend("etcd timeout must be above 0".into()));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend(format!("etcd client runtime: {e}")))?;
        let handle = rt.handle().clone();
        let opts = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(1), timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let eps = endpoints.to_vec();
        let client = block_on(&handle, timeout, "connect", async move {
            Client::connect(eps, Some(opts))
                .await
                .map_err(|e| etcd_err("connect", e))
        })?;
        let kv = client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let store = EtcdStore {
            rt: Some(rt),
            handle,
            client,
            kv,
            prefix,
            timeout,
            commits: broadcast::channel(crate::store::SUBSCRIBE_CAPACITY).0,
            ring: Arc::new(Mutex::new(Ring::default())),
        };
        let last = store
            .revision()
            .map_err(|e| StoreError::Backend(format!("{e} (endpoints {endpoints:?})")))?;
        store.ring.lock().unwrap().reset(last);
        store.handle.spawn(follow_commits(
            store.client.clone(),
            store.prefix.clone(),
            store.rev_key(),
            store.commits.clone(),
            store.ring.clone(),
            last,
        ));
        Ok(store)
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The bound on each etcd call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Compacts etcd's history (of the whole cluster, not only this prefix) below `rev`:
    /// `changes` from before it then return `Compacted`. Operators normally let etcd's
    /// auto-compaction do this.
    pub fn compact(&self, rev: u64) -> Result<(), StoreError> {
        // What etcd no longer has, this store no longer serves either.
        self.ring.lock().unwrap().trim(RING_MAX, rev);
        let mut kv = self.kv.clone();
        block_on(&self.handle, self.timeout, "compact", async move {
            kv.compact(rev as i64, Some(CompactionOptions::new().with_physical()))
                .await
                .map(|_| ())
                .map_err(|e| etcd_err("compact", e))
        })
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }

    /// The etcd key of a store key.
    pub(crate) fn key(&self, kind: Kind, name: &str) -> String {
        format!("{}{}{}", self.prefix, kind.prefix(), name)
    }

    fn rev_key(&self) -> String {
        format!("{}{REV_KEY}", self.prefix)
    }

    /// `(mod revision, create revision)` of the revision key, `None` before the first commit.
    fn rev_key_revisions(&self) -> Result<Option<(u64, u64)>, StoreError> {
        let kv = self.kv.clone();
        let k = self.rev_key();
        let t = self.timeout;
        block_on(&self.handle, t, "get", async move {
            let r = with_retry(t, false, || {
                let (mut kv, k) = (kv.clone(), k.clone());
                async move { kv.get(k, None).await }
            })
            .await
            .map_err(|e| etcd_err("get", e))?;
            Ok(r.kvs()
                .first()
                .map(|kv| (kv.mod_revision() as u64, kv.create_revision() as u64)))
        })
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Not `drop(rt)`: that blocks, which panics inside an async context.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Follows every change under the prefix with one long-lived watch: each change goes into
/// `ring`, and the revision of every commit (seen as the put of its revision key, the last
/// write of each commit) to `tx`, from `last` on; reconnects after any failure and resumes
/// after the last complete commit.
async fn follow_commits(
    client: Client,
    prefix: String,
    rev_key: String,
    tx: broadcast::Sender<u64>,
    ring: Arc<Mutex<Ring>>,
    mut last: u64,
) {
    loop {
        let mut w = client.watch_client();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(last as i64 + 1);
        // Changes of commits not yet complete (their revision key not seen yet).
        let mut pending: Vec<Change> = Vec::new();
        if let Ok(mut stream) = w.watch(prefix.clone(), Some(opts)).await {
            while let Ok(Some(resp)) = stream.message().await {
                if resp.compact_revision() > 0 {
                    // The revisions in between are gone: go on from the current one (the
                    // receivers re-list when their `changes` call says `Compacted`).
                    let mut kv = client.kv_client();
                    if let Ok(r) = kv.get(rev_key.clone(), None).await {
                        if let Some(kv) = r.kvs().first() {
                            last = last.max(kv.mod_revision() as u64);
                            ring.lock().unwrap().reset(last);
                            let _ = tx.send(last);
                        }
                    }
                    break;
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let rev = kv.mod_revision() as u64;
                    if rev <= last {
                        continue;
                    }
                    if kv.key() == rev_key.as_bytes() {
                        let mut r = ring.lock().unwrap();
                        r.changes.extend(pending.drain(..).filter(|c| c.rev <= rev));
                        r.upto = rev;
                        r.trim(RING_MAX, 0);
                        drop(r);
                        last = rev;
                        let _ = tx.send(rev);
                        continue;
                    }
                    if let Some(c) = change_of(&prefix, ev, rev) {
                        pending.push(c);
                    }
                }
                if resp.canceled() {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The store change an etcd watch event under `prefix` records (None: not an object key, or
/// the election key, which the feed leaves out).
fn change_of(prefix: &str, ev: &etcd_client::Event, rev: u64) -> Option<Change> {
    let kv = ev.kv()?;
    let (kind, name) = kv
        .key()
        .get(prefix.len()..)
        .and_then(|k| std::str::from_utf8(k).ok())
        .and_then(Kind::parse_key)?;
    if kind == Kind::Leader {
        return None;
    }
    Some(Change {
        rev,
        kind,
        name: name.to_string(),
        value: match ev.event_type() {
            EventType::Put => Some(kv.value().to_vec()),
            EventType::Delete => None,
        },
    })
}

impl Store for EtcdStore {
    fn get(&self, kind: Kind, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let kv = self.kv.clone();
        let k = self.key(kind, name);
        let t = self.timeout;
        block_on(&self.handle, t, "get", async move {
            let mut r = with_retry(t, false, || {
                let (mut kv, k) = (kv.clone(), k.clone());
                async move { kv.get(k, None).await }
            })
            .await
            .map_err(|e| etcd_err("get", e))?;
            Ok(r.take_kvs()
                .into_iter()
                .next()
                .map(|kv| kv.into_key_value().1))
        })
    }

    fn list(&self, kind: Kind) -> Result<Listing, StoreError> {
        let kv = self.kv.clone();
        let t = self.timeout;
        let start = self.key(kind, "");
        // Every kind prefix ends in '/': its keys are exactly those in [`kind/`, `kind0`).
        let end = format!("{}0", &start[..start.len() - 1]);
        let rev_key = self.rev_key();
        let skip = start.len();
        block_on(&self.handle, t, "list", async move {
            // Both reads in one read-only transaction: one consistent snapshot.
            let txn = Txn::new().and_then([
                TxnOp::get(start, Some(GetOptions::new().with_range(end))),
                TxnOp::get(rev_key, None),
            ]);
            let r = with_retry(t, false, || {
                let (mut kv, txn) = (kv.clone(), txn.clone());
                async move { kv.txn(txn).await }
            })
            .await
            .map_err(|e| etcd_err("list", e))?;
            let mut items = Vec::new();
            let mut rev = 0;
            for (i, op) in r.op_responses().into_iter().enumerate() {
                let TxnOpResponse::Get(g) = op else {
                    return Err(StoreError::Backend("etcd list: unexpected response".into()));
                };
                if i == 0 {
                    for kv in g.kvs() {
                        let name = std::str::from_utf8(&kv.key()[skip..]).map_err(|_| {
                            StoreError::Backend("etcd list: a key is not UTF-8".into())
                        })?;
                        items.push((name.to_string(), kv.value().to_vec()));
                    }
                } else if let Some(kv) = g.kvs().first() {
                    rev = kv.mod_revision() as u64;
                }
            }
            Ok((rev, items))
        })
    }

    fn commit(&self, conds: &[Cond], ops: &[Op]) -> Result<u64, StoreError> {
        let mut compares = Vec::with_capacity(conds.len());
        let mut cond_keys = Vec::with_capacity(conds.len());
        for Cond::Equals(kind, name, want) in conds {
            let k = self.key(*kind, name);
            compares.push(match want {
                Some(v) => Compare::value(k.clone(), CompareOp::Equal, v.clone()),
                None => Compare::create_revision(k.clone(), CompareOp::Equal, 0),
            });
            cond_keys.push((k, format!("{}{name}", kind.prefix()), want.clone()));
        }
        // etcd refuses a txn that writes one key twice; applied in order, only the last op on
        // a key counts, so keep that one.
        let keyed: Vec<(String, &Op)> = ops
            .iter()
            .map(|op| match op {
                Op::Put(kind, name, _) | Op::Delete(kind, name) => (self.key(*kind, name), op),
            })
            .collect();
        let mut success = Vec::with_capacity(ops.len() + 1);
        for (i, (k, op)) in keyed.iter().enumerate() {
            if keyed[i + 1..].iter().any(|(later, _)| later == k) {
                continue;
            }
            success.push(match op {
                Op::Put(_, _, v) => TxnOp::put(k.clone(), v.clone(), None),
                Op::Delete(..) => TxnOp::delete(k.clone(), None),
            });
        }
        success.push(TxnOp::put(self.rev_key(), Vec::new(), None));
        let failure: Vec<TxnOp> = cond_keys
            .iter()
            .map(|(k, _, _)| TxnOp::get(k.clone(), None))
            .collect();
        let txn = Txn::new().when(compares).and_then(success).or_else(failure);
        let kv = self.kv.clone();
        let t = self.timeout;
        block_on(&self.handle, t, "commit", async move {
            let r = with_retry(t, true, || {
                let (mut kv, txn) = (kv.clone(), txn.clone());
                async move { kv.txn(txn).await }
            })
            .await
            .map_err(|e| etcd_err("commit", e))?;
            if r.succeeded() {
                return r
                    .header()
                    .map(|h| h.revision() as u64)
                    .ok_or_else(|| StoreError::Backend("etcd commit: no header".into()));
            }
            // Name the first condition that failed (the reads ran in the same transaction).
            let mut first = None;
            for ((_, name, want), op) in cond_keys.iter().zip(r.op_responses()) {
                let TxnOpResponse::Get(g) = op else { continue };
                let have = g.kvs().first().map(|kv| kv.value().to_vec());
                if &have != want {
                    first = Some(name.clone());
                    break;
                }
            }
            Err(StoreError::Conflict(first.unwrap_or_else(|| {
                cond_keys.first().map(|c| c.1.clone()).unwrap_or_default()
            })))
        })
    }

    fn revision(&self) -> Result<u64, StoreError> {
        Ok(self.rev_key_revisions()?.map(|r| r.0).unwrap_or(0))
    }

    fn changes(&self, since: u64, limit: usize) -> Result<Vec<Change>, StoreError> {
        let Some((cur, created)) = self.rev_key_revisions()? else {
            return Ok(Vec::new());
        };
        if since >= cur {
            return Ok(Vec::new());
        }
        // From the ring when it covers the range: it lags the commit by one watch
        // notification, so give it a moment before falling back to etcd's history.
        let deadline = std::time::Instant::now() + Duration::from_millis(300);
        loop {
            if let Some(out) = self.ring.lock().unwrap().after(since, cur, limit) {
                return Ok(out);
            }
            if self.ring.lock().unwrap().from > since || std::time::Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // Nothing under the prefix predates its first commit (which created the revision key).
        let start = (since + 1).max(created);
        let w = self.client.watch_client();
        let prefix = self.prefix.clone();
        let rev_key = self.rev_key();
        let t = self.timeout;
        block_on(&self.handle, t, "changes", async move {
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(start as i64);
            let mut stream = with_retry(t, false, || {
                let (mut w, p, o) = (w.clone(), prefix.clone(), opts.clone());
                async move { w.watch(p, Some(o)).await }
            })
            .await
            .map_err(|e| etcd_err("changes", e))?;
            let mut out: Vec<Change> = Vec::new();
            loop {
                let Some(resp) = stream.message().await.map_err(|e| etcd_err("changes", e))? else {
                    return Err(StoreError::Backend("etcd changes: watch ended".into()));
                };
                if resp.compact_revision() > 0 {
                    return Err(StoreError::Compacted(resp.compact_revision() as u64));
                }
                if resp.canceled() {
                    return Err(StoreError::Backend(format!(
                        "etcd changes: watch cancelled: {}",
                        resp.cancel_reason()
                    )));
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let rev = kv.mod_revision() as u64;
                    if rev > cur || (out.len() >= limit && out.last().is_some_and(|c| c.rev != rev))
                    {
                        return Ok(out);
                    }
                    if kv.key() == rev_key.as_bytes() {
                        // The last write of every commit: the commit is complete.
                        if rev == cur {
                            return Ok(out);
                        }
                        continue;
                    }
                    if let Some(c) = change_of(&prefix, ev, rev) {
                        out.push(c);
                    }
                }
            }
        })
    }

    fn subscribe(&self) -> broadcast::Receiver<u64> {
        self.commits.subscribe()
    }
}
