//! Importing an existing Filetracker store: walking its files (streamed, so memory does not grow
//! with their number), verifying each content and committing it through the file store with
//! its original version. Idempotent: a path already stored at the same or a newer version is
//! left alone, and a path deleted here is not brought back. A directory walk has a fixed order
//! and records how far it got in the metadata store, so a killed run resumes from there.

mod checkpoint;
mod gone;
mod store;
mod upstream;
mod walk;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::blob::{Encoding, Hints, IngestOptions};
use crate::filestore::FileStore;
use crate::filestore::FileStoreError;
use crate::meta::{MetaError, PutKind, PutOutcome};
use crate::old_server::{Imported, OldServer, OldServerError};
use crate::protocol::{self, FilePath, Version};
use crate::source::{Source, UpstreamDb};
use crate::throttle::Throttle;

/// One file found in the source.
#[derive(Debug, Clone)]
struct Item {
    path: FilePath,
    origin: Origin,
}

#[derive(Debug, Clone)]
enum Origin {
    File {
        version: Version,
        file: PathBuf,
        encoding: Encoding,
        /// v2 blobs are named by their digest: what the content must hash to.
        expected: Option<crate::blob::Digest>,
    },
    /// Version and content come from the old server, file by file.
    Http,
    /// A file of another s3dedup store, read from it when imported.
    Store,
    /// An object already in the store under `digest`, to be verified and adopted.
    Adopt {
        version: Version,
        digest: crate::blob::Digest,
    },
}

impl Item {
    fn shown(&self) -> String {
        match &self.origin {
            Origin::File { file, .. } => format!("{} ({})", self.path, file.display()),
            Origin::Http | Origin::Store | Origin::Adopt { .. } => self.path.to_string(),
        }
    }
}

/// Why a file of the source was not imported, or a run could not go on.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// What the walk, the listing or the upstream metadata found is not a file to import.
    #[error("{0}")]
    Source(String),
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    OldServer(#[from] OldServerError),
    #[error("listed by the old server, but gone from it")]
    Vanished,
    #[error("upstream metadata {db}: {why}")]
    Upstream { db: String, why: String },
    #[error("source store {}: {why}", config.display())]
    OtherStore { config: PathBuf, why: String },
    #[error("reading the source store: {0}")]
    SourceFile(FileStoreError),
    #[error(transparent)]
    Store(#[from] FileStoreError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("import task: {0}")]
    Task(String),
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    pub migrated: u64,
    pub bytes: u64,
    /// Already stored at the same or a newer version.
    pub skipped: u64,
    /// Deleted here at or after the source's version, so not brought back.
    pub kept_deleted: u64,
    /// Files deleted here because the source deleted them (another s3dedup store's remembered
    /// deletions; with `--delete-missing`, imported files an old Filetracker no longer has).
    pub deletions_carried: u64,
    /// Imported files the old Filetracker no longer has, kept here (no `--delete-missing`).
    pub missing: Vec<String>,
    /// The checkpoint of an interrupted run this one started after.
    pub resumed_after: Option<String>,
    /// `(source file, why)`: reported, skipped, the run goes on.
    pub failed: Vec<(String, String)>,
    /// Asked to stop (SIGTERM, SIGINT) before the end: the files in flight were abandoned and
    /// the checkpoint kept, so the next run goes on from there.
    pub stopped: bool,
}

impl MigrateReport {
    /// One line for logs and systemd's `STATUS=`.
    pub fn summary(&self) -> String {
        let stopped = if self.stopped {
            "; stopped before the end, run again to finish"
        } else {
            ""
        };
        let mut carried = match self.deletions_carried {
            0 => String::new(),
            n => format!(", {n} deleted as at the source"),
        };
        if !self.missing.is_empty() {
            carried += &format!(
                ", {} gone from the source but kept here (--delete-missing deletes them)",
                self.missing.len()
            );
        }
        format!(
            "{} files migrated ({} bytes), {} already present, {} deleted here{carried}, {} \
             failed{stopped}",
            self.migrated,
            self.bytes,
            self.skipped,
            self.kept_deleted,
            self.failed.len()
        )
    }

    /// Files looked at so far.
    pub fn seen(&self) -> u64 {
        self.migrated + self.skipped + self.kept_deleted + self.failed.len() as u64
    }
}

fn mtime(meta: &std::fs::Metadata) -> Version {
    use std::os::unix::fs::MetadataExt;
    meta.mtime()
}

/// How a run goes.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Files imported at once.
    pub jobs: usize,
    /// Report what would be imported; store nothing (and record no checkpoint).
    pub dry_run: bool,
    /// Delete here the imported files an old Filetracker no longer has.
    pub delete_missing: bool,
    /// Bytes read from the source per second, all jobs together; 0: unlimited.
    pub max_bytes_per_sec: u64,
    /// Timeout of each request to an old server.
    pub http_timeout: Duration,
    pub now: i64,
}

/// One thing the walk or the listing found, with the position a checkpoint records once it and
/// everything before it are done (directory walks only: a listing has no fixed order).
struct Work {
    position: Option<String>,
    /// The item, or what was found (a file, a name) and why it cannot be one.
    item: Result<Item, (String, MigrateError)>,
}

fn describe(
    root: &Path, p: &Path, meta: &std::fs::Metadata, v2: bool,
) -> Result<Item, (String, MigrateError)> {
    let shown = p.display().to_string();
    let fail = |why: String| Err((shown.clone(), MigrateError::Source(why)));
    let Ok(rel) = p.strip_prefix(root) else {
        return fail("outside the source".into());
    };
    let Some(rel) = rel.to_str() else {
        return fail("name is not UTF-8".into());
    };
    let rel = if v2 {
        protocol::decode_v2_name(rel)
    } else {
        rel.to_owned()
    };
    let path = match FilePath::parse(&rel, crate::protocol::DEFAULT_MAX_PATH_LEN) {
        Ok(p) => p,
        Err(e) => return fail(e.to_string()),
    };
    if !v2 {
        if !meta.is_file() {
            return fail("not a regular file".into());
        }
        return Ok(Item {
            path,
            origin: Origin::File {
                version: mtime(meta),
                file: p.to_owned(),
                encoding: Encoding::Identity,
                expected: None,
            },
        });
    }
    if !meta.file_type().is_symlink() {
        return fail("not a symlink to a blob".into());
    }
    let target = match std::fs::read_link(p) {
        Ok(t) => p.parent().unwrap_or(root).join(t),
        Err(e) => return fail(e.to_string()),
    };
    let expected = target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok());
    if expected.is_none() {
        return fail(format!(
            "link target {} is not named by a digest",
            target.display()
        ));
    }
    Ok(Item {
        path,
        origin: Origin::File {
            // The symlink's own mtime is the version (lstat, not the blob's).
            version: mtime(meta),
            file: target,
            encoding: Encoding::Gzip,
            expected,
        },
    })
}

enum Done {
    Migrated(u64),
    Skipped,
    KeptDeleted,
}

impl Done {
    /// What committing an import did; `bytes` is what a stored file counts.
    fn of(outcome: PutOutcome, bytes: u64) -> Done {
        match outcome {
            PutOutcome::Stored { .. } => Done::Migrated(bytes),
            PutOutcome::Newer { .. } => Done::Skipped,
            PutOutcome::Deleted { .. } => Done::KeptDeleted,
        }
    }
}

const INGEST: IngestOptions = IngestOptions {
    level: 6,
    max_logical_size: u64::MAX,
    max_gzip_ratio: 0,
};

/// What a run reads from besides directories: an old server, another s3dedup store.
#[derive(Clone, Default)]
struct Readers {
    old: Option<OldServer>,
    other: Option<Arc<FileStore>>,
}

impl Readers {
    async fn open(
        fs: &FileStore, source: &Source, http_timeout: Duration,
    ) -> Result<Readers, MigrateError> {
        Ok(match source {
            Source::Http(u) => Readers {
                old: Some(OldServer::new(u, http_timeout)?),
                other: None,
            },
            Source::Store(file) => Readers {
                old: None,
                other: Some(store::open(file, fs).await?),
            },
            _ => Readers::default(),
        })
    }
}

async fn import(
    fs: &Arc<FileStore>, readers: &Readers, item: &Item, opts: &RunOptions,
    throttle: Option<&Arc<Throttle>>,
) -> Result<Done, MigrateError> {
    if let Origin::Adopt { version, digest } = &item.origin {
        return adopt(fs, &item.path, *version, digest, opts).await;
    }
    if let Origin::Store = &item.origin {
        let other = (readers.other.as_ref())
            .ok_or_else(|| MigrateError::Source("no source store".into()))?;
        return store::copy(fs, other, &item.path, opts, throttle).await;
    }
    let Origin::File {
        version,
        file,
        encoding,
        expected,
    } = &item.origin
    else {
        let old =
            (readers.old.as_ref()).ok_or_else(|| MigrateError::Source("no old server".into()))?;
        let imported = old
            .import(
                fs,
                &item.path,
                INGEST,
                throttle.map(|t| &**t),
                opts.dry_run,
                opts.now,
            )
            .await?;
        return match imported {
            Imported::Stored { bytes, .. } => Ok(Done::Migrated(bytes)),
            Imported::Present => Ok(Done::Skipped),
            Imported::Deleted => Ok(Done::KeptDeleted),
            Imported::Missing => Err(MigrateError::Vanished),
        };
    };
    let path = item.path.as_str();
    if let Some(done) = settled(fs, path, *version).await? {
        return Ok(done);
    }
    // A dry run reads and verifies the file too (it is spooled, then dropped), so it
    // predicts the failures of the real run.
    let f = std::fs::File::open(file).map_err(|source| MigrateError::Read {
        path: file.clone(),
        source,
    })?;
    let hints = Hints {
        sha256: *expected,
        logical_size: None,
    };
    let (fs2, encoding, throttle) = (fs.clone(), *encoding, throttle.cloned());
    let spooled = tokio::task::spawn_blocking(move || {
        let read = crate::throttle::ThrottledRead {
            inner: f,
            throttle: throttle.as_deref(),
        };
        fs2.spool_blocking(
            std::io::BufReader::with_capacity(256 * 1024, read),
            encoding,
            &hints,
            &INGEST,
        )
    })
    .await
    .map_err(|e| MigrateError::Task(e.to_string()))??;
    let bytes = spooled.info.logical_size;
    if opts.dry_run {
        return Ok(Done::Migrated(bytes));
    }
    let committed = fs
        .commit(path, *version, spooled, opts.now, PutKind::Import)
        .await?;
    Ok(Done::of(committed.outcome, bytes))
}

/// What `Done` an import of `path` at `version` is, before any work: skipped when ours is at
/// least as new or the path was deleted here since.
async fn settled(
    fs: &FileStore, path: &str, version: Version,
) -> Result<Option<Done>, MigrateError> {
    let stored = fs.stat(path).await?.map(|e| e.version);
    if stored.is_some_and(|s| s >= version) {
        return Ok(Some(Done::Skipped));
    }
    if stored.is_none()
        && let Some(at) = fs.deleted_version(path).await?
        && at >= version
    {
        return Ok(Some(Done::KeptDeleted));
    }
    Ok(None)
}

async fn adopt(
    fs: &FileStore, path: &FilePath, version: Version, digest: &crate::blob::Digest,
    opts: &RunOptions,
) -> Result<Done, MigrateError> {
    if let Some(done) = settled(fs, path.as_str(), version).await? {
        return Ok(done);
    }
    if opts.dry_run {
        return Ok(Done::Migrated(0));
    }
    let committed = fs.adopt(path.as_str(), version, digest, opts.now).await?;
    // Nothing was copied: no bytes moved.
    Ok(Done::of(committed.outcome, 0))
}

/// True for sources read in a fixed order, so a checkpoint can say how far a run got.
fn ordered(source: &Source) -> bool {
    !matches!(source, Source::Http(_))
}

/// The name a source's checkpoint is kept under: the same directory however it was spelled.
fn checkpoint_key(source: &Source) -> String {
    match source {
        Source::V1Dir(d) => Source::V1Dir(canonical(d)).to_string(),
        Source::V2Dir(d) => Source::V2Dir(canonical(d)).to_string(),
        Source::Store(f) => Source::Store(canonical(f)).to_string(),
        Source::Http(_) | Source::Upstream { .. } => source.to_string(),
    }
}

fn canonical(dir: &Path) -> PathBuf {
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned())
}

/// Starts the walk or listing of `source`, feeding a bounded channel (memory stays flat).
fn produce(
    source: &Source, readers: &Readers, resume: Option<String>,
) -> tokio::sync::mpsc::Receiver<Work> {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    match (source, readers.old.clone()) {
        (Source::V1Dir(_) | Source::V2Dir(_), _) => {
            let v2 = matches!(source, Source::V2Dir(_));
            let root = source.walk_root().unwrap_or_default();
            tokio::task::spawn_blocking(move || walk_dir(&root, v2, resume, tx));
        }
        (Source::Upstream { bucket, db }, _) => {
            let (bucket, db) = (bucket.clone(), db.clone());
            tokio::spawn(async move { read_upstream(&bucket, &db, resume, tx).await });
        }
        (Source::Http(_), Some(old)) => {
            tokio::spawn(async move { list_old_server(&old, tx).await });
        }
        (Source::Http(_), None) => {}
        (Source::Store(_), _) => {
            if let Some(other) = readers.other.clone() {
                tokio::spawn(store::list(other, resume, tx));
            }
        }
    }
    rx
}

/// A directory source (`files/` or `links/` under `root`), walked in a fixed order from the
/// position after `resume`. Blocking.
fn walk_dir(root: &Path, v2: bool, resume: Option<String>, tx: tokio::sync::mpsc::Sender<Work>) {
    let resume = resume.as_deref().map(walk::parse_position);
    walk::walk(root, resume.as_deref(), &mut |found| {
        let item = found
            .entry
            .map_err(|(file, why)| (file, MigrateError::Source(why)))
            .and_then(|(path, meta)| describe(root, &path, &meta, v2));
        let work = Work {
            position: Some(found.position),
            item,
        };
        tx.blocking_send(work).is_ok()
    });
}

/// An upstream deployment's metadata, its paths in order, from the one after `resume`.
async fn read_upstream(
    bucket: &str, db: &UpstreamDb, resume: Option<String>, tx: tokio::sync::mpsc::Sender<Work>,
) {
    let fail = |why: String| Work {
        position: None,
        item: Err((
            format!("upstream metadata {db}"),
            MigrateError::Upstream {
                db: db.to_string(),
                why,
            },
        )),
    };
    let reader = match upstream::Reader::open(db).await {
        Ok(r) => r,
        Err(e) => {
            let _ = tx.send(fail(e)).await;
            return;
        }
    };
    let mut after = resume.unwrap_or_default();
    loop {
        let page = match reader.page(bucket, &after, 1000).await {
            Ok(p) if p.is_empty() => return,
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(fail(e)).await;
                return;
            }
        };
        for row in page {
            let work = Work {
                position: Some(row.path.clone()),
                item: adopted(&row).map_err(|why| (row.path.clone(), MigrateError::Source(why))),
            };
            if tx.send(work).await.is_err() {
                return;
            }
            after = row.path;
        }
    }
}

/// What an upstream row asks for: its path, adopted at its version and digest.
fn adopted(row: &upstream::Row) -> Result<Item, String> {
    let path = FilePath::parse(&format!("/{}", row.path), protocol::DEFAULT_MAX_PATH_LEN)
        .map_err(|e| e.to_string())?;
    let digest = row
        .hash
        .parse()
        .map_err(|e| format!("hash {:?}: {e}", row.hash))?;
    Ok(Item {
        path,
        origin: Origin::Adopt {
            version: row.version,
            digest,
        },
    })
}

/// A running old server's listing (no fixed order, so no positions).
async fn list_old_server(old: &OldServer, tx: tokio::sync::mpsc::Sender<Work>) {
    let (names_tx, mut names) = tokio::sync::mpsc::channel(1024);
    let listing = old.list(names_tx);
    let forward = async {
        while let Some(name) = names.recv().await {
            let item = match name {
                Ok(name) => FilePath::parse(&name, protocol::DEFAULT_MAX_PATH_LEN)
                    .map(|path| Item {
                        path,
                        origin: Origin::Http,
                    })
                    .map_err(|e| (name, MigrateError::Source(e.to_string()))),
                Err(e) => Err((format!("{}/list/", old.base()), e.into())),
            };
            let work = Work {
                position: None,
                item,
            };
            if tx.send(work).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(listing, forward);
}

/// How many files a run of `source` will look at (for a progress bar's ETA): a walk or listing
/// of its own, after the checkpoint if there is one.
pub async fn count_files(fs: &FileStore, source: &Source, http_timeout: Duration) -> u64 {
    let Ok(readers) = Readers::open(fs, source, http_timeout).await else {
        return 0;
    };
    let resume = if ordered(source) {
        let key = checkpoint_key(source);
        fs.checkpoint(&key).await.ok().flatten()
    } else {
        None
    };
    let mut rx = produce(source, &readers, resume);
    let mut n = 0;
    while rx.recv().await.is_some() {
        n += 1;
    }
    n
}

/// Reads a path-ordered list of `(path, version)` page by page (`fetch` gives the page after a
/// path), handing each page to `each` with the report, until an empty page. A page that cannot
/// be read is reported under `what` and ends the pass.
async fn each_page(
    what: &str, report: &mut MigrateReport,
    fetch: impl AsyncFn(&str) -> Result<Vec<(String, Version)>, MigrateError>,
    mut each: impl AsyncFnMut(Vec<(String, Version)>, &mut MigrateReport),
) {
    let mut after = String::new();
    loop {
        let page = match fetch(&after).await {
            Ok(page) => page,
            Err(why) => {
                tracing::warn!(error = %why, "cannot read {what}");
                report.failed.push((what.to_owned(), why.to_string()));
                return;
            }
        };
        let Some((last, _)) = page.last() else {
            return;
        };
        after = last.clone();
        each(page, report).await;
    }
}

/// Records how far the run got, when that moved since the last time.
async fn save_checkpoint(
    fs: &FileStore, key: &str, in_order: &checkpoint::InOrder, saved: &mut Option<String>, now: i64,
) {
    let Some(p) = in_order.position() else {
        return;
    };
    if saved.as_deref() == Some(p) {
        return;
    }
    match fs.set_checkpoint(key, Some(p), now).await {
        Ok(()) => *saved = Some(p.to_owned()),
        Err(e) => tracing::warn!(error = %e, position = p, "cannot record the checkpoint"),
    }
}

/// How often an unfinished run records its position.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// Imports everything from `source`, `jobs` files at a time. Failures of single files are
/// collected, not fatal; `progress` sees the report after every file. Only a metadata store that
/// cannot say where an interrupted run stopped ends the run. When `stop` completes, the files in
/// flight are abandoned (their spool files go with them), the checkpoint is kept where the run
/// got to, and the report says it stopped.
pub async fn run(
    fs: Arc<FileStore>, source: &Source, opts: RunOptions,
    progress: &(dyn Fn(&MigrateReport) + Sync), stop: impl Future<Output = ()>,
) -> Result<MigrateReport, MigrateError> {
    let readers = Readers::open(&fs, source, opts.http_timeout).await?;
    let key = checkpoint_key(source);
    let checkpoints = ordered(source) && !opts.dry_run;
    let resume = if checkpoints {
        fs.checkpoint(&key).await?
    } else {
        None
    };
    if let Some(pos) = &resume {
        tracing::info!(source = %source, after = pos, "resuming an interrupted run of {source} after {pos}");
    }
    let mut report = MigrateReport {
        resumed_after: resume.clone(),
        ..MigrateReport::default()
    };
    let rx = produce(source, &readers, resume);
    let throttle = Throttle::new(opts.max_bytes_per_sec).map(Arc::new);
    let work =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|w| (w, rx)) });
    // Each import is a task of its own: were they polled only by this loop, one that was
    // granted the metadata writer while the loop awaits the checkpoint write would never run
    // (a deadlock). They finish in any order, so a large file does not hold up the ones after it.
    let results = work
        .enumerate()
        .map(|(seq, w)| {
            let (fs, readers, throttle) = (fs.clone(), readers.clone(), throttle.clone());
            let Work { position, item } = w;
            let shown = match &item {
                Ok(item) => item.shown(),
                Err((file, _)) => file.clone(),
            };
            let task = tokio::spawn(async move {
                match item {
                    Ok(item) => import(&fs, &readers, &item, &opts, throttle.as_ref()).await,
                    Err((_, why)) => Err(why),
                }
            });
            async move {
                let result = task
                    .await
                    .unwrap_or_else(|e| Err(MigrateError::Task(e.to_string())));
                (seq as u64, result, shown, position)
            }
        })
        .buffer_unordered(opts.jobs.max(1));
    let mut results = std::pin::pin!(results);
    let mut in_order = checkpoint::InOrder::default();
    let mut saved: Option<String> = None;
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    let mut stop = std::pin::pin!(stop);
    loop {
        let next = tokio::select! {
            next = results.next() => next,
            _ = tick.tick() => {
                if checkpoints {
                    save_checkpoint(&fs, &key, &in_order, &mut saved, opts.now).await;
                }
                continue;
            }
            () = &mut stop => {
                report.stopped = true;
                break;
            }
        };
        let Some((seq, result, file, pos)) = next else {
            break;
        };
        in_order.finished(seq, result.is_err(), pos);
        match result {
            Ok(Done::Migrated(bytes)) => {
                report.migrated += 1;
                report.bytes += bytes;
            }
            Ok(Done::Skipped) => report.skipped += 1,
            Ok(Done::KeptDeleted) => report.kept_deleted += 1,
            Err(why) => {
                tracing::warn!(file, error = %why, "not migrated: {file}: {why}");
                report.failed.push((file, why.to_string()));
            }
        }
        progress(&report);
    }
    if let Some(other) = &readers.other
        && !report.stopped
    {
        store::carry_deletions(&fs, other, &opts, &mut report).await;
    }
    if !report.stopped {
        gone::check(&fs, source, readers.old.as_ref(), &opts, &mut report).await;
    }
    if checkpoints {
        match (report.stopped, in_order.position()) {
            // Stopped: the next run goes on from here (or from where this one started).
            (true, Some(p)) => fs.set_checkpoint(&key, Some(p), opts.now).await?,
            (true, None) => {}
            // Finished: the next run walks everything again (and copies only what is new).
            (false, _) => fs.set_checkpoint(&key, None, opts.now).await?,
        }
    }
    Ok(report)
}
