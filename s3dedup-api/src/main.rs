//! `s3dedup-api`: the Filetracker v2 HTTP daemon.

mod app;
mod hyper_errors;
mod metrics;
mod server;
mod stall;
mod tls;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use s3dedup_common::auth::Principals;
use s3dedup_common::config::{ConfigError, Override};
use s3dedup_common::program::{self, CommonArgs, Opens, Started};

/// Serves the Filetracker protocol v2, storing each distinct content once.
///
/// Started by systemd (s3dedup-api.socket), it serves every socket the unit passes. Without a
/// configuration file (none given, and no /etc/s3dedup/s3dedup.toml) it serves 127.0.0.1:9999
/// with SQLite metadata and objects under ./s3dedup-data. Every configuration key can also be
/// set from the environment as S3DEDUP_<SECTION>__<KEY> (e.g. S3DEDUP_API__LISTEN). Exit
/// codes: 0 stopped, 1 failed (the store did not answer, say), 2 bad configuration (the unit
/// does not restart on it).
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Address to listen on when systemd passes no socket (api.listen).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// Read a password from standard input (its first line), print its argon2 hash for
    /// `password_hash` in an `[[auth.users]]` table, and exit.
    #[arg(long)]
    hash_password: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.hash_password {
        return hash_password();
    }
    let listen = (cli.listen.iter()).map(|l| Override::new("api.listen", l.clone(), "--listen"));
    program::main::<Cli, _, _>(Opens::CreatingIfMissing, &cli.common, listen.collect(), run)
}

async fn run(started: Started) -> anyhow::Result<u8> {
    let files = started.file_store().await?;
    let cfg = started.cfg;
    let (files, cache) = files
        .with_read_cache(&cfg)
        .context("opening the read cache")?;
    let files = Arc::new(files);
    let max_age = std::time::Duration::from_secs(cfg.store.spool_max_age_secs);
    files.clean_spool_at_start(max_age).await;
    let principals = Principals::load(&cfg.auth, &started.secret_files)?;
    let mut state = app::AppState::new(files, cfg.api.clone(), principals)?;
    state.cache = cache;
    state.last_runs = Some(cfg.last_runs_dir());
    state.reload = Some(started.reload);
    let tls = match (&cfg.api.tls_certificate_file, &cfg.api.tls_key_file) {
        (Some(cert), Some(key)) => {
            let files = &started.secret_files;
            // Unusable files are a configuration error (exit 2): restarting cannot fix them.
            let tls = tls::Tls::load(&files.locate(cert), &files.locate(key)).map_err(|e| {
                ConfigError::Key {
                    key: "api.tls_certificate_file".into(),
                    origin: "the files it names".into(),
                    message: format!("{e:#}"),
                }
            })?;
            Some(Arc::new(tls))
        }
        _ => None,
    };
    let state = Arc::new(state);
    server::run(state, tls).await?;
    Ok(0)
}

fn hash_password() -> ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("s3dedup-api: cannot read the password from standard input: {e}");
        return ExitCode::from(1);
    }
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        eprintln!("s3dedup-api: the password on standard input is empty");
        return ExitCode::from(2);
    }
    match s3dedup_common::auth::hash_password(password) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("s3dedup-api: cannot hash the password: {e}");
            ExitCode::from(1)
        }
    }
}
