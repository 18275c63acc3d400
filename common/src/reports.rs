//! The tools' reports in machine-readable form (`--json`): one JSON object per run on standard
//! output. The keys and their types are a stable interface, documented in docs/reports.md
//! (a test checks every report against that page); the prose summaries may change.

use std::time::Duration;

use serde_json::{Value, json};

use crate::filestore::gc::{GcReport, OrphanSweep, VerifyReport};
use crate::meta::Stats;
use crate::migrate::MigrateReport;

/// Schema names, with a version that changes only when a key changes meaning or goes.
pub const CLEANER_SCHEMA: &str = "s3dedup-cleaner/1";
pub const MIGRATOR_SCHEMA: &str = "s3dedup-migrator/1";

fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// A garbage-collection run; `busy`: another run held the cleaner lock, nothing was done.
pub fn collect(r: &GcReport, dry_run: bool, busy: bool, took: Duration) -> Value {
    json!({
        "schema": CLEANER_SCHEMA,
        "kind": "collect",
        "ok": r.errors.is_empty(),
        "dry_run": dry_run,
        "busy": busy,
        "seconds": seconds(took),
        "blobs_deleted": r.blobs_deleted,
        "bytes_freed": r.bytes_freed,
        "orphans_deleted": r.orphans_deleted,
        "orphan_bytes": r.orphan_bytes,
        "skipped_busy": r.skipped_busy,
        "uploads_aborted": r.uploads_aborted,
        "locks_lost": r.locks_lost,
        "deletions_forgotten": r.deletions_forgotten,
        "tombstones_forgotten": r.tombstones_forgotten,
        "waiting_blobs": r.waiting.0,
        "waiting_bytes": r.waiting.1,
        "orphans_swept": r.orphans_swept,
        "orphan_sweep_next_at": match r.orphan_sweep {
            OrphanSweep::NotDue { next_at } => Some(next_at),
            _ => None,
        },
        "errors": r.errors,
    })
}

/// The record of a run that swept for orphans (not printed: it tells the next run when its
/// sweep is due, and `/metrics` when the last one was).
pub fn orphan_sweep(took: Duration) -> Value {
    json!({ "kind": "orphan-sweep", "ok": true, "seconds": seconds(took) })
}

/// A `--verify` run.
pub fn verify(r: &VerifyReport, deep: bool, took: Duration) -> Value {
    let blob = |d: &crate::blob::Digest| json!({ "blob": d.to_hex() });
    let why = |(d, why): &(crate::blob::Digest, String)| json!({ "blob": d.to_hex(), "why": why });
    json!({
        "schema": CLEANER_SCHEMA,
        "kind": "verify",
        "ok": r.problems() == 0,
        "deep": deep,
        "seconds": seconds(took),
        "blobs_checked": r.blobs_checked,
        "bytes_checked": r.bytes_checked,
        "problems": r.problems(),
        "missing": r.missing.iter().map(blob).collect::<Vec<_>>(),
        "wrong_size": r.wrong_size.iter()
            .map(|(d, recorded, found)| json!({ "blob": d.to_hex(), "recorded": recorded, "found": found }))
            .collect::<Vec<_>>(),
        "corrupt": r.corrupt.iter().map(why).collect::<Vec<_>>(),
        "unreadable": r.unreadable.iter().map(why).collect::<Vec<_>>(),
        "refcounts": r.refcounts.iter()
            .map(|(d, recorded, actual)| json!({ "blob": d.to_hex(), "recorded": recorded, "actual": actual }))
            .collect::<Vec<_>>(),
        "unconfirmed": r.unconfirmed.iter().map(blob).collect::<Vec<_>>(),
    })
}

/// `--stats`.
pub fn stats(s: &Stats) -> Value {
    let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    json!({
        "schema": CLEANER_SCHEMA,
        "kind": "stats",
        "ok": true,
        "files": s.files,
        "blobs": s.blobs,
        "referenced_bytes": s.referenced_bytes,
        "logical_bytes": s.logical_bytes,
        "stored_bytes": s.stored_bytes,
        "dedup_ratio": ratio(s.referenced_bytes, s.logical_bytes),
        "compression_ratio": ratio(s.logical_bytes, s.stored_bytes),
    })
}

/// A migrator run of `source`.
pub fn migrate(r: &MigrateReport, source: &str, dry_run: bool, took: Duration) -> Value {
    json!({
        "schema": MIGRATOR_SCHEMA,
        "kind": "migrate",
        "ok": r.failed.is_empty() && !r.stopped,
        "source": source,
        "dry_run": dry_run,
        "seconds": seconds(took),
        "migrated": r.migrated,
        "bytes": r.bytes,
        "skipped": r.skipped,
        "kept_deleted": r.kept_deleted,
        "deletions_carried": r.deletions_carried,
        "missing": r.missing,
        "failed": r.failed.iter()
            .map(|(file, why)| json!({ "file": file, "why": why }))
            .collect::<Vec<_>>(),
        "resumed_after": r.resumed_after,
        "stopped": r.stopped,
    })
}
