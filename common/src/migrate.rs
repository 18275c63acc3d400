//! Importing an existing Filetracker store: walking its files (streamed, so memory does not grow
//! with their number), verifying each content and committing it through the file store with
//! its original version. Idempotent: a path already stored at the same or a newer version is
//! left alone, so a re-run (or a run after a kill) copies only what is missing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;

use crate::blob::{Encoding, Hints, IngestOptions};
use crate::filestore::{FileStore, FileStoreError};
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
        match s.split_once(':') {
            Some(("v1", dir)) if !dir.is_empty() => Ok(Source::V1Dir(dir.into())),
            Some(("v2", dir)) if !dir.is_empty() => Ok(Source::V2Dir(dir.into())),
            _ => Err(format!(
                "unknown source {s:?}: expected v1:DIR, v2:DIR or http://HOST:PORT"
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
    /// Version and content come from the server, file by file.
    Http { base: String },
}

impl Item {
    fn shown(&self) -> String {
        match &self.origin {
            Origin::File { file, .. } => format!("{} ({})", self.path, file.display()),
            Origin::Http { .. } => self.path.to_string(),
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
    /// `(source file, why)`: reported, skipped, the run goes on.
    pub failed: Vec<(String, String)>,
}

impl MigrateReport {
    /// One line for logs and systemd's `STATUS=`.
    pub fn summary(&self) -> String {
        format!(
            "{} files migrated ({} bytes), {} already present, {} failed",
            self.migrated,
            self.bytes,
            self.skipped,
            self.failed.len()
        )
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

/// Walks `root` depth-first, sending items through a bounded channel (memory stays flat).
fn walk(source: &Source, tx: &tokio::sync::mpsc::Sender<Result<Item, (String, String)>>) {
    let (root, v2) = match source {
        Source::V1Dir(d) => (d.join("files"), false),
        Source::V2Dir(d) => (d.join("links"), true),
        Source::Http(_) => return,
    };
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                let _ = tx.blocking_send(Err((dir.display().to_string(), e.to_string())));
                continue;
            }
        };
        for entry in entries.flatten() {
            let p = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(p);
                continue;
            }
            let item = describe(&root, &p, &meta, v2);
            if tx.blocking_send(item).is_err() {
                return;
            }
        }
    }
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
}

const INGEST: IngestOptions = IngestOptions {
    level: 6,
    max_logical_size: u64::MAX,
};

async fn import(
    fs: &Arc<FileStore>,
    http: &reqwest::Client,
    item: &Item,
    dry_run: bool,
    now: i64,
) -> Result<Done, String> {
    let current = fs
        .stat(item.path.as_str())
        .await
        .map_err(|e| e.to_string())?;
    let stored = current.map(|c| c.version);
    match &item.origin {
        Origin::File {
            version,
            file,
            encoding,
            expected,
        } => {
            if stored.is_some_and(|s| s >= *version) {
                return Ok(Done::Skipped);
            }
            if dry_run {
                return Ok(Done::Migrated(0));
            }
            let f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
            let hints = Hints {
                sha256: *expected,
                logical_size: None,
            };
            let (fs2, encoding) = (fs.clone(), *encoding);
            let spooled = tokio::task::spawn_blocking(move || {
                fs2.spool_blocking(std::io::BufReader::new(f), encoding, &hints, &INGEST)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            commit(fs, &item.path, *version, spooled, now).await
        }
        Origin::Http { base } => {
            import_http(fs, http, base, &item.path, stored, dry_run, now).await
        }
    }
}

async fn commit(
    fs: &FileStore,
    path: &FilePath,
    version: Version,
    spooled: crate::filestore::Spooled,
    now: i64,
) -> Result<Done, String> {
    let size = spooled.info.logical_size;
    fs.commit(path.as_str(), version, spooled, now)
        .await
        .map_err(|e: FileStoreError| e.to_string())?;
    Ok(Done::Migrated(size))
}

fn file_url(base: &str, path: &FilePath) -> String {
    const SAFE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'/')
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    format!(
        "{base}/files{}",
        percent_encoding::utf8_percent_encode(path.as_str(), SAFE)
    )
}

fn version_of(r: &reqwest::Response) -> Result<Version, String> {
    let h = r
        .headers()
        .get(reqwest::header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .ok_or("no Last-Modified header")?;
    crate::protocol::parse_version(h).map_err(|e| e.to_string())
}

/// HEAD first, so a path already stored at that version is skipped without a download.
async fn import_http(
    fs: &Arc<FileStore>,
    http: &reqwest::Client,
    base: &str,
    path: &FilePath,
    stored: Option<Version>,
    dry_run: bool,
    now: i64,
) -> Result<Done, String> {
    let url = file_url(base, path);
    let head = http
        .head(&url)
        .send()
        .await
        .map_err(|e| format!("HEAD {url}: {e}"))?;
    if !head.status().is_success() {
        return Err(format!("HEAD {url}: {}", head.status()));
    }
    if stored.is_some_and(|s| version_of(&head).is_ok_and(|v| s >= v)) {
        return Ok(Done::Skipped);
    }
    if dry_run {
        return Ok(Done::Migrated(0));
    }
    let r = http
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("GET {url}: {}", r.status()));
    }
    let version = version_of(&r)?;
    if stored.is_some_and(|s| s >= version) {
        return Ok(Done::Skipped);
    }
    let gzip = r
        .headers()
        .get(reqwest::header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let logical_size = r
        .headers()
        .get(crate::protocol::HEADER_LOGICAL_SIZE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let encoding = if gzip {
        Encoding::Gzip
    } else {
        Encoding::Identity
    };
    let hints = Hints {
        sha256: None,
        logical_size: if gzip { logical_size } else { None },
    };
    let spooled = fs
        .spool_stream(r.bytes_stream(), encoding, hints, INGEST)
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    commit(fs, path, version, spooled, now).await
}

/// Streams `GET <base>/list/` into items, line by line (memory stays flat).
async fn list_http(
    http: reqwest::Client,
    base: String,
    tx: tokio::sync::mpsc::Sender<Result<Item, (String, String)>>,
) {
    let url = format!("{base}/list/");
    let fail = |why: String| (url.clone(), why);
    let r = match http.get(&url).send().await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            let _ = tx.send(Err(fail(format!("listing: {}", r.status())))).await;
            return;
        }
        Err(e) => {
            let _ = tx.send(Err(fail(format!("listing: {e}")))).await;
            return;
        }
    };
    let mut body = r.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let chunk = match body.next().await {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                let _ = tx.send(Err(fail(format!("listing cut off: {e}")))).await;
                return;
            }
            None => break,
        };
        pending.extend_from_slice(&chunk);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            // The old server lists its on-disk names, double-encoded like its links/ directory.
            let line = decode_v2_name(&String::from_utf8_lossy(&line[..line.len() - 1]));
            if line.is_empty() {
                continue;
            }
            let item = FilePath::parse(&line, crate::protocol::DEFAULT_MAX_PATH_LEN)
                .map(|path| Item {
                    path,
                    origin: Origin::Http { base: base.clone() },
                })
                .map_err(|e| (line.clone(), e.to_string()));
            if tx.send(item).await.is_err() {
                return;
            }
        }
    }
}

/// Imports everything from `source`, `jobs` files at a time. Failures are collected, not fatal.
pub async fn run(
    fs: Arc<FileStore>,
    source: &Source,
    jobs: usize,
    dry_run: bool,
    now: i64,
    progress: &(dyn Fn(&MigrateReport) + Sync),
) -> MigrateReport {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let http = reqwest::Client::new();
    let walker = match source {
        Source::Http(base) => tokio::spawn(list_http(http.clone(), base.clone(), tx)),
        _ => {
            let src = source.clone();
            tokio::task::spawn_blocking(move || walk(&src, &tx))
        }
    };
    let items =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|i| (i, rx)) });
    let results = items
        .map(|item| {
            let (fs, http) = (fs.clone(), http.clone());
            async move {
                match item {
                    Ok(item) => (import(&fs, &http, &item, dry_run, now).await, item.shown()),
                    Err((file, why)) => (Err(why), file),
                }
            }
        })
        .buffer_unordered(jobs.max(1));
    let mut results = std::pin::pin!(results);
    let mut report = MigrateReport::default();
    let mut n = 0u64;
    while let Some((result, file)) = results.next().await {
        match result {
            Ok(Done::Migrated(bytes)) => {
                report.migrated += 1;
                report.bytes += bytes;
            }
            Ok(Done::Skipped) => report.skipped += 1,
            Err(why) => {
                tracing::warn!(file, error = why, "not migrated");
                report.failed.push((file, why));
            }
        }
        n += 1;
        if n.is_multiple_of(1000) {
            progress(&report);
        }
    }
    let _ = walker.await;
    progress(&report);
    report
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
    }
}
