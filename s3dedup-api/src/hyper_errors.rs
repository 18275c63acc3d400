//! hyper answers by itself a request whose head it cannot parse (400), whose head is too large
//! (431) or whose URI is too long (414): a bare status with no body, and no hook to add one.
//! This gives those answers the message, in the body and `X-Exception`, that every other error
//! answer carries.
//!
//! The only place to add it is the connection's output, where a download may hold any bytes.
//! So the output is followed response by response: each head is parsed where a response
//! begins and its body skipped by its framing (Content-Length, chunked, none after HEAD, 1xx,
//! 204 or 304). hyper writes an answer of its own only once every request it handed the
//! service has been answered, so a final head found while no request waits for its answer is
//! hyper's; only then, and only in the form hyper writes, is it replaced. Anything unexpected
//! ends the following, and the rest of the connection passes unchanged.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use hyper::{Method, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

use crate::app::ApiError;

/// The longest response head or trailer section followed; ours are a few hundred bytes.
const MAX_HEAD: usize = 64 * 1024;
/// Header fields parsed in a response head; ours have fewer than twenty.
const MAX_FIELDS: usize = 64;
/// The longest chunk-size line followed (hyper writes the size alone, in hex).
const MAX_CHUNK_LINE: usize = 64;
/// Slices passed to one vectored write: hyper hands at most 64, and held bytes go first.
const MAX_SLICES: usize = 65;

/// The limits the connection's requests are parsed with, quoted in the 431 message.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub head_bytes: usize,
    pub fields: usize,
}

/// The methods of the requests hyper handed the service on one connection and whose answers
/// have not begun yet, oldest first.
#[derive(Clone, Default)]
pub struct Requests(Arc<Mutex<VecDeque<Method>>>);

impl Requests {
    /// Called for each request as the service receives it, before its answer exists.
    pub fn received(&self, method: &Method) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(method.clone());
    }

    fn answered(&self) -> Option<Method> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }
}

/// Where the output stands.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// Framing bytes, read before they are written.
    Part(Part),
    /// Body bytes still to pass unchanged, then what follows them.
    Body { left: u64, then: AfterBody },
    /// Not followed any more: everything passes unchanged.
    Through,
}

/// The framing bytes under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// A response head.
    Head,
    /// A chunk-size line.
    ChunkSize,
    /// The line end after a chunk's data.
    ChunkEnd,
    /// The trailer section after the last chunk; it ends with an empty line.
    Trailer,
}

/// What the next bytes of the output are.
enum Next {
    /// Framing, taken with `Follower::take`.
    Part(Part),
    /// This many body bytes, to pass unchanged.
    Body(u64),
}

#[derive(Debug, Clone, Copy)]
enum AfterBody {
    NextHead,
    ChunkEnd,
}

/// Told of each of hyper's own answers explained.
pub type OnRefusal = Box<dyn Fn(Refusal) + Send + Sync>;

/// Follows one connection's output, given the requests its answers are for.
struct Follower {
    framing: Framing,
    /// The bytes of the head, chunk line or trailer under way.
    part: Vec<u8>,
    requests: Requests,
    limits: Limits,
    on_refusal: OnRefusal,
}

impl Follower {
    fn new(requests: Requests, limits: Limits, on_refusal: OnRefusal) -> Self {
        Follower {
            framing: Framing::Part(Part::Head),
            part: Vec::new(),
            requests,
            limits,
            on_refusal,
        }
    }

    fn next(&self) -> Next {
        match self.framing {
            Framing::Part(part) => Next::Part(part),
            Framing::Body { left, .. } => Next::Body(left),
            Framing::Through => Next::Body(u64::MAX),
        }
    }

    /// Records that `n` body bytes (at most what `next` said) have passed.
    fn passed(&mut self, n: usize) {
        if let Framing::Body { left, then } = &mut self.framing {
            *left -= n as u64;
            if *left == 0 {
                self.framing = Framing::Part(match then {
                    AfterBody::NextHead => Part::Head,
                    AfterBody::ChunkEnd => Part::ChunkEnd,
                });
            }
        }
    }

    /// Takes bytes of `part` (what `next` said) from the front of `bytes` (not empty) into
    /// `out`, one of hyper's own answers replaced; returns how many it took, at least one.
    fn take(&mut self, part: Part, bytes: &[u8], out: &mut Vec<u8>) -> usize {
        let (end, limit): (&[u8], usize) = match part {
            Part::Head | Part::Trailer => (b"\r\n\r\n", MAX_HEAD),
            Part::ChunkSize | Part::ChunkEnd => (b"\r\n", MAX_CHUNK_LINE),
        };
        let had = self.part.len();
        let took = bytes.len().min(limit - had);
        self.part.extend_from_slice(&bytes[..took]);
        // Where the part ends: a trailer section may be its empty line alone.
        let ended = if part == Part::Trailer && self.part.starts_with(b"\r\n") {
            Some(2)
        } else {
            let from = had.saturating_sub(end.len() - 1);
            self.part[from..]
                .windows(end.len())
                .position(|w| w == end)
                .map(|at| from + at + end.len())
        };
        let Some(ended) = ended else {
            if self.part.len() >= limit {
                let seen = std::mem::take(&mut self.part);
                self.framing = self.lose(&seen, out, "a head, chunk-size line or trailer too long");
            }
            return took;
        };
        self.part.truncate(ended);
        let seen = std::mem::take(&mut self.part);
        self.framing = match part {
            Part::Head => self.head_ended(&seen, out),
            Part::ChunkSize => self.chunk_size_ended(&seen, out),
            Part::ChunkEnd if seen == b"\r\n" => {
                out.extend_from_slice(&seen);
                Framing::Part(Part::ChunkSize)
            }
            Part::ChunkEnd => self.lose(&seen, out, "a chunk not ended by CRLF"),
            Part::Trailer => {
                out.extend_from_slice(&seen);
                Framing::Part(Part::Head)
            }
        };
        // Its buffer serves the next part.
        self.part = seen;
        self.part.clear();
        ended - had
    }

    fn head_ended(&mut self, head: &[u8], out: &mut Vec<u8>) -> Framing {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut parsed = httparse::Response::new(&mut fields);
        let code = match parsed.parse(head) {
            Ok(httparse::Status::Complete(_)) => parsed.code.unwrap_or(0),
            _ => return self.lose(head, out, "a response head that does not parse"),
        };
        if (100..200).contains(&code) {
            // 100 Continue, written before the answer it announces.
            out.extend_from_slice(head);
            return Framing::Part(Part::Head);
        }
        let Some(method) = self.requests.answered() else {
            return match explained(head, code, parsed.headers, self.limits) {
                Some((refusal, answer)) => {
                    (self.on_refusal)(refusal);
                    out.extend_from_slice(&answer);
                    // hyper closes the connection after its answer.
                    Framing::Through
                }
                None => self.lose(head, out, "an answer to no request"),
            };
        };
        out.extend_from_slice(head);
        body_framing(&method, code, parsed.headers)
    }

    fn chunk_size_ended(&mut self, line: &[u8], out: &mut Vec<u8>) -> Framing {
        let digits = line[..line.len() - 2]
            .split(|&b| b == b';')
            .next()
            .unwrap_or_default();
        let size = std::str::from_utf8(digits)
            .ok()
            .and_then(|s| u64::from_str_radix(s.trim(), 16).ok());
        let Some(size) = size else {
            return self.lose(line, out, "a chunk-size line that does not parse");
        };
        out.extend_from_slice(line);
        match size {
            0 => Framing::Part(Part::Trailer),
            left => Framing::Body {
                left,
                then: AfterBody::ChunkEnd,
            },
        }
    }

    /// Writes `seen` unchanged and gives up following: the framing that follows.
    fn lose(&self, seen: &[u8], out: &mut Vec<u8>, what: &str) -> Framing {
        debug!("no longer following this connection's answers: {what}");
        out.extend_from_slice(seen);
        Framing::Through
    }
}

/// How the body after a final response head to `method` is framed.
fn body_framing(method: &Method, code: u16, fields: &[httparse::Header<'_>]) -> Framing {
    if method == Method::HEAD || code == 204 || code == 304 {
        return Framing::Part(Part::Head);
    }
    if method == Method::CONNECT && (200..300).contains(&code) {
        return Framing::Through;
    }
    let field = |name: &str| {
        fields
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(name))
            .and_then(|f| std::str::from_utf8(f.value).ok())
    };
    if let Some(codings) = field("transfer-encoding") {
        let last = codings.rsplit(',').next().unwrap_or_default().trim();
        return if last.eq_ignore_ascii_case("chunked") {
            Framing::Part(Part::ChunkSize)
        } else {
            Framing::Through
        };
    }
    match field("content-length").map(|v| v.trim().parse::<u64>()) {
        Some(Ok(0)) => Framing::Part(Part::Head),
        Some(Ok(left)) => Framing::Body {
            left,
            then: AfterBody::NextHead,
        },
        // Unreadable, or the body runs until the connection closes (an HTTP/1.0 answer).
        Some(Err(_)) | None => Framing::Through,
    }
}

/// The answers hyper writes by itself, to requests it cannot take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400: a request line or header that is not valid HTTP/1.1.
    Unparsable,
    /// 414: a URI too long.
    UriTooLong,
    /// 431: a request head too large.
    HeadTooLarge,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [
        Refusal::Unparsable,
        Refusal::UriTooLong,
        Refusal::HeadTooLarge,
    ];

    pub fn status(self) -> StatusCode {
        match self {
            Refusal::Unparsable => StatusCode::BAD_REQUEST,
            Refusal::UriTooLong => StatusCode::URI_TOO_LONG,
            Refusal::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }

    fn of(code: u16) -> Option<Self> {
        Refusal::ALL.into_iter().find(|r| r.status() == code)
    }

    fn message(self, limits: Limits) -> String {
        match self {
            Refusal::Unparsable => "malformed request: its request line or a header is not \
                                    valid HTTP/1.1 (an invalid Content-Length, a control \
                                    character, or not HTTP at all)"
                .to_owned(),
            Refusal::UriTooLong => "request URI too long".to_owned(),
            Refusal::HeadTooLarge => format!(
                "request head too large: the request line and headers must fit in {} KiB and \
                 {} header fields",
                limits.head_bytes / 1024,
                limits.fields
            ),
        }
    }
}

/// hyper's own answer `head` as every error answer is, if it is one: a 400, 414 or 431 with no
/// body and no fields but `connection`, `content-length` and `date`, which it keeps.
fn explained(
    head: &[u8], code: u16, fields: &[httparse::Header<'_>], limits: Limits,
) -> Option<(Refusal, Vec<u8>)> {
    let refusal = Refusal::of(code)?;
    let hypers = fields.iter().all(|f| {
        ["connection", "date"]
            .iter()
            .any(|n| f.name.eq_ignore_ascii_case(n))
            || f.name.eq_ignore_ascii_case("content-length") && f.value == b"0"
    });
    if !hypers {
        return None;
    }
    let status_end = head.windows(2).position(|w| w == b"\r\n")?;
    let (ours, body) = ApiError::new(refusal.status(), refusal.message(limits)).parts();
    let mut answer = head[..status_end + 2].to_vec();
    let kept = fields
        .iter()
        .filter(|f| !f.name.eq_ignore_ascii_case("content-length"))
        .map(|f| (f.name.as_bytes(), f.value));
    let added = ours
        .iter()
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
    for (name, value) in kept.chain(added) {
        answer.extend_from_slice(name);
        answer.extend_from_slice(b": ");
        answer.extend_from_slice(value);
        answer.extend_from_slice(b"\r\n");
    }
    answer.extend_from_slice(format!("content-length: {}\r\n\r\n{body}", body.len()).as_bytes());
    Some((refusal, answer))
}

/// A connection whose output is followed, hyper's own error answers explained.
pub struct Explained<T> {
    inner: T,
    follower: Follower,
    /// Framing bytes taken from hyper and not yet written, from `sent` on.
    held: Vec<u8>,
    sent: usize,
}

impl<T> Explained<T> {
    pub fn new(inner: T, requests: Requests, limits: Limits, on_refusal: OnRefusal) -> Self {
        Explained {
            inner,
            follower: Follower::new(requests, limits, on_refusal),
            held: Vec::new(),
            sent: 0,
        }
    }

    fn wrote_held(&mut self, n: usize) {
        self.sent += n;
        if self.sent == self.held.len() {
            self.held.clear();
            self.sent = 0;
        }
    }
}

impl<T: AsyncWrite + Unpin> Explained<T> {
    /// Writes every held byte.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wrote_held(n);
        }
        Poll::Ready(Ok(()))
    }
}

/// The bytes of `bufs` after the first `skip`, slice by slice, empty ones left out.
fn after<'a>(bufs: &'a [IoSlice<'_>], mut skip: usize) -> impl Iterator<Item = &'a [u8]> {
    bufs.iter().filter_map(move |b| {
        let from = skip.min(b.len());
        skip -= from;
        let rest = &b[from..];
        (!rest.is_empty()).then_some(rest)
    })
}

impl<T: AsyncRead + Unpin> AsyncRead for Explained<T> {
    fn poll_read(
        self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Explained<T> {
    fn poll_write(
        self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// Takes framing bytes into `held` and writes body bytes after them, in one call to the
    /// connection where it can, so a small answer still leaves in one write.
    fn poll_write_vectored(
        self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        // Bytes of `bufs` taken: held or written.
        let mut taken = 0;
        // Having taken some, report those rather than an error or a wait; the next call
        // meets the same condition again.
        let so_far = |taken: usize, r: Poll<io::Result<usize>>| {
            if taken > 0 { Poll::Ready(Ok(taken)) } else { r }
        };
        while taken < total {
            let left = match this.follower.next() {
                Next::Body(left) => left,
                Next::Part(part) => {
                    if this.held.len() - this.sent >= MAX_HEAD {
                        match this.poll_drain(cx) {
                            Poll::Ready(Ok(())) => {}
                            Poll::Ready(Err(e)) => return so_far(taken, Poll::Ready(Err(e))),
                            Poll::Pending => return so_far(taken, Poll::Pending),
                        }
                    }
                    let Some(bytes) = after(bufs, taken).next() else {
                        break;
                    };
                    taken += this.follower.take(part, bytes, &mut this.held);
                    continue;
                }
            };
            let held = &this.held[this.sent..];
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut used = 0;
            if !held.is_empty() {
                slices[0] = IoSlice::new(held);
                used = 1;
            }
            let mut room = left;
            for b in after(bufs, taken) {
                if room == 0 || used == MAX_SLICES {
                    break;
                }
                let n = b.len().min(usize::try_from(room).unwrap_or(usize::MAX));
                slices[used] = IoSlice::new(&b[..n]);
                used += 1;
                room -= n as u64;
            }
            let held_len = held.len();
            match Pin::new(&mut this.inner).poll_write_vectored(cx, &slices[..used]) {
                Poll::Ready(Ok(0)) => {
                    return so_far(taken, Poll::Ready(Err(io::ErrorKind::WriteZero.into())));
                }
                Poll::Ready(Ok(n)) => {
                    let of_held = n.min(held_len);
                    this.wrote_held(of_held);
                    let body = n - of_held;
                    this.follower.passed(body);
                    taken += body;
                    if body > 0 {
                        return Poll::Ready(Ok(taken));
                    }
                }
                other => return so_far(taken, other),
            }
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: Limits = Limits {
        head_bytes: 65536,
        fields: 100,
    };
    /// hyper's answer to a request it cannot parse, as it writes it.
    const BARE_400: &[u8] =
        b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\
                              date: Sun, 06 Dec 2026 20:00:00 GMT\r\n\r\n";

    fn requests(methods: &[Method]) -> Requests {
        let r = Requests::default();
        for m in methods {
            r.received(m);
        }
        r
    }

    /// What the follower writes for `output` handed over in pieces of `piece` bytes.
    fn followed(output: &[u8], piece: usize, methods: &[Method]) -> Vec<u8> {
        let mut f = Follower::new(requests(methods), LIMITS, Box::new(|_| ()));
        let mut out = Vec::new();
        for mut chunk in output.chunks(piece) {
            while !chunk.is_empty() {
                let n = match f.next() {
                    Next::Body(left) => {
                        let n = chunk.len().min(usize::try_from(left).unwrap());
                        out.extend_from_slice(&chunk[..n]);
                        f.passed(n);
                        n
                    }
                    Next::Part(part) => f.take(part, chunk, &mut out),
                };
                assert!(n > 0);
                chunk = &chunk[n..];
            }
        }
        out
    }

    fn explained_400() -> Vec<u8> {
        followed(BARE_400, BARE_400.len(), &[])
    }

    fn ok(body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    fn pieces() -> [usize; 5] {
        [1, 2, 7, 100, 1 << 20]
    }

    /// Checks that `answered` (the answers to `methods`) passes unchanged, and hyper's 400
    /// after it is explained, whatever pieces the output comes in.
    fn explained_after(answered: &[u8], methods: &[Method]) {
        let output = [answered, BARE_400].concat();
        let wanted = [answered, &explained_400()].concat();
        for piece in pieces() {
            assert_eq!(followed(&output, piece, methods), wanted, "piece {piece}");
        }
    }

    #[test]
    fn hypers_own_answer_gets_the_message() {
        let out = String::from_utf8(explained_400()).unwrap();
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
        assert!(
            out.contains("\r\nx-exception: malformed request: "),
            "{out}"
        );
        assert!(
            out.contains("\r\ndate: Sun, 06 Dec 2026 20:00:00 GMT\r\n"),
            "{out}"
        );
        assert!(out.contains("\r\nconnection: close\r\n"), "{out}");
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{out}"
        );
        assert!(body.starts_with("malformed request: ") && body.ends_with('\n'));
        let big = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\
                    content-length: 0\r\ndate: x\r\n\r\n";
        let out = String::from_utf8(followed(big, 1000, &[])).unwrap();
        assert!(
            out.contains("must fit in 64 KiB and 100 header fields"),
            "{out}"
        );
    }

    #[test]
    fn bodies_pass_unchanged_whatever_they_hold() {
        // A stored file that is hyper's answer, byte for byte, then hyper's own answer.
        explained_after(&ok(BARE_400), &[Method::GET]);
    }

    #[test]
    fn head_answers_have_no_body() {
        // An answer to HEAD declares the length of a body it does not carry.
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n";
        explained_after(
            &[&head[..], &ok(BARE_400)].concat(),
            &[Method::HEAD, Method::GET],
        );
    }

    #[test]
    fn chunked_bodies_and_interim_answers_are_followed() {
        let mut answered = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n\
                             transfer-encoding: chunked\r\n\r\n"
            .to_vec();
        for part in [&BARE_400[..10], &BARE_400[10..]] {
            answered.extend_from_slice(format!("{:X}\r\n", part.len()).as_bytes());
            answered.extend_from_slice(part);
            answered.extend_from_slice(b"\r\n");
        }
        answered.extend_from_slice(b"0\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n");
        explained_after(&answered, &[Method::PUT, Method::DELETE]);
    }

    #[test]
    fn an_answer_to_a_request_is_never_rewritten() {
        // Our own 400 in hyper's form (none is, but were it) answers the request waiting.
        explained_after(BARE_400, &[Method::GET]);
    }

    #[test]
    fn what_is_not_understood_passes_unchanged() {
        for (what, output, methods) in [
            ("no request and not hyper's form", ok(BARE_400), vec![]),
            (
                "an answer until the connection closes",
                [b"HTTP/1.0 200 OK\r\n\r\n".as_slice(), BARE_400].concat(),
                vec![Method::GET],
            ),
            (
                "a bad chunk size",
                [
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n".as_slice(),
                    BARE_400,
                ]
                .concat(),
                vec![Method::GET],
            ),
            (
                "not a response",
                [b"garbage\r\n\r\n".as_slice(), BARE_400].concat(),
                vec![],
            ),
            ("a head without end", vec![b'x'; MAX_HEAD + 10], vec![]),
        ] {
            for piece in pieces() {
                // Not assert_eq: the outputs are long.
                assert!(
                    followed(&output, piece, &methods) == output,
                    "{what}, {piece}"
                );
            }
        }
    }

    #[tokio::test]
    async fn the_connection_gets_every_byte_in_order() {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut output = ok(&body);
        output.extend_from_slice(BARE_400);
        let mut wanted = ok(&body);
        wanted.extend_from_slice(&explained_400());
        // A small pipe: writes are partial and wait for the reader.
        let (a, mut b) = tokio::io::duplex(1000);
        let refused = Arc::new(Mutex::new(Vec::new()));
        let told = refused.clone();
        let on_refusal = Box::new(move |status| told.lock().unwrap().push(status));
        let mut conn = Explained::new(a, requests(&[Method::GET]), LIMITS, on_refusal);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got
        });
        for piece in output.chunks(3000) {
            // As hyper does: a head and a body chunk in one vectored write.
            let (x, y) = piece.split_at(piece.len() / 3);
            let mut bufs = [IoSlice::new(x), IoSlice::new(&[]), IoSlice::new(y)];
            let mut slices = &mut bufs[..];
            while !slices.is_empty() {
                let n = conn.write_vectored(slices).await.unwrap();
                assert!(n > 0);
                IoSlice::advance_slices(&mut slices, n);
            }
        }
        conn.shutdown().await.unwrap();
        drop(conn);
        assert!(reader.await.unwrap() == wanted);
        assert_eq!(*refused.lock().unwrap(), [Refusal::Unparsable]);
    }
}
