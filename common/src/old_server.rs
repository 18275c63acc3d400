//! A client of a running Filetracker v2 server (the Python `filetracker-server`): its listing,
//! its files imported one by one, and, during a live migration, the writes forwarded to it so
//! that it can be switched back to. The migrator reads through it, and so does the API's
//! fallback.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::blob::{Encoding, Hints, IngestOptions};
use crate::filestore::{FileStore, FileStoreError};
use crate::meta::{PutKind, PutOutcome};
use crate::protocol::{self, FilePath, Version};

use crate::throttle::Throttle;

/// Why talking to the old server failed.
#[derive(Debug, thiserror::Error)]
pub enum OldServerError {
    #[error("old server: {method} {url}: {source}")]
    Request {
        method: &'static str,
        url: String,
        source: reqwest::Error,
    },
    #[error("old server: {method} {url} answered {status}")]
    Status {
        method: &'static str,
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("old server: {url}: {why}")]
    Protocol { url: String, why: String },
    #[error("importing from the old server: {0}")]
    Store(#[from] FileStoreError),
    #[error("old server {url}: cannot make an HTTP client: {source}")]
    Client { url: String, source: reqwest::Error },
}

/// What importing one path did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Imported {
    /// Stored here at the old server's version; `bytes` uncompressed.
    Stored { version: Version, bytes: u64 },
    /// The old server has no such file.
    Missing,
    /// Ours is at least as new; nothing was downloaded (or nothing changed).
    Present,
    /// Deleted here at or after the old server's version: it stays deleted.
    Deleted,
}

/// What the old server's HEAD of a file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OldHead {
    pub version: Version,
    /// `Logical-Size`: the content's length.
    pub logical_size: Option<u64>,
    /// `Content-Length` of the gzip it would send.
    pub stored_size: Option<u64>,
}

/// The old server's root URL and an HTTP client for it.
#[derive(Debug, Clone)]
pub struct OldServer {
    base: String,
    http: reqwest::Client,
}

const SAFE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

impl OldServer {
    /// `base` is `http://HOST:PORT` without a trailing slash; `timeout` bounds connecting and
    /// each stall while reading.
    pub fn new(base: &str, timeout: Duration) -> Result<OldServer, OldServerError> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .read_timeout(timeout)
            .build()
            .map_err(|source| OldServerError::Client {
                url: base.to_owned(),
                source,
            })?;
        Ok(OldServer {
            base: base.trim_end_matches('/').to_owned(),
            http,
        })
    }

    /// The root URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn file_url(&self, path: &FilePath) -> String {
        format!(
            "{}/files{}",
            self.base,
            percent_encoding::utf8_percent_encode(path.as_str(), SAFE)
        )
    }

    async fn send(
        &self, method: &'static str, url: &str, req: reqwest::RequestBuilder,
    ) -> Result<Option<reqwest::Response>, OldServerError> {
        let r = req.send().await.map_err(|source| OldServerError::Request {
            method,
            url: url.to_owned(),
            source,
        })?;
        match r.status() {
            s if s.is_success() => Ok(Some(r)),
            reqwest::StatusCode::NOT_FOUND => Ok(None),
            status => Err(OldServerError::Status {
                method,
                url: url.to_owned(),
                status,
            }),
        }
    }

    /// The old server's HEAD of `path`, without downloading it; `None` if it has no such file.
    pub async fn head(&self, path: &FilePath) -> Result<Option<OldHead>, OldServerError> {
        let url = self.file_url(path);
        let Some(r) = self.send("HEAD", &url, self.http.head(&url)).await? else {
            return Ok(None);
        };
        let number = |name: &str| {
            let v = r.headers().get(name)?.to_str().ok()?;
            v.trim().parse().ok()
        };
        Ok(Some(OldHead {
            version: version_of(&url, &r)?,
            logical_size: number(protocol::HEADER_LOGICAL_SIZE),
            stored_size: number(reqwest::header::CONTENT_LENGTH.as_str()),
        }))
    }

    /// The old server's listing of the directory `prefix` (`/a/b/`) up to `cutoff`: names
    /// relative to it, decoded. A directory it does not have lists nothing.
    pub async fn list_dir(
        &self, prefix: &str, cutoff: Version,
    ) -> Result<Vec<String>, OldServerError> {
        let cutoff = protocol::format_version(cutoff);
        let url = format!(
            "{}/list{}?last_modified={}",
            self.base,
            percent_encoding::utf8_percent_encode(prefix, SAFE),
            percent_encoding::utf8_percent_encode(&cutoff, percent_encoding::NON_ALPHANUMERIC)
        );
        let r = match self.send("GET", &url, self.http.get(&url)).await {
            Ok(Some(r)) => r,
            // filetracker-server answers 400 for a directory it does not have.
            Ok(None)
            | Err(OldServerError::Status {
                status: reqwest::StatusCode::BAD_REQUEST,
                ..
            }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let body = r.bytes().await.map_err(|e| OldServerError::Protocol {
            url: url.clone(),
            why: format!("listing cut off: {e}"),
        })?;
        Ok(body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| protocol::decode_v2_name(&String::from_utf8_lossy(l)))
            .collect())
    }

    /// Brings `path` over unless ours (`stored`) is at least as new or it was deleted here
    /// since. Asks with HEAD first when there is something to compare with, so a skip costs
    /// no download.
    pub async fn import(
        &self, fs: &Arc<FileStore>, path: &FilePath, opts: IngestOptions,
        throttle: Option<&Throttle>, dry_run: bool, now: i64,
    ) -> Result<Imported, OldServerError> {
        let url = self.file_url(path);
        let stored = fs.stat(path.as_str()).await?.map(|e| e.version);
        let deleted = match stored {
            Some(_) => None,
            None => fs.deleted_version(path.as_str()).await?,
        };
        let newest_here = stored.max(deleted);
        if newest_here.is_some() || dry_run {
            let Some(head) = self.send("HEAD", &url, self.http.head(&url)).await? else {
                return Ok(Imported::Missing);
            };
            let version = version_of(&url, &head)?;
            if newest_here.is_some_and(|v| v >= version) {
                return Ok(if stored.is_some() {
                    Imported::Present
                } else {
                    Imported::Deleted
                });
            }
            if dry_run {
                return Ok(Imported::Stored { version, bytes: 0 });
            }
        }
        let Some(r) = self.send("GET", &url, self.http.get(&url)).await? else {
            return Ok(Imported::Missing);
        };
        let version = version_of(&url, &r)?;
        let gzip = r
            .headers()
            .get(reqwest::header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        let logical_size = r
            .headers()
            .get(protocol::HEADER_LOGICAL_SIZE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let (encoding, hints) = if gzip {
            let hints = Hints {
                sha256: None,
                logical_size,
            };
            (Encoding::Gzip, hints)
        } else {
            (Encoding::Identity, Hints::default())
        };
        let body = r.bytes_stream().then(|chunk| async move {
            if let (Ok(c), Some(t)) = (&chunk, throttle) {
                tokio::time::sleep(t.delay(c.len())).await;
            }
            chunk
        });
        let spooled = fs
            .spool_stream(Box::pin(body), encoding, hints, opts)
            .await
            .map_err(|e| match e {
                // What the old server sent is bad (broken gzip, wrong size): its fault.
                FileStoreError::Blob(b) if b.is_client_error() => OldServerError::Protocol {
                    url: url.clone(),
                    why: b.to_string(),
                },
                other => OldServerError::Store(other),
            })?;
        let bytes = spooled.info.logical_size;
        Ok(
            match fs
                .commit(path.as_str(), version, spooled, now, PutKind::Import)
                .await?
                .outcome
            {
                PutOutcome::Stored { version } => Imported::Stored { version, bytes },
                PutOutcome::Newer { .. } => Imported::Present,
                PutOutcome::Deleted { .. } => Imported::Deleted,
            },
        )
    }

    /// Sends the file as stored here to the old server (gzip with its digest and size, as the
    /// real client does).
    pub async fn forward_put(&self, fs: &FileStore, path: &FilePath) -> Result<(), OldServerError> {
        let url = self.file_url(path);
        let Some(opened) = fs.open(path.as_str()).await? else {
            // Replaced and deleted meanwhile; the DELETE is forwarded on its own.
            return Ok(());
        };
        let e = &opened.entry;
        let req = self
            .http
            .put(&url)
            .query(&[(
                protocol::PARAM_LAST_MODIFIED,
                protocol::format_version(e.version),
            )])
            .header(reqwest::header::CONTENT_ENCODING, "gzip")
            .header(reqwest::header::CONTENT_LENGTH, e.blob.stored_size)
            .header(protocol::HEADER_SHA256, e.blob.digest.to_hex())
            .header(protocol::HEADER_LOGICAL_SIZE, e.blob.logical_size)
            .body(reqwest::Body::wrap_stream(opened.body));
        match self.send("PUT", &url, req).await? {
            Some(_) => Ok(()),
            None => Err(OldServerError::Status {
                method: "PUT",
                url,
                status: reqwest::StatusCode::NOT_FOUND,
            }),
        }
    }

    /// Deletes the file on the old server too; its absence there is fine.
    pub async fn forward_delete(
        &self, path: &FilePath, version: Version,
    ) -> Result<(), OldServerError> {
        let url = self.file_url(path);
        let req = self.http.delete(&url).query(&[(
            protocol::PARAM_LAST_MODIFIED,
            protocol::format_version(version),
        )]);
        self.send("DELETE", &url, req).await.map(drop)
    }

    /// Every name `GET /list/` gives (the old server lists its on-disk names, double-encoded
    /// like its links, which this decodes), sent one by one as they arrive, so memory stays
    /// flat; a failed or cut-off listing is sent as its error, last.
    pub async fn list(&self, tx: tokio::sync::mpsc::Sender<Result<String, OldServerError>>) {
        // Without a cutoff the listing stops at the server's "now", and a file versioned ahead
        // of its clock would never be imported: ask for everything up to the last version.
        let cutoff = protocol::format_version(protocol::MAX_VERSION);
        let url = format!(
            "{}/list/?last_modified={}",
            self.base,
            percent_encoding::utf8_percent_encode(&cutoff, percent_encoding::NON_ALPHANUMERIC)
        );
        let protocol_error = |why: String| OldServerError::Protocol {
            url: url.clone(),
            why,
        };
        let r = match self.send("GET", &url, self.http.get(&url)).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                let _ = tx.send(Err(protocol_error("listing: 404".into()))).await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let mut body = r.bytes_stream();
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let chunk = match body.next().await {
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    let why = format!("listing cut off: {e}");
                    let _ = tx.send(Err(protocol_error(why))).await;
                    return;
                }
                None => break,
            };
            pending.extend_from_slice(&chunk);
            while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                let line =
                    protocol::decode_v2_name(&String::from_utf8_lossy(&line[..line.len() - 1]));
                if !line.is_empty() && tx.send(Ok(line)).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn version_of(url: &str, r: &reqwest::Response) -> Result<Version, OldServerError> {
    let h = r
        .headers()
        .get(reqwest::header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| OldServerError::Protocol {
            url: url.to_owned(),
            why: "no Last-Modified header".into(),
        })?;
    protocol::parse_version(h).map_err(|e| OldServerError::Protocol {
        url: url.to_owned(),
        why: e.to_string(),
    })
}
