//! The embedded default object store: one file per blob under a local directory.
//!
//! New objects are made durable in groups: each writer moves (renames or links) its file into
//! place and then waits for one `syncfs(2)` of the store's filesystem that started after that. A disk
//! flush costs about a millisecond whatever it carries, so sixteen concurrent uploads share one
//! instead of queueing for thirty-two (file and directory `fsync` each). Small bodies held in
//! memory are written by the flushing thread itself, just before its flush, which saves each
//! small upload a trip through another thread; small objects are read in one step too.

use std::io;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::io::ReaderStream;

use super::{
    Deleted, ObjectEntry, ObjectStore, ObjectStream, READ_CHUNK, StaleUploads, StoreError,
    digest_of_key, local_stream, object_key, read_cached, read_if_small,
};
use crate::blob::Digest;
use crate::spool::SpoolBody;

/// Writers waiting for a flush before new ones wait to queue.
const SYNC_QUEUE: usize = 1024;

/// A writer's request for a flush, with a small object to write first, answered with the
/// outcome (the OS error itself, so a full disk stays [`StoreError::Full`]).
struct SyncRequest {
    place: Option<(bytes::Bytes, PathBuf)>,
    reply: oneshot::Sender<io::Result<()>>,
}

/// Objects at `<root>/<aa>/<bb>/<sha256>`, committed by an atomic rename from the spool.
#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
    syncs: mpsc::Sender<SyncRequest>,
}

impl FsStore {
    /// Opens (creating if needed) the store directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let key = root.display().to_string();
        std::fs::create_dir_all(&root)
            .map_err(|e| StoreError::io("creating directory", &key, e))?;
        let dir = std::fs::File::open(&root).map_err(|e| StoreError::io("opening", &key, e))?;
        let syncs = crate::group::spawn(
            "store-sync",
            SYNC_QUEUE,
            SYNC_QUEUE,
            move |group: Vec<SyncRequest>| {
                let placed: Vec<_> = group
                    .into_iter()
                    .map(|req| {
                        let r = match req.place {
                            Some((bytes, dest)) => place(SpoolBody::Memory(bytes), &dest),
                            None => Ok(()),
                        };
                        (r, req.reply)
                    })
                    .collect();
                let synced = nix::unistd::syncfs(&dir);
                for (r, reply) in placed {
                    // A writer that went away needs no answer.
                    let _ = reply.send(r.and_then(|()| synced.map_err(io::Error::from)));
                }
            },
        )
        .map_err(|e| StoreError::io("starting the sync thread for", &key, e))?;
        Ok(FsStore { root, syncs })
    }

    /// Returns once everything written to the store's filesystem before the call (and
    /// `place`, a small object written first) is on disk.
    async fn flush(
        &self, key: &str, place: Option<(bytes::Bytes, PathBuf)>,
    ) -> Result<(), StoreError> {
        let stopped = || StoreError::io("syncing", key, io::Error::other("sync thread stopped"));
        let (reply, rx) = oneshot::channel();
        let req = SyncRequest { place, reply };
        self.syncs.send(req).await.map_err(|_| stopped())?;
        rx.await
            .map_err(|_| stopped())?
            .map_err(|e| StoreError::io("storing", key, e))
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join(object_key("", digest))
    }
}

/// Sorted names of the entries of `dir` that are `>= from` (a missing directory is empty).
fn sorted_names(dir: &Path, from: &str) -> io::Result<Vec<String>> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.as_str() >= from)
            .collect(),
        // Missing, or a stray file where a shard directory would be: nothing of ours inside.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTDIR) => Vec::new(),
        Err(e) => return Err(e),
    };
    names.sort_unstable();
    Ok(names)
}

/// Walks `<root>/<aa>/<bb>/<sha256>` in order from `after`, reading only the directories it
/// needs, so memory is bounded by one shard directory and `limit`.
fn list_sorted(root: &Path, after: Option<&Digest>, limit: usize) -> io::Result<Vec<ObjectEntry>> {
    let after_hex = after.map(Digest::to_hex).unwrap_or_default();
    let (a0, b0) = if after_hex.is_empty() {
        ("", "")
    } else {
        (&after_hex[0..2], &after_hex[2..4])
    };
    let mut out = Vec::new();
    for aa in sorted_names(root, a0)? {
        let b_from = if aa == a0 { b0 } else { "" };
        for bb in sorted_names(&root.join(&aa), b_from)? {
            let dir = root.join(&aa).join(&bb);
            for name in sorted_names(&dir, "")? {
                if name.as_str() <= after_hex.as_str() {
                    continue;
                }
                let Some(digest) = digest_of_key("", &format!("{aa}/{bb}/{name}")) else {
                    continue; // spool leftovers of an EXDEV copy, foreign files: never ours
                };
                let Ok(meta) = std::fs::metadata(dir.join(&name)) else {
                    continue; // deleted meanwhile
                };
                out.push(ObjectEntry {
                    digest,
                    size: meta.len(),
                    modified: modified_secs(&meta),
                });
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
    }
    Ok(out)
}

/// Moves the spooled object into place (a body held in memory is written beside it first);
/// durable only after the next [`FsStore::flush`].
fn place(body: SpoolBody, dest: &Path) -> io::Result<()> {
    let parent = dest
        .parent()
        .ok_or_else(|| io::Error::other("object path has no parent"))?;
    // The shard directory is made when an attempt finds it missing: a `mkdir` on every upload
    // took the parent directory's lock only to fail.
    match place_in(body, parent, dest) {
        Err((e, Some(body))) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(parent)?;
            place_in(body, parent, dest).map_err(|(e, _)| e)
        }
        other => other.map_err(|(e, _)| e),
    }
}

/// One attempt at [`place`]; a failure gives the body back for another.
fn place_in(
    body: SpoolBody, parent: &Path, dest: &Path,
) -> Result<(), (io::Error, Option<SpoolBody>)> {
    let spool = match body {
        SpoolBody::File(f) => f,
        SpoolBody::Memory(bytes) => {
            return write_beside(&mut io::Cursor::new(&bytes[..]), parent, dest)
                .map_err(|e| (e, Some(SpoolBody::Memory(bytes))));
        }
    };
    match spool.persist(dest) {
        Ok(_) => Ok(()),
        // The spool lives on another filesystem: copy beside the destination, then rename.
        Err(e) if e.error.raw_os_error() == Some(nix::libc::EXDEV) => {
            let copied = e
                .file
                .reopen()
                .and_then(|mut f| write_beside(&mut f, parent, dest));
            copied.map_err(|err| (err, Some(SpoolBody::File(e.file))))
        }
        Err(e) => Err((e.error, Some(SpoolBody::File(e.file)))),
    }
}

/// Writes `src` into `parent`, `dest`'s directory, and gives it `dest`'s name only when whole.
/// The file is first an unnamed `O_TMPFILE` one, named by `linkat(2)`: a process killed
/// mid-write leaves nothing behind. Where that cannot be (a filesystem without `O_TMPFILE`, no
/// `/proc`, or `dest` already there and to be replaced), a named temporary file is renamed
/// instead; [`sweep_temporaries`] removes those a crash left.
fn write_beside(
    src: &mut (impl io::Read + io::Seek), parent: &Path, dest: &Path,
) -> io::Result<()> {
    if let Some(mut unnamed) = open_unnamed(parent)? {
        io::copy(src, &mut unnamed)?;
        // Whatever kept the link from being made (EEXIST most often), the rename below either
        // does the job or fails with the error that matters.
        if name_unnamed(&unnamed, dest).is_ok() {
            return Ok(());
        }
        src.seek(io::SeekFrom::Start(0))?;
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(parent)?;
    io::copy(src, tmp.as_file_mut())?;
    tmp.persist(dest).map(drop).map_err(|e| e.error)
}

/// How the names of temporary files in shard directories begin (never a digest's first byte).
const TEMP_PREFIX: &str = ".tmp";

/// An unnamed file in `dir`, or `None` where its filesystem has no `O_TMPFILE`.
fn open_unnamed(dir: &Path) -> io::Result<Option<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_TMPFILE)
        .open(dir);
    match opened {
        Ok(f) => Ok(Some(f)),
        // EISDIR: a kernel that predates O_TMPFILE and took it for O_DIRECTORY.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(nix::libc::EOPNOTSUPP | nix::libc::EISDIR | nix::libc::EINVAL)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Links an unnamed file in as `dest`, which must not exist. Through `/proc/self/fd`:
/// `AT_EMPTY_PATH` would need `CAP_DAC_READ_SEARCH`.
fn name_unnamed(file: &std::fs::File, dest: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = format!("/proc/self/fd/{}", file.as_raw_fd());
    nix::unistd::linkat(
        nix::fcntl::AT_FDCWD,
        fd.as_str(),
        nix::fcntl::AT_FDCWD,
        dest,
        nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
    )
    .map_err(io::Error::from)
}

/// Removes the temporary files older than `before` (Unix seconds) from the shard directories:
/// what a process killed between creating one and renaming it left. Returns how many went (in
/// a dry run: would go) and the ones that could not be removed, with why.
fn sweep_temporaries(root: &Path, before: i64, dry_run: bool) -> io::Result<StaleUploads> {
    let mut done = StaleUploads::default();
    for aa in sorted_names(root, "")? {
        for bb in sorted_names(&root.join(&aa), "")? {
            let dir = root.join(&aa).join(&bb);
            for name in sorted_names(&dir, "")? {
                if !name.starts_with(TEMP_PREFIX) {
                    continue;
                }
                let path = dir.join(&name);
                let Ok(meta) = std::fs::symlink_metadata(&path) else {
                    continue; // renamed into place or removed meanwhile
                };
                if !meta.is_file() || modified_secs(&meta) >= before {
                    continue;
                }
                match if dry_run {
                    Ok(())
                } else {
                    std::fs::remove_file(&path)
                } {
                    Ok(()) => done.aborted += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => done
                        .failed
                        .push((path.display().to_string(), e.to_string())),
                }
            }
        }
    }
    Ok(done)
}

fn modified_secs(meta: &std::fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i64)
}

#[async_trait]
impl ObjectStore for FsStore {
    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }

    fn key(&self, digest: &Digest) -> String {
        self.path(digest).display().to_string()
    }

    async fn put(&self, digest: &Digest, body: SpoolBody, _size: u64) -> Result<(), StoreError> {
        let dest = self.path(digest);
        let key = dest.display().to_string();
        match body {
            SpoolBody::Memory(bytes) => self.flush(&key, Some((bytes, dest))).await,
            body => {
                tokio::task::spawn_blocking(move || place(body, &dest))
                    .await
                    .map_err(|e| StoreError::io("storing", &key, io::Error::other(e)))?
                    .map_err(|e| StoreError::io("storing", &key, e))?;
                self.flush(&key, None).await
            }
        }
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

    async fn get_stored(&self, digest: &Digest, size: u64) -> Result<ObjectStream, StoreError> {
        let path = self.path(digest);
        if let Some(bytes) = read_cached(&path, size) {
            return Ok(local_stream(Ok(bytes)));
        }
        let key = path.display().to_string();
        // The size is the open file's: a file stored again at the path later is another file.
        let read = tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&path)?;
            let actual = f.metadata()?.len();
            Ok::<_, io::Error>((actual, read_if_small(f)?))
        })
        .await
        .map_err(|e| StoreError::io("reading", &key, io::Error::other(e)))?;
        match read {
            Ok((actual, read)) => {
                super::check_size(&key, size, actual)?;
                Ok(local_stream(read))
            }
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

    /// An unlink cannot be taken back once started: one that outlives the deadline (a hung
    /// disk) is reported as failed and may still happen, which the settle time after the
    /// deadline covers.
    async fn delete(&self, digest: &Digest, deadline: Instant) -> Result<Deleted, StoreError> {
        let path = self.path(digest);
        let key = path.display().to_string();
        if Instant::now() >= deadline {
            return Err(super::deadline_passed(&key));
        }
        match tokio::time::timeout_at(deadline, tokio::fs::remove_file(&path)).await {
            Err(_) => Err(super::deadline_passed(&key)),
            Ok(Ok(())) => Ok(Deleted::Settled),
            Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => Ok(Deleted::Settled),
            Ok(Err(e)) => Err(StoreError::io("deleting", &key, e)),
        }
    }

    async fn list(
        &self, after: Option<&Digest>, limit: usize,
    ) -> Result<Vec<ObjectEntry>, StoreError> {
        let root = self.root.clone();
        let after = after.copied();
        let key = root.display().to_string();
        tokio::task::spawn_blocking(move || list_sorted(&root, after.as_ref(), limit))
            .await
            .map_err(|e| StoreError::io("listing", &key, io::Error::other(e)))?
            .map_err(|e| StoreError::io("listing", &key, e))
    }

    /// Here the unfinished uploads are the temporary files of writes a crash interrupted.
    async fn abort_stale_uploads(
        &self, before: i64, dry_run: bool,
    ) -> Result<Option<StaleUploads>, StoreError> {
        let root = self.root.clone();
        let key = root.display().to_string();
        tokio::task::spawn_blocking(move || sweep_temporaries(&root, before, dry_run))
            .await
            .map_err(|e| StoreError::io("sweeping", &key, io::Error::other(e)))?
            .map(Some)
            .map_err(|e| StoreError::io("sweeping", &key, e))
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
        store.put(&d, SpoolBody::File(spool), 7).await.unwrap();
        assert!(!spool_path.exists(), "the spool file was moved into place");
        assert_eq!(store.head(&d).await.unwrap(), Some(7));
        let chunks: Vec<bytes::Bytes> = store.get(&d).await.unwrap().try_collect().await.unwrap();
        assert_eq!(chunks.concat(), b"payload");

        // A body held in memory replaces the object the same way, leaving no temporary file.
        let body = SpoolBody::Memory(bytes::Bytes::from_static(b"in memory"));
        store.put(&d, body, 9).await.unwrap();
        let chunks: Vec<bytes::Bytes> = store.get(&d).await.unwrap().try_collect().await.unwrap();
        assert_eq!(chunks.concat(), b"in memory");
        let shard = store.path(&d).parent().unwrap().to_owned();
        assert_eq!(std::fs::read_dir(shard).unwrap().count(), 1);

        let soon = Instant::now() + std::time::Duration::from_secs(30);
        assert_eq!(store.delete(&d, soon).await.unwrap(), Deleted::Settled);
        assert_eq!(
            store.delete(&d, soon).await.unwrap(),
            Deleted::Settled,
            "already gone"
        );
        assert_eq!(store.head(&d).await.unwrap(), None);
        let e = store.delete(&d, Instant::now()).await.unwrap_err();
        assert!(e.to_string().contains("deadline"), "{e}");
        store.check().await.unwrap();
    }

    #[tokio::test]
    async fn a_spool_on_another_filesystem_is_copied_into_a_new_shard() {
        use std::os::unix::fs::MetadataExt;
        // The spool on tmpfs, the store on disk: a rename between them fails with EXDEV.
        let spool_dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
        assert_ne!(dev(spool_dir.path()), dev(dir.path()));
        let store = FsStore::open(dir.path().join("objects")).unwrap();
        let d = Digest([8; 32]);
        let mut spool = tempfile::NamedTempFile::new_in(spool_dir.path()).unwrap();
        spool.write_all(b"from tmpfs").unwrap();
        store.put(&d, SpoolBody::File(spool), 10).await.unwrap();
        let chunks: Vec<bytes::Bytes> = store.get(&d).await.unwrap().try_collect().await.unwrap();
        assert_eq!(chunks.concat(), b"from tmpfs");
        let shard = store.path(&d).parent().unwrap().to_owned();
        assert_eq!(std::fs::read_dir(shard).unwrap().count(), 1, "no copy left");
        assert_eq!(std::fs::read_dir(spool_dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_write_cut_short_leaves_no_name_and_a_crash_leftover_is_swept_once_old() {
        let dir = tempfile::tempdir().unwrap();
        let shard = dir.path().join("ab/cd");
        std::fs::create_dir_all(&shard).unwrap();
        let names = || {
            let mut n: Vec<String> = std::fs::read_dir(&shard)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            n.sort();
            n
        };
        // Killed mid-write: the unnamed file goes with its descriptor.
        let mut unnamed = open_unnamed(&shard).unwrap().expect("O_TMPFILE here");
        io::Write::write_all(&mut unnamed, b"half").unwrap();
        drop(unnamed);
        assert!(names().is_empty());

        // What a crash in the fallback leaves, an old and a young one, beside an object and a
        // file that is not ours.
        let digest = "abcd".repeat(16);
        std::fs::write(shard.join(&digest), "object").unwrap();
        std::fs::write(shard.join("notes"), "foreign").unwrap();
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for (name, old) in [(".tmpOLD123", true), (".tmpNEW456", false)] {
            let f = std::fs::File::create(shard.join(name)).unwrap();
            if old {
                f.set_modified(hour_ago).unwrap();
            }
        }
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            - 60;
        let dry = sweep_temporaries(dir.path(), before, true).unwrap();
        assert_eq!((dry.aborted, names().len()), (1, 4));
        let done = sweep_temporaries(dir.path(), before, false).unwrap();
        assert_eq!(
            done,
            StaleUploads {
                aborted: 1,
                failed: vec![]
            }
        );
        assert_eq!(names(), [".tmpNEW456", digest.as_str(), "notes"]);
    }

    #[tokio::test]
    async fn listing_pages_in_digest_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path().join("objects")).unwrap();
        let mut digests: Vec<Digest> = (0..40u8)
            .map(|i| {
                let mut b = [i.wrapping_mul(37); 32];
                b[1] = i % 3;
                Digest(b)
            })
            .collect();
        for d in &digests {
            let body = SpoolBody::Memory(bytes::Bytes::from_static(b"x"));
            store.put(d, body, 1).await.unwrap();
        }
        std::fs::write(dir.path().join("objects/notes.txt"), "not an object").unwrap();
        digests.sort();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store.list(after.as_ref(), 7).await.unwrap();
            let Some(last) = page.last() else { break };
            after = Some(last.digest);
            assert!(page.iter().all(|e| e.size == 1 && e.modified > 0));
            seen.extend(page.iter().map(|e| e.digest));
        }
        assert_eq!(seen, digests);
    }
}
