//! Reading gzip: which inflater runs, and how a body of several gzip members reads as one.
//!
//! ISA-L's inflater when the build found the library (see `build.rs`): on this project's test
//! machine it inflates a 64 MiB text gzipped at level 9 (what the Filetracker client sends) in
//! 128 ms where zlib-rs takes 180 ms, and inflating is most of what a gzip upload costs the
//! server. Without it, flate2's zlib-rs. Both read concatenated members as one content, refuse
//! anything after a member that is not another member, and check every member's CRC and size.

use std::io::{self, BufRead, BufReader, Read};

#[cfg(s3dedup_isal)]
mod isal;

/// The inflater this build uses, for the startup log.
pub const INFLATER: &str = if cfg!(s3dedup_isal) {
    "isa-l"
} else {
    "zlib-rs"
};

/// A [`Read`] of the content of a gzip stream of one or more members.
pub struct GzDecoder<R: Read>(Inner<R>);

enum Inner<R: Read> {
    #[cfg(s3dedup_isal)]
    Isal(isal::Decoder<R>),
    Zlib(ZlibMembers<R>),
}

/// flate2's one-member decoder, started again on what follows each member (as its
/// `MultiGzDecoder` does), counting the members.
struct ZlibMembers<R: Read> {
    // Boxed: zlib-rs's state is inline and large, ISA-L's behind a pointer already. `None`
    // only inside `read`, between one member and the next.
    member: Option<Box<flate2::bufread::GzDecoder<BufReader<R>>>>,
    members: u64,
}

impl<R: Read> ZlibMembers<R> {
    fn new(src: R) -> Self {
        ZlibMembers {
            member: Some(Box::new(flate2::bufread::GzDecoder::new(BufReader::new(
                src,
            )))),
            members: 1,
        }
    }

    fn get_ref(&self) -> &R {
        let member = self.member.as_ref();
        member
            .expect("a member's decoder is in place outside read")
            .get_ref()
            .get_ref()
    }
}

impl<R: Read> Read for ZlibMembers<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(member) = self.member.as_mut() else {
                return Ok(0);
            };
            let n = member.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // The member ended: the body may end here, or another member follows.
            if member.get_mut().fill_buf()?.is_empty() {
                return Ok(0);
            }
            if let Some(ended) = self.member.take() {
                let rest = ended.into_inner();
                self.member = Some(Box::new(flate2::bufread::GzDecoder::new(rest)));
                self.members += 1;
            }
        }
    }
}

impl<R: Read> GzDecoder<R> {
    /// Inflates `src` with this build's inflater.
    pub fn new(src: R) -> Self {
        #[cfg(s3dedup_isal)]
        let inner = Inner::Isal(isal::Decoder::new(src));
        #[cfg(not(s3dedup_isal))]
        let inner = Inner::Zlib(ZlibMembers::new(src));
        GzDecoder(inner)
    }

    /// Inflates `src` with zlib-rs whatever the build found (the reference in tests).
    pub fn zlib_rs(src: R) -> Self {
        GzDecoder(Inner::Zlib(ZlibMembers::new(src)))
    }

    /// The source, e.g. to see how much of it has been read.
    pub fn get_ref(&self) -> &R {
        match &self.0 {
            #[cfg(s3dedup_isal)]
            Inner::Isal(d) => d.get_ref(),
            Inner::Zlib(d) => d.get_ref(),
        }
    }

    /// The gzip members begun so far (after the whole body: how many it had).
    pub fn members(&self) -> u64 {
        match &self.0 {
            #[cfg(s3dedup_isal)]
            Inner::Isal(d) => d.members(),
            Inner::Zlib(d) => d.members,
        }
    }
}

impl<R: Read> Read for GzDecoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.0 {
            #[cfg(s3dedup_isal)]
            Inner::Isal(d) => d.read(buf),
            Inner::Zlib(d) => d.read(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::tests::{Trickle, gzip};
    use std::io::Write;

    /// Text-like content: compressible, with long and short matches.
    fn content(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        let mut v = Vec::with_capacity(len);
        while v.len() < len {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            for i in 0..(x % 8 + 1) {
                v.push(b'a' + ((x >> (i * 3)) % 20) as u8);
            }
            v.push(if x.is_multiple_of(11) { b'\n' } else { b' ' });
        }
        v.truncate(len);
        v
    }

    /// What a decoder makes of `gz`, read `in_step` bytes in and `out_step` bytes out at a time:
    /// the content, or that it failed.
    fn run(d: &mut GzDecoder<Trickle<'_>>, out_step: usize) -> Result<Vec<u8>, io::ErrorKind> {
        let mut all = Vec::new();
        let mut buf = vec![0u8; out_step];
        loop {
            match d.read(&mut buf) {
                Ok(0) => return Ok(all),
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e.kind()),
            }
        }
    }

    /// Asserts that this build's inflater reads `gz` as zlib-rs does: the same content, or an
    /// error for both.
    fn same_as_zlib_rs(gz: &[u8], what: &str) -> Result<Vec<u8>, io::ErrorKind> {
        let reference = run(&mut GzDecoder::zlib_rs(Trickle(gz, usize::MAX)), 1 << 16);
        for (in_step, out_step) in [(usize::MAX, 1 << 16), (7, 1 << 16), (1 << 16, 5), (1, 1)] {
            if (in_step < 64 || out_step < 64) && gz.len() > 200_000 {
                continue;
            }
            let got = run(&mut GzDecoder::new(Trickle(gz, in_step)), out_step);
            assert_eq!(
                got.is_ok(),
                reference.is_ok(),
                "{what}, {INFLATER} reading {in_step}/{out_step} at a time: {:?}, zlib-rs: {:?}",
                got.as_ref().err(),
                reference.as_ref().err()
            );
            if let (Ok(a), Ok(b)) = (&got, &reference) {
                assert!(a == b, "{what}: {INFLATER} read different content");
            }
        }
        reference
    }

    #[test]
    fn whole_members_read_as_their_content() {
        for (len, level) in [(0, 6), (1, 1), (5000, 0), (100_000, 1), (300_000, 9)] {
            let c = content(len, len as u32);
            let got = same_as_zlib_rs(&gzip(&c, level), &format!("{len} bytes at {level}"));
            assert_eq!(got.map(|v| v == c), Ok(true));
        }
    }

    #[test]
    fn concatenated_members_are_one_content() {
        let (a, b) = (content(70_000, 1), content(3, 2));
        let mut gz = gzip(&a, 6);
        gz.extend(gzip(&[], 6));
        gz.extend(gzip(&b, 1));
        let got = same_as_zlib_rs(&gz, "three members").unwrap();
        assert_eq!(got, [a, b].concat());
        for mut d in [GzDecoder::new(&gz[..]), GzDecoder::zlib_rs(&gz[..])] {
            io::copy(&mut d, &mut io::sink()).unwrap();
            assert_eq!(d.members(), 3);
        }
        let mut one = GzDecoder::new(&gz[..70]);
        let _ = io::copy(&mut one, &mut io::sink());
        assert_eq!(one.members(), 1);
    }

    #[test]
    fn header_fields_are_skipped() {
        let c = content(10_000, 3);
        let mut e = flate2::GzBuilder::new()
            .filename("input.txt")
            .comment("a comment")
            .extra(vec![1, 2, 3, 4])
            .mtime(1_700_000_000)
            .write(Vec::new(), flate2::Compression::new(6));
        e.write_all(&c).unwrap();
        let gz = e.finish().unwrap();
        assert_eq!(same_as_zlib_rs(&gz, "named member"), Ok(c.clone()));
        // A header CRC (FHCRC), right and wrong: the plain member's header with the flag set.
        let plain = gzip(&c, 6);
        let mut header = plain[..10].to_vec();
        header[3] |= 2;
        let mut crc = flate2::Crc::new();
        crc.update(&header);
        for (sum, ok) in [(crc.sum() as u16, true), (crc.sum() as u16 ^ 1, false)] {
            let gz = [&header[..], &sum.to_le_bytes(), &plain[10..]].concat();
            let got = same_as_zlib_rs(&gz, &format!("header CRC {sum:x}"));
            assert_eq!(got.is_ok(), ok, "header CRC {sum:x}: {got:?}");
        }
    }

    #[test]
    fn broken_bodies_fail_like_zlib_rs() {
        let c = content(40_000, 4);
        let gz = gzip(&c, 6);
        // Cut anywhere: inside the header, the deflate data, the trailer.
        for cut in [
            0,
            1,
            5,
            9,
            10,
            11,
            100,
            gz.len() / 2,
            gz.len() - 8,
            gz.len() - 1,
        ] {
            let r = same_as_zlib_rs(&gz[..cut], &format!("cut at {cut}"));
            assert!(cut == 0 || r.is_err(), "cut at {cut} was accepted");
        }
        // Any flipped byte: a bad header, a bad block, a wrong CRC or size.
        for at in [
            0,
            1,
            2,
            3,
            20,
            gz.len() / 3,
            gz.len() - 8,
            gz.len() - 5,
            gz.len() - 1,
        ] {
            let mut bad = gz.clone();
            bad[at] ^= 0x55;
            let r = same_as_zlib_rs(&bad, &format!("byte {at} flipped"));
            assert!(r.is_err(), "byte {at} flipped was accepted");
        }
        // After a member: garbage, zeros, half a header.
        for tail in [&b"garbage!garbage!"[..], &[0u8; 20], &gz[..5]] {
            let bad = [&gz[..], tail].concat();
            assert!(same_as_zlib_rs(&bad, "trailing bytes").is_err());
        }
        assert!(same_as_zlib_rs(b"plain text, not gzip", "not gzip").is_err());
    }

    #[test]
    fn the_source_is_read_once_and_can_be_inspected() {
        let c = content(200_000, 5);
        let gz = gzip(&c, 1);
        let mut d = GzDecoder::new(io::Cursor::new(&gz));
        let mut back = Vec::new();
        d.read_to_end(&mut back).unwrap();
        assert_eq!(back, c);
        assert_eq!(d.get_ref().position(), gz.len() as u64);
    }
}
