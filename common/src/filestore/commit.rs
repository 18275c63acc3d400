//! Committing an upload (or an import, or an adopted object): under the blob's lock, the object
//! stored unless live content makes it needless (or the content is small enough for its row),
//! then the metadata's compare-and-set on the state read under the lock, looked at again when
//! a lost lock let the cleaner in.

use std::time::Duration;

use bytes::Bytes;

use crate::blob::{BlobError, BlobInfo, Digest};
use crate::locks::{BlobLock, Exclusive, Shared};
use crate::meta::{BlobState, MetaError, MetaStore, PutKind, PutOutcome, PutResult, Stored};
use crate::protocol::Version;
use crate::spool::{Retained, SpoolBody};
use crate::store::{PendingUpload, StoreError};

use super::{FileStore, FileStoreError, Spooled};

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
        &self, meta: &dyn MetaStore, stored: Stored<'_>,
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
    /// The object already on its way to the store, sent on while the body arrived.
    early: Option<Box<dyn PendingUpload>>,
    /// The body again, once it was handed to the store.
    retained: Option<Retained>,
}

/// Where new content goes.
enum Content {
    /// Into the blob's row, in the commit's own transaction.
    Inline(Bytes),
    Object(Upload),
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

impl FileStore {
    /// Makes `path` hold the spooled content at `version`, unless a newer version is stored (or,
    /// for [`PutKind::Import`], the path was deleted here at or after `version`:
    /// [`PutOutcome::Deleted`]). Works under the blob's lock; when the blob turns out to have
    /// changed under it (a lost lock let the cleaner in), looks again and stores the content
    /// again if need be.
    pub async fn commit(
        &self, path: &str, version: Version, spooled: Spooled, now: i64, kind: PutKind,
    ) -> Result<Committed, FileStoreError> {
        let Spooled {
            body, info, early, ..
        } = spooled;
        let put = Put {
            path,
            version,
            info: &info,
            now,
            kind,
        };
        let mut content = if self.inline_max > 0 && info.stored_size <= self.inline_max {
            // What was sent on early is discarded on drop.
            drop(early);
            Content::Inline(self.read_small(body).await?)
        } else {
            Content::Object(Upload {
                body: Some(body),
                early,
                retained: None,
            })
        };
        let mut found = BlobState::Live;
        for _ in 0..COMMIT_ATTEMPTS {
            match self.commit_once(&put, &mut content).await? {
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

    /// The bytes of a body small enough to be kept in a row.
    async fn read_small(&self, body: SpoolBody) -> Result<Bytes, FileStoreError> {
        let file = match body {
            SpoolBody::Memory(bytes) => return Ok(bytes),
            SpoolBody::File(file) => file,
        };
        let read = tokio::task::spawn_blocking(move || std::fs::read(file.path()))
            .await
            .map_err(|e| FileStoreError::IngestTask(e.to_string()))?;
        read.map(Bytes::from)
            .map_err(|source| FileStoreError::Spool {
                dir: self.spool_dir.clone(),
                source,
            })
    }

    async fn commit_once(
        &self, put: &Put<'_>, content: &mut Content,
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
        let result = self.store_under(&lock, put, content).await;
        lock.release().await;
        result
    }

    async fn store_under(
        &self, lock: &BlobLock<Exclusive>, put: &Put<'_>, content: &mut Content,
    ) -> Result<Step, FileStoreError> {
        let (path, info) = (put.path, put.info);
        let state = self.meta.blob_state(lock.held()).await?;
        let seen = tokio::time::Instant::now();
        if state == BlobState::Live {
            if let Content::Object(upload) = content {
                // What was sent on of content that turned out to be stored is discarded on drop.
                upload.early = None;
            }
            let done = put
                .record(&*self.meta, Stored::Existing(lock.held()))
                .await?;
            return Ok(Step::of(done, true));
        }
        let upload = match content {
            // No object store request of any deletion can touch content kept in a row: it
            // need not wait for a tombstone to settle.
            Content::Inline(bytes) => return self.record_inline(lock, put, state, bytes).await,
            Content::Object(upload) => upload,
        };
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
            upload.early = None;
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

    /// Creates or revives the row over `state` with the content in it.
    async fn record_inline(
        &self, lock: &BlobLock<Exclusive>, put: &Put<'_>, state: BlobState, content: &[u8],
    ) -> Result<Step, FileStoreError> {
        let stored = Stored::Inline {
            lock,
            over: state,
            content,
        };
        let done = put.record(&*self.meta, stored).await?;
        if done != PutResult::Conflict(BlobState::Live) {
            return Ok(Step::of(done, false));
        }
        // Another upload stored the content meanwhile (only lost locks let two in at once),
        // with other gzip bytes: this is a reference to what it stored.
        let done = put
            .record(&*self.meta, Stored::Existing(lock.held()))
            .await?;
        Ok(Step::of(done, false))
    }

    /// Stores the upload's object: what was sent early, or the body (kept aside first, in case
    /// it must be stored again).
    async fn store_object(
        &self, info: &BlobInfo, upload: &mut Upload,
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
        match upload.early.take() {
            Some(p) => p.finish(body, info.stored_size).await?,
            None => self.store.put(&info.digest, body, info.stored_size).await?,
        }
        Ok(())
    }

    /// Adopts an object that is already in the store under its digest (an upstream s3dedup
    /// bucket) as `path` at `version`, as an import. Nothing is copied; the object is read once
    /// to check that it inflates to its digest, unless a live row already vouches for it.
    pub async fn adopt(
        &self, path: &str, version: Version, digest: &Digest, now: i64,
    ) -> Result<Committed, FileStoreError> {
        let lock = BlobLock::<Exclusive>::acquire(&*self.locks, digest, self.lock_timeout).await?;
        let result = self.adopt_under(&lock, path, version, now).await;
        lock.release().await;
        result
    }

    async fn adopt_under(
        &self, lock: &BlobLock<Exclusive>, path: &str, version: Version, now: i64,
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
}
