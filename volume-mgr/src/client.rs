//! Client library for the `/v1` API, used by the agents and fabctl. Takes several manager
//! URLs and fails over between them on transport errors.

use crate::api;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The manager answered with an error.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// No manager could be reached.
    #[error("cannot reach volume-mgr at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("unexpected answer from volume-mgr: {0}")]
    Protocol(String),
}

impl ClientError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Api { status: 404, .. })
    }
}

#[derive(Clone)]
pub struct Client {
    urls: Vec<String>,
    http: reqwest::Client,
    /// Sent as `Authorization: Bearer …` when set (see [`Client::with_token`]).
    token: Option<String>,
    /// Whether idle connections are kept (false for [`Client::new_unpooled`]).
    pooled: bool,
    /// The copies the incremental watches keep (shared by clones).
    caches: std::sync::Arc<std::sync::Mutex<Caches>>,
}

/// What [`Client::watch_volumes`] and [`Client::watch_net_state`] last returned: the next call
/// with that revision asks `GET /v1/watch` for the changes since and applies them here,
/// instead of reading the whole state again.
#[derive(Default)]
struct Caches {
    volumes: Option<api::List<api::Volume>>,
    net: Option<api::NetState>,
    /// The manager has no `/v1/watch` (404): whole-state long-polls only.
    no_watch: bool,
}

/// Inserts or replaces `item` (named `name`) in `items`, kept sorted by name as lists are.
fn upsert<T>(items: &mut Vec<T>, name: &str, key: impl Fn(&T) -> &str, item: T) {
    match items.binary_search_by(|x| key(x).cmp(name)) {
        Ok(i) => items[i] = item,
        Err(i) => items.insert(i, item),
    }
}

fn remove<T>(items: &mut Vec<T>, name: &str, key: impl Fn(&T) -> &str) {
    if let Ok(i) = items.binary_search_by(|x| key(x).cmp(name)) {
        items.remove(i);
    }
}

fn apply<T: DeserializeOwned>(
    items: &mut Vec<T>,
    e: &api::WatchEvent,
    key: impl Fn(&T) -> &str,
) -> Result<(), ClientError> {
    if e.deleted {
        remove(items, &e.name, key);
        return Ok(());
    }
    let v = e.object.clone().ok_or_else(|| {
        ClientError::Protocol(format!("watch event for {} without object", e.name))
    })?;
    let item: T = serde_json::from_value(v)
        .map_err(|err| ClientError::Protocol(format!("watch event for {}: {err}", e.name)))?;
    upsert(items, &e.name, key, item);
    Ok(())
}

/// The reqwest client: rustls (ring) for `https://` URLs, trusting the system's roots plus
/// `ca` (PEM) when given.
fn http_client(pooled: bool, ca: Option<&[u8]>) -> Result<reqwest::Client, ClientError> {
    crate::tls::install_provider();
    let mut b = reqwest::Client::builder().connect_timeout(Duration::from_secs(3));
    if !pooled {
        b = b.pool_max_idle_per_host(0);
    }
    if let Some(pem) = ca {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| ClientError::Protocol(format!("CA file: {}", chain(&e))))?;
        if certs.is_empty() {
            return Err(ClientError::Protocol(
                "CA file: no PEM certificate in it".into(),
            ));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build()
        .map_err(|e| ClientError::Protocol(format!("HTTP client: {}", chain(&e))))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Client {
    /// `urls`: one or more `http://host:port` (or `https://`) manager addresses.
    pub fn new(urls: Vec<String>) -> Client {
        Self::build(urls, true)
    }

    /// Like [`new`](Self::new), but every request goes on a fresh connection (none is kept
    /// for reuse). For requests whose timing matters, such as leases: a request that timed out
    /// on a kept connection during a network cut can still reach the manager seconds later
    /// from that connection's send queue (TCP retransmits it after the close); on a fresh
    /// connection the request is only sent once the handshake completed.
    pub fn new_unpooled(urls: Vec<String>) -> Client {
        Self::build(urls, false)
    }

    fn build(urls: Vec<String>, pooled: bool) -> Client {
        Client {
            urls: urls
                .into_iter()
                .map(|u| u.trim_end_matches('/').to_string())
                .collect(),
            http: http_client(pooled, None).expect("HTTP client"),
            token: None,
            pooled,
            caches: Default::default(),
        }
    }

    /// `GET /v1/watch`: the changes of `kinds` (comma-separated) after revision `since`, or none
    /// after `timeout`. 410 (`compacted`): list again.
    pub async fn watch(
        &self,
        kinds: &str,
        since: u64,
        timeout: Duration,
    ) -> Result<api::WatchEvents, ClientError> {
        let path = format!(
            "/v1/watch?since={since}&kinds={kinds}&timeout_ms={}",
            timeout.as_millis()
        );
        self.call::<(), _>(Method::GET, &path, None, timeout + Duration::from_secs(10))
            .await?
            .ok_or_else(|| ClientError::Protocol("empty body".into()))
    }

    /// Runs one incremental step for a cache taken out by `take`: `Ok(Some(events))` to apply,
    /// `Ok(None)` when the whole state must be read (no cache at that revision, history
    /// compacted, or a manager without `/v1/watch`).
    async fn delta(
        &self,
        kinds: &str,
        have: Option<u64>,
        after: u64,
        timeout: Duration,
    ) -> Result<Option<api::WatchEvents>, ClientError> {
        if have != Some(after) || self.caches.lock().unwrap().no_watch {
            return Ok(None);
        }
        match self.watch(kinds, after, timeout).await {
            Ok(ev) => Ok(Some(ev)),
            Err(ClientError::Api { status: 410, .. }) => Ok(None),
            Err(ClientError::Api { status: 404, .. }) => {
                self.caches.lock().unwrap().no_watch = true;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Sends `token` as a bearer token with every request (None: no `Authorization`).
    pub fn with_token(mut self, token: Option<String>) -> Client {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    /// Trusts the PEM certificate(s) in `pem` (a self-signed manager certificate or a private
    /// CA) for `https://` URLs, besides the system's roots.
    pub fn with_ca_pem(mut self, pem: &[u8]) -> Result<Client, ClientError> {
        self.http = http_client(self.pooled, Some(pem))?;
        Ok(self)
    }

    /// An agent's settings: `token` (its `--manager-token`) and `ca` (its `--manager-ca`).
    pub fn with_auth(
        self,
        token: Option<String>,
        ca: Option<&std::path::Path>,
    ) -> Result<Client, ClientError> {
        let c = self.with_token(token);
        match ca {
            Some(p) => c.with_ca_file(p),
            None => Ok(c),
        }
    }

    /// [`with_ca_pem`](Self::with_ca_pem) with the contents of `path`.
    pub fn with_ca_file(self, path: &std::path::Path) -> Result<Client, ClientError> {
        let pem = std::fs::read(path)
            .map_err(|e| ClientError::Protocol(format!("CA file {}: {e}", path.display())))?;
        self.with_ca_pem(&pem)
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<Option<T>, ClientError> {
        let mut last = ClientError::Unreachable {
            url: "(none)".into(),
            reason: "no manager URL configured".into(),
        };
        for url in &self.urls {
            let mut rq = self
                .http
                .request(method.clone(), format!("{url}{path}"))
                .timeout(timeout);
            if let Some(t) = &self.token {
                rq = rq.bearer_auth(t);
            }
            if let Some(b) = body {
                rq = rq.json(b);
            }
            let resp = match rq.send().await {
                Ok(r) => r,
                Err(e) => {
                    last = ClientError::Unreachable {
                        url: url.clone(),
                        reason: chain(&e),
                    };
                    continue;
                }
            };
            let status = resp.status();
            let bytes = resp.bytes().await.map_err(|e| ClientError::Unreachable {
                url: url.clone(),
                reason: chain(&e),
            })?;
            if status == StatusCode::SERVICE_UNAVAILABLE && self.urls.len() > 1 {
                last = api_error(status, &bytes);
                continue;
            }
            if !status.is_success() {
                return Err(api_error(status, &bytes));
            }
            if status == StatusCode::NO_CONTENT || bytes.is_empty() {
                return Ok(None);
            }
            return serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ClientError::Protocol(e.to_string()));
        }
        Err(last)
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None, Duration::from_secs(10))
            .await?
            .ok_or_else(|| ClientError::Protocol("empty body".into()))
    }

    pub async fn cluster(&self) -> Result<api::ClusterInfo, ClientError> {
        self.get("/v1/cluster").await
    }

    pub async fn register_node(
        &self,
        name: &str,
        req: &api::RegisterNode,
    ) -> Result<api::Node, ClientError> {
        self.call(
            Method::PUT,
            &format!("/v1/nodes/{}", seg(name)),
            Some(req),
            Duration::from_secs(10),
        )
        .await?
        .ok_or_else(|| ClientError::Protocol("empty body".into()))
    }

    pub async fn heartbeat(&self, name: &str, hb: &api::Heartbeat) -> Result<(), ClientError> {
        self.call::<_, serde_json::Value>(
            Method::PUT,
            &format!("/v1/nodes/{}/heartbeat", seg(name)),
            Some(hb),
            Duration::from_secs(5),
        )
        .await
        .map(|_| ())
    }

    pub async fn list_nodes(&self) -> Result<api::List<api::Node>, ClientError> {
        self.get("/v1/nodes").await
    }

    pub async fn get_node(&self, name: &str) -> Result<api::Node, ClientError> {
        self.get(&format!("/v1/nodes/{}", seg(name))).await
    }

    /// Marks a node draining; answers the volumes that still have replicas on it.
    pub async fn drain_node(&self, name: &str) -> Result<api::NodeDrain, ClientError> {
        self.send(
            Method::POST,
            &format!("/v1/nodes/{}/drain", seg(name)),
            &serde_json::json!({}),
        )
        .await
    }

    /// Removes a node's record (409 while it still holds replicas).
    pub async fn remove_node(&self, name: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/nodes/{}", seg(name))).await
    }

    pub async fn list_disks(&self) -> Result<api::List<api::Disk>, ClientError> {
        self.get("/v1/disks").await
    }

    pub async fn create_volume(&self, req: &api::CreateVolume) -> Result<api::Volume, ClientError> {
        self.call(
            Method::POST,
            "/v1/volumes",
            Some(req),
            Duration::from_secs(30),
        )
        .await?
        .ok_or_else(|| ClientError::Protocol("empty body".into()))
    }

    pub async fn list_volumes(&self) -> Result<api::List<api::Volume>, ClientError> {
        self.get("/v1/volumes").await
    }

    /// Long-poll: answers once the volume list changed after `after_revision`, or after
    /// `timeout` with the current list.
    pub async fn watch_volumes(
        &self,
        after_revision: u64,
        timeout: Duration,
    ) -> Result<api::List<api::Volume>, ClientError> {
        let have = self
            .caches
            .lock()
            .unwrap()
            .volumes
            .as_ref()
            .map(|l| l.revision);
        if let Some(ev) = self.delta("volume", have, after_revision, timeout).await? {
            let mut c = self.caches.lock().unwrap();
            if let Some(list) = c.volumes.as_mut().filter(|l| l.revision == after_revision) {
                for e in &ev.events {
                    apply(&mut list.items, e, |v: &api::Volume| v.name.as_str())?;
                }
                list.revision = ev.revision;
                return Ok(list.clone());
            }
        }
        let list = self.watch_volumes_whole(after_revision, timeout).await?;
        self.caches.lock().unwrap().volumes = Some(list.clone());
        Ok(list)
    }

    async fn watch_volumes_whole(
        &self,
        after_revision: u64,
        timeout: Duration,
    ) -> Result<api::List<api::Volume>, ClientError> {
        let path = format!(
            "/v1/volumes?after_revision={after_revision}&timeout_ms={}",
            timeout.as_millis()
        );
        self.call::<(), _>(Method::GET, &path, None, timeout + Duration::from_secs(10))
            .await?
            .ok_or_else(|| ClientError::Protocol("empty body".into()))
    }

    pub async fn get_volume(&self, name: &str) -> Result<api::Volume, ClientError> {
        self.get(&format!("/v1/volumes/{}", seg(name))).await
    }

    /// Takes (or keeps) the volume's writer lease for `node`.
    pub async fn acquire_lease(&self, volume: &str, node: &str) -> Result<api::Lease, ClientError> {
        let req = api::LeaseRequest {
            node: node.to_string(),
        };
        self.call(
            Method::POST,
            &format!("/v1/volumes/{}/lease", seg(volume)),
            Some(&req),
            Duration::from_secs(10),
        )
        .await?
        .ok_or_else(|| ClientError::Protocol("empty body".into()))
    }

    /// Records replicas of a volume in or out of service (the lease holder only).
    pub async fn update_replicas(
        &self,
        volume: &str,
        req: &api::ReplicaUpdate,
    ) -> Result<api::Volume, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/volumes/{}/replicas", seg(volume)),
            Some(req),
            Duration::from_secs(10),
        )
        .await?
        .ok_or_else(|| ClientError::Protocol("empty body".into()))
    }

    /// Redundancy and re-replication state (`GET /v1/recovery`).
    pub async fn recovery(&self) -> Result<api::Recovery, ClientError> {
        self.get("/v1/recovery").await
    }

    /// Reports this node's copy counters (bytes copied since the daemon started, in all
    /// and per volume).
    pub async fn report_recovery(
        &self,
        node: &str,
        progress: &api::RecoveryProgress,
    ) -> Result<(), ClientError> {
        self.call::<_, serde_json::Value>(
            Method::PUT,
            &format!("/v1/recovery/progress/{}", seg(node)),
            Some(progress),
            Duration::from_secs(5),
        )
        .await
        .map(|_| ())
    }

    /// Every volume's lease.
    pub async fn list_leases(&self) -> Result<api::List<api::Lease>, ClientError> {
        self.get("/v1/leases").await
    }

    pub async fn get_lease(&self, volume: &str) -> Result<api::Lease, ClientError> {
        self.get(&format!("/v1/volumes/{}/lease", seg(volume)))
            .await
    }

    pub async fn delete_volume(&self, name: &str) -> Result<(), ClientError> {
        self.call::<(), serde_json::Value>(
            Method::DELETE,
            &format!("/v1/volumes/{}", seg(name)),
            None,
            Duration::from_secs(30),
        )
        .await
        .map(|_| ())
    }

    async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(method, path, Some(body), Duration::from_secs(10))
            .await?
            .ok_or_else(|| ClientError::Protocol("empty body".into()))
    }

    async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.call::<(), serde_json::Value>(Method::DELETE, path, None, Duration::from_secs(10))
            .await
            .map(|_| ())
    }

    /// `PATCH /v1/volumes/{name}`.
    pub async fn update_volume(
        &self,
        name: &str,
        req: &api::UpdateVolume,
    ) -> Result<api::Volume, ClientError> {
        self.send(Method::PATCH, &format!("/v1/volumes/{}", seg(name)), req)
            .await
    }

    /// `PATCH /v1/networks/{name}`.
    pub async fn update_network(
        &self,
        name: &str,
        req: &api::UpdateNetwork,
    ) -> Result<api::Network, ClientError> {
        self.send(Method::PATCH, &format!("/v1/networks/{}", seg(name)), req)
            .await
    }

    // ---- backup and restore ----

    /// The whole cluster state at one revision.
    pub async fn backup(&self) -> Result<api::Backup, ClientError> {
        self.call::<(), api::Backup>(Method::GET, "/v1/backup", None, Duration::from_secs(300))
            .await?
            .ok_or_else(|| ClientError::Protocol("empty body".into()))
    }

    /// Writes a backup into the cluster (`force`: replace existing state).
    pub async fn restore(
        &self,
        b: &api::Backup,
        force: bool,
    ) -> Result<api::RestoreReport, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/restore?force={force}"),
            Some(b),
            Duration::from_secs(300),
        )
        .await?
        .ok_or_else(|| ClientError::Protocol("empty body".into()))
    }

    // ---- overlay networks (vswitch) ----

    pub async fn create_network(
        &self,
        req: &api::CreateNetwork,
    ) -> Result<api::Network, ClientError> {
        self.send(Method::POST, "/v1/networks", req).await
    }

    pub async fn list_networks(&self) -> Result<api::List<api::Network>, ClientError> {
        self.get("/v1/networks").await
    }

    pub async fn get_network(&self, name: &str) -> Result<api::Network, ClientError> {
        self.get(&format!("/v1/networks/{}", seg(name))).await
    }

    /// Refused (409 `in_use`) while the network has ports.
    pub async fn delete_network(&self, name: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/networks/{}", seg(name))).await
    }

    /// Creates a port; MAC and IP are allocated when not given.
    pub async fn create_port(&self, req: &api::CreatePort) -> Result<api::Port, ClientError> {
        self.send(Method::POST, "/v1/ports", req).await
    }

    /// Ports, optionally only those of one network and/or one node, with their counters.
    pub async fn list_ports(
        &self,
        network: Option<&str>,
        node: Option<&str>,
    ) -> Result<api::List<api::Port>, ClientError> {
        let mut q = Vec::new();
        if let Some(n) = network {
            q.push(format!("network={}", seg(n)));
        }
        if let Some(n) = node {
            q.push(format!("node={}", seg(n)));
        }
        let path = if q.is_empty() {
            "/v1/ports".to_string()
        } else {
            format!("/v1/ports?{}", q.join("&"))
        };
        self.get(&path).await
    }

    /// One port with the counters its vswitch last reported (`stats`, if any).
    pub async fn get_port(&self, name: &str) -> Result<api::Port, ClientError> {
        self.get(&format!("/v1/ports/{}", seg(name))).await
    }

    pub async fn delete_port(&self, name: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/ports/{}", seg(name))).await
    }

    /// Moves a port to another node's vswitch (`PUT /v1/ports/{name}/node`); answers the port.
    /// Moving it to the node it is on changes nothing.
    pub async fn move_port(&self, name: &str, node: &str) -> Result<api::Port, ClientError> {
        self.send(
            Method::PUT,
            &format!("/v1/ports/{}/node", seg(name)),
            &api::MovePort { node: node.into() },
        )
        .await
    }

    /// A vswitch registers (or re-registers) its VTEP.
    pub async fn register_switch(
        &self,
        node: &str,
        req: &api::RegisterSwitch,
    ) -> Result<api::Switch, ClientError> {
        self.send(Method::PUT, &format!("/v1/switches/{}", seg(node)), req)
            .await
    }

    /// Liveness plus port counters; 404 (`is_not_found`) if the switch is not registered.
    pub async fn switch_heartbeat(
        &self,
        node: &str,
        hb: &api::SwitchHeartbeat,
    ) -> Result<(), ClientError> {
        self.call::<_, serde_json::Value>(
            Method::PUT,
            &format!("/v1/switches/{}/heartbeat", seg(node)),
            Some(hb),
            Duration::from_secs(5),
        )
        .await
        .map(|_| ())
    }

    pub async fn list_switches(&self) -> Result<api::List<api::Switch>, ClientError> {
        self.get("/v1/switches").await
    }

    /// Networks, ports and switches at one revision.
    pub async fn net_state(&self) -> Result<api::NetState, ClientError> {
        self.get("/v1/netstate").await
    }

    /// Long-poll: answers once networks, ports or switches (including a switch recorded up or
    /// down) changed after `after_revision`, or after `timeout` with the current state.
    pub async fn watch_net_state(
        &self,
        after_revision: u64,
        timeout: Duration,
    ) -> Result<api::NetState, ClientError> {
        let have = self.caches.lock().unwrap().net.as_ref().map(|n| n.revision);
        if let Some(ev) = self
            .delta("network,port,switch", have, after_revision, timeout)
            .await?
        {
            let mut c = self.caches.lock().unwrap();
            if let Some(n) = c.net.as_mut().filter(|n| n.revision == after_revision) {
                for e in &ev.events {
                    match e.kind.as_str() {
                        "network" => apply(&mut n.networks, e, |x: &api::Network| x.name.as_str())?,
                        "port" => apply(&mut n.ports, e, |x: &api::Port| x.name.as_str())?,
                        "switch" => apply(&mut n.switches, e, |x: &api::Switch| x.node.as_str())?,
                        _ => {}
                    }
                }
                n.revision = ev.revision;
                return Ok(n.clone());
            }
        }
        let n = self.watch_net_state_whole(after_revision, timeout).await?;
        self.caches.lock().unwrap().net = Some(n.clone());
        Ok(n)
    }

    async fn watch_net_state_whole(
        &self,
        after_revision: u64,
        timeout: Duration,
    ) -> Result<api::NetState, ClientError> {
        let path = format!(
            "/v1/netstate?after_revision={after_revision}&timeout_ms={}",
            timeout.as_millis()
        );
        self.call::<(), _>(Method::GET, &path, None, timeout + Duration::from_secs(10))
            .await?
            .ok_or_else(|| ClientError::Protocol("empty body".into()))
    }

    // ---- load-balanced VIPs (lb-vip) ----

    /// Creates a VIP (every default filled in the answer).
    pub async fn create_vip(&self, req: &api::CreateVip) -> Result<api::Vip, ClientError> {
        self.send(Method::POST, "/v1/vips", req).await
    }

    /// Every VIP with its backends and the instances' fresh reports.
    pub async fn list_vips(&self) -> Result<api::List<api::Vip>, ClientError> {
        self.get("/v1/vips").await
    }

    /// Long-poll: answers once a VIP or a backend changed after `after_revision`, or after
    /// `timeout` with the current list. Reports do not wake it.
    pub async fn watch_vips(
        &self,
        after_revision: u64,
        timeout: Duration,
    ) -> Result<api::List<api::Vip>, ClientError> {
        let path = format!(
            "/v1/vips?after_revision={after_revision}&timeout_ms={}",
            timeout.as_millis()
        );
        self.call::<(), _>(Method::GET, &path, None, timeout + Duration::from_secs(10))
            .await?
            .ok_or_else(|| ClientError::Protocol("empty body".into()))
    }

    pub async fn get_vip(&self, name: &str) -> Result<api::Vip, ClientError> {
        self.get(&format!("/v1/vips/{}", seg(name))).await
    }

    pub async fn delete_vip(&self, name: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/vips/{}", seg(name))).await
    }

    /// Adds a backend (409 `already_exists` if the VIP has it); answers the VIP.
    pub async fn add_backend(
        &self,
        vip: &str,
        req: &api::AddBackend,
    ) -> Result<api::Vip, ClientError> {
        self.send(
            Method::POST,
            &format!("/v1/vips/{}/backends", seg(vip)),
            req,
        )
        .await
    }

    /// Removes a backend (its established connections drain for the VIP's `drain_secs`);
    /// answers the VIP.
    pub async fn remove_backend(&self, vip: &str, addr: &str) -> Result<api::Vip, ClientError> {
        self.call::<(), _>(
            Method::DELETE,
            &format!("/v1/vips/{}/backends/{}", seg(vip), seg(addr)),
            None,
            Duration::from_secs(10),
        )
        .await?
        .ok_or_else(|| ClientError::Protocol("empty body".into()))
    }

    /// Sets a backend draining (no new connections); answers the VIP. Draining a draining
    /// backend changes nothing.
    pub async fn drain_backend(&self, vip: &str, addr: &str) -> Result<api::Vip, ClientError> {
        self.call::<(), _>(
            Method::POST,
            &format!("/v1/vips/{}/backends/{}/drain", seg(vip), seg(addr)),
            None,
            Duration::from_secs(10),
        )
        .await?
        .ok_or_else(|| ClientError::Protocol("empty body".into()))
    }

    /// The lb-vip instance on `node` reports what it sees of a VIP (memory only on the
    /// manager); 404 (`is_not_found`) once the VIP is deleted.
    pub async fn report_vip(
        &self,
        vip: &str,
        node: &str,
        report: &api::VipReport,
    ) -> Result<(), ClientError> {
        self.call::<_, serde_json::Value>(
            Method::PUT,
            &format!("/v1/vips/{}/status/{}", seg(vip), seg(node)),
            Some(report),
            Duration::from_secs(5),
        )
        .await
        .map(|_| ())
    }

    /// Asks for (or renews) the holder lease of VIP `vip` for `req.node`: the lease, or
    /// `Api { status: 409, code: "held", .. }` naming the holder. The request gives up after
    /// half the ttl (at least 200 ms, at most 10 s), so a caller renewing every third of the
    /// ttl learns of an unreachable manager before its lease runs out.
    pub async fn acquire_vip_lease(
        &self,
        vip: &str,
        req: &api::VipLeaseRequest,
    ) -> Result<api::VipLease, ClientError> {
        let timeout = Duration::from_millis((req.ttl_ms / 2).clamp(200, 10_000));
        self.call(
            Method::POST,
            &format!("/v1/vips/{}/lease", seg(vip)),
            Some(req),
            timeout,
        )
        .await?
        .ok_or_else(|| ClientError::Protocol("empty body".into()))
    }

    /// Gives up `node`'s lease of VIP `vip` (nothing happens when nobody holds it; 409 `held`
    /// when another node does).
    pub async fn release_vip_lease(&self, vip: &str, node: &str) -> Result<(), ClientError> {
        self.call::<(), serde_json::Value>(
            Method::DELETE,
            &format!("/v1/vips/{}/lease?node={}", seg(vip), seg(node)),
            None,
            Duration::from_secs(5),
        )
        .await
        .map(|_| ())
    }
}

/// Percent-encodes one path segment, so that any name reaches the server as typed (and gets
/// its validation answer) instead of being taken for another route.
fn seg(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    // `.` and `..` would still be taken as path steps (even escaped, per the URL standard);
    // no valid name starts with a dot, and the server answers those with a 404 `not_found`.
    out
}

fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<api::ApiError>(body) {
        Ok(e) => ClientError::Api {
            status: status.as_u16(),
            code: e.code,
            message: e.message,
        },
        Err(_) => ClientError::Api {
            status: status.as_u16(),
            code: "http".into(),
            message: String::from_utf8_lossy(body)
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(super::seg("vm1-disk.0_a"), "vm1-disk.0_a");
        assert_eq!(super::seg("a/b c?d"), "a%2Fb%20c%3Fd");
        assert_eq!(super::seg("é"), "%C3%A9");
    }
}
