//! Locks for one host: `fcntl` open-file-description byte-range locks on a lock file beside the
//! SQLite database. Byte `key` of the file stands for the lock named `key`. The kernel releases
//! them when the holder's file is closed, including when its process dies.
//!
//! Within one process, waiters first queue on an async lock, so contention inside the API costs
//! no thread and no polling; only cross-process contention is polled with `F_OFD_SETLK`, which
//! never blocks, so no fcntl wait ever runs on the async runtime.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};
use tokio::time::Instant;

use super::{LockError, LockGuard, LockManager, LockMode, lock_key};

const MAX_BACKOFF: Duration = Duration::from_millis(20);

/// `fcntl`-based [`LockManager`].
pub struct FileLocks {
    path: PathBuf,
    local: Mutex<HashMap<u64, Weak<RwLock<()>>>>,
}

enum LocalGuard {
    Shared(#[allow(dead_code)] OwnedRwLockReadGuard<()>),
    Exclusive(#[allow(dead_code)] OwnedRwLockWriteGuard<()>),
}

/// Field order matters: the file (cross-process lock) is released before the local guard.
struct Held {
    _file: File,
    _local: LocalGuard,
}

impl FileLocks {
    /// Uses (creating if needed) the lock file at `path`.
    pub fn open(path: &Path) -> Result<Self, LockError> {
        let locks = FileLocks {
            path: path.to_owned(),
            local: Mutex::new(HashMap::new()),
        };
        locks.open_file("(opening)")?;
        Ok(locks)
    }

    fn open_file(&self, name: &str) -> Result<File, LockError> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| self.backend_error(name, e))?;
        }
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)
            .map_err(|e| self.backend_error(name, e))
    }

    fn backend_error(&self, name: &str, e: impl std::fmt::Display) -> LockError {
        LockError::Backend {
            name: name.to_owned(),
            message: format!("lock file {}: {e}", self.path.display()),
        }
    }

    fn local_lock(&self, key: u64) -> Arc<RwLock<()>> {
        let mut map = self.local.lock().unwrap_or_else(|p| p.into_inner());
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

    /// One non-blocking attempt at the cross-process lock.
    fn try_fcntl(
        &self,
        file: &File,
        key: u64,
        mode: LockMode,
        name: &str,
    ) -> Result<bool, LockError> {
        // Keys fill 62 bits so offset + length stays within off_t.
        let offset = (key >> 2) as libc::off_t;
        // SAFETY: flock is a plain C struct; all-zero is a valid value that we then fill in.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = match mode {
            LockMode::Shared => libc::F_RDLCK,
            LockMode::Exclusive => libc::F_WRLCK,
        } as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = offset;
        fl.l_len = 1;
        match fcntl(file.as_fd(), FcntlArg::F_OFD_SETLK(&fl)) {
            Ok(_) => Ok(true),
            Err(Errno::EAGAIN) | Err(Errno::EACCES) => Ok(false),
            Err(e) => Err(self.backend_error(name, e)),
        }
    }

    async fn acquire(
        &self,
        name: &str,
        mode: LockMode,
        deadline: Option<Instant>,
    ) -> Result<Option<LockGuard>, LockError> {
        let key = lock_key(name);
        let local = self.local_lock(key);
        let local = match (mode, deadline) {
            (LockMode::Shared, None) => local.try_read_owned().ok().map(LocalGuard::Shared),
            (LockMode::Exclusive, None) => local.try_write_owned().ok().map(LocalGuard::Exclusive),
            (LockMode::Shared, Some(d)) => tokio::time::timeout_at(d, local.read_owned())
                .await
                .ok()
                .map(LocalGuard::Shared),
            (LockMode::Exclusive, Some(d)) => tokio::time::timeout_at(d, local.write_owned())
                .await
                .ok()
                .map(LocalGuard::Exclusive),
        };
        let Some(local) = local else { return Ok(None) };
        let file = self.open_file(name)?;
        let mut backoff = Duration::from_millis(1);
        loop {
            if self.try_fcntl(&file, key, mode, name)? {
                return Ok(Some(LockGuard {
                    name: name.to_owned(),
                    _held: Box::new(Held {
                        _file: file,
                        _local: local,
                    }),
                }));
            }
            match deadline {
                Some(d) if Instant::now() + backoff < d => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                _ => return Ok(None),
            }
        }
    }
}

#[async_trait]
impl LockManager for FileLocks {
    async fn lock(
        &self,
        name: &str,
        mode: LockMode,
        timeout: Duration,
    ) -> Result<LockGuard, LockError> {
        self.acquire(name, mode, Some(Instant::now() + timeout))
            .await?
            .ok_or_else(|| LockError::Timeout {
                name: name.to_owned(),
                waited: timeout,
            })
    }

    async fn try_lock(&self, name: &str, mode: LockMode) -> Result<Option<LockGuard>, LockError> {
        self.acquire(name, mode, None).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let locks = FileLocks::open(&dir.path().join("x/locks")).unwrap();
        super::super::conformance::run_all(&locks).await;
    }

    #[tokio::test]
    async fn two_managers_on_one_file_exclude_each_other() {
        // Two managers behave like two processes: only the fcntl layer is shared.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("locks");
        let a = FileLocks::open(&p).unwrap();
        let b = FileLocks::open(&p).unwrap();
        let g = a.try_lock("k", LockMode::Exclusive).await.unwrap().unwrap();
        assert!(b.try_lock("k", LockMode::Shared).await.unwrap().is_none());
        assert!(
            b.try_lock("other", LockMode::Exclusive)
                .await
                .unwrap()
                .is_some()
        );
        let waiter = b.lock("k", LockMode::Exclusive, Duration::from_secs(5));
        let release = async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            drop(g);
        };
        let (got, ()) = tokio::join!(waiter, release);
        got.unwrap();
        let s1 = a.try_lock("s", LockMode::Shared).await.unwrap();
        let s2 = b.try_lock("s", LockMode::Shared).await.unwrap();
        assert!(
            s1.is_some() && s2.is_some(),
            "shared locks coexist across processes"
        );
    }
}
