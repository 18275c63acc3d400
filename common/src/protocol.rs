//! The Filetracker protocol v2 as clients speak it: routes, file paths, versions on the wire and
//! header names. Everything here is pure parsing; docs/protocol.md states the rules.

use chrono::{DateTime, Utc};
use percent_encoding::percent_decode_str;

/// Header with the hex SHA-256 of the uncompressed content (a hint from the client, verified).
pub const HEADER_SHA256: &str = "sha256-checksum";
/// Header with the uncompressed length (a hint on PUT, the exact size on GET/HEAD).
pub const HEADER_LOGICAL_SIZE: &str = "logical-size";
/// Header the Filetracker client copies into its exception text.
pub const HEADER_EXCEPTION: &str = "x-exception";
/// Query parameter carrying a request's version.
pub const PARAM_LAST_MODIFIED: &str = "last_modified";

/// Default limit on a file path's length in bytes (Linux `PATH_MAX`).
pub const DEFAULT_MAX_PATH_LEN: usize = 4096;

/// A request that could not be understood. Each maps to a 400 with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("unknown endpoint {0:?}")]
    UnknownEndpoint(String),
    #[error("path is not valid percent-encoded UTF-8 (a % must start a %XX escape)")]
    BadEncoding,
    #[error("path component {0:?} is not allowed")]
    ForbiddenComponent(String),
    /// A newline in a path would print as two paths in a listing, which is line-based.
    #[error("path contains the control character {0:?}: paths may not")]
    ControlCharacter(char),
    #[error("no file path given")]
    EmptyPath,
    #[error("path is longer than {0} bytes")]
    PathTooLong(usize),
    #[error("missing query parameter last_modified")]
    MissingVersion,
    #[error(
        "invalid date {0:?}: expected an RFC 2822 date between 1970 and 9999 such as 'Sun, 06 Nov 1994 08:49:37 GMT'"
    )]
    BadDate(String),
    #[error("invalid query string: {0}")]
    BadQuery(String),
}

/// What a request addresses, after the double-slash rule and the optional `/ft` prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/version`: protocol negotiation.
    Version,
    /// `/status`: liveness probe used by sioworkers.
    Status,
    /// `/health`: our readiness check of database and object store.
    Health,
    /// `/metrics`: Prometheus text.
    Metrics,
    /// `/files/<path>`.
    File(FilePath),
    /// `/list/<dir>`; `None` lists everything.
    List(Option<FilePath>),
}

/// A normalized Filetracker path: starts with `/`, components are non-empty, never `.` or `..`,
/// no NUL, no trailing slash.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FilePath(String);

impl FilePath {
    /// Builds a path from `/`-separated components, rejecting dangerous ones.
    pub fn from_components<'a>(
        comps: impl IntoIterator<Item = &'a str>, max_len: usize,
    ) -> Result<Self, ProtocolError> {
        let mut s = String::new();
        for c in comps {
            check_component(c)?;
            s.push('/');
            s.push_str(c);
        }
        if s.is_empty() {
            return Err(ProtocolError::EmptyPath);
        }
        if s.len() > max_len {
            return Err(ProtocolError::PathTooLong(max_len));
        }
        Ok(FilePath(s))
    }

    /// Parses an already-decoded path such as `/a/b.txt` (empty components are skipped).
    pub fn parse(path: &str, max_len: usize) -> Result<Self, ProtocolError> {
        Self::from_components(path.split('/').filter(|c| !c.is_empty()), max_len)
    }

    /// The path with its leading slash, e.g. `/a/b.txt`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The prefix every path strictly below this one as a directory starts with.
    pub fn dir_prefix(&self) -> String {
        format!("{}/", self.0)
    }
}

impl std::fmt::Display for FilePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn check_component(c: &str) -> Result<(), ProtocolError> {
    if c.is_empty() {
        return Err(ProtocolError::EmptyPath);
    }
    if c == ".." || c == "." {
        return Err(ProtocolError::ForbiddenComponent(c.to_owned()));
    }
    control_free(c)
}

fn control_free(s: &str) -> Result<(), ProtocolError> {
    match s.chars().find(|c| c.is_control()) {
        Some(c) => Err(ProtocolError::ControlCharacter(c)),
        None => Ok(()),
    }
}

impl Route {
    /// Parses the raw (percent-encoded) path of a request URI.
    pub fn parse(raw_path: &str, max_path_len: usize) -> Result<Route, ProtocolError> {
        if !well_escaped(raw_path) {
            return Err(ProtocolError::BadEncoding);
        }
        let decoded = percent_decode_str(raw_path)
            .decode_utf8()
            .map_err(|_| ProtocolError::BadEncoding)?;
        control_free(&decoded)?;
        let mut path: &str = &decoded;
        // One trailing slash is ignored (`/version/`, `/list/`).
        if path.len() > 1 {
            path = path.strip_suffix('/').unwrap_or(path);
        }
        let comps: Vec<&str> = path.split('/').collect();
        // A FILETRACKER_URL with a trailing slash yields `//files/x`: everything up to and
        // including the last empty component is dropped.
        let start = comps
            .iter()
            .rposition(|c| c.is_empty())
            .map_or(0, |i| i + 1);
        let mut rest = &comps[start..];
        // Upstream s3dedup serves under `/ft`; accept both.
        if rest.len() > 1 && rest[0] == "ft" {
            rest = &rest[1..];
        }
        let unknown = || ProtocolError::UnknownEndpoint(decoded.to_string());
        let (head, tail) = rest.split_first().ok_or_else(unknown)?;
        match (*head, tail.is_empty()) {
            ("version", true) => Ok(Route::Version),
            ("status", true) => Ok(Route::Status),
            ("health", true) => Ok(Route::Health),
            ("metrics", true) => Ok(Route::Metrics),
            ("files", false) => Ok(Route::File(FilePath::from_components(
                tail.iter().copied(),
                max_path_len,
            )?)),
            ("files", true) => Err(ProtocolError::EmptyPath),
            ("list", true) => Ok(Route::List(None)),
            ("list", false) => Ok(Route::List(Some(FilePath::from_components(
                tail.iter().copied(),
                max_path_len,
            )?))),
            _ => Err(unknown()),
        }
    }
}

/// A file version: whole seconds since the Unix epoch.
pub type Version = i64;

/// The last second of year 9999: later dates are refused.
pub const MAX_VERSION: Version = 253_402_300_799;

/// Parses an RFC 2822 date as clients send it (`GMT`, `-0000`, `+hhmm` zones) into a version.
pub fn parse_version(value: &str) -> Result<Version, ProtocolError> {
    let v = value.trim();
    let bad = || ProtocolError::BadDate(value.to_owned());
    if v.is_empty() {
        return Err(bad());
    }
    let parsed = DateTime::parse_from_rfc2822(v).ok().or_else(|| {
        // chrono rejects a few zone spellings Python's email.utils produces or accepts.
        [(" UTC", " +0000"), (" Z", " +0000"), (" -0000", " +0000")]
            .iter()
            .find_map(|(suffix, repl)| {
                let head = v.strip_suffix(suffix)?;
                DateTime::parse_from_rfc2822(&format!("{head}{repl}")).ok()
            })
    });
    // A version past year 9999 would outrank every later upload of the path for good.
    match parsed.map(|dt| dt.timestamp()) {
        Some(t) if (0..=MAX_VERSION).contains(&t) => Ok(t),
        _ => Err(bad()),
    }
}

/// Formats a version as the RFC 2822 date clients expect in `Last-Modified`.
pub fn format_version(version: Version) -> String {
    match DateTime::<Utc>::from_timestamp(version, 0) {
        Some(dt) => dt.format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
        // Out of chrono's range: cannot come from a parsed date; keep the header well-formed.
        None => "Thu, 01 Jan 1970 00:00:00 GMT".to_owned(),
    }
}

/// Finds a form-encoded query parameter (`+` is a space), percent-decoded.
pub fn query_param(query: Option<&str>, name: &str) -> Result<Option<String>, ProtocolError> {
    let Some(query) = query else { return Ok(None) };
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode_form(k)?;
        if key == name {
            return decode_form(v).map(Some);
        }
    }
    Ok(None)
}

/// True when every `%` starts a two-hex-digit escape. A stray `%` never comes from a client
/// that quotes its paths, and decoding it as itself would store a path nobody can name back.
fn well_escaped(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |j: usize| b.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    true
}

fn decode_form(s: &str) -> Result<String, ProtocolError> {
    if !well_escaped(s) {
        return Err(ProtocolError::BadQuery(format!(
            "{s:?} has a % not followed by two hex digits"
        )));
    }
    let spaced = s.replace('+', " ");
    percent_decode_str(&spaced)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| ProtocolError::BadQuery("not valid percent-encoded UTF-8".into()))
}

/// The version a request carries: `?last_modified=` or, the v1 way, a `Last-Modified` header.
pub fn request_version(
    query: Option<&str>, last_modified_header: Option<&str>,
) -> Result<Version, ProtocolError> {
    match query_param(query, PARAM_LAST_MODIFIED)? {
        Some(v) => parse_version(&v),
        None => match last_modified_header {
            Some(h) => parse_version(h),
            None => Err(ProtocolError::MissingVersion),
        },
    }
}

/// Undoes Filetracker v2's double encoding of non-ASCII names (UTF-8 bytes read as Latin-1 and
/// encoded as UTF-8 again); names that are not double-encoded come back unchanged.
pub fn decode_v2_name(name: &str) -> String {
    if name.is_ascii() {
        return name.to_owned();
    }
    let bytes: Option<Vec<u8>> = name
        .chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect();
    bytes
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_else(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn double_encoded_names_are_decoded() {
        let name = "zażółć/gęś.txt";
        let double: String = name.bytes().map(char::from).collect();
        assert_ne!(double, name);
        assert_eq!(decode_v2_name(&double), name);
        assert_eq!(decode_v2_name("plain/a b.txt"), "plain/a b.txt");
        // Not double-encoded (a char above U+00FF): unchanged.
        assert_eq!(decode_v2_name("✓.txt"), "✓.txt");
    }

    const MAX: usize = DEFAULT_MAX_PATH_LEN;

    fn file(p: &str) -> Route {
        Route::File(FilePath(p.to_owned()))
    }

    #[test]
    fn routes_at_root_and_under_ft() {
        assert_eq!(Route::parse("/version", MAX), Ok(Route::Version));
        assert_eq!(Route::parse("/version/", MAX), Ok(Route::Version));
        assert_eq!(Route::parse("/ft/version", MAX), Ok(Route::Version));
        assert_eq!(Route::parse("/status", MAX), Ok(Route::Status));
        assert_eq!(Route::parse("/files/a/b.txt", MAX), Ok(file("/a/b.txt")));
        assert_eq!(Route::parse("/ft/files/a/b.txt", MAX), Ok(file("/a/b.txt")));
        assert_eq!(Route::parse("/files/a/", MAX), Ok(file("/a")));
        assert_eq!(Route::parse("/list", MAX), Ok(Route::List(None)));
        assert_eq!(Route::parse("/list/", MAX), Ok(Route::List(None)));
        assert_eq!(
            Route::parse("/list/a/b/", MAX),
            Ok(Route::List(Some(FilePath("/a/b".into()))))
        );
        // A file may itself live under a directory called `ft` or `files`.
        assert_eq!(Route::parse("/files/ft/files", MAX), Ok(file("/ft/files")));
    }

    #[test]
    fn double_slash_drops_everything_before() {
        assert_eq!(Route::parse("//version/", MAX), Ok(Route::Version));
        assert_eq!(Route::parse("//files/x", MAX), Ok(file("/x")));
        assert_eq!(Route::parse("/ft//files/x", MAX), Ok(file("/x")));
        assert_eq!(Route::parse("/junk//list/", MAX), Ok(Route::List(None)));
    }

    #[test]
    fn percent_decoding_and_unicode() {
        assert_eq!(
            Route::parse("/files/dir/a%20b%C5%BC.txt", MAX),
            Ok(file("/dir/a bż.txt"))
        );
        assert_eq!(
            Route::parse("/files/%FF", MAX),
            Err(ProtocolError::BadEncoding)
        );
        for (raw, c) in [
            ("a%00b", '\0'),
            ("a%0Ab", '\n'),
            ("a%0D", '\r'),
            ("%7F", '\x7f'),
        ] {
            assert_eq!(
                Route::parse(&format!("/files/{raw}"), MAX),
                Err(ProtocolError::ControlCharacter(c))
            );
        }
        assert!(FilePath::parse("/a\tb", MAX).is_err());
    }

    #[test]
    fn rejects_dot_dot_unknown_and_empty() {
        assert!(matches!(
            Route::parse("/files/a/../b", MAX),
            Err(ProtocolError::ForbiddenComponent(_))
        ));
        assert!(matches!(
            Route::parse("/files/a/%2E%2E/b", MAX),
            Err(ProtocolError::ForbiddenComponent(_))
        ));
        assert!(matches!(
            Route::parse("/listC", MAX),
            Err(ProtocolError::UnknownEndpoint(_))
        ));
        assert!(matches!(
            Route::parse("/", MAX),
            Err(ProtocolError::UnknownEndpoint(_))
        ));
        assert!(matches!(
            Route::parse("/version/x", MAX),
            Err(ProtocolError::UnknownEndpoint(_))
        ));
        assert_eq!(Route::parse("/files", MAX), Err(ProtocolError::EmptyPath));
        assert_eq!(
            Route::parse("/files/aaaa", 4),
            Err(ProtocolError::PathTooLong(4))
        );
    }

    #[test]
    fn versions_round_trip_in_all_zone_spellings() {
        let v = 1_700_000_000;
        let s = format_version(v);
        assert_eq!(s, "Tue, 14 Nov 2023 22:13:20 GMT");
        assert_eq!(parse_version(&s), Ok(v));
        assert_eq!(parse_version("Tue, 14 Nov 2023 22:13:20 -0000"), Ok(v));
        assert_eq!(parse_version("Tue, 14 Nov 2023 22:13:20 +0000"), Ok(v));
        assert_eq!(parse_version("Tue, 14 Nov 2023 23:13:20 +0100"), Ok(v));
        assert_eq!(parse_version("Tue, 14 Nov 2023 22:13:20 UTC"), Ok(v));
        assert_eq!(parse_version("14 Nov 2023 22:13:20 GMT"), Ok(v));
        assert!(parse_version("yesterday").is_err());
        assert!(parse_version("").is_err());
        assert!(parse_version("Tue, 32 Nov 2023 22:13:20 GMT").is_err());
    }

    #[test]
    fn query_parsing_is_form_encoding() {
        let q = Some("x=1&last_modified=Tue%2C+14+Nov+2023+22%3A13%3A20+GMT");
        assert_eq!(
            request_version(q, None),
            Ok(1_700_000_000),
            "the client form-encodes: + is a space"
        );
        assert_eq!(
            request_version(None, Some("Tue, 14 Nov 2023 22:13:20 GMT")),
            Ok(1_700_000_000)
        );
        assert_eq!(
            request_version(Some("a=b"), None),
            Err(ProtocolError::MissingVersion)
        );
        assert!(matches!(
            request_version(Some("last_modified=garbage"), None),
            Err(ProtocolError::BadDate(_))
        ));
    }
}
