//! PostgreSQL stopped, stalled (connections open, nothing answered) or blocked by a lock
//! while the API serves: 503s with a message within bounded time (never a false 404, never a
//! hang), the daemon keeps running, and it recovers by itself, with nothing lost.
//! Its own test binary, because it stops the server every PostgreSQL test shares; its tests
//! take turns.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use s3dedup_tests::stall_proxy::StallProxy;
use s3dedup_tests::*;

/// One test at a time: the restart test stops the server the other one uses.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn pg_ctl(action: &str) {
    let version = std::env::var("PGVERSION").unwrap_or_else(|_| "15".into());
    let cluster = std::env::var("TESTS_PG_CLUSTER").unwrap_or_else(|_| "regress".into());
    let status = Command::new("pg_ctlcluster")
        .args([&version, &cluster, action])
        .args(if action == "stop" {
            &["-m", "fast"][..]
        } else {
            &[][..]
        })
        .status()
        .expect("pg_ctlcluster runs");
    assert!(
        status.success(),
        "pg_ctlcluster {version} {cluster} {action}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run through tests/run-all.sh"]
async fn postgres_restart_gives_503_then_recovers() {
    let _turn = SERIAL.lock().await;
    let schema = unique_schema("outage");
    let mut env = pg_env(&schema);
    env.push(("RUST_LOG".into(), "info".into()));
    let mut api = Api::start_with(Backend::Local, &env).unwrap();
    let ft = api.ft();
    let content = unique_content("outage", 20_000);
    let put = |path: &str, v: i64, body: Vec<u8>| ft.put_request(path, v).body(body).send();
    assert_eq!(
        put("/kept", 1, content.clone()).await.unwrap().status(),
        StatusCode::OK
    );

    pg_ctl("stop");
    let (during, _) = all_503_naming(&api, b"x".to_vec(), "metadata").await;
    assert!(
        api.proc.child.try_wait().unwrap().is_none(),
        "the daemon keeps running"
    );

    // The journal says so once, and so does `systemctl status` (STATUS=, checked every 5 s).
    let said = |what: &'static str| {
        let api = &api;
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            while !api.log().contains(what) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no {what:?} in\n{}",
                    api.log()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    said("not serving files: the metadata database").await;

    pg_ctl("start");
    let r = first_answer_not_503(&ft, "/kept").await;
    assert_eq!(r.status(), StatusCode::OK, "recovered by itself");
    said("serving again").await;
    let errors = "s3dedup_backend_errors_total{part=\"database\"} ";
    let m = ft.metrics().await;
    assert!(m.contains(errors), "the outage's errors are counted:\n{m}");
    assert_eq!(
        api.log().matches("not serving files").count(),
        1,
        "{}",
        api.log()
    );
    assert_eq!(gunzip(&r.bytes().await.unwrap()), content, "nothing lost");
    assert_eq!(
        ft.get_request("/new").send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        put("/new", 1, b"after".to_vec()).await.unwrap().status(),
        StatusCode::OK
    );
    let meta = pg_meta(&schema).await;
    use s3dedup_common::meta::MetaStore;
    assert_eq!(meta.refcount_mismatches().await.unwrap(), vec![]);
    assert!(api.proc.child.try_wait().unwrap().is_none());
    api.collect_and_verify();
    report(&format!(
        "FAULTS postgres-restart: 1 stop and start, {during} requests while down all 503, 2 files checked, 0 lost"
    ));
    api.proc.kill();
}

/// Deadlines of the stall test: the server cancels a statement after 2 s; the client gives a
/// connection up after 2 + 1 s. Everything is logged, to check that the password never is.
const STALL_ENV: [(&str, &str); 3] = [
    ("S3DEDUP_METADATA__POSTGRES__STATEMENT_TIMEOUT_SECS", "2"),
    ("S3DEDUP_METADATA__POSTGRES__CONNECT_TIMEOUT_SECS", "1"),
    ("RUST_LOG", "debug"),
];

/// GETs `path` until the answer is not 503 (the daemon recovered by itself), for up to 30 s.
async fn first_answer_not_503(ft: &Ft, path: &str) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = ft.get(path).await;
        if r.status() != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every request answered while PostgreSQL does not answer: a 503 whose message contains
/// `needle`, in bounded time. Returns how many requests were sent and the slowest answer.
async fn all_503_naming(api: &Api, put_body: Vec<u8>, needle: &str) -> (usize, Duration) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let ft = Ft::with_http(http, api.url(""));
    let timed = |what: &'static str, req: reqwest::RequestBuilder| async move {
        let t = Instant::now();
        let r = req.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
        (what, r, t.elapsed())
    };
    let answers = futures::future::join_all([
        timed("GET", ft.get_request("/kept")),
        timed("HEAD", ft.head_request("/kept")),
        timed("GET missing", ft.get_request("/never")),
        timed("PUT", ft.put_request("/new", 1).body(put_body)),
        timed("DELETE", ft.delete_request("/kept", 5)),
        timed("LIST", ft.list_request("/", None)),
        timed("health", ft.request(Method::GET, "/health")),
    ])
    .await;
    let mut slowest = Duration::ZERO;
    for (what, r, took) in &answers {
        assert_eq!(
            r.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "{what} while PostgreSQL does not answer"
        );
        if *what != "HEAD" && *what != "health" {
            let msg = r.headers()["x-exception"].to_str().unwrap();
            assert!(msg.contains(needle), "{what}: {msg}");
        }
        // The stall test's 3 s client deadline, plus a lock attempt and a pool wait before it.
        assert!(*took < Duration::from_secs(12), "{what} took {took:?}");
        slowest = slowest.max(*took);
    }
    (answers.len(), slowest)
}

/// `psql` on the test server (directly, not through the proxy), holding the row lock of `path`
/// in an open transaction until dropped.
struct RowLock(std::process::Child);

impl RowLock {
    fn take(schema: &str, path: &str) -> RowLock {
        let mut child = Command::new("psql")
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("psql runs");
        let stdin = child.stdin.as_mut().unwrap();
        writeln!(
            stdin,
            "SET search_path = \"{schema}\"; BEGIN; \
             SELECT 1 FROM files WHERE path = '{path}' FOR UPDATE; \\echo locked"
        )
        .unwrap();
        stdin.flush().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while line.trim() != "locked" {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "psql ended early");
        }
        RowLock(child)
    }
}

impl Drop for RowLock {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = writeln!(stdin, "ROLLBACK;");
        }
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run through tests/run-all.sh"]
async fn postgres_stalled_or_blocked_gives_503_in_bounded_time_then_recovers() {
    let _turn = SERIAL.lock().await;
    let (host, port) = pg_host_port();
    let target = tokio::net::lookup_host((host.as_str(), port))
        .await
        .unwrap()
        .next()
        .expect("the PostgreSQL host resolves");
    let proxy = StallProxy::start(target).await.unwrap();
    let schema = unique_schema("stall");
    let mut env = pg_env(&schema);
    env.retain(|(k, _)| k != "S3DEDUP_METADATA__POSTGRES__URL");
    env.push((
        "S3DEDUP_METADATA__POSTGRES__URL".into(),
        pg_conninfo_at("127.0.0.1", proxy.addr.port()),
    ));
    env.extend(
        STALL_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let mut api = Api::start_with(Backend::Local, &env).unwrap();
    let ft = api.ft();
    let put = |path: &str, v: i64, body: Vec<u8>| ft.put_request(path, v).body(body).send();
    let kept = unique_content("stall-kept", 30_000);
    assert_eq!(
        put("/kept", 1, kept.clone()).await.unwrap().status(),
        StatusCode::OK
    );

    // Frozen: every connection stays open and nothing comes back.
    proxy.set_stalled(true);
    let (stalled_requests, slowest) =
        all_503_naming(&api, unique_content("stall-new", 5_000), "database").await;
    assert!(
        api.proc.child.try_wait().unwrap().is_none(),
        "the daemon keeps running"
    );
    proxy.set_stalled(false);
    let r = first_answer_not_503(&ft, "/kept").await;
    assert_eq!(r.status(), StatusCode::OK, "recovered by itself");
    assert_eq!(gunzip(&r.bytes().await.unwrap()), kept, "nothing lost");
    let connections = proxy.connections();

    // Cut: the server side of every pooled connection is gone, and the API learns it only by
    // using them. Reads and writes go through on fresh connections; nothing fails.
    proxy.cut_upstream().await;
    let r = ft.get_request("/kept").send().await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "GET after the cut: {:?}",
        r.headers()
    );
    assert_eq!(gunzip(&r.bytes().await.unwrap()), kept);
    proxy.cut_upstream().await;
    let cut_body = unique_content("stall-cut", 3_000);
    let r = put("/after-cut", 1, cut_body.clone()).await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "PUT after the cut: {:?}",
        r.headers()
    );
    proxy.cut_upstream().await;
    let r = ft.list_request("/", None).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "LIST after the cut");
    assert!(r.text().await.unwrap().contains("after-cut"));
    proxy.cut_upstream().await;
    let r = ft.delete_request("/after-cut", 2).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "DELETE after the cut");

    // Blocked: another session holds the row; the server cancels the write at 2 s.
    let newer = unique_content("stall-newer", 40_000);
    let blocked = {
        let _lock = RowLock::take(&schema, "/kept");
        let t = Instant::now();
        let r = put("/kept", 2, newer.clone()).await.unwrap();
        let took = t.elapsed();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        let msg = r.headers()["x-exception"].to_str().unwrap().to_owned();
        assert!(msg.contains("statement timeout"), "{msg}");
        assert!(took < Duration::from_secs(10), "blocked PUT took {took:?}");
        let r = ft.get_request("/kept").send().await.unwrap();
        assert_eq!(
            gunzip(&r.bytes().await.unwrap()),
            kept,
            "no half-written change"
        );
        took
    };
    assert_eq!(
        put("/kept", 2, newer.clone()).await.unwrap().status(),
        StatusCode::OK,
        "once the lock is gone"
    );
    let r = ft.get_request("/kept").send().await.unwrap();
    assert_eq!(gunzip(&r.bytes().await.unwrap()), newer);
    let log = api.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("DEBUG"), "the API logged at debug level");
    let password = std::env::var("PGPASSWORD").unwrap_or_default();
    assert!(
        password.len() >= 8 && !log.contains(&password),
        "the database password (pg_virtualenv's PGPASSWORD) in the API log"
    );
    api.collect_and_verify();
    report(&format!(
        "FAULTS postgres-stall: 1 freeze, {stalled_requests} requests all 503 naming the database \
         (slowest {:.1} s), {connections} connections through the proxy; 4 cuts of every \
         connection, 4 requests after them all succeeded; 1 write blocked by a row lock, 503 \
         after {:.1} s; 2 files checked, 0 lost",
        slowest.as_secs_f64(),
        blocked.as_secs_f64()
    ));
}
