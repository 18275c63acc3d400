//! Property tests over everything a request can put in front of the parsers: URL paths, dates and
//! bodies for the gzip/SHA-256 codec. Arbitrary input never panics, and what is accepted is safe
//! (no `..`, no NUL, bounded length) and round-trips exactly.

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use proptest::prelude::*;
use s3dedup_common::blob::{self, BlobError, Encoding, Hints, IngestOptions};
use s3dedup_common::protocol::{self, FilePath, Route};
use sha2::{Digest as _, Sha256};

const MAX_PATH: usize = 300;

const OPTS: IngestOptions = IngestOptions {
    level: 1,
    max_logical_size: 1 << 20,
    max_gzip_ratio: 0,
};

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::new(6));
    e.write_all(data).expect("gzip to memory");
    e.finish().expect("gzip to memory")
}

fn ingest(
    body: &[u8], encoding: Encoding, hints: &Hints,
) -> Result<(blob::BlobInfo, Vec<u8>), BlobError> {
    let mut out = Vec::new();
    let info = blob::ingest(body, encoding, &mut out, hints, &OPTS)?;
    Ok((info, out))
}

/// Raw request paths: mostly URL-ish bytes, with `%`, dots, slashes and NULs over-represented.
fn raw_path() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/".to_owned()),
        Just("..".to_owned()),
        Just(".".to_owned()),
        Just("%".to_owned()),
        Just("%2e".to_owned()),
        Just("%2F".to_owned()),
        Just("%00".to_owned()),
        Just("%ff".to_owned()),
        Just("files".to_owned()),
        Just("list".to_owned()),
        Just("ft".to_owned()),
        "[a-zA-Z0-9_ .-]{1,8}",
        any::<char>().prop_map(String::from),
    ];
    proptest::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

fn check_safe(p: &FilePath) {
    let s = p.as_str();
    assert!(s.starts_with('/'), "{s:?}");
    assert!(s.len() <= MAX_PATH, "{s:?}");
    assert!(!s.contains('\0'), "{s:?}");
    for c in s[1..].split('/') {
        assert!(!c.is_empty() && c != "." && c != "..", "{s:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn any_request_path_parses_to_a_safe_route_or_an_error(raw in raw_path()) {
        match Route::parse(&raw, MAX_PATH) {
            Ok(Route::File(p)) | Ok(Route::List(Some(p))) => check_safe(&p),
            Ok(_) => {}
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn any_bytes_as_path_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
        let s = String::from_utf8_lossy(&raw);
        let _ = Route::parse(&s, MAX_PATH);
        let _ = protocol::query_param(Some(&s), "last_modified");
    }

    #[test]
    fn encoded_paths_round_trip(comps in proptest::collection::vec("[^/\\p{Cc}]{1,12}", 1..6)) {
        prop_assume!(comps.iter().all(|c| c != "." && c != ".."));
        let raw: String = comps
            .iter()
            .map(|c| format!("/{}", utf8_percent_encode(c, NON_ALPHANUMERIC)))
            .collect();
        let route = Route::parse(&format!("/files{raw}"), 10_000).expect("valid path");
        let want = format!("/{}", comps.join("/"));
        prop_assert_eq!(route, Route::File(FilePath::parse(&want, 10_000).expect("valid")));
    }

    #[test]
    fn any_date_string_never_panics_and_is_in_range(s in "\\PC{0,40}") {
        if let Ok(v) = protocol::parse_version(&s) {
            prop_assert!((0..=protocol::MAX_VERSION).contains(&v));
        }
    }

    #[test]
    fn dates_round_trip(v in 0..=protocol::MAX_VERSION) {
        prop_assert_eq!(protocol::parse_version(&protocol::format_version(v)), Ok(v));
    }

    #[test]
    fn identity_and_gzip_ingest_agree_and_round_trip(content in proptest::collection::vec(any::<u8>(), 0..20_000)) {
        let sha = Sha256::digest(&content);
        let hints = Hints { sha256: Some(blob::Digest(sha.into())), logical_size: Some(content.len() as u64) };
        let (raw, stored) = ingest(&content, Encoding::Identity, &hints).expect("identity ingest");
        prop_assert_eq!(raw.digest.0, <[u8; 32]>::from(sha));
        prop_assert_eq!(raw.logical_size, content.len() as u64);
        prop_assert_eq!(raw.stored_size, stored.len() as u64);
        let mut back = Vec::new();
        let (d, n) = blob::inflate(&stored[..], &mut back).expect("stored form inflates");
        prop_assert_eq!(&back, &content);
        prop_assert_eq!((d, n), (raw.digest, raw.logical_size));

        let client_gz = gzip(&content);
        let (gz, kept) = ingest(&client_gz, Encoding::Gzip, &hints).expect("gzip ingest");
        prop_assert_eq!(gz.digest, raw.digest);
        prop_assert_eq!(&kept, &client_gz, "a client's gzip is stored as sent");
    }

    #[test]
    fn broken_gzip_is_refused_never_accepted_as_other_content(
        content in proptest::collection::vec(any::<u8>(), 1..5_000),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let gz = gzip(&content);
        let sha = blob::Digest(Sha256::digest(&content).into());
        let hints = Hints { sha256: Some(sha), logical_size: None };
        // Truncated anywhere: always an error.
        let truncated = &gz[..cut.index(gz.len())];
        prop_assert!(ingest(truncated, Encoding::Gzip, &Hints::default()).is_err());
        // One bit flipped: an error, or (a flip in an ignored header field) the same content.
        let mut flipped = gz.clone();
        let i = flip.index(flipped.len());
        flipped[i] ^= 1 << bit;
        if let Ok((info, _)) = ingest(&flipped, Encoding::Gzip, &hints) {
            prop_assert_eq!(info.digest, sha);
        }
    }

    #[test]
    fn garbage_bodies_are_client_errors(body in proptest::collection::vec(any::<u8>(), 0..2_000)) {
        match ingest(&body, Encoding::Gzip, &Hints::default()) {
            Ok((info, kept)) => {
                // Only a real gzip stream is accepted, and then it is kept byte for byte.
                prop_assert_eq!(kept, body);
                prop_assert!(info.logical_size <= OPTS.max_logical_size);
            }
            Err(e) => prop_assert!(e.is_client_error(), "{e}"),
        }
    }
}
