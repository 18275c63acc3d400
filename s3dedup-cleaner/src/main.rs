//! `s3dedup-cleaner`: one garbage-collection run (or a verification, or a report), then exit.
//! Started by `s3dedup-cleaner.timer`; safe beside any number of running API instances.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use s3dedup_common::filestore::FileStore;
use s3dedup_common::filestore::gc::{self, GcOptions, GcReport, OrphanSweep, VerifyReport};
use s3dedup_common::program::{self, CommonArgs, Opens, Started, Telling};
use s3dedup_common::{reports, systemd, unix_now};

/// Deletes contents no file references any more, and objects without metadata.
///
/// One garbage-collection run: contents unreferenced for the grace period, and objects that have
/// no metadata row, are deleted; or, with --verify or --stats, a check or a report. It never
/// creates a store. Exit codes: 0 ok, 1 some deletions failed (or the store is unreachable),
/// 2 bad configuration (or no store where it names one), 3 --verify found problems.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Report what would be deleted; delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Stop after this many deletions.
    #[arg(long, value_name = "N")]
    max_deletes: Option<u64>,
    /// Grace period in seconds (overrides cleaner.grace_period_secs).
    #[arg(long, value_name = "SECS")]
    grace_secs: Option<u64>,
    /// Skip the sweep for objects that have no metadata row, and for abandoned uploads (S3
    /// multipart uploads, a local store's temporary files).
    #[arg(long, conflicts_with = "orphans")]
    no_orphans: bool,
    /// Sweep for orphans this run even when cleaner.orphan_sweep_interval_secs has not passed
    /// since the last sweep (the sweep lists the whole object store).
    #[arg(long)]
    orphans: bool,
    /// Sweep orphans even when the metadata database has no blobs (otherwise refused: a new or
    /// wrong database would make every object an orphan).
    #[arg(long)]
    allow_empty_metadata: bool,
    /// Check that every live blob's object exists with its recorded size, and every reference
    /// count; delete nothing.
    #[arg(long)]
    verify: bool,
    /// With --verify: also re-read and re-hash every object.
    #[arg(long, requires = "verify")]
    deep: bool,
    /// Print files, blobs, bytes and the deduplication ratio; delete nothing.
    #[arg(long)]
    stats: bool,
    /// Print the report as one JSON object on standard output (schema s3dedup-cleaner/1,
    /// docs/reports.md) instead of prose.
    #[arg(long)]
    json: bool,
}

use program::EXIT_FAILURE as EXIT_FAILED;
/// `--verify` found problems.
const EXIT_VERIFY: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    program::main::<Cli, _, _>(Opens::Existing, &cli.common, Vec::new(), |started| {
        run(&cli, started)
    })
}

async fn run(cli: &Cli, started: Started) -> anyhow::Result<u8> {
    let fs = started.file_store().await?;
    let tell = started.telling(cli.json);
    let cfg = started.cfg;
    let started = Instant::now();
    if cli.stats {
        print_stats(&fs, tell).await?;
        return Ok(0);
    }
    if cli.verify {
        let progress = |r: &VerifyReport| {
            systemd::notify_status(&format!("verifying: {} blobs checked", r.blobs_checked));
        };
        let lock_timeout = Duration::from_secs(cfg.cleaner.lock_timeout_secs);
        let report = gc::verify(
            &fs,
            cli.deep,
            cfg.cleaner.page_size,
            lock_timeout,
            &progress,
        )
        .await
        .context("verifying")?;
        return Ok(print_verify(&report, cli.deep, started.elapsed(), tell));
    }
    let opts = GcOptions {
        grace: Duration::from_secs(cli.grace_secs.unwrap_or(cfg.cleaner.grace_period_secs)),
        dry_run: cli.dry_run,
        max_deletes: cli.max_deletes,
        lock_timeout: Duration::from_secs(cfg.cleaner.lock_timeout_secs),
        page_size: cfg.cleaner.page_size,
        orphans: orphan_sweep(cli, &tell, cfg.cleaner.orphan_sweep_interval_secs),
        empty_metadata_ok: cli.allow_empty_metadata,
        remember_deletions: match cfg.cleaner.remember_deletions_days {
            0 => None,
            days => Some(Duration::from_secs(days * 86400)),
        },
        delete_timeout: Duration::from_secs(cfg.cleaner.delete_timeout_secs),
        delete_settle: Duration::from_secs(cfg.cleaner.delete_settle_secs),
    };
    let progress = |r: &GcReport| systemd::notify_status(&r.summary(opts.dry_run));
    let Some(report) = gc::run(&fs, &opts, unix_now(), &progress)
        .await
        .context("collecting garbage")?
    else {
        let msg = "another cleaner run holds the cleaner lock; nothing to do";
        let json = reports::collect(&GcReport::default(), opts.dry_run, true, started.elapsed());
        tell.tell(msg, &[], json, false);
        return Ok(0);
    };
    let took = started.elapsed();
    let line = format!("{} in {took:.1?}", report.summary(opts.dry_run));
    systemd::notify_status(&line);
    let details: Vec<String> = report
        .errors
        .iter()
        .map(|e| format!("error: {e}"))
        .collect();
    let json = reports::collect(&report, opts.dry_run, false, took);
    if report.orphans_swept && !opts.dry_run {
        // When the next run's sweep is due (and on /metrics).
        tell.record(&reports::orphan_sweep(took));
    }
    tell.tell(&line, &details, json, false);
    Ok(if report.errors.is_empty() {
        0
    } else {
        EXIT_FAILED
    })
}

/// Whether this run sweeps for orphans: asked, refused, or due by the interval since the last
/// recorded sweep.
fn orphan_sweep(cli: &Cli, tell: &Telling, interval: u64) -> OrphanSweep {
    if cli.no_orphans {
        return OrphanSweep::Off;
    }
    let next_at = tell
        .last_run("orphan-sweep")
        .map(|last| last.saturating_add(interval as i64));
    match next_at {
        Some(next_at) if !cli.orphans && interval > 0 && unix_now() < next_at => {
            OrphanSweep::NotDue { next_at }
        }
        _ => OrphanSweep::Due,
    }
}

fn print_verify(r: &VerifyReport, deep: bool, took: Duration, tell: Telling) -> u8 {
    let kind = if deep { "deep" } else { "shallow" };
    let line = format!(
        "{kind} verify: {} blobs ({} bytes) checked in {took:.1?}; {} problems: {} missing, \
         {} wrong size, {} corrupt, {} unreadable, {} wrong reference counts",
        r.blobs_checked,
        r.bytes_checked,
        r.problems(),
        r.missing.len(),
        r.wrong_size.len(),
        r.corrupt.len(),
        r.unreadable.len(),
        r.refcounts.len()
    );
    systemd::notify_status(&line);
    let mut lines = Vec::new();
    for d in &r.missing {
        lines.push(format!("missing: blob {d} has no object"));
    }
    for (d, want, got) in &r.wrong_size {
        lines.push(format!(
            "wrong size: blob {d} recorded {want} bytes, object has {got}"
        ));
    }
    for (d, why) in &r.corrupt {
        lines.push(format!("corrupt: blob {d}: {why}"));
    }
    for (d, why) in &r.unreadable {
        lines.push(format!("unreadable: blob {d}: {why}"));
    }
    for d in &r.unconfirmed {
        lines.push(format!(
            "unconfirmed: blob {d} looked wrong once, and a writer held its lock when it was \
             checked again; not counted"
        ));
    }
    for (d, want, got) in &r.refcounts {
        lines.push(format!(
            "refcount: blob {d} records {want} references, {got} files point at it"
        ));
    }
    tell.tell(&line, &lines, reports::verify(r, deep, took), false);
    if r.problems() == 0 { 0 } else { EXIT_VERIFY }
}

async fn print_stats(fs: &FileStore, tell: Telling) -> anyhow::Result<()> {
    let s = fs.stats().await.context("reading statistics")?;
    if tell.json() {
        println!("{}", reports::stats(&s));
        return Ok(());
    }
    let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    let saved = s.referenced_bytes.saturating_sub(s.stored_bytes);
    println!("files:                      {}", s.files);
    println!("distinct contents (blobs):  {}", s.blobs);
    println!("bytes as clients see them:  {}", s.referenced_bytes);
    println!("bytes of distinct contents: {}", s.logical_bytes);
    println!("bytes stored:               {}", s.stored_bytes);
    println!(
        "deduplication ratio:        {:.2}",
        ratio(s.referenced_bytes, s.logical_bytes)
    );
    println!(
        "compression ratio:          {:.2}",
        ratio(s.logical_bytes, s.stored_bytes)
    );
    println!(
        "savings:                    {saved} bytes ({:.1}%)",
        100.0 * (1.0 - ratio(s.stored_bytes, s.referenced_bytes.max(1)).min(1.0))
    );
    Ok(())
}
