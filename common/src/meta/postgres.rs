//! Metadata in PostgreSQL, for several API instances (and hosts) on one bucket.
//!
//! Same logical schema as SQLite. Writers to one path are serialized by a transaction-level
//! advisory lock on `path:<path>`; blob rows are locked in digest order, so two requests moving
//! references between the same blobs cannot deadlock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::{
    BlobPlan, BlobRow, BlobState, DeleteKind, DeleteOutcome, DeletePlan, Deletion, FileEntry,
    ListPage, MetaError, MetaStore, PutKind, PutPlan, PutResult, Stats, Stored, new_deletion_id,
    plan_blob, plan_delete, plan_put, state_of,
};
use crate::blob::{BlobInfo, Digest};
use crate::config::PostgresConfig;
use crate::locks::{BlobLock, Exclusive, HeldBlob, lock_key};
use crate::pg::{self, no_answer, within};
use crate::protocol::Version;

/// Versioned schema changes, applied in order, each once.
const MIGRATIONS: &[&str] = &[
    // 1: files and blobs. "C" collation: paths sort bytewise, as in SQLite.
    "CREATE TABLE blobs (
        digest TEXT COLLATE \"C\" PRIMARY KEY,
        logical_size BIGINT NOT NULL,
        stored_size BIGINT NOT NULL,
        refcount BIGINT NOT NULL,
        state TEXT NOT NULL DEFAULT 'live' CHECK (state IN ('live', 'deleting')),
        unreferenced_since BIGINT,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE files (
        path TEXT COLLATE \"C\" PRIMARY KEY,
        version BIGINT NOT NULL,
        digest TEXT COLLATE \"C\" NOT NULL
    );
    CREATE INDEX files_by_digest ON files (digest);
    CREATE INDEX blobs_unreferenced ON blobs (unreferenced_since) WHERE refcount = 0;",
    // 2: remembered deletions (so imports do not resurrect them) and migration checkpoints.
    "CREATE TABLE deleted_paths (
        path TEXT COLLATE \"C\" PRIMARY KEY,
        version BIGINT NOT NULL,
        deleted_at BIGINT NOT NULL
    );
    CREATE INDEX deleted_paths_by_age ON deleted_paths (deleted_at);
    CREATE TABLE migration_checkpoints (
        source TEXT PRIMARY KEY,
        position TEXT NOT NULL,
        updated_at BIGINT NOT NULL
    );",
    // 3: tombstones name their deletion, say until when its delete requests may land (Unix
    // ms, the server's clock), and whether the object was seen deleted; such rows stay a while.
    "ALTER TABLE blobs ADD COLUMN deletion BIGINT, ADD COLUMN settles_at BIGINT,
        ADD COLUMN object_deleted BOOLEAN NOT NULL DEFAULT false;",
    // 4: files that came from an import and were not written by a client since (a final delta
    // reports those the source no longer has).
    "ALTER TABLE files ADD COLUMN imported BOOLEAN NOT NULL DEFAULT false",
    // 5: small contents kept in their row (NULL: the content is the object).
    "ALTER TABLE blobs ADD COLUMN content BYTEA",
];

/// The server's clock in Unix milliseconds: settle times are set and compared on it alone, so
/// the hosts' clocks never meet.
const NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// How often a transaction is retried after a serialization failure or deadlock.
const TX_ATTEMPTS: usize = 5;

/// How often a read is tried when its connection turns out to be lost.
const READ_ATTEMPTS: u32 = 3;

/// PostgreSQL-backed [`MetaStore`].
pub struct PostgresMeta {
    pool: Pool,
    describe: String,
    deadline: Option<Duration>,
}

/// The connection settings of `[metadata.postgres]`, with the password resolved.
pub fn connection_config(
    cfg: &PostgresConfig, password: Option<String>,
) -> Result<tokio_postgres::Config, MetaError> {
    let mut c: tokio_postgres::Config = cfg
        .url
        .parse()
        .map_err(|e| MetaError::Database(format!("metadata.postgres.url: {e}")))?;
    if let Some(p) = password {
        c.password(p);
    }
    c.connect_timeout(Duration::from_secs(cfg.connect_timeout_secs));
    c.application_name("s3dedup");
    // Every connection works in the configured schema. The server cancels a statement stuck
    // (on a lock, say) past the timeout, and ends a session left idle inside a transaction
    // (a frozen client holding row or advisory locks).
    let mut options = format!("-c search_path={}", cfg.schema);
    if cfg.statement_timeout_secs > 0 {
        let ms = cfg.statement_timeout_secs * 1000;
        options +=
            &format!(" -c statement_timeout={ms} -c idle_in_transaction_session_timeout={ms}");
        // The kernel gives up on a connection whose sent data goes unacknowledged this long.
        c.tcp_user_timeout(Duration::from_millis(ms));
    }
    c.options(options);
    Ok(c)
}

fn describe(c: &tokio_postgres::Config, schema: &str) -> String {
    let host = c
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_default();
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres {host}:{port}/{} schema {schema}",
        c.get_dbname().unwrap_or("")
    )
}

/// Connection trouble is "unavailable" (503, retry later); anything else is a database error.
pub(crate) fn pg_error(e: tokio_postgres::Error) -> MetaError {
    let message = pg::error_text(&e);
    if pg::unavailable(&e) {
        MetaError::Unavailable(message)
    } else {
        MetaError::Database(message)
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> MetaError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_error(e),
        other => MetaError::Unavailable(format!("no database connection: {other}")),
    }
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::T_R_SERIALIZATION_FAILURE)
        || e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED)
}

fn parse_digest(s: String) -> Result<Digest, MetaError> {
    s.parse()
        .map_err(|_| MetaError::Inconsistent(format!("bad digest {s:?} in the blobs table")))
}

fn advisory_key(name: &str) -> i64 {
    lock_key(name) as i64
}

impl PostgresMeta {
    /// Connects, creates the schema if needed and applies pending migrations. Two instances
    /// starting at once serialize on an advisory lock.
    pub async fn connect(
        cfg: &PostgresConfig, password: Option<String>,
    ) -> Result<Self, MetaError> {
        let pg = connection_config(cfg, password)?;
        let describe = describe(&pg, &cfg.schema);
        let mgr = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let timeout = Some(Duration::from_secs(cfg.connect_timeout_secs.max(1)));
        let pool = Pool::builder(mgr)
            .max_size(cfg.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .build()
            .map_err(|e| MetaError::Database(format!("building the connection pool: {e}")))?;
        let meta = PostgresMeta {
            pool,
            describe,
            deadline: cfg.client_deadline(),
        };
        meta.migrate(&cfg.schema).await.map_err(|e| match e {
            MetaError::Unavailable(m) => MetaError::Unavailable(format!("{}: {m}", meta.describe)),
            other => other,
        })?;
        Ok(meta)
    }

    async fn migrate(&self, schema: &str) -> Result<(), MetaError> {
        let mut conn = self.conn().await?;
        let lock = advisory_key(&format!("migrations:{schema}"));
        let work = async {
            let tx = conn.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
                .await?;
            tx.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema};
                 CREATE TABLE IF NOT EXISTS schema_migrations (
                    version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)"
            ))
            .await?;
            let applied: i64 = tx
                .query_one(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                    &[],
                )
                .await?
                .get(0);
            for (i, sql) in MIGRATIONS.iter().enumerate() {
                let version = i as i64 + 1;
                if version > applied {
                    tx.batch_execute(sql).await?;
                    tx.execute(
                        "INSERT INTO schema_migrations (version, applied_at)
                         VALUES ($1, EXTRACT(EPOCH FROM now())::BIGINT)",
                        &[&version],
                    )
                    .await?;
                }
            }
            tx.commit().await
        };
        let result = within(self.deadline, work).await;
        conn.settle(result)
    }

    /// A pooled connection with the configured deadline.
    async fn conn(&self) -> Result<Conn, MetaError> {
        let obj = self.pool.get().await.map_err(pool_error)?;
        Ok(Conn {
            obj: Some(obj),
            deadline: self.deadline,
            stalled: AtomicBool::new(false),
        })
    }

    /// A statement's rows, the statement run on its own (autocommit). A connection lost under
    /// it (the server restarted since it was pooled, or ended the session) is retried on a
    /// fresh one, with backoff; timeouts are not, since a stalled or overloaded server would
    /// only make the client wait again. Only for statements that may run twice: reads, and
    /// writes whose second run changes nothing more (one lost in flight may have committed).
    async fn read(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, MetaError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let c = self.conn().await?;
            match within(self.deadline, rows(&*c, sql, params)).await {
                Some(Err(e)) if pg::connection_lost(&e) && attempt < READ_ATTEMPTS => {
                    self.forget_idle();
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
                result => return c.settle(result),
            }
        }
    }

    /// A write that may run twice, run as [`PostgresMeta::read`] runs a statement; it ends in
    /// `RETURNING 1`, so its rows are the rows it changed.
    async fn write_idempotent(
        &self, sql: &str, params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, MetaError> {
        debug_assert!(sql.trim_end().ends_with("RETURNING 1"), "{sql}");
        Ok(self.read(sql, params).await?.len() as u64)
    }

    /// [`PostgresMeta::read`] of at most one row.
    async fn read_opt(
        &self, sql: &str, params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, MetaError> {
        Ok(self.read(sql, params).await?.into_iter().next())
    }

    /// [`PostgresMeta::read`] of exactly one row (an aggregate).
    async fn read_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, MetaError> {
        self.read_opt(sql, params)
            .await?
            .ok_or_else(|| MetaError::Database(format!("no row from {sql}")))
    }

    /// Runs `body` in a transaction, retrying serialization failures and deadlocks, and a
    /// session lost on the way (a failover, `pg_terminate_backend`) on a fresh connection; each
    /// attempt has the client deadline. Every transaction here may run twice: one lost at
    /// COMMIT may have taken effect, and then runs again, which changes nothing more (the
    /// returned flag says this happened). A missed deadline is not retried.
    async fn in_transaction<T, F>(&self, mut body: F) -> Result<(T, bool), MetaError>
    where
        F: for<'a> FnMut(
            &'a deadpool_postgres::Transaction<'a>,
        ) -> std::pin::Pin<
            Box<dyn Future<Output = Result<T, tokio_postgres::Error>> + Send + 'a>,
        >,
    {
        #[derive(PartialEq)]
        enum Stage {
            Begin,
            Body,
            Commit,
        }
        let mut conn = self.conn().await?;
        let (mut attempt, mut replayed) = (0, false);
        loop {
            attempt += 1;
            let work = async {
                let tx = conn.transaction().await.map_err(|e| (Stage::Begin, e))?;
                let v = body(&tx).await.map_err(|e| (Stage::Body, e))?;
                tx.commit()
                    .await
                    .map(|()| v)
                    .map_err(|e| (Stage::Commit, e))
            };
            match within(self.deadline, work).await {
                Some(Ok(v)) => return Ok((v, replayed)),
                Some(Err((_, e))) if retryable(&e) && attempt < TX_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
                }
                Some(Err((stage, e))) if pg::connection_lost(&e) && attempt < TX_ATTEMPTS => {
                    replayed |= stage == Stage::Commit;
                    tracing::debug!(error = %pg::error_text(&e), "database session lost in a transaction; running it again on a new one");
                    self.forget_idle();
                    tokio::time::sleep(Duration::from_millis(20 << attempt.min(4))).await;
                    conn = self.conn().await?;
                }
                result => {
                    return conn
                        .settle(result.map(|r| r.map_err(|(_, e)| e)))
                        .map(|v| (v, replayed));
                }
            }
        }
    }

    /// Drops every idle pooled connection: after one was found closed, the others most likely
    /// died with it (a server restart) without the client having noticed yet.
    fn forget_idle(&self) {
        self.pool.retain(|_, _| false);
    }
}

/// A pooled connection whose statements are bounded by the client deadline. One that missed it
/// leaves the pool when dropped: its request may still be in flight on a stalled server or
/// network, and the next user would queue behind it.
struct Conn {
    obj: Option<deadpool_postgres::Object>,
    deadline: Option<Duration>,
    stalled: AtomicBool,
}

impl Conn {
    /// The error for a missed deadline (marking the connection), else the result.
    fn settle<T>(&self, result: Option<Result<T, tokio_postgres::Error>>) -> Result<T, MetaError> {
        match result {
            Some(r) => r.map_err(pg_error),
            None => {
                self.stalled.store(true, Ordering::Relaxed);
                Err(MetaError::Unavailable(no_answer(self.deadline)))
            }
        }
    }
}

impl std::ops::Deref for Conn {
    type Target = deadpool_postgres::Object;
    fn deref(&self) -> &Self::Target {
        self.obj.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.obj.as_mut().expect("present until dropped")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.stalled.load(Ordering::Relaxed)
            && let Some(obj) = self.obj.take()
        {
            // Detached from the pool and dropped: the connection closes.
            drop(deadpool_postgres::Object::take(obj));
        }
    }
}

/// Statements run prepared once per connection (deadpool's cache): one given as text is parsed
/// on every run, a round trip of its own.
async fn exec(
    c: &impl GenericClient, sql: &str, params: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    c.execute(&c.prepare_cached(sql).await?, params).await
}

/// [`exec`] for a statement's rows.
async fn rows(
    c: &impl GenericClient, sql: &str, params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    c.query(&c.prepare_cached(sql).await?, params).await
}

/// [`exec`] for a statement's row, if any.
async fn row_opt(
    c: &impl GenericClient, sql: &str, params: &[&(dyn ToSql + Sync)],
) -> Result<Option<Row>, tokio_postgres::Error> {
    c.query_opt(&c.prepare_cached(sql).await?, params).await
}

/// Locks the blob rows about to change, in digest order (deadlock freedom).
async fn lock_blobs(
    tx: &impl GenericClient, digests: &[&str],
) -> Result<(), tokio_postgres::Error> {
    let mut sorted: Vec<&str> = digests.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    rows(
        tx,
        "SELECT 1 FROM blobs WHERE digest = ANY($1) ORDER BY digest FOR UPDATE",
        &[&sorted],
    )
    .await?;
    Ok(())
}

async fn current_row(
    tx: &impl GenericClient, path: &str,
) -> Result<Option<(i64, String)>, tokio_postgres::Error> {
    exec(
        tx,
        "SELECT pg_advisory_xact_lock($1)",
        &[&advisory_key(&format!("path:{path}"))],
    )
    .await?;
    Ok(row_opt(
        tx,
        "SELECT version, digest FROM files WHERE path = $1",
        &[&path],
    )
    .await?
    .map(|r| (r.get(0), r.get(1))))
}

async fn unreference(
    tx: &impl GenericClient, digest: &str, now: i64,
) -> Result<(), tokio_postgres::Error> {
    exec(
        tx,
        "UPDATE blobs SET refcount = refcount - 1,
            unreferenced_since = CASE WHEN refcount - 1 <= 0 THEN $2 ELSE unreferenced_since END
         WHERE digest = $1",
        &[&digest, &now],
    )
    .await?;
    Ok(())
}

/// The statement [`blob_row_state`] runs.
fn blob_state_sql() -> String {
    format!(
        "SELECT state, deletion, settles_at - {NOW_MS}, stored_size FROM blobs WHERE digest = $1"
    )
}

/// A blob row's state and stored size (`None`: no row).
fn row_state(row: Option<&Row>) -> (BlobState, Option<u64>) {
    match row {
        None => (BlobState::Absent, None),
        Some(r) => (
            state_of(r.get::<_, String>(0) == "live", r.get(1), r.get(2)),
            Some(r.get::<_, i64>(3) as u64),
        ),
    }
}

/// The blob's state and stored size, as a writer must find it.
async fn blob_row_state(
    c: &impl GenericClient, digest: &str,
) -> Result<(BlobState, Option<u64>), tokio_postgres::Error> {
    let row = row_opt(c, &blob_state_sql(), &[&digest]).await?;
    Ok(row_state(row.as_ref()))
}

/// The columns [`blob_row`] reads.
const BLOB_ROW: &str = "SELECT digest, logical_size, stored_size, refcount, state,
        unreferenced_since, created_at, content IS NOT NULL FROM blobs";

fn blob_row(r: &Row) -> Result<BlobRow, MetaError> {
    Ok(BlobRow {
        info: BlobInfo {
            digest: parse_digest(r.get(0))?,
            logical_size: r.get::<_, i64>(1) as u64,
            stored_size: r.get::<_, i64>(2) as u64,
        },
        refcount: r.get(3),
        live: r.get::<_, String>(4) == "live",
        unreferenced_since: r.get(5),
        created_at: r.get(6),
        inline: r.get(7),
    })
}

#[async_trait]
impl MetaStore for PostgresMeta {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn get_file(&self, path: &str) -> Result<Option<FileEntry>, MetaError> {
        let row = self
            .read_opt(
                "SELECT f.version, f.digest, b.logical_size, b.stored_size, b.content
                 FROM files f JOIN blobs b ON b.digest = f.digest WHERE f.path = $1",
                &[&path],
            )
            .await?;
        row.map(|r| {
            Ok(FileEntry {
                path: path.to_owned(),
                version: r.get(0),
                blob: BlobInfo {
                    digest: parse_digest(r.get(1))?,
                    logical_size: r.get::<_, i64>(2) as u64,
                    stored_size: r.get::<_, i64>(3) as u64,
                },
                inline: r.get::<_, Option<Vec<u8>>>(4).map(Bytes::from),
            })
        })
        .transpose()
    }

    async fn blob_is_live(&self, digest: &Digest) -> Result<bool, MetaError> {
        let row = self
            .read_opt(
                "SELECT 1 FROM blobs WHERE digest = $1 AND state = 'live'",
                &[&digest.to_hex()],
            )
            .await?;
        Ok(row.is_some())
    }

    async fn blob_state(&self, lock: HeldBlob<'_>) -> Result<BlobState, MetaError> {
        let row = self
            .read_opt(&blob_state_sql(), &[&lock.digest().to_hex()])
            .await?;
        Ok(row_state(row.as_ref()).0)
    }

    async fn store_file(
        &self, path: &str, version: Version, blob: &BlobInfo, stored: Stored<'_>, now: i64,
        kind: PutKind,
    ) -> Result<PutResult, MetaError> {
        stored.check(blob)?;
        let basis = stored.basis();
        let content = stored.content();
        let digest = blob.digest.to_hex();
        let blob = *blob;
        let (logical, size) = (blob.logical_size as i64, blob.stored_size as i64);
        let (result, _) = self
            .in_transaction(|tx| {
                let digest = digest.clone();
                let path = path.to_owned();
                let content = content.clone();
                Box::pin(async move {
                    let path = path.as_str();
                    let current = current_row(tx, path).await?;
                    let old = current.as_ref().map(|(_, d)| d.as_str());
                    let touched: Vec<&str> =
                        [Some(digest.as_str()), old].into_iter().flatten().collect();
                    lock_blobs(tx, &touched).await?;
                    let (found, found_size) = blob_row_state(tx, &digest).await?;
                    let mut plan = plan_blob(basis, found, found_size, &blob);
                    if plan == BlobPlan::Insert
                        && exec(
                            tx,
                            "INSERT INTO blobs (digest, logical_size, stored_size, refcount,
                                state, unreferenced_since, created_at, content)
                             VALUES ($1, $2, $3, 0, 'live', $4, $4, $5)
                             ON CONFLICT (digest) DO NOTHING",
                            &[&digest, &logical, &size, &now, &content],
                        )
                        .await?
                            == 0
                    {
                        // Another transaction inserted the row since ours looked (a
                        // concurrent upload, or an orphan's tombstone): judge by that row.
                        let (found, found_size) = blob_row_state(tx, &digest).await?;
                        plan = plan_blob(basis, found, found_size, &blob);
                    }
                    match plan {
                        BlobPlan::Conflict(found) => return Ok(PutResult::Conflict(found)),
                        BlobPlan::Reference | BlobPlan::Insert => {}
                        BlobPlan::Revive { deletion } => {
                            exec(
                                tx,
                                "UPDATE blobs SET state = 'live', deletion = NULL,
                                    settles_at = NULL, object_deleted = false,
                                    logical_size = $2, stored_size = $3, unreferenced_since = $4,
                                    content = $6
                                 WHERE digest = $1 AND state = 'deleting'
                                    AND COALESCE(deletion, 0) = $5",
                                &[&digest, &logical, &size, &now, &deletion, &content],
                            )
                            .await?;
                        }
                        BlobPlan::Resize => {
                            exec(
                                tx,
                                "UPDATE blobs SET logical_size = $2, stored_size = $3, content = $4
                                 WHERE digest = $1 AND state = 'live'",
                                &[&digest, &logical, &size, &content],
                            )
                            .await?;
                        }
                    }
                    let imported = kind == PutKind::Import;
                    let deleted: Option<i64> = if kind == PutKind::Import {
                        row_opt(
                            tx,
                            "SELECT version FROM deleted_paths WHERE path = $1",
                            &[&path],
                        )
                        .await?
                        .map(|r| r.get(0))
                    } else {
                        None
                    };
                    let plan = plan_put(
                        current.as_ref().map(|(v, d)| (*v, d.as_str())),
                        deleted,
                        version,
                        &digest,
                    );
                    match &plan {
                        PutPlan::Keep { .. } | PutPlan::Deleted { .. } => {}
                        PutPlan::Touch => {
                            exec(
                                tx,
                                "UPDATE files SET version = $2, imported = $3 WHERE path = $1",
                                &[&path, &version, &imported],
                            )
                            .await?;
                        }
                        PutPlan::Replace { old } => {
                            exec(
                                tx,
                                "INSERT INTO files (path, version, digest, imported)
                                 VALUES ($1, $2, $3, $4)
                                 ON CONFLICT (path) DO UPDATE SET version = EXCLUDED.version,
                                    digest = EXCLUDED.digest, imported = EXCLUDED.imported",
                                &[&path, &version, &digest, &imported],
                            )
                            .await?;
                            exec(
                                tx,
                                "UPDATE blobs SET refcount = refcount + 1, unreferenced_since = NULL
                                 WHERE digest = $1",
                                &[&digest],
                            )
                            .await?;
                            if let Some(old) = old {
                                unreference(tx, old, now).await?;
                            }
                        }
                    }
                    Ok(PutResult::Done(plan.outcome(version)))
                })
            })
            .await?;
        Ok(result)
    }

    async fn delete_file(
        &self, path: &str, version: Version, now: i64, kind: DeleteKind,
    ) -> Result<DeleteOutcome, MetaError> {
        let (outcome, replayed) = self
            .in_transaction(|tx| {
                let path = path.to_owned();
                Box::pin(async move {
                    let path = path.as_str();
                    let current = current_row(tx, path).await?;
                    let plan = plan_delete(current, version, kind);
                    if let DeletePlan::Remove { digest } = &plan {
                        lock_blobs(tx, &[digest]).await?;
                        exec(tx, "DELETE FROM files WHERE path = $1", &[&path]).await?;
                        unreference(tx, digest, now).await?;
                    }
                    if plan.remembers() {
                        let sql = "INSERT INTO deleted_paths (path, version, deleted_at)
                            VALUES ($1, $2, $3)
                            ON CONFLICT (path) DO UPDATE SET deleted_at = EXCLUDED.deleted_at,
                               version = GREATEST(deleted_paths.version, EXCLUDED.version)";
                        exec(tx, sql, &[&path, &version, &now]).await?;
                    }
                    Ok(plan.outcome())
                })
            })
            .await?;
        // Run again after a COMMIT that was lost on the way and had taken effect: the path is
        // gone because of this very delete.
        Ok(match outcome {
            DeleteOutcome::NotFound if replayed => DeleteOutcome::Deleted,
            other => other,
        })
    }

    async fn list_files(&self, page: &ListPage<'_>) -> Result<Vec<String>, MetaError> {
        let (start, end) = page.range();
        let (cutoff, limit) = (page.cutoff, page.limit as i64);
        let rows = match end {
            Some(end) => {
                self.read(
                    "SELECT path FROM files WHERE path > $1 AND path < $2 AND version <= $3
                     ORDER BY path LIMIT $4",
                    &[&start, &end, &cutoff, &limit],
                )
                .await?
            }
            None => {
                self.read(
                    "SELECT path FROM files WHERE path > $1 AND version <= $2
                     ORDER BY path LIMIT $3",
                    &[&start, &cutoff, &limit],
                )
                .await?
            }
        };
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn list_blobs(
        &self, after: Option<&Digest>, limit: usize,
    ) -> Result<Vec<BlobRow>, MetaError> {
        let after = after.map(Digest::to_hex).unwrap_or_default();
        let rows = self
            .read(
                &format!("{BLOB_ROW} WHERE digest > $1 ORDER BY digest LIMIT $2"),
                &[&after, &(limit as i64)],
            )
            .await?;
        rows.iter().map(blob_row).collect()
    }

    async fn get_blob(&self, digest: &Digest) -> Result<Option<BlobRow>, MetaError> {
        let row = self
            .read_opt(
                &format!("{BLOB_ROW} WHERE digest = $1"),
                &[&digest.to_hex()],
            )
            .await?;
        row.as_ref().map(blob_row).transpose()
    }

    async fn unreferenced_blobs(
        &self, cutoff: i64, after: Option<&Digest>, limit: usize,
    ) -> Result<Vec<BlobInfo>, MetaError> {
        let after = after.map(Digest::to_hex).unwrap_or_default();
        let rows = self
            .read(
                "SELECT digest, logical_size, stored_size FROM blobs
                 WHERE digest > $1 AND refcount <= 0 AND (
                    (state = 'deleting' AND NOT object_deleted)
                    OR (state = 'live' AND unreferenced_since <= $2))
                 ORDER BY digest LIMIT $3",
                &[&after, &cutoff, &(limit as i64)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(BlobInfo {
                    digest: parse_digest(r.get(0))?,
                    logical_size: r.get::<_, i64>(1) as u64,
                    stored_size: r.get::<_, i64>(2) as u64,
                })
            })
            .collect()
    }

    async fn waiting_blobs(&self, cutoff: i64) -> Result<(u64, u64), MetaError> {
        let sql = "SELECT COUNT(*), COALESCE(SUM(stored_size), 0)::BIGINT FROM blobs
                   WHERE refcount <= 0 AND state = 'live' AND unreferenced_since > $1";
        let rows = self.read(sql, &[&cutoff]).await?;
        let row = rows
            .first()
            .ok_or_else(|| MetaError::Inconsistent("no row from COUNT".into()))?;
        Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
    }

    async fn inline_content(&self, digest: &Digest) -> Result<Option<Bytes>, MetaError> {
        let row = self
            .read_opt(
                "SELECT content FROM blobs WHERE digest = $1 AND state = 'live'",
                &[&digest.to_hex()],
            )
            .await?;
        Ok(row
            .and_then(|r| r.get::<_, Option<Vec<u8>>>(0))
            .map(Bytes::from))
    }

    async fn tombstone_blob(
        &self, lock: &BlobLock<Exclusive>, cutoff: i64, settle: Duration,
    ) -> Result<Option<Deletion>, MetaError> {
        let digest = lock.digest().to_hex();
        let removed = self
            .write_idempotent(
                "DELETE FROM blobs WHERE digest = $1 AND content IS NOT NULL AND refcount <= 0
                    AND state = 'live' AND unreferenced_since <= $2
                 RETURNING 1",
                &[&digest, &cutoff],
            )
            .await?;
        if removed == 1 {
            return Ok(Some(Deletion::Removed));
        }
        let settle = settle.as_millis() as i64;
        let id = new_deletion_id();
        // Run twice, the second run makes the same tombstone with the same id.
        let sql = format!(
            "UPDATE blobs SET state = 'deleting', deletion = $3, settles_at = {NOW_MS} + $4,
                object_deleted = false
             WHERE digest = $1 AND refcount <= 0 AND (
                (state = 'deleting' AND NOT object_deleted AND COALESCE(deletion, 0) <> $3)
                OR (state = 'live' AND unreferenced_since <= $2))
             RETURNING 1"
        );
        let n = self
            .write_idempotent(&sql, &[&digest, &cutoff, &id, &settle])
            .await?;
        if n == 1 {
            return Ok(Some(Deletion::Tombstone(id)));
        }
        // Zero rows: refused, or a first run committed whose answer was lost.
        let row = self.read_opt(&blob_state_sql(), &[&digest]).await?;
        Ok(match row_state(row.as_ref()).0 {
            BlobState::Tombstone { deletion, .. } if deletion == id => {
                Some(Deletion::Tombstone(id))
            }
            _ => None,
        })
    }

    async fn tombstone_orphans(
        &self, orphans: &[(&BlobLock<Exclusive>, u64)], settle: Duration, now: i64,
    ) -> Result<Vec<(Digest, i64)>, MetaError> {
        let orphans: Vec<(Digest, i64)> = orphans
            .iter()
            .map(|(lock, size)| (*lock.digest(), *size as i64))
            .collect();
        let settle = settle.as_millis() as i64;
        let (made, _) = self
            .in_transaction(|tx| {
                let orphans = orphans.clone();
                Box::pin(async move {
                    let sql = format!(
                        "INSERT INTO blobs (digest, logical_size, stored_size, refcount, state,
                            unreferenced_since, created_at, deletion, settles_at)
                         VALUES ($1, 0, $2, 0, 'deleting', $3, $3, $4, {NOW_MS} + $5)
                         ON CONFLICT (digest) DO NOTHING"
                    );
                    let mut made = Vec::new();
                    for (digest, size) in orphans {
                        let id = new_deletion_id();
                        let hex = digest.to_hex();
                        if exec(tx, &sql, &[&hex, &size, &now, &id, &settle]).await? == 1 {
                            made.push((digest, id));
                        }
                    }
                    Ok(made)
                })
            })
            .await?;
        Ok(made)
    }

    async fn finish_deletion(
        &self, digest: &Digest, deletion: i64, settled: bool,
    ) -> Result<bool, MetaError> {
        let sql = format!(
            "UPDATE blobs SET object_deleted = true,
                settles_at = CASE WHEN $3 THEN LEAST(settles_at, {NOW_MS}) ELSE settles_at END
             WHERE digest = $1 AND state = 'deleting' AND COALESCE(deletion, 0) = $2
             RETURNING 1"
        );
        let n = self
            .write_idempotent(&sql, &[&digest.to_hex(), &deletion, &settled])
            .await?;
        Ok(n == 1)
    }

    async fn purge_tombstones(&self, keep: Duration) -> Result<u64, MetaError> {
        let sql = format!(
            "DELETE FROM blobs WHERE state = 'deleting' AND object_deleted
                AND refcount <= 0 AND COALESCE(settles_at, 0) < {NOW_MS} - $1
             RETURNING 1"
        );
        self.write_idempotent(&sql, &[&(keep.as_millis() as i64)])
            .await
    }

    async fn known_blobs(&self, digests: &[Digest]) -> Result<Vec<Digest>, MetaError> {
        let hexes: Vec<String> = digests.iter().map(Digest::to_hex).collect();
        let rows = self
            .read("SELECT digest FROM blobs WHERE digest = ANY($1)", &[&hexes])
            .await?;
        rows.iter().map(|r| parse_digest(r.get(0))).collect()
    }

    async fn stats(&self) -> Result<Stats, MetaError> {
        let r = self
            .read_one(
                "SELECT
                    (SELECT COUNT(*) FROM files),
                    (SELECT COUNT(*) FROM blobs WHERE state = 'live'),
                    (SELECT COALESCE(SUM(logical_size), 0)::BIGINT FROM blobs WHERE state = 'live'),
                    (SELECT COALESCE(SUM(stored_size), 0)::BIGINT FROM blobs WHERE state = 'live'),
                    (SELECT COALESCE(SUM(b.logical_size), 0)::BIGINT
                       FROM files f JOIN blobs b ON b.digest = f.digest)",
                &[],
            )
            .await?;
        Ok(Stats {
            files: r.get::<_, i64>(0) as u64,
            blobs: r.get::<_, i64>(1) as u64,
            logical_bytes: r.get::<_, i64>(2) as u64,
            stored_bytes: r.get::<_, i64>(3) as u64,
            referenced_bytes: r.get::<_, i64>(4) as u64,
        })
    }

    async fn refcount_mismatches(&self) -> Result<Vec<(Digest, i64, i64)>, MetaError> {
        let rows = self
            .read(
                "SELECT b.digest, b.refcount, COUNT(f.path) AS actual
                 FROM blobs b LEFT JOIN files f ON f.digest = b.digest
                 GROUP BY b.digest, b.refcount HAVING b.refcount != COUNT(f.path)
                 UNION ALL
                 SELECT f.digest, 0, COUNT(*) FROM files f LEFT JOIN blobs b ON b.digest = f.digest
                 WHERE b.digest IS NULL GROUP BY f.digest",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((parse_digest(r.get(0))?, r.get(1), r.get(2))))
            .collect()
    }

    async fn deleted_version(&self, path: &str) -> Result<Option<Version>, MetaError> {
        let row = self
            .read_opt(
                "SELECT version FROM deleted_paths WHERE path = $1",
                &[&path],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn list_deletions(
        &self, after: &str, limit: usize,
    ) -> Result<Vec<(String, Version)>, MetaError> {
        let sql = "SELECT path, version FROM deleted_paths WHERE path > $1 ORDER BY path LIMIT $2";
        let rows = self.read(sql, &[&after, &(limit as i64)]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn list_imported(
        &self, after: &str, limit: usize,
    ) -> Result<Vec<(String, Version)>, MetaError> {
        let sql = "SELECT path, version FROM files WHERE path > $1 AND imported
                   ORDER BY path LIMIT $2";
        let rows = self.read(sql, &[&after, &(limit as i64)]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn purge_deletions(&self, before: i64) -> Result<u64, MetaError> {
        let sql = "DELETE FROM deleted_paths WHERE deleted_at < $1 RETURNING 1";
        self.write_idempotent(sql, &[&before]).await
    }

    async fn checkpoint(&self, source: &str) -> Result<Option<String>, MetaError> {
        let row = self
            .read_opt(
                "SELECT position FROM migration_checkpoints WHERE source = $1",
                &[&source],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn set_checkpoint(
        &self, source: &str, position: Option<&str>, now: i64,
    ) -> Result<(), MetaError> {
        let position = position.map(str::to_owned);
        self.in_transaction(|tx| {
            let (source, position) = (source.to_owned(), position.clone());
            Box::pin(async move {
                match position {
                    Some(p) => {
                        let sql = "INSERT INTO migration_checkpoints (source, position, updated_at)
                             VALUES ($1, $2, $3) ON CONFLICT (source) DO UPDATE
                             SET position = EXCLUDED.position, updated_at = EXCLUDED.updated_at";
                        exec(tx, sql, &[&source, &p, &now]).await
                    }
                    None => {
                        let sql = "DELETE FROM migration_checkpoints WHERE source = $1";
                        exec(tx, sql, &[&source]).await
                    }
                }
            })
        })
        .await?;
        Ok(())
    }

    async fn check(&self) -> Result<(), MetaError> {
        self.read_one("SELECT COUNT(*) FROM schema_migrations", &[])
            .await?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Settings for the PostgreSQL that `pg_virtualenv` (tests/run-all.sh) provides through the
    /// libpq environment variables; a fresh schema per call.
    pub(crate) fn test_config() -> PostgresConfig {
        let var = |k: &str| std::env::var(k).ok();
        let Some(host) = var("PGHOST") else {
            panic!(
                "PostgreSQL tests need PGHOST etc.: run them through tests/run-all.sh (pg_virtualenv)"
            );
        };
        let url = format!(
            "host={host} port={} user={} dbname={}",
            var("PGPORT").unwrap_or_else(|| "5432".into()),
            var("PGUSER").unwrap_or_else(|| "postgres".into()),
            var("PGDATABASE").unwrap_or_else(|| "postgres".into()),
        );
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        PostgresConfig {
            url,
            password: crate::config::Secret(var("PGPASSWORD").unwrap_or_default()),
            schema: format!("t{}_{n}", std::process::id()),
            pool_size: 4,
            ..PostgresConfig::default()
        }
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL: run through tests/run-all.sh"]
    async fn conformance_suite() {
        super::super::conformance::run_all(async || -> Box<dyn MetaStore> {
            let cfg = test_config();
            Box::new(
                PostgresMeta::connect(&cfg, crate::secrets::tests::password(&cfg))
                    .await
                    .unwrap(),
            ) as Box<dyn MetaStore>
        })
        .await;
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL: run through tests/run-all.sh"]
    async fn concurrent_starts_migrate_once_and_concurrent_writers_agree() {
        let cfg = test_config();
        let pw = crate::secrets::tests::password(&cfg);
        let (a, b) = tokio::join!(
            PostgresMeta::connect(&cfg, pw.clone()),
            PostgresMeta::connect(&cfg, pw.clone())
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        // Many writers moving references between two blobs on overlapping paths.
        let x = BlobInfo {
            digest: Digest([1; 32]),
            logical_size: 1,
            stored_size: 21,
        };
        let y = BlobInfo {
            digest: Digest([2; 32]),
            logical_size: 2,
            stored_size: 22,
        };
        super::super::conformance::put(&a, "/seed-x", 1, &x, true, 0, PutKind::Client)
            .await
            .unwrap();
        super::super::conformance::put(&a, "/seed-y", 1, &y, true, 0, PutKind::Client)
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let m = if i % 2 == 0 { &a } else { &b };
            let blob = if i % 3 == 0 { x } else { y };
            let path = format!("/p{}", i % 7);
            tasks.push(async move {
                if i % 5 == 4 {
                    m.delete_file(&path, i, 0, DeleteKind::Client)
                        .await
                        .map(|_| ())
                } else {
                    super::super::conformance::put(
                        m,
                        &path,
                        i / 2,
                        &blob,
                        false,
                        0,
                        PutKind::Client,
                    )
                    .await
                    .map(|_| ())
                }
            });
        }
        for r in futures::future::join_all(tasks).await {
            r.unwrap();
        }
        assert_eq!(a.refcount_mismatches().await.unwrap(), vec![]);
        let n: i64 = a
            .conn()
            .await
            .unwrap()
            .query_one("SELECT COUNT(*) FROM schema_migrations", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, MIGRATIONS.len() as i64);
    }

    /// A PUT's and a delete's statements are prepared once per connection and kept, not sent
    /// as text (prepared, run and closed again: a round trip more each, every time).
    #[tokio::test]
    #[ignore = "needs PostgreSQL: run through tests/run-all.sh"]
    async fn transaction_statements_are_prepared_once_per_connection() {
        let cfg = PostgresConfig {
            pool_size: 1,
            ..test_config()
        };
        let meta = PostgresMeta::connect(&cfg, crate::secrets::tests::password(&cfg))
            .await
            .unwrap();
        let blob = |n| BlobInfo {
            digest: Digest([n; 32]),
            logical_size: 1,
            stored_size: 21,
        };
        for round in 1..=3 {
            super::super::conformance::put(
                &meta,
                "/a",
                round,
                &blob(round as u8),
                true,
                0,
                PutKind::Client,
            )
            .await
            .unwrap();
            super::super::conformance::put(
                &meta,
                "/b",
                round,
                &blob(9),
                round == 1,
                0,
                PutKind::Client,
            )
            .await
            .unwrap();
            meta.delete_file("/b", round, 0, DeleteKind::Client)
                .await
                .unwrap();
        }
        // The only connection: the one that ran them all.
        let kept: Vec<String> = meta
            .conn()
            .await
            .unwrap()
            .query("SELECT statement FROM pg_prepared_statements", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        for wanted in [
            "pg_advisory_xact_lock",
            "FOR UPDATE",
            "INSERT INTO blobs",
            "INSERT INTO files",
            "refcount = refcount + 1",
            "refcount = refcount - 1",
            "DELETE FROM files",
            "INSERT INTO deleted_paths",
        ] {
            let n = kept.iter().filter(|s| s.contains(wanted)).count();
            assert_eq!(n, 1, "statements with {wanted:?} kept: {kept:#?}");
        }
    }

    #[tokio::test]
    async fn unreachable_server_is_unavailable() {
        let cfg = PostgresConfig {
            url: "host=127.0.0.1 port=1 user=x dbname=x".into(),
            connect_timeout_secs: 1,
            ..PostgresConfig::default()
        };
        let e = PostgresMeta::connect(&cfg, None).await.err().unwrap();
        assert!(matches!(e, MetaError::Unavailable(_)), "{e}");
        assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
    }
}
