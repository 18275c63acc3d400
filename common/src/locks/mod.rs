//! Advisory locks that work across processes, named by stable strings (`blob:<digest>`,
//! `path:<path>`, `cleaner`, `migrator:<source>`) and mapped to 64-bit keys by a stable hash.
//!
//! Every backend has two layers: an in-process async lock per key, so tasks of one process queue
//! without threads or polling, and the cross-process lock (fcntl byte ranges, or PostgreSQL
//! advisory locks), taken with non-blocking attempts and backoff until a deadline.
//!
//! A cross-process lock can be lost while its holder still runs (a PostgreSQL session ended by
//! a failover or `pg_terminate_backend`). Holders ask [`LockGuard::ensure_held`] before a step
//! that must not happen without the lock, and the metadata store's compare-and-set on a blob's
//! state catches what a lost lock lets through in between (docs/design.md, "Losing a lock").

mod file;
mod postgres;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest as _, Sha256};
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};
use tokio::time::Instant;

use crate::blob::Digest;

pub use file::FileLocks;
pub use postgres::PgLocks;

/// Shared locks coexist; an exclusive lock excludes every other lock on the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

/// Why a lock could not be taken, or is no longer held.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("timed out after {waited:?} waiting for lock {name}")]
    Timeout { name: String, waited: Duration },
    #[error("lock backend failed for {name}: {message}")]
    Backend { name: String, message: String },
    #[error("lock {name} was lost: {why}")]
    Lost { name: String, why: String },
}

/// A future that releases a cross-process lock.
pub(crate) type Release = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A future that tells whether a cross-process lock is still held (`Err`: why not).
pub(crate) type Check<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// The cross-process half of a held lock.
pub(crate) trait Held: Send + Sync + 'static {
    /// Releases it; `None` when that already happened synchronously.
    fn release(self: Box<Self>) -> Option<Release>;

    /// Asks the backend whether the lock is still held by us.
    fn check(&self) -> Check<'_>;
}

/// A held lock; released by [`LockGuard::release`], when dropped, and by the OS or the database
/// server if the process dies.
pub struct LockGuard {
    name: String,
    held: Option<Box<dyn Held>>,
    local: Option<LocalGuard>,
}

impl LockGuard {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Confirms with the backend that the lock is still held (a PostgreSQL session can end
    /// under a holder); [`LockError::Lost`] says why it is not. A lock confirmed here can still
    /// be lost right after: callers also rely on the metadata store's compare-and-set.
    pub async fn ensure_held(&self) -> Result<(), LockError> {
        let Some(held) = &self.held else {
            return Ok(()); // a test's stand-in, which no backend can take away
        };
        held.check().await.map_err(|why| LockError::Lost {
            name: self.name.clone(),
            why,
        })
    }

    /// Releases the lock and waits until the release reached the backend.
    pub async fn release(mut self) {
        if let Some(fut) = self.held.take().and_then(|h| h.release()) {
            fut.await;
        }
        self.local.take();
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let Some(held) = self.held.take() else { return };
        let local = self.local.take();
        if let Some(fut) = held.release() {
            // Keep this process's waiters out until the backend has really let go.
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move {
                        fut.await;
                        drop(local);
                    });
                }
                Err(_) => drop(local),
            }
        }
    }
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("name", &self.name)
            .finish()
    }
}

/// A provider of cross-process advisory locks.
#[async_trait]
pub trait LockManager: Send + Sync + 'static {
    /// Waits up to `timeout` for the lock.
    async fn lock(
        &self, name: &str, mode: LockMode, timeout: Duration,
    ) -> Result<LockGuard, LockError>;

    /// Takes the lock if it is free right now.
    async fn try_lock(&self, name: &str, mode: LockMode) -> Result<Option<LockGuard>, LockError>;

    /// Locks this process held and lost without releasing them (their backend session ended).
    fn locks_lost(&self) -> u64 {
        0
    }

    /// How often [`LockManager::lock`] had to wait, for how long, and how often in vain.
    fn waits(&self) -> LockWaits;
}

/// Waits for contended locks since the process started, for `/metrics`: a lock free at the
/// first try is not a wait; `try_lock` never waits.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct LockWaits {
    /// Locks taken after waiting for another holder (in this process or another).
    pub waited: u64,
    /// Seconds spent waiting, by those and by the timed-out ones.
    pub seconds: f64,
    /// Waits that ended at their deadline without the lock.
    pub timeouts: u64,
}

/// The lock modes as types, so that a step needing the exclusive lock cannot be given a shared
/// one.
pub trait Mode: Send + Sync + 'static {
    const MODE: LockMode;
}

/// Taken by re-uploads of known content: they only need the cleaner kept out.
#[derive(Debug)]
pub enum Shared {}
/// Taken by whoever creates, revives or deletes a blob's object.
#[derive(Debug)]
pub enum Exclusive {}

impl Mode for Shared {
    const MODE: LockMode = LockMode::Shared;
}
impl Mode for Exclusive {
    const MODE: LockMode = LockMode::Exclusive;
}

/// A blob's lock (`blob:<digest>`) held in mode `M`. The metadata store's calls that are safe
/// only under it take it (or [`HeldBlob`], its proof in either mode), so no caller can forget it.
pub struct BlobLock<M: Mode> {
    guard: LockGuard,
    digest: Digest,
    mode: std::marker::PhantomData<M>,
}

/// Borrowed proof that a blob's lock is held, in either mode.
#[derive(Debug, Clone, Copy)]
pub struct HeldBlob<'a> {
    digest: &'a Digest,
}

impl HeldBlob<'_> {
    pub fn digest(&self) -> &Digest {
        self.digest
    }
}

impl<M: Mode> BlobLock<M> {
    /// Waits up to `timeout` for the blob's lock.
    pub async fn acquire(
        locks: &dyn LockManager, digest: &Digest, timeout: Duration,
    ) -> Result<Self, LockError> {
        let guard = locks.lock(&blob_lock(digest), M::MODE, timeout).await?;
        Ok(Self::wrap(guard, digest))
    }

    /// Takes the blob's lock if it is free right now.
    pub async fn try_acquire(
        locks: &dyn LockManager, digest: &Digest,
    ) -> Result<Option<Self>, LockError> {
        let guard = locks.try_lock(&blob_lock(digest), M::MODE).await?;
        Ok(guard.map(|g| Self::wrap(g, digest)))
    }

    fn wrap(guard: LockGuard, digest: &Digest) -> Self {
        BlobLock {
            guard,
            digest: *digest,
            mode: std::marker::PhantomData,
        }
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn name(&self) -> &str {
        self.guard.name()
    }

    /// The proof of holding it, for calls that accept either mode.
    pub fn held(&self) -> HeldBlob<'_> {
        HeldBlob {
            digest: &self.digest,
        }
    }

    /// See [`LockGuard::ensure_held`].
    pub async fn ensure_held(&self) -> Result<(), LockError> {
        self.guard.ensure_held().await
    }

    pub async fn release(self) {
        self.guard.release().await
    }

    /// A stand-in no backend holds, for unit tests of the calls that ask for one.
    #[cfg(test)]
    pub(crate) fn assumed(digest: &Digest) -> Self {
        let guard = LockGuard {
            name: blob_lock(digest),
            held: None,
            local: None,
        };
        Self::wrap(guard, digest)
    }
}

impl<M: Mode> std::fmt::Debug for BlobLock<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobLock")
            .field("name", &self.guard.name)
            .field("mode", &M::MODE)
            .finish()
    }
}

/// The stable 64-bit key of a lock name: the first 8 bytes of its SHA-256 (never changes between
/// Rust versions or builds, unlike `DefaultHasher`).
pub fn lock_key(name: &str) -> u64 {
    let h = Sha256::digest(name.as_bytes());
    let mut k = [0u8; 8];
    k.copy_from_slice(&h[..8]);
    u64::from_be_bytes(k)
}

/// Name of the lock that guards a blob between "does it exist" and the refcount change.
pub fn blob_lock(digest: &Digest) -> String {
    format!("blob:{digest}")
}

pub(crate) enum LocalGuard {
    Shared(#[allow(dead_code)] OwnedRwLockReadGuard<()>),
    Exclusive(#[allow(dead_code)] OwnedRwLockWriteGuard<()>),
}

/// The in-process layer: one async reader-writer lock per key, created on demand; it also counts
/// the waits of both layers, since every acquisition passes through it.
#[derive(Default)]
pub(crate) struct LocalLocks {
    map: Mutex<HashMap<u64, Weak<RwLock<()>>>>,
    waited: AtomicU64,
    waited_micros: AtomicU64,
    timeouts: AtomicU64,
}

impl LocalLocks {
    fn entry(&self, key: u64) -> Arc<RwLock<()>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = map.get(&key).and_then(Weak::upgrade) {
            return l;
        }
        if map.len() >= 4096 {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let l = Arc::new(RwLock::new(()));
        map.insert(key, Arc::downgrade(&l));
        l
    }

    pub(crate) fn waits(&self) -> LockWaits {
        LockWaits {
            waited: self.waited.load(Relaxed),
            seconds: self.waited_micros.load(Relaxed) as f64 / 1e6,
            timeouts: self.timeouts.load(Relaxed),
        }
    }

    fn count_wait(&self, started: Instant, got_it: bool) {
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.waited_micros.fetch_add(micros, Relaxed);
        let counter = if got_it { &self.waited } else { &self.timeouts };
        counter.fetch_add(1, Relaxed);
    }

    async fn acquire(
        &self, key: u64, mode: LockMode, deadline: Option<Instant>,
    ) -> Option<LocalGuard> {
        let l = self.entry(key);
        match (mode, deadline) {
            (LockMode::Shared, None) => l.try_read_owned().ok().map(LocalGuard::Shared),
            (LockMode::Exclusive, None) => l.try_write_owned().ok().map(LocalGuard::Exclusive),
            (LockMode::Shared, Some(d)) => tokio::time::timeout_at(d, l.read_owned())
                .await
                .ok()
                .map(LocalGuard::Shared),
            (LockMode::Exclusive, Some(d)) => tokio::time::timeout_at(d, l.write_owned())
                .await
                .ok()
                .map(LocalGuard::Exclusive),
        }
    }
}

const MAX_BACKOFF: Duration = Duration::from_millis(20);

/// Takes the local layer, then polls `attempt` (one non-blocking try of the cross-process lock)
/// with exponential backoff until it succeeds or the deadline passes (`None`: one try).
pub(crate) async fn acquire<F, Fut>(
    local: &LocalLocks, name: &str, mode: LockMode, deadline: Option<Instant>, mut attempt: F,
) -> Result<Option<LockGuard>, LockError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<Box<dyn Held>>, LockError>>,
{
    let (layer, started, key) = (local, Instant::now(), lock_key(name));
    let mut waited = false;
    let local = match layer.acquire(key, mode, None).await {
        Some(g) => g,
        None if deadline.is_none() => return Ok(None),
        None => {
            waited = true;
            let Some(g) = layer.acquire(key, mode, deadline).await else {
                layer.count_wait(started, false);
                return Ok(None);
            };
            g
        }
    };
    let mut backoff = Duration::from_millis(1);
    loop {
        if let Some(held) = attempt().await? {
            if waited {
                layer.count_wait(started, true);
            }
            return Ok(Some(LockGuard {
                name: name.to_owned(),
                held: Some(held),
                local: Some(local),
            }));
        }
        match deadline {
            Some(d) if Instant::now() + backoff < d => {
                waited = true;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Some(_) => {
                layer.count_wait(started, false);
                return Ok(None);
            }
            None => return Ok(None),
        }
    }
}

/// `lock` in terms of `acquire`: a timeout error instead of `None`.
pub(crate) fn timed_out(name: &str, timeout: Duration) -> LockError {
    LockError::Timeout {
        name: name.to_owned(),
        waited: timeout,
    }
}

#[cfg(test)]
pub(crate) mod conformance {
    //! Behaviour every lock backend must have within one process; `two` is a second manager on
    //! the same backend, standing in for another process (only the cross-process layer is
    //! shared). Cases with real processes are integration tests.
    use super::*;

    const SHORT: Duration = Duration::from_millis(150);

    pub async fn run_all(m: &dyn LockManager, two: &dyn LockManager) {
        // Exclusive locks exclude each other.
        let (m0, two0) = (m.waits(), two.waits());
        let g = m.lock("a", LockMode::Exclusive, SHORT).await.unwrap();
        assert!(
            m.try_lock("a", LockMode::Exclusive)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(m.waits(), m0, "a free lock and a try are no waits");
        let e = m.lock("a", LockMode::Exclusive, SHORT).await.unwrap_err();
        assert!(matches!(e, LockError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains('a'));
        let w = m.waits();
        assert_eq!((w.waited, w.timeouts), (m0.waited, m0.timeouts + 1));
        assert!(w.seconds - m0.seconds >= SHORT.as_secs_f64() * 0.9, "{w:?}");
        assert!(
            two.try_lock("a", LockMode::Exclusive)
                .await
                .unwrap()
                .is_none()
        );
        let e = two.lock("a", LockMode::Shared, SHORT).await.unwrap_err();
        assert!(matches!(e, LockError::Timeout { .. }), "{e}");
        // Independent keys.
        let other = two.try_lock("b", LockMode::Exclusive).await.unwrap();
        assert!(other.is_some());
        // Exclusive blocks shared.
        assert!(m.try_lock("a", LockMode::Shared).await.unwrap().is_none());
        // Release (explicit, then by drop).
        g.release().await;
        let s1 = m.try_lock("a", LockMode::Shared).await.unwrap().unwrap();
        // Shared locks coexist, also across managers, and block exclusive.
        let s2 = m.try_lock("a", LockMode::Shared).await.unwrap().unwrap();
        let s3 = two.try_lock("a", LockMode::Shared).await.unwrap().unwrap();
        assert!(
            m.try_lock("a", LockMode::Exclusive)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            two.try_lock("a", LockMode::Exclusive)
                .await
                .unwrap()
                .is_none()
        );
        drop(s1);
        s3.release().await;
        assert!(
            two.try_lock("a", LockMode::Exclusive)
                .await
                .unwrap()
                .is_none()
        );
        s2.release().await;
        // A waiter in the other manager gets the lock once it is released by drop.
        let g = m.lock("a", LockMode::Exclusive, SHORT).await.unwrap();
        let waiter = async {
            two.lock("a", LockMode::Exclusive, Duration::from_secs(5))
                .await
        };
        let release = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(g);
        };
        let before = two.waits();
        let (got, ()) = tokio::join!(waiter, release);
        let got = got.unwrap();
        assert_eq!(got.name(), "a");
        let after = two.waits();
        assert_eq!(
            (after.waited, after.timeouts),
            (before.waited + 1, before.timeouts)
        );
        assert!(after.seconds - before.seconds >= 0.04, "{after:?}");
        assert!(
            two0.timeouts < after.timeouts,
            "the other manager's timeout counted there"
        );
        got.release().await;
        // Many tasks contending on one key each get it, one at a time.
        let counter = std::sync::atomic::AtomicUsize::new(0);
        let inside = std::sync::atomic::AtomicUsize::new(0);
        let tasks = (0..20).map(|i| {
            let mgr = if i % 2 == 0 { m } else { two };
            let (counter, inside) = (&counter, &inside);
            async move {
                let g = mgr
                    .lock("hot", LockMode::Exclusive, Duration::from_secs(20))
                    .await
                    .unwrap();
                assert_eq!(inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst), 0);
                tokio::time::sleep(Duration::from_millis(2)).await;
                inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                g.release().await;
            }
        });
        futures::future::join_all(tasks).await;
        assert_eq!(counter.into_inner(), 20);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lock_keys_are_stable() {
        // Pinned: a change would let old and new processes disagree about which lock is which.
        assert_eq!(super::lock_key("cleaner"), 0x1133_6bc0_d913_58ca);
        assert_ne!(super::lock_key("blob:a"), super::lock_key("blob:b"));
    }
}
