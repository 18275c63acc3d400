//! Files an earlier import brought over that the old Filetracker no longer has: deleted there
//! since. A Filetracker keeps no record of its deletions, so after each run the files imported
//! here (and not written by a client since) are looked up in the source; those it lacks are
//! reported, never silently left, and with `--delete-missing` deleted here too.

use std::path::Path;

use futures::StreamExt;

use crate::filestore::FileStore;
use crate::meta::DeleteKind;
use crate::old_server::OldServer;
use crate::protocol::{self, FilePath, Version};
use crate::source::Source;

use super::{MigrateError, MigrateReport, RunOptions, each_page};

const PAGE: usize = 1000;

/// Whether the source still has `path`; `None` for a source this check does not apply to.
async fn in_source(
    source: &Source, old: Option<&OldServer>, path: &str,
) -> Result<Option<bool>, MigrateError> {
    let rel = path.trim_start_matches('/');
    let exists = |p: &Path| p.symlink_metadata().is_ok();
    Ok(match source {
        Source::V1Dir(d) => Some(exists(&d.join("files").join(rel))),
        // v2 names non-ASCII paths double-encoded (each UTF-8 byte a character).
        Source::V2Dir(d) => {
            let links = d.join("links");
            let encoded: String = rel.bytes().map(char::from).collect();
            Some(exists(&links.join(&encoded)) || exists(&links.join(rel)))
        }
        Source::Http(_) => {
            let Some(old) = old else {
                return Ok(None);
            };
            let path = FilePath::parse(path, protocol::DEFAULT_MAX_PATH_LEN)
                .map_err(|e| MigrateError::Source(e.to_string()))?;
            Some(old.head(&path).await?.is_some())
        }
        Source::Upstream { .. } | Source::Store(_) => None,
    })
}

/// Looks up every imported file in `source`; reports those it lacks in `report.missing` and,
/// with `opts.delete_missing` (not in a dry run), deletes them here. Failures are reported.
pub(super) async fn check(
    fs: &FileStore, source: &Source, old: Option<&OldServer>, opts: &RunOptions,
    report: &mut MigrateReport,
) {
    if matches!(source, Source::Upstream { .. } | Source::Store(_)) {
        return;
    }
    let fetch = async |after: &str| Ok(fs.imported(after, PAGE).await?);
    let each = async |page: Vec<(String, Version)>, report: &mut MigrateReport| {
        let looked = futures::stream::iter(page)
            .map(|(path, version)| async move {
                let found = in_source(source, old, &path).await;
                (path, version, found)
            })
            .buffered(opts.jobs.max(1))
            .collect::<Vec<_>>()
            .await;
        for (path, version, found) in looked {
            match found {
                Ok(Some(false)) => gone(fs, path, version, opts, report).await,
                Ok(_) => {}
                Err(why) => report.failed.push((path, why.to_string())),
            }
        }
    };
    each_page("the imported files", report, fetch, each).await;
}

async fn gone(
    fs: &FileStore, path: String, version: Version, opts: &RunOptions, report: &mut MigrateReport,
) {
    if !opts.delete_missing || opts.dry_run {
        tracing::warn!(
            path,
            version,
            "imported here, deleted on the old server since"
        );
        report.missing.push(path);
        return;
    }
    // At its own version: a client's write since (a newer version) is kept.
    match fs
        .delete(&path, version, opts.now, DeleteKind::Client)
        .await
    {
        Ok(_) => {
            tracing::info!(path, version, "deleted here, as on the old server");
            report.deletions_carried += 1;
        }
        Err(e) => report.failed.push((path, e.to_string())),
    }
}
