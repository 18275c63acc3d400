//! Live migration: misses imported from the old server, and writes forwarded to it.

use std::sync::atomic::Ordering::Relaxed;

use s3dedup_common::filestore::FileStoreError;
use s3dedup_common::old_server::{Imported, OldServer, OldServerError};
use s3dedup_common::protocol::{FilePath, Version};
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

/// Live migration: the version the old server holds of a path s3dedup knows nothing of (no
/// file, no remembered deletion), when it is newer than `version`. The old server would
/// ignore such a PUT, so s3dedup must too; the newer file is imported so both agree.
pub(super) async fn newer_on_old_server(
    state: &AppState,
    path: &FilePath,
    version: Version,
) -> Result<Option<Version>, ApiError> {
    let Some(old) = &state.fallback else {
        return Ok(None);
    };
    if state.files.stat(path.as_str()).await?.is_some()
        || (state.files.deleted_version(path.as_str()).await)
            .map_err(FileStoreError::from)?
            .is_some()
    {
        return Ok(None); // known here: the usual version rules decide
    }
    let Some(theirs) = old.version(path).await?.filter(|v| *v > version) else {
        return Ok(None);
    };
    tracing::info!(%path, version, old_version = theirs, old_server = old.base(),
        "PUT older than the old server's file: importing that one instead");
    import_miss(state, path).await?;
    Ok(Some(theirs))
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
