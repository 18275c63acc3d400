//! Locks for several hosts: PostgreSQL session advisory locks (`pg_try_advisory_lock[_shared]`)
//! on a few connections of their own. A key always uses the same connection, so its unlock
//! reaches the session that holds it; the server releases everything a session held when its
//! connection ends, including when the process dies.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls, Statement};

use crate::meta::{no_answer, within};

use super::{
    Held, LocalLocks, LockError, LockGuard, LockManager, LockMode, Release, acquire, lock_key,
    timed_out,
};

/// One lock connection with its prepared statements.
struct Session {
    client: Client,
    /// How long a statement may go unanswered ([`PgLocks::with_deadline`]).
    deadline: Option<Duration>,
    lock: [Statement; 2],
    unlock: [Statement; 2],
}

fn index(mode: LockMode) -> usize {
    match mode {
        LockMode::Shared => 0,
        LockMode::Exclusive => 1,
    }
}

/// PostgreSQL advisory [`LockManager`].
pub struct PgLocks {
    config: tokio_postgres::Config,
    sessions: Vec<Mutex<Option<Arc<Session>>>>,
    local: LocalLocks,
    deadline: Option<Duration>,
}

struct HeldPg {
    session: Arc<Session>,
    key: i64,
    mode: LockMode,
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
                    tracing::warn!(error = %e, "releasing an advisory lock failed; it ends with its session");
                }
                None => tracing::warn!(
                    "releasing an advisory lock got no answer; it ends with its session"
                ),
            }
        }))
    }
}

impl PgLocks {
    /// Lock sessions on the server `config` names; connected on first use and after failures.
    pub fn new(config: tokio_postgres::Config, connections: usize) -> Self {
        PgLocks {
            config,
            sessions: (0..connections.max(1)).map(|_| Mutex::new(None)).collect(),
            local: LocalLocks::default(),
            deadline: None,
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

    async fn session(&self, key: u64, name: &str) -> Result<Arc<Session>, LockError> {
        let mut slot = self.slot(key).lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.client.is_closed()) {
            return Ok(s.clone());
        }
        let open = async {
            let (client, connection) = self.config.connect(NoTls).await?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %e, "advisory lock connection ended");
                }
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
                client,
                deadline: self.deadline,
            })
        };
        let session = Arc::new(self.settle(name, within(self.deadline, open).await)?);
        *slot = Some(session.clone());
        Ok(session)
    }

    /// The lock error for a failed statement or a missed deadline, else the result.
    fn settle<T>(
        &self,
        name: &str,
        result: Option<Result<T, tokio_postgres::Error>>,
    ) -> Result<T, LockError> {
        let message = match result {
            Some(Ok(v)) => return Ok(v),
            Some(Err(e)) => crate::meta::postgres_error_text(e),
            None => no_answer(self.deadline),
        };
        Err(LockError::Backend {
            name: name.to_owned(),
            message: format!("PostgreSQL advisory lock in the metadata database: {message}"),
        })
    }

    async fn try_pg(&self, name: &str, mode: LockMode) -> Result<Option<Box<dyn Held>>, LockError> {
        let key = lock_key(name);
        let pg_key = key as i64;
        let mut attempt = 0;
        let (session, result) = loop {
            attempt += 1;
            let session = self.session(key, name).await?;
            let stmt = &session.lock[index(mode)];
            let result = within(self.deadline, session.client.query_one(stmt, &[&pg_key])).await;
            let lost = match &result {
                None => true,
                Some(Err(e)) => e.is_closed(),
                Some(Ok(_)) => false,
            };
            if lost {
                // Forget the session so the next attempt connects afresh.
                let mut slot = self.slot(key).lock().await;
                if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, &session)) {
                    *slot = None;
                }
            }
            // A session found closed (the server restarted since) is replaced at once; a
            // stalled one is not, since the new one would likely wait as long.
            if !(lost && result.is_some() && attempt < 2) {
                break (session, result);
            }
        };
        let got: bool = self.settle(name, result)?.get(0);
        Ok(got.then(|| {
            Box::new(HeldPg {
                session,
                key: pg_key,
                mode,
            }) as Box<dyn Held>
        }))
    }
}

#[async_trait]
impl LockManager for PgLocks {
    async fn lock(
        &self,
        name: &str,
        mode: LockMode,
        timeout: Duration,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locks(connections: usize) -> PgLocks {
        let cfg = crate::meta::postgres_test_config();
        let pw = cfg.resolve_password(None).unwrap();
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
