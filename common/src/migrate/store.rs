//! Another s3dedup store as the source (`s3dedup:CONFIG_FILE`): opened from its own
//! configuration without creating anything, its files read in path order and each copied
//! through the codec (so its content is checked against its digest on the way), then its
//! remembered deletions carried over. Running it again after clients moved is the final delta:
//! what changed is copied, what was deleted there is deleted here, by the usual version rules.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::mpsc::Sender;

use crate::blob::{Encoding, Hints};
use crate::config::{self, Config, MetadataBackend, StoreBackend};
use crate::filestore::{FileStore, FileStoreError};
use crate::meta::{DeleteKind, ListPage, PutKind};
use crate::protocol::{self, FilePath, Version};
use crate::secrets::{SecretFiles, Secrets};
use crate::throttle::Throttle;

use super::{
    Done, INGEST, Item, MigrateError, MigrateReport, Origin, RunOptions, Work, each_page, settled,
};

/// Paths listed, and deletions read, per query.
const PAGE: usize = 1000;

/// Opens the store `file` configures, for reading. Refuses a store that is not there (a missing
/// SQLite database or object directory would otherwise be created, empty) and the store being
/// imported into.
pub(super) async fn open(file: &Path, here: &FileStore) -> Result<Arc<FileStore>, MigrateError> {
    let fail = |why: String| MigrateError::OtherStore {
        config: file.to_owned(),
        why,
    };
    let cfg = config::load(Some(file), &[]).map_err(|e| fail(e.to_string()))?;
    if let Some(missing) = parts_on_disk(&cfg).into_iter().find(|p| !p.exists()) {
        return Err(fail(format!(
            "{} does not exist: no store there",
            missing.display()
        )));
    }
    let secrets = Secrets::read(&cfg, &SecretFiles::new(None, Some(file)))
        .map_err(|e| fail(e.to_string()))?;
    let other = FileStore::from_config(&cfg, &secrets)
        .await
        .map_err(|e| fail(e.to_string()))?;
    if other.describe() == here.describe() {
        return Err(fail("it is the store being imported into".into()));
    }
    Ok(Arc::new(other))
}

/// What a store keeps on this machine and must find there.
fn parts_on_disk(cfg: &Config) -> Vec<PathBuf> {
    let mut parts = Vec::new();
    if cfg.metadata.backend == MetadataBackend::Sqlite {
        parts.push(cfg.sqlite_path());
    }
    if cfg.store.backend == StoreBackend::Local {
        parts.push(cfg.local_store_path());
    }
    parts
}

/// The source's paths in order, from the one after `resume`.
pub(super) async fn list(other: Arc<FileStore>, resume: Option<String>, tx: Sender<Work>) {
    let mut after = resume.unwrap_or_default();
    loop {
        let page = ListPage::first("", Version::MAX, PAGE).after(&after);
        let paths = match other.list(&page).await {
            Ok(p) if p.is_empty() => return,
            Ok(p) => p,
            Err(e) => {
                let work = Work {
                    position: None,
                    item: Err((
                        "the source's file list".into(),
                        MigrateError::SourceFile(e.into()),
                    )),
                };
                let _ = tx.send(work).await;
                return;
            }
        };
        for path in paths {
            let item = FilePath::parse(&path, protocol::DEFAULT_MAX_PATH_LEN)
                .map(|path| Item {
                    path,
                    origin: Origin::Store,
                })
                .map_err(|e| (path.clone(), MigrateError::Source(e.to_string())));
            let work = Work {
                position: Some(path.clone()),
                item,
            };
            if tx.send(work).await.is_err() {
                return;
            }
            after = path;
        }
    }
}

/// Copies one file of the source at its version, unless this store already has it, has a newer
/// one, or deleted it since.
pub(super) async fn copy(
    fs: &Arc<FileStore>, other: &FileStore, path: &FilePath, opts: &RunOptions,
    throttle: Option<&Arc<Throttle>>,
) -> Result<Done, MigrateError> {
    let p = path.as_str();
    let Some(theirs) = other.stat(p).await.map_err(MigrateError::SourceFile)? else {
        // Deleted there since it was listed: the deletions are carried over after the files.
        return Ok(Done::Skipped);
    };
    let ours = fs.stat(p).await?;
    if ours.as_ref().map(|e| (e.version, e.blob.digest))
        == Some((theirs.version, theirs.blob.digest))
    {
        return Ok(Done::Skipped);
    }
    let mut kind = PutKind::Import;
    let deleted = other
        .deleted_version(p)
        .await
        .map_err(MigrateError::SourceFile)?;
    if let Some(at) = deleted.filter(|at| *at >= theirs.version) {
        // Deleted there at `at`, then written again at an older version (clients may do
        // that): here too the deletion comes first, then the file, which that deletion alone
        // must not keep out. A later deletion made here still does.
        if !opts.dry_run {
            fs.delete(p, at, opts.now, DeleteKind::Unimported).await?;
        }
        if fs.deleted_version(p).await? == Some(at) {
            kind = PutKind::Client;
        }
    }
    let done = match kind {
        PutKind::Import => settled(fs, p, theirs.version).await?,
        PutKind::Client => None,
    };
    if let Some(done) = done {
        return Ok(done);
    }
    // A dry run reads and verifies the content too, as the real run would.
    let Some(opened) = other.open(p).await.map_err(MigrateError::SourceFile)? else {
        return Ok(Done::Skipped);
    };
    let (version, blob) = (opened.entry.version, opened.entry.blob);
    let hints = Hints {
        sha256: Some(blob.digest),
        logical_size: Some(blob.logical_size),
    };
    let throttle = throttle.cloned();
    let body = opened.body.then(move |chunk| {
        let delay = match (&chunk, &throttle) {
            (Ok(c), Some(t)) => t.delay(c.len()),
            _ => std::time::Duration::ZERO,
        };
        async move {
            tokio::time::sleep(delay).await;
            chunk
        }
    });
    let spooled = fs
        .spool_stream(Box::pin(body), Encoding::Gzip, hints, INGEST)
        .await
        .map_err(|e| match e {
            // What the source holds does not match its own row: its damage, not ours.
            FileStoreError::Blob(b) if b.is_client_error() => MigrateError::Source(format!(
                "the source's object of blob {} is damaged: {b}",
                blob.digest
            )),
            other => other.into(),
        })?;
    if opts.dry_run {
        return Ok(Done::Migrated(blob.logical_size));
    }
    let committed = fs.commit(p, version, spooled, opts.now, kind).await?;
    Ok(Done::of(committed.outcome, blob.logical_size))
}

/// Carries over the deletions the source remembers: a path it no longer has is deleted here
/// when what is here is not newer (and its deletion remembered, so no import brings it back).
/// Failures are reported, and the run goes on.
pub(super) async fn carry_deletions(
    fs: &FileStore, other: &FileStore, opts: &RunOptions, report: &mut MigrateReport,
) {
    let fetch = async |after: &str| {
        (other.deletions(after, PAGE).await).map_err(|e| MigrateError::SourceFile(e.into()))
    };
    let each = async |page: Vec<(String, Version)>, report: &mut MigrateReport| {
        for (path, version) in page {
            match carry_one(fs, other, &path, version, opts).await {
                Ok(true) => report.deletions_carried += 1,
                Ok(false) => {}
                Err(why) => {
                    tracing::warn!(path, version, error = %why, "deletion not carried over");
                    report.failed.push((path, why.to_string()));
                }
            }
        }
    };
    each_page("the source's deletions", report, fetch, each).await;
}

/// True when a file here was deleted (or, in a dry run, would be).
async fn carry_one(
    fs: &FileStore, other: &FileStore, path: &str, version: Version, opts: &RunOptions,
) -> Result<bool, MigrateError> {
    // Written there again since: the copy decided it.
    if other
        .stat(path)
        .await
        .map_err(MigrateError::SourceFile)?
        .is_some()
    {
        return Ok(false);
    }
    let ours = fs.stat(path).await?;
    if ours.is_none()
        && fs
            .deleted_version(path)
            .await?
            .is_some_and(|at| at >= version)
    {
        return Ok(false);
    }
    let deletes = ours.is_some_and(|e| e.version <= version);
    if !opts.dry_run {
        fs.delete(path, version, opts.now, DeleteKind::Unimported)
            .await?;
    }
    Ok(deletes)
}
