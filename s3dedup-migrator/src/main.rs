//! `s3dedup-migrator`: imports an existing Filetracker store in one run, then exits. Safe to run
//! while the API serves, and to re-run: what is already stored is skipped.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use s3dedup_common::config::{self, ConfigArgs, ProcessEnv};
use s3dedup_common::filestore::FileStore;
use s3dedup_common::migrate::{self, MigrateReport, Source};
use s3dedup_common::program;
use s3dedup_common::{systemd, unix_now};

/// Imports a Filetracker v1 directory (`v1:DIR`, files under DIR/files), a v2 data directory
/// (`v2:DIR`, as given to `filetracker-server -d`) or a running v2 server (`http://HOST:PORT`,
/// its root URL), keeping every version, verifying every content. Exit codes: 0 ok, 1 some files failed (listed at the end), 2 bad configuration.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// What to import (overrides migrator.source): v1:DIR, v2:DIR or http://HOST:PORT.
    #[arg(long, value_name = "SOURCE")]
    source: Option<String>,
    /// Files imported at once (overrides migrator.jobs).
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// Report what would be imported; store nothing.
    #[arg(long)]
    dry_run: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    systemd::init_logging(
        std::env::var_os("JOURNAL_STREAM").is_some(),
        &std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    );
    let env = ProcessEnv {
        vars: std::env::vars().collect(),
        state_directory: std::env::var_os("STATE_DIRECTORY").map(PathBuf::from),
    };
    let (cfg, runtime) = match program::start(&cli.cfg, Vec::new(), env) {
        Ok(started) => started,
        Err(e) => {
            eprintln!("s3dedup-migrator: {}", e.message);
            return ExitCode::from(e.code);
        }
    };
    let source = cli
        .source
        .clone()
        .unwrap_or_else(|| cfg.migrator.source.clone());
    let source: Source = match source.parse() {
        Ok(s) => s,
        Err(e) if source.is_empty() => {
            eprintln!("s3dedup-migrator: no source: pass --source or set migrator.source ({e})");
            return ExitCode::from(program::EXIT_CONFIG);
        }
        Err(e) => {
            eprintln!("s3dedup-migrator: --source: {e}");
            return ExitCode::from(program::EXIT_CONFIG);
        }
    };
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    let jobs = cli.jobs.unwrap_or(cfg.migrator.jobs);
    match runtime.block_on(run(cfg, credentials, source, jobs, cli.dry_run)) {
        Ok(report) if report.failed.is_empty() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("s3dedup-migrator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    cfg: config::Config,
    credentials: Option<PathBuf>,
    source: Source,
    jobs: usize,
    dry_run: bool,
) -> anyhow::Result<MigrateReport> {
    let root = match &source {
        Source::V1Dir(d) => Some(d.join("files")),
        Source::V2Dir(d) => Some(d.join("links")),
        Source::Http(_) => None,
    };
    if let Some(root) = root.filter(|r| !r.is_dir()) {
        bail!("source {source}: {} is not a directory", root.display());
    }
    let fs = FileStore::from_config(&cfg, credentials.as_deref())
        .await
        .context("opening the store")?;
    let started = Instant::now();
    tracing::info!(%source, jobs, dry_run, "migrating");
    let progress =
        |r: &MigrateReport| systemd::notify_status(&format!("migrating {source}: {}", r.summary()));
    let report = migrate::run(Arc::new(fs), &source, jobs, dry_run, unix_now(), &progress).await;
    let line = format!(
        "{source}: {} in {:.1?}",
        report.summary(),
        started.elapsed()
    );
    systemd::notify_status(&line);
    println!("{line}");
    tracing::info!(
        migrated = report.migrated,
        skipped = report.skipped,
        failed = report.failed.len(),
        "{line}"
    );
    for (file, why) in &report.failed {
        println!("failed: {file}: {why}");
    }
    Ok(report)
}
