//! HTTP handling: maps Filetracker requests onto the file store and its errors onto statuses.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use s3dedup_common::blob::{BlobError, Chunk, Encoding, Hints, IngestOptions};
use s3dedup_common::config::ApiConfig;
use s3dedup_common::filestore::{FileStore, FileStoreError, Spooled};
use s3dedup_common::inflating;
use s3dedup_common::meta::{DeleteOutcome, MetaError, PutOutcome};
use s3dedup_common::old_server::{Imported, OldServer, OldServerError};
use s3dedup_common::protocol::{self, FilePath, ProtocolError, Route};
use s3dedup_common::store::{ReadCache, StoreError};
use s3dedup_common::unix_now;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// Chunks buffered between the socket and the blocking ingest task (bounded memory per upload:
/// each is at most `server::READ_BUFFER`).
const BODY_QUEUE: usize = 4;
/// Bodies declared this small are read whole and verified on the runtime thread: compressing
/// 16 KiB (or inflating a gzip body to at most 64 KiB) takes tens of microseconds, less than the
/// trip through the blocking pool it saves.
const INLINE_BODY: u64 = 16 * 1024;
/// Paths listed per database round trip while streaming a listing.
const LIST_PAGE: usize = 2000;

/// Everything a request needs.
pub struct AppState {
    pub files: Arc<FileStore>,
    pub metrics: Metrics,
    pub cfg: ApiConfig,
    slots: Arc<Semaphore>,
    /// Slots handed out so far: whether anything happened between two looks.
    slots_granted: AtomicU64,
    /// Live migration: the old server that misses are imported from.
    fallback: Option<OldServer>,
    /// The local read cache in front of S3, if any (for `/metrics`).
    pub cache: Option<Arc<ReadCache>>,
}

impl AppState {
    pub fn new(files: Arc<FileStore>, cfg: ApiConfig) -> Result<Self, OldServerError> {
        let timeout = Duration::from_secs(cfg.fallback_timeout_secs);
        let fallback = match &cfg.fallback_url {
            None => None,
            Some(url) => Some(OldServer::new(url.as_str(), timeout)?),
        };
        Ok(AppState {
            slots: Arc::new(Semaphore::new(cfg.max_concurrent_requests)),
            slots_granted: AtomicU64::new(0),
            files,
            metrics: Metrics::default(),
            cfg,
            fallback,
            cache: None,
        })
    }

    /// How many file and list requests have started, if none is running now (a GET's body
    /// holds its slot until it is sent); `None` while one is.
    pub fn idle_after(&self) -> Option<u64> {
        let granted = self.slots_granted.load(Relaxed);
        (self.slots.available_permits() == self.cfg.max_concurrent_requests).then_some(granted)
    }
}

/// An error answer: the message goes in a `text/plain` body and the `X-Exception` header.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Header values cannot hold newlines or non-visible bytes; keep the header readable.
        let header_text: String = self
            .message
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .take(1000)
            .collect();
        let mut r = (self.status, format!("{}\n", self.message)).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Ok(v) = HeaderValue::from_str(&header_text) {
            r.headers_mut().insert(protocol::HEADER_EXCEPTION, v);
        }
        r
    }
}

impl From<ProtocolError> for ApiError {
    fn from(e: ProtocolError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
    }
}

impl From<FileStoreError> for ApiError {
    fn from(e: FileStoreError) -> Self {
        let status = match &e {
            FileStoreError::Meta(MetaError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            FileStoreError::Meta(_) => StatusCode::INTERNAL_SERVER_ERROR,
            FileStoreError::Store(StoreError::Unavailable { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            FileStoreError::Store(StoreError::Full { .. }) => StatusCode::INSUFFICIENT_STORAGE,
            FileStoreError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            FileStoreError::Lock(_) | FileStoreError::Changed { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            FileStoreError::Blob(BlobError::TooLarge(_) | BlobError::GzipBomb(_)) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            _ if e.is_out_of_space() => StatusCode::INSUFFICIENT_STORAGE,
            FileStoreError::Blob(b) if b.is_client_error() => StatusCode::BAD_REQUEST,
            FileStoreError::Blob(_) | FileStoreError::Spool { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            FileStoreError::Config(_)
            | FileStoreError::ObjectMissing { .. }
            | FileStoreError::IngestTask(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "request failed");
        }
        ApiError::new(status, e.to_string())
    }
}

impl From<OldServerError> for ApiError {
    fn from(e: OldServerError) -> Self {
        match e {
            OldServerError::Store(e) => e.into(),
            other => {
                tracing::error!(error = %other, "live migration failed");
                ApiError::new(StatusCode::BAD_GATEWAY, other.to_string())
            }
        }
    }
}

type ApiResult = Result<Response, ApiError>;

fn route_label(route: &Route) -> &'static str {
    match route {
        Route::Version => "version",
        Route::Status => "status",
        Route::Health => "health",
        Route::Metrics => "metrics",
        Route::File(_) => "files",
        Route::List(_) => "list",
    }
}

/// The single entry point: method check, routing, concurrency bound, metrics.
pub async fn dispatch(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let (label, response) = match route(&state, req).await {
        Ok((label, r)) => (label, r),
        Err((label, e)) => (label, e.into_response()),
    };
    state.metrics.record(
        label,
        method.as_str(),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

async fn route(
    state: &Arc<AppState>,
    req: Request,
) -> Result<(&'static str, Response), (&'static str, ApiError)> {
    let (parts, body) = req.into_parts();
    let method = parts.method.clone();
    if ![Method::GET, Method::HEAD, Method::PUT, Method::DELETE].contains(&method) {
        let e = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} not allowed"),
        );
        return Err(("other", e));
    }
    let r = Route::parse(parts.uri.path(), state.cfg.max_path_length)
        .map_err(|e| ("other", ApiError::from(e)))?;
    let label = route_label(&r);
    let read_only = method == Method::GET || method == Method::HEAD;
    let not_allowed = || {
        (
            label,
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {method} not allowed here"),
            ),
        )
    };
    let result = match r {
        Route::Version if read_only => Ok(version()),
        Route::Status if read_only => Ok((StatusCode::OK, "OK\n").into_response()),
        Route::Health if read_only => Ok(health(state).await),
        Route::Metrics if read_only => Ok(metrics(state).await),
        Route::File(path) => {
            let permit = acquire_slot(state).await.map_err(|e| (label, e))?;
            state.metrics.in_flight.fetch_add(1, Relaxed);
            let result = match method {
                Method::GET => get_file(state, &path, &parts.headers, permit).await,
                Method::HEAD => head_file(state, &path, &parts.headers).await,
                Method::PUT => put_file(state, path, &parts, body).await,
                _ => delete_file(state, &path, &parts).await,
            };
            state.metrics.in_flight.fetch_sub(1, Relaxed);
            result
        }
        Route::List(dir) if read_only => {
            let permit = acquire_slot(state).await.map_err(|e| (label, e))?;
            list(
                state,
                dir,
                parts.uri.query(),
                method == Method::HEAD,
                permit,
            )
            .await
        }
        _ => return Err(not_allowed()),
    };
    result.map(|r| (label, r)).map_err(|e| (label, e))
}

async fn acquire_slot(state: &AppState) -> Result<OwnedSemaphorePermit, ApiError> {
    let wait = Duration::from_secs(state.cfg.queue_timeout_secs);
    match tokio::time::timeout(wait, state.slots.clone().acquire_owned()).await {
        Ok(Ok(p)) => {
            state.slots_granted.fetch_add(1, Relaxed);
            Ok(p)
        }
        _ => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "server busy: {} requests in progress, waited {}s for a slot",
                state.cfg.max_concurrent_requests, state.cfg.queue_timeout_secs
            ),
        )),
    }
}

fn version() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        "{\"protocol_versions\": [2]}",
    )
        .into_response()
}

async fn health(state: &AppState) -> Response {
    let (meta, store) = tokio::join!(state.files.meta.check(), state.files.store.check());
    let ok = meta.is_ok() && store.is_ok();
    let show = |r: Result<(), String>| match r {
        Ok(()) => serde_json::Value::from("ok"),
        Err(e) => serde_json::Value::from(e),
    };
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "unavailable" },
        "metadata": show(meta.map_err(|e| e.to_string())),
        "store": show(store.map_err(|e| e.to_string())),
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics(state: &AppState) -> Response {
    let stats = state.files.meta.stats().await.ok();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(
            stats.as_ref(),
            state.cache.as_ref().map(|c| c.stats()),
            state.files.lock_incidents(),
        ),
    )
        .into_response()
}

fn header_str(
    headers: &HeaderMap,
    name: impl header::AsHeaderName,
) -> Result<Option<&str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "header is not visible ASCII")),
    }
}

fn last_modified(version: protocol::Version) -> (header::HeaderName, HeaderValue) {
    let v = HeaderValue::from_str(&protocol::format_version(version))
        .unwrap_or_else(|_| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"));
    (header::LAST_MODIFIED, v)
}

/// Whether the client takes the stored gzip bytes. No `Accept-Encoding` means anything goes,
/// which is what the old server assumed for every client.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let Some(v) = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
    else {
        return true;
    };
    let mut star = None;
    for item in v.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q_zero = parts.any(|p| {
            let p = p.trim();
            p.strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q == 0.0)
        });
        match coding.as_str() {
            "gzip" | "x-gzip" => return !q_zero,
            "*" => star = Some(!q_zero),
            _ => {}
        }
    }
    star.unwrap_or(false)
}

fn file_headers(
    entry: &s3dedup_common::meta::FileEntry,
    gzip: bool,
) -> [(header::HeaderName, HeaderValue); 4] {
    let logical = entry.blob.logical_size;
    let length = if gzip {
        entry.blob.stored_size
    } else {
        logical
    };
    [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        ),
        last_modified(entry.version),
        (
            header::HeaderName::from_static(protocol::HEADER_LOGICAL_SIZE),
            HeaderValue::from(logical),
        ),
        (header::CONTENT_LENGTH, HeaderValue::from(length)),
    ]
}

fn not_found(path: &FilePath) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("file {path} not found"))
}

fn ingest_options(cfg: &ApiConfig) -> IngestOptions {
    IngestOptions {
        level: cfg.compression_level,
        max_logical_size: cfg.max_file_size,
        max_gzip_ratio: cfg.max_gzip_ratio,
    }
}

/// Live migration: on a miss, imports `path` from the old server. True when it is stored now.
async fn import_miss(state: &AppState, path: &FilePath) -> Result<bool, ApiError> {
    let Some(old) = &state.fallback else {
        return Ok(false);
    };
    let imported = old
        .import(
            &state.files,
            path,
            ingest_options(&state.cfg),
            None,
            false,
            unix_now(),
        )
        .await?;
    if let Imported::Stored { version, .. } = imported {
        state.metrics.fallback_imports.fetch_add(1, Relaxed);
        tracing::info!(%path, version, old_server = old.base(), "imported on a miss");
    }
    // `Present`: a concurrent request stored it meanwhile.
    Ok(matches!(
        imported,
        Imported::Stored { .. } | Imported::Present
    ))
}

async fn head_file(state: &AppState, path: &FilePath, headers: &HeaderMap) -> ApiResult {
    let mut entry = state.files.stat(path.as_str()).await?;
    if entry.is_none() && import_miss(state, path).await? {
        entry = state.files.stat(path.as_str()).await?;
    }
    let entry = entry.ok_or_else(|| not_found(path))?;
    let gzip = accepts_gzip(headers);
    let mut r = (file_headers(&entry, gzip), Body::empty()).into_response();
    if gzip {
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    Ok(r)
}

async fn get_file(
    state: &Arc<AppState>,
    path: &FilePath,
    headers: &HeaderMap,
    permit: OwnedSemaphorePermit,
) -> ApiResult {
    let mut opened = state.files.open(path.as_str()).await?;
    if opened.is_none() && import_miss(state, path).await? {
        opened = state.files.open(path.as_str()).await?;
    }
    let opened = opened.ok_or_else(|| not_found(path))?;
    let gzip = accepts_gzip(headers);
    let headers = file_headers(&opened.entry, gzip);
    let stream: Body = if gzip {
        Body::from_stream(counted(opened.body, state.clone(), permit))
    } else {
        Body::from_stream(counted(
            inflating::content_of(opened.body, opened.entry.blob.digest),
            state.clone(),
            permit,
        ))
    };
    let mut r = (headers, stream).into_response();
    if gzip {
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    Ok(r)
}

/// Counts bytes sent and keeps the request's concurrency slot until the body is done.
fn counted<S>(
    s: S,
    state: Arc<AppState>,
    permit: OwnedSemaphorePermit,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
{
    s.map(move |chunk| {
        let _slot = &permit;
        if let Ok(b) = &chunk {
            state.metrics.bytes_out.fetch_add(b.len() as u64, Relaxed);
        }
        chunk
    })
}

fn parse_hints(headers: &HeaderMap) -> Result<Hints, ApiError> {
    let sha256 = header_str(headers, protocol::HEADER_SHA256)?
        .map(|s| {
            s.parse().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("invalid SHA256-Checksum {s:?}"),
                )
            })
        })
        .transpose()?;
    let logical_size = header_str(headers, protocol::HEADER_LOGICAL_SIZE)?
        .map(|s| {
            s.trim().parse::<u64>().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("invalid Logical-Size {s:?}"),
                )
            })
        })
        .transpose()?;
    Ok(Hints {
        sha256,
        logical_size,
    })
}

fn parse_encoding(headers: &HeaderMap) -> Result<Encoding, ApiError> {
    match header_str(headers, header::CONTENT_ENCODING)?.map(|s| s.trim().to_ascii_lowercase()) {
        None => Ok(Encoding::Identity),
        Some(e) if e.is_empty() || e == "identity" => Ok(Encoding::Identity),
        Some(e) if e == "gzip" || e == "x-gzip" => Ok(Encoding::Gzip),
        Some(e) => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("unsupported Content-Encoding {e:?}: send gzip or identity"),
        )),
    }
}

fn request_version(
    req_query: Option<&str>,
    headers: &HeaderMap,
) -> Result<protocol::Version, ApiError> {
    let header = header_str(headers, header::LAST_MODIFIED)?;
    Ok(protocol::request_version(req_query, header)?)
}

/// The next chunk of a request body; an error once the client has sent nothing for
/// `api.body_timeout_secs` (a stalled upload must not hold its slot and spool file forever).
async fn next_chunk(
    body: &mut axum::body::BodyDataStream,
    cfg: &ApiConfig,
) -> Option<Result<Bytes, String>> {
    let next = body.next();
    let r = if cfg.body_timeout_secs == 0 {
        next.await
    } else {
        let limit = Duration::from_secs(cfg.body_timeout_secs);
        match tokio::time::timeout(limit, next).await {
            Ok(r) => r,
            Err(_) => {
                return Some(Err(format!(
                    "client sent no body data for {} s (api.body_timeout_secs)",
                    cfg.body_timeout_secs
                )));
            }
        }
    };
    r.map(|c| c.map_err(|e| format!("reading request body: {e}")))
}

/// Reads and discards what is left of a request body, at most `limit` bytes; returns the count.
/// Answering before the body is read makes the server close the connection, which a client
/// still sending (or reusing the connection) sees as a broken pipe instead of the answer.
async fn drain(body: &mut axum::body::BodyDataStream, cfg: &ApiConfig, limit: u64) -> u64 {
    let mut n = 0u64;
    while n <= limit {
        match next_chunk(body, cfg).await {
            Some(Ok(b)) => n += b.len() as u64,
            _ => break,
        }
    }
    n
}

/// How much of an unwanted body is read before answering an error anyway.
const DRAIN_ON_ERROR: u64 = 16 << 20;

async fn put_file(state: &Arc<AppState>, path: FilePath, req: &Parts, body: Body) -> ApiResult {
    let mut body = body.into_data_stream();
    match put_checks(state, &path, req).await {
        Ok(PutStart::Ingest(start)) => put_body(state, path, body, start).await,
        Ok(PutStart::Newer(version)) => {
            // A strictly newer stored version wins: nothing to store, but read the body so the
            // client gets its 200 on a healthy connection.
            let n = drain(&mut body, &state.cfg, state.cfg.max_file_size).await;
            state.metrics.bytes_in.fetch_add(n, Relaxed);
            Ok(([last_modified(version)], "").into_response())
        }
        Err(e) => {
            if e.status != StatusCode::PAYLOAD_TOO_LARGE {
                drain(&mut body, &state.cfg, DRAIN_ON_ERROR).await;
            }
            Err(e)
        }
    }
}

enum PutStart {
    Ingest(Ingest),
    Newer(protocol::Version),
}

/// How to read and verify a PUT's body.
struct Ingest {
    encoding: Encoding,
    hints: Hints,
    version: protocol::Version,
    /// Read whole and verified on the runtime thread ([`INLINE_BODY`]).
    inline: bool,
    /// The body's Content-Length, when declared.
    body_len: Option<u64>,
}

/// Everything a PUT can decide from its headers and the metadata, before reading the body.
async fn put_checks(state: &AppState, path: &FilePath, req: &Parts) -> Result<PutStart, ApiError> {
    let version = request_version(req.uri.query(), &req.headers)?;
    let encoding = parse_encoding(&req.headers)?;
    let hints = parse_hints(&req.headers)?;
    let max = state.cfg.max_file_size;
    // A body longer than any acceptable content is refused before it is read; gzip may
    // exceed its content by a little on incompressible data.
    let body_max = match encoding {
        Encoding::Identity => max,
        Encoding::Gzip => max.saturating_add(max / 64 + 4096),
    };
    let declared = header_str(&req.headers, header::CONTENT_LENGTH)?
        .and_then(|s| s.trim().parse::<u64>().ok());
    if hints.logical_size.is_some_and(|n| n > max) || declared.is_some_and(|n| n > body_max) {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("content exceeds the maximum size of {max} bytes"),
        ));
    }
    // Skipping a body that a newer stored version makes useless pays for a lookup only when
    // the body is large; the commit keeps a newer version either way.
    let small = declared.is_some_and(|n| n <= INLINE_BODY);
    if !small
        && let Some(entry) = state.files.stat(path.as_str()).await?
        && entry.version > version
    {
        return Ok(PutStart::Newer(entry.version));
    }
    // A small body stays in memory either way (within the spool's memory bound). A gzip body
    // must also promise a small content: a 16 KiB gzip bomb would inflate to 16 MiB here.
    let bounded = match encoding {
        Encoding::Identity => true,
        Encoding::Gzip => hints.logical_size.is_some_and(|n| n <= 4 * INLINE_BODY),
    };
    let fits = state.files.spool_memory() >= 2 * INLINE_BODY as usize;
    Ok(PutStart::Ingest(Ingest {
        encoding,
        hints,
        version,
        inline: small && bounded && fits,
        body_len: declared,
    }))
}

/// Reads a small body whole, then verifies it here (see [`INLINE_BODY`]).
async fn ingest_inline(
    state: &Arc<AppState>,
    mut body: axum::body::BodyDataStream,
    start: Ingest,
) -> Result<Spooled, ApiError> {
    let mut whole = Vec::new();
    loop {
        match next_chunk(&mut body, &state.cfg).await {
            Some(Ok(bytes)) => {
                whole.extend_from_slice(&bytes);
                // Hyper stops at the declared length; this only guards that promise.
                if whole.len() as u64 > INLINE_BODY {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "body longer than its Content-Length",
                    ));
                }
            }
            Some(Err(e)) => return Err(FileStoreError::Blob(BlobError::Interrupted(e)).into()),
            None => break,
        }
    }
    state
        .metrics
        .bytes_in
        .fetch_add(whole.len() as u64, Relaxed);
    let opts = ingest_options(&state.cfg);
    Ok(state
        .files
        .spool_blocking(&whole[..], start.encoding, &start.hints, &opts)?)
}

/// Streams a body to a blocking task that verifies it as it arrives.
async fn ingest_streamed(
    state: &Arc<AppState>,
    mut body: axum::body::BodyDataStream,
    start: Ingest,
) -> Result<Spooled, ApiError> {
    let Ingest {
        encoding,
        hints,
        body_len,
        ..
    } = start;
    let opts = ingest_options(&state.cfg);
    // A large upload of new content is sent on to S3 while it arrives.
    let (tx, ingesting) = state
        .files
        .start_ingest(encoding, hints, opts, body_len, BODY_QUEUE)
        .await;
    let mut received = 0u64;
    loop {
        match next_chunk(&mut body, &state.cfg).await {
            Some(Ok(bytes)) => {
                received += bytes.len() as u64;
                if tx.send(Chunk::Data(bytes)).await.is_err() {
                    // The ingest task stopped early (bad gzip, too large); its error says why.
                    // Read a bounded rest of the body so the client sees that error.
                    received += drain(&mut body, &state.cfg, DRAIN_ON_ERROR).await;
                    break;
                }
            }
            Some(Err(e)) => {
                let _ = tx.send(Chunk::Failed(e)).await;
                break;
            }
            None => {
                let _ = tx.send(Chunk::End).await;
                break;
            }
        }
    }
    drop(tx);
    state.metrics.bytes_in.fetch_add(received, Relaxed);
    Ok(ingesting.finish().await?)
}

async fn put_body(
    state: &Arc<AppState>,
    path: FilePath,
    body: axum::body::BodyDataStream,
    start: Ingest,
) -> ApiResult {
    let version = start.version;
    let spooled = if start.inline {
        ingest_inline(state, body, start).await?
    } else {
        ingest_streamed(state, body, start).await?
    };
    // Commit in a task of its own: a client hanging up now must not cancel it halfway.
    let files = state.files.clone();
    let p = path.as_str().to_owned();
    let committed =
        tokio::spawn(async move { files.commit(&p, version, spooled, unix_now()).await })
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("commit task failed: {e}"),
                )
            })??;
    let counter = if committed.deduplicated {
        &state.metrics.dedup_hits
    } else {
        &state.metrics.dedup_misses
    };
    counter.fetch_add(1, Relaxed);
    match committed.outcome {
        PutOutcome::Stored { version } => {
            if let Some(old) = forward_writes(state) {
                old.forward_put(&state.files, &path)
                    .await
                    .map_err(stored_but_not_forwarded)?;
            }
            Ok(([last_modified(version)], "").into_response())
        }
        // Client PUTs are not imports, so never `Deleted`; answer with what is stored.
        PutOutcome::Newer { version } | PutOutcome::Deleted { version } => {
            Ok(([last_modified(version)], "").into_response())
        }
    }
}

/// The old server, when writes are to be forwarded to it (live migration with rollback).
fn forward_writes(state: &AppState) -> Option<&OldServer> {
    state
        .fallback
        .as_ref()
        .filter(|_| state.cfg.fallback_forward_writes)
}

fn stored_but_not_forwarded(e: OldServerError) -> ApiError {
    let e = ApiError::from(e);
    ApiError::new(
        e.status,
        format!("done here, but not on the old server: {}", e.message),
    )
}

async fn delete_file(state: &AppState, path: &FilePath, req: &Parts) -> ApiResult {
    let version = request_version(req.uri.query(), &req.headers)?;
    // Live migration: a file only the old server holds is imported first, so deleting it here
    // is remembered and neither the fallback nor the migrator brings it back.
    if state.fallback.is_some() && state.files.stat(path.as_str()).await?.is_none() {
        import_miss(state, path).await?;
    }
    match state
        .files
        .delete(path.as_str(), version, unix_now())
        .await?
    {
        DeleteOutcome::Deleted => {
            if let Some(old) = forward_writes(state) {
                old.forward_delete(path, version)
                    .await
                    .map_err(stored_but_not_forwarded)?;
            }
            Ok((StatusCode::OK, "").into_response())
        }
        DeleteOutcome::Newer { version } => Ok(([last_modified(version)], "").into_response()),
        DeleteOutcome::NotFound => Err(not_found(path)),
    }
}

async fn list(
    state: &Arc<AppState>,
    dir: Option<FilePath>,
    query: Option<&str>,
    head: bool,
    permit: OwnedSemaphorePermit,
) -> ApiResult {
    let cutoff = match protocol::query_param(query, protocol::PARAM_LAST_MODIFIED)? {
        Some(v) => protocol::parse_version(&v)?,
        None => unix_now(),
    };
    let prefix = dir.map_or_else(|| "/".to_owned(), |d| d.dir_prefix());
    // The first page is fetched before answering, so a database outage is a 503, not an
    // empty listing.
    let meta = state.files.meta.clone();
    let first = meta
        .list_files(&prefix, cutoff, None, LIST_PAGE)
        .await
        .map_err(FileStoreError::from)?;
    let headers = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if head {
        return Ok((headers, Body::empty()).into_response());
    }
    let render = {
        let prefix = prefix.clone();
        move |paths: &[String]| {
            let mut out = String::with_capacity(paths.len() * 32);
            for p in paths {
                out.push_str(&p[prefix.len()..]);
                out.push('\n');
            }
            Bytes::from(out)
        }
    };
    let stream = futures::stream::unfold(Some(first), move |page| {
        let meta = meta.clone();
        let prefix = prefix.clone();
        let render = render.clone();
        async move {
            let page = page?;
            if page.is_empty() {
                return None;
            }
            let chunk = render(&page);
            let next = if page.len() < LIST_PAGE {
                Some(Vec::new())
            } else {
                match meta
                    .list_files(&prefix, cutoff, page.last().map(String::as_str), LIST_PAGE)
                    .await
                {
                    Ok(p) => Some(p),
                    Err(e) => {
                        tracing::error!(error = %e, "listing failed midway");
                        return Some((Err(std::io::Error::other(e.to_string())), None));
                    }
                }
            };
            Some((Ok::<_, std::io::Error>(chunk), next))
        }
    });
    let body = Body::from_stream(counted(stream, state.clone(), permit));
    Ok((headers, body).into_response())
}
