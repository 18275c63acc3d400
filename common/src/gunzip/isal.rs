//! ISA-L's inflater behind [`Read`], through the few C calls of `isal.c`.

use std::ffi::c_int;
use std::io::{self, Read};
use std::ptr::NonNull;

/// ISA-L's `struct inflate_state`, only ever behind a pointer.
#[repr(C)]
struct State {
    _opaque: [u8; 0],
}

unsafe extern "C" {
    fn s3dedup_isal_new() -> *mut State;
    fn s3dedup_isal_free(s: *mut State);
    fn s3dedup_isal_next_member(s: *mut State);
    fn s3dedup_isal_inflate(
        s: *mut State, input: *const u8, in_len: *mut u32, out: *mut u8, out_len: *mut u32,
        done: *mut c_int,
    ) -> c_int;
}

/// ISA-L's return codes that are not errors: no error, input used up, output full.
const OK_CODES: [c_int; 3] = [0, 1, 2];

/// Input read from the source at a time.
const IN_BUF: usize = 64 * 1024;

pub(super) struct Decoder<R> {
    src: R,
    state: NonNull<State>,
    buf: Box<[u8]>,
    /// `buf[pos..end]` is read and not yet inflated.
    pos: usize,
    end: usize,
    eof: bool,
    /// The last member ended; more input starts another one.
    between: bool,
    /// The current member's header, while it is being read.
    header: Option<Header>,
    /// Members begun so far.
    members: u64,
}

// The state is owned by one decoder and used only through `&mut self`.
unsafe impl<R: Send> Send for Decoder<R> {}

impl<R> Drop for Decoder<R> {
    fn drop(&mut self) {
        // SAFETY: allocated by s3dedup_isal_new and freed only here.
        unsafe { s3dedup_isal_free(self.state.as_ptr()) }
    }
}

impl<R: Read> Decoder<R> {
    pub(super) fn new(src: R) -> Self {
        // SAFETY: no arguments; the result is checked for NULL.
        let state = NonNull::new(unsafe { s3dedup_isal_new() }).unwrap_or_else(|| {
            std::alloc::handle_alloc_error(std::alloc::Layout::new::<[u8; 1 << 16]>())
        });
        Decoder {
            src,
            state,
            buf: vec![0u8; IN_BUF].into_boxed_slice(),
            pos: 0,
            end: 0,
            eof: false,
            between: false,
            header: Some(Header::new()),
            members: 1,
        }
    }

    pub(super) fn get_ref(&self) -> &R {
        &self.src
    }

    pub(super) fn members(&self) -> u64 {
        self.members
    }

    /// Reads more input once what was read is used up.
    fn fill(&mut self) -> io::Result<()> {
        if self.pos < self.end || self.eof {
            return Ok(());
        }
        let n = loop {
            match self.src.read(&mut self.buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        self.pos = 0;
        self.end = n;
        self.eof = n == 0;
        Ok(())
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let out_len = out.len().min(u32::MAX as usize);
        loop {
            self.fill()?;
            if self.between {
                // The body may end after any member; what follows one must be another.
                if self.pos == self.end {
                    return Ok(0);
                }
                // SAFETY: the state is live (see Drop).
                unsafe { s3dedup_isal_next_member(self.state.as_ptr()) };
                self.between = false;
                self.header = Some(Header::new());
                self.members += 1;
            }
            if let Some(header) = &mut self.header {
                while self.pos < self.end && !header.done() {
                    header.feed(self.buf[self.pos])?;
                    self.pos += 1;
                }
                if !header.done() {
                    if self.eof {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "gzip data ends inside a member's header",
                        ));
                    }
                    continue;
                }
                self.header = None;
            }
            let given = (self.end - self.pos) as u32;
            let mut in_left = given;
            let mut out_left = out_len as u32;
            let mut done: c_int = 0;
            // SAFETY: the pointers and lengths describe `buf[pos..end]` and `out[..out_len]`,
            // both alive and unaliased for the call; ISA-L keeps neither past it.
            let code = unsafe {
                s3dedup_isal_inflate(
                    self.state.as_ptr(),
                    self.buf[self.pos..].as_ptr(),
                    &mut in_left,
                    out.as_mut_ptr(),
                    &mut out_left,
                    &mut done,
                )
            };
            if !OK_CODES.contains(&code) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("invalid gzip data ({})", describe(code)),
                ));
            }
            self.pos += (given - in_left) as usize;
            let written = out_len - out_left as usize;
            self.between = done != 0;
            if written > 0 {
                return Ok(written);
            }
            if self.between {
                continue;
            }
            if self.eof {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "gzip data ends inside a member",
                ));
            }
            if in_left == given && given > 0 {
                // Never seen: input and room for output, and nothing moved.
                return Err(io::Error::other("the gzip inflater made no progress"));
            }
        }
    }
}

/// Gzip header flags (RFC 1952): header CRC, extra field, name, comment; the rest are reserved.
const FHCRC: u8 = 2;
const FEXTRA: u8 = 4;
const FNAME: u8 = 8;
const FCOMMENT: u8 = 16;
const FRESERVED: u8 = 0xe0;

/// Where a header being read is.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Step {
    Fixed,
    ExtraLen,
    Extra,
    Name,
    Comment,
    HeaderCrc,
    Done,
}

/// A gzip member's header, read a byte at a time (it may arrive in any pieces) and checked.
struct Header {
    step: Step,
    fixed: [u8; 10],
    /// Bytes of the current step read so far.
    got: usize,
    extra_len: usize,
    stored_crc: u16,
    crc: flate2::Crc,
}

impl Header {
    fn new() -> Self {
        Header {
            step: Step::Fixed,
            fixed: [0; 10],
            got: 0,
            extra_len: 0,
            stored_crc: 0,
            crc: flate2::Crc::new(),
        }
    }

    fn done(&self) -> bool {
        self.step == Step::Done
    }

    fn feed(&mut self, b: u8) -> io::Result<()> {
        if self.step != Step::HeaderCrc {
            self.crc.update(&[b]);
        }
        match self.step {
            Step::Fixed => {
                self.fixed[self.got] = b;
                self.got += 1;
                if self.got == self.fixed.len() {
                    let f = &self.fixed;
                    if f[0] != 0x1f || f[1] != 0x8b {
                        return Err(bad_header("not gzip data (wrong magic bytes)"));
                    }
                    if f[2] != 8 {
                        return Err(bad_header("unsupported gzip compression method"));
                    }
                    if f[3] & FRESERVED != 0 {
                        return Err(bad_header("reserved gzip header flags set"));
                    }
                    self.next(Step::Fixed);
                }
            }
            Step::ExtraLen => {
                self.extra_len |= (b as usize) << (8 * self.got);
                self.got += 1;
                if self.got == 2 {
                    self.next(Step::ExtraLen);
                }
            }
            Step::Extra => {
                self.got += 1;
                if self.got >= self.extra_len {
                    self.next(Step::Extra);
                }
            }
            Step::Name | Step::Comment if b == 0 => self.next(self.step),
            Step::Name | Step::Comment => {}
            Step::HeaderCrc => {
                self.stored_crc |= (b as u16) << (8 * self.got);
                self.got += 1;
                if self.got == 2 {
                    if self.stored_crc != self.crc.sum() as u16 {
                        return Err(bad_header("gzip header CRC does not match"));
                    }
                    self.step = Step::Done;
                }
            }
            Step::Done => {}
        }
        Ok(())
    }

    /// Moves past `from` to the next part the flags say the header has.
    fn next(&mut self, from: Step) {
        let flags = self.fixed[3];
        let order = [
            (Step::ExtraLen, FEXTRA),
            (Step::Extra, FEXTRA),
            (Step::Name, FNAME),
            (Step::Comment, FCOMMENT),
            (Step::HeaderCrc, FHCRC),
        ];
        let start = order
            .iter()
            .position(|(s, _)| *s == from)
            .map_or(0, |i| i + 1);
        self.got = 0;
        self.step = order[start..]
            .iter()
            .find(|(s, f)| flags & f != 0 && !(*s == Step::Extra && self.extra_len == 0))
            .map_or(Step::Done, |(s, _)| *s);
    }
}

fn bad_header(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

fn describe(code: c_int) -> &'static str {
    match code {
        -1 => "invalid deflate block",
        -2 => "invalid deflate symbol",
        -3 => "invalid back-reference distance",
        -4 => "invalid gzip header or trailer",
        -5 => "unsupported compression method",
        -6 => "checksum or size in the gzip trailer does not match",
        _ => "unexpected inflater state",
    }
}
