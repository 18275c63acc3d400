//! An upload's way in: its body verified (SHA-256, gzip, hints) and spooled off the runtime,
//! and, for large new content, sent on to the object store while it still arrives.

use std::io;
use std::sync::Arc;

use crate::blob::{
    BlobError, BlobInfo, Digest, Encoding, Hints, IngestOptions, ingest, ingest_counted,
};
use crate::gunzip::GzDecoder;
use crate::spool::{SpoolBody, SpoolFeed, SpoolWriter};
use crate::store::{EarlyUpload, Incoming, PendingUpload};

use super::{FileStore, FileStoreError};

/// A verified body waiting in the spool, ready to be committed.
pub struct Spooled {
    pub body: SpoolBody,
    pub info: BlobInfo,
    /// The object already on its way to the store, if it was sent on while it arrived.
    pub early: Option<Box<dyn PendingUpload>>,
    /// The stored bytes are not the body as received (its gzip members made one): what was
    /// sent on while it arrived is not them.
    pub reencoded: bool,
}

impl std::fmt::Debug for Spooled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spooled")
            .field("body", &self.body)
            .field("info", &self.info)
            .field("early", &self.early.is_some())
            .finish()
    }
}

/// Uploads smaller than this gain too little from being sent on while they arrive to be worth
/// a database lookup and a second request.
const SEND_ON_MIN: u64 = 1 << 20;

/// An upload being verified and spooled off the runtime (from [`FileStore::start_ingest`]),
/// perhaps sent on to the store meanwhile. Dropped unfinished, what was sent is discarded.
pub struct Ingesting {
    task: tokio::task::JoinHandle<Result<Spooled, FileStoreError>>,
    /// The claimed digest, and the upload sent on under it.
    early: Option<(Digest, Box<dyn PendingUpload>)>,
}

impl Ingesting {
    /// Waits for the ingest (its body sender must be dropped by now) and joins what was sent on
    /// to it: only content that proved to be the digest it was sent under.
    pub async fn finish(self) -> Result<Spooled, FileStoreError> {
        let mut spooled = self
            .task
            .await
            .map_err(|e| FileStoreError::IngestTask(e.to_string()))??;
        if let Some((claimed, early)) = self.early
            && claimed == spooled.info.digest
            && !spooled.reencoded
        {
            spooled.early = Some(early);
        }
        Ok(spooled)
    }
}

impl FileStore {
    /// Reads a body (blocking) into memory or a new spool file, verifying it. Run off the async
    /// runtime.
    pub fn spool_blocking<R: io::Read>(
        &self, body: R, encoding: Encoding, hints: &Hints, opts: &IngestOptions,
    ) -> Result<Spooled, FileStoreError> {
        self.spool_blocking_with(body, encoding, hints, opts, None)
    }

    /// [`FileStore::spool_blocking`], with `feed` seeing the spool as it is written.
    fn spool_blocking_with<R: io::Read>(
        &self, body: R, encoding: Encoding, hints: &Hints, opts: &IngestOptions,
        feed: Option<Box<dyn SpoolFeed>>,
    ) -> Result<Spooled, FileStoreError> {
        let mut writer = SpoolWriter::new(&self.spool_dir, self.spool_memory);
        if let Some(feed) = feed {
            writer = writer.feeding(feed);
        }
        let (info, members) = ingest_counted(body, encoding, &mut writer, hints, opts)?;
        let spool_error = |e| FileStoreError::Blob(BlobError::Spool(e));
        let body = writer.finish().map_err(spool_error)?;
        if members == 1 {
            return Ok(Spooled {
                body,
                info,
                early: None,
                reencoded: false,
            });
        }
        // One member per object: clients that read only the first (curl --compressed) would
        // get the content cut short. Rare, so a second pass over the spool.
        let mut again = SpoolWriter::new(&self.spool_dir, self.spool_memory);
        let stored = body.read_back().map_err(spool_error)?;
        let info = ingest(
            GzDecoder::new(stored),
            Encoding::Identity,
            &mut again,
            hints,
            opts,
        )?;
        Ok(Spooled {
            body: again.finish().map_err(spool_error)?,
            info,
            early: None,
            reencoded: true,
        })
    }

    /// Asks the store to take an upload on while it still arrives, for large new content whose
    /// digest the client claimed. The object becomes visible only at commit, under the blob's
    /// lock, and only if the content matched the claim.
    async fn early_upload(
        &self, hints: &Hints, encoding: Encoding, body_len: Option<u64>,
    ) -> Option<(Digest, EarlyUpload)> {
        let digest = hints.sha256?;
        if body_len.is_some_and(|n| n < SEND_ON_MIN) {
            return None;
        }
        // Only a saving: when the database cannot answer, the commit will say so.
        if !matches!(self.meta.blob_is_live(&digest).await, Ok(false)) {
            return None;
        }
        let incoming = Incoming {
            stored: body_len.filter(|_| encoding == Encoding::Gzip),
            at_most: body_len,
        };
        Some((digest, self.store.early_upload(&digest, incoming)?))
    }

    /// Starts verifying and spooling an upload on a blocking task, sending it on to the store
    /// meanwhile where the store takes it. Feed the body to the sender (at most `queue` chunks
    /// ahead), drop it, then [`Ingesting::finish`].
    pub async fn start_ingest(
        self: &Arc<Self>, encoding: Encoding, hints: Hints, opts: IngestOptions,
        body_len: Option<u64>, queue: usize,
    ) -> (tokio::sync::mpsc::Sender<crate::blob::Chunk>, Ingesting) {
        let (tx, rx) = tokio::sync::mpsc::channel(queue);
        let (feed, early) = match self.early_upload(&hints, encoding, body_len).await {
            Some((digest, e)) => (Some(e.feed), Some((digest, e.upload))),
            None => (None, None),
        };
        let fs = self.clone();
        let task = tokio::task::spawn_blocking(move || {
            let body = crate::blob::ChannelReader::new(rx);
            fs.spool_blocking_with(body, encoding, &hints, &opts, feed)
        });
        (tx, Ingesting { task, early })
    }

    /// Spools an async byte stream (an HTTP body), verifying it, with the ingest off the runtime.
    pub async fn spool_stream<S, E>(
        self: &Arc<Self>, body: S, encoding: Encoding, hints: Hints, opts: IngestOptions,
    ) -> Result<Spooled, FileStoreError>
    where
        S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let (tx, ingesting) = self.start_ingest(encoding, hints, opts, None, 16).await;
        // If the ingest stops early, its error says why.
        crate::blob::feed(body, &tx).await;
        drop(tx);
        ingesting.finish().await
    }
}
