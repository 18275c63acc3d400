//! DELETE of a file (during a live migration also of one only the old server has: its deletion
//! is remembered without downloading it).

use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::IntoResponse;
use s3dedup_common::meta::{DeleteKind, DeleteOutcome};
use s3dedup_common::protocol::FilePath;
use s3dedup_common::unix_now;

use super::AppState;
use super::error::{ApiResult, not_found};
use super::fallback::{delete_unimported, forward_writes, stored_but_not_forwarded};
use super::headers::{last_modified, request_version};

pub(super) async fn delete_file(state: &AppState, path: &FilePath, req: &Parts) -> ApiResult {
    let version = request_version(req.uri.query(), &req.headers)?;
    let outcome = match &state.fallback {
        Some(old) => delete_unimported(state, old, path, version).await?,
        None => {
            let (path, now) = (path.as_str(), unix_now());
            state
                .files
                .delete(path, version, now, DeleteKind::Client)
                .await?
        }
    };
    match outcome {
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
