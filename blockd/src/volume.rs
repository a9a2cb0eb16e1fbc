//! A volume as an NBD export: a flat byte range split into 4 MiB chunks. In the daemon every
//! chunk goes through the gateway to the volume's replicas (`gateway`); without a control
//! plane (tests of the NBD server) the chunks live in the local chunk store only.

use crate::buf::AlignedBuf;
use crate::chunkstore::layout::{ChunkKey, SLOT_SIZE};
use crate::chunkstore::ChunkStore;
use crate::export::{Export, ExportCatalog, ExportError, ExportInfo, Extent, ZeroFlags};
use crate::gateway::{Attached, Ctx, Op};
use crate::uring::Buf;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

/// What blockd knows of a volume (from volume-mgr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub id: u64,
    pub size: u64,
}

pub struct Volume {
    info: VolumeInfo,
    store: Arc<ChunkStore>,
    removed: AtomicBool,
    /// Replicated mode: the gateway and the current attachment (lease).
    gw: Option<Arc<Ctx>>,
    attached: tokio::sync::Mutex<Option<Arc<Attached>>>,
}

/// One piece of a request that lies within one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    key: ChunkKey,
    /// Offset within the chunk.
    off: u64,
    len: u64,
    /// Offset within the request.
    pos: u64,
}

fn pieces(volume: u64, offset: u64, len: u64) -> impl Iterator<Item = Piece> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let index = pos / SLOT_SIZE;
        let off = pos % SLOT_SIZE;
        let n = (SLOT_SIZE - off).min(end - pos);
        let p = Piece {
            key: ChunkKey { volume, index },
            off,
            len: n,
            pos: pos - offset,
        };
        pos += n;
        Some(p)
    })
}

impl Volume {
    pub fn new(info: VolumeInfo, store: Arc<ChunkStore>) -> Volume {
        Volume {
            info,
            store,
            removed: AtomicBool::new(false),
            gw: None,
            attached: tokio::sync::Mutex::new(None),
        }
    }

    fn replicated(info: VolumeInfo, store: Arc<ChunkStore>, gw: Arc<Ctx>) -> Volume {
        Volume {
            gw: Some(gw),
            ..Volume::new(info, store)
        }
    }

    /// Takes the lease and readies the replicas (once; again after being fenced, which is
    /// how a volume moves back to a host).
    pub async fn attach(&self) -> Result<(), String> {
        let Some(gw) = &self.gw else { return Ok(()) };
        let mut g = self.attached.lock().await;
        if let Some(a) = g.as_ref() {
            if !a.is_fenced() {
                return Ok(());
            }
            a.close();
        }
        let a = Attached::attach(gw.clone(), &self.info.name, self.info.id).await?;
        *g = Some(a);
        Ok(())
    }

    /// The current attachment (replicated mode).
    async fn att(&self) -> Result<Option<Arc<Attached>>, ExportError> {
        if self.gw.is_none() {
            return Ok(None);
        }
        match self.attached.lock().await.as_ref() {
            Some(a) => Ok(Some(a.clone())),
            None => Err(ExportError::Shutdown),
        }
    }

    pub fn info(&self) -> &VolumeInfo {
        &self.info
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        if self.removed.load(Ordering::Acquire) {
            return Err(ExportError::Shutdown);
        }
        if offset.checked_add(len).is_none_or(|e| e > self.info.size) {
            return Err(ExportError::Invalid(format!(
                "range {offset}+{len} beyond the end ({})",
                self.info.size
            )));
        }
        Ok(())
    }

    async fn zero(
        &self,
        offset: u64,
        len: u32,
        punch: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), ExportError> {
        self.check(offset, len as u64)?;
        if let Some(a) = self.att().await? {
            let futs = pieces(self.info.id, offset, len as u64).map(|p| {
                a.replicate(
                    p.key.index,
                    Op::Zero {
                        off: p.off as u32,
                        len: p.len as u32,
                        punch,
                        fua,
                    },
                )
            });
            for r in futures::future::join_all(futs).await {
                r?;
            }
            return Ok(());
        }
        let futs = pieces(self.info.id, offset, len as u64)
            .map(|p| self.store.zero(p.key, p.off, p.len, punch, fast, fua));
        for r in futures::future::join_all(futs).await {
            r?;
        }
        Ok(())
    }
}

impl Export for Volume {
    fn size(&self) -> u64 {
        self.info.size
    }

    async fn read(&self, offset: u64, len: u32) -> Result<AlignedBuf, ExportError> {
        self.check(offset, len as u64)?;
        // Every byte is written below (data, or zeroes for what was never written).
        let mut buf = AlignedBuf::for_overwrite(len as usize);
        if let Some(a) = self.att().await? {
            for p in pieces(self.info.id, offset, len as u64) {
                let (b, r) = a
                    .read(p.key.index, p.off as u32, p.len as u32, buf, p.pos as usize)
                    .await;
                buf = b;
                r?;
            }
            return Ok(buf);
        }
        for p in pieces(self.info.id, offset, len as u64) {
            let (b, r) = self
                .store
                .read_into(p.key, p.off, buf, p.pos as usize, p.len as usize)
                .await;
            buf = b;
            r?;
        }
        Ok(buf)
    }

    async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), ExportError> {
        let len = data.len() as u64;
        self.check(offset, len)?;
        if let Some(a) = self.att().await? {
            let data = Arc::new(data);
            let futs = pieces(self.info.id, offset, len).map(|p| {
                a.replicate(
                    p.key.index,
                    Op::Write {
                        off: p.off as u32,
                        data: data.clone(),
                        pos: p.pos as usize,
                        len: p.len as usize,
                        fua,
                    },
                )
            });
            for r in futures::future::join_all(futs).await {
                r?;
            }
            return Ok(());
        }
        let mut ps = pieces(self.info.id, offset, len).peekable();
        let first = match ps.next() {
            Some(p) => p,
            None => return Ok(()),
        };
        if ps.peek().is_none() {
            return self
                .store
                .write(
                    first.key,
                    first.off,
                    Buf::Aligned(data),
                    0,
                    len as usize,
                    fua,
                )
                .await;
        }
        let shared = Arc::new(data);
        let all: Vec<Piece> = std::iter::once(first).chain(ps).collect();
        let futs = all.iter().map(|p| {
            self.store.write(
                p.key,
                p.off,
                Buf::Shared(shared.clone()),
                p.pos as usize,
                p.len as usize,
                fua,
            )
        });
        for r in futures::future::join_all(futs).await {
            r?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), ExportError> {
        if self.removed.load(Ordering::Acquire) {
            return Err(ExportError::Shutdown);
        }
        if let Some(a) = self.att().await? {
            return a.flush().await;
        }
        self.store.flush().await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), ExportError> {
        self.zero(offset, len, true, false, fua).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        flags: ZeroFlags,
    ) -> Result<(), ExportError> {
        self.zero(offset, len, flags.may_trim, flags.fast, flags.fua)
            .await
    }

    async fn cache(&self, offset: u64, len: u32) -> Result<(), ExportError> {
        // Data is read with O_DIRECT, so there is no cache to warm; validate and succeed.
        self.check(offset, len as u64)
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, ExportError> {
        self.check(offset, len as u64)?;
        let att = self.att().await?;
        let mut out: Vec<Extent> = Vec::new();
        for p in pieces(self.info.id, offset, len as u64) {
            // Replicated: the local copy tells, when it is an up-to-date one; otherwise the
            // range is reported as data (always correct, just not sparse).
            let runs = match &att {
                Some(a) if !a.local_in_service(p.key.index) => vec![(p.len, true)],
                _ => self.store.allocation(p.key, p.off, p.len),
            };
            for (l, written) in runs {
                let e = Extent {
                    length: l,
                    hole: !written,
                    zero: !written,
                };
                match out.last_mut() {
                    Some(last) if last.hole == e.hole && last.zero == e.zero => last.length += l,
                    _ => out.push(e),
                }
            }
        }
        if out.is_empty() {
            out.push(Extent {
                length: len as u64,
                hole: true,
                zero: true,
            });
        }
        Ok(out)
    }
}

/// Resolves export names that blockd has not seen yet (asks volume-mgr).
pub trait VolumeLookup: Send + Sync + 'static {
    fn lookup(&self, name: &str) -> impl Future<Output = Option<VolumeInfo>> + Send;
}

/// The volumes this blockd serves, kept in step with volume-mgr by the agent.
pub struct VolumeCatalog<L> {
    store: Arc<ChunkStore>,
    volumes: RwLock<HashMap<String, Arc<Volume>>>,
    lookup: L,
    gw: Option<Arc<Ctx>>,
}

impl<L: VolumeLookup> VolumeCatalog<L> {
    pub fn new(store: Arc<ChunkStore>, lookup: L) -> Self {
        VolumeCatalog {
            store,
            volumes: RwLock::new(HashMap::new()),
            lookup,
            gw: None,
        }
    }

    /// A catalog whose volumes are replicated through the gateway.
    pub fn replicated(store: Arc<ChunkStore>, lookup: L, gw: Arc<Ctx>) -> Self {
        VolumeCatalog {
            gw: Some(gw),
            ..Self::new(store, lookup)
        }
    }

    fn make(&self, info: VolumeInfo) -> Arc<Volume> {
        Arc::new(match &self.gw {
            Some(gw) => Volume::replicated(info, self.store.clone(), gw.clone()),
            None => Volume::new(info, self.store.clone()),
        })
    }

    pub fn store(&self) -> &Arc<ChunkStore> {
        &self.store
    }

    /// Applies the membership of `v`'s record to this host's attachment of it, if attached
    /// here: before the agent drops this host's chunks of sets re-homed away, the gateway
    /// must stop reading them locally (its own view of the record can lag, e.g. while it is
    /// cut off from the manager).
    pub async fn sync_attached_record(&self, v: &volume_mgr::api::Volume) {
        let vol = self.volumes.read().unwrap().get(&v.name).cloned();
        if let Some(vol) = vol {
            if let Some(a) = vol.attached.lock().await.as_ref() {
                a.forget_left_members(v);
            }
        }
    }

    /// Replaces the set of volumes; returns the ids of volumes that went away (their data
    /// is to be deleted). Open connections to a removed volume get ESHUTDOWN.
    pub fn sync(&self, list: &[VolumeInfo]) -> Vec<u64> {
        let mut map = self.volumes.write().unwrap();
        let mut removed = Vec::new();
        map.retain(|name, v| {
            let keep = list.iter().any(|i| i == v.info());
            if !keep {
                v.removed.store(true, Ordering::Release);
                if let Ok(g) = v.attached.try_lock() {
                    if let Some(a) = g.as_ref() {
                        a.close();
                    }
                }
                if !list.iter().any(|i| i.id == v.info.id) {
                    removed.push(v.info.id);
                }
                tracing::info!(volume = %name, id = v.info.id, "volume removed");
            }
            keep
        });
        for i in list {
            if !map.contains_key(&i.name) {
                let v = self.make(i.clone());
                map.insert(i.name.clone(), v);
            }
        }
        removed
    }

    fn insert(&self, info: VolumeInfo) -> Arc<Volume> {
        let v = self.make(info.clone());
        let mut map = self.volumes.write().unwrap();
        map.entry(info.name.clone()).or_insert(v).clone()
    }
}

impl<L: VolumeLookup> ExportCatalog for VolumeCatalog<L> {
    type Export = Volume;

    async fn open(&self, name: &str) -> Option<Arc<Volume>> {
        let known = self.volumes.read().unwrap().get(name).cloned();
        let v = match known {
            Some(v) => v,
            None => {
                let info = self.lookup.lookup(name).await?;
                self.insert(info)
            }
        };
        if let Err(e) = v.attach().await {
            tracing::error!(volume = name, error = %e, "cannot attach volume");
            return None;
        }
        Some(v)
    }

    async fn list(&self) -> Vec<ExportInfo> {
        let mut v: Vec<ExportInfo> = self
            .volumes
            .read()
            .unwrap()
            .values()
            .map(|v| ExportInfo {
                name: v.info.name.clone(),
                size: v.info.size,
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunkstore::DiskConfig;

    struct NoLookup;
    impl VolumeLookup for NoLookup {
        async fn lookup(&self, _name: &str) -> Option<VolumeInfo> {
            None
        }
    }

    #[test]
    fn pieces_split_at_chunk_boundaries() {
        let ps: Vec<Piece> = pieces(7, SLOT_SIZE - 512, 1024 + SLOT_SIZE).collect();
        assert_eq!(ps.len(), 3);
        assert_eq!(
            ps[0],
            Piece {
                key: ChunkKey {
                    volume: 7,
                    index: 0
                },
                off: SLOT_SIZE - 512,
                len: 512,
                pos: 0
            }
        );
        assert_eq!(
            ps[1],
            Piece {
                key: ChunkKey {
                    volume: 7,
                    index: 1
                },
                off: 0,
                len: SLOT_SIZE,
                pos: 512
            }
        );
        assert_eq!(
            ps[2],
            Piece {
                key: ChunkKey {
                    volume: 7,
                    index: 2
                },
                off: 0,
                len: 512,
                pos: 512 + SLOT_SIZE
            }
        );
        assert_eq!(pieces(1, 10, 0).count(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn volume_io_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            ChunkStore::open(&[DiskConfig {
                path: dir.path().join("d"),
                size: Some(64 << 20),
            }])
            .unwrap(),
        );
        let cat = VolumeCatalog::new(store.clone(), NoLookup);
        let info = VolumeInfo {
            name: "v".into(),
            id: 1,
            size: 16 << 20,
        };
        assert!(cat.sync(std::slice::from_ref(&info)).is_empty());
        let v = cat.open("v").await.unwrap();
        assert!(cat.open("w").await.is_none());
        let data: Vec<u8> = (0..(1 << 20) + 1000).map(|i| (i % 253) as u8).collect();
        let off = SLOT_SIZE - 4096 - 300;
        v.write(off, AlignedBuf::from_slice(&data), false)
            .await
            .unwrap();
        assert_eq!(
            &v.read(off, data.len() as u32).await.unwrap()[..],
            &data[..]
        );
        assert!(matches!(
            v.read(16 << 20, 1).await,
            Err(ExportError::Invalid(_))
        ));
        assert!(matches!(
            v.write((16 << 20) - 1, AlignedBuf::from_slice(b"ab"), false)
                .await,
            Err(ExportError::Invalid(_))
        ));
        let ext = v.block_status(0, 16 << 20).await.unwrap();
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 16 << 20);
        assert!(ext[0].hole && !ext[1].hole);
        v.trim(SLOT_SIZE, 1 << 20, false).await.unwrap();
        assert!(v
            .read(SLOT_SIZE, 4096)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        v.flush().await.unwrap();
        // Removal: open handles get ESHUTDOWN, the id is reported for deletion.
        assert_eq!(cat.sync(&[]), vec![1]);
        assert!(matches!(v.read(0, 1).await, Err(ExportError::Shutdown)));
        assert!(cat.list().await.is_empty());
    }
}
