//! The PostgreSQL that `pg_virtualenv` provides, and what an administrator does to it.

use crate::*;

/// The PostgreSQL that `pg_virtualenv` provides (tests/run-all.sh), as a libpq conninfo string.
pub fn pg_conninfo() -> String {
    let (host, port) = pg_host_port();
    pg_conninfo_at(&host, port)
}

/// The test server's host and port (pg_virtualenv's `PGHOST`, `PGPORT`).
pub fn pg_host_port() -> (String, u16) {
    assert!(
        std::env::var("PGHOST").is_ok(),
        "PostgreSQL suites need PGHOST etc.: run them through tests/run-all.sh (pg_virtualenv)"
    );
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let port = var("PGPORT", "5432").parse().expect("PGPORT is a port");
    (var("PGHOST", "localhost"), port)
}

/// A conninfo string for the test server's database and user, reached at `host:port` (a proxy).
pub fn pg_conninfo_at(host: &str, port: u16) -> String {
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    format!(
        "host={host} port={port} user={} password={} dbname={}",
        var("PGUSER", "postgres"),
        var("PGPASSWORD", ""),
        var("PGDATABASE", "postgres"),
    )
}

/// A schema name no other test uses.
pub fn unique_schema(tag: &str) -> String {
    format!("{tag}_{}_{}", std::process::id(), rand::random::<u32>())
}

/// A client of the test server for what an administrator (or a failover) does behind the
/// programs' backs.
pub async fn pg_admin() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&pg_conninfo(), tokio_postgres::NoTls)
        .await
        .expect("connect to the test PostgreSQL");
    tokio::spawn(connection);
    client
}

/// Ends the PostgreSQL session holding the advisory lock `name` of the deployment in `schema`
/// (as `pg_terminate_backend` does in a failover or by hand); returns how many sessions it
/// ended.
pub async fn terminate_lock_holder(schema: &str, name: &str) -> i64 {
    let key = s3dedup_common::locks::PgLocks::new(pg_conninfo().parse().expect("conninfo"), 1)
        .in_schema(schema)
        .key(name);
    pg_admin()
        .await
        .query_one(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory'
                AND granted AND classid::bigint = $1 AND objid::bigint = $2",
            &[&((key >> 32) as i64), &((key & 0xffff_ffff) as i64)],
        )
        .await
        .expect("terminate the lock's session")
        .get(0)
}

/// The name of the lock of the blob holding `content`.
pub fn blob_lock_of(content: &[u8]) -> String {
    format!("blob:{}", sha256_hex(content))
}

/// Environment that points `s3dedup-api` at PostgreSQL metadata and advisory locks.
pub fn pg_env(schema: &str) -> Vec<(String, String)> {
    vec![
        ("S3DEDUP_METADATA__BACKEND".into(), "postgres".into()),
        ("S3DEDUP_METADATA__POSTGRES__URL".into(), pg_conninfo()),
        ("S3DEDUP_METADATA__POSTGRES__SCHEMA".into(), schema.into()),
        ("S3DEDUP_LOCKS__BACKEND".into(), "postgres".into()),
    ]
}

/// The metadata store an API with `pg_env(schema)` uses, opened from the test to check it.
pub async fn pg_meta(schema: &str) -> s3dedup_common::meta::PostgresMeta {
    let cfg = s3dedup_common::config::PostgresConfig {
        url: pg_conninfo(),
        schema: schema.into(),
        pool_size: 2,
        ..Default::default()
    };
    s3dedup_common::meta::PostgresMeta::connect(&cfg, None)
        .await
        .expect("connect to the test PostgreSQL")
}
