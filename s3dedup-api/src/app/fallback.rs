//! Live migration: misses imported from the old server, and writes forwarded to it.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};

use s3dedup_common::meta::{DeleteKind, DeleteOutcome};
use s3dedup_common::old_server::{Imported, OldServer, OldServerError};
use s3dedup_common::protocol::{FilePath, Version};
use s3dedup_common::unix_now;

use super::error::ApiError;
use super::{AppState, ingest_options};

/// Imports under way, one entry per path: concurrent misses of one path take turns, and all but
/// the first find it stored instead of each downloading it. Entries live only while a request
/// for their path does, so the map is bounded by the request slots.
#[derive(Default)]
pub(super) struct ImportsInFlight(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl ImportsInFlight {
    fn turn<'a>(&'a self, path: &FilePath) -> Turn<'a> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let path = path.as_str().to_owned();
        let lock = map.entry(path.clone()).or_default().clone();
        Turn {
            imports: self,
            path,
            lock,
        }
    }
}

/// A request's place in its path's queue; leaving it (also by a cancelled request) removes
/// the path's entry when nobody else is in it.
struct Turn<'a> {
    imports: &'a ImportsInFlight,
    path: String,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut map = (self.imports.0.lock()).unwrap_or_else(PoisonError::into_inner);
        // Counted under the map's lock, where every holder took its clone: the map's
        // reference and this one mean nobody else waits.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.path);
        }
    }
}

/// Live migration: on a miss, imports `path` from the old server. True when it is stored now.
pub(super) async fn import_miss(state: &AppState, path: &FilePath) -> Result<bool, ApiError> {
    if state.fallback.is_none() {
        return Ok(false);
    }
    let turn = state.imports.turn(path);
    let _mine = turn.lock.lock().await;
    if state.files.stat(path.as_str()).await?.is_some() {
        return Ok(true); // the request before this one imported it
    }
    import_now(state, path).await
}

async fn import_now(state: &AppState, path: &FilePath) -> Result<bool, ApiError> {
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
    state: &AppState, path: &FilePath, version: Version,
) -> Result<Option<Version>, ApiError> {
    let Some(old) = &state.fallback else {
        return Ok(None);
    };
    if state.files.stat(path.as_str()).await?.is_some()
        || state.files.deleted_version(path.as_str()).await?.is_some()
    {
        return Ok(None); // known here: the usual version rules decide
    }
    let theirs = old.head(path).await?.map(|h| h.version);
    let Some(theirs) = theirs.filter(|v| *v > version) else {
        return Ok(None);
    };
    tracing::info!(%path, version, old_version = theirs, old_server = old.base(),
        "PUT older than the old server's file: importing that one instead");
    import_miss(state, path).await?;
    Ok(Some(theirs))
}

/// How a HEAD of a path s3dedup does not have is answered during live migration.
pub(super) enum OldHeadAnswer {
    /// From the old server's HEAD, without downloading the file: version, content length
    /// and gzip length.
    Headers(Version, u64, u64),
    /// 404: no fallback, the old server has no such file, or it was deleted here since.
    NotFound,
    /// The old server did not say the sizes: the file must be imported to answer.
    Import,
}

pub(super) async fn head_on_old_server(
    state: &AppState, path: &FilePath,
) -> Result<OldHeadAnswer, ApiError> {
    let Some(old) = &state.fallback else {
        return Ok(OldHeadAnswer::NotFound);
    };
    let Some(head) = old.head(path).await? else {
        return Ok(OldHeadAnswer::NotFound);
    };
    let deleted = state.files.deleted_version(path.as_str()).await?;
    Ok(match (head.logical_size, head.stored_size) {
        _ if deleted.is_some_and(|d| d >= head.version) => OldHeadAnswer::NotFound,
        (Some(logical), Some(stored)) => OldHeadAnswer::Headers(head.version, logical, stored),
        _ => OldHeadAnswer::Import,
    })
}

/// Live migration: adds to `listed` (names relative to `prefix`, from s3dedup's own listing) the
/// ones only the old server lists, except paths deleted here. What s3dedup has wins; a client
/// sees every file of both.
pub(super) async fn add_old_server_listing(
    state: &AppState, prefix: &str, cutoff: Version, listed: &mut BTreeSet<String>,
) -> Result<(), ApiError> {
    let Some(old) = &state.fallback else {
        return Ok(());
    };
    for name in old.list_dir(prefix, cutoff).await? {
        if listed.contains(&name) {
            continue;
        }
        let path = format!("{prefix}{name}");
        let deleted = state.files.deleted_version(&path).await?;
        if deleted.is_none() {
            listed.insert(name);
        }
    }
    Ok(())
}

/// Live migration: a DELETE, decided for a path s3dedup has no file at from the old server's
/// HEAD without downloading the file; its deletion is remembered, so neither the fallback nor
/// the migrator brings it back.
pub(super) async fn delete_unimported(
    state: &AppState, old: &OldServer, path: &FilePath, version: Version,
) -> Result<DeleteOutcome, ApiError> {
    // In turn with imports of the path, so one cannot store it between the two steps here.
    let turn = state.imports.turn(path);
    let _mine = turn.lock.lock().await;
    if state.files.stat(path.as_str()).await?.is_none() {
        match old.head(path).await? {
            None => return Ok(DeleteOutcome::NotFound),
            // The old server keeps a newer file over an older delete; so does s3dedup.
            Some(head) if head.version > version => {
                return Ok(DeleteOutcome::Newer {
                    version: head.version,
                });
            }
            Some(_) => {}
        }
    }
    // Stored here (by now) or only on the old server: one transaction decides either way.
    let kind = DeleteKind::Unimported;
    Ok((state.files)
        .delete(path.as_str(), version, unix_now(), kind)
        .await?)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn misses_of_one_path_take_turns_and_leave_nothing_behind() {
        let imports = ImportsInFlight::default();
        let a = FilePath::parse("/a", 100).unwrap();
        let first = imports.turn(&a);
        let held = first.lock.clone().lock_owned().await;
        let second = imports.turn(&a);
        assert!(
            second.lock.try_lock().is_err(),
            "the second waits for the first"
        );
        drop(held);
        drop(first);
        assert!(second.lock.try_lock().is_ok());
        assert_eq!(
            imports.0.lock().unwrap().len(),
            1,
            "the second is still in line"
        );
        drop(second);
        assert!(imports.0.lock().unwrap().is_empty());
    }
}
