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
}

impl std::str::FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("v1", dir)) if !dir.is_empty() => Ok(Source::V1Dir(dir.into())),
            Some(("v2", dir)) if !dir.is_empty() => Ok(Source::V2Dir(dir.into())),
            _ => Err(format!("unknown source {s:?}: expected v1:DIR or v2:DIR")),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::V1Dir(d) => write!(f, "v1:{}", d.display()),
            Source::V2Dir(d) => write!(f, "v2:{}", d.display()),
        }
    }
}

/// One file found in the source.
#[derive(Debug, Clone)]
struct Item {
    path: FilePath,
    version: Version,
    file: PathBuf,
    encoding: Encoding,
    /// v2 blobs are named by their digest: what the content must hash to.
    expected: Option<crate::blob::Digest>,
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
            version: mtime(meta),
            file: p.to_owned(),
            encoding: Encoding::Identity,
            expected: None,
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
        // The symlink's own mtime is the version (lstat, not the blob's).
        version: mtime(meta),
        file: target,
        encoding: Encoding::Gzip,
        expected,
    })
}

enum Done {
    Migrated(u64),
    Skipped,
}

async fn import(fs: &Arc<FileStore>, item: &Item, dry_run: bool, now: i64) -> Result<Done, String> {
    let current = fs
        .stat(item.path.as_str())
        .await
        .map_err(|e| e.to_string())?;
    if current.is_some_and(|c| c.version >= item.version) {
        return Ok(Done::Skipped);
    }
    if dry_run {
        return Ok(Done::Migrated(0));
    }
    let file =
        std::fs::File::open(&item.file).map_err(|e| format!("{}: {e}", item.file.display()))?;
    let (encoding, expected) = (item.encoding, item.expected);
    let spooled = {
        let hints = Hints {
            sha256: expected,
            logical_size: None,
        };
        let opts = IngestOptions {
            level: 6,
            max_logical_size: u64::MAX,
        };
        let fs = fs.clone();
        tokio::task::spawn_blocking(move || {
            fs.spool_blocking(std::io::BufReader::new(file), encoding, &hints, &opts)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?
    };
    let size = spooled.info.logical_size;
    fs.commit(item.path.as_str(), item.version, spooled, now)
        .await
        .map_err(|e: FileStoreError| e.to_string())?;
    Ok(Done::Migrated(size))
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
    let src = source.clone();
    let walker = tokio::task::spawn_blocking(move || walk(&src, &tx));
    let items =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|i| (i, rx)) });
    let results = items
        .map(|item| {
            let fs = fs.clone();
            async move {
                match item {
                    Ok(item) => {
                        let shown = format!("{} ({})", item.path, item.file.display());
                        (import(&fs, &item, dry_run, now).await, shown)
                    }
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
    }
}
