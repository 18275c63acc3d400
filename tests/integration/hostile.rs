//! Hostile and broken clients against the real binary: malformed HTTP, slow or stalled
//! senders and readers, gzip bombs, and the Unix-socket listener. After each, the daemon still
//! serves, holds no slot, spool file or metadata for the failed request.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use s3dedup_tests::*;

/// Short timeouts so each stall is seen within seconds.
const TIMEOUTS: [(&str, &str); 3] = [
    ("S3DEDUP_API__HEADER_TIMEOUT_SECS", "2"),
    ("S3DEDUP_API__BODY_TIMEOUT_SECS", "2"),
    ("S3DEDUP_API__SEND_TIMEOUT_SECS", "2"),
];

fn status_line(answer: &str) -> &str {
    answer.lines().next().unwrap_or_default()
}

fn still_serves(api: &Api) {
    let r = raw_request(
        api.addr,
        b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .expect("daemon answers");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

/// A connection that has sent a PUT's request line and headers declaring a `len`-byte body, and
/// no body yet.
fn put_headers(api: &Api, path: &str, len: usize) -> TcpStream {
    let date = lm(1_700_000_000);
    let mut c = TcpStream::connect(api.addr).unwrap();
    write!(
        c,
        "PUT /files/{path}?last_modified={date} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n"
    )
    .unwrap();
    c
}

/// `n` uploads of 1000 bytes that have sent their headers and one byte of the body.
fn trickling_uploads(api: &Api, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut c = put_headers(api, &format!("slow{i}"), 1000);
            c.write_all(b"x").unwrap();
            c
        })
        .collect()
}

/// A GET of `/unread` (48 MiB, stored first) that nobody reads: it holds its read slot until
/// the server gives up sending.
async fn unread_download(api: &Api) -> TcpStream {
    let content = unique_content("unread", 48 << 20);
    api.ft().put_ok("/unread", 1_700_000_000, content).await;
    let mut unread = TcpStream::connect(api.addr).unwrap();
    // Identity: 48 MiB of inflated bytes, far beyond the socket buffers.
    unread
        .write_all(b"GET /files/unread HTTP/1.1\r\nHost: x\r\nAccept-Encoding: identity\r\n\r\n")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    unread
}

/// The `X-Exception` message of a raw answer's head, if it has one.
fn exception(answer: &str) -> Option<&str> {
    let head = answer.split("\r\n\r\n").next()?;
    head.lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(n, _)| n.eq_ignore_ascii_case("x-exception"))
        })
        .map(|(_, v)| v.trim())
}

async fn stored_paths(api: &Api) -> String {
    api.ft().list("/", None).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_4xx_and_store_nothing() {
    let api =
        Api::start_with(Backend::Local, &[("S3DEDUP_API__MAX_FILE_SIZE", "1048576")]).unwrap();
    let date = lm(1_700_000_000);
    // A PUT of `/files/<path>` at `date` with these header lines and body.
    let put = |path: &str, headers: &str, body: &str| {
        format!(
            "PUT /files/{path}?last_modified={date} HTTP/1.1\r\nHost: x\r\n{headers}\
             Connection: close\r\n\r\n{body}"
        )
        .into_bytes()
    };
    let bad_chunk = put(
        "a",
        "Transfer-Encoding: chunked\r\n",
        "zz\r\nx\r\n0\r\n\r\n",
    );
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "bad percent-encoding",
            put("a%zz%", "Content-Length: 1\r\n", "x"),
            &["400"],
        ),
        (
            "encoded NUL in the path",
            put("a%00b", "Content-Length: 1\r\n", "x"),
            &["400"],
        ),
        (
            // A listing is one path a line: a newline in a name would show as two paths.
            "encoded newline in the path",
            put("a%0Ab", "Content-Length: 1\r\n", "x"),
            &["400"],
        ),
        (
            "encoded carriage return, tab and DEL in the path",
            put("a%0D%09%7Fb", "Content-Length: 1\r\n", "x"),
            &["400"],
        ),
        (
            "raw NUL in the request line",
            put("a\0b", "Content-Length: 1\r\n", "x"),
            &["400"],
        ),
        (
            "NUL in a header",
            put("a", "SHA256-Checksum: ab\0cd\r\nContent-Length: 1\r\n", "x"),
            &["400"],
        ),
        (
            "a 1 MiB header",
            format!("GET /version HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\nConnection: close\r\n\r\n", "a".repeat(1 << 20)).into_bytes(),
            &["431", "400"],
        ),
        (
            "ten thousand headers",
            format!("GET /version HTTP/1.1\r\nHost: x\r\n{}Connection: close\r\n\r\n", "X-A: b\r\n".repeat(10_000)).into_bytes(),
            &["431", "400"],
        ),
        (
            "Content-Length beyond u64",
            put("a", "Content-Length: 99999999999999999999999\r\n", "x"),
            &["400"],
        ),
        (
            "negative Content-Length",
            put("a", "Content-Length: -1\r\n", "x"),
            &["400"],
        ),
        (
            "two different Content-Lengths",
            put("a", "Content-Length: 1\r\nContent-Length: 2\r\n", "xx"),
            &["400"],
        ),
        ("a chunk size that is not hex", bad_chunk.clone(), &["400"]),
        (
            "a Content-Length above max_file_size, body never sent",
            put("a", "Content-Length: 1000000000000\r\n", "xyz"),
            &["413"],
        ),
        (
            "a Logical-Size above max_file_size",
            put("a", "Logical-Size: 2000000\r\nContent-Length: 1\r\n", "x"),
            &["413"],
        ),
        (
            "a path longer than max_path_length",
            put(&"d/".repeat(3000), "Content-Length: 1\r\n", "x"),
            &["400", "414"],
        ),
        (
            "a date out of range",
            b"PUT /files/a?last_modified=Fri,%2031%20Dec%2099999%2023:59:59%20GMT HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx".to_vec(),
            &["400"],
        ),
        (
            "not HTTP at all",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 random TLS hello\r\n\r\n".to_vec(),
            &["400", ""],
        ),
    ];
    // Refusals by the HTTP layer, before any handler, by status.
    let mut refused = std::collections::BTreeMap::from([(400, 0), (414, 0), (431, 0)]);
    for (what, request, allowed) in &cases {
        let answer = raw_request(api.addr, request).unwrap_or_default();
        let line = status_line(&answer);
        assert!(
            allowed.iter().any(|code| if code.is_empty() {
                line.is_empty()
            } else {
                line.contains(code)
            }),
            "{what}: got {line:?}, wanted one of {allowed:?}"
        );
        // Whether the daemon or its HTTP layer refused it, the answer says why.
        if !line.is_empty() {
            let why = exception(&answer).unwrap_or_else(|| panic!("{what}: {answer:?}"));
            let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.trim_end());
            assert_eq!(body, Some(why), "{what}: {answer:?}");
            for (status, start) in [
                (400, "malformed request: "),
                (414, "request URI too long"),
                (431, "request head too large: "),
            ] {
                if line.contains(&status.to_string()) && why.starts_with(start) {
                    *refused.entry(status).or_default() += 1;
                }
            }
        }
        still_serves(&api);
    }
    assert!(refused[&400] >= 4 && refused[&431] >= 1, "{refused:?}");
    for (status, n) in refused {
        let counted = format!("s3dedup_malformed_requests_total{{status=\"{status}\"}}");
        assert_eq!(api.metric(&counted).await, n, "{counted}");
    }
    // A body the HTTP layer cannot decode: the message says what was wrong with it.
    let answer = raw_request(api.addr, &bad_chunk).unwrap();
    let why = exception(&answer).unwrap_or_else(|| panic!("{answer}"));
    assert!(why.contains("Invalid chunk size line"), "{why}");
    let r = api.ft().put("/two%0Alines", 1_700_000_000, "x").await;
    let why = r.headers()["x-exception"].to_str().unwrap().to_owned();
    assert!(why.contains("control character '\\n'"), "{why}");
    assert_eq!(stored_paths(&api).await, "", "nothing was stored");
    assert!(api.spool_files().is_empty(), "{:?}", api.spool_files());
    assert!(api.local_objects().is_empty());
}

/// The HTTP layer's own refusals (a head it cannot parse, or too large) carry a message, and
/// a download whose bytes are such a refusal passes untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_layer_refusals_say_why_and_leave_downloads_alone() {
    let api = Api::start(Backend::Local).unwrap();
    // The refusal as the HTTP layer writes it, stored as a file.
    let bare = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\
                 date: Sun, 06 Dec 2026 20:00:00 GMT\r\n\r\n";
    let big: Vec<u8> = bare.iter().copied().cycle().take(OBJECT_SIZED).collect();
    api.ft().put_ok("/bare", 1_700_000_000, bare.to_vec()).await;
    api.ft().put_ok("/big", 1_700_000_000, big.clone()).await;
    let get = |method: &str, path: &str| {
        format!("{method} /files/{path} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: identity\r\n\r\n")
    };
    // Downloads, a bodyless HEAD answer and a chunked listing on one connection, all sent at
    // once, then a line that is not HTTP.
    let mut pipelined = get("GET", "bare") + &get("HEAD", "big") + &get("GET", "big");
    pipelined += &("GET /list/ HTTP/1.1\r\nHost: x\r\n\r\n".to_owned() + &get("GET", "bare"));
    let mut request = pipelined.into_bytes();
    request.extend_from_slice(b"NOT HTTP\0\r\n\r\n");
    let mut c = TcpStream::connect(api.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(&request).unwrap();
    let mut answers = Vec::new();
    c.read_to_end(&mut answers).unwrap();

    let mut rest = answers.as_slice();
    let mut next = |body: bool| {
        let end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a head")
            + 4;
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        rest = &rest[end..];
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map(|n| n.trim().parse::<usize>().unwrap());
        let taken = match (body, length) {
            (false, _) => 0,
            (true, Some(n)) => n,
            // Chunked: up to the last chunk.
            (true, None) => rest.windows(5).position(|w| w == b"0\r\n\r\n").unwrap() + 5,
        };
        let (b, r) = rest.split_at(taken);
        rest = r;
        (head, b.to_vec())
    };
    let (head, body) = next(true);
    assert!(head.starts_with("HTTP/1.1 200") && body == bare, "{head}");
    let (head, _) = next(false);
    assert!(
        head.contains(&format!("content-length: {}", big.len())),
        "{head}"
    );
    let (head, body) = next(true);
    assert!(head.starts_with("HTTP/1.1 200") && body == big, "{head}");
    let (head, body) = next(true);
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("bare"));
    let (head, body) = next(true);
    assert!(head.starts_with("HTTP/1.1 200") && body == bare, "{head}");
    let (head, body) = next(true);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let why = exception(&head).unwrap_or_else(|| panic!("{head}"));
    assert!(why.starts_with("malformed request: "), "{why}");
    assert_eq!(String::from_utf8_lossy(&body).trim_end(), why);
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(rest));

    let answer = raw_request(
        api.addr,
        format!(
            "GET /version HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(200_000)
        )
        .as_bytes(),
    )
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let why = exception(&answer).unwrap_or_else(|| panic!("{answer}"));
    assert!(
        why.contains("must fit in 64 KiB and 100 header fields"),
        "{why}"
    );
    still_serves(&api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_bombs_are_refused_early() {
    let api = Api::start_with(
        Backend::Local,
        &[
            (
                "S3DEDUP_API__MAX_FILE_SIZE",
                (16u64 << 20).to_string().as_str(),
            ),
            ("S3DEDUP_API__MAX_GZIP_RATIO", "100"),
        ],
    )
    .unwrap();
    let ft = api.ft();
    let put = |path: &str, body: Vec<u8>, logical: Option<u64>| {
        let mut r = ft
            .put_request(&format!("/{path}"), 5)
            .header("Content-Encoding", "gzip")
            .body(body);
        if let Some(n) = logical {
            r = r.header("Logical-Size", n);
        }
        r.send()
    };
    // 1 GiB of zeros is about 1 MiB of gzip: over the size limit and the ratio limit.
    let zeros = vec![0u8; 64 << 20];
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(9));
    for _ in 0..16 {
        enc.write_all(&zeros).unwrap();
    }
    let bomb = enc.finish().unwrap();
    assert!(bomb.len() < 2 << 20, "{}", bomb.len());

    let r = put("bomb", bomb.clone(), None).await.unwrap();
    assert_eq!(r.status(), 413);
    let why = r.text().await.unwrap();
    assert!(why.contains("api.max_gzip_ratio"), "{why}");

    // Past the ratio's free first MiB only the ratio stops it; a claimed Logical-Size that the
    // content outgrows stops it at the claim.
    let r = put("liar", bomb, Some(1000)).await.unwrap();
    assert_eq!(r.status(), 400);
    let why = r.text().await.unwrap();
    assert!(why.contains("client said 1000, content is larger"), "{why}");

    // A small file of one repeated byte is legitimate whatever its ratio.
    let small = vec![b'7'; 512 << 10];
    let r = put("small", gzip(&small), None).await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    // Without the ratio limit, max_file_size stops the same bomb.
    let api2 = Api::start_with(
        Backend::Local,
        &[("S3DEDUP_API__MAX_FILE_SIZE", &(16u64 << 20).to_string())],
    )
    .unwrap();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(9));
    for _ in 0..4 {
        enc.write_all(&zeros).unwrap();
    }
    let r = api2
        .ft()
        .put_request("/bomb", 5)
        .header("Content-Encoding", "gzip")
        .body(enc.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.text().await.unwrap().contains("16777216"));

    assert_eq!(stored_paths(&api).await, "small\n");
    assert_eq!(stored_paths(&api2).await, "");
    assert!(api.spool_files().is_empty() && api2.spool_files().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_stalled_clients_are_cut_off() {
    let mut env = TIMEOUTS.to_vec();
    env.extend([
        ("S3DEDUP_API__MAX_CONCURRENT_REQUESTS", "1"),
        ("S3DEDUP_API__QUEUE_TIMEOUT_SECS", "1"),
    ]);
    let api = Api::start_with(Backend::Local, &env).unwrap();

    // Slowloris: half a request line, then nothing. The server closes it.
    let mut slow = TcpStream::connect(api.addr).unwrap();
    slow.write_all(b"GET /vers").unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    let waited = start.elapsed();
    assert!(
        waited < Duration::from_secs(15),
        "a header sender stalled for {waited:?} was not cut off"
    );

    // An idle keep-alive connection is closed too, after a request was served on it.
    let mut idle = TcpStream::connect(api.addr).unwrap();
    idle.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = Vec::new();
    let _ = idle.read_to_end(&mut buf);
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));

    // An upload that stops halfway: the request fails, the spool file goes, nothing is stored.
    let mut stalled = put_headers(&api, "stalled", 1_000_000);
    stalled.write_all(&[b'x'; 300_000]).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = Vec::new();
    let _ = stalled.read_to_end(&mut buf);
    let answer = String::from_utf8_lossy(&buf);
    assert!(
        answer.is_empty() || answer.contains("api.body_timeout_secs"),
        "{answer}"
    );

    // A download nobody reads holds the only slot until the server gives up on it.
    let unread = unread_download(&api).await;
    let ft = api.ft();
    let head = || ft.head_request("/unread").send();
    assert_eq!(
        head().await.unwrap().status(),
        503,
        "the unread GET holds the slot"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while head().await.unwrap().status() != 200 {
        assert!(
            Instant::now() < deadline,
            "the stalled reader kept its slot"
        );
    }
    drop(unread);

    assert_eq!(api.metric("s3dedup_requests_in_flight").await, 0);
    assert_eq!(stored_paths(&api).await, "unread\n");
    assert!(api.spool_files().is_empty(), "{:?}", api.spool_files());
    still_serves(&api);
}

/// A server whose read slots are all held (here the one slot, by a download nobody reads)
/// still answers `/health` at once; the other status endpoints wait for a slot like any
/// request, so a flood of them cannot get past the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_health_is_answered_beside_the_slot_bound() {
    let env = [
        ("S3DEDUP_API__MAX_CONCURRENT_REQUESTS", "1"),
        ("S3DEDUP_API__QUEUE_TIMEOUT_SECS", "1"),
        ("S3DEDUP_API__SEND_TIMEOUT_SECS", "60"),
    ];
    let api = Api::start_with(Backend::Local, &env).unwrap();
    let unread = unread_download(&api).await;
    let ft = api.ft();
    for _ in 0..20 {
        let started = Instant::now();
        let r = ft
            .request(reqwest::Method::GET, "/health")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", why(&r));
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
    }
    for endpoint in ["/version", "/status", "/metrics", "/files/unread"] {
        let r = ft
            .request(reqwest::Method::GET, endpoint)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{endpoint}");
        assert!(why(&r).contains("server busy"), "{endpoint}: {}", why(&r));
    }
    drop(unread);
    let deadline = Instant::now() + Duration::from_secs(20);
    while ft
        .request(reqwest::Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(Instant::now() < deadline, "the slot came back");
    }
}

/// 300 uploads that trickle in (headers, then a byte now and then) hold every one of the
/// default 256 write slots (no share per address here, as behind a proxy); reads have slots of
/// their own, so GETs are still answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_uploads_do_not_keep_reads_waiting() {
    let env = [
        ("S3DEDUP_API__MAX_REQUESTS_PER_ADDRESS", "0"),
        ("S3DEDUP_API__QUEUE_TIMEOUT_SECS", "5"),
    ];
    let api = Api::start_with(Backend::Local, &env).unwrap();
    api.ft().put_ok("/kept", 1_700_000_000, "kept").await;
    let mut trickling = trickling_uploads(&api, 300);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..5 {
        for c in &mut trickling {
            let _ = c.write_all(b"x");
        }
        let started = Instant::now();
        let r = api.ft().get("/kept").await;
        let took = started.elapsed();
        assert_eq!(r.status(), 200, "{}", why(&r));
        assert!(took < Duration::from_secs(1), "a GET waited {took:?}");
        let r = api
            .ft()
            .request(reqwest::Method::GET, "/list/")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // One more write waits for a write slot, and is told so.
    let r = api.ft().put("/one-more", 1_700_000_000, "x").await;
    assert_eq!(r.status(), 503);
    assert!(why(&r).contains("256 writes in progress"), "{}", why(&r));
    drop(trickling);
    still_serves(&api);
}

/// One address's trickling uploads hold only its share of the write slots
/// (`api.max_requests_per_address`): its next upload waits and is told why, while another
/// address's upload is served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_only_its_share_of_the_slots() {
    let env = [
        ("S3DEDUP_API__MAX_CONCURRENT_REQUESTS", "20"),
        ("S3DEDUP_API__MAX_REQUESTS_PER_ADDRESS", "5"),
        ("S3DEDUP_API__QUEUE_TIMEOUT_SECS", "2"),
    ];
    let api = Api::start_with(Backend::Local, &env).unwrap();
    let trickling = trickling_uploads(&api, 5);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = api.ft().put("/sixth", 1_700_000_000, "x").await;
    assert_eq!(r.status(), 503, "{}", why(&r));
    assert!(
        why(&r).contains("too many requests from 127.0.0.1 at once"),
        "{}",
        why(&r)
    );
    let elsewhere = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let other = Ft::with_http(elsewhere, format!("http://{}", api.addr));
    let r = other.put("/from-elsewhere", 1_700_000_000, "x").await;
    assert_eq!(r.status(), 200, "{}", why(&r));
    // Reads are a pool of their own, with a share of their own.
    assert_eq!(api.ft().get("/from-elsewhere").await.status(), 200);
    drop(trickling);
    still_serves(&api);
}

/// An upload that sends a byte now and then never falls silent for long, but is far below the
/// minimum rate: once it has run `body_timeout_secs` it fails, and its slot and spool go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_below_the_minimum_rate_is_cut_off() {
    let env = [
        ("S3DEDUP_API__BODY_TIMEOUT_SECS", "2"),
        ("S3DEDUP_API__MIN_BODY_RATE", "1000"),
    ];
    let api = Api::start_with(Backend::Local, &env).unwrap();
    let mut c = put_headers(&api, "trickle", 100_000);
    let mut writer = c.try_clone().unwrap();
    let started = Instant::now();
    let trickle = std::thread::spawn(move || {
        // A byte every 300 ms for up to 20 s, until the server hangs up.
        for _ in 0..66 {
            if writer.write_all(b"x").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    c.set_read_timeout(Some(Duration::from_secs(25))).unwrap();
    let mut buf = Vec::new();
    let _ = c.read_to_end(&mut buf);
    let took = started.elapsed();
    let answer = String::from_utf8_lossy(&buf);
    assert!(
        took < Duration::from_secs(10),
        "a trickling upload held on for {took:?}"
    );
    assert!(
        answer.is_empty() || answer.contains("api.min_body_rate"),
        "{answer}"
    );
    drop(c);
    trickle.join().unwrap();
    assert_eq!(stored_paths(&api).await, "");
    assert!(api.spool_files().is_empty(), "{:?}", api.spool_files());
    still_serves(&api);
}

/// Clients that send a GET or HEAD and hang up at once: the in-flight gauge counts each
/// request until it ends however it ends, so it comes back to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_requests_leave_nothing_in_flight() {
    let api = Api::start(Backend::Local).unwrap();
    let content = unique_content("aborted", 3 << 20);
    api.ft().put_ok("/big", 1_700_000_000, content).await;
    for i in 0..1000 {
        let mut c = TcpStream::connect(api.addr).unwrap();
        let method = if i % 2 == 0 { "GET" } else { "HEAD" };
        let _ = write!(
            c,
            "{method} /files/big HTTP/1.1\r\nHost: x\r\nAccept-Encoding: identity\r\n\r\n"
        );
        drop(c);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = api.metric("s3dedup_requests_in_flight").await;
        if n == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{n} requests still counted in flight"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    still_serves(&api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    // A stale socket file from a killed predecessor does not stop the start.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = Command::new(bin("s3dedup-api"))
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env_remove("LISTEN_FDS")
        .env_remove("NOTIFY_SOCKET")
        .stderr(log)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let request = |req: &[u8]| -> std::io::Result<String> {
        let mut s = UnixStream::connect(&sock)?;
        s.write_all(req)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while request(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").is_err() {
        assert!(Instant::now() < deadline, "no answer on {}", sock.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    let date = lm(1_700_000_000);
    let put = request(
        format!("PUT /files/u?last_modified={date} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
            .as_bytes(),
    )
    .unwrap();
    assert!(put.starts_with("HTTP/1.1 200"), "{put}");
    let get = request(
        b"GET /files/u HTTP/1.1\r\nHost: x\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert!(
        get.starts_with("HTTP/1.1 200") && get.ends_with("hello"),
        "{get}"
    );

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
    assert!(!sock.exists(), "the socket file is removed on exit");
}
