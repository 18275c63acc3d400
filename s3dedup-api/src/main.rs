//! `s3dedup-api`: the Filetracker v2 HTTP daemon.

mod app;
mod metrics;
mod server;
mod stall;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use s3dedup_common::config::{self, ConfigArgs, Override, ProcessEnv};
use s3dedup_common::filestore::FileStore;
use s3dedup_common::program;
use s3dedup_common::systemd;

/// Serves the Filetracker protocol v2, storing each distinct content once.
///
/// With no arguments and no configuration file it serves 127.0.0.1:9999 with SQLite metadata and
/// objects under ./s3dedup-data. Every configuration key can also be set from the environment
/// as S3DEDUP_<SECTION>__<KEY> (e.g. S3DEDUP_API__LISTEN).
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Address to listen on when systemd passes no socket (api.listen).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    systemd::init_logging(
        std::env::var_os("JOURNAL_STREAM").is_some(),
        &std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    );
    let listen = cli.listen.iter().map(|l| Override {
        key: "api.listen".into(),
        value: l.clone(),
        origin: "--listen".into(),
    });
    let env = ProcessEnv {
        vars: std::env::vars().collect(),
        state_directory: std::env::var_os("STATE_DIRECTORY").map(PathBuf::from),
        cache_directory: std::env::var_os("CACHE_DIRECTORY").map(PathBuf::from),
    };
    let (cfg, runtime) = match program::start(&cli.cfg, listen.collect(), env) {
        Ok(started) => started,
        Err(e) => {
            eprintln!("s3dedup-api: {}", e.message);
            return ExitCode::from(e.code);
        }
    };
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    match runtime.block_on(run(cfg, credentials)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("s3dedup-api: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: config::Config, credentials: Option<PathBuf>) -> anyhow::Result<()> {
    let files = FileStore::from_config(&cfg, credentials.as_deref())
        .await
        .context("opening the store")?;
    let (files, cache) = files
        .with_read_cache(&cfg)
        .context("opening the read cache")?;
    let files = Arc::new(files);
    let max_age = std::time::Duration::from_secs(cfg.store.spool_max_age_secs);
    let f = files.clone();
    let spool = cfg.spool_dir();
    match tokio::task::spawn_blocking(move || f.remove_stale_spool(max_age)).await? {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(removed = n, spool = %spool.display(), "removed leftover spool files")
        }
        // Not fatal: leftovers only cost disk space.
        Err(e) => tracing::warn!(error = %e, spool = %spool.display(), "cannot clean the spool"),
    }
    let mut state = app::AppState::new(files, cfg.api.clone())?;
    state.cache = cache;
    let state = Arc::new(state);
    server::run(state).await
}
