//! The blob codec: content identity (SHA-256 of the uncompressed bytes) and the stored form (gzip).
//!
//! Ingesting reads a request body once, in bounded chunks, and produces the gzip bytes to store
//! plus the digest and sizes, verifying the client's hints against what actually arrived.
//! Everything here is blocking I/O: callers run it off the async runtime.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::gunzip::GzDecoder;
use bytes::Bytes;
use flate2::{Compress, Compression, FlushCompress, Status};
use sha2::{Digest as _, Sha256};

const BUF_SIZE: usize = 64 * 1024;
/// Idle deflate states kept for the next upload (each holds about 300 KiB).
const POOLED_DEFLATERS: usize = 8;

/// The SHA-256 of a blob's uncompressed content; its identity and its object key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Lowercase hex, the form used in keys, headers and the database.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl FromStr for Digest {
    type Err = BlobError;
    fn from_str(s: &str) -> Result<Self, BlobError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| BlobError::BadDigest(s.to_owned()))?;
        Ok(Digest(out))
    }
}

/// What the client says about its upload; each hint is checked against the received bytes.
#[derive(Debug, Default, Clone, Copy)]
pub struct Hints {
    pub sha256: Option<Digest>,
    pub logical_size: Option<u64>,
}

/// How the request body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
}

/// Limits and settings for ingesting one body.
#[derive(Debug, Clone, Copy)]
pub struct IngestOptions {
    /// gzip level (0-9) used when the client sent identity bytes.
    pub level: u32,
    /// Refuse content whose uncompressed size exceeds this (also guards against gzip bombs).
    pub max_logical_size: u64,
    /// Refuse gzip bodies inflating past this ratio (after [`RATIO_FREE_BYTES`]); 0: off.
    pub max_gzip_ratio: u64,
}

/// Content a gzip body may inflate to before `max_gzip_ratio` applies: small files of one
/// repeated byte are legitimate and compress far beyond any sane ratio.
pub const RATIO_FREE_BYTES: u64 = 1 << 20;

/// The identity and sizes of an ingested blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobInfo {
    pub digest: Digest,
    pub logical_size: u64,
    pub stored_size: u64,
}

/// Why a body could not become a blob.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("invalid SHA-256 digest {0:?}")]
    BadDigest(String),
    #[error("SHA256-Checksum mismatch: client said {claimed}, content hashes to {actual}")]
    ChecksumMismatch { claimed: Digest, actual: Digest },
    #[error("Logical-Size mismatch: client said {claimed}, content is {actual} bytes")]
    SizeMismatch { claimed: u64, actual: u64 },
    #[error("body is not valid gzip: {0}")]
    BadGzip(io::Error),
    #[error("content exceeds the maximum size of {0} bytes")]
    TooLarge(u64),
    #[error("Logical-Size mismatch: client said {0}, content is larger")]
    LargerThanClaimed(u64),
    #[error("gzip body inflates more than {0}:1 (api.max_gzip_ratio); refusing a likely gzip bomb")]
    GzipBomb(u64),
    #[error("upload was interrupted: {0}")]
    Interrupted(String),
    #[error("cannot write spool file: {0}")]
    Spool(io::Error),
    #[error("the thread hashing the content stopped")]
    HashThread,
}

impl BlobError {
    /// True when the client sent something wrong (a 4xx), false for a server-side failure.
    pub fn is_client_error(&self) -> bool {
        !matches!(self, BlobError::Spool(_) | BlobError::HashThread)
    }
}

/// A message from the task receiving a body to the blocking task ingesting it.
#[derive(Debug)]
pub enum Chunk {
    Data(Bytes),
    /// The body ended cleanly; without it a closed channel means the upload was cut off.
    End,
    /// The body failed (client disconnect, timeout); the text says why.
    Failed(String),
}

/// A blocking [`Read`] over chunks sent from the async side through a bounded channel.
pub struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Chunk>,
    current: Bytes,
    done: bool,
}

impl ChannelReader {
    pub fn new(rx: tokio::sync::mpsc::Receiver<Chunk>) -> Self {
        ChannelReader {
            rx,
            current: Bytes::new(),
            done: false,
        }
    }
}

/// Sends a byte stream to a [`ChannelReader`]: each chunk, then `End`, or `Failed` with the
/// stream's error. Returns early when the reader has gone away (it stopped with an error).
pub async fn feed<S, E>(mut stream: S, tx: &tokio::sync::mpsc::Sender<Chunk>)
where
    S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
    E: fmt::Display,
{
    use futures::StreamExt;
    loop {
        let msg = match stream.next().await {
            Some(Ok(b)) => Chunk::Data(b),
            Some(Err(e)) => Chunk::Failed(e.to_string()),
            None => Chunk::End,
        };
        let last = !matches!(msg, Chunk::Data(_));
        if tx.send(msg).await.is_err() || last {
            return;
        }
    }
}

/// The io::Error kind that carries an interruption of the body through readers.
const INTERRUPTED_KIND: io::ErrorKind = io::ErrorKind::ConnectionAborted;

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Chunk::Data(b)) => self.current = b,
                Some(Chunk::End) => self.done = true,
                Some(Chunk::Failed(why)) => return Err(io::Error::new(INTERRUPTED_KIND, why)),
                None => {
                    return Err(io::Error::new(
                        INTERRUPTED_KIND,
                        "request body ended before it was complete",
                    ));
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Copies everything read into a writer (the spool file) and counts it.
struct TeeReader<R, W> {
    inner: R,
    copy: W,
    count: u64,
    write_error: Option<io::Error>,
}

impl<R: Read, W: Write> Read for TeeReader<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Err(e) = self.copy.write_all(&buf[..n]) {
            // Remember the real cause: the decoder above would only see a generic error.
            let kind = e.kind();
            self.write_error = Some(e);
            return Err(io::Error::new(kind, "spool write failed"));
        }
        self.count += n as u64;
        Ok(n)
    }
}

/// Content past which SHA-256 runs on a thread of its own, beside the inflating or compressing
/// one. It costs 42 ms per 64 MiB on this project's test machine, almost as much as inflating a
/// gzip -9 upload of the same text (53 ms); below a MiB, starting a thread costs more than it saves.
const HASH_THREAD_AFTER: u64 = 1 << 20;

/// Buffers a hashing thread cycles through besides the one being filled: enough for the two
/// sides to trade without waiting on each other, few enough to keep an upload's memory small.
const HASH_THREAD_BUFFERS: usize = 3;

/// Hashing threads running in this process. Uploads arrive by the hundred, each thread holds
/// its buffers, and more threads than cores hash no faster: past [`hash_thread_limit`], an
/// upload hashes where it inflates until a thread is free.
static HASH_THREADS: AtomicUsize = AtomicUsize::new(0);

/// How many hashing threads may run at once: one per core.
fn hash_thread_limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// One of the [`hash_thread_limit`] places for a hashing thread, given back when dropped.
struct HashSlot;

impl HashSlot {
    fn take() -> Option<HashSlot> {
        HASH_THREADS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < hash_thread_limit()).then_some(n + 1)
            })
            .ok()
            .map(|_| HashSlot)
    }
}

impl Drop for HashSlot {
    fn drop(&mut self) {
        HASH_THREADS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Hashes and counts uncompressed bytes, enforcing the size limit and stopping as soon as the
/// content outgrows a claimed Logical-Size (no point inflating the rest of a lie).
struct ContentSink {
    hasher: Hasher,
    /// Content past which hashing moves to a thread; moved on by a MiB when none could start.
    thread_after: u64,
    size: u64,
    max: u64,
    claimed: Option<u64>,
}

/// Where SHA-256 runs: here, or (for large content) on a thread fed the filled buffers.
enum Hasher {
    Here(Sha256),
    Thread(HashThread),
}

struct HashThread {
    /// Filled buffers, and how much of each is content, in order.
    full: std::sync::mpsc::SyncSender<(Vec<u8>, usize)>,
    /// Buffers hashed and given back, to be filled again.
    empty: std::sync::mpsc::Receiver<Vec<u8>>,
    done: std::thread::JoinHandle<Sha256>,
}

impl HashThread {
    /// Hands the state hashed so far to a new thread; `None` if no thread can be started now
    /// (all places taken, or the system refused one), in which case hashing goes on where it was.
    fn start(state: Sha256, buf_len: usize) -> Option<HashThread> {
        let slot = HashSlot::take()?;
        let (full, to_hash) =
            std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(HASH_THREAD_BUFFERS);
        let (give_back, empty) = std::sync::mpsc::sync_channel(HASH_THREAD_BUFFERS + 1);
        for _ in 0..HASH_THREAD_BUFFERS {
            give_back.send(vec![0u8; buf_len]).ok()?;
        }
        let done = std::thread::Builder::new()
            .name("sha256".into())
            .spawn(move || {
                // Held until the thread ends, also when the upload was dropped unfinished.
                let _slot = slot;
                let mut state = state;
                // Ends when the sink is finished or dropped (the upload failed).
                for (buf, n) in to_hash {
                    state.update(&buf[..n]);
                    let _ = give_back.send(buf);
                }
                state
            })
            .ok()?;
        Some(HashThread { full, empty, done })
    }

    /// Sends `buf[..n]` to be hashed, leaving an empty buffer in its place.
    fn send(&mut self, buf: &mut Vec<u8>, n: usize) -> Result<(), BlobError> {
        let mut spare = self.empty.recv().map_err(|_| BlobError::HashThread)?;
        std::mem::swap(buf, &mut spare);
        self.full
            .send((spare, n))
            .map_err(|_| BlobError::HashThread)
    }

    fn finish(self) -> Result<Sha256, BlobError> {
        let HashThread { full, done, .. } = self;
        drop(full);
        done.join().map_err(|_| BlobError::HashThread)
    }
}

impl ContentSink {
    fn new(max: u64, claimed: Option<u64>) -> Self {
        ContentSink {
            hasher: Hasher::Here(Sha256::new()),
            thread_after: HASH_THREAD_AFTER,
            size: 0,
            max,
            claimed,
        }
    }

    /// Counts `n` more bytes of content, refusing content past a limit.
    fn count(&mut self, n: usize) -> Result<(), BlobError> {
        self.size += n as u64;
        if self.size > self.max {
            return Err(BlobError::TooLarge(self.max));
        }
        if let Some(claimed) = self.claimed
            && self.size > claimed
        {
            return Err(BlobError::LargerThanClaimed(claimed));
        }
        Ok(())
    }

    /// Hashes `buf[..n]`, the content counted last. Once hashing has moved to its own thread,
    /// `buf` is swapped for an empty buffer of the same length: callers must be done with it.
    fn hash(&mut self, buf: &mut Vec<u8>, n: usize) -> Result<(), BlobError> {
        if let Hasher::Here(state) = &self.hasher
            && self.size > self.thread_after
        {
            match HashThread::start(state.clone(), buf.len()) {
                Some(thread) => self.hasher = Hasher::Thread(thread),
                None => self.thread_after = self.size + HASH_THREAD_AFTER,
            }
        }
        match &mut self.hasher {
            Hasher::Here(state) => {
                state.update(&buf[..n]);
                Ok(())
            }
            Hasher::Thread(thread) => thread.send(buf, n),
        }
    }

    fn finish(self, hints: &Hints) -> Result<(Digest, u64), BlobError> {
        let state = match self.hasher {
            Hasher::Here(state) => state,
            Hasher::Thread(thread) => thread.finish()?,
        };
        let digest = Digest(state.finalize().into());
        if let Some(claimed) = hints.logical_size
            && claimed != self.size
        {
            return Err(BlobError::SizeMismatch {
                claimed,
                actual: self.size,
            });
        }
        if let Some(claimed) = hints.sha256
            && claimed != digest
        {
            return Err(BlobError::ChecksumMismatch {
                claimed,
                actual: digest,
            });
        }
        Ok((digest, self.size))
    }
}

fn read_error(e: io::Error) -> BlobError {
    if e.kind() == INTERRUPTED_KIND {
        BlobError::Interrupted(e.to_string())
    } else {
        BlobError::BadGzip(e)
    }
}

/// Reads a whole body, writes its gzip form to `out` and returns its identity and sizes.
///
/// A gzip body is stored as received (it is verified by inflating it); an identity body is
/// compressed at `opts.level`. Hints are checked after the last byte.
pub fn ingest<R: Read, W: Write>(
    body: R, encoding: Encoding, out: W, hints: &Hints, opts: &IngestOptions,
) -> Result<BlobInfo, BlobError> {
    ingest_counted(body, encoding, out, hints, opts).map(|(info, _)| info)
}

/// [`ingest`], also saying how many gzip members a gzip body had (1 for identity). A body of
/// several is stored as sent, which clients reading only the first member (curl
/// `--compressed`, zlib's `inflate`) would cut short: the caller stores it again as one.
pub fn ingest_counted<R: Read, W: Write>(
    body: R, encoding: Encoding, out: W, hints: &Hints, opts: &IngestOptions,
) -> Result<(BlobInfo, u64), BlobError> {
    let mut members = 1;
    let mut sink = ContentSink::new(opts.max_logical_size, hints.logical_size);
    let mut buf = vec![0u8; BUF_SIZE];
    let stored_size = match encoding {
        Encoding::Gzip => {
            let mut tee = TeeReader {
                inner: body,
                copy: out,
                count: 0,
                write_error: None,
            };
            let mut decoder = GzDecoder::new(&mut tee);
            loop {
                match decoder.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        sink.count(n)?;
                        sink.hash(&mut buf, n)?;
                        let ratio = opts.max_gzip_ratio;
                        if ratio > 0
                            && sink.size > RATIO_FREE_BYTES
                            && sink.size / ratio > decoder.get_ref().count
                        {
                            return Err(BlobError::GzipBomb(ratio));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        drop(decoder);
                        if let Some(we) = tee.write_error.take() {
                            return Err(BlobError::Spool(we));
                        }
                        return Err(read_error(e));
                    }
                }
            }
            members = decoder.members();
            drop(decoder);
            tee.copy.flush().map_err(BlobError::Spool)?;
            tee.count
        }
        Encoding::Identity => {
            let counting = CountingWriter {
                inner: out,
                count: 0,
            };
            let mut encoder = GzWriter::new(counting, opts.level.min(9));
            let mut body = body;
            // The first chunk is a whole sample (or the whole body): the encoder judges it.
            let mut want = SAMPLE;
            loop {
                let n = read_at_least(&mut body, &mut buf, want)?;
                if n == 0 {
                    break;
                }
                want = 1;
                sink.count(n)?;
                encoder.write_all(&buf[..n]).map_err(BlobError::Spool)?;
                sink.hash(&mut buf, n)?;
            }
            let counting = encoder.finish().map_err(BlobError::Spool)?;
            counting.count
        }
    };
    let (digest, logical_size) = sink.finish(hints)?;
    let info = BlobInfo {
        digest,
        logical_size,
        stored_size,
    };
    Ok((info, members))
}

/// Deflate states of finished compressions, by level. A new state is about 300 KiB in several
/// allocations; making one per small upload let glibc's adaptive mmap threshold move them onto
/// the heap, whose arenas fragmented: 16 concurrent 4 KiB uploads grew the API to 130 MiB.
static DEFLATERS: std::sync::Mutex<Vec<(u32, Compress)>> = std::sync::Mutex::new(Vec::new());

/// Reads into `buf` until it holds `min` bytes or the body ends; returns how many it holds.
fn read_at_least(body: &mut impl Read, buf: &mut [u8], min: usize) -> Result<usize, BlobError> {
    let mut filled = 0;
    while filled < min.min(buf.len()) {
        match body.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(BlobError::Interrupted(e.to_string())),
        }
    }
    Ok(filled)
}

/// Bytes of a body's start that decide whether it is compressed (see [`incompressible`]).
const SAMPLE: usize = 4096;

/// Whether deflate at level 1 would make `sample` larger. zlib-rs's level 1 codes with fixed
/// Huffman codes only (8 or 9 bits a byte), so it gains only where a sequence repeats. On the
/// first 4 KiB of xz, gzip and zip files and on random bytes, where fewer than 1 position in 64
/// starts a repeat of a 4-byte sequence, its output was 4-6% larger than the input and took 6×
/// as long as storing it (27 µs against 4 µs for 4 KiB).
fn incompressible(sample: &[u8]) -> bool {
    if sample.len() < SAMPLE / 4 {
        return false;
    }
    let enough = sample.len() / 64;
    let mut repeats = 0;
    // Last position (+1) of each 4-byte sequence, by hash, as deflate finds its matches;
    // collisions only hide repeats.
    let mut last = [0u32; 4096];
    for (i, q) in sample.windows(4).enumerate() {
        let word = u32::from_le_bytes([q[0], q[1], q[2], q[3]]);
        let slot = (word.wrapping_mul(0x9E37_79B1) >> 20) as usize;
        let seen = last[slot] as usize;
        if seen > 0 && sample[seen - 1..seen + 3] == *q {
            repeats += 1;
            if repeats >= enough {
                return false;
            }
        }
        last[slot] = i as u32 + 1;
    }
    true
}

/// Gzip (at `level`) of what is written, to `out`, with a pooled deflate state. At level 1, a
/// body whose start is [`incompressible`] is stored (level 0) instead: zlib-rs can change level
/// only before the first byte, and an upload that starts compressed (an archive, an image) is
/// compressed to its end. (Levels 2-9 store such blocks by themselves.)
struct GzWriter<W: Write> {
    level: u32,
    /// The level the deflate state is at now.
    current: u32,
    z: Compress,
    out: W,
    buf: Vec<u8>,
}

impl<W: Write> GzWriter<W> {
    fn new(out: W, level: u32) -> Self {
        let pooled = {
            let mut pool = DEFLATERS.lock().unwrap_or_else(|p| p.into_inner());
            let i = pool.iter().position(|(l, _)| *l == level);
            i.map(|i| pool.swap_remove(i).1)
        };
        GzWriter {
            level,
            current: level,
            z: pooled.unwrap_or_else(|| Compress::new_gzip(Compression::new(level), 15)),
            out,
            buf: Vec::with_capacity(BUF_SIZE / 2),
        }
    }

    /// Runs the deflate state over `input` with `flush`, passing its output on; returns the
    /// input it consumed and the state's status.
    fn step(&mut self, input: &[u8], flush: FlushCompress) -> io::Result<(usize, Status)> {
        let before = self.z.total_in();
        self.buf.clear();
        let status = self
            .z
            .compress_vec(input, &mut self.buf, flush)
            .map_err(io::Error::other)?;
        self.out.write_all(&self.buf)?;
        Ok(((self.z.total_in() - before) as usize, status))
    }

    fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        if self.z.total_in() == 0
            && self.level == 1
            && incompressible(&data[..data.len().min(SAMPLE)])
        {
            self.set_level(0)?;
        }
        while !data.is_empty() {
            let (used, _) = self.step(data, FlushCompress::None)?;
            data = &data[used..];
        }
        Ok(())
    }

    /// Switches the deflate state, which must not have seen any input yet, to `level`.
    fn set_level(&mut self, level: u32) -> io::Result<()> {
        self.z
            .set_level(Compression::new(level))
            .map_err(io::Error::other)?;
        self.current = level;
        Ok(())
    }

    /// Ends the gzip stream, flushes `out` and gives the deflate state back to the pool.
    fn finish(mut self) -> io::Result<W> {
        while self.step(&[], FlushCompress::Finish)?.1 != Status::StreamEnd {}
        self.out.flush()?;
        let GzWriter {
            level,
            current,
            mut z,
            out,
            ..
        } = self;
        z.reset();
        // A state that fails to go back to its level is dropped, not pooled under the wrong one.
        if current != level && z.set_level(Compression::new(level)).is_err() {
            return Ok(out);
        }
        let mut pool = DEFLATERS.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOLED_DEFLATERS {
            pool.push((level, z));
        }
        Ok(out)
    }
}

struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Inflates a stored blob from `src`, writing the content to `out`; returns the content's digest
/// and size. Used to verify objects and to serve clients that refuse gzip.
pub fn inflate<R: Read, W: Write>(src: R, mut out: W) -> Result<(Digest, u64), BlobError> {
    let mut decoder = GzDecoder::new(src);
    let mut sink = ContentSink::new(u64::MAX, None);
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                sink.count(n)?;
                out.write_all(&buf[..n]).map_err(BlobError::Spool)?;
                sink.hash(&mut buf, n)?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_error(e)),
        }
    }
    sink.finish(&Hints::default())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn gzip(data: &[u8], level: u32) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), Compression::new(level));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn sha(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    const OPTS: IngestOptions = IngestOptions {
        level: 1,
        max_logical_size: 1 << 30,
        max_gzip_ratio: 0,
    };

    #[test]
    fn a_reused_deflate_state_compresses_like_a_new_one() {
        let ingest_raw = |content: &[u8]| stored_form(content, usize::MAX);
        let (a, b) = (b"first ".repeat(5000), b"second, other ".repeat(3000));
        ingest_raw(&a);
        let reused = ingest_raw(&b);
        DEFLATERS.lock().unwrap().clear();
        assert_eq!(reused, ingest_raw(&b));
        let mut back = Vec::new();
        inflate(&reused[..], &mut back).unwrap();
        assert_eq!(back, b);
    }

    /// Bytes that look random (SHA-256 in counter mode), `n` of them.
    fn noise(n: usize) -> Vec<u8> {
        (0u64..)
            .flat_map(|i| Sha256::digest(i.to_le_bytes()))
            .take(n)
            .collect()
    }

    /// Hands out at most `step` bytes per read, like a body arriving in small frames.
    pub(crate) struct Trickle<'a>(pub(crate) &'a [u8], pub(crate) usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(self.1).min(buf.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    /// Ingests identity bytes, read at most `step` at a time, checks their identity and that
    /// the stored form inflates back to them, and returns the stored form.
    fn stored_form(content: &[u8], step: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let info = ingest(
            Trickle(content, step),
            Encoding::Identity,
            &mut out,
            &Hints::default(),
            &OPTS,
        )
        .unwrap();
        assert_eq!(info.digest, sha(content));
        assert_eq!(info.stored_size, out.len() as u64);
        let mut back = Vec::new();
        inflate(&out[..], &mut back).unwrap();
        assert!(back == content, "stored form does not inflate back");
        out
    }

    fn stored_size(content: &[u8], step: usize) -> u64 {
        stored_form(content, step).len() as u64
    }

    #[test]
    fn samples_level_1_would_grow_are_told_from_the_others() {
        let r = noise(4096);
        let numbers: String = (0..100_000u64)
            .map(|i| format!("{} ", i * 7919 % 100_003))
            .collect();
        let text = &numbers.as_bytes()[..4096];
        // Compressed text (this file).
        let compressed = gzip(include_bytes!("blob.rs"), 6);
        let compressed = &compressed[..4096];
        assert!(incompressible(&r));
        assert!(incompressible(compressed));
        assert!(!incompressible(text));
        assert!(!incompressible(include_bytes!("blob.rs")));
        // Too short to judge.
        assert!(!incompressible(&r[..1000]));
        // Random blocks repeated within the sample: deflate finds the repeats.
        assert!(!incompressible(&r[..2048].repeat(2)));
        assert!(!incompressible(&r[..1024].repeat(4)));
        // Never stored when level 1 would have made it smaller.
        let mixes = [1024, 2048, 3072].map(|n| [&r[..n], &text[n..]].concat());
        for sample in [&r[..], compressed, text]
            .into_iter()
            .chain(mixes.iter().map(|m| &m[..]))
        {
            if incompressible(sample) {
                assert!(gzip(sample, 1).len() > sample.len());
            }
        }
    }

    #[test]
    fn random_bodies_are_stored_without_growing_and_text_is_still_compressed() {
        // Level 1 would add 5.5%; stored blocks add a few bytes each, gzip's frame 18.
        let stored_bound = |n: usize| (n + n / 1000 + 64) as u64;
        for n in [4096, 100_000, 1 << 20] {
            let r = noise(n);
            for step in [100, 1 << 20] {
                assert!(
                    stored_size(&r, step) <= stored_bound(n),
                    "{n} random bytes in reads of {step} grew to {}",
                    stored_size(&r, step)
                );
            }
        }
        // The pooled state went back to level 1: text after random bytes is compressed as by a
        // new state.
        let text = b"some text, ".repeat(10_000);
        let after_random = stored_size(&text, 1 << 20);
        DEFLATERS.lock().unwrap().clear();
        assert_eq!(after_random, stored_size(&text, 1 << 20));
        assert!(after_random < text.len() as u64 / 10);
        let repeated = noise(2048).repeat(2);
        assert!(stored_size(&repeated, 1 << 20) < 3000);
    }

    #[test]
    fn identity_and_gzip_bodies_have_the_same_identity() {
        let content = b"hello world ".repeat(1000);
        let mut raw_out = Vec::new();
        let raw = ingest(
            &content[..],
            Encoding::Identity,
            &mut raw_out,
            &Hints::default(),
            &OPTS,
        )
        .unwrap();
        let gz = gzip(&content, 9);
        let mut gz_out = Vec::new();
        let hints = Hints {
            sha256: Some(sha(&content)),
            logical_size: Some(content.len() as u64),
        };
        let zipped = ingest(&gz[..], Encoding::Gzip, &mut gz_out, &hints, &OPTS).unwrap();
        assert_eq!(raw.digest, sha(&content));
        assert_eq!(zipped.digest, raw.digest);
        assert_eq!(raw.logical_size, content.len() as u64);
        assert_eq!(zipped.stored_size, gz.len() as u64);
        assert_eq!(gz_out, gz, "a gzip body is stored as received");
        assert_eq!(raw.stored_size, raw_out.len() as u64);
        let (d, n) = inflate(&raw_out[..], io::sink()).unwrap();
        assert_eq!((d, n), (raw.digest, content.len() as u64));
    }

    #[test]
    fn content_past_the_hashing_threshold_has_the_same_identity_whoever_hashes_it() {
        // Past HASH_THREAD_AFTER, hashing moves to a thread fed swapped buffers: every byte must
        // still be hashed once and in order, however the body arrives.
        let mut content = noise(3 << 20);
        content.extend(b"words and more words\n".repeat(100_000));
        assert!(content.len() as u64 > 2 * HASH_THREAD_AFTER);
        for step in [1000, 1 << 20] {
            stored_form(&content, step);
        }
        let gz = gzip(&content, 6);
        let hints = Hints {
            sha256: Some(sha(&content)),
            logical_size: Some(content.len() as u64),
        };
        for step in [1000, 1 << 20] {
            let mut out = Vec::new();
            let info = ingest(Trickle(&gz, step), Encoding::Gzip, &mut out, &hints, &OPTS).unwrap();
            assert_eq!(info.digest, sha(&content));
            assert!(out == gz, "a gzip body is stored as received");
        }
        let mut back = Vec::new();
        assert_eq!(
            inflate(&gz[..], &mut back).unwrap(),
            (sha(&content), content.len() as u64)
        );
        assert!(back == content);
        // The last byte still counts, and a failure midway ends the hashing thread with it.
        let mut other = content.clone();
        *other.last_mut().unwrap() ^= 1;
        let e = ingest(
            &gzip(&other, 1)[..],
            Encoding::Gzip,
            io::sink(),
            &hints,
            &OPTS,
        );
        assert!(
            matches!(e, Err(BlobError::ChecksumMismatch { .. })),
            "{e:?}"
        );
        let e = ingest(
            &gz[..gz.len() / 2],
            Encoding::Gzip,
            io::sink(),
            &hints,
            &OPTS,
        );
        assert!(matches!(e, Err(BlobError::BadGzip(_))), "{e:?}");
    }

    /// Hands out `content` a frame at a time and, past `pause_at`, stops once at `gate`.
    struct Gated<'a> {
        content: &'a [u8],
        sent: usize,
        pause_at: usize,
        gate: Option<&'a (dyn Fn() + Sync)>,
    }

    impl Read for Gated<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.sent >= self.pause_at
                && let Some(gate) = self.gate.take()
            {
                gate();
            }
            let n = (self.content.len() - self.sent)
                .min(buf.len())
                .min(64 << 10);
            buf[..n].copy_from_slice(&self.content[self.sent..n + self.sent]);
            self.sent += n;
            Ok(n)
        }
    }

    #[test]
    fn more_large_uploads_than_cores_share_the_hashing_threads() {
        // Every upload below is past the threshold at once, paused: at most one hashing thread
        // per core runs; the others hash where they inflate, with the same result.
        let limit = hash_thread_limit();
        let n = limit + 3;
        let contents: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                let mut c = noise(3 * HASH_THREAD_AFTER as usize);
                c[0] = i as u8;
                c
            })
            .collect();
        let all_paused = std::sync::Barrier::new(n);
        let counted = std::sync::Barrier::new(n);
        let seen = AtomicUsize::new(0);
        let gate = || {
            all_paused.wait();
            seen.fetch_max(HASH_THREADS.load(Ordering::Acquire), Ordering::AcqRel);
            counted.wait();
        };
        std::thread::scope(|s| {
            for c in &contents {
                let gate: &(dyn Fn() + Sync) = &gate;
                s.spawn(move || {
                    let body = Gated {
                        content: c,
                        sent: 0,
                        pause_at: 2 * HASH_THREAD_AFTER as usize,
                        gate: Some(gate),
                    };
                    let hints = Hints {
                        sha256: Some(sha(c)),
                        logical_size: Some(c.len() as u64),
                    };
                    let info = ingest(body, Encoding::Identity, io::sink(), &hints, &OPTS);
                    assert_eq!(info.unwrap().digest, sha(c));
                });
            }
        });
        let seen = seen.into_inner();
        assert!(
            (1..=limit).contains(&seen),
            "{seen} hashing threads ran at once, {limit} allowed"
        );
    }

    #[test]
    fn wrong_hints_are_refused() {
        let content = b"abc";
        let wrong_sum = Hints {
            sha256: Some(sha(b"abd")),
            logical_size: None,
        };
        let e = ingest(
            &content[..],
            Encoding::Identity,
            io::sink(),
            &wrong_sum,
            &OPTS,
        );
        assert!(
            matches!(e, Err(BlobError::ChecksumMismatch { .. })),
            "{e:?}"
        );
        let wrong_size = Hints {
            sha256: None,
            logical_size: Some(4),
        };
        let e = ingest(
            &content[..],
            Encoding::Identity,
            io::sink(),
            &wrong_size,
            &OPTS,
        );
        assert!(matches!(
            e,
            Err(BlobError::SizeMismatch {
                claimed: 4,
                actual: 3
            })
        ));
    }

    #[test]
    fn broken_and_truncated_gzip_are_refused() {
        let e = ingest(
            &b"not gzip at all"[..],
            Encoding::Gzip,
            io::sink(),
            &Hints::default(),
            &OPTS,
        );
        assert!(matches!(e, Err(BlobError::BadGzip(_))), "{e:?}");
        let gz = gzip(&b"x".repeat(100_000), 6);
        for cut in [5, gz.len() / 2, gz.len() - 4] {
            let e = ingest(
                &gz[..cut],
                Encoding::Gzip,
                io::sink(),
                &Hints::default(),
                &OPTS,
            );
            assert!(e.is_err(), "truncated at {cut} of {} accepted", gz.len());
        }
        let mut corrupt = gz.clone();
        let n = corrupt.len();
        corrupt[n - 6] ^= 0xff; // CRC
        let e = ingest(
            &corrupt[..],
            Encoding::Gzip,
            io::sink(),
            &Hints::default(),
            &OPTS,
        );
        assert!(e.is_err(), "bad CRC accepted");
        let mut trailing = gz.clone();
        trailing.extend_from_slice(b"garbage");
        let e = ingest(
            &trailing[..],
            Encoding::Gzip,
            io::sink(),
            &Hints::default(),
            &OPTS,
        );
        assert!(e.is_err(), "trailing garbage accepted");
    }

    #[test]
    fn concatenated_gzip_members_are_one_content() {
        let mut gz = gzip(b"hello ", 9);
        gz.extend(gzip(b"world", 1));
        let info = ingest(
            &gz[..],
            Encoding::Gzip,
            io::sink(),
            &Hints::default(),
            &OPTS,
        )
        .unwrap();
        assert_eq!(info.digest, sha(b"hello world"));
        assert_eq!(info.logical_size, 11);
    }

    #[test]
    fn gzip_bomb_is_stopped_at_the_limit() {
        let gz = gzip(&vec![0u8; 10 << 20], 9);
        assert!(gz.len() < 64 << 10);
        let opts = IngestOptions {
            level: 1,
            max_logical_size: 1 << 20,
            max_gzip_ratio: 0,
        };
        let e = ingest(
            &gz[..],
            Encoding::Gzip,
            io::sink(),
            &Hints::default(),
            &opts,
        );
        assert!(matches!(e, Err(BlobError::TooLarge(_))));
    }

    #[test]
    fn channel_reader_distinguishes_end_from_cutoff() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.try_send(Chunk::Data(Bytes::from_static(b"ab"))).unwrap();
        tx.try_send(Chunk::Data(Bytes::from_static(b"c"))).unwrap();
        tx.try_send(Chunk::End).unwrap();
        let mut s = String::new();
        ChannelReader::new(rx).read_to_string(&mut s).unwrap();
        assert_eq!(s, "abc");

        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.try_send(Chunk::Data(Bytes::from_static(b"ab"))).unwrap();
        drop(tx);
        let e = ingest(
            ChannelReader::new(rx),
            Encoding::Identity,
            io::sink(),
            &Hints::default(),
            &OPTS,
        );
        assert!(matches!(e, Err(BlobError::Interrupted(_))), "{e:?}");
    }

    #[test]
    fn digest_parses_hex() {
        let d = sha(b"x");
        assert_eq!(d.to_hex().parse::<Digest>().unwrap(), d);
        assert!("zz".parse::<Digest>().is_err());
        assert!("ab".parse::<Digest>().is_err());
    }
}
