//! Holds one advisory lock in a process of its own, for the cross-process lock tests:
//! `lock-holder file:<lockfile>|postgres:<conninfo> <name> shared|exclusive [wait-secs]`.
//! Prints `locked` once it holds the lock, releases it when standard input closes, then
//! prints `released`. Killing it must release the lock too (that is what the tests check).

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use s3dedup_common::locks::{FileLocks, LockManager, LockMode, PgLocks};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [backend, name, mode, rest @ ..] = args.as_slice() else {
        bail!("usage: lock-holder file:PATH|postgres:CONNINFO NAME shared|exclusive [WAIT_SECS]");
    };
    let wait = rest
        .first()
        .map_or(Ok(30), |s| s.parse())
        .context("wait seconds")?;
    let locks: Box<dyn LockManager> = if let Some(p) = backend.strip_prefix("file:") {
        Box::new(FileLocks::open(p.as_ref())?)
    } else if let Some(c) = backend.strip_prefix("postgres:") {
        Box::new(PgLocks::new(c.parse().context("conninfo")?, 1))
    } else {
        bail!("unknown backend {backend}");
    };
    let mode = if mode == "shared" {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    let guard = locks.lock(name, mode, Duration::from_secs(wait)).await?;
    println!("locked");
    std::io::stdout().flush()?;
    tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await??;
    guard.release().await;
    println!("released");
    Ok(())
}
