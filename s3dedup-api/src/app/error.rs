//! Error answers: a status, and a one-line message in the body and the `X-Exception` header
//! (which the Filetracker client copies into its exception).

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use s3dedup_common::blob::BlobError;
use s3dedup_common::filestore::FileStoreError;
use s3dedup_common::meta::MetaError;
use s3dedup_common::old_server::OldServerError;
use s3dedup_common::protocol::{self, FilePath, ProtocolError};
use s3dedup_common::store::StoreError;

/// An error answer: the message goes in a `text/plain` body and the `X-Exception` header.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) message: String,
    /// The part of the system that failed, when it is not the request.
    pub(super) failing: Option<Failing>,
}

/// Which part of the system an error answer comes from (`s3dedup_backend_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failing {
    Database,
    ObjectStore,
    Lock,
    /// The spool (the local disk uploads wait on) or the upload's verification task.
    Spool,
    OldServer,
}

impl Failing {
    pub fn label(self) -> &'static str {
        match self {
            Failing::Database => "database",
            Failing::ObjectStore => "object_store",
            Failing::Lock => "lock",
            Failing::Spool => "spool",
            Failing::OldServer => "old_server",
        }
    }
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            failing: None,
        }
    }

    fn of(failing: Option<Failing>, status: StatusCode, message: String) -> Self {
        ApiError {
            failing,
            ..ApiError::new(status, message)
        }
    }
}

impl ApiError {
    /// The answer's header fields and body, as every error answer has them.
    pub(crate) fn parts(&self) -> (HeaderMap, String) {
        // Header values cannot hold newlines or non-visible bytes; keep the header readable.
        let header_text: String = self
            .message
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .take(1000)
            .collect();
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Ok(v) = HeaderValue::from_str(&header_text) {
            h.insert(protocol::HEADER_EXCEPTION, v);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"s3dedup\", charset=\"UTF-8\""),
            );
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        }
        (h, format!("{}\n", self.message))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (headers, body) = self.parts();
        (self.status, headers, body).into_response()
    }
}

impl From<ProtocolError> for ApiError {
    fn from(e: ProtocolError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
    }
}

impl From<FileStoreError> for ApiError {
    fn from(e: FileStoreError) -> Self {
        let status = match &e {
            FileStoreError::Meta(MetaError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            FileStoreError::Meta(_) => StatusCode::INTERNAL_SERVER_ERROR,
            FileStoreError::Store(StoreError::Unavailable { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            FileStoreError::Store(StoreError::Full { .. }) => StatusCode::INSUFFICIENT_STORAGE,
            FileStoreError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            FileStoreError::Lock(_) | FileStoreError::Changed { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            FileStoreError::Blob(BlobError::TooLarge(_) | BlobError::GzipBomb(_)) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            _ if e.is_out_of_space() => StatusCode::INSUFFICIENT_STORAGE,
            FileStoreError::Blob(b) if b.is_client_error() => StatusCode::BAD_REQUEST,
            FileStoreError::Blob(_) | FileStoreError::Spool { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            FileStoreError::Config(_)
            | FileStoreError::ObjectMissing { .. }
            | FileStoreError::IngestTask(_)
            | FileStoreError::EmptyMetadata => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let failing = match &e {
            FileStoreError::Meta(_) | FileStoreError::EmptyMetadata => Some(Failing::Database),
            FileStoreError::Store(_) | FileStoreError::ObjectMissing { .. } => {
                Some(Failing::ObjectStore)
            }
            FileStoreError::Lock(_) | FileStoreError::Changed { .. } => Some(Failing::Lock),
            FileStoreError::Blob(b) if b.is_client_error() => None,
            FileStoreError::Blob(BlobError::TooLarge(_) | BlobError::GzipBomb(_)) => None,
            FileStoreError::Blob(_)
            | FileStoreError::Spool { .. }
            | FileStoreError::IngestTask(_)
            | FileStoreError::Config(_) => Some(Failing::Spool),
        };
        ApiError::of(failing, status, e.to_string())
    }
}

impl From<OldServerError> for ApiError {
    fn from(e: OldServerError) -> Self {
        match e {
            OldServerError::Store(e) => e.into(),
            other => ApiError::of(
                Some(Failing::OldServer),
                StatusCode::BAD_GATEWAY,
                other.to_string(),
            ),
        }
    }
}

pub(super) type ApiResult = Result<Response, ApiError>;

pub(super) fn not_found(path: &FilePath) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("file {path} not found"))
}
