//! A local disk cache of objects read from a remote store, so judging workers fetching the same
//! test inputs again and again are served from local disk instead of S3.
//!
//! It cannot be stale: an object's key is the SHA-256 of its content, so the bytes for a key
//! never change, and a fill is kept only after it inflates to that digest. It never serves a
//! deleted path: it is consulted only after the metadata database resolved the path to a
//! digest. Entries are files named by digest; recency is the file's mtime (set on a hit at most
//! once a minute), so the least recently used order survives restarts. The total size is
//! bounded; objects larger than an eighth of it are not cached, so one huge file cannot flush
//! everything else.
//!
//! Small uploads (those the spool kept in memory) are kept as they are stored, since they are
//! usually read soon after: a submission by its judge, a test input by each worker.
//!
//! A fill is written under a temporary name and renamed into place, but never flushed: a crash
//! of the machine may leave an entry whose content was lost, so an entry an earlier run left is
//! checked (inflated to its digest) on its first hit before it is served, and dropped if it
//! does not hold its content. Flushing instead cost every upload that is kept: one `syncfs(2)`
//! per group made 4 KiB uploads to S3 ~40% slower, an `fdatasync` per file ~20%, on this
//! machine's disk. The check also catches a copy damaged on disk while the daemon was down.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::Stream;
use tokio::sync::mpsc;

use super::{
    Deleted, DeletedMany, EarlyUpload, Incoming, ObjectEntry, ObjectStore, ObjectStream,
    SMALL_FILE, StaleUploads, StoreError, local_stream, read_cached, read_if_small,
};
use crate::blob::{self, Digest};
use crate::spool::SpoolBody;

/// Bytes read from the remote store that all fills together may hold before they are on the
/// cache's disk; a fill that would go past it is abandoned (the client never waits for the
/// cache's disk). Counted in bytes, not chunks: a queue of 64 chunks of the S3 stream, a few KiB
/// each, gave a fill milliseconds of slack on a busy machine, and one in six 64 MiB objects read
/// one after another was not cached.
const FILL_LAG: u64 = 16 << 20;
/// A hit sets its file's mtime (recency after a restart) at most this often; hits in between
/// are served without a blocking call, so the order after a restart is this coarse.
const RESTAMP_AFTER: Duration = Duration::from_secs(60);
/// Prefix of fills in progress; leftovers are removed at startup.
const FILL_PREFIX: &str = ".fill-";

/// What the cache did, for `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: u64,
    pub bytes: u64,
}

/// One cached object.
struct Entry {
    size: u64,
    /// Recency: larger is more recent.
    tick: u64,
    /// Checked against its digest by this process (filled by it, or checked on a hit).
    checked: bool,
    /// When its file's mtime (its recency after a restart) was last set.
    stamped: Instant,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<Digest, Entry>,
    order: BTreeMap<u64, Digest>,
    bytes: u64,
    tick: u64,
    filling: HashSet<Digest>,
    hits: u64,
    misses: u64,
}

impl Lru {
    fn touch(&mut self, d: &Digest) {
        let Some(e) = self.entries.get_mut(d) else {
            return;
        };
        self.order.remove(&e.tick);
        self.tick += 1;
        e.tick = self.tick;
        self.order.insert(self.tick, *d);
    }

    fn insert(&mut self, d: Digest, size: u64, checked: bool) {
        self.remove(&d);
        self.tick += 1;
        let tick = self.tick;
        self.entries.insert(
            d,
            Entry {
                size,
                tick,
                checked,
                stamped: Instant::now(),
            },
        );
        self.order.insert(self.tick, d);
        self.bytes += size;
    }

    fn remove(&mut self, d: &Digest) {
        if let Some(e) = self.entries.remove(d) {
            self.order.remove(&e.tick);
            self.bytes -= e.size;
        }
    }

    /// Entries to evict so the total fits `max`, oldest first (already removed from the index).
    fn evict(&mut self, max: u64) -> Vec<Digest> {
        let mut out = Vec::new();
        while self.bytes > max {
            let Some((_, d)) = self.order.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&d) {
                self.bytes -= e.size;
            }
            out.push(d);
        }
        out
    }
}

/// The cache directory and its index.
pub struct ReadCache {
    dir: PathBuf,
    max_bytes: u64,
    lru: Mutex<Lru>,
    /// Bytes queued for fills, against [`FILL_LAG`].
    lag: Arc<AtomicU64>,
    /// Fills written and waiting for their check on the checking thread.
    checks: std::sync::mpsc::SyncSender<Check>,
}

/// A fill written to disk, to be checked and put in place.
type Check = Box<dyn FnOnce() + Send>;

/// Fills written that may wait for their check; past it a fill is given up. Each waits on disk.
const CHECK_QUEUE: usize = 16;

/// A chunk on its way to a fill, counted against [`FILL_LAG`] until it is written or dropped.
struct Lagging {
    chunk: Bytes,
    lag: Arc<AtomicU64>,
}

impl Drop for Lagging {
    fn drop(&mut self) {
        self.lag
            .fetch_sub(self.chunk.len() as u64, Ordering::Relaxed);
    }
}

/// The sending side of a fill.
struct Fill {
    tx: mpsc::UnboundedSender<Lagging>,
    lag: Arc<AtomicU64>,
}

impl Fill {
    /// Queues a copy of `chunk`; false when the fills are too far behind or this one ended (then
    /// give it up: the fill's gzip stream would be incomplete).
    fn offer(&self, chunk: &Bytes) -> bool {
        let n = chunk.len() as u64;
        if self.lag.fetch_add(n, Ordering::Relaxed) + n > FILL_LAG {
            self.lag.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        // Counted from here on: the guard uncounts it wherever it ends, even in a failed send.
        let chunk = Lagging {
            chunk: chunk.clone(),
            lag: self.lag.clone(),
        };
        self.tx.send(chunk).is_ok()
    }
}

impl ReadCache {
    /// Opens (creating if needed) the cache directory and indexes what an earlier run left, most
    /// recently used last.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Arc<Self>> {
        std::fs::create_dir_all(dir)?;
        let mut found: Vec<(SystemTime, Digest, u64)> = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(FILL_PREFIX) {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let (Ok(digest), Ok(meta)) = (name.parse::<Digest>(), entry.metadata()) else {
                continue; // not ours
            };
            let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((used, digest, meta.len()));
        }
        found.sort();
        let (checks, queued) = std::sync::mpsc::sync_channel::<Check>(CHECK_QUEUE);
        // A check inflates the whole object: ~250 ms of a core for 64 MiB. It only decides
        // whether a copy is kept, so it runs on a thread of its own at the lowest priority,
        // after the requests being served. (At normal priority it took a core from the next
        // cold GET on a 2-core machine: 270 ms per 36 MiB instead of 160.)
        std::thread::Builder::new()
            .name("cache-check".into())
            .spawn(move || {
                lower_this_threads_priority();
                for check in queued {
                    check();
                }
            })?;
        let cache = ReadCache {
            dir: dir.to_owned(),
            max_bytes,
            lru: Mutex::new(Lru::default()),
            lag: Arc::default(),
            checks,
        };
        {
            let mut lru = cache.index();
            for (_, d, size) in found {
                // Possibly not flushed before a crash: checked on its first hit.
                lru.insert(d, size, false);
            }
            for d in lru.evict(max_bytes) {
                let _ = std::fs::remove_file(cache.path(&d));
            }
        }
        Ok(Arc::new(cache))
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Lru> {
        // The index holds no invariant a panicking holder could break halfway that matters more
        // than serving on: recover it.
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join(d.to_hex())
    }

    /// Counters and current size.
    pub fn stats(&self) -> CacheStats {
        let lru = self.index();
        CacheStats {
            hits: lru.hits,
            misses: lru.misses,
            entries: lru.entries.len() as u64,
            bytes: lru.bytes,
        }
    }

    /// The cached object if it has `size` bytes, marked as just used; `None` on a miss. A copy
    /// of another size is another encoding of the content than the one now stored: dropped.
    /// One an earlier run left is checked first.
    async fn open_entry(
        self: &Arc<Self>, d: &Digest, size: u64,
    ) -> Option<Result<Bytes, std::fs::File>> {
        let (current, checked, restamped) = {
            let mut lru = self.index();
            let e = lru.entries.get(d)?;
            let current = e.size == size;
            let found = (current, e.checked, e.stamped.elapsed() < RESTAMP_AFTER);
            if current {
                lru.touch(d);
            } else {
                lru.remove(d);
            }
            found
        };
        let path = self.path(d);
        // Served on the spot only if nothing is owed on disk: no check, no new mtime.
        if current
            && checked
            && restamped
            && let Some(bytes) = read_cached(&path, size)
        {
            return Some(Ok(bytes));
        }
        let digest = *d;
        let opened = tokio::task::spawn_blocking(move || {
            if !current {
                std::fs::remove_file(&path)?;
                return Ok(None);
            }
            let mut f = std::fs::File::open(&path)?;
            if !checked && !holds(&mut f, &digest)? {
                tracing::warn!(
                    "dropping {}: it does not hold its content (lost in a crash, or damaged)",
                    path.display()
                );
                std::fs::remove_file(&path)?;
                return Err(io::Error::other("damaged"));
            }
            // Recency on disk, for the order after a restart.
            let _ = f.set_modified(SystemTime::now());
            Ok::<_, io::Error>(Some(read_if_small(f)?))
        })
        .await;
        match opened {
            Ok(Ok(read)) => {
                if let Some(e) = self.index().entries.get_mut(d) {
                    e.checked = true;
                    e.stamped = Instant::now();
                }
                read
            }
            _ => {
                // Removed behind our back, unreadable or damaged: forget it and read through.
                self.index().remove(d);
                None
            }
        }
    }

    /// Starts keeping a copy of the object streaming past, unless one is already being made or
    /// it is too large to be worth a place.
    fn start_fill(self: &Arc<Self>, d: Digest) -> Option<Fill> {
        if !self.index().filling.insert(d) {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let cache = self.clone();
        tokio::task::spawn_blocking(move || {
            let written = match cache.fill(rx) {
                Ok(written) => written,
                Err(e) => return cache.give_up(&d, e),
            };
            // A small copy's check costs less than handing it over, and must not wait: a burst
            // of small uploads kept the starved checking thread's queue full, so the reads
            // that followed went to S3.
            if written.1 <= SMALL_FILE {
                return cache.keep_checked(&d, written);
            }
            let checking = cache.clone();
            let check = Box::new(move || checking.keep_checked(&d, written));
            if cache.checks.try_send(check).is_err() {
                cache.give_up(&d, io::Error::other("too many fills wait for their check"));
            }
        });
        Some(Fill {
            tx,
            lag: self.lag.clone(),
        })
    }

    /// Keeps a copy of an object just stored from memory, verified like a fill from a read.
    fn keep(self: &Arc<Self>, d: Digest, stored: Bytes) {
        if let Some(fill) = self.start_fill(d) {
            // The fill ends when `fill` is dropped.
            fill.offer(&stored);
        }
    }

    /// Writes the chunks to a temporary file; returns it and its size.
    fn fill(
        &self, mut chunks: mpsc::UnboundedReceiver<Lagging>,
    ) -> io::Result<(tempfile::NamedTempFile, u64)> {
        let mut tmp = tempfile::Builder::new()
            .prefix(FILL_PREFIX)
            .tempfile_in(&self.dir)?;
        let mut size = 0u64;
        // Ends when the reader is done or gave up; completeness is proven by the check (a
        // truncated gzip stream does not inflate).
        while let Some(queued) = chunks.blocking_recv() {
            size += queued.chunk.len() as u64;
            if size > self.max_bytes / 8 {
                return Err(io::Error::other("larger than an eighth of the cache"));
            }
            tmp.write_all(&queued.chunk)?;
        }
        Ok((tmp, size))
    }

    /// Ends the fill of `d`: its written copy is placed if it inflates to `d`, else dropped.
    fn keep_checked(&self, d: &Digest, written: (tempfile::NamedTempFile, u64)) {
        match self.check(d, written) {
            Ok(size) => self.place(d, size),
            Err(e) => self.give_up(d, e),
        }
    }

    /// Checks that a written fill inflates to `d`, then moves it into place; returns its size.
    fn check(&self, d: &Digest, (tmp, size): (tempfile::NamedTempFile, u64)) -> io::Result<u64> {
        let (digest, _) = blob::inflate(io::BufReader::new(tmp.reopen()?), io::sink())
            .map_err(|e| io::Error::other(e.to_string()))?;
        if digest != *d {
            return Err(io::Error::other(format!("content inflates to {digest}")));
        }
        tmp.persist(self.path(d)).map_err(|e| e.error)?;
        Ok(size)
    }

    /// Ends the fill of `d` with its copy of `size` bytes in place: indexes it, evicting what
    /// no longer fits.
    fn place(&self, d: &Digest, size: u64) {
        let evicted = {
            let mut lru = self.index();
            lru.filling.remove(d);
            lru.insert(*d, size, true);
            lru.evict(self.max_bytes)
        };
        for old in evicted {
            let _ = std::fs::remove_file(self.path(&old));
        }
    }

    /// Ends the fill of `d` without a copy (its temporary file is already removed).
    fn give_up(&self, d: &Digest, e: io::Error) {
        tracing::debug!("not caching {d}: {e}");
        self.index().filling.remove(d);
    }
}

/// Puts the calling thread at the lowest priority (nice 19), for work that may wait.
fn lower_this_threads_priority() {
    // SAFETY: plain system calls on the calling thread; a failure leaves the priority as it is.
    let failed = unsafe {
        let tid = nix::libc::gettid();
        nix::libc::setpriority(nix::libc::PRIO_PROCESS, tid as nix::libc::id_t, 19) != 0
    };
    if failed {
        tracing::debug!(
            "cache checks run at normal priority: {}",
            io::Error::last_os_error()
        );
    }
}

/// Whether the file inflates to `d` (read from the start; left at the start).
fn holds(f: &mut std::fs::File, d: &Digest) -> io::Result<bool> {
    let held = blob::inflate(io::BufReader::new(&mut *f), io::sink())
        .is_ok_and(|(digest, _)| digest == *d);
    f.rewind()?;
    Ok(held)
}

/// An object store read through a [`ReadCache`]; writes and deletes go straight through.
pub struct CachedStore {
    inner: Arc<dyn ObjectStore>,
    cache: Arc<ReadCache>,
}

impl CachedStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>, cache: Arc<ReadCache>) -> Self {
        CachedStore { inner, cache }
    }
}

/// Bytes of a stream a [`Tee`] gathers before handing them to its fill. An S3 GET arrives in
/// chunks of a few KiB (6.6 KiB on average for a 49 MiB object on loopback); a write and a
/// wake-up of the fill's thread for each made a cold 64 MiB GET take 360 ms where one without
/// the cache took 260. In batches, cold GETs through the cache were within 5% of those without.
const FILL_BATCH: usize = 256 * 1024;

/// Passes a store's stream through, copying it to a fill in batches of [`FILL_BATCH`].
struct Tee {
    inner: ObjectStream,
    fill: Option<Fill>,
    batch: BytesMut,
}

impl Tee {
    fn new(inner: ObjectStream, fill: Fill) -> Self {
        Tee {
            inner,
            fill: Some(fill),
            batch: BytesMut::new(),
        }
    }

    /// Offers bytes to the fill, giving the fill up if it is too far behind.
    fn offer(&mut self, bytes: &Bytes) {
        if let Some(fill) = &self.fill
            && !fill.offer(bytes)
        {
            self.fill = None;
        }
    }

    /// Offers what is gathered.
    fn send_batch(&mut self) {
        if !self.batch.is_empty() {
            let batch = self.batch.split().freeze();
            self.offer(&batch);
        }
    }
}

impl Stream for Tee {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = self.inner.as_mut().poll_next(cx);
        match &item {
            Poll::Ready(Some(Ok(chunk))) if self.fill.is_some() => {
                // The cache's disk may be behind: then the fill is given up, and the client is
                // never slowed.
                if self.batch.is_empty() && chunk.len() >= FILL_BATCH {
                    let chunk = chunk.clone();
                    self.offer(&chunk);
                } else {
                    self.batch.extend_from_slice(chunk);
                    if self.batch.len() >= FILL_BATCH {
                        self.send_batch();
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => self.fill = None,
            Poll::Ready(None) => self.send_batch(),
            _ => {}
        }
        item
    }
}

impl Drop for Tee {
    /// The last batch: the HTTP server stops reading at the end of the Content-Length, before
    /// the stream says it ended. A body cut short fails the fill's digest check.
    fn drop(&mut self) {
        self.send_batch();
    }
}

#[async_trait]
impl ObjectStore for CachedStore {
    fn describe(&self) -> String {
        format!(
            "{} (read cache {})",
            self.inner.describe(),
            self.cache.dir.display()
        )
    }

    fn requests_sent(&self) -> Vec<(String, u64)> {
        self.inner.requests_sent()
    }

    fn key(&self, digest: &Digest) -> String {
        self.inner.key(digest)
    }

    fn early_upload(&self, digest: &Digest, incoming: Incoming) -> Option<EarlyUpload> {
        self.inner.early_upload(digest, incoming)
    }

    async fn put(&self, digest: &Digest, body: SpoolBody, size: u64) -> Result<(), StoreError> {
        // A small upload is usually read soon, and by several readers (a submission by its
        // judge, a test input by each worker): keep it now, so even the first read is local.
        let kept = match &body {
            SpoolBody::Memory(bytes) => Some(bytes.clone()),
            SpoolBody::File(_) => None,
        };
        self.inner.put(digest, body, size).await?;
        if let Some(bytes) = kept {
            self.cache.keep(*digest, bytes);
        }
        Ok(())
    }

    async fn get(&self, digest: &Digest) -> Result<ObjectStream, StoreError> {
        // Without a row's size to check against (verification, adoption): the store itself.
        self.inner.get(digest).await
    }

    async fn get_stored(&self, digest: &Digest, size: u64) -> Result<ObjectStream, StoreError> {
        if let Some(read) = self.cache.open_entry(digest, size).await {
            self.cache.index().hits += 1;
            return Ok(local_stream(read));
        }
        let body = self.inner.get_stored(digest, size).await?;
        self.cache.index().misses += 1;
        let Some(fill) = self.cache.start_fill(*digest) else {
            return Ok(body);
        };
        Ok(Box::pin(Tee::new(body, fill)))
    }

    async fn head(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        self.inner.head(digest).await
    }

    async fn delete(
        &self, digest: &Digest, deadline: tokio::time::Instant,
    ) -> Result<Deleted, StoreError> {
        self.inner.delete(digest, deadline).await
    }

    async fn delete_many(
        &self, digests: &[Digest], deadline: tokio::time::Instant,
    ) -> Result<DeletedMany, StoreError> {
        self.inner.delete_many(digests, deadline).await
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.inner.check().await
    }

    async fn list(
        &self, after: Option<&Digest>, limit: usize,
    ) -> Result<Vec<ObjectEntry>, StoreError> {
        self.inner.list(after, limit).await
    }

    async fn abort_stale_uploads(
        &self, before: i64, dry_run: bool,
    ) -> Result<Option<StaleUploads>, StoreError> {
        self.inner.abort_stale_uploads(before, dry_run).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_are_given_up_past_the_lag_bound_and_the_bound_is_returned() {
        let lag = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::unbounded_channel();
        let fill = Fill {
            tx,
            lag: lag.clone(),
        };
        let mib = Bytes::from(vec![0u8; 1 << 20]);
        for _ in 0..FILL_LAG >> 20 {
            assert!(fill.offer(&mib));
        }
        assert!(!fill.offer(&Bytes::from_static(b"x")));
        assert_eq!(lag.load(Ordering::Relaxed), FILL_LAG);
        // Chunks written (or dropped with the fill) no longer count; nor does one sent to a fill
        // that has ended.
        drop(rx);
        assert_eq!(lag.load(Ordering::Relaxed), 0);
        assert!(!fill.offer(&mib));
        assert_eq!(lag.load(Ordering::Relaxed), 0);
    }

    /// `len` bytes of content gzipped at `level`, with their digest.
    fn object(len: u32, level: flate2::Compression) -> (Digest, Bytes) {
        // Barely compressible, so the gzip stream is about as long as the content.
        let content: Vec<u8> = (0..len.div_ceil(4))
            .flat_map(|i| (i.wrapping_mul(2_654_435_761) >> 7).to_le_bytes())
            .take(len as usize)
            .collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), level);
        gz.write_all(&content).unwrap();
        let digest = Digest(<sha2::Sha256 as sha2::Digest>::digest(&content).into());
        (digest, gz.finish().unwrap().into())
    }

    /// Returns once `done` holds, or after 10 s (the caller's assertions then say what failed).
    async fn wait_until(done: impl Fn() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_small_copy_does_not_wait_for_the_checking_thread() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ReadCache::open(dir.path(), 1 << 30).unwrap();
        // The checking thread busy and its queue full, as a burst of uploads left them on a
        // loaded machine, where a thread at nice 19 gets the CPU last.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel();
        let hold = Box::new(move || {
            started_tx.send(()).unwrap();
            let _ = held.recv();
        });
        cache.checks.try_send(hold).unwrap();
        started.recv_timeout(Duration::from_secs(10)).unwrap();
        for _ in 0..CHECK_QUEUE {
            cache.checks.try_send(Box::new(|| {})).unwrap();
        }
        let (large, large_gz) = object(100_000, flate2::Compression::none());
        let (small, small_gz) = object(4096, flate2::Compression::fast());
        assert!(large_gz.len() as u64 > SMALL_FILE && small_gz.len() as u64 <= SMALL_FILE);
        cache.keep(large, large_gz.clone());
        cache.keep(small, small_gz.clone());
        wait_until(|| cache.index().filling.is_empty()).await;
        assert!(cache.index().filling.is_empty(), "fills still running");
        let kept = cache.open_entry(&small, small_gz.len() as u64).await;
        assert!(
            matches!(kept, Some(Ok(ref b)) if *b == small_gz),
            "the small copy was not kept"
        );
        // The large one needed the held thread, so it was not kept.
        let large_kept = cache.open_entry(&large, large_gz.len() as u64).await;
        assert!(large_kept.is_none(), "the large copy skipped the queue");
        assert_eq!(cache.stats().entries, 1);
        drop(release);
    }

    #[tokio::test]
    async fn a_fill_keeps_up_with_a_reader_faster_than_the_disk_and_keeps_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ReadCache::open(dir.path(), 1 << 30).unwrap();
        let (digest, gz) = object(8_000_000, flate2::Compression::fast());
        // As a stream from S3 arrives: thousands of small chunks, passed on without waiting for
        // the fill's writes (64 chunks of slack gave this up), and read only as far as its
        // length, as the HTTP server does: the last batch goes to the fill when the tee drops.
        let chunks: Vec<io::Result<Bytes>> = gz
            .chunks(4096)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let count = chunks.len();
        let mut tee = Tee::new(
            Box::pin(futures::stream::iter(chunks)),
            cache.start_fill(digest).unwrap(),
        );
        let mut passed = Vec::new();
        for _ in 0..count {
            let chunk = futures::StreamExt::next(&mut tee).await.unwrap().unwrap();
            passed.extend_from_slice(&chunk);
        }
        assert!(passed == gz, "the client's stream changed");
        assert!(tee.fill.is_some(), "fill given up");
        drop(tee);
        wait_until(|| cache.stats().entries == 1).await;
        let Some(served) = cache.open_entry(&digest, gz.len() as u64).await else {
            panic!("not cached");
        };
        let mut kept = Vec::new();
        match served {
            Ok(bytes) => kept.extend_from_slice(&bytes),
            Err(mut f) => {
                io::Read::read_to_end(&mut f, &mut kept).unwrap();
            }
        }
        assert!(kept == gz, "the cached copy differs from what was read");
        assert_eq!(cache.lag.load(Ordering::Relaxed), 0);
    }
}
