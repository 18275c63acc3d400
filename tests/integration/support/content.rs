//! Contents and requests as the suites make them: unique bytes, digests, gzip, raw HTTP, and
//! versions written the way the Filetracker client writes them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sha2::Digest as _;

/// Sends raw bytes and reads the whole answer (the request should say `Connection: close`).
pub fn raw_request(addr: SocketAddr, request: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(request)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(9));
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

pub fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

/// A length at which [`unique_content`] (hex text, about half compressible) is stored as an
/// object: its gzip is well over the default `store.inline_max_bytes`. Shorter contents are
/// kept in their metadata rows.
pub const OBJECT_SIZED: usize = 32_000;

/// Unique content for this run (both servers deduplicate; tests must not collide).
pub fn unique_content(tag: &str, len: usize) -> Vec<u8> {
    let seed = format!("{tag}-{}-{:?}", std::process::id(), Instant::now());
    let mut out = Vec::with_capacity(len + 64);
    let mut block = sha2::Sha256::digest(seed.as_bytes()).to_vec();
    while out.len() < len {
        out.extend_from_slice(hex::encode(&block).as_bytes());
        block = sha2::Sha256::digest(&block).to_vec();
    }
    out.truncate(len);
    out
}

/// `last_modified` query value for a version, form-encoded the way the real client does
/// (`email.utils.formatdate`, a `-0000` zone).
pub fn lm(version: i64) -> String {
    let date = chrono::DateTime::from_timestamp(version, 0)
        .expect("version in range")
        .format("%a, %d %b %Y %H:%M:%S -0000")
        .to_string();
    date.replace(' ', "+")
        .replace(',', "%2C")
        .replace(':', "%3A")
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_dates_like_python() {
        // email.utils.formatdate(1700000000) == 'Tue, 14 Nov 2023 22:13:20 -0000'
        assert_eq!(
            super::lm(1_700_000_000),
            "Tue%2C+14+Nov+2023+22%3A13%3A20+-0000"
        );
    }
}
