//! A directory's listing, streamed a page of paths at a time.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::header;
use axum::response::IntoResponse;
use bytes::Bytes;
use s3dedup_common::filestore::FileStoreError;
use s3dedup_common::meta::ListPage;
use s3dedup_common::protocol::{self, FilePath};
use s3dedup_common::unix_now;

use super::error::{ApiError, ApiResult};
use super::fallback::add_old_server_listing;
use super::get::counted;
use super::{AppState, SlotPermit};

/// Paths listed per database round trip while streaming a listing.
const LIST_PAGE: usize = 2000;

/// Live migration: s3dedup's listing and the old server's, as one (in memory: the listing of
/// one directory, only while the migration lasts).
async fn union_with_old_server(
    state: &AppState, prefix: &str, cutoff: protocol::Version, first: Vec<String>,
) -> Result<Bytes, ApiError> {
    let mut listed = BTreeSet::new();
    let mut page = first;
    loop {
        let full = page.len() == LIST_PAGE;
        let last = page.last().cloned();
        listed.extend(page.into_iter().map(|p| p[prefix.len()..].to_owned()));
        match last.filter(|_| full) {
            Some(last) => {
                let next = ListPage::first(prefix, cutoff, LIST_PAGE).after(&last);
                page = (state.files.list(&next).await).map_err(FileStoreError::from)?;
            }
            None => break,
        }
    }
    add_old_server_listing(state, prefix, cutoff, &mut listed).await?;
    let mut out = String::with_capacity(listed.len() * 32);
    for name in &listed {
        out.push_str(name);
        out.push('\n');
    }
    Ok(Bytes::from(out))
}

pub(super) async fn list(
    state: &Arc<AppState>, dir: Option<FilePath>, query: Option<&str>, head: bool,
    permit: SlotPermit,
) -> ApiResult {
    let cutoff = match protocol::query_param(query, protocol::PARAM_LAST_MODIFIED)? {
        Some(v) => protocol::parse_version(&v)?,
        None => unix_now(),
    };
    let prefix = dir.map_or_else(|| "/".to_owned(), |d| d.dir_prefix());
    // The first page is fetched before answering, so a database outage is a 503, not an
    // empty listing.
    let files = state.files.clone();
    let first = files
        .list(&ListPage::first(&prefix, cutoff, LIST_PAGE))
        .await
        .map_err(FileStoreError::from)?;
    let headers = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if head {
        return Ok((headers, Body::empty()).into_response());
    }
    if state.has_fallback() {
        let listed = union_with_old_server(state, &prefix, cutoff, first).await?;
        let body = Body::from_stream(counted(
            futures::stream::once(async move { Ok(listed) }),
            state.clone(),
            permit,
            format!("listing of {prefix}"),
        ));
        return Ok((headers, body).into_response());
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
    let what = format!("listing of {prefix}");
    let stream = futures::stream::unfold(Some(first), move |page| {
        let files = files.clone();
        let prefix = prefix.clone();
        let render = render.clone();
        async move {
            let page = page?;
            if page.is_empty() {
                return None;
            }
            let chunk = render(&page);
            let next = if let (LIST_PAGE, Some(last)) = (page.len(), page.last()) {
                match files
                    .list(&ListPage::first(&prefix, cutoff, LIST_PAGE).after(last))
                    .await
                {
                    Ok(p) => Some(p),
                    Err(e) => {
                        tracing::error!(error = %e, "listing failed midway");
                        return Some((Err(std::io::Error::other(e.to_string())), None));
                    }
                }
            } else {
                Some(Vec::new())
            };
            Some((Ok::<_, std::io::Error>(chunk), next))
        }
    });
    let body = Body::from_stream(counted(stream, state.clone(), permit, what));
    Ok((headers, body).into_response())
}
