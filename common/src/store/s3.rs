//! Objects in an S3-compatible bucket through aws-sdk-s3.

use std::io;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use futures::{StreamExt, TryStreamExt};

use super::{ObjectEntry, ObjectStore, ObjectStream, StoreError, digest_of_key, object_key};
use crate::blob::Digest;
use crate::config::S3Config;
use crate::spool::SpoolBody;

/// A bucket (and key prefix) of an S3-compatible server.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    multipart_threshold: u64,
    part_size: u64,
    upload_concurrency: usize,
}

fn unavailable<E, R>(op: &'static str, key: &str, err: SdkError<E, R>) -> StoreError
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    StoreError::Unavailable {
        op,
        key: key.to_owned(),
        message: DisplayErrorContext(&err).to_string(),
    }
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
        Ok(S3Store {
            client: Client::from_conf(b.build()),
            bucket: cfg.bucket.clone(),
            prefix: cfg.prefix.clone(),
            multipart_threshold: cfg.multipart_threshold,
            part_size: cfg.part_size,
            upload_concurrency: cfg.upload_concurrency,
        })
    }

    async fn put_multipart(
        &self,
        key: &str,
        path: &std::path::Path,
        size: u64,
    ) -> Result<(), StoreError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| unavailable("starting multipart upload of", key, e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_owned();
        let part_count = size.div_ceil(self.part_size);
        let uploads = futures::stream::iter(0..part_count)
            .map(|i| {
                let upload_id = upload_id.clone();
                async move {
                    let offset = i * self.part_size;
                    let len = self.part_size.min(size - offset);
                    let body = ByteStream::read_from()
                        .path(path)
                        .offset(offset)
                        .length(Length::Exact(len))
                        .build()
                        .await
                        .map_err(|e| {
                            StoreError::io("reading spool for", key, io::Error::other(e))
                        })?;
                    let part_number = i as i32 + 1;
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
                    Ok::<_, StoreError>(
                        CompletedPart::builder()
                            .part_number(part_number)
                            .set_e_tag(out.e_tag().map(str::to_owned))
                            .build(),
                    )
                }
            })
            .buffer_unordered(self.upload_concurrency)
            .try_collect::<Vec<_>>()
            .await;
        let mut parts = match uploads {
            Ok(p) => p,
            Err(e) => {
                // Best effort: a failed abort leaves parts the bucket's lifecycle rules reclaim.
                let _ = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                return Err(e);
            }
        };
        parts.sort_by_key(|p| p.part_number());
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| unavailable("completing multipart upload of", key, e))?;
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix.trim_matches('/'))
    }

    fn key(&self, digest: &Digest) -> String {
        object_key(&self.prefix, digest)
    }

    async fn put(&self, digest: &Digest, body: SpoolBody, size: u64) -> Result<(), StoreError> {
        let key = self.key(digest);
        // The spool file must outlive the request that streams from it.
        let (stream, _spool) = match body {
            // Bodies kept in memory are far below any part size: one request.
            SpoolBody::Memory(bytes) => (ByteStream::from(bytes), None),
            SpoolBody::File(spool) if size >= self.multipart_threshold => {
                return self.put_multipart(&key, spool.path(), size).await;
            }
            SpoolBody::File(spool) => {
                let stream = ByteStream::from_path(spool.path())
                    .await
                    .map_err(|e| StoreError::io("reading spool for", &key, io::Error::other(e)))?;
                (stream, Some(spool))
            }
        };
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_length(size as i64)
            .body(stream)
            .send()
            .await
            .map_err(|e| unavailable("storing", &key, e))?;
        Ok(())
    }

    async fn get(&self, digest: &Digest) -> Result<ObjectStream, StoreError> {
        let key = self.key(digest);
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                return Err(StoreError::NotFound { key });
            }
            Err(e) => return Err(unavailable("reading", &key, e)),
        };
        let body = out.body;
        let stream = futures::stream::unfold(body, |mut body| async move {
            body.next()
                .await
                .map(|r| (r.map_err(io::Error::other), body))
        });
        Ok(Box::pin(stream))
    }

    async fn head(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let key = self.key(digest);
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(out.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(unavailable("inspecting", &key, e)),
        }
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StoreError> {
        let key = self.key(digest);
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| unavailable("deleting", &key, e))?;
        Ok(())
    }

    async fn list(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<ObjectEntry>, StoreError> {
        let prefix = self.prefix.trim_matches('/');
        let list_prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
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

    async fn delete_many(&self, digests: &[Digest]) -> Result<Vec<(Digest, String)>, StoreError> {
        let mut failed = Vec::new();
        for chunk in digests.chunks(1000) {
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
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| unavailable("deleting objects in", &self.bucket, e))?;
            for err in out.errors() {
                let key = err.key().unwrap_or_default();
                if let Some(d) = digest_of_key(&self.prefix, key) {
                    failed.push((d, err.message().unwrap_or("delete failed").to_owned()));
                }
            }
        }
        Ok(failed)
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| unavailable("checking bucket", &self.bucket, e))?;
        Ok(())
    }
}
