//! The file store's interleavings, each reached deterministically: a store that steps in between
//! two of the file store's calls stands for another process that a lost lock let in.

use super::*;
use crate::blob::{BlobInfo, Digest, Encoding, Hints, IngestOptions};
use crate::locks::{BlobLock, Exclusive, FileLocks};
use crate::meta::{DeleteKind, MetaStore, PutKind, PutOutcome, PutResult, SqliteMeta, Stored};
use crate::spool::SpoolBody;
use crate::store::ObjectStream;
use crate::store::{FsStore, ObjectStore, StoreError};
use futures::TryStreamExt;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

async fn fixture(dir: &Path) -> FileStore {
    let meta = SqliteMeta::open(&dir.join("m.sqlite3"), crate::meta::sqlite_test_options())
        .await
        .unwrap();
    let store = FsStore::open(dir.join("objects")).unwrap();
    let locks = FileLocks::open(&dir.join("locks")).unwrap();
    FileStore::new(
        Arc::new(meta),
        Arc::new(store),
        Arc::new(locks),
        &dir.join("spool"),
        Duration::from_secs(5),
    )
    .unwrap()
}

const OPTS: IngestOptions = IngestOptions {
    level: 1,
    max_logical_size: 1 << 20,
    max_gzip_ratio: 0,
};

#[tokio::test]
async fn same_content_is_stored_once_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let fs = fixture(dir.path()).await;
    let mut deduped = vec![];
    for i in 0..3 {
        let s = fs
            .spool_blocking(&b"same"[..], Encoding::Identity, &Hints::default(), &OPTS)
            .unwrap();
        let c = fs
            .commit(&format!("/f{i}"), 5, s, 0, PutKind::Client)
            .await
            .unwrap();
        assert_eq!(c.outcome, PutOutcome::Stored { version: 5 });
        deduped.push(c.deduplicated);
    }
    assert_eq!(deduped, [false, true, true]);
    let stats = fs.meta.stats().await.unwrap();
    assert_eq!((stats.files, stats.blobs), (3, 1));
    let opened = fs.open("/f1").await.unwrap().unwrap();
    let gz: Vec<bytes::Bytes> = opened.body.try_collect().await.unwrap();
    let (_, n) = crate::blob::inflate(&gz.concat()[..], io::sink()).unwrap();
    assert_eq!(n, 4);
    assert_eq!(
        std::fs::read_dir(dir.path().join("spool")).unwrap().count(),
        0,
        "no spool files left behind"
    );
}

/// A client's PUT of `content` at `path`, version 1, at time `now`.
async fn commit_new(fs: &FileStore, path: &str, content: &[u8], now: i64) -> Committed {
    fs.commit(path, 1, spool(fs, content), now, PutKind::Client)
        .await
        .unwrap()
}

fn spool(fs: &FileStore, content: &[u8]) -> Spooled {
    fs.spool_blocking(content, Encoding::Identity, &Hints::default(), &OPTS)
        .unwrap()
}

async fn read_back(fs: &FileStore, path: &str) -> Vec<u8> {
    let opened = fs.open(path).await.unwrap().expect("the file exists");
    let gz: Vec<bytes::Bytes> = opened.body.try_collect().await.unwrap();
    let mut out = Vec::new();
    crate::blob::inflate(&gz.concat()[..], &mut out).unwrap();
    out
}

/// The cleaner deletes `digest` as a tombstone of `settle` would have it, with an assumed
/// lock: what a cleaner that got in through a lost lock does. Returns the deletion.
async fn cleaner_deletes(fs: &FileStore, digest: &Digest, cutoff: i64, settle: Duration) -> i64 {
    let lock = BlobLock::<Exclusive>::assumed(digest);
    let deletion = fs.meta.tombstone_blob(&lock, cutoff, settle).await.unwrap();
    let Some(crate::meta::Deletion::Tombstone(deletion)) = deletion else {
        panic!("no tombstone of an object: {deletion:?}");
    };
    let soon = tokio::time::Instant::now() + Duration::from_secs(10);
    fs.store.delete(digest, soon).await.unwrap();
    deletion
}

#[tokio::test]
async fn storing_content_again_waits_until_its_deletion_settles() {
    let dir = tempfile::tempdir().unwrap();
    let fs = fixture(dir.path()).await;
    let s = spool(&fs, b"deleted, then wanted again");
    let digest = s.info.digest;
    fs.commit("/a", 1, s, 0, PutKind::Client).await.unwrap();
    fs.delete("/a", 1, 0, DeleteKind::Client).await.unwrap();
    // A delete request of this deletion may land for another 1.5 s: an object stored
    // before then could be deleted under a live row.
    let settle = Duration::from_millis(1500);
    let deletion = cleaner_deletes(&fs, &digest, 10, settle).await;
    let started = std::time::Instant::now();
    let c = commit_new(&fs, "/b", b"deleted, then wanted again", 20).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1300),
        "{:?}",
        started.elapsed()
    );
    assert!(!c.deduplicated);
    assert_eq!(read_back(&fs, "/b").await, b"deleted, then wanted again");

    // A deletion that saw its object go with no request unanswered has settled: no wait.
    fs.delete("/b", 1, 30, DeleteKind::Client).await.unwrap();
    let deletion2 = cleaner_deletes(&fs, &digest, 40, Duration::from_secs(60)).await;
    assert_ne!(deletion, deletion2);
    assert!(
        fs.meta
            .finish_deletion(&digest, deletion2, true)
            .await
            .unwrap()
    );
    let started = std::time::Instant::now();
    commit_new(&fs, "/c", b"deleted, then wanted again", 50).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(read_back(&fs, "/c").await, b"deleted, then wanted again");
}

/// A store that lets a test step in where a lost lock lets others in: right after an object
/// is stored (a PUT between its upload and its commit), or right before one is read (a
/// GET between reading a row and opening its object).
#[derive(Default)]
struct Meddling {
    inner: Option<Arc<dyn ObjectStore>>,
    puts: std::sync::atomic::AtomicUsize,
    /// After the next put: tell the test which digest, and wait until it says go on.
    after_put: std::sync::Mutex<Option<(oneshot::Sender<Digest>, oneshot::Receiver<()>)>>,
    /// Before the next read, one of [`BeforeRead`].
    before_read: std::sync::Mutex<Option<BeforeRead>>,
}

enum BeforeRead {
    /// `/b` deleted, its blob deleted by the cleaner, and stored at `/b` again as these
    /// gzip bytes.
    StoredAgainAtB(Arc<dyn MetaStore>, Vec<u8>),
    /// The object replaced by these gzip bytes of the same content, its row unchanged: a
    /// second upload that commits its sizes a little later (with the metadata store), or
    /// never (a damaged object).
    Replaced(Option<Arc<dyn MetaStore>>, Vec<u8>),
}

impl Meddling {
    fn around(inner: Arc<dyn ObjectStore>) -> Self {
        Meddling {
            inner: Some(inner),
            ..Meddling::default()
        }
    }

    fn inner(&self) -> &Arc<dyn ObjectStore> {
        self.inner.as_ref().expect("a store to meddle with")
    }

    async fn store_again_at_b(&self, meta: &dyn MetaStore, digest: &Digest, gz: Vec<u8>) {
        meta.delete_file("/b", 1, 0, DeleteKind::Client)
            .await
            .unwrap();
        let lock = BlobLock::<Exclusive>::assumed(digest);
        let deletion = meta
            .tombstone_blob(&lock, i64::MAX, Duration::ZERO)
            .await
            .unwrap();
        assert!(
            deletion.is_some(),
            "unreferenced, so the cleaner may take it"
        );
        let soon = tokio::time::Instant::now() + Duration::from_secs(10);
        self.inner().delete(digest, soon).await.unwrap();
        let over = meta.blob_state(lock.held()).await.unwrap();
        let n = gz.len() as u64;
        let info = BlobInfo {
            digest: *digest,
            logical_size: 4,
            stored_size: n,
        };
        self.inner()
            .put(digest, SpoolBody::Memory(gz.into()), n)
            .await
            .unwrap();
        let stored = Stored::Object { lock: &lock, over };
        let r = meta
            .store_file("/b", 2, &info, stored, 0, PutKind::Client)
            .await;
        assert!(matches!(r, Ok(PutResult::Done(_))), "{r:?}");
    }
}

#[async_trait::async_trait]
impl ObjectStore for Meddling {
    fn describe(&self) -> String {
        self.inner().describe()
    }
    fn key(&self, digest: &Digest) -> String {
        self.inner().key(digest)
    }
    async fn put(&self, digest: &Digest, body: SpoolBody, size: u64) -> Result<(), StoreError> {
        self.inner().put(digest, body, size).await?;
        self.puts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let step_in = self.after_put.lock().unwrap().take();
        if let Some((tell, resume)) = step_in {
            let _ = tell.send(*digest);
            let _ = resume.await;
        }
        Ok(())
    }
    async fn get(&self, digest: &Digest) -> Result<ObjectStream, StoreError> {
        self.inner().get(digest).await
    }
    async fn get_stored(&self, digest: &Digest, size: u64) -> Result<ObjectStream, StoreError> {
        let step_in = self.before_read.lock().unwrap().take();
        match step_in {
            Some(BeforeRead::StoredAgainAtB(meta, gz)) => {
                self.store_again_at_b(&*meta, digest, gz).await;
            }
            Some(BeforeRead::Replaced(meta, gz)) => {
                let n = gz.len() as u64;
                self.inner()
                    .put(digest, SpoolBody::Memory(gz.into()), n)
                    .await?;
                let digest = *digest;
                // The second upload's commit, a moment later.
                tokio::spawn(async move {
                    let Some(meta) = meta else { return };
                    tokio::time::sleep(Duration::from_millis(120)).await;
                    let lock = BlobLock::<Exclusive>::assumed(&digest);
                    let info = BlobInfo {
                        digest,
                        logical_size: 4,
                        stored_size: n,
                    };
                    let over = BlobState::Live;
                    let stored = Stored::Object { lock: &lock, over };
                    let r = meta.store_file("/c", 1, &info, stored, 0, PutKind::Client);
                    assert!(matches!(r.await, Ok(PutResult::Done(_))));
                });
            }
            None => {}
        }
        self.inner().get_stored(digest, size).await
    }
    async fn head(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        self.inner().head(digest).await
    }
    async fn delete(
        &self, digest: &Digest, deadline: tokio::time::Instant,
    ) -> Result<crate::store::Deleted, StoreError> {
        self.inner().delete(digest, deadline).await
    }
    async fn check(&self) -> Result<(), StoreError> {
        self.inner().check().await
    }
    async fn list(
        &self, after: Option<&Digest>, limit: usize,
    ) -> Result<Vec<crate::store::ObjectEntry>, StoreError> {
        self.inner().list(after, limit).await
    }
}

#[tokio::test]
async fn an_upload_deleted_before_its_commit_is_stored_again_not_acknowledged_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut fs = fixture(dir.path()).await;
    let (tell, stored) = oneshot::channel();
    let (resume, resumed) = oneshot::channel();
    let store = Arc::new(Meddling::around(fs.store.clone()));
    *store.after_put.lock().unwrap() = Some((tell, resumed));
    fs.store = store.clone();
    let fs = Arc::new(fs);
    // Large enough for a spool file, which the store moves into place (gone from the
    // spool when the cleaner deletes the object).
    let mut x = 1u64;
    let content: Vec<u8> = (0..500_000)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect();
    let put = {
        let (fs, s) = (fs.clone(), spool(&fs, &content));
        tokio::spawn(async move { fs.commit("/x", 1, s, 0, PutKind::Client).await })
    };
    let digest = stored.await.unwrap();
    // The orphan sweep, let in by a lost lock: the object has no row yet.
    let lock = BlobLock::<Exclusive>::assumed(&digest);
    let made = fs
        .meta
        .tombstone_orphans(&[(&lock, 1)], Duration::ZERO, 0)
        .await
        .unwrap();
    let [(_, deletion)] = made[..] else {
        panic!("{made:?}")
    };
    let soon = tokio::time::Instant::now() + Duration::from_secs(10);
    fs.store.delete(&digest, soon).await.unwrap();
    fs.meta
        .finish_deletion(&digest, deletion, true)
        .await
        .unwrap();
    resume.send(()).unwrap();
    let c = put.await.unwrap().unwrap();
    assert_eq!(c.outcome, PutOutcome::Stored { version: 1 });
    assert_eq!(
        store.puts.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "stored again"
    );
    assert_eq!(read_back(&fs, "/x").await, content);
    let v = super::gc::verify(&fs, true, 10, Duration::from_secs(1), &|_| {})
        .await
        .unwrap();
    assert_eq!(v.problems(), 0, "{v:?}");
}

#[tokio::test]
async fn a_read_that_finds_its_content_stored_again_as_other_bytes_reads_the_new_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut fs = fixture(dir.path()).await;
    // Stored as the server's level-1 gzip; the same content as a client's level-9 gzip
    // with a header of its own is other bytes of another length.
    fs.commit("/b", 1, spool(&fs, b"same"), 0, PutKind::Client)
        .await
        .unwrap();
    let mut gz = flate2::GzBuilder::new()
        .filename("another header")
        .write(Vec::new(), flate2::Compression::new(9));
    io::Write::write_all(&mut gz, b"same").unwrap();
    let gz = gz.finish().unwrap();
    let before = fs
        .meta
        .get_file("/b")
        .await
        .unwrap()
        .unwrap()
        .blob
        .stored_size;
    assert_ne!(before, gz.len() as u64);
    let store = Arc::new(Meddling::around(fs.store.clone()));
    let action = BeforeRead::StoredAgainAtB(fs.meta.clone(), gz.clone());
    *store.before_read.lock().unwrap() = Some(action);
    fs.store = store.clone();
    let opened = fs.open("/b").await.unwrap().expect("the file is there");
    assert_eq!(opened.entry.version, 2, "the row read again");
    assert_eq!(opened.entry.blob.stored_size, gz.len() as u64);
    let bytes: Vec<bytes::Bytes> = opened.body.try_collect().await.unwrap();
    assert_eq!(bytes.concat(), gz, "the object the row describes, whole");

    // A second upload replaced the object and commits its sizes a moment later: the read
    // waits for it and sends the object whole under its new length.
    let mut gz6 = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    io::Write::write_all(&mut gz6, b"same").unwrap();
    let gz6 = gz6.finish().unwrap();
    assert_ne!(gz6.len(), gz.len());
    let action = BeforeRead::Replaced(Some(fs.meta.clone()), gz6.clone());
    *store.before_read.lock().unwrap() = Some(action);
    let opened = fs.open("/b").await.unwrap().expect("the file is there");
    assert_eq!(opened.entry.blob.stored_size, gz6.len() as u64);
    let bytes: Vec<bytes::Bytes> = opened.body.try_collect().await.unwrap();
    assert_eq!(bytes.concat(), gz6);

    // An object of another size that no commit explains (damaged, or written behind our
    // back) is an error, never sent under the row's length.
    let other = crate::blob::tests::gzip(b"something else entirely", 1);
    *store.before_read.lock().unwrap() = Some(BeforeRead::Replaced(None, other));
    let e = fs.open("/b").await.err().expect("refused");
    assert!(
        matches!(e, FileStoreError::Store(StoreError::Changed { .. })),
        "{e}"
    );
}

#[tokio::test]
async fn a_row_without_its_object_is_an_error_not_absence() {
    let dir = tempfile::tempdir().unwrap();
    let fs = fixture(dir.path()).await;
    let s = fs
        .spool_blocking(&b"x"[..], Encoding::Identity, &Hints::default(), &OPTS)
        .unwrap();
    let digest = s.info.digest;
    fs.commit("/x", 1, s, 0, PutKind::Client).await.unwrap();
    let soon = tokio::time::Instant::now() + Duration::from_secs(30);
    fs.store.delete(&digest, soon).await.unwrap();
    let e = fs.open("/x").await.err().unwrap();
    assert!(matches!(e, FileStoreError::ObjectMissing { .. }), "{e}");
    assert!(fs.open("/nothing").await.unwrap().is_none());
}
