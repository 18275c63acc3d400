//! The embedded default object store: one file per blob under a local directory.

use std::io;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio_util::io::ReaderStream;

use super::{ObjectStore, ObjectStream, StoreError, object_key};
use crate::blob::Digest;

const READ_CHUNK: usize = 64 * 1024;

/// Objects at `<root>/<aa>/<bb>/<sha256>`, committed by an atomic rename from the spool.
#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    /// Opens (creating if needed) the store directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        std::fs::create_dir_all(&root)
            .map_err(|e| StoreError::io("creating directory", &root.display().to_string(), e))?;
        Ok(FsStore { root })
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join(object_key("", digest))
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn commit(spool: tempfile::NamedTempFile, dest: &Path) -> io::Result<()> {
    spool.as_file().sync_all()?;
    let parent = dest
        .parent()
        .ok_or_else(|| io::Error::other("object path has no parent"))?;
    std::fs::create_dir_all(parent)?;
    match spool.persist(dest) {
        Ok(_) => {}
        // The spool lives on another filesystem: copy beside the destination, then rename.
        Err(e) if e.error.raw_os_error() == Some(nix::libc::EXDEV) => {
            let mut src = e.file.reopen()?;
            let mut tmp = tempfile::NamedTempFile::new_in(parent)?;
            io::copy(&mut src, tmp.as_file_mut())?;
            tmp.as_file().sync_all()?;
            tmp.persist(dest).map_err(|e| e.error)?;
        }
        Err(e) => return Err(e.error),
    }
    sync_dir(parent)
}

#[async_trait]
impl ObjectStore for FsStore {
    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }

    fn key(&self, digest: &Digest) -> String {
        self.path(digest).display().to_string()
    }

    async fn put(
        &self,
        digest: &Digest,
        spool: tempfile::NamedTempFile,
        _size: u64,
    ) -> Result<(), StoreError> {
        let dest = self.path(digest);
        let key = dest.display().to_string();
        tokio::task::spawn_blocking(move || commit(spool, &dest))
            .await
            .map_err(|e| StoreError::io("storing", &key, io::Error::other(e)))?
            .map_err(|e| StoreError::io("storing", &key, e))
    }

    async fn get(&self, digest: &Digest) -> Result<ObjectStream, StoreError> {
        let path = self.path(digest);
        let key = path.display().to_string();
        match tokio::fs::File::open(&path).await {
            Ok(f) => Ok(Box::pin(ReaderStream::with_capacity(f, READ_CHUNK))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::NotFound { key }),
            Err(e) => Err(StoreError::io("reading", &key, e)),
        }
    }

    async fn head(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let path = self.path(digest);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("inspecting", &path.display().to_string(), e)),
        }
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.path(digest);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io("deleting", &path.display().to_string(), e)),
        }
    }

    async fn check(&self) -> Result<(), StoreError> {
        let root = self.root.clone();
        match tokio::fs::metadata(&root).await {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(StoreError::io(
                "checking",
                &root.display().to_string(),
                io::Error::other("not a directory"),
            )),
            Err(e) => Err(StoreError::io("checking", &root.display().to_string(), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use std::io::Write;

    #[tokio::test]
    async fn put_get_delete_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path().join("objects")).unwrap();
        let d = Digest([7; 32]);
        assert!(matches!(
            store.get(&d).await,
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(store.head(&d).await.unwrap(), None);

        let mut spool = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
        spool.write_all(b"payload").unwrap();
        let spool_path = spool.path().to_owned();
        store.put(&d, spool, 7).await.unwrap();
        assert!(!spool_path.exists(), "the spool file was moved into place");
        assert_eq!(store.head(&d).await.unwrap(), Some(7));
        let chunks: Vec<bytes::Bytes> = store.get(&d).await.unwrap().try_collect().await.unwrap();
        assert_eq!(chunks.concat(), b"payload");

        store.delete(&d).await.unwrap();
        store.delete(&d).await.unwrap();
        assert_eq!(store.head(&d).await.unwrap(), None);
        store.check().await.unwrap();
    }
}
