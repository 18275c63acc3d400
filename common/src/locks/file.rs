//! Locks for one host: `fcntl` open-file-description byte-range locks on a lock file beside the
//! SQLite database. Byte `key` of the file stands for the lock named `key`. The kernel releases
//! them when the holder's file is closed, including when its process dies. `F_OFD_SETLK` never
//! blocks, so no fcntl wait ever runs on the async runtime.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;
use tokio::time::Instant;

use super::{
    Check, Held, LocalLocks, LockError, LockGuard, LockManager, LockMode, LockWaits, Release,
    acquire, lock_key, timed_out,
};

/// `fcntl`-based [`LockManager`].
pub struct FileLocks {
    path: PathBuf,
    local: LocalLocks,
}

/// Closing the file releases the byte-range lock.
struct HeldFile {
    file: File,
    path: PathBuf,
}

impl Held for HeldFile {
    fn release(self: Box<Self>) -> Option<Release> {
        None
    }

    /// The kernel keeps the lock while the file is open, but only on that file: one deleted or
    /// replaced at the path is a new file whose byte ranges anyone can lock.
    fn check(&self) -> Check<'_> {
        use std::os::unix::fs::MetadataExt;
        let same = || -> std::io::Result<bool> {
            let (ours, there) = (self.file.metadata()?, std::fs::metadata(&self.path)?);
            Ok((ours.dev(), ours.ino()) == (there.dev(), there.ino()))
        };
        let result = match same() {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!(
                "the lock file {} was replaced",
                self.path.display()
            )),
            Err(e) => Err(format!("the lock file {}: {e}", self.path.display())),
        };
        Box::pin(std::future::ready(result))
    }
}

impl FileLocks {
    /// Uses (creating if needed) the lock file at `path`.
    pub fn open(path: &Path) -> Result<Self, LockError> {
        let locks = FileLocks {
            path: path.to_owned(),
            local: LocalLocks::default(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| locks.backend_error("(opening)", e))?;
        }
        locks.open_file("(opening)")?;
        Ok(locks)
    }

    /// A new open file description per held lock: OFD locks belong to the description, so two
    /// holders of one shared lock must not share one (the first release would free both).
    fn open_file(&self, name: &str) -> Result<File, LockError> {
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

    /// One non-blocking attempt at the cross-process lock.
    fn try_fcntl(&self, name: &str, mode: LockMode) -> Result<Option<Box<dyn Held>>, LockError> {
        let file = self.open_file(name)?;
        // Keys fill 62 bits so offset + length stays within off_t.
        let offset = (lock_key(name) >> 2) as libc::off_t;
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
            Ok(_) => Ok(Some(Box::new(HeldFile {
                file,
                path: self.path.clone(),
            }))),
            Err(Errno::EAGAIN) | Err(Errno::EACCES) => Ok(None),
            Err(e) => Err(self.backend_error(name, e)),
        }
    }
}

#[async_trait]
impl LockManager for FileLocks {
    async fn lock(
        &self, name: &str, mode: LockMode, timeout: Duration,
    ) -> Result<LockGuard, LockError> {
        let deadline = Some(Instant::now() + timeout);
        acquire(&self.local, name, mode, deadline, || async {
            self.try_fcntl(name, mode)
        })
        .await?
        .ok_or_else(|| timed_out(name, timeout))
    }

    async fn try_lock(&self, name: &str, mode: LockMode) -> Result<Option<LockGuard>, LockError> {
        acquire(&self.local, name, mode, None, || async {
            self.try_fcntl(name, mode)
        })
        .await
    }

    fn waits(&self) -> LockWaits {
        self.local.waits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x/locks");
        // Two managers on one file behave like two processes.
        let (a, b) = (FileLocks::open(&p).unwrap(), FileLocks::open(&p).unwrap());
        super::super::conformance::run_all(&a, &b).await;
    }

    #[tokio::test]
    async fn a_lock_file_replaced_under_its_holder_is_a_lost_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("locks");
        let (a, b) = (FileLocks::open(&p).unwrap(), FileLocks::open(&p).unwrap());
        let g = a
            .lock("r", LockMode::Exclusive, Duration::from_secs(1))
            .await
            .unwrap();
        g.ensure_held().await.unwrap();
        // Someone "cleans up" the lock file: the next locker locks a new file.
        std::fs::remove_file(&p).unwrap();
        let other = b.try_lock("r", LockMode::Exclusive).await.unwrap();
        assert!(other.is_some(), "the new file's byte is free");
        let e = g.ensure_held().await.unwrap_err();
        assert!(
            matches!(e, LockError::Lost { .. }) && e.to_string().contains("replaced"),
            "{e}"
        );
    }
}
