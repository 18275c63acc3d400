//! The deduplicating file store: the one place that orders object-store, metadata and lock
//! operations so the invariants of docs/design.md hold for every program that writes files:
//! uploads (ingest, commit), reads (read), and the cleaner's deletions and checks (gc). Only
//! this module tree reaches the metadata store, the object store and the locks directly.

mod commit;
pub mod gc;
mod ingest;
mod read;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::blob::{BlobError, Digest};
use crate::config::{Config, LocksBackend, MetadataBackend, StoreBackend};
use crate::locks::{FileLocks, LockError, LockManager, PgLocks};
use crate::meta::{
    BlobState, DeleteKind, DeleteOutcome, FileEntry, ListPage, MetaError, MetaStore, PostgresMeta,
    SqliteMeta, Stats, postgres_connection_config,
};
use crate::protocol::Version;
use crate::secrets::Secrets;
use crate::store::{CachedStore, FsStore, ObjectStore, ReadCache, S3Store, StoreError};

pub use commit::{Committed, STATE_TRUSTED_FOR, TOMBSTONE_KEEP};
pub use ingest::{Ingesting, Spooled};
pub use read::Opened;

/// Why a file operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FileStoreError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("cannot create spool file in {dir}: {source}")]
    Spool { dir: PathBuf, source: io::Error },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("object for {path} (blob {digest}) is missing from the object store")]
    ObjectMissing { path: String, digest: Digest },
    #[error("ingest task failed: {0}")]
    IngestTask(String),
    #[error(
        "blob {digest} kept changing while {path} was stored (found {found:?}): its lock was lost \
         and the cleaner acted; nothing was stored"
    )]
    Changed {
        path: String,
        digest: Digest,
        found: BlobState,
    },
    #[error(
        "the metadata database has no blobs but the object store holds objects older than an \
         hour: a new or wrong \
         database (metadata.backend, metadata.sqlite.path, metadata.postgres.url)? Every object \
         would be swept as an orphan, so none is; if the store really is to be emptied, run \
         s3dedup-cleaner --allow-empty-metadata"
    )]
    EmptyMetadata,
}

impl FileStoreError {
    /// True when a disk (the spool's or the local store's) ran out of space.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            FileStoreError::Store(StoreError::Full { .. }) => true,
            FileStoreError::Blob(BlobError::Spool(io))
            | FileStoreError::Spool { source: io, .. } => crate::spool::is_out_of_space(io),
            _ => false,
        }
    }
}

/// What went on around contended and lost locks, for `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct LockIncidents {
    /// Waits for locks another holder had.
    pub waits: crate::locks::LockWaits,
    /// Locks this process held and lost (their backend session ended).
    pub locks_lost: u64,
    /// Commits that found their blob changed under them and looked again.
    pub commits_retried: u64,
    /// Uploads that waited for a recent deletion of their content to settle.
    pub settle_waits: u64,
}

/// Metadata + objects + locks, wired together.
pub struct FileStore {
    meta: Arc<dyn MetaStore>,
    store: Arc<dyn ObjectStore>,
    locks: Arc<dyn LockManager>,
    commits_retried: std::sync::atomic::AtomicU64,
    settle_waits: std::sync::atomic::AtomicU64,
    spool_dir: PathBuf,
    /// Uploads up to this many stored bytes wait in memory instead of a spool file.
    spool_memory: usize,
    /// Contents of at most this many stored bytes are kept in their blob's row; 0: none.
    inline_max: u64,
    lock_timeout: Duration,
}

impl FileStore {
    /// Wires the parts; creates the spool directory.
    pub fn new(
        meta: Arc<dyn MetaStore>, store: Arc<dyn ObjectStore>, locks: Arc<dyn LockManager>,
        spool_dir: &Path, lock_timeout: Duration,
    ) -> Result<Self, FileStoreError> {
        std::fs::create_dir_all(spool_dir).map_err(|source| FileStoreError::Spool {
            dir: spool_dir.to_owned(),
            source,
        })?;
        Ok(FileStore {
            meta,
            store,
            locks,
            commits_retried: Default::default(),
            settle_waits: Default::default(),
            spool_dir: spool_dir.to_owned(),
            spool_memory: crate::spool::DEFAULT_MEMORY_LIMIT,
            inline_max: 0,
            lock_timeout,
        })
    }

    /// Opens the metadata store, object store and locks the configuration names, with the
    /// secrets read for it.
    pub async fn from_config(cfg: &Config, secrets: &Secrets) -> Result<Self, FileStoreError> {
        let password = || secrets.postgres_password.clone().map(|s| s.0);
        let meta: Arc<dyn MetaStore> = match cfg.metadata.backend {
            MetadataBackend::Sqlite => {
                Arc::new(SqliteMeta::open(&cfg.sqlite_path(), (&cfg.metadata.sqlite).into()).await?)
            }
            MetadataBackend::Postgres => {
                let pg = &cfg.metadata.postgres;
                Arc::new(PostgresMeta::connect(pg, password()).await?)
            }
        };
        let store: Arc<dyn ObjectStore> = match cfg.store.backend {
            StoreBackend::Local => Arc::new(FsStore::open(cfg.local_store_path())?),
            StoreBackend::S3 => {
                let secret = secrets.s3_secret_access_key.clone().map(|s| s.0);
                Arc::new(S3Store::connect(&cfg.store.s3, secret).await?)
            }
        };
        let locks: Arc<dyn LockManager> = match cfg.locks.backend {
            LocksBackend::File => Arc::new(FileLocks::open(&cfg.lock_file_path())?),
            LocksBackend::Postgres => {
                let pg = &cfg.metadata.postgres;
                let conn = postgres_connection_config(pg, password())?;
                Arc::new(
                    PgLocks::new(conn, cfg.locks.postgres_connections)
                        .in_schema(&pg.schema)
                        .with_deadline(pg.client_deadline()),
                )
            }
        };
        let mut fs = Self::new(
            meta,
            store,
            locks,
            &cfg.spool_dir(),
            Duration::from_secs(cfg.api.lock_timeout_secs),
        )?;
        fs.spool_memory = (cfg.store.spool_memory_kib as usize).saturating_mul(1024);
        fs.inline_max = cfg.store.inline_max_bytes;
        Ok(fs)
    }

    /// Reads objects through the configured local disk cache when the store is remote and the
    /// cache is enabled; returns the cache (for its statistics) if one is used.
    pub fn with_read_cache(
        mut self, cfg: &Config,
    ) -> Result<(Self, Option<Arc<ReadCache>>), FileStoreError> {
        if cfg.store.backend == StoreBackend::Local || !cfg.store.cache.enabled {
            return Ok((self, None));
        }
        let dir = cfg.cache_path();
        let cache = ReadCache::open(&dir, cfg.store.cache.max_size_mb << 20).map_err(|e| {
            FileStoreError::Store(StoreError::io(
                "opening the read cache",
                &dir.display().to_string(),
                e,
            ))
        })?;
        self.store = Arc::new(CachedStore::new(self.store, cache.clone()));
        Ok((self, Some(cache)))
    }

    /// Lock waits and what lost locks caused so far.
    pub fn lock_incidents(&self) -> LockIncidents {
        use std::sync::atomic::Ordering::Relaxed;
        LockIncidents {
            waits: self.locks.waits(),
            locks_lost: self.locks.locks_lost(),
            commits_retried: self.commits_retried.load(Relaxed),
            settle_waits: self.settle_waits.load(Relaxed),
        }
    }

    /// How many stored bytes of an upload may wait in memory instead of a spool file.
    pub fn spool_memory(&self) -> usize {
        self.spool_memory
    }

    /// Removes what killed processes left in the spool: files (`upload-*`) of a process that is
    /// gone, and any not modified for `max_age`. Blocking; returns how many were removed.
    pub fn remove_stale_spool(&self, max_age: std::time::Duration) -> io::Result<usize> {
        self.remove_spool_files(|name, entry| {
            let age = entry.metadata()?.modified()?.elapsed().unwrap_or_default();
            Ok(age >= max_age || crate::spool::left_by_dead_process(name))
        })
    }

    /// Files in the spool (uploads on their way, of every process) and their bytes. Blocking.
    pub fn spool_usage(&self) -> (u64, u64) {
        let Ok(entries) = std::fs::read_dir(&self.spool_dir) else {
            return (0, 0);
        };
        entries
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.is_file())
            .fold((0, 0), |(n, bytes), m| (n + 1, bytes + m.len()))
    }

    /// Removes this process's own spool files: what a stopped run abandoned. Blocking.
    pub fn remove_own_spool(&self) -> io::Result<usize> {
        self.remove_spool_files(|name, _| Ok(crate::spool::made_by_this_process(name)))
    }

    /// Removes the spool files `doomed` picks (by name and entry); returns how many.
    fn remove_spool_files(
        &self, doomed: impl Fn(&str, &std::fs::DirEntry) -> io::Result<bool>,
    ) -> io::Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.spool_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !name.starts_with(crate::spool::SPOOL_PREFIX) || !doomed(&name, &entry)? {
                continue;
            }
            // Gone already: another process cleaned it, which is as good.
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(removed)
    }

    /// [`FileStore::remove_stale_spool`] off the runtime, as a program does when it starts; what
    /// it removed, or why it could not, is logged (leftovers only cost disk space).
    pub async fn clean_spool_at_start(self: &Arc<Self>, max_age: std::time::Duration) {
        let f = self.clone();
        let spool = self.spool_dir.display().to_string();
        match tokio::task::spawn_blocking(move || f.remove_stale_spool(max_age)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(removed = n, spool, "removed leftover spool files"),
            Ok(Err(e)) => tracing::warn!(error = %e, spool, "cannot clean the spool"),
            Err(e) => tracing::warn!(error = %e, spool, "cleaning the spool failed"),
        }
    }

    /// The file's metadata, without touching the object store.
    pub async fn stat(&self, path: &str) -> Result<Option<FileEntry>, FileStoreError> {
        Ok(self.meta.get_file(path).await?)
    }
    /// Deletes `path` unless a newer version is stored (see [`DeleteKind`] for a path only an
    /// old server has). The object stays for the cleaner.
    pub async fn delete(
        &self, path: &str, version: Version, now: i64, kind: DeleteKind,
    ) -> Result<DeleteOutcome, FileStoreError> {
        Ok(self.meta.delete_file(path, version, now, kind).await?)
    }
}

/// What the programs around the file store ask of its backends.
impl FileStore {
    /// The metadata database and the object store, for logs.
    pub fn describe(&self) -> (String, String) {
        (self.meta.describe(), self.store.describe())
    }

    /// Requests sent to a remote object store so far, by operation.
    pub fn store_requests(&self) -> Vec<(String, u64)> {
        self.store.requests_sent()
    }

    /// Whether the metadata database and the object store answer.
    pub async fn check(&self) -> (Result<(), MetaError>, Result<(), StoreError>) {
        tokio::join!(self.meta.check(), self.store.check())
    }

    /// Totals over files and live blobs.
    pub async fn stats(&self) -> Result<Stats, MetaError> {
        self.meta.stats().await
    }

    /// One page of a directory listing.
    pub async fn list(&self, page: &ListPage<'_>) -> Result<Vec<String>, MetaError> {
        self.meta.list_files(page).await
    }

    /// Files an import stored and no client wrote since, `(path, version)` in path order after
    /// `after`, at most `limit`.
    pub async fn imported(
        &self, after: &str, limit: usize,
    ) -> Result<Vec<(String, Version)>, MetaError> {
        self.meta.list_imported(after, limit).await
    }

    /// Remembered deletions `(path, version)` in path order after `after`, at most `limit`.
    pub async fn deletions(
        &self, after: &str, limit: usize,
    ) -> Result<Vec<(String, Version)>, MetaError> {
        self.meta.list_deletions(after, limit).await
    }

    /// The version at which `path` was last deleted, if its deletion is remembered.
    pub async fn deleted_version(&self, path: &str) -> Result<Option<Version>, FileStoreError> {
        Ok(self.meta.deleted_version(path).await?)
    }

    /// Where an interrupted import of `source` stopped, if one did.
    pub async fn checkpoint(&self, source: &str) -> Result<Option<String>, MetaError> {
        self.meta.checkpoint(source).await
    }

    /// Records (`Some`) or clears (`None`) where an import of `source` got to.
    pub async fn set_checkpoint(
        &self, source: &str, position: Option<&str>, now: i64,
    ) -> Result<(), MetaError> {
        self.meta.set_checkpoint(source, position, now).await
    }
}
