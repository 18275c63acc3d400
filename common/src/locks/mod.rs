//! Advisory locks that work across processes, named by stable strings (`blob:<digest>`,
//! `path:<path>`, `cleaner`, `migrator:<source>`) and mapped to 64-bit keys by a stable hash.

mod file;

use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest as _, Sha256};

use crate::blob::Digest;

pub use file::FileLocks;

/// Shared locks coexist; an exclusive lock excludes every other lock on the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("timed out after {waited:?} waiting for lock {name}")]
    Timeout { name: String, waited: Duration },
    #[error("lock backend failed for {name}: {message}")]
    Backend { name: String, message: String },
}

/// A held lock; released when dropped (and by the OS or server if the process dies).
pub struct LockGuard {
    name: String,
    _held: Box<dyn Send + Sync>,
}

impl LockGuard {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Releases the lock now (same as dropping it, but explicit at call sites).
    pub fn release(self) {}
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
        &self,
        name: &str,
        mode: LockMode,
        timeout: Duration,
    ) -> Result<LockGuard, LockError>;

    /// Takes the lock if it is free right now.
    async fn try_lock(&self, name: &str, mode: LockMode) -> Result<Option<LockGuard>, LockError>;
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

#[cfg(test)]
pub(crate) mod conformance {
    //! Behaviour every lock backend must have (within one process; the cross-process cases
    //! are integration tests that spawn processes).
    use super::*;

    const SHORT: Duration = Duration::from_millis(150);

    pub async fn run_all(m: &dyn LockManager) {
        // Exclusive locks exclude each other.
        let g = m.lock("a", LockMode::Exclusive, SHORT).await.unwrap();
        assert!(
            m.try_lock("a", LockMode::Exclusive)
                .await
                .unwrap()
                .is_none()
        );
        let e = m.lock("a", LockMode::Exclusive, SHORT).await.unwrap_err();
        assert!(matches!(e, LockError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains('a'));
        // Independent keys.
        let other = m.try_lock("b", LockMode::Exclusive).await.unwrap();
        assert!(other.is_some());
        // Exclusive blocks shared.
        assert!(m.try_lock("a", LockMode::Shared).await.unwrap().is_none());
        // Release on drop.
        drop(g);
        let s1 = m.try_lock("a", LockMode::Shared).await.unwrap().unwrap();
        // Shared locks coexist, and block exclusive.
        let s2 = m.try_lock("a", LockMode::Shared).await.unwrap().unwrap();
        assert!(
            m.try_lock("a", LockMode::Exclusive)
                .await
                .unwrap()
                .is_none()
        );
        drop(s1);
        assert!(
            m.try_lock("a", LockMode::Exclusive)
                .await
                .unwrap()
                .is_none()
        );
        s2.release();
        // A waiter gets the lock once it is released.
        let g = m.lock("a", LockMode::Exclusive, SHORT).await.unwrap();
        let waiter = async {
            m.lock("a", LockMode::Exclusive, Duration::from_secs(5))
                .await
        };
        let release = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(g);
        };
        let (got, ()) = tokio::join!(waiter, release);
        assert_eq!(got.unwrap().name(), "a");
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
