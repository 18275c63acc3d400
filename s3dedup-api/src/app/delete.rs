//! DELETE of a file (imported from the old server first during a live migration, so that its
//! deletion is remembered).

use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::IntoResponse;
use s3dedup_common::meta::DeleteOutcome;
use s3dedup_common::protocol::FilePath;
use s3dedup_common::unix_now;

use super::AppState;
use super::error::{ApiResult, not_found};
use super::fallback::{forward_writes, import_miss, stored_but_not_forwarded};
use super::headers::{last_modified, request_version};

pub(super) async fn delete_file(state: &AppState, path: &FilePath, req: &Parts) -> ApiResult {
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
