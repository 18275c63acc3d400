//! Live migration: misses imported from the old server, and writes forwarded to it.

use std::sync::atomic::Ordering::Relaxed;

use s3dedup_common::old_server::{Imported, OldServer, OldServerError};
use s3dedup_common::protocol::FilePath;
use s3dedup_common::unix_now;

use super::error::ApiError;
use super::{AppState, ingest_options};

/// Live migration: on a miss, imports `path` from the old server. True when it is stored now.
pub(super) async fn import_miss(state: &AppState, path: &FilePath) -> Result<bool, ApiError> {
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

/// The old server, when writes are to be forwarded to it (live migration with rollback).
pub(super) fn forward_writes(state: &AppState) -> Option<&OldServer> {
    state
        .fallback
        .as_ref()
        .filter(|_| state.cfg.fallback_forward_writes)
}

pub(super) fn stored_but_not_forwarded(e: OldServerError) -> ApiError {
    let e = ApiError::from(e);
    ApiError::new(
        e.status,
        format!("done here, but not on the old server: {}", e.message),
    )
}
