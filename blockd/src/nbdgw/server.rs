//! The NBD server: fixed newstyle handshake, then the transmission phase with many requests
//! in flight per connection and replies in completion order.
//!
//! One reader loop parses requests and runs each as its own task (bounded by a request count
//! and a byte budget, so a hostile client cannot make us buffer without limit); one writer task
//! serialises the replies. READ data goes from the chunk store's buffer to the socket without
//! a copy; WRITE payloads are read straight into an aligned buffer that the store writes with
//! O_DIRECT. A connection that misbehaves is closed; it never affects another connection.

use super::metrics::NbdMetrics;
use super::wire::{self, Request, WireError};
use crate::buf::AlignedBuf;
use crate::export::{Export, ExportCatalog, ExportError, ZeroFlags};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, Semaphore};

/// Requests in flight per connection.
const MAX_IN_FLIGHT: u32 = 128;
/// Payload bytes in flight per connection (in KiB units of the byte semaphore).
const BYTE_BUDGET_KIB: u32 = 256 * 1024;
/// Payload bytes in flight across all connections of the process (KiB units): many
/// connections together cannot make blockd buffer more than this.
const GLOBAL_BUDGET_KIB: usize = 1024 * 1024;
static GLOBAL_BYTES: Semaphore = Semaphore::const_new(GLOBAL_BUDGET_KIB);

struct Reply {
    head: Vec<u8>,
    data: Option<AlignedBuf>,
}

/// What the handshake settled on.
struct Session<E> {
    export: Arc<E>,
    structured: bool,
    meta: bool,
}

fn transmission_flags(structured: bool) -> u16 {
    let mut f = wire::TF_HAS_FLAGS
        | wire::TF_SEND_FLUSH
        | wire::TF_SEND_FUA
        | wire::TF_SEND_TRIM
        | wire::TF_SEND_WRITE_ZEROES
        | wire::TF_CAN_MULTI_CONN
        | wire::TF_SEND_CACHE
        | wire::TF_SEND_FAST_ZERO;
    if structured {
        f |= wire::TF_SEND_DF;
    }
    f
}

fn proto_err(e: WireError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

async fn discard<R: AsyncRead + Unpin>(r: &mut R, mut n: u64) -> io::Result<()> {
    let mut sink = [0u8; 8192];
    while n > 0 {
        let k = n.min(sink.len() as u64) as usize;
        r.read_exact(&mut sink[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}

/// Runs the handshake; `Ok(None)` when the client ended it (ABORT, unknown EXPORT_NAME).
async fn handshake<C, R, W>(
    catalog: &C,
    r: &mut R,
    w: &mut W,
) -> io::Result<Option<Session<C::Export>>>
where
    C: ExportCatalog,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    wire::emit_greeting(&mut out);
    w.write_all(&out).await?;
    w.flush().await?;
    let mut fl = [0u8; 4];
    r.read_exact(&mut fl).await?;
    let no_zeroes = wire::parse_client_flags(&fl).map_err(proto_err)?;
    let mut structured = false;
    let mut meta = false;
    loop {
        let mut hdr = [0u8; 16];
        r.read_exact(&mut hdr).await?;
        let (opt, len) = wire::parse_option_header(&hdr).map_err(proto_err)?;
        out.clear();
        if len > wire::MAX_OPTION_LEN {
            if opt == wire::OPT_EXPORT_NAME || len > 16 << 20 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "option payload too large",
                ));
            }
            discard(r, len as u64).await?;
            wire::emit_option_error(
                &mut out,
                opt,
                wire::REP_ERR_TOO_BIG,
                "option payload too large",
            );
            w.write_all(&out).await?;
            w.flush().await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        match opt {
            wire::OPT_EXPORT_NAME => {
                let Ok(name) = std::str::from_utf8(&data) else {
                    return Ok(None);
                };
                let Some(export) = catalog.open(name).await else {
                    tracing::debug!(export = name, "unknown export (EXPORT_NAME); closing");
                    return Ok(None);
                };
                wire::emit_export_name_reply(
                    &mut out,
                    export.size(),
                    transmission_flags(structured),
                    no_zeroes,
                );
                w.write_all(&out).await?;
                w.flush().await?;
                return Ok(Some(Session {
                    export,
                    structured,
                    meta,
                }));
            }
            wire::OPT_ABORT => {
                wire::emit_option_reply(&mut out, opt, wire::REP_ACK, &[]);
                let _ = w.write_all(&out).await;
                let _ = w.flush().await;
                return Ok(None);
            }
            wire::OPT_LIST => {
                if len != 0 {
                    wire::emit_option_error(
                        &mut out,
                        opt,
                        wire::REP_ERR_INVALID,
                        "LIST takes no data",
                    );
                } else {
                    for e in catalog.list().await {
                        wire::emit_server_entry(&mut out, &e.name);
                    }
                    wire::emit_option_reply(&mut out, opt, wire::REP_ACK, &[]);
                }
            }
            wire::OPT_INFO | wire::OPT_GO => match wire::parse_info_request(&data) {
                Err(e) => {
                    wire::emit_option_error(&mut out, opt, wire::REP_ERR_INVALID, &e.to_string())
                }
                Ok(req) => match catalog.open(&req.name).await {
                    None => wire::emit_option_error(
                        &mut out,
                        opt,
                        wire::REP_ERR_UNKNOWN,
                        "no such export",
                    ),
                    Some(export) => {
                        if req.requests.contains(&wire::INFO_NAME) {
                            wire::emit_info_name(&mut out, opt, &req.name);
                        }
                        wire::emit_info_block_size(&mut out, opt, 1, 4096, wire::MAX_PAYLOAD);
                        wire::emit_info_export(
                            &mut out,
                            opt,
                            export.size(),
                            transmission_flags(structured),
                        );
                        wire::emit_option_reply(&mut out, opt, wire::REP_ACK, &[]);
                        if opt == wire::OPT_GO {
                            w.write_all(&out).await?;
                            w.flush().await?;
                            return Ok(Some(Session {
                                export,
                                structured,
                                meta,
                            }));
                        }
                    }
                },
            },
            wire::OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    wire::emit_option_error(
                        &mut out,
                        opt,
                        wire::REP_ERR_INVALID,
                        "STRUCTURED_REPLY takes no data",
                    );
                } else if structured {
                    wire::emit_option_error(
                        &mut out,
                        opt,
                        wire::REP_ERR_INVALID,
                        "structured replies already negotiated",
                    );
                } else {
                    structured = true;
                    wire::emit_option_reply(&mut out, opt, wire::REP_ACK, &[]);
                }
            }
            wire::OPT_LIST_META_CONTEXT | wire::OPT_SET_META_CONTEXT => {
                let listing = opt == wire::OPT_LIST_META_CONTEXT;
                if !structured {
                    wire::emit_option_error(
                        &mut out,
                        opt,
                        wire::REP_ERR_INVALID,
                        "negotiate structured replies first",
                    );
                } else {
                    match wire::parse_meta_request(&data) {
                        Err(e) => wire::emit_option_error(
                            &mut out,
                            opt,
                            wire::REP_ERR_INVALID,
                            &e.to_string(),
                        ),
                        Ok(req) => {
                            if catalog.open(&req.name).await.is_none() {
                                wire::emit_option_error(
                                    &mut out,
                                    opt,
                                    wire::REP_ERR_UNKNOWN,
                                    "no such export",
                                );
                            } else {
                                let selected = if req.queries.is_empty() {
                                    listing
                                } else {
                                    req.queries
                                        .iter()
                                        .any(|q| wire::query_matches_base_allocation(q, listing))
                                };
                                if selected {
                                    wire::emit_meta_context(
                                        &mut out,
                                        opt,
                                        wire::BASE_ALLOCATION_ID,
                                        wire::BASE_ALLOCATION,
                                    );
                                }
                                if !listing {
                                    meta = selected;
                                }
                                wire::emit_option_reply(&mut out, opt, wire::REP_ACK, &[]);
                            }
                        }
                    }
                }
            }
            wire::OPT_STARTTLS => {
                wire::emit_option_error(&mut out, opt, wire::REP_ERR_UNSUP, "TLS is not supported")
            }
            _ => wire::emit_option_error(&mut out, opt, wire::REP_ERR_UNSUP, "unsupported option"),
        }
        w.write_all(&out).await?;
        w.flush().await?;
    }
}

fn encode_error(head: &mut Vec<u8>, structured: bool, cookie: u64, errno: u32, msg: &str) {
    if structured {
        wire::emit_structured_error(head, cookie, errno, msg);
    } else {
        wire::emit_simple_reply(head, errno, cookie);
    }
}

fn encode_ok(head: &mut Vec<u8>, structured: bool, cookie: u64) {
    if structured {
        wire::emit_structured_done(head, cookie);
    } else {
        wire::emit_simple_reply(head, 0, cookie);
    }
}

/// Runs one request against the export and encodes its reply.
async fn execute<E: Export>(
    export: &E,
    req: Request,
    payload: Option<AlignedBuf>,
    structured: bool,
    metrics: &NbdMetrics,
) -> Reply {
    let mut head = Vec::with_capacity(32);
    let fua = req.flags & wire::CMD_FLAG_FUA != 0;
    let result: Result<Option<AlignedBuf>, ExportError> = match req.kind {
        wire::CMD_READ => export.read(req.offset, req.length).await.map(Some),
        wire::CMD_WRITE => match payload {
            Some(p) => export.write(req.offset, p, fua).await.map(|_| None),
            None => Err(ExportError::Invalid("write without payload".into())),
        },
        wire::CMD_FLUSH => export.flush().await.map(|_| None),
        wire::CMD_TRIM => export.trim(req.offset, req.length, fua).await.map(|_| None),
        wire::CMD_CACHE => export.cache(req.offset, req.length).await.map(|_| None),
        wire::CMD_WRITE_ZEROES => {
            let flags = ZeroFlags {
                may_trim: req.flags & wire::CMD_FLAG_NO_HOLE == 0,
                fast: req.flags & wire::CMD_FLAG_FAST_ZERO != 0,
                fua,
            };
            export
                .write_zeroes(req.offset, req.length, flags)
                .await
                .map(|_| None)
        }
        wire::CMD_BLOCK_STATUS => match export.block_status(req.offset, req.length).await {
            Ok(extents) => {
                let mut desc: Vec<(u32, u32)> = Vec::with_capacity(extents.len());
                let mut left = req.length as u64;
                for e in extents {
                    if left == 0 {
                        break;
                    }
                    let l = e.length.min(left);
                    if l == 0 {
                        continue;
                    }
                    let flags = (if e.hole { wire::STATE_HOLE } else { 0 })
                        | (if e.zero { wire::STATE_ZERO } else { 0 });
                    desc.push((l as u32, flags));
                    left -= l;
                    if req.flags & wire::CMD_FLAG_REQ_ONE != 0 {
                        break;
                    }
                }
                if desc.is_empty() {
                    Err(ExportError::Io(io::Error::other("no extents")))
                } else {
                    wire::emit_block_status(&mut head, req.cookie, wire::BASE_ALLOCATION_ID, &desc);
                    return Reply { head, data: None };
                }
            }
            Err(e) => Err(e),
        },
        _ => Err(ExportError::Invalid("unknown command".into())),
    };
    match result {
        Ok(Some(data)) => {
            metrics
                .read_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            if structured {
                wire::emit_offset_data_header(&mut head, req.cookie, req.offset, data.len() as u32);
            } else {
                wire::emit_simple_reply(&mut head, 0, req.cookie);
            }
            Reply {
                head,
                data: Some(data),
            }
        }
        Ok(None) => {
            encode_ok(&mut head, structured, req.cookie);
            Reply { head, data: None }
        }
        Err(e) => {
            let errno = e.nbd_errno();
            metrics.count_error(errno);
            tracing::debug!(cmd = req.kind, offset = req.offset, length = req.length, error = %e, "request failed");
            encode_error(&mut head, structured, req.cookie, errno, &e.to_string());
            Reply { head, data: None }
        }
    }
}

async fn writer_task<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(64 << 10, w);
    while let Some(reply) = rx.recv().await {
        w.write_all(&reply.head).await?;
        if let Some(d) = &reply.data {
            w.write_all(d).await?;
        }
        // Batch replies that are already waiting; flush when the queue runs dry.
        if rx.is_empty() {
            w.flush().await?;
        }
    }
    w.flush().await?;
    w.shutdown().await
}

/// Serves one client connection until it disconnects, sends DISC, or breaks the protocol.
pub async fn serve_connection<C, R, W>(
    catalog: Arc<C>,
    r: R,
    w: W,
    metrics: Arc<NbdMetrics>,
) -> io::Result<()>
where
    C: ExportCatalog,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut r = BufReader::with_capacity(64 << 10, r);
    let mut w = w;
    let Some(session) = handshake(&*catalog, &mut r, &mut w).await? else {
        return Ok(());
    };
    let Session {
        export,
        structured,
        meta,
    } = session;
    let size = export.size();
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(writer_task(w, rx));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize));
    let bytes = Arc::new(Semaphore::new(BYTE_BUDGET_KIB as usize));
    let mut hdr = [0u8; wire::REQUEST_LEN];
    let result: io::Result<()> = loop {
        match r.read_exact(&mut hdr).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let req = match wire::parse_request(&hdr) {
            Ok(q) => q,
            Err(e) => {
                metrics.protocol_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "bad request; closing connection");
                break Err(proto_err(e));
            }
        };
        metrics.count_request(req.kind);
        if req.kind == wire::CMD_DISC {
            break Ok(());
        }
        if let Err(wire::Refusal::Errno(errno)) = wire::check_request(&req, size, structured, meta)
        {
            metrics.count_error(errno);
            // A refused WRITE still carries its payload: skip it to stay in sync, unless it is
            // too large to be a real request, in which case the stream cannot be trusted.
            if req.kind == wire::CMD_WRITE {
                if req.length > wire::MAX_PAYLOAD {
                    let mut head = Vec::new();
                    encode_error(
                        &mut head,
                        structured,
                        req.cookie,
                        errno,
                        "request too large",
                    );
                    let _ = tx.send(Reply { head, data: None });
                    metrics.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    break Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "oversized write",
                    ));
                }
                if let Err(e) = discard(&mut r, req.length as u64).await {
                    break Err(e);
                }
            }
            let mut head = Vec::new();
            let msg = match errno {
                wire::ENOSPC => "request extends beyond the end of the export",
                _ => "invalid request",
            };
            encode_error(&mut head, structured, req.cookie, errno, msg);
            let _ = tx.send(Reply { head, data: None });
            continue;
        }
        let payload_len = if matches!(req.kind, wire::CMD_READ | wire::CMD_WRITE) {
            req.length
        } else {
            0
        };
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let kib = payload_len.div_ceil(1024).clamp(1, BYTE_BUDGET_KIB);
        let budget = bytes
            .clone()
            .acquire_many_owned(kib)
            .await
            .expect("semaphore never closed");
        let global = GLOBAL_BYTES
            .acquire_many(kib)
            .await
            .expect("semaphore never closed");
        let payload = if req.kind == wire::CMD_WRITE {
            // read_exact fills it completely or the request is dropped.
            let mut buf = AlignedBuf::for_overwrite(req.length as usize);
            if let Err(e) = r.read_exact(&mut buf).await {
                // Client went away mid-payload: nothing of this write is applied.
                metrics.truncated_writes.fetch_add(1, Ordering::Relaxed);
                break if e.kind() == io::ErrorKind::UnexpectedEof {
                    Ok(())
                } else {
                    Err(e)
                };
            }
            metrics
                .write_bytes
                .fetch_add(req.length as u64, Ordering::Relaxed);
            Some(buf)
        } else {
            None
        };
        let export = export.clone();
        let tx = tx.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let reply = execute(&*export, req, payload, structured, &metrics).await;
            let _ = tx.send(reply);
            drop(global);
            drop(budget);
            drop(slot);
        });
    };
    // Let requests in flight finish and their replies go out, then close.
    let _ = slots.acquire_many(MAX_IN_FLIGHT).await;
    drop(tx);
    let _ = writer.await;
    result
}

/// Accepts TCP connections until `stop` turns true.
pub async fn serve_tcp<C: ExportCatalog>(
    listener: tokio::net::TcpListener,
    catalog: Arc<C>,
    metrics: Arc<NbdMetrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            r = listener.accept() => match r {
                Ok((s, peer)) => {
                    let _ = s.set_nodelay(true);
                    let (rd, wr) = s.into_split();
                    spawn_conn(catalog.clone(), rd, wr, metrics.clone(), peer.to_string());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Accepts unix-socket connections until `stop` turns true.
pub async fn serve_unix<C: ExportCatalog>(
    listener: tokio::net::UnixListener,
    catalog: Arc<C>,
    metrics: Arc<NbdMetrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            r = listener.accept() => match r {
                Ok((s, _)) => {
                    let (rd, wr) = s.into_split();
                    spawn_conn(catalog.clone(), rd, wr, metrics.clone(), "unix".into());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

fn spawn_conn<C, R, W>(catalog: Arc<C>, r: R, w: W, metrics: Arc<NbdMetrics>, peer: String)
where
    C: ExportCatalog,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        metrics.connections_total.fetch_add(1, Ordering::Relaxed);
        metrics.connections_active.fetch_add(1, Ordering::Relaxed);
        let r = serve_connection(catalog, r, w, metrics.clone()).await;
        metrics.connections_active.fetch_sub(1, Ordering::Relaxed);
        match r {
            Ok(()) => tracing::debug!(%peer, "NBD connection closed"),
            Err(e) => tracing::debug!(%peer, error = %e, "NBD connection ended with an error"),
        }
    });
}
