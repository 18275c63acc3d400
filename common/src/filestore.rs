//! The deduplicating file store: the one place that orders object-store, metadata and lock
//! operations so the invariants of docs/design.md hold for every program that writes files.
//!
//! PUT: spool and verify the body, take the digest's lock, upload the object unless a live row
//! exists, commit the metadata in one transaction, release the lock (object first, then row).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::blob::{BlobError, BlobInfo, Digest, Encoding, Hints, IngestOptions, ingest};
use crate::config::{Config, LocksBackend, MetadataBackend, StoreBackend};
use crate::locks::{BlobLock, Exclusive, FileLocks, LockError, LockManager, PgLocks, Shared};
use crate::meta::{
    BlobState, DeleteOutcome, FileEntry, MetaError, MetaStore, PostgresMeta, PutKind, PutOutcome,
    PutResult, SqliteMeta, Stored, postgres_connection_config,
};
use crate::protocol::Version;
use crate::spool::{Retained, SpoolBody, SpoolCopy, SpoolProgress, SpoolWriter};
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
    #[error(
        "blob {digest} kept changing while {path} was stored (found {found:?}): its lock was lost \
         and the cleaner acted; nothing was stored"
    )]
    Changed {
        path: String,
        digest: Digest,
        found: BlobState,
    },
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

/// Times a read looks again for the object its row describes (with backoff from 100 ms,
/// about 3 s in all), when the object is of another size under an unchanged row.
const OPEN_ATTEMPTS: u32 = 5;

/// Commit attempts when the blob keeps changing under its lock (only a lost lock allows it).
const COMMIT_ATTEMPTS: usize = 3;

/// How long a commit relies on the blob state it read under its lock; past it, it reads it
/// again. Tombstones are kept [`TOMBSTONE_KEEP`] past their settle time, far longer, so a
/// commit can never take a tombstone made and forgotten since it looked for the absence it
/// saw (docs/design.md).
pub const STATE_TRUSTED_FOR: Duration = Duration::from_secs(600);

/// How long the cleaner keeps a tombstone after its deletion settled; see [`STATE_TRUSTED_FOR`].
pub const TOMBSTONE_KEEP: Duration = Duration::from_secs(3600);

/// What a PUT (or an import) commits.
struct Put<'a> {
    path: &'a str,
    version: Version,
    info: &'a BlobInfo,
    now: i64,
    kind: PutKind,
}

impl Put<'_> {
    /// The metadata's one transaction for it, with the content stored as `stored` says.
    async fn record(
        &self,
        meta: &dyn MetaStore,
        stored: Stored<'_>,
    ) -> Result<PutResult, MetaError> {
        meta.store_file(
            self.path,
            self.version,
            self.info,
            stored,
            self.now,
            self.kind,
        )
        .await
    }
}

/// An upload's content on its way into the object store, across commit attempts.
struct Upload {
    /// The verified body, until stored.
    body: Option<SpoolBody>,
    /// What was sent of it while it arrived.
    parts: Option<Box<dyn PartUpload>>,
    /// The body again, once it was handed to the store.
    retained: Option<Retained>,
}

/// One commit attempt's end.
enum Step {
    Done(Committed),
    Changed(BlobState),
}

impl Step {
    fn of(result: PutResult, deduplicated: bool) -> Step {
        match result {
            PutResult::Done(outcome) => Step::Done(Committed {
                outcome,
                deduplicated,
            }),
            PutResult::Conflict(found) => Step::Changed(found),
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

/// What went on around lost locks, for `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LockIncidents {
    /// Locks this process held and lost (their backend session ended).
    pub locks_lost: u64,
    /// Commits that found their blob changed under them and looked again.
    pub commits_retried: u64,
    /// Uploads that waited for a recent deletion of their content to settle.
    pub settle_waits: u64,
}

/// Metadata + objects + locks, wired together.
pub struct FileStore {
    pub meta: Arc<dyn MetaStore>,
    pub store: Arc<dyn ObjectStore>,
    pub locks: Arc<dyn LockManager>,
    commits_retried: std::sync::atomic::AtomicU64,
    settle_waits: std::sync::atomic::AtomicU64,
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
            commits_retried: Default::default(),
            settle_waits: Default::default(),
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

    /// What lost locks caused so far.
    pub fn lock_incidents(&self) -> LockIncidents {
        use std::sync::atomic::Ordering::Relaxed;
        LockIncidents {
            locks_lost: self.locks.locks_lost(),
            commits_retried: self.commits_retried.load(Relaxed),
            settle_waits: self.settle_waits.load(Relaxed),
        }
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
        self.commit_as(path, version, spooled, now, PutKind::Client)
            .await
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
        self.commit_as(path, version, spooled, now, PutKind::Import)
            .await
    }

    /// Commits under the blob's lock; when the blob turns out to have changed under it (a lost
    /// lock let the cleaner in), looks again and stores the content again if need be.
    async fn commit_as(
        &self,
        path: &str,
        version: Version,
        spooled: Spooled,
        now: i64,
        kind: PutKind,
    ) -> Result<Committed, FileStoreError> {
        let Spooled { body, info, parts } = spooled;
        let put = Put {
            path,
            version,
            info: &info,
            now,
            kind,
        };
        let mut upload = Upload {
            body: Some(body),
            parts,
            retained: None,
        };
        let mut found = BlobState::Live;
        for _ in 0..COMMIT_ATTEMPTS {
            match self.commit_once(&put, &mut upload).await? {
                Step::Done(c) => return Ok(c),
                Step::Changed(state) => {
                    found = state;
                    self.commits_retried
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(path, digest = %info.digest, found = ?state,
                        "the blob changed under its lock while this upload was committed (the \
                         lock was lost and the cleaner acted); looking again");
                }
            }
        }
        Err(FileStoreError::Changed {
            path: path.to_owned(),
            digest: info.digest,
            found,
        })
    }

    async fn commit_once(
        &self,
        put: &Put<'_>,
        upload: &mut Upload,
    ) -> Result<Step, FileStoreError> {
        let digest = &put.info.digest;
        // Known content (the common case for judging inputs) only needs the cleaner kept out, so
        // re-uploads of one blob share its lock and commit together.
        let lock = BlobLock::<Shared>::acquire(&*self.locks, digest, self.lock_timeout).await?;
        let state = self.meta.blob_state(lock.held()).await?;
        if state == BlobState::Live {
            let done = put.record(&*self.meta, Stored::Existing(lock.held())).await;
            lock.release().await;
            return Ok(Step::of(done?, true));
        }
        lock.release().await;
        // New content takes the lock exclusively, so concurrent uploads of it send it once.
        let lock = BlobLock::<Exclusive>::acquire(&*self.locks, digest, self.lock_timeout).await?;
        let result = self.store_under(&lock, put, upload).await;
        lock.release().await;
        result
    }

    async fn store_under(
        &self,
        lock: &BlobLock<Exclusive>,
        put: &Put<'_>,
        upload: &mut Upload,
    ) -> Result<Step, FileStoreError> {
        let (path, info) = (put.path, put.info);
        let state = self.meta.blob_state(lock.held()).await?;
        let seen = tokio::time::Instant::now();
        if state == BlobState::Live {
            // Parts sent early of content that turned out to be stored are discarded on drop.
            upload.parts = None;
            let done = put
                .record(&*self.meta, Stored::Existing(lock.held()))
                .await?;
            return Ok(Step::of(done, true));
        }
        if let BlobState::Tombstone {
            deletion,
            settles_in,
        } = state
            && !settles_in.is_zero()
        {
            // A delete request of that deletion may still reach the store: an object stored
            // now could be deleted by it after its row says live.
            tracing::info!(path, digest = %info.digest, deletion, wait = ?settles_in,
                "content being stored again was deleted by the cleaner moments ago; waiting \
                 until that deletion can no longer reach the object store");
            upload.parts = None;
            self.settle_waits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(settles_in).await;
        }
        self.store_object(info, upload).await?;
        if seen.elapsed() > STATE_TRUSTED_FOR {
            return Ok(Step::Changed(state));
        }
        let done = put
            .record(&*self.meta, Stored::Object { lock, over: state })
            .await?;
        if done != PutResult::Conflict(BlobState::Live) {
            return Ok(Step::of(done, false));
        }
        // Another upload of this content committed meanwhile with other gzip bytes (only lost
        // locks let two in at once). The object is whichever landed last: if ours, the row
        // takes its sizes; if theirs, the row stands and this is a reference.
        let ours = self.store.head(&info.digest).await? == Some(info.stored_size);
        let stored = if ours {
            Stored::Object {
                lock,
                over: BlobState::Live,
            }
        } else {
            Stored::Existing(lock.held())
        };
        Ok(Step::of(put.record(&*self.meta, stored).await?, false))
    }

    /// Stores the upload's object: what was sent early, or the body (kept aside first, in case
    /// it must be stored again).
    async fn store_object(
        &self,
        info: &BlobInfo,
        upload: &mut Upload,
    ) -> Result<(), FileStoreError> {
        let body = match upload.body.take() {
            Some(body) => body,
            None => {
                let retained = upload.retained.take().ok_or_else(|| {
                    FileStoreError::IngestTask("an upload's body was stored and not kept".into())
                })?;
                let dir = self.spool_dir.clone();
                let (retained, body) = tokio::task::spawn_blocking(move || {
                    let body = retained.restore(&dir);
                    (retained, body)
                })
                .await
                .map_err(|e| FileStoreError::IngestTask(e.to_string()))?;
                upload.retained = Some(retained);
                body.map_err(|source| FileStoreError::Spool {
                    dir: self.spool_dir.clone(),
                    source,
                })?
            }
        };
        if upload.retained.is_none() {
            upload.retained = Some(body.retain().map_err(|source| FileStoreError::Spool {
                dir: self.spool_dir.clone(),
                source,
            })?);
        }
        match upload.parts.take() {
            Some(p) => p.finish(body, info.stored_size).await?,
            None => self.store.put(&info.digest, body, info.stored_size).await?,
        }
        Ok(())
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
        let lock = BlobLock::<Exclusive>::acquire(&*self.locks, digest, self.lock_timeout).await?;
        let result = self.adopt_under(&lock, path, version, now).await;
        lock.release().await;
        result
    }

    async fn adopt_under(
        &self,
        lock: &BlobLock<Exclusive>,
        path: &str,
        version: Version,
        now: i64,
    ) -> Result<Committed, FileStoreError> {
        let digest = lock.digest();
        let missing = || FileStoreError::ObjectMissing {
            path: path.to_owned(),
            digest: *digest,
        };
        let (info, stored) = match self.meta.blob_state(lock.held()).await? {
            // Sizes come from the existing row; a reference does not change them.
            BlobState::Live => {
                let info = BlobInfo {
                    digest: *digest,
                    logical_size: 0,
                    stored_size: 0,
                };
                (info, Stored::Existing(lock.held()))
            }
            // The cleaner is deleting it, or has.
            BlobState::Tombstone { .. } => return Err(missing()),
            BlobState::Absent => {
                let stored_size = self.store.head(digest).await?.ok_or_else(missing)?;
                let body = match self.store.get(digest).await {
                    Err(StoreError::NotFound { .. }) => return Err(missing()),
                    other => other?,
                };
                let (actual, logical_size) = crate::inflating::digest_of(body).await?;
                if actual != *digest {
                    return Err(FileStoreError::Blob(BlobError::ChecksumMismatch {
                        claimed: *digest,
                        actual,
                    }));
                }
                let info = BlobInfo {
                    digest: *digest,
                    logical_size,
                    stored_size,
                };
                let over = BlobState::Absent;
                (info, Stored::Object { lock, over })
            }
        };
        match self
            .meta
            .store_file(path, version, &info, stored, now, PutKind::Import)
            .await?
        {
            PutResult::Done(outcome) => Ok(Committed {
                outcome,
                deduplicated: true,
            }),
            PutResult::Conflict(found) => Err(FileStoreError::Changed {
                path: path.to_owned(),
                digest: *digest,
                found,
            }),
        }
    }

    /// The file's metadata, without touching the object store.
    pub async fn stat(&self, path: &str) -> Result<Option<FileEntry>, FileStoreError> {
        Ok(self.meta.get_file(path).await?)
    }

    /// Opens a file for streaming. Between reading the row and opening the object, an
    /// overwrite and the cleaner can remove the object, and a PUT can store the same content
    /// again as other gzip bytes. Then the row is read again; under an unchanged row, an object
    /// of another size may be a second upload of the same content between storing it and
    /// committing (only after a lost lock), so the read waits a little for that commit. An
    /// object is only ever sent under the length its row records: a damaged or foreign object
    /// is an error, not a 200 with other bytes.
    pub async fn open(&self, path: &str) -> Result<Option<Opened>, FileStoreError> {
        let mut attempt = 0;
        loop {
            let Some(entry) = self.meta.get_file(path).await? else {
                return Ok(None);
            };
            let blob = entry.blob;
            let failed = match self.store.get_stored(&blob.digest, blob.stored_size).await {
                Ok(body) => {
                    let body = self.first_bytes(&blob.digest, body).await?;
                    return Ok(Some(Opened { entry, body }));
                }
                Err(e @ (StoreError::NotFound { .. } | StoreError::Changed { .. })) => e,
                Err(e) => return Err(e.into()),
            };
            attempt += 1;
            let unchanged = self.meta.get_file(path).await?.map(|e| e.blob) == Some(blob);
            match failed {
                _ if !unchanged && attempt <= OPEN_ATTEMPTS => continue,
                StoreError::Changed { .. } if attempt <= OPEN_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
                StoreError::NotFound { .. } => {
                    return Err(FileStoreError::ObjectMissing {
                        path: path.to_owned(),
                        digest: blob.digest,
                    });
                }
                e => {
                    tracing::warn!(path, digest = %blob.digest, error = %e,
                        "the object does not have the size its row records, and kept not having \
                         it: damaged, or replaced behind s3dedup's back (s3dedup-cleaner \
                         --verify --deep lists such objects)");
                    return Err(e.into());
                }
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
    use crate::store::ObjectStream;
    use futures::TryStreamExt;
    use tokio::sync::oneshot;

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

    fn spool(fs: &FileStore, content: &[u8]) -> Spooled {
        fs.spool_blocking(content, Encoding::Identity, &Hints::default(), &OPTS)
            .unwrap()
    }

    async fn read_back(fs: &FileStore, path: &str) -> Vec<u8> {
        let opened = fs.open(path).await.unwrap().expect("the file exists");
        let gz: Vec<bytes::Bytes> = opened.body.try_collect().await.unwrap();
        let mut out = Vec::new();
        crate::blob::inflate(&gz.concat()[..], &mut out).unwrap();
        out
    }

    /// The cleaner deletes `digest` as a tombstone of `settle` would have it, with an assumed
    /// lock: what a cleaner that got in through a lost lock does. Returns the deletion.
    async fn cleaner_deletes(
        fs: &FileStore,
        digest: &Digest,
        cutoff: i64,
        settle: Duration,
    ) -> i64 {
        let lock = BlobLock::<Exclusive>::assumed(digest);
        let deletion = fs
            .meta
            .tombstone_blob(&lock, cutoff, settle)
            .await
            .unwrap()
            .unwrap();
        let soon = tokio::time::Instant::now() + Duration::from_secs(10);
        fs.store.delete(digest, soon).await.unwrap();
        deletion
    }

    #[tokio::test]
    async fn storing_content_again_waits_until_its_deletion_settles() {
        let dir = tempfile::tempdir().unwrap();
        let fs = fixture(dir.path()).await;
        let s = spool(&fs, b"deleted, then wanted again");
        let digest = s.info.digest;
        fs.commit("/a", 1, s, 0).await.unwrap();
        fs.delete("/a", 1, 0).await.unwrap();
        // A delete request of this deletion may land for another 1.5 s: an object stored
        // before then could be deleted under a live row.
        let settle = Duration::from_millis(1500);
        let deletion = cleaner_deletes(&fs, &digest, 10, settle).await;
        let started = std::time::Instant::now();
        let c = fs
            .commit("/b", 1, spool(&fs, b"deleted, then wanted again"), 20)
            .await
            .unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(1300),
            "{:?}",
            started.elapsed()
        );
        assert!(!c.deduplicated);
        assert_eq!(read_back(&fs, "/b").await, b"deleted, then wanted again");

        // A deletion that saw its object go with no request unanswered has settled: no wait.
        fs.delete("/b", 1, 30).await.unwrap();
        let deletion2 = cleaner_deletes(&fs, &digest, 40, Duration::from_secs(60)).await;
        assert_ne!(deletion, deletion2);
        assert!(
            fs.meta
                .finish_deletion(&digest, deletion2, true)
                .await
                .unwrap()
        );
        let started = std::time::Instant::now();
        fs.commit("/c", 1, spool(&fs, b"deleted, then wanted again"), 50)
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(read_back(&fs, "/c").await, b"deleted, then wanted again");
    }

    /// A store that lets a test step in where a lost lock lets others in: right after an object
    /// is stored (a PUT between its upload and its commit), or right before one is read (a
    /// GET between reading a row and opening its object).
    #[derive(Default)]
    struct Meddling {
        inner: Option<Arc<dyn ObjectStore>>,
        puts: std::sync::atomic::AtomicUsize,
        /// After the next put: tell the test which digest, and wait until it says go on.
        after_put: std::sync::Mutex<Option<(oneshot::Sender<Digest>, oneshot::Receiver<()>)>>,
        /// Before the next read, one of [`BeforeRead`].
        before_read: std::sync::Mutex<Option<BeforeRead>>,
    }

    enum BeforeRead {
        /// `/b` deleted, its blob deleted by the cleaner, and stored at `/b` again as these
        /// gzip bytes.
        StoredAgainAtB(Arc<dyn MetaStore>, Vec<u8>),
        /// The object replaced by these gzip bytes of the same content, its row unchanged: a
        /// second upload that commits its sizes a little later (with the metadata store), or
        /// never (a damaged object).
        Replaced(Option<Arc<dyn MetaStore>>, Vec<u8>),
    }

    impl Meddling {
        fn around(inner: Arc<dyn ObjectStore>) -> Self {
            Meddling {
                inner: Some(inner),
                ..Meddling::default()
            }
        }

        fn inner(&self) -> &Arc<dyn ObjectStore> {
            self.inner.as_ref().expect("a store to meddle with")
        }

        async fn store_again_at_b(&self, meta: &dyn MetaStore, digest: &Digest, gz: Vec<u8>) {
            meta.delete_file("/b", 1, 0).await.unwrap();
            let lock = BlobLock::<Exclusive>::assumed(digest);
            let deletion = meta
                .tombstone_blob(&lock, i64::MAX, Duration::ZERO)
                .await
                .unwrap();
            assert!(
                deletion.is_some(),
                "unreferenced, so the cleaner may take it"
            );
            let soon = tokio::time::Instant::now() + Duration::from_secs(10);
            self.inner().delete(digest, soon).await.unwrap();
            let over = meta.blob_state(lock.held()).await.unwrap();
            let n = gz.len() as u64;
            let info = BlobInfo {
                digest: *digest,
                logical_size: 4,
                stored_size: n,
            };
            self.inner()
                .put(digest, SpoolBody::Memory(gz.into()), n)
                .await
                .unwrap();
            let stored = Stored::Object { lock: &lock, over };
            let r = meta
                .store_file("/b", 2, &info, stored, 0, PutKind::Client)
                .await;
            assert!(matches!(r, Ok(PutResult::Done(_))), "{r:?}");
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Meddling {
        fn describe(&self) -> String {
            self.inner().describe()
        }
        fn key(&self, digest: &Digest) -> String {
            self.inner().key(digest)
        }
        async fn put(&self, digest: &Digest, body: SpoolBody, size: u64) -> Result<(), StoreError> {
            self.inner().put(digest, body, size).await?;
            self.puts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let step_in = self.after_put.lock().unwrap().take();
            if let Some((tell, resume)) = step_in {
                let _ = tell.send(*digest);
                let _ = resume.await;
            }
            Ok(())
        }
        async fn get(&self, digest: &Digest) -> Result<ObjectStream, StoreError> {
            self.inner().get(digest).await
        }
        async fn get_stored(&self, digest: &Digest, size: u64) -> Result<ObjectStream, StoreError> {
            let step_in = self.before_read.lock().unwrap().take();
            match step_in {
                Some(BeforeRead::StoredAgainAtB(meta, gz)) => {
                    self.store_again_at_b(&*meta, digest, gz).await;
                }
                Some(BeforeRead::Replaced(meta, gz)) => {
                    let n = gz.len() as u64;
                    self.inner()
                        .put(digest, SpoolBody::Memory(gz.into()), n)
                        .await?;
                    let digest = *digest;
                    // The second upload's commit, a moment later.
                    tokio::spawn(async move {
                        let Some(meta) = meta else { return };
                        tokio::time::sleep(Duration::from_millis(120)).await;
                        let lock = BlobLock::<Exclusive>::assumed(&digest);
                        let info = BlobInfo {
                            digest,
                            logical_size: 4,
                            stored_size: n,
                        };
                        let over = BlobState::Live;
                        let stored = Stored::Object { lock: &lock, over };
                        let r = meta.store_file("/c", 1, &info, stored, 0, PutKind::Client);
                        assert!(matches!(r.await, Ok(PutResult::Done(_))));
                    });
                }
                None => {}
            }
            self.inner().get_stored(digest, size).await
        }
        async fn head(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
            self.inner().head(digest).await
        }
        async fn delete(
            &self,
            digest: &Digest,
            deadline: tokio::time::Instant,
        ) -> Result<crate::store::Deleted, StoreError> {
            self.inner().delete(digest, deadline).await
        }
        async fn check(&self) -> Result<(), StoreError> {
            self.inner().check().await
        }
        async fn list(
            &self,
            after: Option<&Digest>,
            limit: usize,
        ) -> Result<Vec<crate::store::ObjectEntry>, StoreError> {
            self.inner().list(after, limit).await
        }
    }

    #[tokio::test]
    async fn an_upload_deleted_before_its_commit_is_stored_again_not_acknowledged_lost() {
        let dir = tempfile::tempdir().unwrap();
        let mut fs = fixture(dir.path()).await;
        let (tell, stored) = oneshot::channel();
        let (resume, resumed) = oneshot::channel();
        let store = Arc::new(Meddling::around(fs.store.clone()));
        *store.after_put.lock().unwrap() = Some((tell, resumed));
        fs.store = store.clone();
        let fs = Arc::new(fs);
        // Large enough for a spool file, which the store moves into place (gone from the
        // spool when the cleaner deletes the object).
        let mut x = 1u64;
        let content: Vec<u8> = (0..500_000)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        let put = {
            let (fs, s) = (fs.clone(), spool(&fs, &content));
            tokio::spawn(async move { fs.commit("/x", 1, s, 0).await })
        };
        let digest = stored.await.unwrap();
        // The orphan sweep, let in by a lost lock: the object has no row yet.
        let lock = BlobLock::<Exclusive>::assumed(&digest);
        let made = fs
            .meta
            .tombstone_orphans(&[(&lock, 1)], Duration::ZERO, 0)
            .await
            .unwrap();
        let [(_, deletion)] = made[..] else {
            panic!("{made:?}")
        };
        let soon = tokio::time::Instant::now() + Duration::from_secs(10);
        fs.store.delete(&digest, soon).await.unwrap();
        fs.meta
            .finish_deletion(&digest, deletion, true)
            .await
            .unwrap();
        resume.send(()).unwrap();
        let c = put.await.unwrap().unwrap();
        assert_eq!(c.outcome, PutOutcome::Stored { version: 1 });
        assert_eq!(
            store.puts.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "stored again"
        );
        assert_eq!(read_back(&fs, "/x").await, content);
        let v = crate::gc::verify(&fs, true, 10, Duration::from_secs(1), &|_| {})
            .await
            .unwrap();
        assert_eq!(v.problems(), 0, "{v:?}");
    }

    #[tokio::test]
    async fn a_read_that_finds_its_content_stored_again_as_other_bytes_reads_the_new_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut fs = fixture(dir.path()).await;
        // Stored as the server's level-1 gzip; the same content as a client's level-9 gzip
        // with a header of its own is other bytes of another length.
        fs.commit("/b", 1, spool(&fs, b"same"), 0).await.unwrap();
        let mut gz = flate2::GzBuilder::new()
            .filename("another header")
            .write(Vec::new(), flate2::Compression::new(9));
        io::Write::write_all(&mut gz, b"same").unwrap();
        let gz = gz.finish().unwrap();
        let before = fs
            .meta
            .get_file("/b")
            .await
            .unwrap()
            .unwrap()
            .blob
            .stored_size;
        assert_ne!(before, gz.len() as u64);
        let store = Arc::new(Meddling::around(fs.store.clone()));
        let action = BeforeRead::StoredAgainAtB(fs.meta.clone(), gz.clone());
        *store.before_read.lock().unwrap() = Some(action);
        fs.store = store.clone();
        let opened = fs.open("/b").await.unwrap().expect("the file is there");
        assert_eq!(opened.entry.version, 2, "the row read again");
        assert_eq!(opened.entry.blob.stored_size, gz.len() as u64);
        let bytes: Vec<bytes::Bytes> = opened.body.try_collect().await.unwrap();
        assert_eq!(bytes.concat(), gz, "the object the row describes, whole");

        // A second upload replaced the object and commits its sizes a moment later: the read
        // waits for it and sends the object whole under its new length.
        let mut gz6 = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        io::Write::write_all(&mut gz6, b"same").unwrap();
        let gz6 = gz6.finish().unwrap();
        assert_ne!(gz6.len(), gz.len());
        let action = BeforeRead::Replaced(Some(fs.meta.clone()), gz6.clone());
        *store.before_read.lock().unwrap() = Some(action);
        let opened = fs.open("/b").await.unwrap().expect("the file is there");
        assert_eq!(opened.entry.blob.stored_size, gz6.len() as u64);
        let bytes: Vec<bytes::Bytes> = opened.body.try_collect().await.unwrap();
        assert_eq!(bytes.concat(), gz6);

        // An object of another size that no commit explains (damaged, or written behind our
        // back) is an error, never sent under the row's length.
        let other = crate::blob::tests::gzip(b"something else entirely", 1);
        *store.before_read.lock().unwrap() = Some(BeforeRead::Replaced(None, other));
        let e = fs.open("/b").await.err().expect("refused");
        assert!(
            matches!(e, FileStoreError::Store(StoreError::Changed { .. })),
            "{e}"
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
        let soon = tokio::time::Instant::now() + Duration::from_secs(30);
        fs.store.delete(&digest, soon).await.unwrap();
        let e = fs.open("/x").await.err().unwrap();
        assert!(matches!(e, FileStoreError::ObjectMissing { .. }), "{e}");
        assert!(fs.open("/nothing").await.unwrap().is_none());
    }
}
