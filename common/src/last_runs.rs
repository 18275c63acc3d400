//! The tools' last runs, for the API's `/metrics` (and alerts such as "the cleaner has not run
//! for a day"): each tool records its last real run of each kind as its JSON report, one small
//! file per tool and kind in the data directory, replaced whole; the API reads them at a scrape.

use std::io::{self, Write};
use std::path::Path;

use serde_json::Value;

/// A recorded run.
#[derive(Debug, Clone, PartialEq)]
pub struct LastRun {
    pub tool: String,
    pub kind: String,
    /// When it finished (Unix seconds).
    pub finished_at: i64,
    pub ok: bool,
    pub seconds: f64,
}

/// Records `report` (with `schema`, `kind`, `ok`, `seconds`) as `tool`'s last run of its kind,
/// finished at `now`. The file is written beside and renamed over, so a reader sees it whole.
pub fn record(dir: &Path, tool: &str, report: &Value, now: i64) -> io::Result<()> {
    let kind = report["kind"].as_str().unwrap_or("run");
    let mut report = report.clone();
    report["finished_at"] = now.into();
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{tool}-{kind}.json"));
    let tmp = dir.join(format!(".{tool}-{kind}.json.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(report.to_string().as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// The runs recorded in `dir`, sorted; unreadable or foreign files are passed over.
pub fn read(dir: &Path) -> Vec<LastRun> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut runs: Vec<LastRun> = entries
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path
                .file_name()?
                .to_str()?
                .strip_suffix(".json")?
                .to_owned();
            let v: Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
            let kind = v["kind"].as_str()?.to_owned();
            let tool = name.strip_suffix(&format!("-{kind}"))?.to_owned();
            Some(LastRun {
                tool,
                kind,
                finished_at: v["finished_at"].as_i64()?,
                ok: v["ok"].as_bool()?,
                seconds: v["seconds"].as_f64().unwrap_or(0.0),
            })
        })
        .collect();
    runs.sort_by(|a, b| (&a.tool, &a.kind).cmp(&(&b.tool, &b.kind)));
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_run_reads_back_and_a_newer_one_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let report = serde_json::json!({"kind": "collect", "ok": true, "seconds": 1.5});
        record(dir.path(), "s3dedup-cleaner", &report, 100).unwrap();
        let failed = serde_json::json!({"kind": "collect", "ok": false, "seconds": 2.0});
        record(dir.path(), "s3dedup-cleaner", &failed, 200).unwrap();
        let other = serde_json::json!({"kind": "migrate", "ok": true, "seconds": 3.0});
        record(dir.path(), "s3dedup-migrator", &other, 150).unwrap();
        std::fs::write(dir.path().join("junk.json"), "not json").unwrap();
        let runs = read(dir.path());
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert_eq!((runs[0].finished_at, runs[0].ok), (200, false));
        assert_eq!(
            (runs[1].tool.as_str(), runs[1].kind.as_str()),
            ("s3dedup-migrator", "migrate")
        );
        assert!(read(&dir.path().join("none")).is_empty());
    }
}
