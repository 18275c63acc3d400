//! Locks for several hosts: PostgreSQL session advisory locks (`pg_try_advisory_lock[_shared]`)
//! on a few connections of their own. A key always uses the same connection, so its unlock
//! reaches the session that holds it; the server releases everything a session held when its
//! connection ends, including when the process dies. A session that ends while this process
//! still holds locks on it is reported once, naming them, and counted in
//! [`LockManager::locks_lost`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls, Statement};

use crate::pg::{self, no_answer, within};

use super::{
    Check, Held, LocalLocks, LockError, LockGuard, LockManager, LockMode, LockWaits, Release,
    acquire, lock_key, timed_out,
};

/// Sessions tried for one lock attempt when the server ends them under it (a failover ends
/// every session, a new one can be ended by a second round).
const SESSION_ATTEMPTS: u64 = 3;

/// What one lock session holds, so that its loss can be reported by name.
#[derive(Default)]
struct Holdings {
    /// Key -> (name, holders in this process).
    held: std::sync::Mutex<HashMap<i64, (String, usize)>>,
    ended: AtomicBool,
}

impl Holdings {
    fn add(&self, key: i64, name: &str) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.entry(key).or_insert_with(|| (name.to_owned(), 0)).1 += 1;
    }

    fn remove(&self, key: i64) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = held.get_mut(&key) {
            e.1 -= 1;
            if e.1 == 0 {
                held.remove(&key);
            }
        }
    }

    /// The session is gone: what it held is lost. Reported once, however it was noticed.
    fn session_ended(&self, why: &str, lost: &AtomicU64) {
        if self.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.is_empty() {
            return;
        }
        let mut names: Vec<&str> = held.values().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        lost.fetch_add(names.len() as u64, Ordering::Relaxed);
        tracing::warn!(
            locks = %names.join(" "),
            count = names.len(),
            cause = why,
            "the PostgreSQL session holding advisory locks {} ended ({why}); they are lost and \
             other processes may take them; their holders abandon what needs them",
            names.join(", ")
        );
    }
}

/// One lock connection with its prepared statements.
struct Session {
    client: Client,
    /// How long a statement may go unanswered ([`PgLocks::with_deadline`]).
    deadline: Option<Duration>,
    lock: [Statement; 2],
    unlock: [Statement; 2],
    /// Whether this backend holds a given advisory lock, granted.
    holds: Statement,
    holdings: Arc<Holdings>,
    lost: Arc<AtomicU64>,
}

impl Session {
    fn ended(&self, why: &str) {
        self.holdings.session_ended(why, &self.lost);
    }
}

fn index(mode: LockMode) -> usize {
    match mode {
        LockMode::Shared => 0,
        LockMode::Exclusive => 1,
    }
}

/// Why a lock session could not be opened; `lost`: the server ended it while it was being
/// set up (worth another try), rather than refusing or not answering.
struct Opening {
    error: LockError,
    lost: bool,
}

/// PostgreSQL advisory [`LockManager`].
pub struct PgLocks {
    config: tokio_postgres::Config,
    sessions: Vec<Mutex<Option<Arc<Session>>>>,
    local: LocalLocks,
    deadline: Option<Duration>,
    lost: Arc<AtomicU64>,
    /// Advisory locks belong to the database, not to a schema: deployments sharing a database
    /// in schemas of their own lock names prefixed with it (see [`PgLocks::in_schema`]).
    namespace: Option<String>,
}

struct HeldPg {
    session: Arc<Session>,
    key: i64,
    mode: LockMode,
}

impl Drop for HeldPg {
    fn drop(&mut self) {
        self.session.holdings.remove(self.key);
    }
}

impl Held for HeldPg {
    fn release(self: Box<Self>) -> Option<Release> {
        if self.session.client.is_closed() {
            return None; // the server already released it with the session
        }
        Some(Box::pin(async move {
            let stmt = &self.session.unlock[index(self.mode)];
            match within(
                self.session.deadline,
                self.session.client.execute(stmt, &[&self.key]),
            )
            .await
            {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %pg::error_text(&e), "releasing an advisory lock failed; it ends with its session");
                }
                None => tracing::warn!(
                    "releasing an advisory lock got no answer; it ends with its session"
                ),
            }
        }))
    }

    /// Asks the server whether this session holds the lock: a session the server ended, or
    /// one that does not answer within the deadline, holds nothing we can count on.
    fn check(&self) -> Check<'_> {
        Box::pin(async move {
            let s = &self.session;
            if s.client.is_closed() {
                return Err("its PostgreSQL session ended".to_owned());
            }
            // pg_locks shows a bigint key as two oids: the high and the low 32 bits.
            let (high, low) = (
                (self.key as u64 >> 32) as i64,
                (self.key as u64 & 0xffff_ffff) as i64,
            );
            let mode = match self.mode {
                LockMode::Shared => "ShareLock",
                LockMode::Exclusive => "ExclusiveLock",
            };
            match within(
                s.deadline,
                s.client.query_one(&s.holds, &[&high, &low, &mode]),
            )
            .await
            {
                Some(Ok(row)) if row.get::<_, bool>(0) => Ok(()),
                Some(Ok(_)) => Err("its PostgreSQL session no longer holds it".to_owned()),
                Some(Err(e)) => {
                    let why = format!("its PostgreSQL session failed: {}", pg::error_text(&e));
                    if pg::connection_lost(&e) {
                        s.ended(&why);
                    }
                    Err(why)
                }
                None => Err(format!(
                    "its PostgreSQL session did not answer: {}",
                    no_answer(s.deadline)
                )),
            }
        })
    }
}

impl PgLocks {
    /// Lock sessions on the server `config` names; connected on first use and after failures.
    /// They show in `pg_stat_activity` as `s3dedup-locks`.
    pub fn new(mut config: tokio_postgres::Config, connections: usize) -> Self {
        config.application_name("s3dedup-locks");
        PgLocks {
            config,
            sessions: (0..connections.max(1)).map(|_| Mutex::new(None)).collect(),
            local: LocalLocks::default(),
            deadline: None,
            lost: Arc::default(),
            namespace: None,
        }
    }

    /// Locks of the deployment whose tables are in `schema`: another schema's `cleaner` (or
    /// blob) lock is another lock. Names in `public` keep their plain keys, which every
    /// version before namespaces used.
    pub fn in_schema(mut self, schema: &str) -> Self {
        self.namespace = (schema != "public").then(|| schema.to_owned());
        self
    }

    /// The advisory key of a lock name in this deployment.
    pub fn key(&self, name: &str) -> u64 {
        match &self.namespace {
            Some(ns) => lock_key(&format!("{ns}/{name}")),
            None => lock_key(name),
        }
    }

    /// Gives up on a lock session that does not answer a statement within `deadline` (a server
    /// or network stalled with the connection open), so the next attempt opens a new one.
    pub fn with_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.deadline = deadline;
        self
    }

    fn slot(&self, key: u64) -> &Mutex<Option<Arc<Session>>> {
        &self.sessions[(key % self.sessions.len() as u64) as usize]
    }

    async fn session(&self, key: u64, name: &str) -> Result<Arc<Session>, Opening> {
        let mut slot = self.slot(key).lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.client.is_closed()) {
            return Ok(s.clone());
        }
        let open = async {
            let (client, connection) = self.config.connect(NoTls).await?;
            let holdings = Arc::new(Holdings::default());
            let (watched, lost) = (holdings.clone(), self.lost.clone());
            tokio::spawn(async move {
                let why = match connection.await {
                    Ok(()) => "the connection closed".to_owned(),
                    Err(e) => pg::error_text(&e),
                };
                watched.session_ended(&why, &lost);
            });
            let prepare = |sql: &'static str| client.prepare(sql);
            Ok(Session {
                lock: [
                    prepare("SELECT pg_try_advisory_lock_shared($1)").await?,
                    prepare("SELECT pg_try_advisory_lock($1)").await?,
                ],
                unlock: [
                    prepare("SELECT pg_advisory_unlock_shared($1)").await?,
                    prepare("SELECT pg_advisory_unlock($1)").await?,
                ],
                holds: prepare(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'
                        AND pid = pg_backend_pid() AND granted AND objsubid = 1
                        AND classid::bigint = $1 AND objid::bigint = $2 AND mode = $3)",
                )
                .await?,
                client,
                deadline: self.deadline,
                holdings,
                lost: self.lost.clone(),
            })
        };
        let opened: Option<Result<Session, tokio_postgres::Error>> =
            within(self.deadline, open).await;
        // Ended by the server (or closed) while being set up; a refused connection is not.
        let lost = matches!(&opened, Some(Err(e))
            if e.is_closed() || e.as_db_error().is_some() && pg::connection_lost(e));
        let session = Arc::new(
            self.settle(name, opened)
                .map_err(|error| Opening { error, lost })?,
        );
        *slot = Some(session.clone());
        Ok(session)
    }

    /// The lock error for a failed statement or a missed deadline, else the result.
    fn settle<T>(
        &self, name: &str, result: Option<Result<T, tokio_postgres::Error>>,
    ) -> Result<T, LockError> {
        let message = match result {
            Some(Ok(v)) => return Ok(v),
            Some(Err(e)) => pg::error_text(&e),
            None => no_answer(self.deadline),
        };
        Err(LockError::Backend {
            name: name.to_owned(),
            message: format!("PostgreSQL advisory lock in the metadata database: {message}"),
        })
    }

    async fn try_pg(&self, name: &str, mode: LockMode) -> Result<Option<Box<dyn Held>>, LockError> {
        let key = self.key(name);
        let pg_key = key as i64;
        let mut attempt = 0;
        let (session, result) = loop {
            attempt += 1;
            let session = match self.session(key, name).await {
                Ok(s) => s,
                // The server ended the new session before it was ready: another one.
                Err(Opening { lost: true, .. }) if attempt < SESSION_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                    continue;
                }
                Err(Opening { error, .. }) => return Err(error),
            };
            let stmt = &session.lock[index(mode)];
            let result = within(self.deadline, session.client.query_one(stmt, &[&pg_key])).await;
            let lost = match &result {
                None => true,
                Some(Err(e)) => pg::connection_lost(e),
                Some(Ok(_)) => false,
            };
            if lost {
                if let Some(Err(e)) = &result {
                    session.ended(&pg::error_text(e));
                }
                // Forget the session so the next attempt connects afresh.
                let mut slot = self.slot(key).lock().await;
                if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, &session)) {
                    *slot = None;
                }
            }
            // A session found ended (the server restarted, or ended it) is replaced at once; a
            // stalled one is not, since the new one would likely wait as long.
            if !(lost && result.is_some() && attempt < SESSION_ATTEMPTS) {
                break (session, result);
            }
        };
        let got: bool = self.settle(name, result)?.get(0);
        if !got {
            return Ok(None);
        }
        session.holdings.add(pg_key, name);
        Ok(Some(Box::new(HeldPg {
            session,
            key: pg_key,
            mode,
        })))
    }
}

#[async_trait]
impl LockManager for PgLocks {
    async fn lock(
        &self, name: &str, mode: LockMode, timeout: Duration,
    ) -> Result<LockGuard, LockError> {
        let deadline = Some(Instant::now() + timeout);
        acquire(&self.local, name, mode, deadline, || {
            self.try_pg(name, mode)
        })
        .await?
        .ok_or_else(|| timed_out(name, timeout))
    }

    async fn try_lock(&self, name: &str, mode: LockMode) -> Result<Option<LockGuard>, LockError> {
        acquire(&self.local, name, mode, None, || self.try_pg(name, mode)).await
    }

    fn locks_lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    fn waits(&self) -> LockWaits {
        self.local.waits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locks(connections: usize) -> PgLocks {
        let cfg = crate::meta::postgres_test_config();
        let pw = crate::secrets::tests::password(&cfg);
        PgLocks::new(
            crate::meta::postgres_connection_config(&cfg, pw).unwrap(),
            connections,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs PostgreSQL: run through tests/run-all.sh"]
    async fn conformance_suite() {
        // Two managers have separate sessions, like two processes.
        super::super::conformance::run_all(&locks(2), &locks(1)).await;
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL: run through tests/run-all.sh"]
    async fn a_lost_session_releases_its_locks() {
        let a = locks(1);
        let b = locks(1);
        let g = a
            .lock("conn-loss", LockMode::Exclusive, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(
            b.try_lock("conn-loss", LockMode::Exclusive)
                .await
                .unwrap()
                .is_none()
        );
        drop(g);
        drop(a); // closes the session without unlocking explicitly
        let got = b
            .lock("conn-loss", LockMode::Exclusive, Duration::from_secs(5))
            .await;
        assert!(got.is_ok(), "the server released the lock with the session");
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL: run through tests/run-all.sh"]
    async fn a_session_ended_by_the_server_is_a_lost_lock_counted_once() {
        let a = locks(1);
        let g = a
            .lock("term-x", LockMode::Exclusive, Duration::from_secs(1))
            .await
            .unwrap();
        let s = a
            .lock("term-y", LockMode::Shared, Duration::from_secs(1))
            .await
            .unwrap();
        g.ensure_held().await.unwrap();
        s.ensure_held().await.unwrap();
        // What a failover or an administrator does to the session.
        let cfg = crate::meta::postgres_test_config();
        let conn =
            crate::meta::postgres_connection_config(&cfg, crate::secrets::tests::password(&cfg))
                .unwrap();
        let (admin, connection) = conn.connect(NoTls).await.unwrap();
        tokio::spawn(connection);
        let key = lock_key("term-x");
        let killed: i64 = admin
            .query_one(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory'
                    AND classid::bigint = $1 AND objid::bigint = $2",
                &[&((key >> 32) as i64), &((key & 0xffff_ffff) as i64)],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(killed, 1);
        let e = g.ensure_held().await.unwrap_err();
        assert!(
            matches!(e, LockError::Lost { .. }) && e.to_string().contains("term-x"),
            "{e}"
        );
        assert!(s.ensure_held().await.is_err());
        let deadline = Instant::now() + Duration::from_secs(5);
        while a.locks_lost() < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(a.locks_lost(), 2, "both locks of the session, once each");
        // Another process may take it now; this one takes it again on a new session.
        let b = locks(1);
        let taken = b
            .try_lock("term-x", LockMode::Exclusive)
            .await
            .unwrap()
            .unwrap();
        taken.release().await;
        drop((g, s));
        let again = a
            .lock("term-x", LockMode::Exclusive, Duration::from_secs(5))
            .await
            .unwrap();
        again.ensure_held().await.unwrap();
        assert_eq!(a.locks_lost(), 2);
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL: run through tests/run-all.sh"]
    async fn deployments_in_other_schemas_hold_locks_of_the_same_name() {
        let (a, b) = (
            locks(1).in_schema("bucket_a"),
            locks(1).in_schema("bucket_b"),
        );
        let first = a.try_lock("cleaner", LockMode::Exclusive).await.unwrap();
        assert!(first.is_some());
        let other = b.try_lock("cleaner", LockMode::Exclusive).await.unwrap();
        assert!(
            other.is_some(),
            "bucket_b's cleaner does not wait for bucket_a's"
        );
        let again = locks(1).in_schema("bucket_a");
        assert!(
            again
                .try_lock("cleaner", LockMode::Exclusive)
                .await
                .unwrap()
                .is_none()
        );
        // `public` keeps the plain keys every earlier version used.
        assert_eq!(
            locks(1).in_schema("public").key("cleaner"),
            lock_key("cleaner")
        );
        assert_ne!(a.key("cleaner"), lock_key("cleaner"));
    }

    #[tokio::test]
    async fn unreachable_server_is_a_backend_error_naming_the_lock() {
        let cfg: tokio_postgres::Config = "host=127.0.0.1 port=1 user=x connect_timeout=1"
            .parse()
            .unwrap();
        let e = PgLocks::new(cfg, 1)
            .lock("blob:x", LockMode::Exclusive, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(e, LockError::Backend { .. }) && e.to_string().contains("blob:x"),
            "{e}"
        );
    }
}
