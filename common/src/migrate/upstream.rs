//! An upstream s3dedup deployment (sio2project/s3dedup 1.x) as a source. Its metadata lists
//! each path's version and digest; its objects already sit in the bucket under our key layout,
//! so they are adopted in place (verified, never copied). It trusted client hints, so every
//! adopted object is inflated and hashed once.

use std::sync::{Arc, Mutex};

use crate::source::{UpstreamDb, redact};

/// One live path of the upstream bucket.
pub(super) struct Row {
    pub path: String,
    pub version: i64,
    pub hash: String,
}

/// An open connection to the upstream metadata.
pub(super) enum Reader {
    Sqlite(Arc<Mutex<rusqlite::Connection>>),
    Postgres(tokio_postgres::Client),
}

impl Reader {
    pub(super) async fn open(db: &UpstreamDb) -> Result<Reader, String> {
        match db {
            UpstreamDb::Sqlite(path) => {
                let p = path.clone();
                let conn = tokio::task::spawn_blocking(move || {
                    rusqlite::Connection::open_with_flags(
                        &p,
                        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                    )
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("{}: {e}", path.display()))?;
                Ok(Reader::Sqlite(Arc::new(Mutex::new(conn))))
            }
            UpstreamDb::Postgres(url) => {
                let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| format!("{}: {e}", redact(url)))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::warn!(error = %e, "upstream metadata connection ended");
                    }
                });
                Ok(Reader::Postgres(client))
            }
        }
    }

    /// Up to `limit` live paths after `after`, in path order (keyset pages: memory stays flat).
    pub(super) async fn page(
        &self, bucket: &str, after: &str, limit: usize,
    ) -> Result<Vec<Row>, String> {
        let limit = limit as i64;
        match self {
            Reader::Sqlite(conn) => {
                let (conn, bucket, after) = (conn.clone(), bucket.to_owned(), after.to_owned());
                tokio::task::spawn_blocking(move || {
                    let conn = conn.lock().map_err(|_| "connection poisoned".to_owned())?;
                    let mut s = conn
                        .prepare_cached(
                            "SELECT m.path, m.modified, r.hash FROM modified m
                             JOIN ref_file r ON r.bucket = m.bucket AND r.path = m.path
                             WHERE m.bucket = ?1 AND m.modified > 0 AND m.path > ?2
                             ORDER BY m.path LIMIT ?3",
                        )
                        .map_err(|e| e.to_string())?;
                    let rows = s
                        .query_map(rusqlite::params![bucket, after, limit], |r| {
                            Ok(Row {
                                path: r.get(0)?,
                                version: r.get(1)?,
                                hash: r.get(2)?,
                            })
                        })
                        .map_err(|e| e.to_string())?;
                    rows.collect::<Result<Vec<_>, _>>()
                        .map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| e.to_string())?
            }
            Reader::Postgres(client) => {
                let prefix = bucket.replace('-', "_");
                let sql = format!(
                    "SELECT m.path::TEXT, m.modified, r.hash::TEXT FROM \"{prefix}_modified\" m
                     JOIN \"{prefix}_ref_file\" r ON r.bucket = m.bucket AND r.path = m.path
                     WHERE m.bucket = $1 AND m.modified > 0 AND m.path::TEXT COLLATE \"C\" > $2
                     ORDER BY m.path::TEXT COLLATE \"C\" LIMIT $3"
                );
                let rows = client
                    .query(&sql, &[&bucket, &after, &limit])
                    .await
                    .map_err(|e| crate::pg::error_text(&e))?;
                Ok(rows
                    .iter()
                    .map(|r| Row {
                        path: r.get(0),
                        version: r.get(1),
                        hash: r.get(2),
                    })
                    .collect())
            }
        }
    }
}
