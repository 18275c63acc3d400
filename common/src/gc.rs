//! Garbage collection and verification of a store, as `s3dedup-cleaner` runs them.
//!
//! Deleting a blob: take its lock, re-check inside one statement that it is still unreferenced
//! past the grace period and mark it `deleting` (tombstone), delete the object, remove the row.
//! A crash anywhere leaves either a live row with its object or a tombstone the next run
//! finishes. Objects without any row are deleted only when older than the grace period, under
//! the digest's lock and after a re-check, since they may be an upload about to commit.

use std::io;
use std::time::Duration;

use futures::StreamExt;

use crate::blob::{self, BlobInfo, ChannelReader, Digest};
use crate::filestore::{FileStore, FileStoreError};
use crate::locks::{LockMode, blob_lock};
use crate::store::{ObjectEntry, StoreError};

/// Name of the lock only one cleaner run per bucket holds.
pub const CLEANER_LOCK: &str = "cleaner";

/// What one run may do.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Unreferenced blobs and row-less objects younger than this stay.
    pub grace: Duration,
    /// Report what would be deleted, delete nothing.
    pub dry_run: bool,
    /// Stop after this many deletions (blobs and orphans together).
    pub max_deletes: Option<u64>,
    /// How long to wait for a blob's lock (a PUT holds it) before skipping the blob this run.
    pub lock_timeout: Duration,
    /// Rows or keys fetched per round trip; memory is bounded by it, not by the bucket.
    pub page_size: usize,
    /// Also sweep the object store for objects that have no row.
    pub orphans: bool,
    /// Forget remembered deletions of paths older than this; `None`: keep them forever.
    pub remember_deletions: Option<Duration>,
}

/// What a run did (or, in a dry run, would do).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub blobs_deleted: u64,
    pub bytes_freed: u64,
    pub orphans_deleted: u64,
    pub orphan_bytes: u64,
    /// Blobs left for the next run because a PUT held their lock.
    pub skipped_busy: u64,
    /// Remembered deletions of paths forgotten (older than `remember_deletions`).
    pub deletions_forgotten: u64,
    /// Abandoned multipart uploads of our objects aborted (older than the grace period).
    pub uploads_aborted: u64,
    /// Deletions that failed; they are retried by the next run.
    pub errors: Vec<String>,
}

impl GcReport {
    fn deletions(&self) -> u64 {
        self.blobs_deleted + self.orphans_deleted
    }

    /// One line for logs and systemd's `STATUS=`.
    pub fn summary(&self, dry_run: bool) -> String {
        let verb = if dry_run { "would free" } else { "freed" };
        format!(
            "{verb} {} blobs ({} bytes) and {} orphaned objects ({} bytes); {} abandoned uploads \
             aborted; {} busy, {} old deletions forgotten, {} errors",
            self.blobs_deleted,
            self.bytes_freed,
            self.orphans_deleted,
            self.orphan_bytes,
            self.uploads_aborted,
            self.skipped_busy,
            self.deletions_forgotten,
            self.errors.len()
        )
    }
}

fn limit_reached(report: &GcReport, opts: &GcOptions) -> bool {
    opts.max_deletes.is_some_and(|m| report.deletions() >= m)
}

/// Takes the bucket's cleaner lock and collects garbage. `Ok(None)`: another run holds the lock.
pub async fn run(
    fs: &FileStore,
    opts: &GcOptions,
    now: i64,
    progress: &(dyn Fn(&GcReport) + Sync),
) -> Result<Option<GcReport>, FileStoreError> {
    let Some(guard) = fs.locks.try_lock(CLEANER_LOCK, LockMode::Exclusive).await? else {
        return Ok(None);
    };
    let report = collect(fs, opts, now, progress).await;
    guard.release().await;
    report.map(Some)
}

/// Collects garbage without the cleaner lock (callers hold it).
pub async fn collect(
    fs: &FileStore,
    opts: &GcOptions,
    now: i64,
    progress: &(dyn Fn(&GcReport) + Sync),
) -> Result<GcReport, FileStoreError> {
    let cutoff = now - opts.grace.as_secs() as i64;
    let mut report = GcReport::default();
    let mut after: Option<Digest> = None;
    'blobs: loop {
        let page = fs
            .meta
            .unreferenced_blobs(cutoff, after.as_ref(), opts.page_size)
            .await?;
        let Some(last) = page.last() else { break };
        after = Some(last.digest);
        for blob in page {
            if limit_reached(&report, opts) {
                break 'blobs;
            }
            delete_blob(fs, &blob, cutoff, opts, &mut report).await;
        }
        progress(&report);
    }
    if opts.orphans && !limit_reached(&report, opts) {
        sweep_orphans(fs, cutoff, opts, &mut report, progress).await?;
    }
    if opts.orphans {
        abort_stale_uploads(fs, cutoff, opts, &mut report).await;
    }
    if let Some(keep) = opts.remember_deletions.filter(|_| !opts.dry_run) {
        let before = now - keep.as_secs() as i64;
        report.deletions_forgotten = fs.meta.purge_deletions(before).await?;
    }
    progress(&report);
    Ok(report)
}

async fn delete_blob(
    fs: &FileStore,
    blob: &BlobInfo,
    cutoff: i64,
    opts: &GcOptions,
    report: &mut GcReport,
) {
    let d = blob.digest;
    if opts.dry_run {
        report.blobs_deleted += 1;
        report.bytes_freed += blob.stored_size;
        return;
    }
    let guard = match fs
        .locks
        .lock(&blob_lock(&d), LockMode::Exclusive, opts.lock_timeout)
        .await
    {
        Ok(g) => g,
        Err(crate::locks::LockError::Timeout { .. }) => {
            report.skipped_busy += 1;
            return;
        }
        Err(e) => {
            report.errors.push(format!("blob {d}: {e}"));
            return;
        }
    };
    let result: Result<bool, FileStoreError> = async {
        if !fs.meta.tombstone_blob(&d, cutoff).await? {
            return Ok(false); // referenced again, or younger than the grace period now
        }
        fs.store.delete(&d).await?;
        fs.meta.remove_blob(&d).await?;
        Ok(true)
    }
    .await;
    guard.release().await;
    match result {
        Ok(true) => {
            report.blobs_deleted += 1;
            report.bytes_freed += blob.stored_size;
            tracing::debug!(digest = %d, "deleted unreferenced blob");
        }
        Ok(false) => {}
        Err(e) => report.errors.push(format!("blob {d}: {e}")),
    }
}

/// Aborts uploads older than the grace period (which an upload outlasts) that never completed:
/// S3 multipart uploads, their parts kept by the server but in no listing of objects, or a
/// local store's temporary files.
async fn abort_stale_uploads(fs: &FileStore, cutoff: i64, opts: &GcOptions, report: &mut GcReport) {
    match fs.store.abort_stale_uploads(cutoff, opts.dry_run).await {
        Ok(Some(done)) => {
            report.uploads_aborted = done.aborted;
            for (key, why) in done.failed {
                report
                    .errors
                    .push(format!("multipart upload of {key}: {why}"));
            }
        }
        Ok(None) => {
            tracing::warn!(
                store = %fs.store.describe(),
                "the object store cannot list multipart uploads; give the bucket a lifecycle \
                 rule that aborts incomplete ones"
            );
        }
        Err(e) => report.errors.push(format!("abandoned uploads: {e}")),
    }
}

/// Orphans deleted per batch: one `DeleteObjects` request, with each digest's lock held (and
/// as many lock files open, which is why it is well below S3's limit of 1000).
const ORPHAN_BATCH: usize = 100;

async fn sweep_orphans(
    fs: &FileStore,
    cutoff: i64,
    opts: &GcOptions,
    report: &mut GcReport,
    progress: &(dyn Fn(&GcReport) + Sync),
) -> Result<(), FileStoreError> {
    let mut after: Option<Digest> = None;
    loop {
        let page = fs.store.list(after.as_ref(), opts.page_size).await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = Some(last.digest);
        let old: Vec<&ObjectEntry> = page.iter().filter(|o| o.modified <= cutoff).collect();
        let digests: Vec<Digest> = old.iter().map(|o| o.digest).collect();
        let known = fs.meta.known_blobs(&digests).await?;
        let mut candidates: Vec<&ObjectEntry> = old
            .into_iter()
            .filter(|o| !known.contains(&o.digest))
            .collect();
        if let Some(max) = opts.max_deletes {
            candidates.truncate(max.saturating_sub(report.deletions()) as usize);
        }
        for batch in candidates.chunks(ORPHAN_BATCH) {
            delete_orphans(fs, batch, opts, report).await;
        }
        progress(report);
        if limit_reached(report, opts) {
            return Ok(());
        }
    }
}

async fn delete_orphans(
    fs: &FileStore,
    batch: &[&ObjectEntry],
    opts: &GcOptions,
    report: &mut GcReport,
) {
    if opts.dry_run {
        report.orphans_deleted += batch.len() as u64;
        report.orphan_bytes += batch.iter().map(|o| o.size).sum::<u64>();
        return;
    }
    let mut held = Vec::with_capacity(batch.len());
    for o in batch {
        match fs
            .locks
            .lock(
                &blob_lock(&o.digest),
                LockMode::Exclusive,
                opts.lock_timeout,
            )
            .await
        {
            Ok(g) => held.push((*o, g)),
            Err(crate::locks::LockError::Timeout { .. }) => report.skipped_busy += 1,
            Err(e) => report.errors.push(format!("orphan {}: {e}", o.digest)),
        }
    }
    // Under the locks no PUT is between its upload and its commit: a row now means it committed.
    let digests: Vec<Digest> = held.iter().map(|(o, _)| o.digest).collect();
    let result = async {
        let known = fs.meta.known_blobs(&digests).await?;
        let doomed: Vec<&ObjectEntry> = held
            .iter()
            .map(|(o, _)| *o)
            .filter(|o| !known.contains(&o.digest))
            .collect();
        let ids: Vec<Digest> = doomed.iter().map(|o| o.digest).collect();
        let failed = fs.store.delete_many(&ids).await?;
        Ok::<_, FileStoreError>((doomed, failed))
    }
    .await;
    for (_, g) in held {
        g.release().await;
    }
    match result {
        Ok((doomed, failed)) => {
            for o in doomed {
                if let Some((_, why)) = failed.iter().find(|(d, _)| *d == o.digest) {
                    report.errors.push(format!("orphan {}: {why}", o.digest));
                } else {
                    report.orphans_deleted += 1;
                    report.orphan_bytes += o.size;
                    tracing::debug!(digest = %o.digest, "deleted orphaned object");
                }
            }
        }
        Err(e) => report.errors.push(format!(
            "orphans {}..: {e}",
            digests.first().map(Digest::to_hex).unwrap_or_default()
        )),
    }
}

/// What `--verify` found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub blobs_checked: u64,
    pub bytes_checked: u64,
    /// Live blobs whose object is missing.
    pub missing: Vec<Digest>,
    /// `(digest, recorded, actual)` stored sizes that differ.
    pub wrong_size: Vec<(Digest, u64, u64)>,
    /// Objects that do not inflate to their digest and logical size (deep only).
    pub corrupt: Vec<(Digest, String)>,
    /// `(digest, recorded, actual)` reference counts that differ.
    pub refcounts: Vec<(Digest, i64, i64)>,
}

impl VerifyReport {
    /// Number of problems found.
    pub fn problems(&self) -> usize {
        self.missing.len() + self.wrong_size.len() + self.corrupt.len() + self.refcounts.len()
    }
}

/// Checks every live blob's object (exists, recorded size; with `deep`, also re-reads and
/// re-hashes it) and every reference count. Deletes nothing.
pub async fn verify(
    fs: &FileStore,
    deep: bool,
    page_size: usize,
    progress: &(dyn Fn(&VerifyReport) + Sync),
) -> Result<VerifyReport, FileStoreError> {
    let mut report = VerifyReport {
        refcounts: fs.meta.refcount_mismatches().await?,
        ..VerifyReport::default()
    };
    let mut after: Option<Digest> = None;
    loop {
        let page = fs.meta.list_blobs(after.as_ref(), page_size).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.info.digest);
        let live: Vec<BlobInfo> = page.iter().filter(|r| r.live).map(|r| r.info).collect();
        let checks = futures::stream::iter(live)
            .map(|b| async move { (b, check_blob(fs, &b, deep).await) })
            .buffer_unordered(4)
            .collect::<Vec<_>>()
            .await;
        for (b, outcome) in checks {
            report.blobs_checked += 1;
            report.bytes_checked += b.stored_size;
            match outcome {
                Ok(Check::Ok) => {}
                Ok(Check::Missing) => report.missing.push(b.digest),
                Ok(Check::WrongSize(actual)) => {
                    report.wrong_size.push((b.digest, b.stored_size, actual))
                }
                Ok(Check::Corrupt(why)) => report.corrupt.push((b.digest, why)),
                Err(e) => return Err(e),
            }
        }
        progress(&report);
    }
    Ok(report)
}

enum Check {
    Ok,
    Missing,
    WrongSize(u64),
    Corrupt(String),
}

async fn check_blob(fs: &FileStore, b: &BlobInfo, deep: bool) -> Result<Check, FileStoreError> {
    let Some(size) = fs.store.head(&b.digest).await? else {
        return Ok(Check::Missing);
    };
    if size != b.stored_size {
        return Ok(Check::WrongSize(size));
    }
    if !deep {
        return Ok(Check::Ok);
    }
    let stream = match fs.store.get(&b.digest).await {
        Ok(s) => s,
        Err(StoreError::NotFound { .. }) => return Ok(Check::Missing),
        Err(e) => return Err(e.into()),
    };
    Ok(match inflate_digest(stream).await {
        Ok((d, n)) if d == b.digest && n == b.logical_size => Check::Ok,
        Ok((d, n)) => Check::Corrupt(format!("inflates to {n} bytes with SHA-256 {d}")),
        Err(e) => Check::Corrupt(e.to_string()),
    })
}

/// Inflates a stored object stream off the runtime, returning its content's digest and size.
pub async fn inflate_digest(
    stream: crate::store::ObjectStream,
) -> Result<(Digest, u64), blob::BlobError> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let feeder = async move { blob::feed(stream, &tx).await };
    let inflater =
        tokio::task::spawn_blocking(move || blob::inflate(ChannelReader::new(rx), io::sink()));
    let ((), result) = tokio::join!(feeder, inflater);
    result.map_err(|e| blob::BlobError::Interrupted(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::{Encoding, Hints, IngestOptions};
    use crate::locks::FileLocks;
    use crate::meta::SqliteMeta;
    use crate::spool::SpoolBody;
    use crate::store::FsStore;
    use std::path::Path;
    use std::sync::Arc;

    const OPTS: IngestOptions = IngestOptions {
        level: 1,
        max_logical_size: 1 << 20,
        max_gzip_ratio: 0,
    };

    async fn fixture(dir: &Path) -> FileStore {
        let meta = SqliteMeta::open(&dir.join("m.sqlite3"), crate::meta::sqlite_test_options())
            .await
            .unwrap();
        FileStore::new(
            Arc::new(meta),
            Arc::new(FsStore::open(dir.join("objects")).unwrap()),
            Arc::new(FileLocks::open(&dir.join("locks")).unwrap()),
            &dir.join("spool"),
            Duration::from_secs(5),
        )
        .unwrap()
    }

    async fn put(fs: &FileStore, path: &str, content: &[u8], now: i64) -> Digest {
        let s = fs
            .spool_blocking(content, Encoding::Identity, &Hints::default(), &OPTS)
            .unwrap();
        let d = s.info.digest;
        fs.commit(path, 1, s, now).await.unwrap();
        d
    }

    fn opts(grace_secs: u64) -> GcOptions {
        GcOptions {
            grace: Duration::from_secs(grace_secs),
            dry_run: false,
            max_deletes: None,
            lock_timeout: Duration::from_millis(200),
            page_size: 2,
            orphans: true,
            remember_deletions: Some(Duration::from_secs(100)),
        }
    }

    fn no_progress<T>(_: &T) {}

    #[tokio::test]
    async fn only_unreferenced_blobs_past_grace_go() {
        let dir = tempfile::tempdir().unwrap();
        let fs = fixture(dir.path()).await;
        let kept = put(&fs, "/kept", b"kept", 1000).await;
        let old = put(&fs, "/old", b"old garbage", 1000).await;
        let young = put(&fs, "/young", b"young garbage", 1000).await;
        fs.delete("/old", 1, 1000).await.unwrap();
        fs.delete("/young", 1, 1900).await.unwrap();
        let dry = GcOptions {
            dry_run: true,
            ..opts(500)
        };
        let r = collect(&fs, &dry, 2000, &no_progress).await.unwrap();
        assert_eq!(r.blobs_deleted, 1, "dry run reports");
        assert!(
            fs.store.head(&old).await.unwrap().is_some(),
            "dry run deletes nothing"
        );
        assert_eq!(fs.meta.deleted_version("/old").await.unwrap(), Some(1));

        let r = collect(&fs, &opts(500), 2000, &no_progress).await.unwrap();
        assert_eq!((r.blobs_deleted, r.errors.len()), (1, 0), "{r:?}");
        // Deletions are remembered for 100 s in these options: /old's (at 1000) is forgotten.
        assert_eq!(r.deletions_forgotten, 1);
        assert_eq!(fs.meta.deleted_version("/old").await.unwrap(), None);
        assert_eq!(fs.meta.deleted_version("/young").await.unwrap(), Some(1));
        assert!(fs.store.head(&old).await.unwrap().is_none());
        assert!(
            fs.store.head(&young).await.unwrap().is_some(),
            "inside the grace period"
        );
        assert!(fs.store.head(&kept).await.unwrap().is_some(), "referenced");
        assert_eq!(fs.meta.known_blobs(&[old]).await.unwrap(), vec![]);
        let v = verify(&fs, true, 10, &no_progress).await.unwrap();
        assert_eq!((v.problems(), v.blobs_checked), (0, 2), "{v:?}");
    }

    #[tokio::test]
    async fn orphans_older_than_grace_go_younger_stay() {
        let dir = tempfile::tempdir().unwrap();
        let fs = fixture(dir.path()).await;
        let live = put(&fs, "/live", b"live", 0).await;
        let mut orphan_digests = vec![];
        for (i, age) in [(1u8, 10_000u64), (2, 10)] {
            let d = Digest([i; 32]);
            let body = SpoolBody::Memory(bytes::Bytes::from_static(b"orphan"));
            fs.store.put(&d, body, 6).await.unwrap();
            let path = dir
                .path()
                .join("objects")
                .join(crate::store::object_key("", &d));
            let t = std::time::SystemTime::now() - Duration::from_secs(age);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(t)
                .unwrap();
            orphan_digests.push(d);
        }
        let r = collect(&fs, &opts(3600), crate::unix_now(), &no_progress)
            .await
            .unwrap();
        assert_eq!((r.orphans_deleted, r.orphan_bytes), (1, 6), "{r:?}");
        assert!(
            fs.store.head(&orphan_digests[0]).await.unwrap().is_none(),
            "old orphan gone"
        );
        assert!(
            fs.store.head(&orphan_digests[1]).await.unwrap().is_some(),
            "young orphan stays"
        );
        assert!(fs.store.head(&live).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_crash_after_the_tombstone_is_finished_by_the_next_run() {
        let dir = tempfile::tempdir().unwrap();
        let fs = fixture(dir.path()).await;
        let d = put(&fs, "/x", b"doomed", 0).await;
        fs.delete("/x", 1, 0).await.unwrap();
        // A run that died right after marking the row.
        assert!(fs.meta.tombstone_blob(&d, 10).await.unwrap());
        let r = collect(&fs, &opts(0), 10, &no_progress).await.unwrap();
        assert_eq!(r.blobs_deleted, 1);
        assert!(fs.store.head(&d).await.unwrap().is_none());
        assert_eq!(fs.meta.known_blobs(&[d]).await.unwrap(), vec![]);
        // And one that died after deleting the object but before removing the row.
        let d = put(&fs, "/y", b"doomed too", 0).await;
        fs.delete("/y", 1, 0).await.unwrap();
        assert!(fs.meta.tombstone_blob(&d, 10).await.unwrap());
        fs.store.delete(&d).await.unwrap();
        let r = collect(&fs, &opts(0), 10, &no_progress).await.unwrap();
        assert_eq!((r.blobs_deleted, r.errors.len()), (1, 0));
        assert_eq!(fs.meta.known_blobs(&[d]).await.unwrap(), vec![]);
    }

    #[tokio::test]
    async fn max_deletes_and_the_cleaner_lock() {
        let dir = tempfile::tempdir().unwrap();
        let fs = fixture(dir.path()).await;
        for i in 0..5 {
            let p = format!("/g{i}");
            put(&fs, &p, p.as_bytes(), 0).await;
            fs.delete(&p, 1, 0).await.unwrap();
        }
        let limited = GcOptions {
            max_deletes: Some(3),
            ..opts(0)
        };
        let r = collect(&fs, &limited, 10, &no_progress).await.unwrap();
        assert_eq!(r.blobs_deleted, 3);
        let held = fs
            .locks
            .try_lock(CLEANER_LOCK, LockMode::Exclusive)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            run(&fs, &opts(0), 10, &no_progress).await.unwrap(),
            None,
            "another run holds it"
        );
        held.release().await;
        let r = run(&fs, &opts(0), 10, &no_progress).await.unwrap().unwrap();
        assert_eq!(r.blobs_deleted, 2);
    }

    #[tokio::test]
    async fn deep_verify_finds_missing_and_corrupt_objects() {
        let dir = tempfile::tempdir().unwrap();
        let fs = fixture(dir.path()).await;
        let a = put(&fs, "/a", b"content a", 0).await;
        let b = put(&fs, "/b", b"content b", 0).await;
        let c = put(&fs, "/c", b"content c", 0).await;
        fs.store.delete(&a).await.unwrap();
        // Replace b's object with the gzip of other content of the same size.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(1));
        std::io::Write::write_all(&mut gz, b"content B").unwrap();
        let gz = gz.finish().unwrap();
        let size = gz.len() as u64;
        fs.store
            .put(&b, SpoolBody::Memory(gz.into()), size)
            .await
            .unwrap();
        let shallow = verify(&fs, false, 10, &no_progress).await.unwrap();
        assert_eq!(shallow.missing, vec![a]);
        assert!(
            shallow.corrupt.is_empty(),
            "a shallow check does not read contents"
        );
        let deep = verify(&fs, true, 10, &no_progress).await.unwrap();
        assert_eq!(deep.missing, vec![a]);
        assert_eq!(deep.corrupt.len(), 1);
        assert_eq!(deep.corrupt[0].0, b);
        assert_eq!(deep.problems(), 2);
        assert!(
            fs.store.head(&c).await.unwrap().is_some(),
            "verify deletes nothing"
        );
    }
}
