//! GET and HEAD of a file: the stored gzip as it is, or the content inflated for a client that
//! refuses gzip.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use s3dedup_common::inflating;
use s3dedup_common::protocol::FilePath;

use super::error::{ApiResult, not_found};
use super::fallback::{OldHeadAnswer, head_on_old_server, import_miss};
use super::headers::{accepts_gzip, file_headers, headers_of};
use super::{AppState, SlotPermit};

pub(super) async fn head_file(state: &AppState, path: &FilePath, headers: &HeaderMap) -> ApiResult {
    let gzip = accepts_gzip(headers);
    let mut entry = state.files.stat(path.as_str()).await?;
    if entry.is_none() {
        match head_on_old_server(state, path).await? {
            OldHeadAnswer::Headers(version, logical, stored) => {
                let found = headers_of(version, logical, stored, gzip);
                return Ok(with_encoding((found, Body::empty()).into_response(), gzip));
            }
            OldHeadAnswer::NotFound => {}
            OldHeadAnswer::Import => {
                if import_miss(state, path).await? {
                    entry = state.files.stat(path.as_str()).await?;
                }
            }
        }
    }
    let entry = entry.ok_or_else(|| not_found(path))?;
    let r = (file_headers(&entry, gzip), Body::empty()).into_response();
    Ok(with_encoding(r, gzip))
}

/// Marks a response's body as gzip when it is the stored gzip.
fn with_encoding(mut r: Response, gzip: bool) -> Response {
    if gzip {
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    r
}

pub(super) async fn get_file(
    state: &Arc<AppState>, path: &FilePath, headers: &HeaderMap, permit: SlotPermit,
) -> ApiResult {
    let mut opened = state.files.open(path.as_str()).await?;
    if opened.is_none() && import_miss(state, path).await? {
        opened = state.files.open(path.as_str()).await?;
    }
    let opened = opened.ok_or_else(|| not_found(path))?;
    let gzip = accepts_gzip(headers);
    let headers = file_headers(&opened.entry, gzip);
    let what = format!("GET {path} (blob {})", opened.entry.blob.digest);
    let stream: Body = if gzip {
        Body::from_stream(counted(opened.body, state.clone(), permit, what))
    } else {
        Body::from_stream(counted(
            inflating::content_of(opened.body, opened.entry.blob.digest),
            state.clone(),
            permit,
            what,
        ))
    };
    Ok(with_encoding((headers, stream).into_response(), gzip))
}

/// Counts bytes sent and keeps the request's concurrency slot until the body is done. A body
/// that fails partway (`what` the response) ends the client's 200 early: that is logged and
/// counted, since the client may not notice.
pub(super) fn counted<S>(
    s: S, state: Arc<AppState>, permit: SlotPermit, what: String,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
{
    let mut sent = 0u64;
    s.map(move |chunk| {
        let _slot = &permit;
        match &chunk {
            Ok(b) => {
                sent += b.len() as u64;
                state.metrics.bytes_out.fetch_add(b.len() as u64, Relaxed);
            }
            Err(e) => {
                state.metrics.responses_cut.fetch_add(1, Relaxed);
                tracing::warn!(response = what, bytes_sent = sent, error = %e,
                    "a response broke off partway: {what} after {sent} bytes: {e}; the client got \
                     a truncated body");
            }
        }
        chunk
    })
}
