//! The deduplicating file store: the one place that orders object-store, metadata and lock
//! operations so the invariants of DESIGN.md hold for every program that writes files.
//!
//! PUT: spool and verify the body, take the digest's lock, upload the object unless a live row
//! exists, commit the metadata in one transaction, release the lock (object first, then row).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::blob::{BlobError, BlobInfo, Digest, Encoding, Hints, IngestOptions, ingest};
use crate::config::{Config, LocksBackend, MetadataBackend, StoreBackend};
use crate::locks::{FileLocks, LockError, LockManager, LockMode, PgLocks, blob_lock};
use crate::meta::{
    DeleteOutcome, FileEntry, MetaError, MetaStore, PostgresMeta, PutOutcome, SqliteMeta,
    postgres_connection_config,
};
use crate::protocol::Version;
use crate::spool::{SpoolBody, SpoolCopy, SpoolProgress, SpoolWriter};
use crate::store::{
    CachedStore, FsStore, ObjectStore, ObjectStream, PartUpload, ReadCache, S3Store, StoreError,
};
use tokio::sync::watch;

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

/// A verified body waiting in the spool, ready to be committed.
pub struct Spooled {
    pub body: SpoolBody,
    pub info: BlobInfo,
    /// Parts of it already sent to the object store, if it was sent while it arrived.
    pub parts: Option<Box<dyn PartUpload>>,
}

impl std::fmt::Debug for Spooled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spooled")
            .field("body", &self.body)
            .field("info", &self.info)
            .field("parts", &self.parts.is_some())
            .finish()
    }
}

/// Uploads smaller than this gain too little from being sent on while they arrive to be worth
/// a database lookup and a second request.
const SEND_ON_MIN: u64 = 1 << 20;

/// Given to the spool writer of an upload that is sent on while it arrives.
pub enum PartSender {
    /// Publish how far the spool file is written, every `step` bytes (parts read from it).
    Progress {
        step: u64,
        tx: watch::Sender<SpoolProgress>,
    },
    /// Hand a copy of every byte written.
    Copy(Box<dyn SpoolCopy>),
}

/// What is sending an upload on; [`PartsTask::attach`] joins it to the spooled upload.
/// Dropped unattached (the request was cancelled), what it sent is discarded.
pub struct PartsTask {
    digest: Digest,
    sending: Sending,
}

enum Sending {
    Parts(tokio::task::JoinHandle<Result<Option<Box<dyn PartUpload>>, StoreError>>),
    Stream(Box<dyn PartUpload>),
}

impl PartsTask {
    /// Joins what was sent to a verified upload (waiting for parts still being sent). When the
    /// upload failed, what was sent is discarded; when sending failed, the commit sends the
    /// object whole (and reports the store's error if it fails again).
    pub async fn attach(
        self,
        spooled: Result<Spooled, FileStoreError>,
    ) -> Result<Spooled, FileStoreError> {
        let sent = match self.sending {
            Sending::Stream(put) => Some(put),
            Sending::Parts(task) => match task.await {
                Ok(Ok(sent)) => sent,
                Ok(Err(e)) => {
                    tracing::warn!(digest = %self.digest, error = %e,
                        "sending an upload in parts failed; it will be sent whole");
                    None
                }
                Err(e) => {
                    tracing::warn!(digest = %self.digest, error = %e, "part upload task failed");
                    None
                }
            },
        };
        let mut spooled = spooled?;
        // The ingest checked the content against the claimed digest the upload is keyed by.
        if spooled.info.digest == self.digest {
            spooled.parts = sent;
        }
        Ok(spooled)
    }
}

/// An upload being verified and spooled off the runtime (from [`FileStore::start_ingest`]).
/// Dropped unfinished, what was sent on is discarded.
pub struct Ingesting {
    task: tokio::task::JoinHandle<Result<Spooled, FileStoreError>>,
    parts: Option<PartsTask>,
}

impl Ingesting {
    /// Waits for the ingest (its body sender must be dropped by now) and joins what was sent on.
    pub async fn finish(self) -> Result<Spooled, FileStoreError> {
        let spooled = self
            .task
            .await
            .map_err(|e| FileStoreError::IngestTask(e.to_string()))?;
        match self.parts {
            Some(p) => p.attach(spooled).await,
            None => spooled,
        }
    }
}

/// The result of committing a PUT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub outcome: PutOutcome,
    /// True when the content was already stored and no object was written.
    pub deduplicated: bool,
}

/// A file opened for reading.
pub struct Opened {
    pub entry: FileEntry,
    pub body: ObjectStream,
}

/// Metadata + objects + locks, wired together.
pub struct FileStore {
    pub meta: Arc<dyn MetaStore>,
    pub store: Arc<dyn ObjectStore>,
    pub locks: Arc<dyn LockManager>,
    spool_dir: PathBuf,
    /// Uploads up to this many stored bytes wait in memory instead of a spool file.
    spool_memory: usize,
    lock_timeout: Duration,
}

impl FileStore {
    /// Wires the parts; creates the spool directory.
    pub fn new(
        meta: Arc<dyn MetaStore>,
        store: Arc<dyn ObjectStore>,
        locks: Arc<dyn LockManager>,
        spool_dir: &Path,
        lock_timeout: Duration,
    ) -> Result<Self, FileStoreError> {
        std::fs::create_dir_all(spool_dir).map_err(|source| FileStoreError::Spool {
            dir: spool_dir.to_owned(),
            source,
        })?;
        Ok(FileStore {
            meta,
            store,
            locks,
            spool_dir: spool_dir.to_owned(),
            spool_memory: crate::spool::DEFAULT_MEMORY_LIMIT,
            lock_timeout,
        })
    }

    /// Opens the metadata store, object store and locks the configuration names. Secrets given
    /// as files are read relative to `credentials_dir` (systemd's `$CREDENTIALS_DIRECTORY`).
    pub async fn from_config(
        cfg: &Config,
        credentials_dir: Option<&Path>,
    ) -> Result<Self, FileStoreError> {
        let meta: Arc<dyn MetaStore> = match cfg.metadata.backend {
            MetadataBackend::Sqlite => {
                Arc::new(SqliteMeta::open(&cfg.sqlite_path(), (&cfg.metadata.sqlite).into()).await?)
            }
            MetadataBackend::Postgres => {
                let pg = &cfg.metadata.postgres;
                Arc::new(PostgresMeta::connect(pg, pg.resolve_password(credentials_dir)?).await?)
            }
        };
        let store: Arc<dyn ObjectStore> = match cfg.store.backend {
            StoreBackend::Local => Arc::new(FsStore::open(cfg.local_store_path())?),
            StoreBackend::S3 => {
                let secret = cfg.store.s3.resolve_secret(credentials_dir)?;
                Arc::new(S3Store::connect(&cfg.store.s3, secret).await?)
            }
        };
        let locks: Arc<dyn LockManager> = match cfg.locks.backend {
            LocksBackend::File => Arc::new(FileLocks::open(&cfg.lock_file_path())?),
            LocksBackend::Postgres => {
                let pg = &cfg.metadata.postgres;
                let conn = postgres_connection_config(pg, pg.resolve_password(credentials_dir)?)?;
                Arc::new(
                    PgLocks::new(conn, cfg.locks.postgres_connections)
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
        Ok(fs)
    }

    /// Reads objects through the configured local disk cache when the store is remote and the
    /// cache is enabled; returns the cache (for its statistics) if one is used.
    pub fn with_read_cache(
        mut self,
        cfg: &Config,
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

    /// How many stored bytes of an upload may wait in memory instead of a spool file.
    pub fn spool_memory(&self) -> usize {
        self.spool_memory
    }

    /// Removes spool files (`upload-*`) not modified for `max_age`: what a killed process left.
    /// Blocking; returns how many were removed.
    pub fn remove_stale_spool(&self, max_age: std::time::Duration) -> io::Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.spool_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with("upload-") {
                continue;
            }
            let age = entry.metadata()?.modified()?.elapsed().unwrap_or_default();
            if age >= max_age {
                // Gone already: another process cleaned it, which is as good.
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(removed)
    }

    /// Reads a body (blocking) into memory or a new spool file, verifying it. Run off the async
    /// runtime.
    pub fn spool_blocking<R: io::Read>(
        &self,
        body: R,
        encoding: Encoding,
        hints: &Hints,
        opts: &IngestOptions,
    ) -> Result<Spooled, FileStoreError> {
        self.spool_blocking_with(body, encoding, hints, opts, None)
    }

    /// [`FileStore::spool_blocking`], feeding `parts` (from [`FileStore::send_parts`]) as the
    /// spool grows: its progress on disk, or a copy of its bytes.
    fn spool_blocking_with<R: io::Read>(
        &self,
        body: R,
        encoding: Encoding,
        hints: &Hints,
        opts: &IngestOptions,
        parts: Option<PartSender>,
    ) -> Result<Spooled, FileStoreError> {
        let mut writer = SpoolWriter::new(&self.spool_dir, self.spool_memory);
        writer = match parts {
            Some(PartSender::Progress { step, tx }) => writer.reporting(step, tx),
            Some(PartSender::Copy(copy)) => writer.copying(copy),
            None => writer,
        };
        let info = ingest(body, encoding, &mut writer, hints, opts)?;
        let body = writer
            .finish()
            .map_err(|e| FileStoreError::Blob(BlobError::Spool(e)))?;
        Ok(Spooled {
            body,
            info,
            parts: None,
        })
    }

    /// Starts sending an upload to the object store while it still arrives, so that receiving
    /// and verifying it overlap with sending it: streamed as it is written when its stored size
    /// is known (a gzip body of `body_len` bytes) and the store can stream it, else in parts
    /// (bodies of at least one part). Only for content whose digest the client claimed and
    /// which is not stored yet: without a claim the object's key is known only at the end, and
    /// known content needs no object. The object becomes visible only at commit, under the
    /// blob's lock, and only if the content matched the claim.
    async fn send_parts(
        &self,
        hints: &Hints,
        encoding: Encoding,
        body_len: Option<u64>,
    ) -> Option<(PartSender, PartsTask)> {
        let digest = hints.sha256?;
        let step = self.store.part_size()?;
        if body_len.is_some_and(|n| n < SEND_ON_MIN) {
            return None;
        }
        // Only a saving: when the database cannot answer, the commit will say so.
        if !matches!(self.meta.blob_is_live(&digest).await, Ok(false)) {
            return None;
        }
        if let (Encoding::Gzip, Some(size)) = (encoding, body_len)
            && let Some((copy, put)) = self.store.stream_put(&digest, size)
        {
            let sending = Sending::Stream(put);
            return Some((PartSender::Copy(copy), PartsTask { digest, sending }));
        }
        if body_len.is_some_and(|n| n < step) {
            return None;
        }
        let (tx, rx) = watch::channel(SpoolProgress::default());
        let store = self.store.clone();
        let task = tokio::spawn(async move { store.send_parts(&digest, rx).await });
        let sending = Sending::Parts(task);
        Some((
            PartSender::Progress { step, tx },
            PartsTask { digest, sending },
        ))
    }

    /// Starts verifying and spooling an upload on a blocking task, sending it on to the store
    /// meanwhile where [`FileStore::send_parts`] says so. Feed the body to the sender (at most
    /// `queue` chunks ahead), drop it, then [`Ingesting::finish`].
    pub async fn start_ingest(
        self: &Arc<Self>,
        encoding: Encoding,
        hints: Hints,
        opts: IngestOptions,
        body_len: Option<u64>,
        queue: usize,
    ) -> (tokio::sync::mpsc::Sender<crate::blob::Chunk>, Ingesting) {
        let (tx, rx) = tokio::sync::mpsc::channel(queue);
        let (sender, parts) = self.send_parts(&hints, encoding, body_len).await.unzip();
        let fs = self.clone();
        let task = tokio::task::spawn_blocking(move || {
            let body = crate::blob::ChannelReader::new(rx);
            fs.spool_blocking_with(body, encoding, &hints, &opts, sender)
        });
        (tx, Ingesting { task, parts })
    }

    /// Spools an async byte stream (an HTTP body), verifying it, with the ingest off the runtime.
    pub async fn spool_stream<S, E>(
        self: &Arc<Self>,
        body: S,
        encoding: Encoding,
        hints: Hints,
        opts: IngestOptions,
    ) -> Result<Spooled, FileStoreError>
    where
        S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let (tx, ingesting) = self.start_ingest(encoding, hints, opts, None, 16).await;
        // If the ingest stops early, its error says why.
        crate::blob::feed(body, &tx).await;
        drop(tx);
        ingesting.finish().await
    }

    /// Makes `path` hold the spooled content at `version` (unless a newer version is stored).
    pub async fn commit(
        &self,
        path: &str,
        version: Version,
        spooled: Spooled,
        now: i64,
    ) -> Result<Committed, FileStoreError> {
        self.commit_as(path, version, spooled, now, false).await
    }

    /// Like [`FileStore::commit`], for a file imported from an old Filetracker: a path deleted
    /// here at or after `version` stays deleted ([`PutOutcome::Deleted`]).
    pub async fn import(
        &self,
        path: &str,
        version: Version,
        spooled: Spooled,
        now: i64,
    ) -> Result<Committed, FileStoreError> {
        self.commit_as(path, version, spooled, now, true).await
    }

    async fn commit_as(
        &self,
        path: &str,
        version: Version,
        spooled: Spooled,
        now: i64,
        import: bool,
    ) -> Result<Committed, FileStoreError> {
        let Spooled { body, info, parts } = spooled;
        let name = blob_lock(&info.digest);
        // Known content (the common case for judging inputs) only needs the cleaner kept out, so
        // re-uploads of one blob share its lock and commit together. New content takes the lock
        // exclusively, so concurrent uploads of it send the object once.
        let shared = self
            .locks
            .lock(&name, LockMode::Shared, self.lock_timeout)
            .await?;
        let (guard, live) = if self.meta.blob_is_live(&info.digest).await? {
            (shared, true)
        } else {
            shared.release().await;
            let guard = self
                .locks
                .lock(&name, LockMode::Exclusive, self.lock_timeout)
                .await?;
            let live = self.meta.blob_is_live(&info.digest).await?;
            (guard, live)
        };
        // Parts sent early of content that turned out to be stored are discarded on drop.
        if !live {
            match parts {
                Some(p) => p.finish(body, info.stored_size).await?,
                None => self.store.put(&info.digest, body, info.stored_size).await?,
            }
        }
        let outcome = self
            .meta
            .store_file(path, version, &info, !live, now, import)
            .await?;
        guard.release().await;
        Ok(Committed {
            outcome,
            deduplicated: live,
        })
    }

    /// Adopts an object that is already in the store under its digest (an upstream s3dedup
    /// bucket) as `path` at `version`, as an import. Nothing is copied; the object is read once
    /// to check that it inflates to its digest, unless a live row already vouches for it.
    pub async fn adopt(
        &self,
        path: &str,
        version: Version,
        digest: &Digest,
        now: i64,
    ) -> Result<Committed, FileStoreError> {
        let guard = self
            .locks
            .lock(&blob_lock(digest), LockMode::Exclusive, self.lock_timeout)
            .await?;
        let live = self.meta.blob_is_live(digest).await?;
        let info = if live {
            // Sizes come from the existing row; put_file does not change them.
            BlobInfo {
                digest: *digest,
                logical_size: 0,
                stored_size: 0,
            }
        } else {
            let missing = || FileStoreError::ObjectMissing {
                path: path.to_owned(),
                digest: *digest,
            };
            let stored_size = self.store.head(digest).await?.ok_or_else(missing)?;
            let body = match self.store.get(digest).await {
                Err(StoreError::NotFound { .. }) => return Err(missing()),
                other => other?,
            };
            let (actual, logical_size) = crate::gc::inflate_digest(body).await?;
            if actual != *digest {
                return Err(FileStoreError::Blob(BlobError::ChecksumMismatch {
                    claimed: *digest,
                    actual,
                }));
            }
            BlobInfo {
                digest: *digest,
                logical_size,
                stored_size,
            }
        };
        let outcome = self
            .meta
            .import_file(path, version, &info, !live, now)
            .await?;
        guard.release().await;
        Ok(Committed {
            outcome,
            deduplicated: true,
        })
    }

    /// The file's metadata, without touching the object store.
    pub async fn stat(&self, path: &str) -> Result<Option<FileEntry>, FileStoreError> {
        Ok(self.meta.get_file(path).await?)
    }

    /// Opens a file for streaming. A concurrent overwrite + cleanup can remove the object between
    /// reading the row and opening the object; then the row is read again.
    pub async fn open(&self, path: &str) -> Result<Option<Opened>, FileStoreError> {
        let mut attempts = 0;
        loop {
            let Some(entry) = self.meta.get_file(path).await? else {
                return Ok(None);
            };
            match self
                .store
                .get_stored(&entry.blob.digest, entry.blob.stored_size)
                .await
            {
                Ok(body) => {
                    let body = self.first_bytes(&entry.blob.digest, body).await?;
                    return Ok(Some(Opened { entry, body }));
                }
                Err(StoreError::NotFound { .. }) if attempts < 2 => {
                    attempts += 1;
                    let again = self.meta.get_file(path).await?;
                    if again.as_ref().map(|e| e.blob.digest) == Some(entry.blob.digest) {
                        return Err(FileStoreError::ObjectMissing {
                            path: path.to_owned(),
                            digest: entry.blob.digest,
                        });
                    }
                }
                Err(StoreError::NotFound { .. }) => {
                    return Err(FileStoreError::ObjectMissing {
                        path: path.to_owned(),
                        digest: entry.blob.digest,
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Waits for the object's first bytes, so that a read failing at once (S3's connection cut
    /// right after its headers) becomes an error answer. An HTTP server sends a response's
    /// headers with its first body bytes: after a 200 whose body fails at once, the client
    /// would see the connection close without any answer.
    async fn first_bytes(
        &self,
        digest: &Digest,
        mut body: ObjectStream,
    ) -> Result<ObjectStream, FileStoreError> {
        use futures::StreamExt;
        match body.next().await {
            None => Ok(body),
            Some(Ok(first)) => Ok(Box::pin(
                futures::stream::once(futures::future::ready(Ok(first))).chain(body),
            )),
            Some(Err(e)) => Err(StoreError::Unavailable {
                op: "reading",
                key: self.store.key(digest),
                message: e.to_string(),
            }
            .into()),
        }
    }

    /// Deletes `path` unless a newer version is stored. The object stays for the cleaner.
    pub async fn delete(
        &self,
        path: &str,
        version: Version,
        now: i64,
    ) -> Result<DeleteOutcome, FileStoreError> {
        Ok(self.meta.delete_file(path, version, now).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    async fn fixture(dir: &Path) -> FileStore {
        let meta = SqliteMeta::open(&dir.join("m.sqlite3"), crate::meta::sqlite_test_options())
            .await
            .unwrap();
        let store = FsStore::open(dir.join("objects")).unwrap();
        let locks = FileLocks::open(&dir.join("locks")).unwrap();
        FileStore::new(
            Arc::new(meta),
            Arc::new(store),
            Arc::new(locks),
            &dir.join("spool"),
            Duration::from_secs(5),
        )
        .unwrap()
    }

    const OPTS: IngestOptions = IngestOptions {
        level: 1,
        max_logical_size: 1 << 20,
        max_gzip_ratio: 0,
    };

    #[tokio::test]
    async fn same_content_is_stored_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let fs = fixture(dir.path()).await;
        let mut deduped = vec![];
        for i in 0..3 {
            let s = fs
                .spool_blocking(&b"same"[..], Encoding::Identity, &Hints::default(), &OPTS)
                .unwrap();
            let c = fs.commit(&format!("/f{i}"), 5, s, 0).await.unwrap();
            assert_eq!(c.outcome, PutOutcome::Stored { version: 5 });
            deduped.push(c.deduplicated);
        }
        assert_eq!(deduped, [false, true, true]);
        let stats = fs.meta.stats().await.unwrap();
        assert_eq!((stats.files, stats.blobs), (3, 1));
        let opened = fs.open("/f1").await.unwrap().unwrap();
        let gz: Vec<bytes::Bytes> = opened.body.try_collect().await.unwrap();
        let (_, n) = crate::blob::inflate(&gz.concat()[..], io::sink()).unwrap();
        assert_eq!(n, 4);
        assert_eq!(
            std::fs::read_dir(dir.path().join("spool")).unwrap().count(),
            0,
            "no spool files left behind"
        );
    }

    #[tokio::test]
    async fn a_row_without_its_object_is_an_error_not_absence() {
        let dir = tempfile::tempdir().unwrap();
        let fs = fixture(dir.path()).await;
        let s = fs
            .spool_blocking(&b"x"[..], Encoding::Identity, &Hints::default(), &OPTS)
            .unwrap();
        let digest = s.info.digest;
        fs.commit("/x", 1, s, 0).await.unwrap();
        fs.store.delete(&digest).await.unwrap();
        let e = fs.open("/x").await.err().unwrap();
        assert!(matches!(e, FileStoreError::ObjectMissing { .. }), "{e}");
        assert!(fs.open("/nothing").await.unwrap().is_none());
    }
}
