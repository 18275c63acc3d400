//! Reading one large object as several byte ranges at once, delivered in order.
//!
//! One connection to an S3 server carries less than the server and its disk can give: on this
//! 2-core machine s3s-fs sent a 36 MiB object at ~150 MiB/s over one GET and at ~270 MiB/s over
//! four 8 MiB ranges at once (AWS documents the same per-connection limit). The range being sent
//! is streamed; the ranges after it are read whole into memory meanwhile. What those may hold is
//! bounded for the whole process (a budget shared by every read). Reading ahead only helps while
//! few large reads run: with more, they already use every connection and core there is, and
//! sixteen 1 GiB reads at once held ~30 MiB more for nothing. So when the budget is spent, or
//! more than [`PARALLEL_READS_UP_TO`] large reads are in flight, the rest of the object is read
//! in one request, streamed, as one GET would.
//!
//! Every range after the first asks for the object the first one came from (`If-Match` on its
//! ETag) and must report the same total size, so a read never stitches two versions together.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{ObjectStream, StoreError};

/// Bytes handed on at once from a range read ahead (slices of it, not copies).
const SEND_CHUNK: usize = 256 * 1024;
/// Large reads in flight up to which they read ahead.
const PARALLEL_READS_UP_TO: usize = 2;

/// One answer to a range request.
pub struct RangeBody {
    /// The size of the whole object.
    pub total: u64,
    /// False when the server ignored the range and sent the whole object.
    pub ranged: bool,
    /// The object's entity tag, so that later ranges can insist on the same object.
    pub etag: Option<String>,
    pub body: ObjectStream,
}

/// Where the ranges of one object come from (S3, or a fake in unit tests).
pub trait RangeSource: Send + Sync + 'static {
    /// Bytes `start..=end` of the object; with `etag`, only if the object still has that tag.
    fn fetch(
        &self, start: u64, end: u64, etag: Option<String>,
    ) -> BoxFuture<'static, Result<RangeBody, StoreError>>;
}

/// How large objects are read: range size, ranges in flight per object, and the memory budget
/// all reads share for ranges read ahead.
#[derive(Clone)]
pub struct RangedReads {
    range: u64,
    concurrency: usize,
    /// One permit per range that may be held in memory.
    budget: Arc<Semaphore>,
    /// Large reads in flight.
    active: Arc<AtomicUsize>,
}

impl RangedReads {
    /// Ranges of `range` bytes, up to `concurrency` of one object at once, and read-ahead
    /// ranges of all reads together holding at most `buffer` bytes.
    pub fn new(range: u64, concurrency: usize, buffer: u64) -> Self {
        let range = range.max(1);
        RangedReads {
            range,
            concurrency: concurrency.max(1),
            budget: Arc::new(Semaphore::new((buffer / range) as usize)),
            active: Arc::default(),
        }
    }

    /// Whether an object of `size` bytes is read in ranges (it spans more than one).
    pub fn worth_it(&self, size: u64) -> bool {
        self.concurrency > 1 && size > self.range
    }

    /// Streams the object `src` serves, named `key` in errors, which must be `size` bytes. The
    /// first range is requested now, so that a missing object (or one of another size) is an
    /// error here rather than in the stream.
    pub async fn read(
        &self, src: Arc<dyn RangeSource>, key: &str, size: u64,
    ) -> Result<ObjectStream, StoreError> {
        let active = Active::new(&self.active);
        let first = src.fetch(0, self.range - 1, None).await?;
        super::check_size(key, size, first.total)?;
        let (count, len) = if first.ranged {
            (
                first.total.div_ceil(self.range).max(1),
                first.total.min(self.range),
            )
        } else {
            (1, first.total)
        };
        let body = exactly(
            first.body,
            len,
            format!("reading {key}: range 0-{}", len.max(1) - 1),
        );
        let reading = Reading {
            src,
            key: key.to_owned(),
            range: self.range,
            total: first.total,
            etag: first.etag,
            concurrency: self.concurrency,
            budget: self.budget.clone(),
            active,
            at: 0,
            count,
            next: 1,
            current: Some(Current::Streamed { body, last: 0 }),
            ahead: VecDeque::new(),
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(reading, Reading::step)))
    }
}

/// The range being sent.
enum Current {
    Streamed {
        body: ObjectStream,
        /// Index of the last range it covers.
        last: u64,
    },
    Buffered {
        data: Bytes,
        /// Given back to the budget once the range is handed on.
        _permit: OwnedSemaphorePermit,
    },
}

/// Counts a large read in flight until dropped.
struct Active(Arc<AtomicUsize>);

impl Active {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Active(count.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A range being read whole ahead of its turn.
struct Ahead {
    task: Aborting,
    permit: OwnedSemaphorePermit,
}

/// A read-ahead task, stopped when dropped (the client went away, or the read failed).
struct Aborting(tokio::task::JoinHandle<io::Result<Bytes>>);

impl Drop for Aborting {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Reading {
    src: Arc<dyn RangeSource>,
    key: String,
    range: u64,
    total: u64,
    etag: Option<String>,
    concurrency: usize,
    budget: Arc<Semaphore>,
    active: Active,
    /// Index of the range being sent.
    at: u64,
    count: u64,
    /// Index of the first range not requested yet; `ahead` holds those between.
    next: u64,
    current: Option<Current>,
    ahead: VecDeque<Ahead>,
    done: bool,
}

impl Reading {
    /// Bytes `start..=end` of range `i`.
    fn bounds(&self, i: u64) -> (u64, u64) {
        let start = i * self.range;
        (start, (start + self.range).min(self.total) - 1)
    }

    fn error(&self, what: impl std::fmt::Display) -> io::Error {
        io::Error::other(format!("reading {}: {what}", self.key))
    }

    /// Requests bytes `start..=end` of the same object as the first range; its body, which
    /// fails unless it holds exactly those bytes.
    fn fetch(&self, start: u64, end: u64) -> BoxFuture<'static, io::Result<ObjectStream>> {
        let fetch = self.src.fetch(start, end, self.etag.clone());
        let (total, key) = (self.total, self.key.clone());
        Box::pin(async move {
            let got = fetch.await.map_err(io::Error::other)?;
            let what = format!("reading {key}: range {start}-{end}");
            if !got.ranged {
                return Err(io::Error::other(format!(
                    "{what}: the server ignored the range and sent the whole object"
                )));
            }
            if got.total != total {
                return Err(io::Error::other(format!(
                    "{what}: the object changed while it was read ({total} bytes, now {})",
                    got.total
                )));
            }
            Ok(exactly(got.body, end - start + 1, what))
        })
    }

    /// Starts reading whole the ranges after the one being sent, while the object's share of
    /// ranges in flight and the process's budget allow.
    fn read_ahead(&mut self) {
        if self.active.0.load(Ordering::Relaxed) > PARALLEL_READS_UP_TO {
            return;
        }
        while self.next > self.at
            && self.next < self.count
            && self.ahead.len() + 1 < self.concurrency
        {
            let Ok(permit) = self.budget.clone().try_acquire_owned() else {
                break;
            };
            let (start, end) = self.bounds(self.next);
            let fetch = self.fetch(start, end);
            let task = tokio::spawn(async move {
                let mut body = fetch.await?;
                let mut data = BytesMut::with_capacity((end - start + 1) as usize);
                while let Some(chunk) = body.next().await {
                    data.extend_from_slice(&chunk?);
                }
                Ok(data.freeze())
            });
            self.ahead.push_back(Ahead {
                task: Aborting(task),
                permit,
            });
            self.next += 1;
        }
    }

    /// The next bytes of the object, or its end, or an error that ends it.
    async fn step(mut self) -> Option<(io::Result<Bytes>, Self)> {
        if self.done {
            return None;
        }
        loop {
            self.read_ahead();
            match &mut self.current {
                Some(Current::Streamed { body, last }) => match body.next().await {
                    Some(Ok(chunk)) => return Some((Ok(chunk), self)),
                    Some(Err(e)) => return self.fail(e),
                    None => {
                        let last = *last;
                        self.current = None;
                        self.at = last + 1;
                    }
                },
                Some(Current::Buffered { data, .. }) => {
                    if data.is_empty() {
                        self.current = None;
                        self.at += 1;
                        continue;
                    }
                    let chunk = data.split_to(data.len().min(SEND_CHUNK));
                    return Some((Ok(chunk), self));
                }
                None if self.at == self.count => return None,
                None => match self.ahead.pop_front() {
                    // `ahead` starts at the range after the one sent last.
                    Some(mut ahead) => match (&mut ahead.task.0).await {
                        Ok(Ok(data)) => {
                            let Ahead { permit, .. } = ahead;
                            self.current = Some(Current::Buffered {
                                data,
                                _permit: permit,
                            });
                        }
                        Ok(Err(e)) => return self.fail(e),
                        Err(e) => {
                            let e = self.error(format_args!("read-ahead task failed: {e}"));
                            return self.fail(e);
                        }
                    },
                    // Not read ahead: this range and all after it, in one request.
                    None => {
                        let (start, _) = self.bounds(self.at);
                        self.next = self.count;
                        match self.fetch(start, self.total - 1).await {
                            Ok(body) => {
                                let last = self.count - 1;
                                self.current = Some(Current::Streamed { body, last });
                            }
                            Err(e) => return self.fail(e),
                        }
                    }
                },
            }
        }
    }

    /// Ends the stream with `e`, stopping the reads ahead.
    fn fail(mut self, e: io::Error) -> Option<(io::Result<Bytes>, Self)> {
        self.done = true;
        self.current = None;
        self.ahead.clear();
        Some((Err(e), self))
    }
}

/// `body`, ended by an error (`what` says which range) when it holds more or fewer than `len`
/// bytes.
fn exactly(body: ObjectStream, len: u64, what: String) -> ObjectStream {
    Box::pin(futures::stream::unfold(
        Some((body, len, what)),
        |state| async move {
            let (mut body, left, what) = state?;
            let failed = |e: String| Some((Err(io::Error::other(format!("{what} {e}"))), None));
            match body.next().await {
                Some(Ok(chunk)) if chunk.len() as u64 > left => {
                    failed("is longer than asked".into())
                }
                Some(Ok(chunk)) => {
                    let left = left - chunk.len() as u64;
                    Some((Ok(chunk), Some((body, left, what))))
                }
                Some(Err(e)) => Some((Err(e), None)),
                None if left > 0 => failed(format!("ended {left} bytes early")),
                None => None,
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An object in memory, sent in 3-byte chunks, that can misbehave from a given offset on.
    #[derive(Clone, Default)]
    struct Fake {
        data: Bytes,
        /// Ranges starting here or later report this total size (another object).
        changed_from: Option<(u64, u64)>,
        /// The range starting here ends halfway.
        cut_at: Option<u64>,
        /// Every answer is the whole object, as from a server without ranges.
        whole: bool,
        fetches: Arc<AtomicUsize>,
    }

    impl Fake {
        /// A well-behaved object of `len` bytes.
        fn of(len: usize) -> Fake {
            Fake {
                data: object(len),
                ..Fake::default()
            }
        }
    }

    impl RangeSource for Fake {
        fn fetch(
            &self, start: u64, end: u64, _etag: Option<String>,
        ) -> BoxFuture<'static, Result<RangeBody, StoreError>> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            let len = self.data.len() as u64;
            let (start, end) = if self.whole {
                (0, len - 1)
            } else {
                (start, end.min(len - 1))
            };
            let mut part = self.data.slice(start as usize..=end as usize);
            if self.cut_at == Some(start) {
                part.truncate(part.len() / 2);
            }
            let total = match self.changed_from {
                Some((from, total)) if start >= from => total,
                _ => len,
            };
            let chunks: Vec<io::Result<Bytes>> = part
                .chunks(3)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            let ranged = !self.whole;
            Box::pin(async move {
                Ok(RangeBody {
                    total,
                    ranged,
                    etag: Some("\"tag\"".into()),
                    body: Box::pin(futures::stream::iter(chunks)),
                })
            })
        }
    }

    fn object(len: usize) -> Bytes {
        (0..len)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<_>>()
            .into()
    }

    /// Everything the stream gives until its end or first error.
    async fn collect(reads: &RangedReads, fake: &Fake) -> (Vec<u8>, Option<String>) {
        let size = fake.data.len() as u64;
        let mut stream = reads.read(Arc::new(fake.clone()), "k", size).await.unwrap();
        let mut out = Vec::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(b) => out.extend_from_slice(&b),
                Err(e) => return (out, Some(e.to_string())),
            }
        }
        (out, None)
    }

    #[tokio::test]
    async fn every_byte_arrives_in_order_one_request_per_range() {
        for len in [1, 9, 10, 11, 30, 95] {
            for concurrency in [1, 2, 4] {
                // No budget (each range in turn, streamed), room for one range, room for all.
                for buffer in [0, 10, 1000] {
                    let fake = Fake::of(len);
                    let reads = RangedReads::new(10, concurrency, buffer);
                    let (got, err) = collect(&reads, &fake).await;
                    let case = format!("len {len}, concurrency {concurrency}, buffer {buffer}");
                    assert_eq!(err, None, "{case}");
                    assert!(got == fake.data, "{case}");
                    // Each range once when all are read ahead; else, past the first one
                    // or two, the rest in one request.
                    let fetches = fake.fetches.load(Ordering::SeqCst);
                    if buffer == 1000 && concurrency > 1 {
                        assert_eq!(fetches, len.div_ceil(10), "{case}");
                    } else if buffer == 0 || concurrency == 1 {
                        assert_eq!(fetches, len.div_ceil(10).min(2), "{case}");
                    } else {
                        assert!(fetches <= len.div_ceil(10), "{case}");
                    }
                    assert_eq!(
                        reads.budget.available_permits(),
                        (buffer / 10) as usize,
                        "{case}"
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn an_object_of_another_size_than_its_row_says_is_refused_before_any_byte() {
        let reads = RangedReads::new(10, 4, 1000);
        let fake = Fake::of(95);
        let e = reads.read(Arc::new(fake), "k", 96).await.err().unwrap();
        assert!(
            matches!(
                e,
                StoreError::Changed {
                    expected: 96,
                    actual: 95,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn with_many_large_reads_in_flight_the_rest_is_one_request() {
        let reads = RangedReads::new(10, 4, 1000);
        let others = Fake::of(95);
        let mut open = Vec::new();
        for _ in 0..PARALLEL_READS_UP_TO {
            let size = others.data.len() as u64;
            open.push(
                reads
                    .read(Arc::new(others.clone()), "o", size)
                    .await
                    .unwrap(),
            );
        }
        let fake = Fake::of(95);
        let (got, err) = collect(&reads, &fake).await;
        assert_eq!(err, None);
        assert!(got == fake.data);
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 2);
        drop(open);
        assert_eq!(reads.active.load(Ordering::Relaxed), 0);
        let fake = Fake::of(95);
        collect(&reads, &fake).await;
        assert_eq!(
            fake.fetches.load(Ordering::SeqCst),
            10,
            "alone again: ranges"
        );
    }

    #[tokio::test]
    async fn a_range_of_another_object_ends_the_read_with_an_error() {
        let fake = Fake {
            data: object(95),
            changed_from: Some((10, 120)),
            ..Fake::default()
        };
        for buffer in [0, 1000] {
            let (got, err) = collect(&RangedReads::new(10, 4, buffer), &fake).await;
            let err = err.expect("an error");
            assert!(err.contains("changed while it was read"), "{err}");
            assert!(got.len() <= 10 && got[..] == fake.data[..got.len()]);
        }
    }

    #[tokio::test]
    async fn a_short_range_ends_the_read_with_an_error() {
        // The first range, and the second, which is the rest of the object without read-ahead.
        for cut_at in [0, 10] {
            let fake = Fake {
                data: object(95),
                cut_at: Some(cut_at),
                ..Fake::default()
            };
            for buffer in [0, 1000] {
                let (got, err) = collect(&RangedReads::new(10, 3, buffer), &fake).await;
                let err = err.unwrap_or_else(|| panic!("no error for a range cut at {cut_at}"));
                assert!(err.contains("reading k: range"), "{err}");
                assert!(got.len() < 95 && got[..] == fake.data[..got.len()]);
            }
        }
    }

    #[tokio::test]
    async fn a_server_without_ranges_sends_the_object_whole_once() {
        let fake = Fake {
            data: object(95),
            whole: true,
            ..Fake::default()
        };
        let (got, err) = collect(&RangedReads::new(10, 4, 1000), &fake).await;
        assert_eq!(err, None);
        assert!(got == fake.data);
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 1);
    }
}
