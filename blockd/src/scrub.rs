//! Scrub: a background task that reads every written 4 KiB block of this node's chunks at
//! `--scrub-rate` and checks it against its stored crc32 — one full pass, then another after
//! `--scrub-interval`. A damaged block is repaired from another in-service replica of its
//! chunk set: that block is read over the replica protocol (the peer checks its own crc32)
//! and written back only if its crc32 is the one this copy's record holds (so a repair
//! restores exactly what this copy acknowledged). Reads that hit a bad checksum (the gateway
//! then serves them from another copy) queue their chunk here and are repaired at once, even
//! when the scrub itself is off.

use crate::buf::AlignedBuf;
use crate::chunkstore::layout::{ChunkKey, BLOCK, BLOCKS_PER_SLOT};
use crate::chunkstore::{ChunkStore, RepairOutcome};
use crate::gateway::{self, Ctx};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Blocks checked per read (256 KiB): small enough not to hold up writes to a chunk.
const STEP: u32 = 64;

/// Counters for `/metrics`.
#[derive(Default)]
pub struct ScrubMetrics {
    pub bytes: AtomicU64,
    /// Damaged blocks found (by the scrub or by reads).
    pub errors: AtomicU64,
    pub repaired_scrub: AtomicU64,
    pub repaired_read: AtomicU64,
    pub unrepairable: AtomicU64,
    pub passes: AtomicU64,
}

impl ScrubMetrics {
    pub fn render_prometheus(&self, out: &mut String) {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(out, "# HELP blockd_scrub_bytes_total Bytes of written blocks the scrub verified.\n# TYPE blockd_scrub_bytes_total counter\nblockd_scrub_bytes_total {}", g(&self.bytes));
        let _ = writeln!(out, "# HELP blockd_scrub_errors_total Blocks found damaged (bad crc32) by the scrub or by reads.\n# TYPE blockd_scrub_errors_total counter\nblockd_scrub_errors_total {}", g(&self.errors));
        let _ = writeln!(out, "# HELP blockd_scrub_repaired_total Damaged blocks repaired from another replica, by who found them.\n# TYPE blockd_scrub_repaired_total counter\nblockd_scrub_repaired_total{{found_by=\"scrub\"}} {}\nblockd_scrub_repaired_total{{found_by=\"read\"}} {}", g(&self.repaired_scrub), g(&self.repaired_read));
        let _ = writeln!(out, "# HELP blockd_scrub_unrepairable_total Damaged blocks no other replica had a good copy of.\n# TYPE blockd_scrub_unrepairable_total counter\nblockd_scrub_unrepairable_total {}", g(&self.unrepairable));
        let _ = writeln!(out, "# HELP blockd_scrub_passes_total Full scrub passes completed.\n# TYPE blockd_scrub_passes_total counter\nblockd_scrub_passes_total {}", g(&self.passes));
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Found {
    Scrub,
    Read,
}

pub struct Scrubber {
    pub store: Arc<ChunkStore>,
    pub gw: Arc<Ctx>,
    /// Bytes per second; 0 = no background pass (read repairs still run).
    pub rate: u64,
    pub interval: Duration,
    pub metrics: ScrubMetrics,
    /// Starts a pass now (the `/debug/scrub` route).
    pub kick: tokio::sync::Notify,
}

impl Scrubber {
    pub fn new(store: Arc<ChunkStore>, gw: Arc<Ctx>, rate: u64, interval: Duration) -> Scrubber {
        Scrubber {
            store,
            gw,
            rate,
            interval,
            metrics: ScrubMetrics::default(),
            kick: tokio::sync::Notify::new(),
        }
    }

    /// Runs until dropped: passes at `rate` every `interval`, read repairs as they come.
    pub async fn run(self: Arc<Self>) {
        let throttle = crate::throttle::Throttle::new(self.rate);
        loop {
            if self.rate > 0 {
                self.pass(&throttle).await;
            }
            let wait = tokio::time::sleep(self.interval);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = &mut wait => break,
                    _ = self.kick.notified() => break,
                    _ = self.store.suspect_added.notified() => self.repair_suspects().await,
                }
            }
        }
    }

    /// One full pass over every chunk stored here.
    async fn pass(&self, throttle: &crate::throttle::Throttle) {
        let keys = self.store.chunk_keys();
        let start = std::time::Instant::now();
        let before = self.metrics.bytes.load(Ordering::Relaxed);
        tracing::info!(chunks = keys.len(), rate = self.rate, "scrub pass starting");
        for key in keys {
            self.repair_suspects().await;
            let mut b = 0u32;
            while b < BLOCKS_PER_SLOT as u32 {
                match self.store.scrub_blocks(key, b, b + STEP).await {
                    Ok(rep) => {
                        self.metrics.bytes.fetch_add(rep.bytes, Ordering::Relaxed);
                        if !rep.bad.is_empty() {
                            self.repair(key, &rep.bad, Found::Scrub).await;
                        }
                        throttle.take(rep.bytes).await;
                    }
                    Err(e) => {
                        tracing::warn!(volume = key.volume, chunk = key.index, error = %e, "scrub read failed");
                        break;
                    }
                }
                b += STEP;
            }
        }
        self.metrics.passes.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            bytes = self.metrics.bytes.load(Ordering::Relaxed) - before,
            secs = start.elapsed().as_secs_f64(),
            "scrub pass done"
        );
    }

    /// Repairs the chunks reads found damaged.
    async fn repair_suspects(&self) {
        for key in self.store.take_suspects() {
            match self
                .store
                .scrub_blocks(key, 0, BLOCKS_PER_SLOT as u32)
                .await
            {
                Ok(rep) if !rep.bad.is_empty() => self.repair(key, &rep.bad, Found::Read).await,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(volume = key.volume, chunk = key.index, error = %e, "re-reading a damaged chunk failed")
                }
            }
        }
    }

    /// The other in-service replicas of a chunk's set, and the epoch to read them with.
    async fn peers(&self, key: ChunkKey) -> Result<(Vec<String>, u64), String> {
        let vols = self
            .gw
            .client
            .list_volumes()
            .await
            .map_err(|e| e.to_string())?;
        let v = vols
            .items
            .into_iter()
            .find(|v| v.id == key.volume)
            .ok_or("volume not known to volume-mgr")?;
        if v.sets.is_empty() {
            return Err("volume has no replica sets".into());
        }
        let set = &v.sets[(key.index % v.sets.len() as u64) as usize];
        let peers = set
            .members
            .iter()
            .filter(|m| m.in_service && m.node != self.gw.cfg.node)
            .map(|m| m.node.clone())
            .collect();
        let mut epoch = self.gw.local.fences.current(key.volume);
        if let Ok(leases) = self.gw.client.list_leases().await {
            if let Some(l) = leases.items.iter().find(|l| l.volume == v.name) {
                epoch = epoch.max(l.epoch);
            }
        }
        Ok((peers, epoch))
    }

    /// Repairs blocks `bad` of a chunk from the first peer with a good copy of each.
    async fn repair(&self, key: ChunkKey, bad: &[u32], found: Found) {
        self.metrics
            .errors
            .fetch_add(bad.len() as u64, Ordering::Relaxed);
        tracing::warn!(volume = key.volume, chunk = key.index, blocks = ?bad, "damaged blocks found; repairing from another replica");
        let (peers, epoch) = match self.peers(key).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(volume = key.volume, chunk = key.index, error = %e, "cannot find another replica to repair from");
                self.metrics
                    .unrepairable
                    .fetch_add(bad.len() as u64, Ordering::Relaxed);
                return;
            }
        };
        let chunk = gateway::chunk_of(key.volume, key.index);
        for &b in bad {
            let mut fixed = false;
            for p in &peers {
                let r = match self.gw.replica(p).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(peer = %p, error = %e, "repair: replica unreachable");
                        continue;
                    }
                };
                let buf = AlignedBuf::for_overwrite(BLOCK as usize);
                let (buf, res) = r
                    .read(chunk, b * BLOCK as u32, BLOCK as u32, epoch, buf, 0)
                    .await;
                if let Err(e) = res {
                    tracing::warn!(peer = %p, block = b, error = %e, "repair: reading the block there failed");
                    continue;
                }
                match self
                    .store
                    .repair_block(key, b, &buf[..BLOCK as usize])
                    .await
                {
                    Ok(RepairOutcome::Repaired) => {
                        let c = match found {
                            Found::Scrub => &self.metrics.repaired_scrub,
                            Found::Read => &self.metrics.repaired_read,
                        };
                        c.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(volume = key.volume, chunk = key.index, block = b, from = %p, "block repaired");
                        fixed = true;
                        break;
                    }
                    Ok(RepairOutcome::AlreadyGood) | Ok(RepairOutcome::Gone) => {
                        // Rewritten or dropped meanwhile: no longer damaged.
                        self.metrics.errors.fetch_sub(1, Ordering::Relaxed);
                        fixed = true;
                        break;
                    }
                    Ok(RepairOutcome::Mismatch) => {
                        tracing::warn!(peer = %p, block = b, "repair: that copy holds other data for the block (another version)");
                    }
                    Err(e) => {
                        tracing::error!(block = b, error = %e, "repair: writing the block back failed");
                        break;
                    }
                }
            }
            if !fixed {
                self.metrics.unrepairable.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    volume = key.volume,
                    chunk = key.index,
                    block = b,
                    "damaged block could not be repaired from any replica"
                );
            }
        }
    }
}
