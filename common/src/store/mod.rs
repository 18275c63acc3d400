//! The object store: where blob contents live, keyed by digest. The metadata database, not the
//! store, decides whether a blob exists (docs/design.md, invariant 2); the store only holds bytes.

mod cache;
mod fs;
mod ranged;
mod s3;

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use tokio::time::Instant;

use crate::blob::Digest;
use crate::spool::{SpoolBody, SpoolFeed};

pub use cache::{CacheStats, CachedStore, ReadCache};
pub use fs::FsStore;
pub use s3::S3Store;

/// The bytes of a stored object, streamed.
pub type ObjectStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// Bytes already in memory as a stream of one chunk.
pub(crate) fn stream_of(bytes: Bytes) -> ObjectStream {
    Box::pin(futures::stream::once(futures::future::ready(Ok(bytes))))
}

/// Local files up to this size are read whole in one blocking step instead of streamed in
/// chunks, each of which is a trip through the blocking pool.
const SMALL_FILE: u64 = 64 * 1024;
/// Chunk size for streaming a local file: each chunk is a trip through the blocking pool, and
/// 64 KiB chunks held a 64 MiB GET to about 1,200 MiB/s, 512 KiB ones reach 1,500-2,150.
/// Sixteen concurrent 1 GiB GETs still peak at about 90 MiB.
const READ_CHUNK: usize = 512 * 1024;

/// A local file opened for reading: read whole if small, else left to be streamed. Blocking.
fn read_if_small(mut f: std::fs::File) -> io::Result<Result<Bytes, std::fs::File>> {
    let len = f.metadata()?.len();
    if len > SMALL_FILE {
        return Ok(Err(f));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    io::Read::read_to_end(&mut f, &mut bytes)?;
    Ok(Ok(bytes.into()))
}

/// Set once the kernel or filesystem turned down a non-blocking read: stop asking.
static NOWAIT_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// A local file of `size` bytes, at most [`SMALL_FILE`], read whole without waiting for the
/// disk, or `None` if that cannot be done: its path does not resolve from the kernel's caches
/// alone, some of its bytes are not in the page cache, it is not `size` bytes long, or the
/// kernel (before Linux 5.12) or filesystem cannot tell. The caller then reads it on a blocking
/// thread, which also reports what went wrong, if anything. A hot object is thus served on the
/// async runtime itself: the trip through the blocking pool cost more than the read (a 4 KiB
/// GET took 15% less CPU without it, a read-cache hit 21%).
fn read_cached(path: &Path, size: u64) -> Option<Bytes> {
    use rustix::fs::{CWD, Mode, OFlags, ResolveFlags};
    use rustix::io::{Errno, ReadWriteFlags};
    if size > SMALL_FILE || NOWAIT_UNSUPPORTED.load(Ordering::Relaxed) {
        return None;
    }
    let unsupported = |e: Errno| {
        if [Errno::NOSYS, Errno::INVAL, Errno::OPNOTSUPP].contains(&e) {
            NOWAIT_UNSUPPORTED.store(true, Ordering::Relaxed);
        }
    };
    // No access time: setting it dirties the inode, which on a journalling filesystem can
    // wait for the journal. Files we do not own (O_NOATIME is refused) take the slow way.
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOATIME;
    let fd = rustix::fs::openat2(CWD, path, flags, Mode::empty(), ResolveFlags::CACHED)
        .map_err(unsupported)
        .ok()?;
    if u64::try_from(rustix::fs::fstat(&fd).ok()?.st_size) != Ok(size) {
        return None;
    }
    let len = size as usize;
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let mut slice = [io::IoSliceMut::new(&mut buf[done..])];
        match rustix::io::preadv2(&fd, &mut slice, done as u64, ReadWriteFlags::NOWAIT) {
            Ok(0) => return None,
            Ok(n) => done += n,
            Err(e) => {
                unsupported(e);
                return None;
            }
        }
    }
    Some(buf.into())
}

/// The stream of what [`read_if_small`] gave.
fn local_stream(read: Result<Bytes, std::fs::File>) -> ObjectStream {
    match read {
        Ok(bytes) => stream_of(bytes),
        Err(f) => Box::pin(tokio_util::io::ReaderStream::with_capacity(
            tokio::fs::File::from_std(f),
            READ_CHUNK,
        )),
    }
}

/// Why the object store could not do something.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {key} does not exist in the object store")]
    NotFound { key: String },
    #[error("object store unavailable while {op} {key}: {message}")]
    Unavailable {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("object store is out of space while {op} {key}")]
    Full { op: &'static str, key: String },
    #[error(
        "object {key} is {actual} bytes where its metadata says {expected}: stored again since \
         the metadata was read, or damaged"
    )]
    Changed {
        key: String,
        expected: u64,
        actual: u64,
    },
    #[error("object store failed while {op} {key}: {source}")]
    Io {
        op: &'static str,
        key: String,
        source: io::Error,
    },
}

impl StoreError {
    pub(crate) fn io(op: &'static str, key: &str, source: io::Error) -> Self {
        if crate::spool::is_out_of_space(&source) {
            StoreError::Full {
                op,
                key: key.to_owned(),
            }
        } else {
            StoreError::Io {
                op,
                key: key.to_owned(),
                source,
            }
        }
    }
}

/// An object found by listing the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectEntry {
    pub digest: Digest,
    pub size: u64,
    /// Last modification, Unix seconds (for the orphan grace period).
    pub modified: i64,
}

/// What a delete sent before a deadline left behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Deleted {
    /// The object is gone, and no request of this delete can still reach the store.
    #[default]
    Settled,
    /// The object is gone, but an earlier attempt went unanswered: it may still be carried out
    /// later (within the deletion's settle time).
    Unsettled,
}

impl Deleted {
    /// Both together.
    pub fn and(self, other: Deleted) -> Deleted {
        if self == Deleted::Settled && other == Deleted::Settled {
            Deleted::Settled
        } else {
            Deleted::Unsettled
        }
    }
}

/// What [`ObjectStore::delete_many`] did: how it settled, and the objects it could not delete.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeletedMany {
    pub settled: Deleted,
    pub failed: Vec<(Digest, String)>,
}

/// The error for an object found to be `actual` bytes where `expected` were wanted.
pub(crate) fn check_size(key: &str, expected: u64, actual: u64) -> Result<(), StoreError> {
    if expected == actual {
        return Ok(());
    }
    Err(StoreError::Changed {
        key: key.to_owned(),
        expected,
        actual,
    })
}

/// The error of a delete that outlived its deadline.
pub(crate) fn deadline_passed(key: &str) -> StoreError {
    StoreError::Unavailable {
        op: "deleting",
        key: key.to_owned(),
        message: "no answer before the deletion's deadline; the request was dropped".into(),
    }
}

/// What [`ObjectStore::abort_stale_uploads`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StaleUploads {
    /// Uploads aborted (in a dry run: that would be).
    pub aborted: u64,
    /// Keys whose upload could not be aborted, with why; the next run tries again.
    pub failed: Vec<(String, String)>,
}

/// What is known of an upload's size before it arrives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Incoming {
    /// The stored size, when the body is stored as sent (gzip with a `Content-Length`).
    pub stored: Option<u64>,
    /// The body's declared length, a bound on what is stored.
    pub at_most: Option<u64>,
}

/// An upload a store sends on while it still arrives: `feed` sees the spool as it is written,
/// and `upload` makes the whole object the digest's. No object exists until then; dropped
/// unfinished, what was sent is discarded.
pub struct EarlyUpload {
    pub feed: Box<dyn SpoolFeed>,
    pub upload: Box<dyn PendingUpload>,
}

/// The unfinished half of an [`EarlyUpload`].
#[async_trait]
pub trait PendingUpload: Send + Sync {
    /// Sends the rest of the spooled object (all of it, if sending on failed) and makes it the
    /// digest's object. Called under the blob's lock, once the content matched its digest.
    async fn finish(self: Box<Self>, body: SpoolBody, size: u64) -> Result<(), StoreError>;
}

/// A place that keeps blob objects. Implementations: a local directory and S3.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Human-readable description for logs (`s3://bucket/prefix`, `file:///var/lib/...`).
    fn describe(&self) -> String;

    /// Requests sent to a remote store so far, by operation (what it bills); none for a
    /// directory.
    fn requests_sent(&self) -> Vec<(String, u64)> {
        Vec::new()
    }

    /// The key (or relative path) of a digest's object.
    fn key(&self, digest: &Digest) -> String;

    /// Stores the spooled gzip bytes as the digest's object, durably, replacing any object there.
    /// Consumes the body (a spool file is renamed into place or deleted).
    async fn put(&self, digest: &Digest, body: SpoolBody, size: u64) -> Result<(), StoreError>;

    /// Starts sending an upload of `digest` while it arrives, when the store gains from that
    /// (S3: receiving, verifying and sending overlap); `None` when it does not (a local
    /// directory). Only for content whose digest the client claimed and which is not stored
    /// yet: without a claim the key is known only at the end, and known content needs no object.
    fn early_upload(&self, digest: &Digest, incoming: Incoming) -> Option<EarlyUpload> {
        let _ = (digest, incoming);
        None
    }

    /// Streams a digest's object; `NotFound` when there is none.
    async fn get(&self, digest: &Digest) -> Result<ObjectStream, StoreError>;

    /// Streams the object a metadata row describes, `size` being the row's stored size. One
    /// content can be stored as different gzip bytes over time (the server's own gzip of a raw
    /// upload, or a client's; the cleaner may delete one and a PUT store the other), so an
    /// object of another size is [`StoreError::Changed`], never streamed under the row's length.
    async fn get_stored(&self, digest: &Digest, size: u64) -> Result<ObjectStream, StoreError>;

    /// The object's stored size, or `None` when there is none.
    async fn head(&self, digest: &Digest) -> Result<Option<u64>, StoreError>;

    /// Deletes a digest's object; deleting a missing object succeeds. Every request it sends
    /// is sent before `deadline`; past it the delete gives up with an error (dropping what is in
    /// flight), so no request of it can be carried out long after (the cleaner's tombstone
    /// records how long after: docs/design.md).
    async fn delete(&self, digest: &Digest, deadline: Instant) -> Result<Deleted, StoreError>;

    /// Deletes several objects in as few requests as the store allows (at most 1000 a call),
    /// under the same deadline as [`ObjectStore::delete`].
    async fn delete_many(
        &self, digests: &[Digest], deadline: Instant,
    ) -> Result<DeletedMany, StoreError> {
        let mut done = DeletedMany::default();
        for d in digests {
            match self.delete(d, deadline).await {
                Ok(settled) => done.settled = done.settled.and(settled),
                Err(e) => {
                    done.settled = Deleted::Unsettled;
                    done.failed.push((*d, e.to_string()));
                }
            }
        }
        Ok(done)
    }

    /// Checks that the store answers (for readiness and `/health`).
    async fn check(&self) -> Result<(), StoreError>;

    /// Objects in digest order, strictly after `after`, at most `limit`. Only keys of our own
    /// layout are listed; anything else under the prefix is never touched.
    async fn list(
        &self, after: Option<&Digest>, limit: usize,
    ) -> Result<Vec<ObjectEntry>, StoreError>;

    /// Aborts the unfinished multipart uploads of our objects started before `before` (Unix
    /// seconds): the parts a crash or a lost connection left, never listed as objects but kept
    /// (and billed) by the server. `None` when the server cannot list them; then only a bucket
    /// lifecycle rule removes them. A store without such uploads has none to abort.
    async fn abort_stale_uploads(
        &self, before: i64, dry_run: bool,
    ) -> Result<Option<StaleUploads>, StoreError> {
        let _ = (before, dry_run);
        Ok(Some(StaleUploads::default()))
    }
}

/// The digest a key of our layout names (`[<prefix>/]<aa>/<bb>/<sha256>`), if it is one.
pub fn digest_of_key(prefix: &str, key: &str) -> Option<Digest> {
    let prefix = prefix.trim_matches('/');
    let rest = if prefix.is_empty() {
        key
    } else {
        key.strip_prefix(prefix)?.strip_prefix('/')?
    };
    let mut parts = rest.split('/');
    let (aa, bb, hex) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || hex.len() != 64 || !hex.starts_with(aa) || hex[2..4] != *bb {
        return None;
    }
    if aa.len() != 2 || hex.bytes().any(|b| !matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    hex.parse().ok()
}

/// `<prefix>/<aa>/<bb>/<sha256>`: the upstream s3dedup layout, so its buckets can be adopted.
pub fn object_key(prefix: &str, digest: &Digest) -> String {
    let hex = digest.to_hex();
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        format!("{}/{}/{}", &hex[0..2], &hex[2..4], hex)
    } else {
        format!("{}/{}/{}/{}", prefix, &hex[0..2], &hex[2..4], hex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_shard_by_two_levels() {
        let mut bytes = [0u8; 32];
        bytes[0] = 0x12;
        bytes[1] = 0xab;
        let d = Digest(bytes);
        let hex = d.to_hex();
        assert_eq!(object_key("", &d), format!("12/ab/{hex}"));
        assert_eq!(object_key("/blobs/", &d), format!("blobs/12/ab/{hex}"));
        assert_eq!(digest_of_key("", &object_key("", &d)), Some(d));
        assert_eq!(digest_of_key("blobs", &object_key("blobs", &d)), Some(d));
        assert_eq!(
            digest_of_key("", &format!("12/ac/{hex}")),
            None,
            "shard must match"
        );
        assert_eq!(
            digest_of_key("", &format!("12/ab/{}", hex.to_uppercase())),
            None
        );
        assert_eq!(digest_of_key("", "12/ab/notes.txt"), None);
        assert_eq!(digest_of_key("other", &object_key("blobs", &d)), None);
    }

    #[test]
    fn only_files_in_the_page_cache_are_read_without_blocking() {
        // Under target/, not the temporary directory: a tmpfs cannot drop a file's pages.
        let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap();
        let path = dir.path().join("object");
        let body: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &body).unwrap();
        // Its access time stays as it was: setting it could wait for a filesystem journal.
        let long_ago = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1);
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_times(std::fs::FileTimes::new().set_accessed(long_ago))
            .unwrap();
        assert_eq!(read_cached(&path, 5000).as_deref(), Some(&body[..]));
        assert_eq!(f.metadata().unwrap().accessed().unwrap(), long_ago);
        assert!(
            read_cached(&path, 4999).is_none(),
            "not the size the row says"
        );
        assert!(read_cached(&dir.path().join("missing"), 5000).is_none());
        let big = dir.path().join("big");
        std::fs::write(&big, vec![7; SMALL_FILE as usize + 1]).unwrap();
        assert!(
            read_cached(&big, SMALL_FILE + 1).is_none(),
            "streamed instead"
        );

        // Dropped from the page cache: reading it would wait for the disk.
        let f = std::fs::File::open(&path).unwrap();
        f.sync_all().unwrap();
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        assert!(read_cached(&path, 5000).is_none(), "read from the disk");
        // A blocking read brings it back into memory, where it is read on the spot again.
        assert_eq!(std::fs::read(&path).unwrap(), body);
        assert_eq!(read_cached(&path, 5000).as_deref(), Some(&body[..]));
    }
}
