//! `s3dedup-migrator`: imports an existing Filetracker store in one run, then exits. Safe to run
//! while the API serves, and to re-run: what is already stored is skipped, a killed run resumes
//! from its checkpoint.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use s3dedup_common::config;
use s3dedup_common::migrate::{self, MigrateReport, RunOptions};
use s3dedup_common::program::{self, CommonArgs, Opens, Started, Telling};
use s3dedup_common::source::Source;
use s3dedup_common::{reports, systemd, unix_now};

/// Imports an existing Filetracker into the store, verifying every content.
///
/// Imports a Filetracker v1 directory (`v1:DIR`, files under DIR/files), a v2 data directory
/// (`v2:DIR`, as given to `filetracker-server -d`), a running v2 server (`http://HOST:PORT`,
/// its root URL) or another s3dedup store (`s3dedup:CONFIG_FILE`, e.g. moving from SQLite and a
/// local directory to PostgreSQL and S3; run again after the switch for the final delta), or
/// adopts an upstream s3dedup bucket in place (`upstream:BUCKET:sqlite:PATH`,
/// `upstream:BUCKET:postgres://…`), keeping every version, verifying every content. Exit codes:
/// 0 ok, 1 some files failed (listed at the end), 2 bad configuration.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// What to import (overrides migrator.source): v1:DIR, v2:DIR, http://HOST:PORT,
    /// s3dedup:CONFIG_FILE or upstream:BUCKET:sqlite:PATH / upstream:BUCKET:postgres://USER@HOST/DB.
    #[arg(long, value_name = "SOURCE")]
    source: Option<Source>,
    /// Files imported at once (overrides migrator.jobs).
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// Bytes read from the source per second, all jobs together (overrides
    /// migrator.max_bytes_per_sec; 0: unlimited).
    #[arg(long, value_name = "BYTES")]
    max_bytes_per_sec: Option<u64>,
    /// Report what would be imported; store nothing.
    #[arg(long)]
    dry_run: bool,
    /// Delete here the files imported earlier that the old Filetracker no longer has (deleted
    /// there since); without it they are listed and kept.
    #[arg(long)]
    delete_missing: bool,
    /// Print the report as one JSON object on standard output (schema s3dedup-migrator/1,
    /// docs/reports.md) instead of prose.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    program::main::<Cli, _, _>(
        Opens::CreatingIfMissing,
        &cli.common,
        Vec::new(),
        |started| start(&cli, started),
    )
}

/// The source and options from the flags and the configuration, then the run.
async fn start(cli: &Cli, started: Started) -> anyhow::Result<u8> {
    let cfg = &started.cfg;
    let Some(source) = cli.source.clone().or_else(|| cfg.migrator.source.clone()) else {
        return Err(config::ConfigError::Key {
            key: "migrator.source".into(),
            origin: "neither --source nor the configuration".into(),
            message: "no source: pass --source or set migrator.source (v1:DIR, v2:DIR, \
                      http://HOST:PORT, s3dedup:CONFIG_FILE, upstream:BUCKET:…)"
                .into(),
        }
        .into());
    };
    let opts = RunOptions {
        jobs: cli.jobs.unwrap_or(cfg.migrator.jobs),
        dry_run: cli.dry_run,
        delete_missing: cli.delete_missing,
        max_bytes_per_sec: cli
            .max_bytes_per_sec
            .unwrap_or(cfg.migrator.max_bytes_per_sec),
        http_timeout: Duration::from_secs(cfg.api.fallback_timeout_secs),
        now: unix_now(),
    };
    let tell = started.telling(cli.json);
    let bar = !started.under_systemd && !cli.json && std::io::stderr().is_terminal();
    let report = run(&started, source, opts, bar, tell).await?;
    Ok(if report.failed.is_empty() && !report.stopped {
        0
    } else {
        program::EXIT_FAILURE
    })
}

/// Completes at the first SIGTERM (systemctl stop) or SIGINT (Ctrl-C).
fn stop_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("stopping: the files in flight are abandoned, the checkpoint is kept");
    })
}

/// How often a run not on a terminal logs its progress.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(60);

/// Progress on a terminal (a bar with rate and ETA) or for systemd (`STATUS=`).
struct Progress {
    source: String,
    started: Instant,
    last: std::sync::Mutex<Instant>,
    /// When a progress line last went to the log (not a terminal).
    logged: std::sync::Mutex<Instant>,
    /// Files the run will look at, once counted; 0 until then.
    total: Arc<AtomicU64>,
    bar: bool,
}

impl Progress {
    fn show(&self, r: &MigrateReport, last: bool) {
        let every = if self.bar {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        if let Ok(mut shown) = self.last.lock() {
            if !last && shown.elapsed() < every {
                return;
            }
            *shown = Instant::now();
        }
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let seen = r.seen();
        let rate = seen as f64 / secs;
        let mib = r.bytes as f64 / secs / (1 << 20) as f64;
        let total = self.total.load(Ordering::Relaxed);
        if !self.bar {
            let line = format!(
                "migrating {}: {}; {rate:.0} files/s",
                self.source,
                r.summary()
            );
            systemd::notify_status(&line);
            // The journal (or a pipe) gets a line a minute, so a long run shows its pace.
            if let Ok(mut logged) = self.logged.lock()
                && !last
                && logged.elapsed() >= PROGRESS_LOG_EVERY
            {
                *logged = Instant::now();
                tracing::info!(seen, bytes = r.bytes, "{line}");
            }
            return;
        }
        let line = if total > 0 {
            let done = seen.min(total);
            let width = 30;
            let filled = (done * width / total) as usize;
            let eta = (total - done) as f64 / rate.max(0.001);
            format!(
                "[{}{}] {done}/{total} files, {rate:.0} files/s, {mib:.1} MiB/s, ETA {}, {} failed",
                "#".repeat(filled),
                "-".repeat(width as usize - filled),
                clock(eta),
                r.failed.len()
            )
        } else {
            format!(
                "{seen} files (counting…), {rate:.0} files/s, {mib:.1} MiB/s, {} failed",
                r.failed.len()
            )
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{line}\x1b[K");
        if last {
            let _ = writeln!(err);
        }
    }
}

fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

async fn run(
    started: &Started, source: Source, opts: RunOptions, bar: bool, tell: Telling,
) -> anyhow::Result<MigrateReport> {
    if let Some(root) = source.walk_root()
        && let Err(e) = std::fs::read_dir(&root)
    {
        let why = match e.kind() {
            // filetracker-server keeps its data directory 0700 for its own user.
            std::io::ErrorKind::PermissionDenied => format!(
                "permission denied reading {} as uid {}: give this user read access to the \
                 source (docs/operations.md, \"Import an existing Filetracker\")",
                root.display(),
                nix::unistd::geteuid()
            ),
            std::io::ErrorKind::NotFound => format!("{} does not exist", root.display()),
            _ => format!("{} is not a readable directory: {e}", root.display()),
        };
        bail!("source {source}: {why}");
    }
    let fs = Arc::new(started.file_store().await?);
    // Before the source is read: a wrong bucket or a store that is down is one line and exit 1,
    // not one failure per file.
    let (meta, store) = fs.check().await;
    meta.context("the destination's metadata database does not answer")?;
    store.context("the destination's object store does not answer")?;
    // What an earlier run killed mid-file left in the spool.
    let max_age = Duration::from_secs(started.cfg.store.spool_max_age_secs);
    fs.clean_spool_at_start(max_age).await;
    let progress = Progress {
        source: source.to_string(),
        started: Instant::now(),
        last: std::sync::Mutex::new(Instant::now()),
        logged: std::sync::Mutex::new(Instant::now()),
        total: Arc::new(AtomicU64::new(0)),
        bar,
    };
    if bar {
        // Counting is a second walk of the source: only worth it for a human watching.
        let (fs, source, total) = (fs.clone(), source.clone(), progress.total.clone());
        tokio::spawn(async move {
            let n = migrate::count_files(&fs, &source, opts.http_timeout).await;
            total.store(n.max(1), Ordering::Relaxed);
        });
    }
    tracing::info!(%source, jobs = opts.jobs, dry_run = opts.dry_run, "migrating");
    let stop = stop_signal()?;
    let report = migrate::run(
        fs.clone(),
        &source,
        opts,
        &|r| progress.show(r, false),
        stop,
    )
    .await
    .with_context(|| format!("migrating {source}"))?;
    if report.stopped {
        // The reads abandoned in flight may still hold their spool files open: unlinked here,
        // they go when the process does.
        let f = fs.clone();
        match tokio::task::spawn_blocking(move || f.remove_own_spool()).await? {
            Ok(n) => tracing::info!(removed = n, "removed the stopped run's spool files"),
            Err(e) => tracing::warn!(error = %e, "cannot remove the stopped run's spool files"),
        }
    }
    progress.show(&report, true);
    let resumed = match &report.resumed_after {
        Some(pos) => format!(" (resumed after {pos})"),
        None => String::new(),
    };
    let took = progress.started.elapsed();
    let line = format!("{source}: {}{resumed} in {took:.1?}", report.summary());
    systemd::notify_status(&line);
    let mut details: Vec<String> = (report.failed.iter())
        .map(|(file, why)| format!("failed: {file}: {why}"))
        .collect();
    details.extend(
        report
            .missing
            .iter()
            .map(|p| format!("gone from the source, kept here: {p}")),
    );
    let json = reports::migrate(&report, &source.to_string(), opts.dry_run, took);
    // Each failed file and each file gone from the source was logged when it was found.
    tell.tell(&line, &details, json, true);
    Ok(report)
}
