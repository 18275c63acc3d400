//! The metadata store: which path holds which version of which blob, and each blob's reference
//! count. It is the only judge of liveness (DESIGN invariant 2). Every change a request makes is
//! one transaction.

mod postgres;
mod sqlite;

use async_trait::async_trait;

use crate::blob::{BlobInfo, Digest};
use crate::protocol::Version;

#[cfg(test)]
pub(crate) use postgres::tests::test_config as postgres_test_config;
pub use postgres::{PostgresMeta, connection_config as postgres_connection_config};
pub(crate) use postgres::{no_answer, within};
#[cfg(test)]
pub(crate) use sqlite::tests::test_options as sqlite_test_options;
pub use sqlite::{SqliteMeta, SqliteOptions};

/// A file as the metadata knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub path: String,
    pub version: Version,
    pub blob: BlobInfo,
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
}

/// Totals for `/metrics` and reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub files: u64,
    pub blobs: u64,
    /// Uncompressed bytes of all distinct contents.
    pub logical_bytes: u64,
    /// Bytes the object store holds for them.
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

/// The message of a PostgreSQL error, with the server's own text and the cause.
pub fn postgres_error_text(e: tokio_postgres::Error) -> String {
    match postgres::pg_error(e) {
        MetaError::Unavailable(m) | MetaError::Database(m) | MetaError::Inconsistent(m) => m,
    }
}

/// The metadata database. Implementations: SQLite (one host) and PostgreSQL (several).
#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    /// Human-readable description for logs.
    fn describe(&self) -> String;

    /// The file at `path` with its blob, if any.
    async fn get_file(&self, path: &str) -> Result<Option<FileEntry>, MetaError>;

    /// True when a live row exists for the digest (its object is stored). Callers that act on
    /// the answer hold the digest's lock.
    async fn blob_is_live(&self, digest: &Digest) -> Result<bool, MetaError>;

    /// One transaction: make `path` point at `blob` with `version` unless a strictly newer
    /// version is stored, adjusting reference counts. `uploaded` says the caller has just stored
    /// the object (under the digest's lock), so the blob row is created or revived with these
    /// sizes; otherwise the blob row must already be live. `import` (a file from an old
    /// Filetracker: migrator, live fallback): also refused when the path was deleted here at or
    /// after `version`.
    #[allow(clippy::too_many_arguments)]
    async fn store_file(
        &self,
        path: &str,
        version: Version,
        blob: &BlobInfo,
        uploaded: bool,
        now: i64,
        import: bool,
    ) -> Result<PutOutcome, MetaError>;

    /// A client's PUT: [`MetaStore::store_file`], not an import.
    async fn put_file(
        &self,
        path: &str,
        version: Version,
        blob: &BlobInfo,
        uploaded: bool,
        now: i64,
    ) -> Result<PutOutcome, MetaError> {
        self.store_file(path, version, blob, uploaded, now, false)
            .await
    }

    /// An import: [`MetaStore::store_file`], refused for a path deleted here since.
    async fn import_file(
        &self,
        path: &str,
        version: Version,
        blob: &BlobInfo,
        uploaded: bool,
        now: i64,
    ) -> Result<PutOutcome, MetaError> {
        self.store_file(path, version, blob, uploaded, now, true)
            .await
    }

    /// One transaction: remove `path` unless a strictly newer version is stored, and remember
    /// the deletion (path and version) so imports do not resurrect it.
    async fn delete_file(
        &self,
        path: &str,
        version: Version,
        now: i64,
    ) -> Result<DeleteOutcome, MetaError>;

    /// Paths starting with `prefix` (all when empty) with version ≤ `cutoff`, sorted, strictly
    /// after `after`, at most `limit`.
    async fn list_files(
        &self,
        prefix: &str,
        cutoff: Version,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, MetaError>;

    /// Blob rows in digest order, strictly after `after`, at most `limit` (for verification and
    /// reports; memory stays bounded by the page size).
    async fn list_blobs(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<BlobRow>, MetaError>;

    /// Blobs the cleaner may delete: no references since at or before `cutoff`, or already
    /// tombstoned by a run that did not finish. Digest order, strictly after `after`.
    async fn unreferenced_blobs(
        &self,
        cutoff: i64,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<BlobInfo>, MetaError>;

    /// One atomic re-check and mark: if the blob still has no references since `cutoff` (or is
    /// already tombstoned), mark it `deleting` and return true. Callers hold its lock.
    async fn tombstone_blob(&self, digest: &Digest, cutoff: i64) -> Result<bool, MetaError>;

    /// Removes a tombstoned, unreferenced blob row (after its object is gone).
    async fn remove_blob(&self, digest: &Digest) -> Result<bool, MetaError>;

    /// Which of `digests` have a row, in any state.
    async fn known_blobs(&self, digests: &[Digest]) -> Result<Vec<Digest>, MetaError>;

    /// Totals over files and live blobs.
    async fn stats(&self) -> Result<Stats, MetaError>;

    /// Blobs whose recorded reference count differs from the number of files pointing at them,
    /// as `(digest, recorded, actual)`. Empty on a consistent store.
    async fn refcount_mismatches(&self) -> Result<Vec<(Digest, i64, i64)>, MetaError>;

    /// The version at which `path` was last deleted, if its deletion is remembered.
    async fn deleted_version(&self, path: &str) -> Result<Option<Version>, MetaError>;

    /// Forgets deletions recorded before `before` (Unix seconds); returns how many.
    async fn purge_deletions(&self, before: i64) -> Result<u64, MetaError>;

    /// The position an interrupted migration of `source` reached, if any.
    async fn checkpoint(&self, source: &str) -> Result<Option<String>, MetaError>;

    /// Records (`Some`) or clears (`None`) the migration checkpoint of `source`.
    async fn set_checkpoint(
        &self,
        source: &str,
        position: Option<&str>,
        now: i64,
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
    current: Option<(Version, &str)>,
    deleted: Option<Version>,
    version: Version,
    digest: &str,
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
    Keep { stored: Version },
    Remove { digest: String },
}

pub(crate) fn plan_delete(current: Option<(Version, String)>, version: Version) -> DeletePlan {
    match current {
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
            DeletePlan::Remove { .. } => DeleteOutcome::Deleted,
        }
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
    //! The behaviour every metadata store must have; run against each implementation.
    use super::*;

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
            m.put_file("/x", 10, &a, true, 1).await.unwrap(),
            PutOutcome::Stored { version: 10 }
        );
        assert!(m.blob_is_live(&a.digest).await.unwrap());
        // Older: ignored, reported.
        assert_eq!(
            m.put_file("/x", 9, &b, true, 1).await.unwrap(),
            PutOutcome::Newer { version: 10 }
        );
        assert_eq!(m.get_file("/x").await.unwrap().unwrap().blob, a);
        // Equal: overwrites.
        assert_eq!(
            m.put_file("/x", 10, &b, false, 1).await.unwrap(),
            PutOutcome::Stored { version: 10 }
        );
        let f = m.get_file("/x").await.unwrap().unwrap();
        assert_eq!((f.version, f.blob), (10, b));
        assert_eq!(
            m.delete_file("/x", 9, 2).await.unwrap(),
            DeleteOutcome::Newer { version: 10 }
        );
        assert_eq!(
            m.delete_file("/x", 10, 2).await.unwrap(),
            DeleteOutcome::Deleted
        );
        assert_eq!(
            m.delete_file("/x", 10, 2).await.unwrap(),
            DeleteOutcome::NotFound
        );
        assert_eq!(m.get_file("/x").await.unwrap(), None);
    }

    pub async fn refcounts_track_references(m: &dyn MetaStore) {
        let a = blob(3, 1000);
        let b = blob(4, 10);
        for i in 0..5 {
            let uploaded = i == 0;
            m.put_file(&format!("/d/{i}"), 1, &a, uploaded, 1)
                .await
                .unwrap();
        }
        m.put_file("/d/b", 1, &b, true, 1).await.unwrap();
        let s = m.stats().await.unwrap();
        assert_eq!((s.files, s.blobs), (6, 2));
        assert_eq!(s.logical_bytes, 1010);
        assert_eq!(s.referenced_bytes, 5 * 1000 + 10);
        assert_eq!(m.refcount_mismatches().await.unwrap(), vec![]);
        // Overwrite one reference of `a` with `b`, delete the others.
        m.put_file("/d/0", 2, &b, false, 1).await.unwrap();
        for i in 1..5 {
            m.delete_file(&format!("/d/{i}"), 5, 3).await.unwrap();
        }
        let s = m.stats().await.unwrap();
        assert_eq!(s.files, 2);
        assert_eq!(s.referenced_bytes, 20);
        // `a` is unreferenced but its row lives on until the cleaner removes it.
        assert!(m.blob_is_live(&a.digest).await.unwrap());
        // Re-referencing an unreferenced blob needs no upload.
        m.put_file("/d/again", 1, &a, false, 4).await.unwrap();
        assert_eq!(m.stats().await.unwrap().referenced_bytes, 1020);
        assert_eq!(m.refcount_mismatches().await.unwrap(), vec![]);
    }

    pub async fn newer_put_of_a_new_blob_keeps_its_row(m: &dyn MetaStore) {
        let a = blob(5, 1);
        let b = blob(6, 2);
        m.put_file("/n", 100, &a, true, 1).await.unwrap();
        // An object was uploaded for `b`, but the path is newer: the row must still record it
        // so the cleaner can reclaim the object.
        m.put_file("/n", 50, &b, true, 1).await.unwrap();
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
            m.put_file(p, 10 + i as i64, &a, i == 0, 1).await.unwrap();
        }
        let all = m.list_files("/l/", i64::MAX, None, 100).await.unwrap();
        assert_eq!(all, ["/l/a", "/l/b/c", "/l/b/d", "/l/z", "/l/ż"]);
        let cut = m.list_files("/l/", 12, None, 100).await.unwrap();
        assert_eq!(cut, ["/l/a", "/l/b/c", "/l/b/d"], "cutoff is inclusive");
        let page = m
            .list_files("/l/", i64::MAX, Some("/l/b/c"), 2)
            .await
            .unwrap();
        assert_eq!(page, ["/l/b/d", "/l/z"]);
        let everything = m.list_files("", i64::MAX, None, 100).await.unwrap();
        assert_eq!(everything.len(), paths.len());
    }

    pub async fn garbage_is_found_rechecked_and_removed(m: &dyn MetaStore) {
        let a = blob(8, 10);
        let b = blob(9, 20);
        let c = blob(10, 30);
        m.put_file("/ga", 1, &a, true, 100).await.unwrap();
        m.put_file("/gb", 1, &b, true, 100).await.unwrap();
        m.put_file("/gc", 1, &c, true, 100).await.unwrap();
        m.delete_file("/ga", 1, 200).await.unwrap(); // a: unreferenced since 200
        m.delete_file("/gb", 1, 300).await.unwrap(); // b: unreferenced since 300
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
        assert!(
            !m.tombstone_blob(&b.digest, 250).await.unwrap(),
            "inside the grace period"
        );
        assert!(
            !m.tombstone_blob(&c.digest, 1000).await.unwrap(),
            "referenced"
        );
        m.put_file("/gb2", 1, &b, false, 400).await.unwrap();
        assert!(
            !m.tombstone_blob(&b.digest, 1000).await.unwrap(),
            "re-referenced"
        );
        // Tombstone, then remove.
        assert!(m.tombstone_blob(&a.digest, 250).await.unwrap());
        assert!(
            !m.blob_is_live(&a.digest).await.unwrap(),
            "tombstoned blobs are not live"
        );
        assert_eq!(m.stats().await.unwrap().blobs, 2);
        // A run that died after the tombstone: the next one finds it whatever the cutoff.
        assert_eq!(
            digests(m.unreferenced_blobs(0, None, 10).await.unwrap()),
            vec![a.digest]
        );
        assert!(m.tombstone_blob(&a.digest, 0).await.unwrap());
        let known = m
            .known_blobs(&[a.digest, b.digest, blob(99, 1).digest])
            .await
            .unwrap();
        assert_eq!(known.len(), 2);
        assert!(m.remove_blob(&a.digest).await.unwrap());
        assert!(
            !m.remove_blob(&b.digest).await.unwrap(),
            "only tombstoned rows go"
        );
        assert_eq!(m.known_blobs(&[a.digest]).await.unwrap(), vec![]);
        // A PUT revives a tombstoned row with a fresh upload.
        m.put_file("/gc2", 1, &c, false, 1).await.unwrap();
        m.delete_file("/gc", 1, 500).await.unwrap();
        m.delete_file("/gc2", 1, 500).await.unwrap();
        assert!(m.tombstone_blob(&c.digest, 500).await.unwrap());
        m.put_file("/gc3", 1, &c, true, 600).await.unwrap();
        assert!(m.blob_is_live(&c.digest).await.unwrap());
        assert!(!m.remove_blob(&c.digest).await.unwrap());
        assert_eq!(m.refcount_mismatches().await.unwrap(), vec![]);
    }

    pub async fn deletions_are_remembered_for_imports(m: &dyn MetaStore) {
        let a = blob(11, 5);
        let b = blob(12, 6);
        assert_eq!(m.deleted_version("/t").await.unwrap(), None);
        m.put_file("/t", 10, &a, true, 1).await.unwrap();
        assert_eq!(
            m.delete_file("/t", 20, 2).await.unwrap(),
            DeleteOutcome::Deleted
        );
        assert_eq!(m.deleted_version("/t").await.unwrap(), Some(20));
        // An import of the old store's copy (version 10, or even 20) does not resurrect it.
        for v in [10, 20] {
            assert_eq!(
                m.import_file("/t", v, &b, true, 3).await.unwrap(),
                PutOutcome::Deleted { version: 20 }
            );
        }
        assert_eq!(m.get_file("/t").await.unwrap(), None);
        // The uploaded blob's row is still recorded, unreferenced, for the cleaner.
        assert!(m.blob_is_live(&b.digest).await.unwrap());
        // A newer version in the old store is a newer file: imported.
        assert_eq!(
            m.import_file("/t", 21, &b, false, 3).await.unwrap(),
            PutOutcome::Stored { version: 21 }
        );
        // Clients may write a deleted path again at any version.
        m.delete_file("/t", 30, 4).await.unwrap();
        assert_eq!(
            m.put_file("/t", 5, &a, false, 5).await.unwrap(),
            PutOutcome::Stored { version: 5 }
        );
        // A second delete at a lower version keeps the higher one remembered.
        m.delete_file("/t", 5, 6).await.unwrap();
        assert_eq!(m.deleted_version("/t").await.unwrap(), Some(30));
        // Nothing is remembered for a delete of a missing path.
        assert_eq!(
            m.delete_file("/u", 5, 6).await.unwrap(),
            DeleteOutcome::NotFound
        );
        assert_eq!(m.deleted_version("/u").await.unwrap(), None);
        assert_eq!(m.purge_deletions(6).await.unwrap(), 0, "recorded at 6");
        assert_eq!(m.purge_deletions(7).await.unwrap(), 1);
        assert_eq!(m.deleted_version("/t").await.unwrap(), None);
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
                m.put_file(&format!("/bad/{i}"), 1, &missing, false, 1)
                    .await
            } else {
                m.put_file(&format!("/ok/{i:02}"), 1, &stored, true, 1)
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
        let listed = m.list_files("/", Version::MAX, None, 100).await.unwrap();
        assert_eq!(listed.len(), 54);
        assert!(listed.iter().all(|p| p.starts_with("/ok/")), "{listed:?}");
        assert!(!m.blob_is_live(&missing.digest).await.unwrap());
        assert_eq!(m.refcount_mismatches().await.unwrap(), vec![]);
    }

    pub async fn run_all(make: impl AsyncFn() -> Box<dyn MetaStore>) {
        concurrent_writes_fail_alone(&*make().await).await;
        deletions_are_remembered_for_imports(&*make().await).await;
        checkpoints_are_per_source(&*make().await).await;
        garbage_is_found_rechecked_and_removed(&*make().await).await;
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
