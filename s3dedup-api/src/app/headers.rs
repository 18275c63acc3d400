//! What requests and answers say in their headers: versions, encodings, hints, lengths.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use s3dedup_common::blob::{Encoding, Hints};
use s3dedup_common::meta::FileEntry;
use s3dedup_common::protocol;

use super::ApiError;

pub(super) fn header_str(
    headers: &HeaderMap, name: impl header::AsHeaderName,
) -> Result<Option<&str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "header is not visible ASCII")),
    }
}

pub(super) fn last_modified(version: protocol::Version) -> (header::HeaderName, HeaderValue) {
    let v = HeaderValue::from_str(&protocol::format_version(version))
        .unwrap_or_else(|_| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"));
    (header::LAST_MODIFIED, v)
}

/// Whether the client takes the stored gzip bytes. No `Accept-Encoding` means anything goes,
/// which is what the old server assumed for every client.
pub(super) fn accepts_gzip(headers: &HeaderMap) -> bool {
    let Some(v) = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
    else {
        return true;
    };
    let mut star = None;
    for item in v.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q_zero = parts.any(|p| {
            let p = p.trim();
            p.strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q == 0.0)
        });
        match coding.as_str() {
            "gzip" | "x-gzip" => return !q_zero,
            "*" => star = Some(!q_zero),
            _ => {}
        }
    }
    star.unwrap_or(false)
}

pub(super) fn file_headers(
    entry: &FileEntry, gzip: bool,
) -> [(header::HeaderName, HeaderValue); 4] {
    let blob = &entry.blob;
    headers_of(entry.version, blob.logical_size, blob.stored_size, gzip)
}

/// The headers of a file of `version` whose content is `logical` bytes and its gzip `stored`.
pub(super) fn headers_of(
    version: protocol::Version, logical: u64, stored: u64, gzip: bool,
) -> [(header::HeaderName, HeaderValue); 4] {
    let length = if gzip { stored } else { logical };
    [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        ),
        last_modified(version),
        (
            header::HeaderName::from_static(protocol::HEADER_LOGICAL_SIZE),
            HeaderValue::from(logical),
        ),
        (header::CONTENT_LENGTH, HeaderValue::from(length)),
    ]
}

pub(super) fn parse_hints(headers: &HeaderMap) -> Result<Hints, ApiError> {
    let sha256 = header_str(headers, protocol::HEADER_SHA256)?
        .map(|s| {
            s.parse().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("invalid SHA256-Checksum {s:?}"),
                )
            })
        })
        .transpose()?;
    let logical_size = header_str(headers, protocol::HEADER_LOGICAL_SIZE)?
        .map(|s| {
            s.trim().parse::<u64>().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("invalid Logical-Size {s:?}"),
                )
            })
        })
        .transpose()?;
    Ok(Hints {
        sha256,
        logical_size,
    })
}

pub(super) fn parse_encoding(headers: &HeaderMap) -> Result<Encoding, ApiError> {
    match header_str(headers, header::CONTENT_ENCODING)?.map(|s| s.trim().to_ascii_lowercase()) {
        None => Ok(Encoding::Identity),
        Some(e) if e.is_empty() || e == "identity" => Ok(Encoding::Identity),
        Some(e) if e == "gzip" || e == "x-gzip" => Ok(Encoding::Gzip),
        Some(e) => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("unsupported Content-Encoding {e:?}: send gzip or identity"),
        )),
    }
}

pub(super) fn request_version(
    req_query: Option<&str>, headers: &HeaderMap,
) -> Result<protocol::Version, ApiError> {
    let header = header_str(headers, header::LAST_MODIFIED)?;
    Ok(protocol::request_version(req_query, header)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(name: header::HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn gzip_unless_the_client_refuses_it() {
        let ae = |v| accepts_gzip(&with(header::ACCEPT_ENCODING, v));
        assert!(
            accepts_gzip(&HeaderMap::new()),
            "no Accept-Encoding: anything goes"
        );
        assert!(ae("gzip"));
        assert!(ae("deflate, x-gzip;q=0.5"));
        assert!(ae("*"));
        assert!(!ae("identity"));
        assert!(!ae("gzip;q=0"));
        assert!(!ae("gzip; q=0.0, identity"));
        assert!(!ae("*;q=0"));
        assert!(ae("br, *;q=0.1"));
        assert!(!ae("br"), "listed encodings, none of them gzip");
    }

    #[test]
    fn hints_and_encodings_are_checked() {
        let digest = "a".repeat(64);
        let h = parse_hints(&with(
            header::HeaderName::from_static("sha256-checksum"),
            &digest,
        ));
        assert!(h.unwrap().sha256.is_some());
        let bad = parse_hints(&with(
            header::HeaderName::from_static("sha256-checksum"),
            "abc",
        ));
        assert_eq!(bad.unwrap_err().status, StatusCode::BAD_REQUEST);
        let size = parse_hints(&with(
            header::HeaderName::from_static("logical-size"),
            " 42 ",
        ));
        assert_eq!(size.unwrap().logical_size, Some(42));
        let bad = parse_hints(&with(header::HeaderName::from_static("logical-size"), "-1"));
        assert_eq!(bad.unwrap_err().status, StatusCode::BAD_REQUEST);
        let enc = |v| parse_encoding(&with(header::CONTENT_ENCODING, v));
        assert_eq!(enc("GZIP").unwrap(), Encoding::Gzip);
        assert_eq!(enc("identity").unwrap(), Encoding::Identity);
        assert_eq!(
            enc("br").unwrap_err().status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert_eq!(
            parse_encoding(&HeaderMap::new()).unwrap(),
            Encoding::Identity
        );
    }

    #[test]
    fn lengths_say_what_is_sent() {
        use s3dedup_common::blob::{BlobInfo, Digest};
        let entry = FileEntry {
            path: "/a".into(),
            version: 1_700_000_000,
            blob: BlobInfo {
                digest: Digest([1; 32]),
                logical_size: 1000,
                stored_size: 300,
            },
            inline: None,
        };
        let length = |gzip| {
            let h = file_headers(&entry, gzip);
            let (_, v) = h.iter().find(|(n, _)| n == header::CONTENT_LENGTH).unwrap();
            v.to_str().unwrap().to_owned()
        };
        assert_eq!(length(true), "300", "the stored gzip");
        assert_eq!(length(false), "1000", "the content");
        let h = file_headers(&entry, true);
        let (_, lm) = h.iter().find(|(n, _)| n == header::LAST_MODIFIED).unwrap();
        assert_eq!(lm.to_str().unwrap(), "Tue, 14 Nov 2023 22:13:20 GMT");
    }
}
