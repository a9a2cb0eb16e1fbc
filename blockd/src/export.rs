//! The boundary between the NBD server and what it serves: an `Export` is one volume as a
//! flat byte range; an `ExportCatalog` finds exports by name. The NBD server is generic over
//! these, so it can be tested with any implementation and the chunk-store volume plugs in.

use crate::buf::AlignedBuf;
use std::future::Future;
use std::sync::Arc;

/// Why an export operation failed; maps onto an NBD error code.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The request is malformed or outside the export.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No space left to allocate the data (disk full).
    #[error("no space left on device")]
    NoSpace,
    /// The operation (or this flag combination, e.g. FAST_ZERO) is not supported.
    #[error("operation not supported")]
    Unsupported,
    /// The data failed its checksum and no good copy exists.
    #[error("checksum mismatch at offset {offset}")]
    Corrupt { offset: u64 },
    /// The export is going away (volume removed, daemon stopping).
    #[error("export is shutting down")]
    Shutdown,
    /// Another host took the volume's lease: this gateway may no longer do I/O.
    #[error("the volume's lease moved to another host; I/O refused here")]
    Fenced,
    /// Any other I/O failure.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl ExportError {
    /// The NBD error number for this failure (values from the NBD protocol).
    pub fn nbd_errno(&self) -> u32 {
        match self {
            ExportError::Invalid(_) => 22,  // EINVAL
            ExportError::NoSpace => 28,     // ENOSPC
            ExportError::Unsupported => 95, // ENOTSUP
            ExportError::Corrupt { .. } => 5,
            ExportError::Shutdown => 108, // ESHUTDOWN
            ExportError::Fenced => 1,     // EPERM
            ExportError::Io(e) => match e.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => 28,
                Some(libc::EINVAL) => 22,
                Some(libc::EOPNOTSUPP) => 95,
                _ => 5, // EIO
            },
        }
    }
}

/// One allocation extent for `base:allocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Not allocated (NBD_STATE_HOLE).
    pub hole: bool,
    /// Reads as zeroes (NBD_STATE_ZERO).
    pub zero: bool,
}

/// Flags of NBD_CMD_WRITE_ZEROES.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The server may deallocate (no NBD_CMD_FLAG_NO_HOLE).
    pub may_trim: bool,
    /// NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP rather than zero slowly.
    pub fast: bool,
    /// NBD_CMD_FLAG_FUA.
    pub fua: bool,
}

/// A named block device. Offsets and lengths passed in are already checked by the caller to
/// lie within `size()`; implementations still must not panic on anything.
pub trait Export: Send + Sync + 'static {
    fn size(&self) -> u64;
    /// Reads `len` bytes at `offset`; the returned buffer has exactly `len` bytes.
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<AlignedBuf, ExportError>> + Send;
    /// Writes `data` at `offset`; with `fua` it is durable when this returns.
    fn write(
        &self,
        offset: u64,
        data: AlignedBuf,
        fua: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send;
    /// Makes every write completed so far (on any connection) durable.
    fn flush(&self) -> impl Future<Output = Result<(), ExportError>> + Send;
    /// Discards a range; reads of it return zeroes afterwards.
    fn trim(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send;
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        flags: ZeroFlags,
    ) -> impl Future<Output = Result<(), ExportError>> + Send;
    /// Prefetch hint (NBD_CMD_CACHE).
    fn cache(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), ExportError>> + Send;
    /// Allocation status from `offset`, covering at most `len` bytes (at least one extent,
    /// each extent non-empty, not past the end of the export).
    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Vec<Extent>, ExportError>> + Send;
}

/// What NBD_OPT_LIST shows for an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub size: u64,
}

/// Finds exports by name (the NBD export name is the volume name).
pub trait ExportCatalog: Send + Sync + 'static {
    type Export: Export;
    /// Opens an export for one connection; `None` if no such export exists.
    fn open(&self, name: &str) -> impl Future<Output = Option<Arc<Self::Export>>> + Send;
    fn list(&self) -> impl Future<Output = Vec<ExportInfo>> + Send;
}
