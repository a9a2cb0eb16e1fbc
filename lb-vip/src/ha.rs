//! VIP high availability (`--vip-interface IF`): a VIP may run on lb-vip on several hosts, and
//! exactly one serves it — the holder of its lease in volume-mgr
//! (`POST /v1/vips/{name}/lease`). Every [`RENEW_EVERY`] each instance asks for the lease
//! (ttl [`LEASE_TTL`]); the holder adds the VIP's address to IF (`ip addr add IP/32 dev IF`),
//! binds the VIP's socket and announces the address by gratuitous ARP.
//!
//! Fencing is by time: a grant answering a request sent at `t` (this host's monotonic clock)
//! lets the instance serve until `t + ttl - margin` ([`FENCE_MARGIN`]); the manager, which
//! judges expiry by its own clock from when it handled the request (after `t`), gives the
//! lease to another node no earlier than `t + ttl`. An instance that has not renewed by its
//! deadline — manager unreachable, answers too slow, or the lease refused — closes the socket
//! and removes the address at once, so at most one host has the address at any time as long
//! as the two clocks run at about the same rate (the margin absorbs the difference).
//!
//! Gratuitous ARP: busybox `arping -U -c 2 -I IF IP` (busybox-static is installed on the
//! hosts), run in the background. Chosen over an AF_PACKET socket of our own because lb-vip
//! has no libc binding to open one with, and the address change itself already goes through
//! iproute2; the announcement is a best effort either way (a failure is logged, and the
//! neighbours learn the new MAC when their entry goes stale).
//!
//! A VIP on an overlay network (`--net NET`) always runs this lease loop, with or without
//! `--vip-interface`: its address lives on the VIP's own port of that network ([`Place::
//! Overlay`], see [`crate::overlay`]). The holder moves the port to its node, binds the VIP's
//! socket in the network's namespace and configures the address once its vswitch has put
//! the interface there; no gratuitous ARP is needed (the vswitches answer ARP for the VIP
//! from the control plane, and its MAC is the same on every host).
//!
//! [`Fence`] is the pure state machine (time is an argument); [`lease_loop`] drives it.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use volume_mgr::api;
use volume_mgr::client::{Client, ClientError};

use crate::metrics::BackendStats;

/// Lease asked for on every attempt.
pub const LEASE_TTL: Duration = Duration::from_millis(1500);
/// Time between attempts (acquire or renew).
pub const RENEW_EVERY: Duration = Duration::from_millis(500);
/// A holder stops serving this long before the lease would end by its own clock.
pub const FENCE_MARGIN: Duration = Duration::from_millis(300);
/// Longest wait for `ip addr` to finish.
const IP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HaError {
    #[error("{cmd}: {reason}")]
    Command { cmd: String, reason: String },
}

/// A change of this instance's right to serve a VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Start serving: a new lease.
    Acquired,
    /// Stop serving now.
    Lost,
}

/// The local view of one VIP lease. Pure: every method takes the time.
#[derive(Debug, Clone)]
pub struct Fence {
    ttl: Duration,
    margin: Duration,
    /// Serving until then (by this host's monotonic clock); None while not serving.
    until: Option<Instant>,
    /// Epoch of the last grant.
    epoch: u64,
}

impl Fence {
    /// `margin` is capped below `ttl`.
    pub fn new(ttl: Duration, margin: Duration) -> Fence {
        Fence {
            ttl,
            margin: margin.min(ttl.saturating_sub(Duration::from_millis(1))),
            until: None,
            epoch: 0,
        }
    }

    /// Whether this instance may serve (until [`deadline`](Self::deadline)).
    pub fn serving(&self) -> bool {
        self.until.is_some()
    }

    /// When serving must stop unless a grant comes first.
    pub fn deadline(&self) -> Option<Instant> {
        self.until
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The manager granted the lease (epoch `epoch`) to a request sent at `sent`; it is `now`.
    /// A grant that arrives after the time it would cover is of no use (and, if serving, the
    /// deadline has passed: Lost).
    pub fn granted(&mut self, sent: Instant, epoch: u64, now: Instant) -> Option<Change> {
        let until = sent + self.ttl - self.margin;
        if now >= until {
            return self.poll(now);
        }
        self.epoch = epoch;
        match self.until {
            Some(u) => {
                self.until = Some(u.max(until));
                None
            }
            None => {
                self.until = Some(until);
                Some(Change::Acquired)
            }
        }
    }

    /// The manager refused the lease (another node holds it, or the VIP is gone).
    pub fn refused(&mut self) -> Option<Change> {
        self.until.take().map(|_| Change::Lost)
    }

    /// Time passing: Lost once the deadline is reached without a renewal.
    pub fn poll(&mut self, now: Instant) -> Option<Change> {
        match self.until {
            Some(u) if now >= u => {
                self.until = None;
                Some(Change::Lost)
            }
            _ => None,
        }
    }
}

async fn ip_cmd(args: &[String], ok_if: &[&str]) -> Result<(), HaError> {
    let cmd = format!("ip {}", args.join(" "));
    let out = tokio::time::timeout(
        IP_TIMEOUT,
        tokio::process::Command::new("ip")
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| HaError::Command {
        cmd: cmd.clone(),
        reason: format!("no answer within {IP_TIMEOUT:?}"),
    })?
    .map_err(|e| HaError::Command {
        cmd: cmd.clone(),
        reason: e.to_string(),
    })?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || ok_if.iter().any(|m| err.contains(m)) {
        return Ok(());
    }
    Err(HaError::Command {
        cmd,
        reason: err.lines().next().unwrap_or("failed").to_string(),
    })
}

fn addr_args(verb: &str, ifname: &str, ip: IpAddr) -> Vec<String> {
    let mut a: Vec<String> = match ip {
        IpAddr::V4(_) => vec!["addr".into(), verb.into(), format!("{ip}/32")],
        IpAddr::V6(_) => vec!["-6".into(), "addr".into(), verb.into(), format!("{ip}/128")],
    };
    a.extend(["dev".into(), ifname.into()]);
    if ip.is_ipv6() && verb == "add" {
        // No duplicate address detection: the lease says nobody else has it, and DAD would
        // keep the address unusable for a second.
        a.push("nodad".into());
    }
    a
}

/// Adds `ip` (as a host address) to `ifname`; already there is fine.
pub async fn add_addr(ifname: &str, ip: IpAddr) -> Result<(), HaError> {
    ip_cmd(&addr_args("add", ifname, ip), &["File exists"]).await
}

/// Removes `ip` from `ifname`; not there is fine.
pub async fn del_addr(ifname: &str, ip: IpAddr) -> Result<(), HaError> {
    // Older iproute2 says the first, newer the second.
    ip_cmd(
        &addr_args("del", ifname, ip),
        &["Cannot assign requested address", "Address not found"],
    )
    .await
}

/// Announces `ip` on `ifname` by gratuitous ARP, in the background; a failure is logged.
/// IPv4 only: for an IPv6 VIP nothing is sent here (the kernel sends an unsolicited neighbour
/// advertisement for a new address only with `net.ipv6.conf.IF.ndisc_notify=1`; otherwise
/// the neighbours find the new holder when their entry goes stale).
pub fn announce(vip: &str, ifname: &str, ip: IpAddr) {
    if !ip.is_ipv4() {
        return;
    }
    let (vip, ifname) = (vip.to_string(), ifname.to_string());
    tokio::spawn(async move {
        let res = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::process::Command::new("busybox")
                .args(["arping", "-U", "-c", "2", "-w", "2", "-I", &ifname])
                .arg(ip.to_string())
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await;
        match res {
            Ok(Ok(o)) if o.status.success() => {
                tracing::debug!(vip, interface = %ifname, %ip, "gratuitous ARP sent")
            }
            Ok(Ok(o)) => tracing::warn!(vip, interface = %ifname, %ip,
                error = %String::from_utf8_lossy(&o.stderr).lines().next().unwrap_or(""),
                "gratuitous ARP failed"),
            Ok(Err(e)) => {
                tracing::warn!(vip, interface = %ifname, %ip, error = %e, "cannot run busybox arping")
            }
            Err(_) => tracing::warn!(vip, interface = %ifname, %ip, "busybox arping hung"),
        }
    });
}

/// Where a held VIP's address lives.
pub enum Place {
    /// `--vip-interface`: IP/32 on this host's interface, announced by gratuitous ARP.
    Interface(String),
    /// A VIP on an overlay network: its own port, moved to this node, in the network's
    /// namespace.
    Overlay(Box<OverlayPlace>),
}

/// The overlay side of a VIP ([`Place::Overlay`]).
pub struct OverlayPlace {
    /// For the port and the network (pooled connections; not the lease client).
    pub client: Client,
    /// The VIP's record (its name, address and network are what matter here).
    pub record: api::Vip,
    /// The namespace of the VIP's network here.
    pub netns: String,
    /// The task that moves the port here and configures the address (while held).
    attach: Option<tokio::task::JoinHandle<()>>,
}

impl Place {
    pub fn overlay(client: Client, record: api::Vip, netns_prefix: &str) -> Place {
        let netns = crate::overlay::vip_netns_with(
            netns_prefix,
            record.network.as_deref().unwrap_or_default(),
        );
        Place::Overlay(Box::new(OverlayPlace {
            client,
            record,
            netns,
            attach: None,
        }))
    }

    fn describe(&self) -> String {
        match self {
            Place::Interface(i) => format!("interface {i}"),
            Place::Overlay(o) => format!(
                "network {}",
                o.record.network.as_deref().unwrap_or_default()
            ),
        }
    }

    /// Removes what an earlier run (killed) may have left behind.
    async fn clear_leftover(&self, vip: &str, ip: IpAddr) {
        if let Place::Interface(ifname) = self {
            if let Err(e) = del_addr(ifname, ip).await {
                tracing::warn!(vip, error = %e, "cannot remove a leftover VIP address");
            }
        }
    }

    /// Puts the address in place before the socket is bound (a new tenure).
    async fn up(
        &mut self,
        vip: &str,
        node: &str,
        ip: IpAddr,
        stats: &Arc<crate::daemon::Vip>,
    ) -> Result<(), String> {
        match self {
            Place::Interface(ifname) => add_addr(ifname, ip).await.map_err(|e| e.to_string()),
            Place::Overlay(o) => {
                let net = o.record.network.clone().unwrap_or_default();
                let ns = o.netns.clone();
                let sockets = tokio::task::spawn_blocking(move || {
                    crate::overlay::ensure_netns(&ns)?;
                    crate::overlay::NetnsSockets::new(&ns)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("namespace of network {net}: {e}"))?;
                stats.set_netns(Some(Arc::new(sockets)));
                if let Some(old) = o.attach.take() {
                    old.abort();
                }
                o.attach = Some(tokio::spawn(attach_loop(
                    o.client.clone(),
                    o.record.clone(),
                    o.netns.clone(),
                    node.to_string(),
                    stats.clone(),
                )));
                tracing::debug!(
                    vip,
                    "overlay VIP: socket namespace ready, attaching its port"
                );
                Ok(())
            }
        }
    }

    /// Announces the address (a new tenure, socket bound).
    fn announce(&self, vip: &str, ip: IpAddr) {
        if let Place::Interface(ifname) = self {
            announce(vip, ifname, ip);
        }
    }

    /// Takes the address away (the socket is closed already). An overlay VIP's port stays
    /// where it is: the next holder moves it.
    async fn down(&mut self, vip: &str, ip: IpAddr, stats: &Arc<crate::daemon::Vip>) {
        match self {
            Place::Interface(ifname) => {
                if let Err(e) = del_addr(ifname, ip).await {
                    tracing::error!(vip, error = %e, "cannot remove the VIP address");
                }
            }
            Place::Overlay(o) => {
                if let Some(a) = o.attach.take() {
                    a.abort();
                }
                stats.set_overlay_ready(false);
                stats.set_netns(None);
            }
        }
    }
}

/// While this node holds an overlay VIP: moves its port here and configures the address
/// ([`crate::overlay::prepare_vip`], retried until it works), then checks every 2 s that the
/// address is still there (a vswitch restart re-creates the interface) and does it again
/// when not. Health checks of the VIP's backends run only while the address is in place.
async fn attach_loop(
    client: Client,
    record: api::Vip,
    netns: String,
    node: String,
    stats: Arc<crate::daemon::Vip>,
) {
    let mut last_err: Option<String> = None;
    loop {
        match crate::overlay::prepare_vip_in(
            &client,
            &record,
            &node,
            &netns,
            Duration::from_secs(10),
        )
        .await
        {
            Ok(ov) => {
                last_err = None;
                stats.set_overlay_ready(true);
                tracing::info!(vip = %record.name, netns = %ov.netns, interface = %ov.port.ifname, ip = %ov.ip, "overlay VIP attached");
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let (ns, ifname, ip) = (ov.netns.clone(), ov.port.ifname.clone(), ov.ip);
                    let present = tokio::task::spawn_blocking(move || {
                        crate::overlay::vip_addr_present(&ns, &ifname, ip)
                    })
                    .await
                    .unwrap_or(false);
                    if !present {
                        tracing::warn!(vip = %record.name, interface = %ov.port.ifname, "overlay VIP address gone; attaching again");
                        stats.set_overlay_ready(false);
                        break;
                    }
                }
            }
            Err(e) => {
                let s = e.to_string();
                if last_err.as_deref() != Some(s.as_str()) {
                    tracing::warn!(vip = %record.name, error = %s, "cannot attach the overlay VIP yet; retrying");
                    last_err = Some(s);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// What one VIP's lease loop works on.
pub struct LeaseCtx {
    pub client: Client,
    pub vip: String,
    pub node: String,
    pub ip: IpAddr,
    pub place: Place,
    pub stats: Arc<crate::daemon::Vip>,
}

/// Runs the lease of one VIP until `stop` changes (its value: release the lease if held, on
/// a clean shutdown). `serve(true)` binds the VIP's socket, `serve(false)` closes it (both
/// synchronous, called with the address in place).
pub async fn lease_loop(
    ctx: LeaseCtx,
    serve: impl Fn(bool) + Send,
    mut stop: watch::Receiver<bool>,
) {
    let LeaseCtx {
        client,
        vip,
        node,
        ip,
        mut place,
        stats,
    } = ctx;
    // An address left behind by an earlier run on this host (killed) is not ours until the
    // lease says so.
    place.clear_leftover(&vip, ip).await;
    let mut fence = Fence::new(LEASE_TTL, FENCE_MARGIN);
    let lose = |why: &str, fence: &Fence| {
        serve(false);
        stats.stats.holder.store(false, Ordering::Relaxed);
        BackendStats::add(&stats.stats.lease_lost, 1);
        tracing::warn!(
            vip,
            epoch = fence.epoch(),
            reason = why,
            "VIP lease lost; stopped serving"
        );
    };
    let mut last_err: Option<String> = None;
    // The manager may count this node as the holder (the last answer was a grant), even when
    // the fence says not to serve (a grant that came too late).
    let mut maybe_held = false;
    let mut next = Instant::now();
    'outer: loop {
        // Wait for the next attempt, fencing meanwhile.
        loop {
            let deadline = fence.deadline();
            tokio::select! {
                _ = tokio::time::sleep_until(next) => break,
                _ = sleep_until_opt(deadline) => {
                    if fence.poll(Instant::now()) == Some(Change::Lost) {
                        lose("not renewed in time", &fence);
                        place.down(&vip, ip, &stats).await;
                    }
                }
                _ = stop.changed() => break 'outer,
            }
        }
        let sent = Instant::now();
        next = sent + RENEW_EVERY;
        // While serving, a renewal of that epoch only: one delayed in the network past an
        // expiry or a release cannot start a tenure this loop does not know of.
        let req = api::VipLeaseRequest {
            node: node.clone(),
            ttl_ms: LEASE_TTL.as_millis() as u64,
            epoch: fence.serving().then(|| fence.epoch()),
        };
        let call = client.acquire_vip_lease(&vip, &req);
        tokio::pin!(call);
        let res = loop {
            let deadline = fence.deadline();
            tokio::select! {
                r = &mut call => break r,
                _ = sleep_until_opt(deadline) => {
                    if fence.poll(Instant::now()) == Some(Change::Lost) {
                        lose("not renewed in time (manager slow or unreachable)", &fence);
                        place.down(&vip, ip, &stats).await;
                    }
                }
                _ = stop.changed() => {
                    // The request may already be at the manager: let it finish (bounded),
                    // so a release cannot be overtaken by it.
                    match tokio::time::timeout(Duration::from_secs(1), &mut call).await {
                        Ok(Ok(_)) => maybe_held = true,
                        Ok(Err(ClientError::Api { status: 409 | 404, .. })) => maybe_held = false,
                        _ => {}
                    }
                    break 'outer;
                }
            }
        };
        match res {
            Ok(lease) => {
                last_err = None;
                maybe_held = true;
                if fence.epoch() != 0 && fence.serving() && lease.epoch != fence.epoch() {
                    tracing::info!(
                        vip,
                        old = fence.epoch(),
                        new = lease.epoch,
                        "VIP lease epoch changed while serving"
                    );
                }
                match fence.granted(sent, lease.epoch, Instant::now()) {
                    Some(Change::Acquired) => {
                        if let Err(e) = place.up(&vip, &node, ip, &stats).await {
                            tracing::error!(vip, error = %e, "cannot put the VIP address in place; giving the lease up");
                            fence.refused();
                            match client.release_vip_lease(&vip, &node).await {
                                Ok(()) => maybe_held = false,
                                Err(e) => {
                                    tracing::warn!(vip, error = %e, "cannot release the VIP lease")
                                }
                            }
                            next = Instant::now() + Duration::from_secs(2);
                            continue;
                        }
                        serve(true);
                        place.announce(&vip, ip);
                        stats.stats.holder.store(true, Ordering::Relaxed);
                        BackendStats::add(&stats.stats.lease_acquired, 1);
                        tracing::info!(vip, %ip, place = %place.describe(), epoch = lease.epoch, "VIP lease acquired; serving");
                    }
                    Some(Change::Lost) => {
                        lose("renewal answered too late", &fence);
                        place.down(&vip, ip, &stats).await;
                    }
                    None => {}
                }
            }
            Err(ClientError::Api {
                status: 409 | 404,
                message,
                ..
            }) => {
                last_err = None;
                maybe_held = false;
                tracing::debug!(vip, took_ms = sent.elapsed().as_millis() as u64, reason = %message, "VIP lease refused");
                if fence.refused() == Some(Change::Lost) {
                    lose(&message, &fence);
                    place.down(&vip, ip, &stats).await;
                }
            }
            Err(e) => {
                let s = e.to_string();
                if last_err.as_deref() != Some(s.as_str()) {
                    tracing::warn!(vip, error = %s, "VIP lease request failed");
                    last_err = Some(s);
                }
            }
        }
    }
    // Stopping (VIP deleted or changed, or shutdown).
    let release = *stop.borrow();
    if fence.serving() {
        serve(false);
        stats.stats.holder.store(false, Ordering::Relaxed);
        place.down(&vip, ip, &stats).await;
    }
    if release && maybe_held {
        match tokio::time::timeout(
            Duration::from_secs(2),
            client.release_vip_lease(&vip, &node),
        )
        .await
        {
            Ok(Ok(())) => tracing::info!(vip, "VIP lease released"),
            Ok(Err(e)) => tracing::warn!(vip, error = %e, "cannot release the VIP lease"),
            Err(_) => tracing::warn!(vip, "releasing the VIP lease timed out"),
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test]
    async fn fence_serves_until_ttl_minus_margin_from_the_request() {
        let t0 = Instant::now();
        let mut f = Fence::new(ms(1500), ms(300));
        assert!(!f.serving());
        assert_eq!(f.poll(t0 + ms(5000)), None);
        // Granted 40 ms after sending: serving until sent + 1200.
        assert_eq!(f.granted(t0, 1, t0 + ms(40)), Some(Change::Acquired));
        assert_eq!(f.deadline(), Some(t0 + ms(1200)));
        assert_eq!(f.epoch(), 1);
        // A renewal moves the deadline on, never back.
        assert_eq!(f.granted(t0 + ms(500), 1, t0 + ms(520)), None);
        assert_eq!(f.deadline(), Some(t0 + ms(1700)));
        assert_eq!(f.granted(t0 + ms(100), 1, t0 + ms(600)), None);
        assert_eq!(f.deadline(), Some(t0 + ms(1700)));
        // No renewal: lost exactly at the deadline, once.
        assert_eq!(f.poll(t0 + ms(1699)), None);
        assert_eq!(f.poll(t0 + ms(1700)), Some(Change::Lost));
        assert!(!f.serving());
        assert_eq!(f.poll(t0 + ms(1800)), None);
        // A grant answering too late is no grant.
        assert_eq!(f.granted(t0 + ms(2000), 2, t0 + ms(3200)), None);
        assert!(!f.serving());
        // Acquired again, then refused (another holder): lost at once.
        assert_eq!(
            f.granted(t0 + ms(4000), 3, t0 + ms(4010)),
            Some(Change::Acquired)
        );
        assert_eq!(f.refused(), Some(Change::Lost));
        assert_eq!(f.refused(), None);
        // While serving, a grant that arrives after the deadline is a loss.
        assert_eq!(
            f.granted(t0 + ms(6000), 4, t0 + ms(6010)),
            Some(Change::Acquired)
        );
        assert_eq!(
            f.granted(t0 + ms(6500), 4, t0 + ms(7800)),
            Some(Change::Lost)
        );
    }

    #[tokio::test]
    async fn margin_is_capped_below_the_ttl() {
        let t0 = Instant::now();
        let mut f = Fence::new(ms(500), ms(900));
        assert_eq!(f.granted(t0, 1, t0), Some(Change::Acquired));
        assert_eq!(f.deadline(), Some(t0 + ms(1)));
    }

    #[test]
    fn ip_arguments() {
        let v4: IpAddr = "198.18.0.100".parse().unwrap();
        assert_eq!(
            addr_args("add", "eth0", v4).join(" "),
            "addr add 198.18.0.100/32 dev eth0"
        );
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(
            addr_args("add", "eth0", v6).join(" "),
            "-6 addr add 2001:db8::1/128 dev eth0 nodad"
        );
        assert_eq!(
            addr_args("del", "eth0", v6).join(" "),
            "-6 addr del 2001:db8::1/128 dev eth0"
        );
    }
}
