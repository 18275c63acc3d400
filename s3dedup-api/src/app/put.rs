//! PUT of a file: read and verify the body (in memory if small, else streamed to a blocking
//! ingest), then commit it through the file store.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use bytes::Bytes;
use futures::StreamExt;
use s3dedup_common::blob::{BlobError, Chunk, Encoding, Hints};
use s3dedup_common::config::ApiConfig;
use s3dedup_common::filestore::{FileStoreError, Spooled};
use s3dedup_common::meta::{PutKind, PutOutcome};
use s3dedup_common::protocol::{self, FilePath};
use s3dedup_common::{error_chain, unix_now};

use super::error::{ApiError, ApiResult};
use super::fallback::{forward_writes, newer_on_old_server, stored_but_not_forwarded};
use super::headers::{header_str, last_modified, parse_encoding, parse_hints, request_version};
use super::{AppState, ingest_options};

/// Chunks buffered between the socket and the blocking ingest task (bounded memory per upload:
/// each is at most `server::READ_BUFFER`).
const BODY_QUEUE: usize = 4;
/// Bodies declared this small are read whole and verified on the runtime thread: compressing
/// 16 KiB (or inflating a gzip body to at most 64 KiB) takes tens of microseconds, less than the
/// trip through the blocking pool it saves.
const INLINE_BODY: u64 = 16 * 1024;

/// A request body read within the bounds on a slow client: an error once it has sent nothing
/// for `api.body_timeout_secs` (a stalled upload must not hold its slot and spool file forever),
/// or, that long after it started, when it has sent less than `api.min_body_rate` bytes a second
/// on average (a byte now and then resets no silence and would hold them as long).
pub(super) struct PacedBody {
    body: axum::body::BodyDataStream,
    started: tokio::time::Instant,
    received: u64,
}

impl PacedBody {
    pub(super) fn new(body: axum::body::BodyDataStream) -> Self {
        PacedBody {
            body,
            started: tokio::time::Instant::now(),
            received: 0,
        }
    }

    /// The next chunk; `None` at the end.
    pub(super) async fn next(&mut self, cfg: &ApiConfig) -> Option<Result<Bytes, String>> {
        let next = self.body.next();
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
        if let Some(Ok(chunk)) = &r {
            self.received += chunk.len() as u64;
            if let Some(e) = self.too_slow(cfg) {
                return Some(Err(e));
            }
        }
        r.map(|c| c.map_err(|e| format!("reading request body: {}", error_chain(&e))))
    }

    fn too_slow(&self, cfg: &ApiConfig) -> Option<String> {
        let elapsed = self.started.elapsed();
        let judged = cfg.min_body_rate > 0
            && cfg.body_timeout_secs > 0
            && elapsed >= Duration::from_secs(cfg.body_timeout_secs);
        let rate = self.received as f64 / elapsed.as_secs_f64().max(1e-3);
        (judged && rate < cfg.min_body_rate as f64).then(|| {
            format!(
                "client sent {} bytes in {:.0} s, slower than api.min_body_rate ({} bytes/s)",
                self.received,
                elapsed.as_secs_f64(),
                cfg.min_body_rate
            )
        })
    }
}

/// Reads and discards what is left of a request body, at most `limit` bytes; returns the count.
/// Answering before the body is read makes the server close the connection, which a client
/// still sending (or reusing the connection) sees as a broken pipe instead of the answer.
pub(super) async fn drain(body: &mut PacedBody, cfg: &ApiConfig, limit: u64) -> u64 {
    let mut n = 0u64;
    while n <= limit {
        match body.next(cfg).await {
            Some(Ok(b)) => n += b.len() as u64,
            _ => break,
        }
    }
    n
}

/// How much of an unwanted body is read before answering an error anyway.
pub(super) const DRAIN_ON_ERROR: u64 = 16 << 20;

pub(super) async fn put_file(
    state: &Arc<AppState>, path: FilePath, req: &Parts, body: Body,
) -> ApiResult {
    let mut body = PacedBody::new(body.into_data_stream());
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

pub(super) enum PutStart {
    Ingest(Ingest),
    Newer(protocol::Version),
}

/// How to read and verify a PUT's body.
pub(super) struct Ingest {
    encoding: Encoding,
    hints: Hints,
    version: protocol::Version,
    /// Read whole and verified on the runtime thread ([`INLINE_BODY`]).
    inline: bool,
    /// The body's Content-Length, when declared.
    body_len: Option<u64>,
}

/// Everything a PUT can decide from its headers and the metadata, before reading the body.
pub(super) async fn put_checks(
    state: &AppState, path: &FilePath, req: &Parts,
) -> Result<PutStart, ApiError> {
    let version = request_version(req.uri.query(), &req.headers)?;
    if let Some(newer) = newer_on_old_server(state, path, version).await? {
        return Ok(PutStart::Newer(newer));
    }
    let encoding = parse_encoding(&req.headers)?;
    let hints = parse_hints(&req.headers)?;
    let max = state.cfg.max_file_size;
    let declared = header_str(&req.headers, header::CONTENT_LENGTH)?
        .and_then(|s| s.trim().parse::<u64>().ok());
    if too_large(max, encoding, &hints, declared) {
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
    let inline = read_whole(encoding, &hints, declared, state.files.spool_memory());
    Ok(PutStart::Ingest(Ingest {
        encoding,
        hints,
        version,
        inline,
        body_len: declared,
    }))
}

/// Whether a body is refused before it is read: a claimed content, or a declared body, longer
/// than any acceptable content (gzip may exceed its content by a little on incompressible
/// data).
fn too_large(max: u64, encoding: Encoding, hints: &Hints, declared: Option<u64>) -> bool {
    let body_max = match encoding {
        Encoding::Identity => max,
        Encoding::Gzip => max.saturating_add(max / 64 + 4096),
    };
    hints.logical_size.is_some_and(|n| n > max) || declared.is_some_and(|n| n > body_max)
}

/// Whether a body is read whole and verified on the runtime thread: small and declared so, and
/// a gzip body must also promise a small content (a 16 KiB gzip bomb would inflate to 16 MiB
/// here); it then stays in memory either way, within the spool's memory bound.
fn read_whole(
    encoding: Encoding, hints: &Hints, declared: Option<u64>, spool_memory: usize,
) -> bool {
    let small = declared.is_some_and(|n| n <= INLINE_BODY);
    let bounded = match encoding {
        Encoding::Identity => true,
        Encoding::Gzip => hints.logical_size.is_some_and(|n| n <= 4 * INLINE_BODY),
    };
    small && bounded && spool_memory >= 2 * INLINE_BODY as usize
}

/// Reads a small body whole, then verifies it here (see [`INLINE_BODY`]).
pub(super) async fn ingest_inline(
    state: &Arc<AppState>, mut body: PacedBody, start: Ingest,
) -> Result<Spooled, ApiError> {
    let mut whole = Vec::new();
    loop {
        match body.next(&state.cfg).await {
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
pub(super) async fn ingest_streamed(
    state: &Arc<AppState>, mut body: PacedBody, start: Ingest,
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
        match body.next(&state.cfg).await {
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

pub(super) async fn put_body(
    state: &Arc<AppState>, path: FilePath, body: PacedBody, start: Ingest,
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
    let committed = tokio::spawn(async move {
        files
            .commit(&p, version, spooled, unix_now(), PutKind::Client)
            .await
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hints(logical_size: Option<u64>) -> Hints {
        Hints {
            sha256: None,
            logical_size,
        }
    }

    #[test]
    fn bodies_too_large_are_refused_before_they_are_read() {
        let max = 1 << 20;
        let none = hints(None);
        assert!(!too_large(max, Encoding::Identity, &none, Some(max)));
        assert!(too_large(max, Encoding::Identity, &none, Some(max + 1)));
        // Incompressible content grows a little under gzip: room for that.
        assert!(!too_large(max, Encoding::Gzip, &none, Some(max + 1000)));
        assert!(too_large(max, Encoding::Gzip, &none, Some(2 * max)));
        // A claimed content too large is refused whatever the body.
        assert!(too_large(
            max,
            Encoding::Gzip,
            &hints(Some(max + 1)),
            Some(10)
        ));
        assert!(
            !too_large(max, Encoding::Identity, &none, None),
            "chunked: checked as read"
        );
    }

    #[test]
    fn only_small_bounded_bodies_are_read_whole() {
        let memory = 64 * 1024;
        assert!(read_whole(
            Encoding::Identity,
            &hints(None),
            Some(INLINE_BODY),
            memory
        ));
        assert!(!read_whole(
            Encoding::Identity,
            &hints(None),
            Some(INLINE_BODY + 1),
            memory
        ));
        assert!(
            !read_whole(Encoding::Identity, &hints(None), None, memory),
            "chunked"
        );
        // Gzip: only with a small content promised.
        assert!(!read_whole(Encoding::Gzip, &hints(None), Some(100), memory));
        assert!(read_whole(
            Encoding::Gzip,
            &hints(Some(4 * INLINE_BODY)),
            Some(100),
            memory
        ));
        assert!(!read_whole(
            Encoding::Gzip,
            &hints(Some(4 * INLINE_BODY + 1)),
            Some(100),
            memory
        ));
        // A spool kept out of memory keeps every body out of it.
        assert!(!read_whole(Encoding::Identity, &hints(None), Some(10), 0));
    }
}
