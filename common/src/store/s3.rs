//! Objects in an S3-compatible bucket through aws-sdk-s3.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::RequestId;
use aws_sdk_s3::operation::get_object::GetObjectError;
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use super::ranged::{RangeBody, RangeSource, RangedReads};
use super::{
    Deleted, DeletedMany, EarlyUpload, Incoming, ObjectEntry, ObjectStore, ObjectStream,
    PendingUpload, StaleUploads, StoreError, deadline_passed, digest_of_key, object_key,
};
use crate::blob::Digest;
use crate::config::S3Config;
use crate::spool::{SpoolBody, SpoolFeed};

/// A bucket (and key prefix) of an S3-compatible server.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    multipart_threshold: u64,
    part_size: u64,
    upload_concurrency: usize,
    /// Parts being sent, all uploads together (see [`PARTS_IN_FLIGHT`]).
    part_slots: Arc<Semaphore>,
    reads: RangedReads,
    /// Attempts of one request (`store.s3.max_attempts`).
    max_attempts: u32,
    requests: RequestCounts,
}

/// S3 requests sent, by operation (`PutObject`, `GetObject`, …), each attempt of a retried
/// one included: what S3 bills. Counted as the SDK hands each request to the network.
#[derive(Debug, Default, Clone)]
struct RequestCounts(Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>);

impl aws_sdk_s3::config::Intercept for RequestCounts {
    fn name(&self) -> &'static str {
        "s3dedup request counts"
    }

    fn read_before_transmit(
        &self, _: &aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _: &aws_sdk_s3::config::RuntimeComponents, cfg: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        use aws_smithy_runtime_api::client::orchestrator::Metadata;
        let operation = cfg.load::<Metadata>().map_or("unknown", Metadata::name);
        let mut counts = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *counts.entry(operation.to_owned()).or_default() += 1;
        Ok(())
    }
}

/// Parts that all uploads together send at once, in this process (at least
/// `upload_concurrency`). While the S3 server takes a part in, the HTTP client queues up to
/// ~400 KiB of it: sixteen concurrent 1 GiB uploads, four parts each, held 24 MiB that way, and
/// more parts at once do not make the S3 server take them in faster.
const PARTS_IN_FLIGHT: usize = 16;
/// Bytes per range of an object read in ranges ([`RangedReads`]); what AWS suggests.
const READ_RANGE: u64 = 8 << 20;
/// Memory that all ranges read ahead of their turn may hold together, in this process.
const READ_AHEAD_BUFFER: u64 = 3 * READ_RANGE;

fn unavailable<E>(op: &'static str, key: &str, err: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    StoreError::Unavailable {
        op,
        key: key.to_owned(),
        message: sdk_error_text(&err),
    }
}

/// What a failed S3 request says, in a line an operator can read: the server's status, code and
/// message, or the chain of causes when no answer came. The SDK's own text adds a debug dump of
/// the whole response, and for an answer without a body (every HEAD) says only "unhandled error".
fn sdk_error_text<E>(err: &SdkError<E, HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let SdkError::ServiceError(service) = err else {
        return crate::error_chain(err);
    };
    let status = service.raw().status().as_u16();
    let mut text = format!("the S3 server answered HTTP {status}");
    if let Some(reason) = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
    {
        text = format!("{text} {reason}");
    }
    let meta = service.err().meta();
    match (meta.code(), meta.message()) {
        (Some(code), Some(message)) => text = format!("{text} ({code}: {message})"),
        (Some(code), None) => text = format!("{text} ({code})"),
        (None, Some(message)) => text = format!("{text} ({message})"),
        (None, None) => {}
    }
    if let Some(id) = err.request_id() {
        text = format!("{text}, request id {id}");
    }
    text
}

impl S3Store {
    /// Builds a client from the configuration. With no access key configured, credentials come
    /// from the AWS default chain (environment, profile, instance metadata).
    pub async fn connect(cfg: &S3Config, secret: Option<String>) -> Result<Self, StoreError> {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(cfg.connect_timeout_secs))
            .read_timeout(Duration::from_secs(cfg.read_timeout_secs))
            .build();
        let retry = RetryConfig::standard()
            .with_max_attempts(cfg.max_attempts)
            .with_initial_backoff(Duration::from_millis(100));
        let mut b = if !cfg.access_key_id.is_empty() && secret.is_some() {
            aws_sdk_s3::config::Builder::new()
                .behavior_version(BehaviorVersion::latest())
                .credentials_provider(Credentials::new(
                    cfg.access_key_id.clone(),
                    secret.unwrap_or_default(),
                    None,
                    None,
                    "s3dedup-config",
                ))
        } else {
            let shared = aws_config::defaults(BehaviorVersion::latest()).load().await;
            aws_sdk_s3::config::Builder::from(&shared)
        };
        b = b
            .region(Region::new(cfg.region.clone()))
            .force_path_style(cfg.path_style)
            .timeout_config(timeouts)
            .retry_config(retry)
            // We verify SHA-256 ourselves; extra CRCs cost CPU and some servers reject them.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if !cfg.endpoint.is_empty() {
            b = b.endpoint_url(cfg.endpoint.clone());
        }
        let requests = RequestCounts::default();
        b = b.interceptor(requests.clone());
        Ok(S3Store {
            client: Client::from_conf(b.build()),
            requests,
            bucket: cfg.bucket.clone(),
            prefix: cfg.prefix.clone(),
            multipart_threshold: cfg.multipart_threshold,
            part_size: cfg.part_size,
            upload_concurrency: cfg.upload_concurrency,
            part_slots: Arc::new(Semaphore::new(PARTS_IN_FLIGHT.max(cfg.upload_concurrency))),
            reads: RangedReads::new(READ_RANGE, cfg.download_concurrency, READ_AHEAD_BUFFER),
            max_attempts: cfg.max_attempts,
        })
    }

    /// The prefix our keys are listed under (`""` or `"<prefix>/"`).
    fn list_prefix(&self) -> String {
        match self.prefix.trim_matches('/') {
            "" => String::new(),
            p => format!("{p}/"),
        }
    }

    async fn start_multipart(&self, key: &str) -> Result<Multipart, StoreError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| unavailable("starting multipart upload of", key, e))?;
        let Some(upload_id) = created.upload_id() else {
            return Err(StoreError::Unavailable {
                op: "starting multipart upload of",
                key: key.to_owned(),
                message: "the server answered without an upload id".into(),
            });
        };
        Ok(Multipart {
            store: self.clone(),
            key: key.to_owned(),
            upload_id: upload_id.to_owned(),
            parts: Vec::new(),
            open: true,
        })
    }

    /// Sends part `index` (from 0) of a spool file: `len` bytes from `index * part_size`.
    async fn upload_part(
        &self, key: &str, upload_id: &str, path: &Path, index: u64, len: u64,
    ) -> Result<CompletedPart, StoreError> {
        // Never closed: a failure to acquire cannot happen while `self` holds the semaphore.
        let _slot = self.part_slots.acquire().await.ok();
        let body = ByteStream::read_from()
            .path(path)
            .offset(index * self.part_size)
            .length(Length::Exact(len))
            .build()
            .await
            .map_err(|e| StoreError::io("reading spool for", key, io::Error::other(e)))?;
        let part_number = index as i32 + 1;
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(part_number)
            .content_length(len as i64)
            .body(body)
            .send()
            .await
            .map_err(|e| unavailable("uploading a part of", key, e))?;
        Ok(CompletedPart::builder()
            .part_number(part_number)
            .set_e_tag(out.e_tag().map(str::to_owned))
            .build())
    }

    async fn head_key(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(out.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(unavailable("inspecting", key, e)),
        }
    }

    async fn put_key(&self, key: &str, body: SpoolBody, size: u64) -> Result<(), StoreError> {
        // The spool file must outlive the request that streams from it.
        let (stream, _spool) = match body {
            // Bodies kept in memory are far below any part size: one request.
            SpoolBody::Memory(bytes) => (ByteStream::from(bytes), None),
            SpoolBody::File(spool) if size >= self.multipart_threshold => {
                let upload = self.start_multipart(key).await?;
                return upload.complete(spool.path(), size).await;
            }
            SpoolBody::File(spool) => {
                let stream = ByteStream::from_path(spool.path())
                    .await
                    .map_err(|e| StoreError::io("reading spool for", key, io::Error::other(e)))?;
                (stream, Some(spool))
            }
        };
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(size as i64)
            .body(stream)
            .send()
            .await
            .map_err(|e| unavailable("storing", key, e))?;
        Ok(())
    }
}

/// A multipart upload in progress. Its object does not exist until it is completed; dropped
/// while still open, it is aborted in the background (what that misses, a crash for one, the
/// bucket's lifecycle rules reclaim).
struct Multipart {
    store: S3Store,
    key: String,
    upload_id: String,
    /// Parts 1..=n, all sent.
    parts: Vec<CompletedPart>,
    open: bool,
}

impl Multipart {
    /// Sends the parts of the spool file at `path` (`size` bytes) not sent yet, then completes.
    async fn complete(mut self, path: &Path, size: u64) -> Result<(), StoreError> {
        let store = self.store.clone();
        let part_size = store.part_size;
        let (key, upload_id) = (self.key.clone(), self.upload_id.clone());
        let sent = self.parts.len() as u64;
        let rest = futures::stream::iter(sent..size.div_ceil(part_size))
            .map(|i| {
                let len = part_size.min(size - i * part_size);
                store.upload_part(&key, &upload_id, path, i, len)
            })
            .buffer_unordered(store.upload_concurrency)
            .try_collect::<Vec<_>>()
            .await;
        match rest {
            Ok(parts) => self.parts.extend(parts),
            Err(e) => {
                self.abort().await;
                return Err(e);
            }
        }
        self.parts.sort_by_key(|p| p.part_number());
        let done = store
            .client
            .complete_multipart_upload()
            .bucket(&store.bucket)
            .key(&key)
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(std::mem::take(&mut self.parts)))
                    .build(),
            )
            .send()
            .await;
        let done = match done {
            Ok(_) => Ok(()),
            // A completion that outlasts the read timeout is retried, and the retry finds the
            // upload gone because the first attempt completed it: the object says which.
            Err(e) => match store.head_key(&key).await {
                Ok(Some(stored)) if stored == size => Ok(()),
                _ => Err(unavailable("completing multipart upload of", &key, e)),
            },
        };
        match done {
            Ok(()) => {
                self.open = false;
                Ok(())
            }
            Err(e) => {
                self.abort().await;
                Err(e)
            }
        }
    }

    /// Discards the parts sent. Best effort: a failure leaves them to the cleaner's sweep of
    /// abandoned uploads (or the bucket's lifecycle rule).
    async fn abort(mut self) {
        self.open = false;
        abort_multipart(&self.store, &self.key, &self.upload_id).await;
    }
}

/// Aborts a multipart upload, discarding its parts; the error says why it could not.
async fn try_abort_multipart(store: &S3Store, key: &str, upload_id: &str) -> Result<(), String> {
    store
        .client
        .abort_multipart_upload()
        .bucket(&store.bucket)
        .key(key)
        .upload_id(upload_id)
        .send()
        .await
        .map(drop)
        .map_err(|e| sdk_error_text(&e))
}

/// [`try_abort_multipart`], a failure only logged.
async fn abort_multipart(store: &S3Store, key: &str, upload_id: &str) {
    if let Err(error) = try_abort_multipart(store, key, upload_id).await {
        tracing::warn!(key, error, "cannot abort multipart upload");
    }
}

impl Drop for Multipart {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (store, key, id) = (
                self.store.clone(),
                std::mem::take(&mut self.key),
                std::mem::take(&mut self.upload_id),
            );
            rt.spawn(async move { abort_multipart(&store, &key, &id).await });
        }
    }
}

/// A streamed PUT sends this many bytes per message and queues this many messages: a server
/// slower than the upload by 4 MiB ends the stream, and the object is sent from the spool file
/// at commit instead.
const STREAM_CHUNK: usize = 256 * 1024;
const STREAM_QUEUE: usize = 16;

/// The request body of a streamed PUT: chunks from the spool writer, then the held-back tail.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(http_body::Frame::data(b))))
    }
}

/// The spool writer's side of a streamed PUT: forwards what is written, always holding back
/// the latest bytes, which it hands to [`StreamedPut`] when the writer ends.
struct CopyToPut {
    tx: Option<mpsc::Sender<Bytes>>,
    held: BytesMut,
    tail: Option<oneshot::Sender<Bytes>>,
}

impl SpoolFeed for CopyToPut {
    fn wrote(&mut self, data: &[u8]) {
        let Some(tx) = &self.tx else { return };
        if self.held.len() >= STREAM_CHUNK && tx.try_send(self.held.split().freeze()).is_err() {
            // The server fell behind or failed: give up streaming, the commit sends the file.
            self.tx = None;
            self.held = BytesMut::new();
            return;
        }
        self.held.extend_from_slice(data);
    }
}

impl Drop for CopyToPut {
    fn drop(&mut self) {
        if self.tx.take().is_some()
            && let Some(tail) = self.tail.take()
        {
            let _ = tail.send(self.held.split().freeze());
        }
    }
}

/// A PUT of an object streamed from its spool as it is written, incomplete (so no object) until
/// its tail is sent; dropped unfinished, the request is cut off.
struct StreamedPut {
    store: S3Store,
    key: String,
    tx: Option<mpsc::Sender<Bytes>>,
    tail: oneshot::Receiver<Bytes>,
    request: AbortOnDropHandle<Result<(), StoreError>>,
}

impl StreamedPut {
    /// Sends the tail and waits for the server; false when the stream broke on the way.
    async fn complete(&mut self) -> bool {
        let (Ok(tail), Some(tx)) = ((&mut self.tail).await, self.tx.take()) else {
            return false;
        };
        if tx.send(tail).await.is_err() {
            return false;
        }
        drop(tx);
        match (&mut self.request).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(key = %self.key, error = %e, "streamed PUT failed; sending the file");
                false
            }
            Err(e) => {
                tracing::warn!(key = %self.key, error = %e, "streamed PUT task failed");
                false
            }
        }
    }
}

#[async_trait]
impl PendingUpload for StreamedPut {
    async fn finish(mut self: Box<Self>, body: SpoolBody, size: u64) -> Result<(), StoreError> {
        if self.complete().await {
            return Ok(());
        }
        self.request.abort();
        self.store.put_key(&self.key, body, size).await
    }
}

/// How much of a growing spool file is on disk, for the task sending its parts.
#[derive(Debug, Clone, Default)]
struct SpoolProgress {
    /// The spool file, once there is one.
    path: Option<PathBuf>,
    /// Bytes written through to the file.
    flushed: u64,
}

/// The spool writer's side of an upload in parts: it has the writer flush each part's worth
/// and publishes how far the file is on disk. Dropped with the writer, which ends the parts.
struct ProgressFeed {
    step: u64,
    tx: watch::Sender<SpoolProgress>,
}

impl SpoolFeed for ProgressFeed {
    fn flush_every(&self) -> Option<u64> {
        Some(self.step)
    }

    fn flushed(&mut self, path: &Path, len: u64) {
        self.tx.send_replace(SpoolProgress {
            path: Some(path.to_owned()),
            flushed: len,
        });
    }
}

/// An upload in parts: the task sending whole parts as the spool file grows, then, at finish,
/// the rest and the completion. Sending that failed is not fatal: the object then goes up
/// whole at finish. Dropped unfinished, the task stops and its upload is aborted.
struct PartsPending {
    store: S3Store,
    key: String,
    sending: AbortOnDropHandle<Result<Option<Multipart>, StoreError>>,
}

#[async_trait]
impl PendingUpload for PartsPending {
    async fn finish(mut self: Box<Self>, body: SpoolBody, size: u64) -> Result<(), StoreError> {
        let sent = match (&mut self.sending).await {
            Ok(Ok(sent)) => sent,
            Ok(Err(e)) => {
                tracing::warn!(key = %self.key, error = %e,
                    "sending an upload in parts failed; sending it whole");
                None
            }
            Err(e) => {
                tracing::warn!(key = %self.key, error = %e, "the part upload task failed");
                None
            }
        };
        match (sent, body) {
            (Some(upload), SpoolBody::File(spool)) => upload.complete(spool.path(), size).await,
            // Parts are only sent from files; a body in memory is one small request.
            (sent, body) => {
                if let Some(upload) = sent {
                    upload.abort().await;
                }
                self.store.put_key(&self.key, body, size).await
            }
        }
    }
}

impl S3Store {
    /// One PUT of `size` bytes at `key`, fed from the spool as it is written.
    fn streamed_put(&self, key: String, size: u64) -> EarlyUpload {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let (tail_tx, tail_rx) = oneshot::channel();
        let store = self.clone();
        let request = {
            let key = key.clone();
            AbortOnDropHandle::new(tokio::spawn(async move {
                store
                    .client
                    .put_object()
                    .bucket(&store.bucket)
                    .key(&key)
                    .content_length(size as i64)
                    .body(ByteStream::from_body_1_x(ChannelBody(rx)))
                    .send()
                    .await
                    .map_err(|e| unavailable("storing", &key, e))?;
                Ok(())
            }))
        };
        let copy = CopyToPut {
            tx: Some(tx.clone()),
            held: BytesMut::new(),
            tail: Some(tail_tx),
        };
        let put = StreamedPut {
            store: self.clone(),
            key,
            tx: Some(tx),
            tail: tail_rx,
            request,
        };
        EarlyUpload {
            feed: Box::new(copy),
            upload: Box::new(put),
        }
    }

    /// Sends the complete parts of a spool file as it grows (`progress`), until its writer
    /// ends; `None` when the file never reached one part.
    async fn send_parts(
        &self, key: &str, mut progress: watch::Receiver<SpoolProgress>,
    ) -> Result<Option<Multipart>, StoreError> {
        let key = key.to_owned();
        let mut upload: Option<Multipart> = None;
        let mut in_flight = FuturesUnordered::new();
        let mut next = 0u64;
        let mut ended = false;
        let sent: Result<(), StoreError> = async {
            loop {
                let ready = progress.borrow_and_update().clone();
                while !ended
                    && in_flight.len() < self.upload_concurrency
                    && (next + 1) * self.part_size <= ready.flushed
                {
                    let Some(path) = ready.path.clone() else {
                        break;
                    };
                    let id = match &upload {
                        Some(u) => u.upload_id.clone(),
                        None => upload
                            .insert(self.start_multipart(&key).await?)
                            .upload_id
                            .clone(),
                    };
                    let key = key.clone();
                    let len = self.part_size;
                    in_flight
                        .push(async move { self.upload_part(&key, &id, &path, next, len).await });
                    next += 1;
                }
                tokio::select! {
                    Some(part) = in_flight.next(), if !in_flight.is_empty() => {
                        if let Some(u) = upload.as_mut() {
                            u.parts.push(part?);
                        }
                    }
                    changed = progress.changed(), if !ended => ended = changed.is_err(),
                    else => return Ok(()),
                }
            }
        }
        .await;
        match sent {
            Ok(()) => Ok(upload),
            Err(e) => {
                // Let parts still being sent end before the upload is discarded.
                while in_flight.next().await.is_some() {}
                if let Some(u) = upload {
                    u.abort().await;
                }
                Err(e)
            }
        }
    }
}

/// The client's configuration with its retries off, for requests whose attempts are made and
/// counted one by one.
fn single_attempt() -> aws_sdk_s3::config::Builder {
    aws_sdk_s3::config::Builder::new().retry_config(RetryConfig::disabled())
}

impl S3Store {
    /// Sends a delete request (`send`, one attempt each call) until it is answered with
    /// success, up to `store.s3.max_attempts` times and never past `deadline`. The attempts are
    /// ours, not the SDK's, so that we know whether one went unanswered: such a request may
    /// still be carried out after a later one succeeded, and the delete is then
    /// [`Deleted::Unsettled`].
    async fn delete_attempts<O, E, F, Fut>(
        &self, key: &str, deadline: Instant, mut send: F,
    ) -> Result<(Deleted, O), StoreError>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<O, SdkError<E, HttpResponse>>>,
    {
        let mut unanswered = false;
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let err = match tokio::time::timeout_at(deadline, send()).await {
                Err(_) => return Err(deadline_passed(key)),
                Ok(Ok(out)) if unanswered => return Ok((Deleted::Unsettled, out)),
                Ok(Ok(out)) => return Ok((Deleted::Settled, out)),
                Ok(Err(e)) => e,
            };
            // No answer (a timeout, a connection lost after sending): the server may still act.
            if err.raw_response().is_none() && !matches!(err, SdkError::ConstructionFailure(_)) {
                unanswered = true;
            }
            if attempt >= self.max_attempts || Instant::now() + backoff >= deadline {
                return Err(unavailable("deleting", key, err));
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix.trim_matches('/'))
    }

    fn requests_sent(&self) -> Vec<(String, u64)> {
        let counts = self.requests.0.lock();
        let counts = counts.unwrap_or_else(std::sync::PoisonError::into_inner);
        counts.iter().map(|(op, n)| (op.clone(), *n)).collect()
    }

    fn key(&self, digest: &Digest) -> String {
        object_key(&self.prefix, digest)
    }

    async fn put(&self, digest: &Digest, body: SpoolBody, size: u64) -> Result<(), StoreError> {
        self.put_key(&self.key(digest), body, size).await
    }

    /// Below the multipart threshold, with its stored size known: one PUT streamed from the
    /// spool as it is written, its last bytes held back until the content is verified. Else in
    /// parts read from the spool file (at least one part's worth).
    fn early_upload(&self, digest: &Digest, incoming: Incoming) -> Option<EarlyUpload> {
        let key = self.key(digest);
        if let Some(size) = incoming.stored.filter(|n| *n < self.multipart_threshold) {
            return Some(self.streamed_put(key, size));
        }
        if incoming.at_most.is_some_and(|n| n < self.part_size) {
            return None;
        }
        let (tx, rx) = watch::channel(SpoolProgress::default());
        let store = self.clone();
        let sending = {
            let key = key.clone();
            AbortOnDropHandle::new(tokio::spawn(
                async move { store.send_parts(&key, rx).await },
            ))
        };
        Some(EarlyUpload {
            feed: Box::new(ProgressFeed {
                step: self.part_size,
                tx,
            }),
            upload: Box::new(PartsPending {
                store: self.clone(),
                key,
                sending,
            }),
        })
    }

    async fn get(&self, digest: &Digest) -> Result<ObjectStream, StoreError> {
        let key = self.key(digest);
        let request = self.client.get_object().bucket(&self.bucket).key(&key);
        let out = request.send().await.map_err(|e| read_failed(key, e))?;
        Ok(object_stream(out.body))
    }

    async fn get_stored(&self, digest: &Digest, size: u64) -> Result<ObjectStream, StoreError> {
        let key = self.key(digest);
        if !self.reads.worth_it(size) {
            let request = self.client.get_object().bucket(&self.bucket).key(&key);
            let out = request
                .send()
                .await
                .map_err(|e| read_failed(key.clone(), e))?;
            let actual = out.content_length().unwrap_or(0).max(0) as u64;
            super::check_size(&key, size, actual)?;
            return Ok(object_stream(out.body));
        }
        let src = Arc::new(ObjectRanges {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.clone(),
        });
        self.reads.read(src, &key, size).await
    }

    async fn head(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        self.head_key(&self.key(digest)).await
    }

    async fn delete(&self, digest: &Digest, deadline: Instant) -> Result<Deleted, StoreError> {
        let key = self.key(digest);
        let send = || {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(&key)
                .customize()
                .config_override(single_attempt())
                .send()
        };
        let (settled, _) = self.delete_attempts(&key, deadline, send).await?;
        Ok(settled)
    }

    async fn list(
        &self, after: Option<&Digest>, limit: usize,
    ) -> Result<Vec<ObjectEntry>, StoreError> {
        let prefix = self.prefix.trim_matches('/');
        let list_prefix = self.list_prefix();
        let mut start_after = after.map(|d| self.key(d));
        let mut out = Vec::new();
        // Foreign keys under the prefix are skipped, so a page may need several requests.
        while out.len() < limit {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&list_prefix)
                .set_start_after(start_after.clone())
                .max_keys((limit - out.len()).min(1000) as i32)
                .send()
                .await
                .map_err(|e| unavailable("listing", &list_prefix, e))?;
            let contents = page.contents();
            for o in contents {
                let Some(key) = o.key() else { continue };
                start_after = Some(key.to_owned());
                if let Some(digest) = digest_of_key(prefix, key) {
                    out.push(ObjectEntry {
                        digest,
                        size: o.size().unwrap_or(0).max(0) as u64,
                        modified: o.last_modified().map_or(0, |t| t.secs()),
                    });
                }
            }
            if contents.is_empty() || page.is_truncated() != Some(true) {
                break;
            }
        }
        Ok(out)
    }

    async fn abort_stale_uploads(
        &self, before: i64, dry_run: bool,
    ) -> Result<Option<StaleUploads>, StoreError> {
        let list_prefix = self.list_prefix();
        let mut done = StaleUploads::default();
        let (mut key_marker, mut id_marker) = (None, None);
        loop {
            let page = match self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&list_prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
            {
                Ok(page) => page,
                // Some servers (s3s-fs among them) do not implement the listing.
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 501) => {
                    return Ok(None);
                }
                Err(e) => {
                    return Err(unavailable(
                        "listing multipart uploads under",
                        &list_prefix,
                        e,
                    ));
                }
            };
            for upload in page.uploads() {
                let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) else {
                    continue;
                };
                // Only uploads of our own keys, and only old ones: a younger one may be an
                // upload in progress, and one without a start time is left alone.
                let old = upload.initiated().is_some_and(|t| t.secs() < before);
                if !old || digest_of_key(&self.prefix, key).is_none() {
                    continue;
                }
                if !dry_run && let Err(why) = try_abort_multipart(self, key, id).await {
                    done.failed.push((key.to_owned(), why));
                    continue;
                }
                tracing::debug!(
                    key,
                    upload_id = id,
                    dry_run,
                    "aborted an abandoned multipart upload"
                );
                done.aborted += 1;
            }
            if page.is_truncated() != Some(true) {
                return Ok(Some(done));
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            id_marker = page.next_upload_id_marker().map(str::to_owned);
            if key_marker.is_none() && id_marker.is_none() {
                // A truncated page without markers would be asked for again forever.
                return Ok(Some(done));
            }
        }
    }

    async fn delete_many(
        &self, digests: &[Digest], deadline: Instant,
    ) -> Result<DeletedMany, StoreError> {
        let chunks = digests.chunks(MAX_KEYS_PER_DELETE);
        let mut done = DeletedMany::default();
        for chunk in chunks {
            let objects = chunk
                .iter()
                .map(|d| ObjectIdentifier::builder().key(self.key(d)).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| StoreError::io("deleting", &self.bucket, io::Error::other(e)))?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| StoreError::io("deleting", &self.bucket, io::Error::other(e)))?;
            let send = || {
                self.client
                    .delete_objects()
                    .bucket(&self.bucket)
                    .delete(delete.clone())
                    .customize()
                    .config_override(single_attempt())
                    .send()
            };
            let (settled, out) = self.delete_attempts(&self.bucket, deadline, send).await?;
            done.settled = done.settled.and(settled);
            for err in out.errors() {
                let key = err.key().unwrap_or_default();
                if let Some(d) = digest_of_key(&self.prefix, key) {
                    done.failed
                        .push((d, err.message().unwrap_or("delete failed").to_owned()));
                }
            }
        }
        Ok(done)
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| StoreError::Unavailable {
                op: "checking bucket",
                key: self.bucket.clone(),
                message: sdk_error_text(&e) + &bucket_check_hint(&e),
            })?;
        Ok(())
    }
}

/// The most keys one DeleteObjects request may name.
const MAX_KEYS_PER_DELETE: usize = 1000;

/// What the configuration likely gets wrong when the bucket check is refused (empty if unsure).
fn bucket_check_hint<E>(err: &SdkError<E, HttpResponse>) -> String {
    let Some(answer) = err.raw_response() else {
        return String::new();
    };
    match answer.status().as_u16() {
        301 => match answer.headers().get("x-amz-bucket-region") {
            Some(region) => format!("; the bucket is in region {region}: set store.s3.region"),
            None => "; the bucket is elsewhere: check store.s3.region and store.s3.endpoint".into(),
        },
        400 => "; check that store.s3.bucket is a valid bucket name and store.s3.region".into(),
        403 => {
            "; check store.s3.access_key_id, the secret access key and the bucket's policy".into()
        }
        404 => "; no such bucket: create it, or correct store.s3.bucket".into(),
        _ => String::new(),
    }
}

/// What a failed GET of `key` means: no such object, or the store's own failure.
fn read_failed(key: String, e: SdkError<GetObjectError, HttpResponse>) -> StoreError {
    if e.as_service_error().is_some_and(|s| s.is_no_such_key()) {
        return StoreError::NotFound { key };
    }
    unavailable("reading", &key, e)
}

/// An object's body as a stream of bytes.
fn object_stream(body: ByteStream) -> ObjectStream {
    Box::pin(futures::stream::unfold(body, |mut body| async move {
        body.next()
            .await
            .map(|r| (r.map_err(io::Error::other), body))
    }))
}

/// The ranges of one object, for [`RangedReads`].
struct ObjectRanges {
    client: Client,
    bucket: String,
    key: String,
}

impl RangeSource for ObjectRanges {
    fn fetch(
        &self, start: u64, end: u64, etag: Option<String>,
    ) -> BoxFuture<'static, Result<RangeBody, StoreError>> {
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&self.key)
            .range(format!("bytes={start}-{end}"))
            .set_if_match(etag);
        let key = self.key.clone();
        Box::pin(async move {
            let out = request.send().await.map_err(|e| read_failed(key, e))?;
            // `bytes <first>-<last>/<total>`; without it the server sent the whole object.
            let total = out
                .content_range()
                .and_then(|r| r.rsplit_once('/'))
                .and_then(|(_, total)| total.parse::<u64>().ok());
            let ranged = total.is_some();
            let total = total.unwrap_or(out.content_length().unwrap_or(0).max(0) as u64);
            let etag = out.e_tag().map(str::to_owned);
            Ok(RangeBody {
                total,
                ranged,
                etag,
                body: object_stream(out.body),
            })
        })
    }
}
