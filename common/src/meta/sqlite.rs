//! Metadata in one SQLite file (WAL mode), shared by the three programs on one host.
//!
//! Writes go through one connection owned by a writer thread that commits them in groups: every
//! write queued while the previous transaction was committing joins the next one, each in a
//! savepoint of its own, so a burst of PUTs shares one WAL fsync instead of paying one each.
//! Reads use a small pool on the blocking pool.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{
    BlobPlan, BlobRow, BlobState, DeleteKind, DeleteOutcome, DeletePlan, Deletion, FileEntry,
    ListPage, MetaError, MetaStore, PutKind, PutPlan, PutResult, Stats, Stored, new_deletion_id,
    plan_blob, plan_delete, plan_put, state_of, unix_now_ms,
};
use crate::blob::{BlobInfo, Digest};
use crate::config::SqliteSync;
use crate::locks::{BlobLock, Exclusive, HeldBlob};
use crate::protocol::Version;

/// Versioned schema changes, applied in order, each once, each in its own transaction.
const MIGRATIONS: &[&str] = &[
    // 1: files and blobs.
    "CREATE TABLE blobs (
        digest TEXT PRIMARY KEY NOT NULL,
        logical_size INTEGER NOT NULL,
        stored_size INTEGER NOT NULL,
        refcount INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'live' CHECK (state IN ('live', 'deleting')),
        unreferenced_since INTEGER,
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE files (
        path TEXT PRIMARY KEY NOT NULL,
        version INTEGER NOT NULL,
        digest TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX files_by_digest ON files (digest);
    CREATE INDEX blobs_unreferenced ON blobs (unreferenced_since) WHERE refcount = 0;",
    // 2: remembered deletions (so imports do not resurrect them) and migration checkpoints.
    "CREATE TABLE deleted_paths (
        path TEXT PRIMARY KEY NOT NULL,
        version INTEGER NOT NULL,
        deleted_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX deleted_paths_by_age ON deleted_paths (deleted_at);
    CREATE TABLE migration_checkpoints (
        source TEXT PRIMARY KEY NOT NULL,
        position TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    ) WITHOUT ROWID;",
    // 3: tombstones name their deletion, say until when its delete requests may land (Unix
    // ms), and whether the object was seen deleted; such rows stay a while after that.
    "ALTER TABLE blobs ADD COLUMN deletion INTEGER;
    ALTER TABLE blobs ADD COLUMN settles_at INTEGER;
    ALTER TABLE blobs ADD COLUMN object_deleted INTEGER NOT NULL DEFAULT 0;",
    // 4: files that came from an import and were not written by a client since (a final delta
    // reports those the source no longer has).
    "ALTER TABLE files ADD COLUMN imported INTEGER NOT NULL DEFAULT 0;",
    // 5: small contents kept in the database, beside their live blob row (none: the content
    // is the object). A table of its own with rowids: in the blobs table (WITHOUT ROWID, whose
    // rows keep at most about a quarter page in place) each 1-5 KiB content took an overflow
    // page of its own, 4.7 KB a content.
    "CREATE TABLE blob_contents (
        digest TEXT PRIMARY KEY NOT NULL,
        content BLOB NOT NULL
    );",
];

/// Writes one group commit takes at most, so one transaction never keeps other processes (the
/// cleaner, the migrator) waiting for long.
const MAX_GROUP: usize = 64;
/// Writes queued for the writer thread before callers wait to queue.
const WRITE_QUEUE: usize = 256;

/// Every GET's lookup. Scalar subqueries, not a join: the bundled SQLite (STAT4) re-prepares
/// `files JOIN blobs ... WHERE path = ?1` on every run, which cost 4× the lookup itself.
const GET_FILE: &str = "SELECT version, digest,
        (SELECT logical_size FROM blobs b WHERE b.digest = f.digest),
        (SELECT stored_size FROM blobs b WHERE b.digest = f.digest),
        (SELECT content FROM blob_contents c WHERE c.digest = f.digest)
    FROM files f WHERE path = ?1";

/// SQLite-backed [`MetaStore`].
pub struct SqliteMeta {
    path: PathBuf,
    writes: mpsc::Sender<Box<dyn WriteJob>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    reader_slots: Arc<Semaphore>,
}

fn db_error(e: rusqlite::Error) -> MetaError {
    use rusqlite::ErrorCode as C;
    match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            C::DatabaseBusy
            | C::DatabaseLocked
            | C::CannotOpen
            | C::DiskFull
            | C::SystemIoFailure
            | C::ReadOnly
            | C::PermissionDenied
            | C::OutOfMemory => MetaError::Unavailable(e.to_string()),
            _ => MetaError::Database(e.to_string()),
        },
        _ => MetaError::Database(e.to_string()),
    }
}

fn open_connection(path: &Path, opts: &SqliteOptions) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(opts.busy_timeout)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let sync = match opts.synchronous {
        SqliteSync::Full => "FULL",
        SqliteSync::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    Ok(conn)
}

/// Applies pending migrations. `BEGIN IMMEDIATE` serializes processes starting at once.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )?;
    let applied: i64 = tx.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let version = i as i64 + 1;
        if version > applied {
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, unixepoch())",
                [version],
            )?;
        }
    }
    tx.commit()
}

fn parse_digest(s: String) -> rusqlite::Result<Digest> {
    s.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// How to open the database.
#[derive(Debug, Clone, Copy)]
pub struct SqliteOptions {
    /// Read connections in the pool.
    pub readers: usize,
    pub synchronous: SqliteSync,
    /// How long a statement waits for another process's write lock before failing.
    pub busy_timeout: Duration,
}

impl From<&crate::config::SqliteConfig> for SqliteOptions {
    fn from(c: &crate::config::SqliteConfig) -> Self {
        SqliteOptions {
            readers: c.readers,
            synchronous: c.synchronous,
            busy_timeout: Duration::from_millis(c.busy_timeout_ms),
        }
    }
}

impl SqliteMeta {
    /// A page of `(path, version)` rows of `sql`, whose `?1` is the path to start after and
    /// `?2` the page size.
    async fn path_versions(
        &self, sql: &'static str, after: &str, limit: usize,
    ) -> Result<Vec<(String, Version)>, MetaError> {
        let after = after.to_owned();
        self.read(move |c| {
            c.prepare_cached(sql)?
                .query_map(params![after, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect()
        })
        .await
    }

    /// Opens (creating and migrating) the database file.
    pub async fn open(path: &Path, opts: SqliteOptions) -> Result<Self, MetaError> {
        let path = path.to_owned();
        let p = path.clone();
        let (writer, pool) = tokio::task::spawn_blocking(move || {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    MetaError::Unavailable(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
            let ctx = |e: rusqlite::Error| match db_error(e) {
                MetaError::Unavailable(m) => {
                    MetaError::Unavailable(format!("{}: {m}", p.display()))
                }
                other => other,
            };
            let mut writer = open_connection(&p, &opts).map_err(ctx)?;
            migrate(&mut writer).map_err(ctx)?;
            let pool = (0..opts.readers)
                .map(|_| open_connection(&p, &opts))
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(ctx)?;
            Ok::<_, MetaError>((writer, pool))
        })
        .await
        .map_err(|e| MetaError::Database(e.to_string()))??;
        let writes = crate::group::spawn("sqlite-writer", WRITE_QUEUE, MAX_GROUP, move |group| {
            write_group(&writer, group)
        })
        .map_err(|e| MetaError::Database(format!("cannot start the SQLite writer: {e}")))?;
        Ok(SqliteMeta {
            path,
            writes,
            reader_slots: Arc::new(Semaphore::new(pool.len())),
            readers: Arc::new(Mutex::new(pool)),
        })
    }

    async fn read<T, F>(&self, f: F) -> Result<T, MetaError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let _slot = self
            .reader_slots
            .acquire()
            .await
            .map_err(|e| MetaError::Database(e.to_string()))?;
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let conn = readers
                .lock()
                .map_err(|_| MetaError::Database("reader pool poisoned".into()))?
                .pop()
                .ok_or_else(|| MetaError::Database("reader pool empty".into()))?;
            let result = f(&conn).map_err(db_error);
            if let Ok(mut pool) = readers.lock() {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|e| MetaError::Database(e.to_string()))?
    }

    /// Runs `f` inside the writer's current transaction and answers once that transaction is
    /// committed. An error from `f` rolls back only `f`'s own changes.
    async fn write<T, F>(&self, f: F) -> Result<T, MetaError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, MetaError> + Send + 'static,
    {
        let stopped = || MetaError::Database("the SQLite writer thread stopped".into());
        let (reply, answer) = oneshot::channel();
        let job = Pending {
            f: Some(f),
            result: None,
            reply,
        };
        self.writes
            .send(Box::new(job))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// A write waiting for, or part of, a group commit.
trait WriteJob: Send {
    /// Applies the write; false when it failed (and must be rolled back).
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller once the group's fate is known.
    fn finish(self: Box<Self>, committed: Result<(), &MetaError>);
}

struct Pending<T, F> {
    f: Option<F>,
    result: Option<Result<T, MetaError>>,
    reply: oneshot::Sender<Result<T, MetaError>>,
}

impl<T, F> WriteJob for Pending<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, MetaError> + Send + 'static,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let r = match self.f.take() {
            Some(f) => f(conn),
            None => Err(MetaError::Database("write ran twice".into())),
        };
        let ok = r.is_ok();
        self.result = Some(r);
        ok
    }

    fn finish(self: Box<Self>, committed: Result<(), &MetaError>) {
        let answer = match (self.result, committed) {
            (Some(Err(e)), _) => Err(e),
            (_, Err(e)) => Err(e.clone()),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (None, Ok(())) => Err(MetaError::Database("the write panicked".into())),
        };
        // The caller may have gone away; the write stands either way.
        let _ = self.reply.send(answer);
    }
}

/// Prepares (once per connection) and runs one statement.
fn exec(c: &Connection, sql: &str, p: impl rusqlite::Params) -> rusqlite::Result<usize> {
    c.prepare_cached(sql)?.execute(p)
}

/// Applies a group of writes, each in its own savepoint, inside one `BEGIN IMMEDIATE`
/// transaction; commits; then answers them all.
fn write_group(conn: &Connection, mut group: Vec<Box<dyn WriteJob>>) {
    let committed = commit_group(conn, &mut group);
    if committed.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    for job in group {
        job.finish(committed.as_ref().map(|_| ()));
    }
}

fn commit_group(conn: &Connection, group: &mut [Box<dyn WriteJob>]) -> Result<(), MetaError> {
    exec(conn, "BEGIN IMMEDIATE", []).map_err(db_error)?;
    for job in group.iter_mut() {
        exec(conn, "SAVEPOINT write", []).map_err(db_error)?;
        // A panicking write fails alone instead of taking the writer thread down.
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run(conn)))
            .unwrap_or(false);
        if !ok {
            if conn.is_autocommit() {
                // Some errors (disk full, I/O) make SQLite roll back the whole transaction.
                return Err(MetaError::Unavailable(
                    "SQLite rolled back the transaction after a failed write".into(),
                ));
            }
            exec(conn, "ROLLBACK TO write", []).map_err(db_error)?;
        }
        exec(conn, "RELEASE write", []).map_err(db_error)?;
    }
    exec(conn, "COMMIT", []).map_err(db_error)?;
    Ok(())
}

/// Drops one reference from `digest`, stamping when it became unreferenced.
fn unreference(tx: &Connection, digest: &str, now: i64) -> rusqlite::Result<()> {
    exec(
        tx,
        "UPDATE blobs SET refcount = refcount - 1,
            unreferenced_since = CASE WHEN refcount - 1 <= 0 THEN ?2 ELSE unreferenced_since END
         WHERE digest = ?1",
        params![digest, now],
    )?;
    Ok(())
}

/// Makes `content` the bytes the database keeps for `digest` (`None`: none, it is an object).
fn set_content(tx: &Connection, digest: &str, content: Option<&[u8]>) -> rusqlite::Result<()> {
    match content {
        Some(bytes) => exec(
            tx,
            "INSERT INTO blob_contents (digest, content) VALUES (?1, ?2)
             ON CONFLICT (digest) DO UPDATE SET content = excluded.content",
            params![digest, bytes],
        )?,
        None => exec(
            tx,
            "DELETE FROM blob_contents WHERE digest = ?1",
            params![digest],
        )?,
    };
    Ok(())
}

/// The columns [`blob_row`] reads.
const BLOB_ROW: &str = "SELECT digest, logical_size, stored_size, refcount, state,
        unreferenced_since, created_at,
        EXISTS (SELECT 1 FROM blob_contents c WHERE c.digest = blobs.digest) FROM blobs";

fn blob_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BlobRow> {
    Ok(BlobRow {
        info: BlobInfo {
            digest: parse_digest(r.get(0)?)?,
            logical_size: r.get::<_, i64>(1)? as u64,
            stored_size: r.get::<_, i64>(2)? as u64,
        },
        refcount: r.get(3)?,
        live: r.get::<_, String>(4)? == "live",
        unreferenced_since: r.get(5)?,
        created_at: r.get(6)?,
        inline: r.get(7)?,
    })
}

/// The blob's state and stored size, as a writer must find it.
fn blob_row_state(c: &Connection, digest: &str) -> rusqlite::Result<(BlobState, Option<u64>)> {
    let row = c
        .prepare_cached(
            "SELECT state, deletion, settles_at, stored_size FROM blobs WHERE digest = ?1",
        )?
        .query_row([digest], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<i64>>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .optional()?;
    Ok(match row {
        None => (BlobState::Absent, None),
        Some((state, deletion, settles_at, size)) => (
            state_of(
                state == "live",
                deletion,
                settles_at.map(|t| t - unix_now_ms()),
            ),
            Some(size as u64),
        ),
    })
}

#[async_trait]
impl MetaStore for SqliteMeta {
    fn describe(&self) -> String {
        format!("sqlite {}", self.path.display())
    }

    async fn get_file(&self, path: &str) -> Result<Option<FileEntry>, MetaError> {
        let path = path.to_owned();
        self.read(move |c| {
            let row = c
                .prepare_cached(GET_FILE)?
                .query_row([&path], |r| {
                    let sizes = (r.get::<_, Option<i64>>(2)?, r.get::<_, Option<i64>>(3)?);
                    let content: Option<Vec<u8>> = r.get(4)?;
                    Ok((r.get(0)?, r.get(1)?, sizes, content))
                })
                .optional()?;
            // A file whose blob row is missing reads as absent, as an inner join would have it.
            let Some((version, digest, (Some(logical), Some(stored)), content)) = row else {
                return Ok(None);
            };
            Ok(Some(FileEntry {
                path,
                version,
                blob: BlobInfo {
                    digest: parse_digest(digest)?,
                    logical_size: logical as u64,
                    stored_size: stored as u64,
                },
                inline: content.map(Bytes::from),
            }))
        })
        .await
    }

    async fn blob_is_live(&self, digest: &Digest) -> Result<bool, MetaError> {
        let digest = digest.to_hex();
        self.read(move |c| {
            c.prepare_cached("SELECT 1 FROM blobs WHERE digest = ?1 AND state = 'live'")?
                .exists([&digest])
        })
        .await
    }

    async fn blob_state(&self, lock: HeldBlob<'_>) -> Result<BlobState, MetaError> {
        let digest = lock.digest().to_hex();
        self.read(move |c| Ok(blob_row_state(c, &digest)?.0)).await
    }

    async fn store_file(
        &self, path: &str, version: Version, blob: &BlobInfo, stored: Stored<'_>, now: i64,
        kind: PutKind,
    ) -> Result<PutResult, MetaError> {
        stored.check(blob)?;
        let basis = stored.basis();
        let content = stored.content();
        let path = path.to_owned();
        let blob = *blob;
        self.write(move |tx| {
            let digest = blob.digest.to_hex();
            let (found, found_size) = blob_row_state(tx, &digest).map_err(db_error)?;
            let (logical, size) = (blob.logical_size as i64, blob.stored_size as i64);
            let plan = plan_blob(basis, found, found_size, &blob);
            let changed = match plan {
                BlobPlan::Conflict(found) => return Ok(PutResult::Conflict(found)),
                BlobPlan::Reference => Ok(1),
                // A new row starts unreferenced, so the cleaner can reclaim its object if no
                // file ends up pointing at it (e.g. a newer version was stored meanwhile).
                BlobPlan::Insert => exec(
                    tx,
                    "INSERT INTO blobs (digest, logical_size, stored_size, refcount, state,
                                        unreferenced_since, created_at)
                     VALUES (?1, ?2, ?3, 0, 'live', ?4, ?4)",
                    params![digest, logical, size, now],
                ),
                BlobPlan::Revive { deletion } => exec(
                    tx,
                    "UPDATE blobs SET state = 'live', deletion = NULL, settles_at = NULL,
                        object_deleted = 0, logical_size = ?2, stored_size = ?3,
                        unreferenced_since = ?4
                     WHERE digest = ?1 AND state = 'deleting' AND COALESCE(deletion, 0) = ?5",
                    params![digest, logical, size, now, deletion],
                ),
                BlobPlan::Resize => exec(
                    tx,
                    "UPDATE blobs SET logical_size = ?2, stored_size = ?3
                     WHERE digest = ?1 AND state = 'live'",
                    params![digest, logical, size],
                ),
            }
            .map_err(db_error)?;
            if changed != 1 {
                return Err(MetaError::Inconsistent(format!(
                    "blob {digest} changed inside the transaction storing {path}"
                )));
            }
            // A reference changes no bytes, and a new row has none to remove (its bytes go with
            // its row when it is removed).
            match (plan, content.as_deref()) {
                (BlobPlan::Reference, _) | (BlobPlan::Insert, None) => {}
                (_, content) => set_content(tx, &digest, content).map_err(db_error)?,
            }
            let current: Option<(i64, String)> = tx
                .prepare_cached("SELECT version, digest FROM files WHERE path = ?1")
                .and_then(|mut s| {
                    s.query_row([&path], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                })
                .map_err(db_error)?;
            let deleted: Option<i64> = if kind == PutKind::Import {
                tx.prepare_cached("SELECT version FROM deleted_paths WHERE path = ?1")
                    .and_then(|mut s| s.query_row([&path], |r| r.get(0)).optional())
                    .map_err(db_error)?
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
                        "UPDATE files SET version = ?2, imported = ?3 WHERE path = ?1",
                        params![path, version, kind == PutKind::Import],
                    )
                    .map_err(db_error)?;
                }
                PutPlan::Replace { old } => {
                    exec(
                        tx,
                        "INSERT INTO files (path, version, digest, imported)
                         VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (path) DO UPDATE SET version = excluded.version,
                            digest = excluded.digest, imported = excluded.imported",
                        params![path, version, digest, kind == PutKind::Import],
                    )
                    .map_err(db_error)?;
                    exec(
                        tx,
                        "UPDATE blobs SET refcount = refcount + 1, unreferenced_since = NULL
                         WHERE digest = ?1",
                        [&digest],
                    )
                    .map_err(db_error)?;
                    if let Some(old) = old {
                        unreference(tx, old, now).map_err(db_error)?;
                    }
                }
            }
            Ok(PutResult::Done(plan.outcome(version)))
        })
        .await
    }

    async fn delete_file(
        &self, path: &str, version: Version, now: i64, kind: DeleteKind,
    ) -> Result<DeleteOutcome, MetaError> {
        let path = path.to_owned();
        self.write(move |tx| {
            let current: Option<(i64, String)> = tx
                .prepare_cached("SELECT version, digest FROM files WHERE path = ?1")
                .and_then(|mut s| {
                    s.query_row([&path], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                })
                .map_err(db_error)?;
            let plan = plan_delete(current, version, kind);
            if let DeletePlan::Remove { digest } = &plan {
                exec(tx, "DELETE FROM files WHERE path = ?1", [&path]).map_err(db_error)?;
                unreference(tx, digest, now).map_err(db_error)?;
            }
            if plan.remembers() {
                exec(
                    tx,
                    "INSERT INTO deleted_paths (path, version, deleted_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (path) DO UPDATE SET deleted_at = excluded.deleted_at,
                        version = MAX(deleted_paths.version, excluded.version)",
                    params![path, version, now],
                )
                .map_err(db_error)?;
            }
            Ok(plan.outcome())
        })
        .await
    }

    async fn list_files(&self, page: &ListPage<'_>) -> Result<Vec<String>, MetaError> {
        let (start, end) = page.range();
        let (start, cutoff, limit) = (start.to_owned(), page.cutoff, page.limit as i64);
        self.read(move |c| {
            let mut out = Vec::new();
            let mut push = |r: &rusqlite::Row<'_>| -> rusqlite::Result<()> {
                out.push(r.get(0)?);
                Ok(())
            };
            match &end {
                Some(end) => {
                    let mut s = c.prepare_cached(
                        "SELECT path FROM files WHERE path > ?1 AND path < ?2 AND version <= ?3
                         ORDER BY path LIMIT ?4",
                    )?;
                    let mut rows = s.query(params![start, end, cutoff, limit])?;
                    while let Some(r) = rows.next()? {
                        push(r)?;
                    }
                }
                None => {
                    let mut s = c.prepare_cached(
                        "SELECT path FROM files WHERE path > ?1 AND version <= ?2
                         ORDER BY path LIMIT ?3",
                    )?;
                    let mut rows = s.query(params![start, cutoff, limit])?;
                    while let Some(r) = rows.next()? {
                        push(r)?;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn list_blobs(
        &self, after: Option<&Digest>, limit: usize,
    ) -> Result<Vec<BlobRow>, MetaError> {
        let after = after.map(Digest::to_hex).unwrap_or_default();
        let limit = limit as i64;
        self.read(move |c| {
            let mut s = c.prepare_cached(&format!(
                "{BLOB_ROW} WHERE digest > ?1 ORDER BY digest LIMIT ?2"
            ))?;
            let rows = s.query_map(params![after, limit], blob_row)?;
            rows.collect()
        })
        .await
    }

    async fn unreferenced_blobs(
        &self, cutoff: i64, after: Option<&Digest>, limit: usize,
    ) -> Result<Vec<BlobInfo>, MetaError> {
        let after = after.map(Digest::to_hex).unwrap_or_default();
        let limit = limit as i64;
        self.read(move |c| {
            let mut s = c.prepare_cached(
                "SELECT digest, logical_size, stored_size FROM blobs
                 WHERE digest > ?1 AND refcount <= 0 AND (
                    (state = 'deleting' AND object_deleted = 0)
                    OR (state = 'live' AND unreferenced_since <= ?2))
                 ORDER BY digest LIMIT ?3",
            )?;
            let rows = s.query_map(params![after, cutoff, limit], |r| {
                Ok(BlobInfo {
                    digest: parse_digest(r.get(0)?)?,
                    logical_size: r.get::<_, i64>(1)? as u64,
                    stored_size: r.get::<_, i64>(2)? as u64,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn get_blob(&self, digest: &Digest) -> Result<Option<BlobRow>, MetaError> {
        let digest = digest.to_hex();
        self.read(move |c| {
            c.prepare_cached(&format!("{BLOB_ROW} WHERE digest = ?1"))?
                .query_row([&digest], blob_row)
                .optional()
        })
        .await
    }

    async fn inline_content(&self, digest: &Digest) -> Result<Option<Bytes>, MetaError> {
        let digest = digest.to_hex();
        self.read(move |c| {
            let content: Option<Vec<u8>> = c
                .prepare_cached(
                    "SELECT c.content FROM blob_contents c JOIN blobs b ON b.digest = c.digest
                     WHERE c.digest = ?1 AND b.state = 'live'",
                )?
                .query_row([&digest], |r| r.get(0))
                .optional()?;
            Ok(content.map(Bytes::from))
        })
        .await
    }

    async fn tombstone_blob(
        &self, lock: &BlobLock<Exclusive>, cutoff: i64, settle: Duration,
    ) -> Result<Option<Deletion>, MetaError> {
        let digest = lock.digest().to_hex();
        let id = new_deletion_id();
        self.write(move |c| {
            let removed = exec(
                c,
                "DELETE FROM blobs WHERE digest = ?1 AND refcount <= 0 AND state = 'live'
                    AND unreferenced_since <= ?2
                    AND EXISTS (SELECT 1 FROM blob_contents c WHERE c.digest = ?1)",
                params![digest, cutoff],
            )
            .map_err(db_error)?;
            if removed == 1 {
                set_content(c, &digest, None).map_err(db_error)?;
                return Ok(Some(Deletion::Removed));
            }
            let settles_at = unix_now_ms() + settle.as_millis() as i64;
            exec(
                c,
                "UPDATE blobs SET state = 'deleting', deletion = ?3, settles_at = ?4,
                    object_deleted = 0
                 WHERE digest = ?1 AND refcount <= 0 AND (
                    (state = 'deleting' AND object_deleted = 0)
                    OR (state = 'live' AND unreferenced_since <= ?2))",
                params![digest, cutoff, id, settles_at],
            )
            .map(|n| (n == 1).then_some(Deletion::Tombstone(id)))
            .map_err(db_error)
        })
        .await
    }

    async fn tombstone_orphans(
        &self, orphans: &[(&BlobLock<Exclusive>, u64)], settle: Duration, now: i64,
    ) -> Result<Vec<(Digest, i64)>, MetaError> {
        let orphans: Vec<(Digest, i64, i64)> = orphans
            .iter()
            .map(|(lock, size)| (*lock.digest(), *size as i64, new_deletion_id()))
            .collect();
        self.write(move |c| {
            let settles_at = unix_now_ms() + settle.as_millis() as i64;
            let mut made = Vec::new();
            for (digest, size, id) in orphans {
                let n = exec(
                    c,
                    "INSERT INTO blobs (digest, logical_size, stored_size, refcount, state,
                        unreferenced_since, created_at, deletion, settles_at)
                     VALUES (?1, 0, ?2, 0, 'deleting', ?3, ?3, ?4, ?5)
                     ON CONFLICT (digest) DO NOTHING",
                    params![digest.to_hex(), size, now, id, settles_at],
                )
                .map_err(db_error)?;
                if n == 1 {
                    made.push((digest, id));
                }
            }
            Ok(made)
        })
        .await
    }

    async fn finish_deletion(
        &self, digest: &Digest, deletion: i64, settled: bool,
    ) -> Result<bool, MetaError> {
        let digest = digest.to_hex();
        self.write(move |c| {
            exec(
                c,
                "UPDATE blobs SET object_deleted = 1,
                    settles_at = CASE WHEN ?3 THEN MIN(COALESCE(settles_at, ?4), ?4)
                                      ELSE settles_at END
                 WHERE digest = ?1 AND state = 'deleting' AND COALESCE(deletion, 0) = ?2",
                params![digest, deletion, settled, unix_now_ms()],
            )
            .map(|n| n == 1)
            .map_err(db_error)
        })
        .await
    }

    async fn purge_tombstones(&self, keep: Duration) -> Result<u64, MetaError> {
        self.write(move |c| {
            exec(
                c,
                "DELETE FROM blobs WHERE state = 'deleting' AND object_deleted = 1
                    AND refcount <= 0 AND COALESCE(settles_at, 0) < ?1",
                [unix_now_ms() - keep.as_millis() as i64],
            )
            .map(|n| n as u64)
            .map_err(db_error)
        })
        .await
    }

    async fn known_blobs(&self, digests: &[Digest]) -> Result<Vec<Digest>, MetaError> {
        let hexes: Vec<String> = digests.iter().map(Digest::to_hex).collect();
        self.read(move |c| {
            let mut s = c.prepare_cached("SELECT 1 FROM blobs WHERE digest = ?1")?;
            let mut out = Vec::new();
            for h in hexes {
                if s.exists([&h])? {
                    out.push(parse_digest(h)?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn waiting_blobs(&self, cutoff: i64) -> Result<(u64, u64), MetaError> {
        self.read(move |c| {
            c.prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(stored_size), 0) FROM blobs
                 WHERE refcount <= 0 AND state = 'live' AND unreferenced_since > ?1",
            )?
            .query_row([cutoff], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
        })
        .await
    }

    async fn stats(&self) -> Result<Stats, MetaError> {
        self.read(|c| {
            c.query_row(
                "SELECT
                    (SELECT COUNT(*) FROM files),
                    (SELECT COUNT(*) FROM blobs WHERE state = 'live'),
                    (SELECT COALESCE(SUM(logical_size), 0) FROM blobs WHERE state = 'live'),
                    (SELECT COALESCE(SUM(stored_size), 0) FROM blobs WHERE state = 'live'),
                    (SELECT COALESCE(SUM(b.logical_size), 0)
                       FROM files f JOIN blobs b ON b.digest = f.digest)",
                [],
                |r| {
                    Ok(Stats {
                        files: r.get::<_, i64>(0)? as u64,
                        blobs: r.get::<_, i64>(1)? as u64,
                        logical_bytes: r.get::<_, i64>(2)? as u64,
                        stored_bytes: r.get::<_, i64>(3)? as u64,
                        referenced_bytes: r.get::<_, i64>(4)? as u64,
                    })
                },
            )
        })
        .await
    }

    async fn refcount_mismatches(&self) -> Result<Vec<(Digest, i64, i64)>, MetaError> {
        self.read(|c| {
            let mut s = c.prepare(
                "SELECT digest, refcount, actual FROM (
                    SELECT b.digest, b.refcount,
                        (SELECT COUNT(*) FROM files f WHERE f.digest = b.digest) AS actual
                    FROM blobs b)
                 WHERE refcount != actual
                 UNION ALL
                 SELECT f.digest, 0, COUNT(*) FROM files f
                    LEFT JOIN blobs b ON b.digest = f.digest
                 WHERE b.digest IS NULL GROUP BY f.digest",
            )?;
            let rows = s.query_map([], |r| Ok((parse_digest(r.get(0)?)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })
        .await
    }

    async fn deleted_version(&self, path: &str) -> Result<Option<Version>, MetaError> {
        let path = path.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT version FROM deleted_paths WHERE path = ?1")?
                .query_row([&path], |r| r.get(0))
                .optional()
        })
        .await
    }

    async fn list_deletions(
        &self, after: &str, limit: usize,
    ) -> Result<Vec<(String, Version)>, MetaError> {
        let sql = "SELECT path, version FROM deleted_paths WHERE path > ?1 ORDER BY path LIMIT ?2";
        self.path_versions(sql, after, limit).await
    }

    async fn list_imported(
        &self, after: &str, limit: usize,
    ) -> Result<Vec<(String, Version)>, MetaError> {
        let sql = "SELECT path, version FROM files WHERE path > ?1 AND imported = 1
                   ORDER BY path LIMIT ?2";
        self.path_versions(sql, after, limit).await
    }

    async fn purge_deletions(&self, before: i64) -> Result<u64, MetaError> {
        self.write(move |c| {
            exec(
                c,
                "DELETE FROM deleted_paths WHERE deleted_at < ?1",
                [before],
            )
            .map(|n| n as u64)
            .map_err(db_error)
        })
        .await
    }

    async fn checkpoint(&self, source: &str) -> Result<Option<String>, MetaError> {
        let source = source.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT position FROM migration_checkpoints WHERE source = ?1")?
                .query_row([&source], |r| r.get(0))
                .optional()
        })
        .await
    }

    async fn set_checkpoint(
        &self, source: &str, position: Option<&str>, now: i64,
    ) -> Result<(), MetaError> {
        let (source, position) = (source.to_owned(), position.map(str::to_owned));
        self.write(move |c| {
            match position {
                Some(p) => exec(
                    c,
                    "INSERT INTO migration_checkpoints (source, position, updated_at)
                     VALUES (?1, ?2, ?3) ON CONFLICT (source) DO UPDATE
                     SET position = excluded.position, updated_at = excluded.updated_at",
                    params![source, p, now],
                ),
                None => exec(
                    c,
                    "DELETE FROM migration_checkpoints WHERE source = ?1",
                    [source],
                ),
            }
            .map(drop)
            .map_err(db_error)
        })
        .await
    }

    async fn check(&self) -> Result<(), MetaError> {
        self.read(|c| c.query_row("SELECT COUNT(*) FROM schema_migrations", [], |_| Ok(())))
            .await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn test_options() -> SqliteOptions {
        SqliteOptions {
            readers: 2,
            synchronous: SqliteSync::Normal,
            busy_timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let n = std::sync::atomic::AtomicUsize::new(0);
        let dir_path = dir.path().to_owned();
        super::super::conformance::run_all(async || -> Box<dyn MetaStore> {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = dir_path.join(format!("m{i}.sqlite3"));
            let m = SqliteMeta::open(&p, test_options()).await.unwrap();
            Box::new(m) as Box<dyn MetaStore>
        })
        .await;
    }

    #[tokio::test]
    async fn reopening_keeps_data_and_migrates_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/m.sqlite3");
        let b = BlobInfo {
            digest: Digest([9; 32]),
            logical_size: 3,
            stored_size: 23,
        };
        {
            let m = SqliteMeta::open(&p, test_options()).await.unwrap();
            super::super::conformance::put(&m, "/a", 1, &b, true, 0, PutKind::Client)
                .await
                .unwrap();
        }
        let (m1, m2) = tokio::join!(
            SqliteMeta::open(&p, test_options()),
            SqliteMeta::open(&p, test_options())
        );
        let m = m1.unwrap();
        drop(m2.unwrap());
        assert_eq!(m.get_file("/a").await.unwrap().unwrap().blob, b);
        let n: i64 = m
            .read(|c| c.query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(n, MIGRATIONS.len() as i64);
    }

    #[tokio::test]
    async fn a_lookup_is_prepared_once_not_on_every_read() {
        let dir = tempfile::tempdir().unwrap();
        let m = SqliteMeta::open(&dir.path().join("m.sqlite3"), test_options())
            .await
            .unwrap();
        let b = BlobInfo {
            digest: Digest([7; 32]),
            logical_size: 3,
            stored_size: 23,
        };
        super::super::conformance::put(&m, "/a", 1, &b, true, 0, PutKind::Client)
            .await
            .unwrap();
        let reprepared = m
            .read(|c| {
                for path in ["/a", "/b", "/a", "/c", "/a"] {
                    c.prepare_cached(GET_FILE)?
                        .query_row([path], |_| Ok(()))
                        .optional()?;
                }
                Ok(c.prepare_cached(GET_FILE)?
                    .get_status(rusqlite::StatementStatus::RePrepare))
            })
            .await
            .unwrap();
        assert_eq!(reprepared, 0);
        assert_eq!(m.get_file("/a").await.unwrap().unwrap().blob, b);
        assert!(m.get_file("/b").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn unopenable_database_is_unavailable() {
        let e = SqliteMeta::open(Path::new("/proc/nope/m.sqlite3"), test_options())
            .await
            .err()
            .unwrap();
        assert!(matches!(e, MetaError::Unavailable(_)), "{e}");
        assert!(e.to_string().contains("/proc/nope"), "{e}");
    }
}
