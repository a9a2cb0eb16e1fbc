//! Leader election for the controllers (placement, re-replication, lease issuing) when several
//! volume-mgr instances share one etcd store.
//!
//! A candidate grants itself an etcd lease (TTL `ttl`, 3 s by default), then tries to create
//! the election key (`Kind::Leader`/`controller` under the store's prefix) with that lease in a
//! compare-and-swap (create revision 0). Whoever creates it leads and renews the lease every
//! `ttl / 4`; the others watch the key and try again when it is deleted (the leader resigned,
//! or stopped renewing and its lease expired: takeover within about `ttl` plus a round trip).
//!
//! Fencing, two layers:
//! - in time: a leader counts itself leader only until `last renewal sent + ttl - ttl / 4`
//!   (local monotonic clock), so it stops before etcd can expire its lease and elect another,
//!   like lb-vip's VIP lease. [`Leadership::is_leader`] checks that deadline on every call.
//! - in the store: the key's value is unique to the term (lease id + identity), and
//!   [`Leadership::fence`] returns a [`Cond`] on it. Every controller write adds those conds to
//!   its `commit`; a deposed leader's commit, however late it reaches etcd, then fails with
//!   `StoreError::Conflict("leader/controller")` instead of applying.
//!
//! With the embedded store there is one manager: [`Leadership::embedded`] always leads and its
//! fence is empty.

use crate::etcd_store::{etcd_err, EtcdStore};
use crate::store::{Cond, Kind, StoreError};
use etcd_client::{Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, TxnOpResponse};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// Name of the election key (in `Kind::Leader`).
pub const ELECTION: &str = "controller";
/// Lease TTL `volume-mgr` uses unless told otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3);

/// A manager's handle on the election. Dropping it resigns (revokes the lease, so another
/// manager takes over at once).
pub struct Leadership {
    id: String,
    shared: Arc<Shared>,
    rx: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
}

struct Shared {
    state: Mutex<State>,
    tx: watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    /// The embedded store: the only manager, always leader.
    always: bool,
    /// Our value of the election key while we hold it.
    token: Option<Vec<u8>>,
    /// Until when we may act as leader (local monotonic time).
    valid_until: Option<Instant>,
    /// The identity of the leader as last seen.
    leader: Option<String>,
}

impl State {
    fn leading(&self, now: Instant) -> bool {
        self.always || (self.token.is_some() && self.valid_until.is_some_and(|t| now < t))
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes `leading()` on the watch channel if it changed.
    fn publish(&self) {
        let now = self.lock().leading(Instant::now());
        self.tx
            .send_if_modified(|v| std::mem::replace(v, now) != now);
    }

    fn set(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.publish();
    }
}

fn token_leader(v: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(v).ok()?;
    s.split_once(' ').map(|(_, id)| id.to_string())
}

impl Leadership {
    /// The only manager of an embedded store: leader from the start, for good.
    pub fn embedded(id: &str) -> Leadership {
        let (tx, rx) = watch::channel(true);
        Leadership {
            id: id.to_string(),
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    always: true,
                    leader: Some(id.to_string()),
                    ..State::default()
                }),
                tx,
            }),
            rx,
            stop: None,
        }
    }

    /// Starts campaigning through `store` as `id` (what followers see from `leader()`, e.g.
    /// this manager's API URL) with a lease of `ttl` (whole seconds, at least 2 s). Returns at
    /// once; watch `watch()` or poll `is_leader()`. The campaign runs on the store's runtime:
    /// dropping the store ends it like a crash (no resignation; the lease expires).
    pub fn etcd(store: &EtcdStore, id: &str, ttl: Duration) -> Result<Leadership, StoreError> {
        if ttl < Duration::from_secs(2) || ttl.subsec_nanos() != 0 {
            return Err(StoreError::Backend(format!(
                "leader lease ttl {ttl:?}: whole seconds, at least 2"
            )));
        }
        if id.is_empty() || id.contains('\n') {
            return Err(StoreError::Backend(format!(
                "leader id {id:?}: non-empty, one line"
            )));
        }
        let (tx, rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            tx,
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let c = Campaign {
            client: store.client(),
            key: store.key(Kind::Leader, ELECTION),
            id: id.to_string(),
            ttl,
            timeout: store.timeout(),
            shared: shared.clone(),
        };
        store.handle().spawn(c.run(stop_rx));
        // Publishes the end of a term when its deadline passes, even while a renewal hangs.
        let s = shared.clone();
        store.handle().spawn(async move {
            // Until the handle and the campaign are gone.
            while Arc::strong_count(&s) > 1 {
                s.publish();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Ok(Leadership {
            id: id.to_string(),
            shared,
            rx,
            stop: Some(stop_tx),
        })
    }

    /// This manager's identity.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether this manager leads now (checked against the local deadline on every call).
    pub fn is_leader(&self) -> bool {
        self.shared.lock().leading(Instant::now())
    }

    /// A receiver of `is_leader` changes (sent within about 50 ms of a change).
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.rx.clone()
    }

    /// The identity of the current leader as last seen (`None`: none known, e.g. between a
    /// leader's end and the next one's start).
    pub fn leader(&self) -> Option<String> {
        let st = self.shared.lock();
        if st.leading(Instant::now()) {
            Some(self.id.clone())
        } else {
            st.leader.clone()
        }
    }

    /// The conditions a leader-only write must carry: `None` if this manager does not lead
    /// now; `Some(conds)` to add to the write's `commit` conditions otherwise (empty for the
    /// embedded store). A commit with them applies only while this term holds the election
    /// key: after the term ends it fails with `StoreError::Conflict`.
    pub fn fence(&self) -> Option<Vec<Cond>> {
        let st = self.shared.lock();
        if !st.leading(Instant::now()) {
            return None;
        }
        Some(match &st.token {
            Some(t) => vec![Cond::Equals(
                Kind::Leader,
                ELECTION.to_string(),
                Some(t.clone()),
            )],
            None => Vec::new(),
        })
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.shared.set(|st| {
            st.token = None;
            st.valid_until = None;
        });
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

struct Campaign {
    client: Client,
    key: String,
    id: String,
    ttl: Duration,
    timeout: Duration,
    shared: Arc<Shared>,
}

enum Ended {
    Stopped,
    Retry,
}

impl Campaign {
    async fn run(self, mut stop: oneshot::Receiver<()>) {
        loop {
            let r = tokio::select! {
                _ = &mut stop => Ended::Stopped,
                r = self.round() => r,
            };
            match r {
                Ended::Stopped => break,
                Ended::Retry => {
                    tokio::select! {
                        _ = &mut stop => break,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
        }
        self.shared.set(|st| {
            st.token = None;
            st.valid_until = None;
        });
    }

    /// One attempt: lead until the term ends, or follow until the key goes away.
    /// Dropped (cancelled) when the handle is dropped; a term's lease is revoked in `lead`.
    async fn round(&self) -> Ended {
        let t = self.timeout;
        let mut lease = self.client.lease_client();
        let granted_at = Instant::now();
        let Ok(Ok(g)) = tokio::time::timeout(t, lease.grant(self.ttl.as_secs() as i64, None)).await
        else {
            return Ended::Retry;
        };
        let lease_id = g.id();
        let ttl = self.ttl.min(Duration::from_secs(g.ttl().max(1) as u64));
        let token = format!("{lease_id:016x} {}", self.id).into_bytes();
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                self.key.clone(),
                token.clone(),
                Some(PutOptions::new().with_lease(lease_id)),
            )])
            .or_else([TxnOp::get(self.key.clone(), None)]);
        let mut kv = self.client.kv_client();
        let r = match tokio::time::timeout(t, kv.txn(txn)).await {
            Ok(Ok(r)) => r,
            _ => {
                self.revoke(lease_id).await;
                return Ended::Retry;
            }
        };
        if r.succeeded() {
            return self.lead(lease_id, ttl, token, granted_at).await;
        }
        // Someone else leads: we do not need our lease.
        self.revoke(lease_id).await;
        let from = r.header().map(|h| h.revision()).unwrap_or(0) + 1;
        for op in r.op_responses() {
            if let TxnOpResponse::Get(g) = op {
                let leader = g.kvs().first().and_then(|kv| token_leader(kv.value()));
                if leader.is_none() {
                    // Deleted between compare and read cannot happen (one txn); be safe.
                    return Ended::Retry;
                }
                self.shared.set(|st| st.leader = leader);
            }
        }
        // Follow until the key is deleted (resignation or lease expiry).
        let mut w = self.client.watch_client();
        let opts = etcd_client::WatchOptions::new().with_start_revision(from);
        let Ok(mut stream) = w.watch(self.key.clone(), Some(opts)).await else {
            return Ended::Retry;
        };
        while let Ok(Some(resp)) = stream.message().await {
            if resp.canceled() || resp.compact_revision() > 0 {
                return Ended::Retry;
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                match ev.event_type() {
                    EventType::Delete => {
                        self.shared.set(|st| st.leader = None);
                        return Ended::Retry;
                    }
                    EventType::Put => {
                        let l = token_leader(kv.value());
                        self.shared.set(|st| st.leader = l);
                    }
                }
            }
        }
        Ended::Retry
    }

    /// Holds the term: renews the lease every `ttl / 4`; the term counts until the last
    /// renewal's send time + `ttl - ttl / 4`. Ends when etcd says the lease is gone (then the
    /// key is gone too), or is cancelled by the handle's drop (then the lease is revoked).
    async fn lead(
        &self,
        lease_id: i64,
        ttl: Duration,
        token: Vec<u8>,
        granted_at: Instant,
    ) -> Ended {
        let margin = ttl / 4;
        self.shared.set(|st| {
            st.token = Some(token);
            st.valid_until = Some(granted_at + ttl - margin);
            st.leader = Some(self.id.clone());
        });
        tracing::info!(id = %self.id, lease = lease_id, "leading");
        // Revokes the lease if this future is dropped (the handle resigned).
        struct Resign {
            client: Client,
            lease_id: i64,
            timeout: Duration,
            armed: bool,
        }
        impl Drop for Resign {
            fn drop(&mut self) {
                // Not when the runtime is going away (the store was dropped: like a crash).
                if let (true, Ok(rt)) = (self.armed, tokio::runtime::Handle::try_current()) {
                    let mut l = self.client.lease_client();
                    let (id, t) = (self.lease_id, self.timeout);
                    rt.spawn(async move {
                        let _ = tokio::time::timeout(t, l.revoke(id)).await;
                    });
                }
            }
        }
        let mut resign = Resign {
            client: self.client.clone(),
            lease_id,
            timeout: self.timeout,
            armed: true,
        };
        let mut lease = self.client.lease_client();
        let every = ttl / 4;
        let mut next = granted_at + every;
        loop {
            tokio::time::sleep_until(next).await;
            let sent = Instant::now();
            next = sent + every;
            match tokio::time::timeout(self.timeout, lease.keep_alive(lease_id)).await {
                Ok(Ok(_)) => self
                    .shared
                    .set(|st| st.valid_until = Some(sent + ttl - margin)),
                Ok(Err(e)) if e.to_string().contains("lease not found") => {
                    tracing::warn!(id = %self.id, lease = lease_id, "leader lease expired");
                    resign.armed = false;
                    self.shared.set(|st| {
                        st.token = None;
                        st.valid_until = None;
                        st.leader = None;
                    });
                    return Ended::Retry;
                }
                // Unreachable or slow etcd: keep trying; the deadline fences us meanwhile.
                Ok(Err(e)) => {
                    tracing::debug!(error = %etcd_err("keep-alive", e), "leader lease renewal failed")
                }
                Err(_) => tracing::debug!("leader lease renewal timed out"),
            }
        }
    }

    async fn revoke(&self, lease_id: i64) {
        let mut l = self.client.lease_client();
        let _ = tokio::time::timeout(self.timeout, l.revoke(lease_id)).await;
    }
}
