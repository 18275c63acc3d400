//! The metadata store: which path holds which version of which blob, and each blob's reference
//! count and state. It is the only judge of liveness: a live row means the content is stored,
//! in the database beside the row (small contents, "inline") or as the object
//! (docs/design.md). Every change a request makes is one transaction.
//!
//! A blob row is live, or a tombstone of one deletion by the cleaner. A tombstone keeps the
//! time until which a delete request of that deletion may still reach the object store
//! (`settles_at`), and stays, once the object is gone, until long after that time, so that a
//! writer who lost its lock meanwhile finds that its blob changed under it instead of an
//! absent row that looks as it did before.

mod postgres;
mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::blob::{BlobInfo, Digest};
use crate::locks::{BlobLock, Exclusive, HeldBlob};
use crate::protocol::Version;

#[cfg(test)]
pub(crate) use postgres::tests::test_config as postgres_test_config;
pub use postgres::{PostgresMeta, connection_config as postgres_connection_config};
#[cfg(test)]
pub(crate) use sqlite::tests::test_options as sqlite_test_options;
pub use sqlite::{SqliteMeta, SqliteOptions};

/// A file as the metadata knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub path: String,
    pub version: Version,
    pub blob: BlobInfo,
    /// The stored bytes, when its blob's row keeps them (a small content); `None`: they are
    /// the object store's object under the digest.
    pub inline: Option<Bytes>,
}

/// What a PUT did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The path now holds the request's version.
    Stored { version: Version },
    /// A strictly newer version is stored; nothing changed.
    Newer { version: Version },
    /// An import only: the path was deleted here at `version`, at or after the imported
    /// version, so the old store's copy must not resurrect it.
    Deleted { version: Version },
}

/// A blob as a writer sees it under the blob's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobState {
    /// No row: never stored, or deleted long enough ago to be forgotten.
    Absent,
    /// Its object is stored.
    Live,
    /// A tombstone of the cleaner's deletion `deletion`: the object may be gone, and a delete
    /// request of that deletion may still reach the object store for `settles_in`.
    Tombstone { deletion: i64, settles_in: Duration },
}

impl BlobState {
    /// Whether the row is still in this state (a tombstone: of the same deletion).
    fn same_as(self, other: BlobState) -> bool {
        match (self, other) {
            (
                BlobState::Tombstone { deletion: a, .. },
                BlobState::Tombstone { deletion: b, .. },
            ) => a == b,
            (a, b) => a == b,
        }
    }
}

/// How a PUT's content is known to be in the object store, with the lock that makes it so.
#[derive(Debug, Clone, Copy)]
pub enum Stored<'a> {
    /// The blob was live when seen under its lock (either mode): add a reference.
    Existing(HeldBlob<'a>),
    /// The caller stored (or, adopting, found) the object under the blob's exclusive lock,
    /// having seen the blob in state `over`: create or revive the row with the upload's sizes
    /// (`over` is [`BlobState::Live`] when the object was stored again over a live row whose
    /// sizes were another upload's).
    Object {
        lock: &'a BlobLock<Exclusive>,
        over: BlobState,
    },
    /// As [`Stored::Object`], with the stored bytes kept in the row instead of an object.
    Inline {
        lock: &'a BlobLock<Exclusive>,
        over: BlobState,
        content: &'a [u8],
    },
}

/// [`Stored`] without its lock: what the commit's transaction checks the row against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Basis {
    Existing,
    Object { over: BlobState },
}

impl Stored<'_> {
    pub(crate) fn basis(&self) -> Basis {
        match self {
            Stored::Existing(_) => Basis::Existing,
            Stored::Object { over, .. } | Stored::Inline { over, .. } => {
                Basis::Object { over: *over }
            }
        }
    }

    /// What the row's content column is to hold when the commit writes the row's sizes: the
    /// bytes of inline content, nothing for an object.
    pub(crate) fn content(&self) -> Option<Vec<u8>> {
        match self {
            Stored::Inline { content, .. } => Some(content.to_vec()),
            _ => None,
        }
    }

    fn digest(&self) -> &Digest {
        match self {
            Stored::Existing(held) => held.digest(),
            Stored::Object { lock, .. } | Stored::Inline { lock, .. } => lock.digest(),
        }
    }

    /// The lock must be the blob's own.
    pub(crate) fn check(&self, blob: &BlobInfo) -> Result<(), MetaError> {
        if *self.digest() == blob.digest {
            return Ok(());
        }
        Err(MetaError::Inconsistent(format!(
            "storing blob {} under the lock of blob {}",
            blob.digest,
            self.digest()
        )))
    }
}

/// Who is writing a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutKind {
    /// A client's PUT.
    Client,
    /// A file from an old Filetracker (the migrator, the API's live fallback): also refused
    /// when the path was deleted here at or after its version.
    Import,
}

/// Who is deleting a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteKind {
    /// A client's DELETE.
    Client,
    /// Live migration: a DELETE of a path that may exist only on the old server. When no file
    /// is stored here the deletion is remembered all the same (so no import brings it back)
    /// and the outcome is [`DeleteOutcome::Deleted`].
    Unimported,
}

/// What [`MetaStore::store_file`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutResult {
    Done(PutOutcome),
    /// The blob's row was not in the state the commit relied on (a lost lock let the cleaner
    /// in): nothing changed. The writer must look again under its lock.
    Conflict(BlobState),
}

/// What a commit does with the blob's row, found in state `found` (its stored size
/// `found_size`, when it has a row) by the commit's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlobPlan {
    /// Live: add the reference.
    Reference,
    /// No row: insert a live one with the upload's sizes.
    Insert,
    /// Revive tombstone `deletion` with the upload's sizes.
    Revive {
        deletion: i64,
    },
    /// Live, and the object was stored again over it: take the upload's sizes.
    Resize,
    Conflict(BlobState),
}

pub(crate) fn plan_blob(
    basis: Basis, found: BlobState, found_size: Option<u64>, blob: &BlobInfo,
) -> BlobPlan {
    let over = match basis {
        Basis::Existing if found == BlobState::Live => return BlobPlan::Reference,
        Basis::Existing => return BlobPlan::Conflict(found),
        Basis::Object { over } => over,
    };
    match found {
        BlobState::Live if over == BlobState::Live => BlobPlan::Resize,
        // Someone else stored it meanwhile (both only under lost locks): the object is theirs
        // or ours, and only the same size makes either fit the row.
        BlobState::Live if found_size == Some(blob.stored_size) => BlobPlan::Reference,
        BlobState::Absent if over == BlobState::Absent => BlobPlan::Insert,
        BlobState::Tombstone { deletion, .. } if over.same_as(found) => {
            BlobPlan::Revive { deletion }
        }
        _ => BlobPlan::Conflict(found),
    }
}

/// The state a row's columns describe; `settles_in_ms` is its `settles_at` minus now.
pub(crate) fn state_of(live: bool, deletion: Option<i64>, settles_in_ms: Option<i64>) -> BlobState {
    if live {
        return BlobState::Live;
    }
    BlobState::Tombstone {
        // A tombstone from before deletions had ids.
        deletion: deletion.unwrap_or(0),
        settles_in: Duration::from_millis(settles_in_ms.unwrap_or(0).max(0) as u64),
    }
}

/// Milliseconds since the Unix epoch: SQLite's clock for settle times (one host).
pub(crate) fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A new deletion's id: random, so that a tombstone removed and made again never repeats one
/// a writer may still hold.
pub(crate) fn new_deletion_id() -> i64 {
    // Never 0, the id of tombstones from before ids existed.
    (rand::random::<u64>() >> 1) as i64 | 1
}

/// What a DELETE did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    /// A strictly newer version is stored; nothing changed.
    Newer {
        version: Version,
    },
    NotFound,
}

/// A blob row: one distinct content and its reference count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRow {
    pub info: BlobInfo,
    pub refcount: i64,
    /// False once the cleaner has tombstoned it (its object may already be gone).
    pub live: bool,
    /// When the last reference went away (Unix seconds), if it has none.
    pub unreferenced_since: Option<i64>,
    pub created_at: i64,
    /// The row keeps the stored bytes: there is no object.
    pub inline: bool,
}

/// What [`MetaStore::tombstone_blob`] made of an unreferenced blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    /// Its row kept the content and is gone with it: nothing to delete in the object store.
    Removed,
    /// A tombstone of deletion `id`: the object is to be deleted.
    Tombstone(i64),
}

/// Totals for `/metrics` and reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub files: u64,
    pub blobs: u64,
    /// Uncompressed bytes of all distinct contents.
    pub logical_bytes: u64,
    /// Their stored (gzip) bytes, in objects and in rows that keep them.
    pub stored_bytes: u64,
    /// Uncompressed bytes of all files, as clients see them (duplicates counted each time).
    pub referenced_bytes: u64,
}

/// Why the metadata store could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MetaError {
    #[error("metadata database unavailable: {0}")]
    Unavailable(String),
    #[error("metadata database error: {0}")]
    Database(String),
    #[error("metadata is inconsistent: {0}")]
    Inconsistent(String),
}

/// The metadata database. Implementations: SQLite (one host) and PostgreSQL (several).
#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    /// Human-readable description for logs.
    fn describe(&self) -> String;

    /// The file at `path` with its blob, if any.
    async fn get_file(&self, path: &str) -> Result<Option<FileEntry>, MetaError>;

    /// True when a live row exists for the digest (its object is stored). Only a hint: what
    /// acts on a blob's state reads it under the blob's lock with [`MetaStore::blob_state`].
    async fn blob_is_live(&self, digest: &Digest) -> Result<bool, MetaError>;

    /// The blob's state, for a writer holding its lock: the commit that follows must still find
    /// it so ([`Stored`]).
    async fn blob_state(&self, lock: HeldBlob<'_>) -> Result<BlobState, MetaError>;

    /// One transaction: make `path` point at `blob` with `version` unless a strictly newer
    /// version is stored (or, for [`PutKind::Import`], the path was deleted here at or after
    /// `version`), adjusting reference counts. `stored` says how the content is known to be in
    /// the object store; if the blob's row is no longer in the state that implies, nothing
    /// changes and the answer is [`PutResult::Conflict`].
    async fn store_file(
        &self, path: &str, version: Version, blob: &BlobInfo, stored: Stored<'_>, now: i64,
        kind: PutKind,
    ) -> Result<PutResult, MetaError>;

    /// One transaction: remove `path` unless a strictly newer version is stored, and remember
    /// the deletion (path and version) so imports do not resurrect it; see [`DeleteKind`] for
    /// a path no file is stored at.
    async fn delete_file(
        &self, path: &str, version: Version, now: i64, kind: DeleteKind,
    ) -> Result<DeleteOutcome, MetaError>;

    /// One page of a listing: see [`ListPage`].
    async fn list_files(&self, page: &ListPage<'_>) -> Result<Vec<String>, MetaError>;

    /// Blob rows in digest order, strictly after `after`, at most `limit` (for verification and
    /// reports; memory stays bounded by the page size).
    async fn list_blobs(
        &self, after: Option<&Digest>, limit: usize,
    ) -> Result<Vec<BlobRow>, MetaError>;

    /// The blob's row, if any.
    async fn get_blob(&self, digest: &Digest) -> Result<Option<BlobRow>, MetaError>;

    /// The stored bytes a live row keeps (inline content); `None` when there is no such row or
    /// the content is an object.
    async fn inline_content(&self, digest: &Digest) -> Result<Option<Bytes>, MetaError>;

    /// Blobs the cleaner may delete: live with no references since at or before `cutoff`, or
    /// tombstoned by a run that did not see its object deleted. Digest order, strictly after
    /// `after`.
    async fn unreferenced_blobs(
        &self, cutoff: i64, after: Option<&Digest>, limit: usize,
    ) -> Result<Vec<BlobInfo>, MetaError>;

    /// Live blobs with no references that became unreferenced after `cutoff` (waiting for the
    /// grace period): how many, and their stored bytes.
    async fn waiting_blobs(&self, cutoff: i64) -> Result<(u64, u64), MetaError>;

    /// One atomic re-check and mark: if the blob still has no references since `cutoff` (or
    /// is a tombstone whose object was not seen deleted), make it a tombstone of a new
    /// deletion whose delete requests may land until `settle` from now (the database's clock);
    /// returns that deletion's id.
    /// A row that keeps its content (inline) has no object to wait for: it is removed at
    /// once ([`Deletion::Removed`]).
    async fn tombstone_blob(
        &self, lock: &BlobLock<Exclusive>, cutoff: i64, settle: Duration,
    ) -> Result<Option<Deletion>, MetaError>;

    /// For objects that have no row (orphans), each under its lock with its stored size: one
    /// tombstone row each, as [`MetaStore::tombstone_blob`] makes. Returns the deletion ids of
    /// those that still had no row.
    async fn tombstone_orphans(
        &self, orphans: &[(&BlobLock<Exclusive>, u64)], settle: Duration, now: i64,
    ) -> Result<Vec<(Digest, i64)>, MetaError>;

    /// Records that deletion `deletion` saw the object deleted; `settled`: and that none of
    /// its delete requests can land any more, so writers need not wait for it. False when the
    /// row is no longer that tombstone (a writer revived it; nothing changes).
    async fn finish_deletion(
        &self, digest: &Digest, deletion: i64, settled: bool,
    ) -> Result<bool, MetaError>;

    /// Forgets tombstones whose object is gone and that settled more than `keep` ago (the
    /// database's clock); returns how many.
    async fn purge_tombstones(&self, keep: Duration) -> Result<u64, MetaError>;

    /// Which of `digests` have a row, in any state.
    async fn known_blobs(&self, digests: &[Digest]) -> Result<Vec<Digest>, MetaError>;

    /// Totals over files and live blobs.
    async fn stats(&self) -> Result<Stats, MetaError>;

    /// Blobs whose recorded reference count differs from the number of files pointing at them,
    /// as `(digest, recorded, actual)`. Empty on a consistent store.
    async fn refcount_mismatches(&self) -> Result<Vec<(Digest, i64, i64)>, MetaError>;

    /// The version at which `path` was last deleted, if its deletion is remembered.
    async fn deleted_version(&self, path: &str) -> Result<Option<Version>, MetaError>;

    /// Remembered deletions as `(path, version)` in path order, strictly after `after`, at most
    /// `limit` (for an import from another s3dedup store, which carries them over).
    async fn list_deletions(
        &self, after: &str, limit: usize,
    ) -> Result<Vec<(String, Version)>, MetaError>;

    /// Files as `(path, version)` in path order, strictly after `after`, at most `limit`, that
    /// an import stored and no client wrote since (a final delta checks them against the
    /// source).
    async fn list_imported(
        &self, after: &str, limit: usize,
    ) -> Result<Vec<(String, Version)>, MetaError>;

    /// Forgets deletions recorded before `before` (Unix seconds); returns how many.
    async fn purge_deletions(&self, before: i64) -> Result<u64, MetaError>;

    /// The position an interrupted migration of `source` reached, if any.
    async fn checkpoint(&self, source: &str) -> Result<Option<String>, MetaError>;

    /// Records (`Some`) or clears (`None`) the migration checkpoint of `source`.
    async fn set_checkpoint(
        &self, source: &str, position: Option<&str>, now: i64,
    ) -> Result<(), MetaError>;

    /// Checks that the database answers.
    async fn check(&self) -> Result<(), MetaError>;
}

/// What a PUT changes, decided from the path's current `(version, digest)`. Both backends
/// execute this plan inside their transaction, so the rules live in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PutPlan {
    /// A strictly newer version is stored: change nothing.
    Keep { stored: Version },
    /// An import of a path deleted here at or after its version: change nothing.
    Deleted { at: Version },
    /// Same content: only the version changes, no reference moves.
    Touch,
    /// Point the path at the new blob (one more reference) and drop the old blob's reference.
    Replace { old: Option<String> },
}

/// `deleted` is the path's remembered deletion, passed for imports only.
pub(crate) fn plan_put(
    current: Option<(Version, &str)>, deleted: Option<Version>, version: Version, digest: &str,
) -> PutPlan {
    if current.is_none()
        && let Some(at) = deleted.filter(|at| *at >= version)
    {
        return PutPlan::Deleted { at };
    }
    match current {
        Some((stored, _)) if stored > version => PutPlan::Keep { stored },
        Some((_, old)) if old == digest => PutPlan::Touch,
        other => PutPlan::Replace {
            old: other.map(|(_, d)| d.to_owned()),
        },
    }
}

/// What a DELETE changes, decided from the path's current `(version, digest)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DeletePlan {
    Missing,
    Keep {
        stored: Version,
    },
    Remove {
        digest: String,
    },
    /// No file here, but one may be on the old server: only remember the deletion.
    Remember,
}

pub(crate) fn plan_delete(
    current: Option<(Version, String)>, version: Version, kind: DeleteKind,
) -> DeletePlan {
    match current {
        None if kind == DeleteKind::Unimported => DeletePlan::Remember,
        None => DeletePlan::Missing,
        Some((stored, _)) if stored > version => DeletePlan::Keep { stored },
        Some((_, digest)) => DeletePlan::Remove { digest },
    }
}

impl PutPlan {
    pub(crate) fn outcome(&self, version: Version) -> PutOutcome {
        match self {
            PutPlan::Keep { stored } => PutOutcome::Newer { version: *stored },
            PutPlan::Deleted { at } => PutOutcome::Deleted { version: *at },
            _ => PutOutcome::Stored { version },
        }
    }
}

impl DeletePlan {
    pub(crate) fn outcome(&self) -> DeleteOutcome {
        match self {
            DeletePlan::Missing => DeleteOutcome::NotFound,
            DeletePlan::Keep { stored } => DeleteOutcome::Newer { version: *stored },
            DeletePlan::Remove { .. } | DeletePlan::Remember => DeleteOutcome::Deleted,
        }
    }

    /// Whether the path's deletion is to be remembered.
    pub(crate) fn remembers(&self) -> bool {
        matches!(self, DeletePlan::Remove { .. } | DeletePlan::Remember)
    }
}

/// One page of a directory listing: paths starting with `prefix` (all when empty) with version
/// ≤ `cutoff`, sorted, strictly after `after`, at most `limit`.
#[derive(Debug, Clone, Copy)]
pub struct ListPage<'a> {
    pub prefix: &'a str,
    pub cutoff: Version,
    pub after: Option<&'a str>,
    pub limit: usize,
}

impl<'a> ListPage<'a> {
    pub fn first(prefix: &'a str, cutoff: Version, limit: usize) -> Self {
        ListPage {
            prefix,
            cutoff,
            after: None,
            limit,
        }
    }

    /// The page that follows one ending at `last`.
    pub fn after(self, last: &'a str) -> Self {
        ListPage {
            after: Some(last),
            ..self
        }
    }

    /// The scan's range: paths strictly greater than the first, and less than the second when
    /// there is one.
    fn range(&self) -> (&'a str, Option<String>) {
        (self.after.unwrap_or(self.prefix), prefix_end(self.prefix))
    }
}

/// The smallest string greater than every string starting with `prefix` (for range scans).
/// Listing prefixes end in `/`, so the last byte is always ASCII.
fn prefix_end(prefix: &str) -> Option<String> {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0x7f {
            bytes.push(last + 1);
            return String::from_utf8(bytes).ok();
        }
    }
    None
}

#[cfg(test)]
pub(crate) mod conformance {
    //! The behaviour every metadata store must have; run against each implementation. Locks
    //! are stand-ins: what is checked here is what the database does with each call.
    use super::*;

    const SETTLE: Duration = Duration::from_secs(60);
    /// The kind of most writes here.
    const CLIENT: PutKind = PutKind::Client;

    /// A write as the file store makes it: `uploaded`, the caller stored the object over the
    /// state it finds; otherwise it references a live blob. A conflict is an error here.
    pub(crate) async fn put(
        m: &dyn MetaStore, path: &str, version: Version, blob: &BlobInfo, uploaded: bool, now: i64,
        kind: PutKind,
    ) -> Result<PutOutcome, MetaError> {
        let lock = BlobLock::<Exclusive>::assumed(&blob.digest);
        let stored = if uploaded {
            let over = m.blob_state(lock.held()).await?;
            Stored::Object { lock: &lock, over }
        } else {
            Stored::Existing(lock.held())
        };
        match m.store_file(path, version, blob, stored, now, kind).await? {
            PutResult::Done(o) => Ok(o),
            PutResult::Conflict(found) => {
                Err(MetaError::Inconsistent(format!("conflict: {found:?}")))
            }
        }
    }

    /// A client's DELETE.
    async fn delete(m: &dyn MetaStore, path: &str, version: Version, now: i64) -> DeleteOutcome {
        let kind = DeleteKind::Client;
        m.delete_file(path, version, now, kind).await.unwrap()
    }

    async fn tombstone(m: &dyn MetaStore, digest: &Digest, cutoff: i64) -> Option<i64> {
        let lock = BlobLock::<Exclusive>::assumed(digest);
        match m.tombstone_blob(&lock, cutoff, SETTLE).await.unwrap() {
            Some(Deletion::Tombstone(id)) => Some(id),
            Some(Deletion::Removed) => panic!("an object's row was removed as inline"),
            None => None,
        }
    }

    async fn state(m: &dyn MetaStore, digest: &Digest) -> BlobState {
        let lock = BlobLock::<Exclusive>::assumed(digest);
        m.blob_state(lock.held()).await.unwrap()
    }

    fn blob(n: u8, size: u64) -> BlobInfo {
        BlobInfo {
            digest: Digest([n; 32]),
            logical_size: size,
            stored_size: size / 2 + 20,
        }
    }

    pub async fn versions_follow_filetracker(m: &dyn MetaStore) {
        let a = blob(1, 100);
        let b = blob(2, 200);
        assert_eq!(m.get_file("/x").await.unwrap(), None);
        assert!(!m.blob_is_live(&a.digest).await.unwrap());
        assert_eq!(
            put(m, "/x", 10, &a, true, 1, CLIENT).await.unwrap(),
            PutOutcome::Stored { version: 10 }
        );
        assert!(m.blob_is_live(&a.digest).await.unwrap());
        // Older: ignored, reported.
        assert_eq!(
            put(m, "/x", 9, &b, true, 1, CLIENT).await.unwrap(),
            PutOutcome::Newer { version: 10 }
        );
        assert_eq!(m.get_file("/x").await.unwrap().unwrap().blob, a);
        // Equal: overwrites.
        assert_eq!(
            put(m, "/x", 10, &b, false, 1, CLIENT).await.unwrap(),
            PutOutcome::Stored { version: 10 }
        );
        let f = m.get_file("/x").await.unwrap().unwrap();
        assert_eq!((f.version, f.blob), (10, b));
        assert_eq!(
            delete(m, "/x", 9, 2).await,
            DeleteOutcome::Newer { version: 10 }
        );
        assert_eq!(delete(m, "/x", 10, 2).await, DeleteOutcome::Deleted);
        assert_eq!(delete(m, "/x", 10, 2).await, DeleteOutcome::NotFound);
        assert_eq!(m.get_file("/x").await.unwrap(), None);
    }

    pub async fn refcounts_track_references(m: &dyn MetaStore) {
        let a = blob(3, 1000);
        let b = blob(4, 10);
        for i in 0..5 {
            let uploaded = i == 0;
            put(m, &format!("/d/{i}"), 1, &a, uploaded, 1, CLIENT)
                .await
                .unwrap();
        }
        put(m, "/d/b", 1, &b, true, 1, CLIENT).await.unwrap();
        let s = m.stats().await.unwrap();
        assert_eq!((s.files, s.blobs), (6, 2));
        assert_eq!(s.logical_bytes, 1010);
        assert_eq!(s.referenced_bytes, 5 * 1000 + 10);
        assert_eq!(m.refcount_mismatches().await.unwrap(), vec![]);
        // Overwrite one reference of `a` with `b`, delete the others.
        put(m, "/d/0", 2, &b, false, 1, CLIENT).await.unwrap();
        for i in 1..5 {
            delete(m, &format!("/d/{i}"), 5, 3).await;
        }
        let s = m.stats().await.unwrap();
        assert_eq!(s.files, 2);
        assert_eq!(s.referenced_bytes, 20);
        // `a` is unreferenced but its row lives on until the cleaner removes it.
        assert!(m.blob_is_live(&a.digest).await.unwrap());
        // Re-referencing an unreferenced blob needs no upload.
        put(m, "/d/again", 1, &a, false, 4, CLIENT).await.unwrap();
        assert_eq!(m.stats().await.unwrap().referenced_bytes, 1020);
        assert_eq!(m.refcount_mismatches().await.unwrap(), vec![]);
    }

    pub async fn newer_put_of_a_new_blob_keeps_its_row(m: &dyn MetaStore) {
        let a = blob(5, 1);
        let b = blob(6, 2);
        put(m, "/n", 100, &a, true, 1, CLIENT).await.unwrap();
        // An object was uploaded for `b`, but the path is newer: the row must still record it
        // so the cleaner can reclaim the object.
        put(m, "/n", 50, &b, true, 1, CLIENT).await.unwrap();
        assert!(m.blob_is_live(&b.digest).await.unwrap());
        assert_eq!(m.stats().await.unwrap().blobs, 2);
        let rows = m.list_blobs(None, 10).await.unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].info, rows[0].refcount, rows[0].live), (a, 1, true));
        assert_eq!((rows[1].info, rows[1].refcount), (b, 0));
        assert_eq!(rows[1].unreferenced_since, Some(1));
        assert_eq!(m.list_blobs(Some(&a.digest), 10).await.unwrap(), rows[1..]);
        assert_eq!(m.list_blobs(None, 1).await.unwrap(), rows[..1]);
    }

    pub async fn listing_is_sorted_prefixed_and_cut_off(m: &dyn MetaStore) {
        let a = blob(7, 1);
        let paths = ["/l/a", "/l/b/c", "/l/b/d", "/l/z", "/la", "/m", "/l/ż"];
        for (i, p) in paths.iter().enumerate() {
            put(m, p, 10 + i as i64, &a, i == 0, 1, CLIENT)
                .await
                .unwrap();
        }
        let all = m
            .list_files(&ListPage::first("/l/", i64::MAX, 100))
            .await
            .unwrap();
        assert_eq!(all, ["/l/a", "/l/b/c", "/l/b/d", "/l/z", "/l/ż"]);
        let cut = m
            .list_files(&ListPage::first("/l/", 12, 100))
            .await
            .unwrap();
        assert_eq!(cut, ["/l/a", "/l/b/c", "/l/b/d"], "cutoff is inclusive");
        let page = m
            .list_files(&ListPage::first("/l/", i64::MAX, 2).after("/l/b/c"))
            .await
            .unwrap();
        assert_eq!(page, ["/l/b/d", "/l/z"]);
        let everything = m
            .list_files(&ListPage::first("", i64::MAX, 100))
            .await
            .unwrap();
        assert_eq!(everything.len(), paths.len());
    }

    pub async fn garbage_is_found_rechecked_and_removed(m: &dyn MetaStore) {
        let a = blob(8, 10);
        let b = blob(9, 20);
        let c = blob(10, 30);
        put(m, "/ga", 1, &a, true, 100, CLIENT).await.unwrap();
        put(m, "/gb", 1, &b, true, 100, CLIENT).await.unwrap();
        put(m, "/gc", 1, &c, true, 100, CLIENT).await.unwrap();
        delete(m, "/ga", 1, 200).await; // a: unreferenced since 200
        delete(m, "/gb", 1, 300).await; // b: unreferenced since 300
        // Waiting for the grace period: unreferenced after the cutoff.
        let waiting = m.waiting_blobs(250).await.unwrap();
        assert_eq!(
            waiting,
            (1, b.stored_size),
            "b is younger than a cutoff of 250"
        );
        assert_eq!(m.waiting_blobs(100).await.unwrap().0, 2);
        assert_eq!(m.waiting_blobs(300).await.unwrap(), (0, 0));
        let digests = |v: Vec<BlobInfo>| v.into_iter().map(|b| b.digest).collect::<Vec<_>>();
        assert_eq!(
            digests(m.unreferenced_blobs(199, None, 10).await.unwrap()),
            vec![]
        );
        assert_eq!(
            digests(m.unreferenced_blobs(250, None, 10).await.unwrap()),
            vec![a.digest]
        );
        assert_eq!(
            digests(m.unreferenced_blobs(300, None, 10).await.unwrap()),
            vec![a.digest, b.digest]
        );
        assert_eq!(
            digests(
                m.unreferenced_blobs(300, Some(&a.digest), 10)
                    .await
                    .unwrap()
            ),
            vec![b.digest]
        );
        // The re-check refuses what is too young or referenced again.
        assert_eq!(
            tombstone(m, &b.digest, 250).await,
            None,
            "inside the grace period"
        );
        assert_eq!(tombstone(m, &c.digest, 1000).await, None, "referenced");
        put(m, "/gb2", 1, &b, false, 400, CLIENT).await.unwrap();
        assert_eq!(tombstone(m, &b.digest, 1000).await, None, "re-referenced");
        // A tombstone names its deletion and how long its delete requests may still land.
        let first = tombstone(m, &a.digest, 250).await.expect("tombstoned");
        assert!(
            !m.blob_is_live(&a.digest).await.unwrap(),
            "tombstoned blobs are not live"
        );
        let BlobState::Tombstone {
            deletion,
            settles_in,
        } = state(m, &a.digest).await
        else {
            panic!("a tombstone")
        };
        assert_eq!(deletion, first);
        assert!(
            settles_in > SETTLE - Duration::from_secs(10) && settles_in <= SETTLE,
            "{settles_in:?}"
        );
        assert_eq!(m.stats().await.unwrap().blobs, 2);
        // A run that died after the tombstone: the next one finds it whatever the cutoff, and
        // deletes it as a deletion of its own.
        assert_eq!(
            digests(m.unreferenced_blobs(0, None, 10).await.unwrap()),
            vec![a.digest]
        );
        let second = tombstone(m, &a.digest, 0).await.expect("tombstoned again");
        assert_ne!(second, first);
        assert!(
            !m.finish_deletion(&a.digest, first, true).await.unwrap(),
            "not that deletion any more"
        );
        assert!(m.finish_deletion(&a.digest, second, true).await.unwrap());
        assert!(
            matches!(state(m, &a.digest).await, BlobState::Tombstone { deletion, settles_in } if deletion == second && settles_in.is_zero()),
            "settled: no wait"
        );
        assert_eq!(
            digests(m.unreferenced_blobs(0, None, 10).await.unwrap()),
            vec![],
            "a deletion that saw its object go is done"
        );
        let known = m
            .known_blobs(&[a.digest, b.digest, blob(99, 1).digest])
            .await
            .unwrap();
        assert_eq!(known.len(), 2, "the tombstone is still known");
        // Kept for a while after it settled, then forgotten; live rows never are.
        assert_eq!(
            m.purge_tombstones(Duration::from_secs(60)).await.unwrap(),
            0
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            m.purge_tombstones(Duration::from_millis(1)).await.unwrap(),
            1
        );
        assert_eq!(m.known_blobs(&[a.digest]).await.unwrap(), vec![]);
        assert_eq!(state(m, &a.digest).await, BlobState::Absent);
        assert!(m.blob_is_live(&b.digest).await.unwrap());
        // A PUT revives a tombstoned row with a fresh upload.
        put(m, "/gc2", 1, &c, false, 1, CLIENT).await.unwrap();
        delete(m, "/gc", 1, 500).await;
        delete(m, "/gc2", 1, 500).await;
        assert!(tombstone(m, &c.digest, 500).await.is_some());
        put(m, "/gc3", 1, &c, true, 600, CLIENT).await.unwrap();
        assert!(m.blob_is_live(&c.digest).await.unwrap());
        assert_eq!(state(m, &c.digest).await, BlobState::Live);
        assert_eq!(m.refcount_mismatches().await.unwrap(), vec![]);
    }

    /// A commit of `blob` at `path` (version 1) with the content stored as `stored` says.
    async fn commit(
        m: &dyn MetaStore, path: &str, blob: &BlobInfo, stored: Stored<'_>,
    ) -> PutResult {
        m.store_file(path, 1, blob, stored, 2, PutKind::Client)
            .await
            .unwrap()
    }

    /// A commit finds the blob as its writer saw it under the lock, or changes nothing.
    pub async fn commits_need_the_state_they_saw(m: &dyn MetaStore) {
        let a = blob(20, 100);
        let lock = BlobLock::<Exclusive>::assumed(&a.digest);
        let over = |over| Stored::Object { lock: &lock, over };
        let stored = |n: u8| PutResult::Done(PutOutcome::Stored { version: n as i64 });
        // Referencing content that is not live.
        let r = commit(m, "/c", &a, Stored::Existing(lock.held())).await;
        assert_eq!(r, PutResult::Conflict(BlobState::Absent));
        // An orphan's tombstone made after the writer saw no row.
        let made = m
            .tombstone_orphans(&[(&lock, 77)], SETTLE, 1)
            .await
            .unwrap();
        let [(d, orphan)] = made[..] else {
            panic!("{made:?}")
        };
        assert_eq!(d, a.digest);
        let r = commit(m, "/c", &a, over(BlobState::Absent)).await;
        assert!(
            matches!(r, PutResult::Conflict(BlobState::Tombstone { deletion, .. }) if deletion == orphan),
            "{r:?}"
        );
        assert!(
            m.tombstone_orphans(&[(&lock, 77)], SETTLE, 1)
                .await
                .unwrap()
                .is_empty(),
            "a row is there already"
        );
        // That deletion redone by the next run: a writer that saw the first one conflicts.
        let redone = tombstone(m, &a.digest, 0)
            .await
            .expect("an unfinished deletion");
        let seen_first = BlobState::Tombstone {
            deletion: orphan,
            settles_in: Duration::ZERO,
        };
        let r = commit(m, "/c", &a, over(seen_first)).await;
        assert!(
            matches!(r, PutResult::Conflict(BlobState::Tombstone { deletion, .. }) if deletion == redone),
            "{r:?}"
        );
        assert_eq!(m.get_file("/c").await.unwrap(), None, "nothing changed");
        // The writer that saw the current deletion revives it with its own sizes.
        let seen = state(m, &a.digest).await;
        assert_eq!(commit(m, "/c", &a, over(seen)).await, stored(1));
        let row = m.get_blob(&a.digest).await.unwrap().unwrap();
        assert_eq!((row.info, row.refcount, row.live), (a, 1, true));
        // Another writer's object under the same digest: the same size fits the row, another
        // does not.
        assert_eq!(
            commit(m, "/d", &a, over(BlobState::Absent)).await,
            stored(1)
        );
        let other = BlobInfo {
            stored_size: a.stored_size + 1,
            ..a
        };
        let r = commit(m, "/e", &other, over(BlobState::Absent)).await;
        assert_eq!(r, PutResult::Conflict(BlobState::Live));
        // The object is that writer's (it landed last): the row takes its sizes.
        assert_eq!(
            commit(m, "/e", &other, over(BlobState::Live)).await,
            stored(1)
        );
        assert_eq!(m.get_blob(&a.digest).await.unwrap().unwrap().info, other);
        // A lock of another blob proves nothing.
        let wrong = BlobLock::<Exclusive>::assumed(&blob(21, 1).digest);
        let r = m
            .store_file(
                "/f",
                1,
                &a,
                Stored::Existing(wrong.held()),
                2,
                PutKind::Client,
            )
            .await;
        assert!(matches!(r, Err(MetaError::Inconsistent(_))), "{r:?}");
        assert_eq!(m.refcount_mismatches().await.unwrap(), vec![]);
    }

    pub async fn deletions_are_remembered_for_imports(m: &dyn MetaStore) {
        let a = blob(11, 5);
        let b = blob(12, 6);
        assert_eq!(m.deleted_version("/t").await.unwrap(), None);
        put(m, "/t", 10, &a, true, 1, CLIENT).await.unwrap();
        assert_eq!(delete(m, "/t", 20, 2).await, DeleteOutcome::Deleted);
        assert_eq!(m.deleted_version("/t").await.unwrap(), Some(20));
        // An import of the old store's copy (version 10, or even 20) does not resurrect it.
        for v in [10, 20] {
            assert_eq!(
                put(m, "/t", v, &b, true, 3, PutKind::Import).await.unwrap(),
                PutOutcome::Deleted { version: 20 }
            );
        }
        assert_eq!(m.get_file("/t").await.unwrap(), None);
        // The uploaded blob's row is still recorded, unreferenced, for the cleaner.
        assert!(m.blob_is_live(&b.digest).await.unwrap());
        // A newer version in the old store is a newer file: imported.
        assert_eq!(
            put(m, "/t", 21, &b, false, 3, PutKind::Import)
                .await
                .unwrap(),
            PutOutcome::Stored { version: 21 }
        );
        // Clients may write a deleted path again at any version.
        delete(m, "/t", 30, 4).await;
        assert_eq!(
            put(m, "/t", 5, &a, false, 5, CLIENT).await.unwrap(),
            PutOutcome::Stored { version: 5 }
        );
        // A second delete at a lower version keeps the higher one remembered.
        delete(m, "/t", 5, 6).await;
        assert_eq!(m.deleted_version("/t").await.unwrap(), Some(30));
        // Nothing is remembered for a delete of a missing path.
        assert_eq!(delete(m, "/u", 5, 6).await, DeleteOutcome::NotFound);
        assert_eq!(m.deleted_version("/u").await.unwrap(), None);
        // Imported and not written by a client since: /t at 21 was deleted, /never refused.
        put(m, "/imp", 3, &a, false, 3, PutKind::Import)
            .await
            .unwrap();
        put(m, "/cli", 3, &a, false, 3, CLIENT).await.unwrap();
        put(m, "/imp2", 3, &b, false, 3, PutKind::Import)
            .await
            .unwrap();
        let imported = m.list_imported("", 10).await.unwrap();
        assert_eq!(
            imported,
            vec![("/imp".to_owned(), 3), ("/imp2".to_owned(), 3)]
        );
        assert_eq!(m.list_imported("/imp", 10).await.unwrap().len(), 1);
        // A client's write (same content: only the version) makes it the client's.
        put(m, "/imp", 4, &a, false, 3, CLIENT).await.unwrap();
        put(m, "/imp2", 4, &a, false, 3, CLIENT).await.unwrap();
        assert_eq!(m.list_imported("", 10).await.unwrap(), vec![]);
        let listed = m.list_deletions("", 10).await.unwrap();
        assert_eq!(listed, vec![("/t".to_owned(), 30)]);
        assert_eq!(m.list_deletions("/t", 10).await.unwrap(), vec![]);
        assert_eq!(m.purge_deletions(6).await.unwrap(), 0, "recorded at 6");
        assert_eq!(m.purge_deletions(7).await.unwrap(), 1);
        assert_eq!(m.deleted_version("/t").await.unwrap(), None);
        // A deletion of a path never stored here (only an old server has it) is remembered
        // the same way; one of a stored path deletes it as a client's would.
        let unimported = DeleteKind::Unimported;
        assert_eq!(
            m.delete_file("/never", 15, 3, unimported).await.unwrap(),
            DeleteOutcome::Deleted
        );
        assert_eq!(m.deleted_version("/never").await.unwrap(), Some(15));
        assert_eq!(
            put(m, "/never", 15, &b, false, 3, PutKind::Import)
                .await
                .unwrap(),
            PutOutcome::Deleted { version: 15 }
        );
        put(m, "/stored", 5, &b, false, 3, CLIENT).await.unwrap();
        assert_eq!(
            m.delete_file("/stored", 4, 3, unimported).await.unwrap(),
            DeleteOutcome::Newer { version: 5 }
        );
        assert_eq!(m.deleted_version("/stored").await.unwrap(), None);
        assert_eq!(
            m.delete_file("/stored", 99, 3, unimported).await.unwrap(),
            DeleteOutcome::Deleted
        );
        assert_eq!(m.get_file("/stored").await.unwrap(), None);
        assert_eq!(m.deleted_version("/stored").await.unwrap(), Some(99));
        assert_eq!(m.refcount_mismatches().await.unwrap(), vec![]);
    }

    pub async fn checkpoints_are_per_source(m: &dyn MetaStore) {
        assert_eq!(m.checkpoint("v1:/a").await.unwrap(), None);
        m.set_checkpoint("v1:/a", Some("x/y"), 1).await.unwrap();
        m.set_checkpoint("v1:/b", Some("z"), 1).await.unwrap();
        m.set_checkpoint("v1:/a", Some("x/z"), 2).await.unwrap();
        assert_eq!(m.checkpoint("v1:/a").await.unwrap().as_deref(), Some("x/z"));
        m.set_checkpoint("v1:/a", None, 3).await.unwrap();
        assert_eq!(m.checkpoint("v1:/a").await.unwrap(), None);
        assert_eq!(m.checkpoint("v1:/b").await.unwrap().as_deref(), Some("z"));
    }

    /// Writes issued together (SQLite commits them as one group) succeed or fail one by one.
    pub async fn concurrent_writes_fail_alone(m: &dyn MetaStore) {
        let stored = blob(3, 30);
        let missing = blob(4, 40);
        let writes = (0..60u8).map(|i| async move {
            if i % 10 == 5 {
                // Claims a live blob that was never stored: must fail, alone.
                put(
                    m,
                    &format!("/bad/{i}"),
                    1,
                    &missing,
                    false,
                    1,
                    PutKind::Client,
                )
                .await
            } else {
                put(
                    m,
                    &format!("/ok/{i:02}"),
                    1,
                    &stored,
                    true,
                    1,
                    PutKind::Client,
                )
                .await
            }
        });
        let results = futures::future::join_all(writes).await;
        for (i, r) in results.iter().enumerate() {
            if i % 10 == 5 {
                assert!(matches!(r, Err(MetaError::Inconsistent(_))), "{i}: {r:?}");
            } else {
                assert_eq!(
                    r.as_ref().unwrap(),
                    &PutOutcome::Stored { version: 1 },
                    "{i}"
                );
            }
        }
        let listed = m
            .list_files(&ListPage::first("/", Version::MAX, 100))
            .await
            .unwrap();
        assert_eq!(listed.len(), 54);
        assert!(listed.iter().all(|p| p.starts_with("/ok/")), "{listed:?}");
        assert!(!m.blob_is_live(&missing.digest).await.unwrap());
        assert_eq!(m.refcount_mismatches().await.unwrap(), vec![]);
    }

    /// Stores `blob` with `content` kept in its row, over the state it finds.
    async fn put_inline(m: &dyn MetaStore, path: &str, blob: &BlobInfo, content: &[u8]) {
        let lock = BlobLock::<Exclusive>::assumed(&blob.digest);
        let over = m.blob_state(lock.held()).await.unwrap();
        let stored = Stored::Inline {
            lock: &lock,
            over,
            content,
        };
        let done = m
            .store_file(path, 1, blob, stored, 1, CLIENT)
            .await
            .unwrap();
        assert!(matches!(done, PutResult::Done(_)), "{done:?}");
    }

    pub async fn inline_content_is_kept_and_goes_with_its_row(m: &dyn MetaStore) {
        let (a, b) = (blob(20, 5), blob(21, 7));
        put_inline(m, "/in/a", &a, b"aaaaa").await;
        let file = m.get_file("/in/a").await.unwrap().unwrap();
        assert_eq!(file.inline.as_deref(), Some(&b"aaaaa"[..]));
        assert_eq!(file.blob, a);
        assert!(m.get_blob(&a.digest).await.unwrap().unwrap().inline);
        let got = m.inline_content(&a.digest).await.unwrap();
        assert_eq!(got.as_deref(), Some(&b"aaaaa"[..]));
        // A second path references the inline row; an object's row keeps no content.
        put(m, "/in/a2", 1, &a, false, 1, CLIENT).await.unwrap();
        put(m, "/in/b", 1, &b, true, 1, CLIENT).await.unwrap();
        assert_eq!(m.get_file("/in/b").await.unwrap().unwrap().inline, None);
        assert!(!m.get_blob(&b.digest).await.unwrap().unwrap().inline);
        assert_eq!(m.inline_content(&b.digest).await.unwrap(), None);
        assert_eq!(m.refcount_mismatches().await.unwrap(), vec![]);
        // An object stored over the live inline row (another writer, a lower threshold) takes
        // the row over: the row keeps no bytes that could differ from the object's.
        let lock = BlobLock::<Exclusive>::assumed(&a.digest);
        let over = BlobState::Live;
        let stored = Stored::Object { lock: &lock, over };
        m.store_file("/in/a3", 1, &a, stored, 1, CLIENT)
            .await
            .unwrap();
        assert_eq!(m.get_file("/in/a").await.unwrap().unwrap().inline, None);
        // Unreferenced inline content goes with its row, no tombstone: there is no object
        // whose delete requests could still land.
        let (c, d) = (blob(22, 3), blob(23, 4));
        put_inline(m, "/in/c", &c, b"ccc").await;
        delete(m, "/in/c", 1, 2).await;
        let lock = BlobLock::<Exclusive>::assumed(&c.digest);
        let deletion = m.tombstone_blob(&lock, 2, SETTLE).await.unwrap();
        assert_eq!(deletion, Some(Deletion::Removed));
        assert_eq!(state(m, &c.digest).await, BlobState::Absent);
        assert_eq!(m.get_blob(&c.digest).await.unwrap(), None);
        // An object's tombstone revived as inline content keeps it.
        put(m, "/in/d", 1, &d, true, 1, CLIENT).await.unwrap();
        delete(m, "/in/d", 1, 2).await;
        assert!(tombstone(m, &d.digest, 2).await.is_some());
        put_inline(m, "/in/d", &d, b"dddd").await;
        assert_eq!(state(m, &d.digest).await, BlobState::Live);
        let got = m.get_file("/in/d").await.unwrap().unwrap().inline;
        assert_eq!(got.as_deref(), Some(&b"dddd"[..]));
        assert_eq!(m.refcount_mismatches().await.unwrap(), vec![]);
    }

    pub async fn run_all(make: impl AsyncFn() -> Box<dyn MetaStore>) {
        inline_content_is_kept_and_goes_with_its_row(&*make().await).await;
        concurrent_writes_fail_alone(&*make().await).await;
        deletions_are_remembered_for_imports(&*make().await).await;
        checkpoints_are_per_source(&*make().await).await;
        garbage_is_found_rechecked_and_removed(&*make().await).await;
        commits_need_the_state_they_saw(&*make().await).await;
        versions_follow_filetracker(&*make().await).await;
        refcounts_track_references(&*make().await).await;
        newer_put_of_a_new_blob_keeps_its_row(&*make().await).await;
        listing_is_sorted_prefixed_and_cut_off(&*make().await).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefix_end_bounds_the_range() {
        assert_eq!(super::prefix_end("/a/").as_deref(), Some("/a0"));
        assert_eq!(super::prefix_end("").as_deref(), None);
    }
}
