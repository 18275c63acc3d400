//! Importing an existing Filetracker store: walking its files (streamed, so memory does not grow
//! with their number), verifying each content and committing it through the file store with
//! its original version. Idempotent: a path already stored at the same or a newer version is
//! left alone, and a path deleted here is not brought back. A directory walk has a fixed order
//! and records how far it got in the metadata store, so a killed run resumes from there.

mod old_server;
mod throttle;
mod upstream;
mod walk;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

pub use old_server::{Imported, OldServer, OldServerError};
pub use throttle::Throttle;
pub use upstream::UpstreamDb;

use crate::blob::{Encoding, Hints, IngestOptions};
use crate::filestore::FileStore;
use crate::meta::{MetaError, PutOutcome};
use crate::protocol::{FilePath, Version};

/// Where files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Filetracker v1: `DIR/files/<path>` plain files, mtime = version.
    V1Dir(PathBuf),
    /// Filetracker v2 (`filetracker-server -d DIR`): `DIR/links/<path>` symlinks (their own
    /// mtime = version) to gzip blobs `DIR/blobs/<aa>/<sha256>`.
    V2Dir(PathBuf),
    /// A running Filetracker v2 server (its root URL): `GET /list/`, then each file.
    Http(String),
    /// An upstream s3dedup deployment's bucket, adopted in place: `upstream:BUCKET:sqlite:PATH`
    /// or `upstream:BUCKET:postgres://…`. The store must be configured with the same bucket.
    Upstream { bucket: String, db: UpstreamDb },
}

impl std::str::FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.starts_with("http://") {
            return Ok(Source::Http(s.trim_end_matches('/').to_owned()));
        }
        if s.starts_with("https://") {
            return Err(
                "https sources are not supported: use the old server's http address".into(),
            );
        }
        if let Some(rest) = s.strip_prefix("upstream:") {
            let bad = || {
                format!(
                    "bad upstream source {:?}: expected upstream:BUCKET:sqlite:PATH or \
                     upstream:BUCKET:postgres://USER@HOST/DB",
                    upstream::redact(s)
                )
            };
            let (bucket, db) = rest.split_once(':').ok_or_else(bad)?;
            if !upstream::valid_bucket(bucket) {
                return Err(bad());
            }
            let db = match db.split_once(':') {
                Some(("sqlite", path)) if !path.is_empty() => UpstreamDb::Sqlite(path.into()),
                Some(("postgres" | "postgresql", _)) => UpstreamDb::Postgres(db.to_owned()),
                _ => return Err(bad()),
            };
            return Ok(Source::Upstream {
                bucket: bucket.to_owned(),
                db,
            });
        }
        match s.split_once(':') {
            Some(("v1", dir)) if !dir.is_empty() => Ok(Source::V1Dir(dir.into())),
            Some(("v2", dir)) if !dir.is_empty() => Ok(Source::V2Dir(dir.into())),
            _ => Err(format!(
                "unknown source {s:?}: expected v1:DIR, v2:DIR, http://HOST:PORT or \
                 upstream:BUCKET:sqlite:PATH / upstream:BUCKET:postgres://…"
            )),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::V1Dir(d) => write!(f, "v1:{}", d.display()),
            Source::V2Dir(d) => write!(f, "v2:{}", d.display()),
            Source::Http(u) => f.write_str(u),
            Source::Upstream { bucket, db } => write!(f, "upstream:{bucket}:{db}"),
        }
    }
}

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
            Origin::Http | Origin::Adopt { .. } => self.path.to_string(),
        }
    }
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
    /// The checkpoint of an interrupted run this one started after.
    pub resumed_after: Option<String>,
    /// `(source file, why)`: reported, skipped, the run goes on.
    pub failed: Vec<(String, String)>,
}

impl MigrateReport {
    /// One line for logs and systemd's `STATUS=`.
    pub fn summary(&self) -> String {
        format!(
            "{} files migrated ({} bytes), {} already present, {} deleted here, {} failed",
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

/// Undoes Filetracker v2's double encoding of non-ASCII names (UTF-8 bytes read as Latin-1 and
/// encoded as UTF-8 again); names that are not double-encoded come back unchanged.
pub fn decode_v2_name(name: &str) -> String {
    if name.is_ascii() {
        return name.to_owned();
    }
    let bytes: Option<Vec<u8>> = name
        .chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect();
    bytes
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_else(|| name.to_owned())
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
    item: Result<Item, (String, String)>,
}

fn describe(
    root: &Path,
    p: &Path,
    meta: &std::fs::Metadata,
    v2: bool,
) -> Result<Item, (String, String)> {
    let shown = p.display().to_string();
    let fail = |why: String| Err((shown.clone(), why));
    let Ok(rel) = p.strip_prefix(root) else {
        return fail("outside the source".into());
    };
    let Some(rel) = rel.to_str() else {
        return fail("name is not UTF-8".into());
    };
    let rel = if v2 {
        decode_v2_name(rel)
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

async fn import(
    fs: &Arc<FileStore>,
    old: Option<&OldServer>,
    item: &Item,
    opts: &RunOptions,
    throttle: Option<&Arc<Throttle>>,
) -> Result<Done, String> {
    if let Origin::Adopt { version, digest } = &item.origin {
        return adopt(fs, &item.path, *version, digest, opts).await;
    }
    let Origin::File {
        version,
        file,
        encoding,
        expected,
    } = &item.origin
    else {
        let old = old.ok_or("no old server")?;
        let imported = old
            .import(
                fs,
                &item.path,
                INGEST,
                throttle.map(|t| &**t),
                opts.dry_run,
                opts.now,
            )
            .await
            .map_err(|e| e.to_string())?;
        return match imported {
            Imported::Stored { bytes, .. } => Ok(Done::Migrated(bytes)),
            Imported::Present => Ok(Done::Skipped),
            Imported::Deleted => Ok(Done::KeptDeleted),
            Imported::Missing => Err("listed by the old server, but gone from it".into()),
        };
    };
    let path = item.path.as_str();
    if let Some(done) = settled(fs, path, *version).await? {
        return Ok(done);
    }
    if opts.dry_run {
        return Ok(Done::Migrated(0));
    }
    let f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let hints = Hints {
        sha256: *expected,
        logical_size: None,
    };
    let (fs2, encoding, throttle) = (fs.clone(), *encoding, throttle.cloned());
    let spooled = tokio::task::spawn_blocking(move || {
        let read = throttle::ThrottledRead {
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
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let bytes = spooled.info.logical_size;
    let committed = fs
        .import(path, *version, spooled, opts.now)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Done::of(committed.outcome, bytes))
}

/// What `Done` an import of `path` at `version` is, before any work: skipped when ours is at
/// least as new or the path was deleted here since.
async fn settled(fs: &FileStore, path: &str, version: Version) -> Result<Option<Done>, String> {
    let stored = fs
        .stat(path)
        .await
        .map_err(|e| e.to_string())?
        .map(|e| e.version);
    if stored.is_some_and(|s| s >= version) {
        return Ok(Some(Done::Skipped));
    }
    if stored.is_none()
        && let Some(at) = fs
            .meta
            .deleted_version(path)
            .await
            .map_err(|e| e.to_string())?
        && at >= version
    {
        return Ok(Some(Done::KeptDeleted));
    }
    Ok(None)
}

async fn adopt(
    fs: &FileStore,
    path: &FilePath,
    version: Version,
    digest: &crate::blob::Digest,
    opts: &RunOptions,
) -> Result<Done, String> {
    if let Some(done) = settled(fs, path.as_str(), version).await? {
        return Ok(done);
    }
    if opts.dry_run {
        return Ok(Done::Migrated(0));
    }
    let committed = fs
        .adopt(path.as_str(), version, digest, opts.now)
        .await
        .map_err(|e| e.to_string())?;
    // Nothing was copied: no bytes moved.
    Ok(Done::of(committed.outcome, 0))
}

impl Source {
    /// For directory sources, the directory the walk starts in (`files/` or `links/`).
    pub fn walk_root(&self) -> Option<PathBuf> {
        match self {
            Source::V1Dir(d) => Some(d.join("files")),
            Source::V2Dir(d) => Some(d.join("links")),
            Source::Http(_) | Source::Upstream { .. } => None,
        }
    }
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
        Source::Http(_) | Source::Upstream { .. } => source.to_string(),
    }
}

fn canonical(dir: &Path) -> PathBuf {
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned())
}

/// Starts the walk or listing, feeding a bounded channel (memory stays flat).
fn produce(
    source: &Source,
    old: Option<OldServer>,
    resume: Option<String>,
) -> tokio::sync::mpsc::Receiver<Work> {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    if let Some(root) = source.walk_root() {
        let v2 = matches!(source, Source::V2Dir(_));
        tokio::task::spawn_blocking(move || {
            let resume = resume.as_deref().map(walk::parse_position);
            walk::walk(&root, resume.as_deref(), &mut |found| {
                let item = found
                    .entry
                    .and_then(|(path, meta)| describe(&root, &path, &meta, v2));
                let work = Work {
                    position: Some(found.position),
                    item,
                };
                tx.blocking_send(work).is_ok()
            });
        });
    } else if let Source::Upstream { bucket, db } = source {
        let (bucket, db) = (bucket.clone(), db.clone());
        tokio::spawn(async move {
            let fail = |why: String| Work {
                position: None,
                item: Err((format!("upstream metadata {db}"), why)),
            };
            let reader = match upstream::Reader::open(&db).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(fail(e)).await;
                    return;
                }
            };
            let mut after = resume.unwrap_or_default();
            loop {
                let page = match reader.page(&bucket, &after, 1000).await {
                    Ok(p) if p.is_empty() => return,
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(fail(e)).await;
                        return;
                    }
                };
                for row in page {
                    let item = FilePath::parse(
                        &format!("/{}", row.path),
                        crate::protocol::DEFAULT_MAX_PATH_LEN,
                    )
                    .map_err(|e| e.to_string())
                    .and_then(|path| {
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
                    })
                    .map_err(|why| (row.path.clone(), why));
                    let work = Work {
                        position: Some(row.path.clone()),
                        item,
                    };
                    if tx.send(work).await.is_err() {
                        return;
                    }
                    after = row.path;
                }
            }
        });
    } else if let Some(old) = old {
        tokio::spawn(async move { old.list(tx).await });
    }
    rx
}

/// How many files a run of `source` will look at (for a progress bar's ETA): a walk or listing
/// of its own, after the checkpoint if there is one.
pub async fn count_files(fs: &FileStore, source: &Source, http_timeout: Duration) -> u64 {
    let old = match source {
        Source::Http(u) => OldServer::new(u, http_timeout).ok(),
        _ => None,
    };
    let resume = if ordered(source) {
        let key = checkpoint_key(source);
        fs.meta.checkpoint(&key).await.ok().flatten()
    } else {
        None
    };
    let mut rx = produce(source, old, resume);
    let mut n = 0;
    while rx.recv().await.is_some() {
        n += 1;
    }
    n
}

/// How often an unfinished run records its position.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// Imports everything from `source`, `jobs` files at a time. Failures of single files are
/// collected, not fatal; `progress` sees the report after every file. Only a metadata store that
/// cannot say where an interrupted run stopped ends the run.
pub async fn run(
    fs: Arc<FileStore>,
    source: &Source,
    opts: RunOptions,
    progress: &(dyn Fn(&MigrateReport) + Sync),
) -> Result<MigrateReport, MetaError> {
    let old = match source {
        Source::Http(u) => Some(OldServer::new(u, opts.http_timeout).map_err(MetaError::Database)?),
        _ => None,
    };
    let key = checkpoint_key(source);
    let checkpoints = ordered(source) && !opts.dry_run;
    let resume = if checkpoints {
        fs.meta.checkpoint(&key).await?
    } else {
        None
    };
    if let Some(pos) = &resume {
        tracing::info!(source = %source, after = pos, "resuming an interrupted run");
    }
    let mut report = MigrateReport {
        resumed_after: resume.clone(),
        ..MigrateReport::default()
    };
    let rx = produce(source, old.clone(), resume);
    let throttle = Throttle::new(opts.max_bytes_per_sec).map(Arc::new);
    let work =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|w| (w, rx)) });
    // In order, so everything before a finished position is finished too. Each import is a
    // task of its own: were they polled only by this loop, one that was granted the metadata
    // writer while the loop awaits the checkpoint write would never run (a deadlock).
    let results = work
        .map(|w| {
            let (fs, old, throttle) = (fs.clone(), old.clone(), throttle.clone());
            let Work { position, item } = w;
            let shown = match &item {
                Ok(item) => item.shown(),
                Err((file, _)) => file.clone(),
            };
            let task = tokio::spawn(async move {
                match &item {
                    Ok(item) => import(&fs, old.as_ref(), item, &opts, throttle.as_ref()).await,
                    Err((_, why)) => Err(why.clone()),
                }
            });
            async move {
                let result = task
                    .await
                    .unwrap_or_else(|e| Err(format!("import task: {e}")));
                (result, shown, position)
            }
        })
        .buffered(opts.jobs.max(1));
    let mut results = std::pin::pin!(results);
    let mut saved = Instant::now();
    let mut position = None;
    while let Some((result, file, pos)) = results.next().await {
        match result {
            Ok(Done::Migrated(bytes)) => {
                report.migrated += 1;
                report.bytes += bytes;
            }
            Ok(Done::Skipped) => report.skipped += 1,
            Ok(Done::KeptDeleted) => report.kept_deleted += 1,
            Err(why) => {
                tracing::warn!(file, error = why, "not migrated");
                report.failed.push((file, why));
            }
        }
        position = pos.or(position);
        if checkpoints && saved.elapsed() >= CHECKPOINT_EVERY {
            saved = Instant::now();
            if let Some(p) = &position
                && let Err(e) = fs.meta.set_checkpoint(&key, Some(p), opts.now).await
            {
                tracing::warn!(error = %e, "cannot record the checkpoint");
            }
        }
        progress(&report);
    }
    if checkpoints {
        // Finished: the next run walks everything again (and copies only what is new).
        fs.meta.set_checkpoint(&key, None, opts.now).await?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn double_encoded_names_are_decoded() {
        let name = "zażółć/gęś.txt";
        let double: String = name.bytes().map(char::from).collect();
        assert_ne!(double, name);
        assert_eq!(decode_v2_name(&double), name);
        assert_eq!(decode_v2_name("plain/a b.txt"), "plain/a b.txt");
        // Not double-encoded (a char above U+00FF): unchanged.
        assert_eq!(decode_v2_name("✓.txt"), "✓.txt");
    }

    #[test]
    fn sources_parse() {
        assert_eq!("v1:/srv/ft".parse(), Ok(Source::V1Dir("/srv/ft".into())));
        assert_eq!("v2:/srv/ft".parse(), Ok(Source::V2Dir("/srv/ft".into())));
        assert!("v3:/x".parse::<Source>().is_err());
        assert!("v1:".parse::<Source>().is_err());
        assert_eq!(
            "http://127.0.0.1:9999/".parse(),
            Ok(Source::Http("http://127.0.0.1:9999".into()))
        );
        assert!("https://x".parse::<Source>().is_err());
        assert_eq!(
            "upstream:files:sqlite:/var/lib/s3dedup/db.sqlite".parse(),
            Ok(Source::Upstream {
                bucket: "files".into(),
                db: UpstreamDb::Sqlite("/var/lib/s3dedup/db.sqlite".into())
            })
        );
        let pg: Source = "upstream:my-files:postgres://ft:secret@db/ft"
            .parse()
            .unwrap();
        assert_eq!(pg.to_string(), "upstream:my-files:postgres://ft@db/ft");
        assert!("upstream:bad\"name:sqlite:/x".parse::<Source>().is_err());
        assert!("upstream:files:mysql://x".parse::<Source>().is_err());
    }
}
