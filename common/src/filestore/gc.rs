//! Garbage collection and verification of a store, as `s3dedup-cleaner` runs them.
//!
//! Deleting a blob: take its lock, re-check inside one statement that it is still unreferenced
//! past the grace period and make it a tombstone of a new deletion (recording until when a
//! delete request of it may still reach the object store), confirm the lock is still held,
//! delete the object with every request sent before a deadline, and record the object gone.
//! A crash anywhere leaves a live row with its object, or a tombstone the next run finishes.
//! Objects without any row get such a tombstone first, under the digest's lock, since they may
//! be an upload about to commit. Why each interleaving is safe: docs/design.md.

use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use crate::blob::{self, BlobInfo, Digest};
use crate::filestore::{FileStore, FileStoreError, TOMBSTONE_KEEP};
use crate::locks::{BlobLock, Exclusive, LockError, LockMode, Shared};
use crate::meta::{BlobRow, Deletion};
use crate::store::{Deleted, ObjectEntry, ObjectStream, StoreError};

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
    /// Whether to sweep the object store for objects that have no row (and for abandoned
    /// uploads) this run.
    pub orphans: OrphanSweep,
    /// Sweep orphans even when the metadata database has no blob at all. Without it such a
    /// sweep stops with [`FileStoreError::EmptyMetadata`]: that is a wrong configuration far
    /// more often than an intended emptying of the store.
    pub empty_metadata_ok: bool,
    /// Forget remembered deletions of paths older than this; `None`: keep them forever.
    pub remember_deletions: Option<Duration>,
    /// Every request of one deletion is sent within this time of its tombstone; past it the
    /// deletion is dropped and left to the next run.
    pub delete_timeout: Duration,
    /// How long after its request was dropped (or its sender died) the object store may still
    /// carry out a delete. A PUT of the same content waits until both have passed.
    pub delete_settle: Duration,
}

/// Whether a run sweeps for orphans: a listing of the whole object store, so by default not
/// every run (`cleaner.orphan_sweep_interval_secs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OrphanSweep {
    /// Sweep this run.
    #[default]
    Due,
    /// The last sweep was recent; the next is due at this time (Unix seconds).
    NotDue { next_at: i64 },
    /// Not asked for (`--no-orphans`).
    Off,
}

impl GcOptions {
    /// How long a new tombstone's delete requests may reach the object store.
    fn settle(&self) -> Duration {
        self.delete_timeout + self.delete_settle
    }
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
    /// Tombstones of deleted objects forgotten, long after their deletion settled.
    pub tombstones_forgotten: u64,
    /// Abandoned multipart uploads of our objects aborted (older than the grace period).
    pub uploads_aborted: u64,
    /// Deletions abandoned because the blob's lock was lost before the object was deleted.
    pub locks_lost: u64,
    /// Deletions that failed; they are retried by the next run.
    pub errors: Vec<String>,
    /// `(contents, stored bytes)` unreferenced for less than the grace period, left for a
    /// later run.
    pub waiting: (u64, u64),
    /// Whether this run swept for orphans, and if not, why.
    pub orphan_sweep: OrphanSweep,
    /// The sweep ran to its end.
    pub orphans_swept: bool,
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
             aborted; {} busy, {} locks lost, {} old deletions forgotten, {} errors; {} \
             unreferenced blobs ({} bytes) wait for the grace period",
            self.blobs_deleted,
            self.bytes_freed,
            self.orphans_deleted,
            self.orphan_bytes,
            self.uploads_aborted,
            self.skipped_busy,
            self.locks_lost,
            self.deletions_forgotten,
            self.errors.len(),
            self.waiting.0,
            self.waiting.1
        ) + &self.sweep_summary()
    }

    fn sweep_summary(&self) -> String {
        match self.orphan_sweep {
            _ if self.orphans_swept => "; orphans swept".into(),
            OrphanSweep::Due => "; orphan sweep skipped: --max-deletes reached".into(),
            OrphanSweep::NotDue { next_at } => {
                let at = chrono::DateTime::from_timestamp(next_at, 0).map_or_else(
                    || next_at.to_string(),
                    |t| t.format("%F %R UTC").to_string(),
                );
                format!(
                    "; no orphan sweep this run: next due at {at} \
                     (cleaner.orphan_sweep_interval_secs; --orphans sweeps now)"
                )
            }
            OrphanSweep::Off => "; no orphan sweep (--no-orphans)".into(),
        }
    }
}

fn limit_reached(report: &GcReport, opts: &GcOptions) -> bool {
    opts.max_deletes.is_some_and(|m| report.deletions() >= m)
}

/// Takes the bucket's cleaner lock and collects garbage. `Ok(None)`: another run holds the lock.
pub async fn run(
    fs: &FileStore, opts: &GcOptions, now: i64, progress: &(dyn Fn(&GcReport) + Sync),
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
    fs: &FileStore, opts: &GcOptions, now: i64, progress: &(dyn Fn(&GcReport) + Sync),
) -> Result<GcReport, FileStoreError> {
    let cutoff = now - opts.grace.as_secs() as i64;
    let mut report = GcReport::default();
    let mut after: Option<Digest> = None;
    loop {
        let mut page = fs
            .meta
            .unreferenced_blobs(cutoff, after.as_ref(), opts.page_size)
            .await?;
        let Some(last) = page.last() else { break };
        after = Some(last.digest);
        if let Some(max) = opts.max_deletes {
            page.truncate(max.saturating_sub(report.deletions()) as usize);
        }
        let mut outcomes = futures::stream::iter(&page)
            .map(|blob| delete_blob(fs, blob, cutoff, opts))
            .buffer_unordered(DELETE_CONCURRENCY);
        while let Some((blob, outcome)) = outcomes.next().await {
            report.tally(blob, outcome);
        }
        progress(&report);
        if limit_reached(&report, opts) {
            break;
        }
    }
    report.orphan_sweep = opts.orphans;
    let sweep = opts.orphans == OrphanSweep::Due;
    if sweep && !limit_reached(&report, opts) {
        sweep_orphans(fs, cutoff, now, opts, &mut report, progress).await?;
        report.orphans_swept = true;
    }
    if sweep {
        abort_stale_uploads(fs, cutoff, opts, &mut report).await;
    }
    report.waiting = fs.meta.waiting_blobs(cutoff).await?;
    if !opts.dry_run {
        report.tombstones_forgotten = fs.meta.purge_tombstones(TOMBSTONE_KEEP).await?;
    }
    if let Some(keep) = opts.remember_deletions.filter(|_| !opts.dry_run) {
        let before = now - keep.as_secs() as i64;
        report.deletions_forgotten = fs.meta.purge_deletions(before).await?;
    }
    progress(&report);
    Ok(report)
}

/// Why a deletion stopped short.
enum Abandoned {
    /// The blob's lock was lost before the object was deleted.
    LockLost(String),
    Failed(FileStoreError),
}

impl From<FileStoreError> for Abandoned {
    fn from(e: FileStoreError) -> Self {
        match e {
            FileStoreError::Lock(LockError::Lost { why, .. }) => Abandoned::LockLost(why),
            e => Abandoned::Failed(e),
        }
    }
}

impl From<crate::meta::MetaError> for Abandoned {
    fn from(e: crate::meta::MetaError) -> Self {
        Abandoned::Failed(e.into())
    }
}

impl From<StoreError> for Abandoned {
    fn from(e: StoreError) -> Self {
        Abandoned::Failed(e.into())
    }
}

impl From<LockError> for Abandoned {
    fn from(e: LockError) -> Self {
        FileStoreError::from(e).into()
    }
}

/// Records a deletion abandoned for a lost lock.
fn lock_lost(report: &mut GcReport, what: &str, digest: &Digest, why: &str) {
    report.locks_lost += 1;
    tracing::warn!(lock = %format!("blob:{digest}"), cause = why,
        "lost the lock of {what} {digest} ({why}); abandoned deleting its object, which the \
         next run finishes unless a writer revived it");
}

/// Blobs of a page deleted at once: each is a few database round trips and a delete request,
/// under a lock of its own.
const DELETE_CONCURRENCY: usize = 8;

/// What became of one unreferenced blob.
enum Outcome {
    Deleted,
    /// Referenced again, or younger than the grace period by now.
    Kept,
    /// A PUT held its lock throughout.
    Busy,
    Abandoned(Abandoned),
}

impl GcReport {
    fn tally(&mut self, blob: &BlobInfo, outcome: Outcome) {
        let d = &blob.digest;
        match outcome {
            Outcome::Deleted => {
                self.blobs_deleted += 1;
                self.bytes_freed += blob.stored_size;
                tracing::debug!(digest = %d, "deleted unreferenced blob");
            }
            Outcome::Kept => {}
            Outcome::Busy => self.skipped_busy += 1,
            Outcome::Abandoned(Abandoned::LockLost(why)) => lock_lost(self, "blob", d, &why),
            Outcome::Abandoned(Abandoned::Failed(e)) => self.errors.push(format!("blob {d}: {e}")),
        }
    }
}

async fn delete_blob<'a>(
    fs: &FileStore, blob: &'a BlobInfo, cutoff: i64, opts: &GcOptions,
) -> (&'a BlobInfo, Outcome) {
    if opts.dry_run {
        return (blob, Outcome::Deleted);
    }
    let lock =
        match BlobLock::<Exclusive>::acquire(&*fs.locks, &blob.digest, opts.lock_timeout).await {
            Ok(l) => l,
            Err(LockError::Timeout { .. }) => return (blob, Outcome::Busy),
            Err(e) => return (blob, Outcome::Abandoned(e.into())),
        };
    let result = delete_locked(fs, &lock, cutoff, opts).await;
    lock.release().await;
    let outcome = match result {
        Ok(true) => Outcome::Deleted,
        Ok(false) => Outcome::Kept,
        Err(e) => Outcome::Abandoned(e),
    };
    (blob, outcome)
}

/// The deletion itself, under the blob's lock; false when the blob is referenced again (or
/// still young).
async fn delete_locked(
    fs: &FileStore, lock: &BlobLock<Exclusive>, cutoff: i64, opts: &GcOptions,
) -> Result<bool, Abandoned> {
    let d = lock.digest();
    // Started before the tombstone, whose settle time starts later on the database's clock:
    // every request of this delete goes out at least `delete_settle` before that time.
    let deadline = Instant::now() + opts.delete_timeout;
    let deletion = match fs.meta.tombstone_blob(lock, cutoff, opts.settle()).await? {
        None => return Ok(false), // referenced again, or younger than the grace period now
        Some(Deletion::Removed) => return Ok(true), // its row held the content
        Some(Deletion::Tombstone(id)) => id,
    };
    lock.ensure_held().await?;
    match fs.store.delete(d, deadline).await {
        Ok(settled) => {
            // Only a fact about this deletion, written whatever became of the lock: a writer
            // who revived the blob meanwhile changed the tombstone, and this changes nothing.
            fs.meta
                .finish_deletion(d, deletion, settled == Deleted::Settled)
                .await?;
            Ok(true)
        }
        // The delete failed: say so as a lost lock if that is what stopped it.
        Err(e) => match lock.ensure_held().await {
            Err(LockError::Lost { why, .. }) => Err(Abandoned::LockLost(why)),
            _ => Err(e.into()),
        },
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

/// How old objects must be for a sweep to take a metadata database without a blob as the wrong
/// one (see [`GcOptions::empty_metadata_ok`]); younger ones may be uploads not committed yet.
const EMPTY_METADATA_AGE: Duration = Duration::from_secs(3600);

/// Orphans deleted per batch: one `DeleteObjects` request, with each digest's lock held (and
/// as many lock files open, which is why it is well below S3's limit of 1000).
const ORPHAN_BATCH: usize = 100;

/// Whether the metadata database looks like not the one that wrote the objects: objects old
/// enough to be no upload in flight (`first`, the store's first page), and not one blob row in
/// the database (not even a tombstone, kept an hour).
async fn metadata_lost(
    fs: &FileStore, first: &[ObjectEntry], now: i64,
) -> Result<bool, FileStoreError> {
    let settled = now - EMPTY_METADATA_AGE.as_secs() as i64;
    Ok(
        first.iter().any(|o| o.modified <= settled)
            && fs.meta.list_blobs(None, 1).await?.is_empty(),
    )
}

impl FileStore {
    /// True when the metadata database has no blobs while the object store holds objects older
    /// than an hour: a new or wrong database over a full store (the cleaner refuses to sweep
    /// such a store; the API says so when it starts).
    pub async fn metadata_looks_lost(&self, now: i64) -> Result<bool, FileStoreError> {
        let first = self.store.list(None, 100).await?;
        metadata_lost(self, &first, now).await
    }
}

async fn sweep_orphans(
    fs: &FileStore, cutoff: i64, now: i64, opts: &GcOptions, report: &mut GcReport,
    progress: &(dyn Fn(&GcReport) + Sync),
) -> Result<(), FileStoreError> {
    let mut after: Option<Digest> = None;
    loop {
        let page = fs.store.list(after.as_ref(), opts.page_size).await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        if after.is_none() && !opts.empty_metadata_ok && metadata_lost(fs, &page, now).await? {
            return Err(FileStoreError::EmptyMetadata);
        }
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
            delete_orphans(fs, batch, now, opts, report).await;
        }
        progress(report);
        if limit_reached(report, opts) {
            return Ok(());
        }
    }
}

async fn delete_orphans(
    fs: &FileStore, batch: &[&ObjectEntry], now: i64, opts: &GcOptions, report: &mut GcReport,
) {
    if opts.dry_run {
        report.orphans_deleted += batch.len() as u64;
        report.orphan_bytes += batch.iter().map(|o| o.size).sum::<u64>();
        return;
    }
    let mut held = Vec::with_capacity(batch.len());
    for o in batch {
        match BlobLock::<Exclusive>::acquire(&*fs.locks, &o.digest, opts.lock_timeout).await {
            Ok(l) => held.push((*o, l)),
            Err(LockError::Timeout { .. }) => report.skipped_busy += 1,
            Err(e) => report.errors.push(format!("orphan {}: {e}", o.digest)),
        }
    }
    let first = held
        .first()
        .map(|(o, _)| o.digest.to_hex())
        .unwrap_or_default();
    let result = delete_orphans_locked(fs, &held, now, opts, report).await;
    for (_, l) in held {
        l.release().await;
    }
    match result {
        Ok((deleted, failed)) => {
            for o in deleted {
                if let Some((_, why)) = failed.iter().find(|(d, _)| *d == o.digest) {
                    report.errors.push(format!("orphan {}: {why}", o.digest));
                } else {
                    report.orphans_deleted += 1;
                    report.orphan_bytes += o.size;
                    tracing::debug!(digest = %o.digest, "deleted orphaned object");
                }
            }
        }
        Err(e) => report.errors.push(format!("orphans {first}..: {e}")),
    }
}

/// Under the locks no PUT is between its upload and its commit, unless its lock was lost: a
/// tombstone row made now is what such a PUT's commit finds instead of the absence it saw.
async fn delete_orphans_locked<'a>(
    fs: &FileStore, held: &[(&'a ObjectEntry, BlobLock<Exclusive>)], now: i64, opts: &GcOptions,
    report: &mut GcReport,
) -> Result<(Vec<&'a ObjectEntry>, Vec<(Digest, String)>), FileStoreError> {
    let deadline = Instant::now() + opts.delete_timeout;
    let orphans: Vec<(&BlobLock<Exclusive>, u64)> = held.iter().map(|(o, l)| (l, o.size)).collect();
    let made = fs
        .meta
        .tombstone_orphans(&orphans, opts.settle(), now)
        .await?;
    let mut doomed = Vec::with_capacity(made.len());
    for (digest, deletion) in made {
        let Some((o, lock)) = held.iter().find(|(o, _)| o.digest == digest) else {
            continue;
        };
        match lock.ensure_held().await {
            Ok(()) => doomed.push((*o, deletion)),
            Err(LockError::Lost { why, .. }) => lock_lost(report, "orphaned object", &digest, &why),
            Err(e) => return Err(e.into()),
        }
    }
    let ids: Vec<Digest> = doomed.iter().map(|(o, _)| o.digest).collect();
    let done = fs.store.delete_many(&ids, deadline).await?;
    let settled = done.settled == Deleted::Settled;
    for (o, deletion) in &doomed {
        if !done.failed.iter().any(|(d, _)| *d == o.digest) {
            fs.meta
                .finish_deletion(&o.digest, *deletion, settled)
                .await?;
        }
    }
    Ok((doomed.into_iter().map(|(o, _)| o).collect(), done.failed))
}

/// What `--verify` found. Each problem was seen twice: once in the scan, and again under the
/// blob's lock against a fresh row, so a blob deleted or stored again meanwhile is none.
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
    /// Objects the store would not let us read (permissions, I/O errors), with why.
    pub unreadable: Vec<(Digest, String)>,
    /// `(digest, recorded, actual)` reference counts that differ.
    pub refcounts: Vec<(Digest, i64, i64)>,
    /// Problems seen in the scan that could not be checked again: a writer held the blob's
    /// lock throughout. Not counted as problems.
    pub unconfirmed: Vec<Digest>,
}

impl VerifyReport {
    /// Number of problems found.
    pub fn problems(&self) -> usize {
        self.missing.len()
            + self.wrong_size.len()
            + self.corrupt.len()
            + self.unreadable.len()
            + self.refcounts.len()
    }

    fn record(&mut self, b: &BlobInfo, check: Check) {
        match check {
            Check::Ok => {}
            Check::Missing => self.missing.push(b.digest),
            Check::WrongSize(actual) => self.wrong_size.push((b.digest, b.stored_size, actual)),
            Check::Corrupt(why) => self.corrupt.push((b.digest, why)),
            Check::Unreadable(why) => self.unreadable.push((b.digest, why)),
            Check::Busy => self.unconfirmed.push(b.digest),
        }
    }
}

/// Checks every live blob's object (exists, recorded size; with `deep`, also re-reads and
/// re-hashes it) and every reference count. Deletes nothing. An object store that does not
/// answer at all is an error; one object it will not give is a problem, and the scan goes on.
pub async fn verify(
    fs: &FileStore, deep: bool, page_size: usize, lock_timeout: Duration,
    progress: &(dyn Fn(&VerifyReport) + Sync),
) -> Result<VerifyReport, FileStoreError> {
    fs.store.check().await?;
    let mut report = VerifyReport {
        refcounts: fs.meta.refcount_mismatches().await?,
        ..VerifyReport::default()
    };
    let mut after: Option<Digest> = None;
    loop {
        let page = fs.meta.list_blobs(after.as_ref(), page_size).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.info.digest);
        let checks = futures::stream::iter(page.iter().filter(|r| r.live))
            .map(|row| async move { (&row.info, check_blob(fs, row, deep).await) })
            .buffer_unordered(4)
            .collect::<Vec<_>>()
            .await;
        for (b, first) in checks {
            report.blobs_checked += 1;
            report.bytes_checked += b.stored_size;
            if matches!(first, Check::Ok) {
                continue;
            }
            let Some((row, check)) = recheck(fs, &b.digest, deep, lock_timeout).await? else {
                continue;
            };
            let (row, check) = match check {
                // A second upload of the content as other gzip bytes, whose writer lost its
                // lock, may be between its object and its row (which then takes the object's
                // sizes): a size still wrong a moment later is a problem.
                Check::WrongSize(_) => {
                    tokio::time::sleep(RESIZE_WINDOW).await;
                    match recheck(fs, &b.digest, deep, lock_timeout).await? {
                        Some(again) => again,
                        None => continue,
                    }
                }
                _ => (row, check),
            };
            report.record(&row, check);
        }
        progress(&report);
    }
    Ok(report)
}

/// How long a wrong size must last before verify reports it (see [`verify`]).
const RESIZE_WINDOW: Duration = Duration::from_secs(2);

/// A problem seen in the scan, checked again under the blob's shared lock (no upload or
/// deletion of it in progress) against its row as it is now. `None`: the row is gone or not
/// live any more, so nothing is wrong.
async fn recheck(
    fs: &FileStore, digest: &Digest, deep: bool, lock_timeout: Duration,
) -> Result<Option<(BlobInfo, Check)>, FileStoreError> {
    let lock = match BlobLock::<Shared>::acquire(&*fs.locks, digest, lock_timeout).await {
        Ok(l) => l,
        Err(LockError::Timeout { .. }) => {
            return Ok(Some((
                BlobInfo {
                    digest: *digest,
                    logical_size: 0,
                    stored_size: 0,
                },
                Check::Busy,
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let result = async {
        let Some(row) = fs.meta.get_blob(digest).await?.filter(|r| r.live) else {
            return Ok(None);
        };
        let check = check_blob(fs, &row, deep).await;
        Ok(Some((row.info, check)))
    }
    .await;
    lock.release().await;
    result
}

enum Check {
    Ok,
    Missing,
    WrongSize(u64),
    Corrupt(String),
    Unreadable(String),
    /// Its lock stayed taken: checked once only.
    Busy,
}

async fn check_blob(fs: &FileStore, row: &BlobRow, deep: bool) -> Check {
    let b = &row.info;
    if row.inline {
        return check_inline(fs, b, deep).await;
    }
    let size = match fs.store.head(&b.digest).await {
        Ok(Some(size)) => size,
        Ok(None) => return Check::Missing,
        Err(e) => return Check::Unreadable(e.to_string()),
    };
    if size != b.stored_size {
        return Check::WrongSize(size);
    }
    if !deep {
        return Check::Ok;
    }
    let stream = match fs.store.get(&b.digest).await {
        Ok(s) => s,
        Err(StoreError::NotFound { .. }) => return Check::Missing,
        Err(e) => return Check::Unreadable(e.to_string()),
    };
    check_digest(stream, b).await
}

/// [`check_blob`] of content its row keeps: its length, and with `deep` its digest.
async fn check_inline(fs: &FileStore, b: &BlobInfo, deep: bool) -> Check {
    let content = match fs.meta.inline_content(&b.digest).await {
        Ok(Some(content)) => content,
        // Gone, or an object by now: the recheck under the lock reads the row again.
        Ok(None) => return Check::Missing,
        Err(e) => return Check::Unreadable(e.to_string()),
    };
    if content.len() as u64 != b.stored_size {
        return Check::WrongSize(content.len() as u64);
    }
    if !deep {
        return Check::Ok;
    }
    check_digest(crate::store::stream_of(content), b).await
}

/// Whether stored bytes inflate to the blob's SHA-256 and size.
async fn check_digest(stream: ObjectStream, b: &BlobInfo) -> Check {
    match crate::inflating::digest_of(stream).await {
        Ok((d, n)) if d == b.digest && n == b.logical_size => Check::Ok,
        Ok((d, n)) => Check::Corrupt(format!("inflates to {n} bytes with SHA-256 {d}")),
        // The stream failing to deliver is the store's doing, not the content's.
        Err(blob::BlobError::Interrupted(why)) => Check::Unreadable(why),
        Err(e) => Check::Corrupt(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::{Encoding, Hints, IngestOptions};
    use crate::locks::FileLocks;
    use crate::meta::{DeleteKind, PutKind, SqliteMeta};
    use crate::spool::SpoolBody;
    use crate::store::FsStore;
    use std::sync::Arc;

    const OPTS: IngestOptions = IngestOptions {
        level: 1,
        max_logical_size: 1 << 20,
        max_gzip_ratio: 0,
    };

    /// A file store on SQLite and a local directory, in a directory that lives as long as the
    /// returned guard.
    async fn fixture() -> (tempfile::TempDir, FileStore) {
        let dir = tempfile::tempdir().unwrap();
        let dir_path = dir.path();
        let meta = SqliteMeta::open(
            &dir_path.join("m.sqlite3"),
            crate::meta::sqlite_test_options(),
        )
        .await
        .unwrap();
        let fs = FileStore::new(
            Arc::new(meta),
            Arc::new(FsStore::open(dir_path.join("objects")).unwrap()),
            Arc::new(FileLocks::open(&dir_path.join("locks")).unwrap()),
            &dir_path.join("spool"),
            Duration::from_secs(5),
        )
        .unwrap();
        (dir, fs)
    }

    async fn put(fs: &FileStore, path: &str, content: &[u8], now: i64) -> Digest {
        let s = fs
            .spool_blocking(content, Encoding::Identity, &Hints::default(), &OPTS)
            .unwrap();
        let d = s.info.digest;
        fs.commit(path, 1, s, now, PutKind::Client).await.unwrap();
        d
    }

    /// Files at version 1, each holding "content of " and its path, all written at `now`:
    /// their digests, in order.
    async fn put_all<const N: usize>(fs: &FileStore, paths: [&str; N], now: i64) -> [Digest; N] {
        let mut digests = [Digest([0; 32]); N];
        for (d, path) in digests.iter_mut().zip(paths) {
            *d = put(fs, path, format!("content of {path}").as_bytes(), now).await;
        }
        digests
    }

    fn opts(grace_secs: u64) -> GcOptions {
        GcOptions {
            grace: Duration::from_secs(grace_secs),
            dry_run: false,
            max_deletes: None,
            lock_timeout: Duration::from_millis(200),
            page_size: 2,
            orphans: OrphanSweep::Due,
            empty_metadata_ok: false,
            remember_deletions: Some(Duration::from_secs(100)),
            delete_timeout: Duration::from_secs(10),
            delete_settle: Duration::from_secs(5),
        }
    }

    const LOCK_WAIT: Duration = Duration::from_secs(1);

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    /// The blob's row says its object was deleted.
    async fn deleted(fs: &FileStore, d: &Digest) -> bool {
        let lock = BlobLock::<Exclusive>::assumed(d);
        let row = fs.meta.get_blob(d).await.unwrap();
        let state = fs.meta.blob_state(lock.held()).await.unwrap();
        row.is_some_and(|r| !r.live) && matches!(state, crate::meta::BlobState::Tombstone { .. })
    }

    fn no_progress<T>(_: &T) {}

    #[tokio::test]
    async fn only_unreferenced_blobs_past_grace_go() {
        let (_dir, fs) = fixture().await;
        let [kept, old, young] = put_all(&fs, ["/kept", "/old", "/young"], 1000).await;
        fs.delete("/old", 1, 1000, DeleteKind::Client)
            .await
            .unwrap();
        fs.delete("/young", 1, 1900, DeleteKind::Client)
            .await
            .unwrap();
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
        assert!(
            deleted(&fs, &old).await,
            "a tombstone remembers the deletion"
        );
        let v = verify(&fs, true, 10, LOCK_WAIT, &no_progress)
            .await
            .unwrap();
        assert_eq!((v.problems(), v.blobs_checked), (0, 2), "{v:?}");
    }

    #[tokio::test]
    async fn orphans_older_than_grace_go_younger_stay() {
        let (dir, fs) = fixture().await;
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
        let (_dir, fs) = fixture().await;
        let d = put(&fs, "/x", b"doomed", 0).await;
        fs.delete("/x", 1, 0, DeleteKind::Client).await.unwrap();
        // A run that died right after marking the row.
        let tombstone = async |d: &Digest| {
            let lock = BlobLock::<Exclusive>::assumed(d);
            let settle = Duration::from_secs(5);
            let made = fs.meta.tombstone_blob(&lock, 10, settle).await.unwrap();
            assert!(made.is_some(), "tombstoned");
        };
        tombstone(&d).await;
        let r = collect(&fs, &opts(0), 10, &no_progress).await.unwrap();
        assert_eq!(r.blobs_deleted, 1);
        assert!(fs.store.head(&d).await.unwrap().is_none());
        assert!(deleted(&fs, &d).await);
        // And one that died after deleting the object but before recording it.
        let d = put(&fs, "/y", b"doomed too", 0).await;
        fs.delete("/y", 1, 0, DeleteKind::Client).await.unwrap();
        tombstone(&d).await;
        fs.store.delete(&d, soon()).await.unwrap();
        let r = collect(&fs, &opts(0), 10, &no_progress).await.unwrap();
        assert_eq!((r.blobs_deleted, r.errors.len()), (1, 0));
        assert!(deleted(&fs, &d).await);
    }

    #[tokio::test]
    async fn max_deletes_and_the_cleaner_lock() {
        let (_dir, fs) = fixture().await;
        for i in 0..5 {
            let p = format!("/g{i}");
            put(&fs, &p, p.as_bytes(), 0).await;
            fs.delete(&p, 1, 0, DeleteKind::Client).await.unwrap();
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
    async fn a_second_encoding_whose_row_follows_is_no_problem() {
        let (_dir, fs) = fixture().await;
        let content = b"the same content, twice".repeat(20);
        let a = put(&fs, "/a", &content, 0).await;
        // Another upload's object, the same content as other gzip bytes, lands over it; its
        // row follows a moment later, as after a lost lock.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
        std::io::Write::write_all(&mut gz, &content).unwrap();
        let gz = gz.finish().unwrap();
        let before = fs.store.head(&a).await.unwrap();
        let size = gz.len() as u64;
        assert_ne!(before, Some(size), "another encoding, another size");
        fs.store
            .put(&a, SpoolBody::Memory(gz.into()), size)
            .await
            .unwrap();
        let meta = fs.meta.clone();
        let follows = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let lock = BlobLock::<Exclusive>::assumed(&a);
            let info = BlobInfo {
                digest: a,
                logical_size: 460,
                stored_size: size,
            };
            let stored = crate::meta::Stored::Object {
                lock: &lock,
                over: crate::meta::BlobState::Live,
            };
            meta.store_file("/b", 1, &info, stored, 0, PutKind::Client)
                .await
                .unwrap();
        });
        let report = verify(&fs, false, 10, LOCK_WAIT, &no_progress)
            .await
            .unwrap();
        follows.await.unwrap();
        assert_eq!(report.problems(), 0, "{:?}", report.wrong_size);
        // A size that stays wrong is reported.
        let other = b"x".repeat(40);
        fs.store
            .put(&a, SpoolBody::Memory(other.into()), 40)
            .await
            .unwrap();
        let report = verify(&fs, false, 10, LOCK_WAIT, &no_progress)
            .await
            .unwrap();
        assert_eq!(report.wrong_size, vec![(a, size, 40)]);
    }

    #[tokio::test]
    async fn deep_verify_finds_missing_and_corrupt_objects() {
        let (_dir, fs) = fixture().await;
        let [a, b, c] = put_all(&fs, ["/a", "/b", "/c"], 0).await;
        fs.store.delete(&a, soon()).await.unwrap();
        // Replace b's object with the gzip of other content of the same size.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(1));
        std::io::Write::write_all(&mut gz, b"content of /B").unwrap();
        let gz = gz.finish().unwrap();
        let size = gz.len() as u64;
        fs.store
            .put(&b, SpoolBody::Memory(gz.into()), size)
            .await
            .unwrap();
        let shallow = verify(&fs, false, 10, LOCK_WAIT, &no_progress)
            .await
            .unwrap();
        assert_eq!(shallow.missing, vec![a]);
        assert!(
            shallow.corrupt.is_empty(),
            "a shallow check does not read contents"
        );
        let deep = verify(&fs, true, 10, LOCK_WAIT, &no_progress)
            .await
            .unwrap();
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
