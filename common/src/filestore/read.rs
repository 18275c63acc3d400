//! Reading a file: its row, then the content it keeps or the object it describes, by the size
//! it records.

use std::time::Duration;

use crate::blob::Digest;
use crate::meta::FileEntry;
use crate::store::{ObjectStream, StoreError};

use super::{FileStore, FileStoreError};

/// Times a read looks again for the object its row describes (with backoff from 100 ms,
/// about 3 s in all), when the object is of another size under an unchanged row.
const OPEN_ATTEMPTS: u32 = 5;
/// A file opened for reading.
pub struct Opened {
    pub entry: FileEntry,
    pub body: ObjectStream,
}

impl FileStore {
    /// Opens a file for streaming. Between reading the row and opening the object, an
    /// overwrite and the cleaner can remove the object, and a PUT can store the same content
    /// again as other gzip bytes. Then the row is read again; under an unchanged row, an object
    /// of another size may be a second upload of the same content between storing it and
    /// committing (only after a lost lock), so the read waits a little for that commit. An
    /// object is only ever sent under the length its row records: a damaged or foreign object
    /// is an error, not a 200 with other bytes.
    pub async fn open(&self, path: &str) -> Result<Option<Opened>, FileStoreError> {
        let mut attempt = 0;
        loop {
            let Some(entry) = self.meta.get_file(path).await? else {
                return Ok(None);
            };
            if let Some(content) = entry.inline.clone() {
                let body = crate::store::stream_of(content);
                return Ok(Some(Opened { entry, body }));
            }
            let blob = entry.blob;
            let failed = match self.store.get_stored(&blob.digest, blob.stored_size).await {
                Ok(body) => {
                    let body = self.first_bytes(&blob.digest, body).await?;
                    return Ok(Some(Opened { entry, body }));
                }
                Err(e @ (StoreError::NotFound { .. } | StoreError::Changed { .. })) => e,
                Err(e) => return Err(e.into()),
            };
            attempt += 1;
            let unchanged = self.meta.get_file(path).await?.map(|e| e.blob) == Some(blob);
            match failed {
                _ if !unchanged && attempt <= OPEN_ATTEMPTS => continue,
                StoreError::Changed { .. } if attempt <= OPEN_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
                StoreError::NotFound { .. } => {
                    return Err(FileStoreError::ObjectMissing {
                        path: path.to_owned(),
                        digest: blob.digest,
                    });
                }
                e => {
                    tracing::warn!(path, digest = %blob.digest, error = %e,
                        "the object does not have the size its row records, and kept not having \
                         it: damaged, or replaced behind s3dedup's back (s3dedup-cleaner \
                         --verify --deep lists such objects)");
                    return Err(e.into());
                }
            }
        }
    }

    /// Waits for the object's first bytes, so that a read failing at once (S3's connection cut
    /// right after its headers) becomes an error answer. An HTTP server sends a response's
    /// headers with its first body bytes: after a 200 whose body fails at once, the client
    /// would see the connection close without any answer.
    async fn first_bytes(
        &self, digest: &Digest, mut body: ObjectStream,
    ) -> Result<ObjectStream, FileStoreError> {
        use futures::StreamExt;
        match body.next().await {
            None => Ok(body),
            Some(Ok(first)) => Ok(Box::pin(
                futures::stream::once(futures::future::ready(Ok(first))).chain(body),
            )),
            Some(Err(e)) => Err(StoreError::Unavailable {
                op: "reading",
                key: self.store.key(digest),
                message: e.to_string(),
            }
            .into()),
        }
    }
}
