//! Faults under load: S3 answering 500/503, slowly, cutting bodies off or dropping answers after
//! their headers (through a fault proxy); the S3 server killed and restarted mid-transfer; the spool's or the local store's
//! filesystem full; the API SIGKILLed at random moments. Each suite checks, as it goes, that clients only ever got right
//! bodies or errors with messages, then that the daemon recovered by itself, that nothing
//! acknowledged was lost, and that `s3dedup-cleaner --verify --deep` finds the store consistent.
//! Each prints a `FAULTS` line: faults injected, operations run, files lost.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use rand::Rng;
use reqwest::StatusCode;
use s3dedup_tests::fault_proxy::{Fault, FaultProxy};
use s3dedup_tests::ledger::{Ledger, Until, body_of};
use s3dedup_tests::*;

/// Small multipart parts so multi-part uploads meet the faults too; no read cache, so every
/// read goes to S3; quick timeouts and retries.
const S3_ENV: [(&str, &str); 6] = [
    ("S3DEDUP_STORE__CACHE__ENABLED", "false"),
    ("S3DEDUP_STORE__S3__MULTIPART_THRESHOLD", "5242880"),
    ("S3DEDUP_STORE__S3__PART_SIZE", "5242880"),
    ("S3DEDUP_STORE__S3__READ_TIMEOUT_SECS", "2"),
    ("S3DEDUP_STORE__S3__CONNECT_TIMEOUT_SECS", "2"),
    ("S3DEDUP_STORE__S3__MAX_ATTEMPTS", "3"),
];

fn seed() -> u64 {
    let s = rand::rng().random();
    eprintln!("fault seed {s}");
    s
}

/// The end of every suite: nothing lost, nothing wrong seen, no panic, store consistent.
async fn settle(name: &str, api: &Api, ledger: &Ledger, faults: u64) {
    let (files, lost) = ledger.check_all(&api.url("")).await;
    api.collect_and_verify();
    let log = api.log();
    assert!(!log.contains("panicked"), "API log: {log}");
    assert!(!log.contains(S3_SECRET_KEY), "the S3 secret in the API log");
    report(&format!(
        "FAULTS {name}: {faults} faults injected, {}, {files} files checked, {} lost",
        ledger.summary(),
        lost.len()
    ));
    assert!(lost.is_empty(), "lost files: {lost:#?}");
    assert!(ledger.violations().is_empty(), "{:#?}", ledger.violations());
}

/// An S3 server, a fault proxy in front of it (faithful until told otherwise), and an API
/// using S3 through the proxy.
async fn behind_fault_proxy() -> (S3Server, FaultProxy, Api) {
    let s3 = S3Server::start().unwrap();
    let proxy = FaultProxy::start(s3.addr, seed()).await.unwrap();
    let mut env = S3_ENV.to_vec();
    let endpoint = proxy.endpoint();
    env.push(("S3DEDUP_STORE__S3__ENDPOINT", &endpoint));
    let api = Api::start_with(Backend::S3(&s3), &env).unwrap();
    (s3, proxy, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_errors_slowness_and_cut_bodies_lose_nothing() {
    let (_s3, proxy, api) = behind_fault_proxy().await;
    // One fault in four requests; pauses up to 3 s, past the 2 s read timeout.
    proxy.set_max_delay(Duration::from_secs(3));
    proxy.set_rate(250);
    let ledger = Ledger::new(&[1 << 10, 200 << 10, 7 << 20]);
    ledger
        .run(&[api.url("")], "s3faults", 4, Until::Ops(60), seed())
        .await;
    proxy.set_rate(0);
    eprintln!(
        "{} S3 requests, faults by kind: {:?}",
        proxy.requests(),
        proxy.injected()
    );
    assert!(proxy.total_injected() >= 20, "{:?}", proxy.injected());
    settle("s3-proxy", &api, &ledger, proxy.total_injected()).await;
}

/// S3 answers a read with its headers, then drops the connection before the first body byte:
/// the client gets a 503 saying so, not a 200 whose body breaks (nor, when the drop comes
/// before the API's answer leaves, a connection closed without any answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_dropping_a_read_after_its_headers_is_a_503() {
    let (_s3, proxy, api) = behind_fault_proxy().await;
    let ft = api.ft();
    let content = unique_content("cut-after-headers", 100_000);
    api.ft().put_ok("/cah/f", 1, content.clone()).await;

    proxy.set_only(Some(Fault::CutAfterHeaders));
    proxy.set_rate(1000);
    for _ in 0..3 {
        let r = ft.get_request("/cah/f").send().await.unwrap();
        let said = r
            .headers()
            .get("x-exception")
            .map(|v| v.to_str().unwrap_or("?").to_owned())
            .unwrap_or_default();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{said}");
        assert!(
            said.contains("object store unavailable while reading"),
            "{said}"
        );
    }
    proxy.set_rate(0);
    let r = ft.get_request("/cah/f").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(gunzip(&r.bytes().await.unwrap()), content);
    assert!(!api.log().contains("panicked"), "{}", api.log());
}

/// A large object is read from S3 as several ranges at once (`store.s3.download_concurrency`).
/// Each GET is then several S3 requests, or one with the setting at 1; through S3 errors,
/// pauses and cut answers a GET gives the whole content or an error, never other bytes; and
/// once S3 is healthy again every GET gives the content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_reads_in_ranges_are_whole_or_fail() {
    let (_s3, proxy, api) = behind_fault_proxy().await;
    let ft = api.ft();
    // Random bytes are stored as they are: past two 8 MiB ranges, the last one partial.
    let random = |n: usize| {
        let mut v = vec![0u8; n];
        rand::rng().fill(&mut v[..]);
        v
    };
    let contents = [random((16 << 20) + 4321), random(29 << 20)];
    for (i, c) in contents.iter().enumerate() {
        api.ft().put_ok(&format!("/ranged/{i}"), 1, c.clone()).await;
    }
    let get = |i: usize| {
        let (ft, path) = (&ft, format!("/ranged/{i}"));
        async move {
            let r = ft
                .get_request(&path)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if r.status() != StatusCode::OK {
                return Err(format!("{}", r.status()));
            }
            body_of(r).await.map_err(|e| format!("cut: {e}"))
        }
    };
    for (i, c) in contents.iter().enumerate() {
        let before = proxy.requests();
        assert!(get(i).await.as_ref() == Ok(c), "content {i} intact");
        let requests = proxy.requests() - before;
        assert!(requests >= 3, "content {i} read in {requests} request(s)");
    }

    proxy.set_max_delay(Duration::from_secs(3));
    proxy.set_rate(200);
    let (mut whole, mut failed, mut cut) = (0, 0, 0);
    for round in 0..10 {
        for (i, c) in contents.iter().enumerate() {
            match get(i).await {
                Ok(body) => {
                    assert!(body == *c, "round {round}: content {i} came back different");
                    whole += 1;
                }
                Err(e) if e.starts_with("cut") => cut += 1,
                Err(_) => failed += 1,
            }
        }
    }
    // Every 200 whose body broke off is counted and logged, with what and how far.
    assert_eq!(api.metric("s3dedup_responses_cut_total").await, cut);
    let broke = api.log().matches("a response broke off partway").count() as u64;
    assert_eq!(broke, cut, "{}", api.log());
    if cut > 0 {
        assert!(api.log().contains("GET /ranged/"), "{}", api.log());
    }
    proxy.set_rate(0);
    eprintln!(
        "{whole} whole, {failed} failed, {cut} cut off; faults by kind: {:?}",
        proxy.injected()
    );
    assert!(proxy.total_injected() > 0, "no fault met a range");
    for (i, c) in contents.iter().enumerate() {
        assert!(
            get(i).await.as_ref() == Ok(c),
            "content {i} intact after the faults"
        );
    }
    assert!(!api.log().contains("panicked"), "{}", api.log());

    // One request per object when asked.
    let s3 = S3Server::start().unwrap();
    let proxy = FaultProxy::start(s3.addr, seed()).await.unwrap();
    let endpoint = proxy.endpoint();
    let mut env = S3_ENV.to_vec();
    env.push(("S3DEDUP_STORE__S3__ENDPOINT", &endpoint));
    env.push(("S3DEDUP_STORE__S3__DOWNLOAD_CONCURRENCY", "1"));
    let api = Api::start_with(Backend::S3(&s3), &env).unwrap();
    api.ft().put_ok("/ranged/one", 1, contents[1].clone()).await;
    let before = proxy.requests();
    let r = api.ft().get("/ranged/one").await;
    assert!(body_of(r).await.unwrap() == contents[1], "content intact");
    assert_eq!(proxy.requests() - before, 1, "one GET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_killed_and_restarted_mid_transfer() {
    let mut s3 = S3Server::start().unwrap();
    let api = Api::start_with(Backend::S3(&s3), &S3_ENV).unwrap();
    let ledger = Ledger::new(&[64 << 10, 12 << 20]);
    let clients = ledger.spawn(vec![api.url("")], "s3kill", 3, Until::Ops(40), seed());
    let mut kills = 0;
    while !clients.is_finished() && kills < 4 {
        let wait = rand::rng().random_range(500..2500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        s3.stop();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(700)).await;
        s3.restart().unwrap();
    }
    clients.await.unwrap();
    assert!(kills >= 2, "the workload ended before S3 was killed twice");
    settle("s3-kill", &api, &ledger, kills).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_sigkilled_at_random_moments() {
    // Spool files older than 0 s are leftovers: only one API uses this spool.
    let mut api = Api::start_with(
        Backend::Local,
        &[("S3DEDUP_STORE__SPOOL_MAX_AGE_SECS", "0")],
    )
    .unwrap();
    let ledger = Ledger::new(&[1 << 10, 300 << 10, 3 << 20]);
    // While the API is down, requests fail without an answer: expected here.
    ledger.drops_allowed.store(true, Relaxed);
    let clients = ledger.spawn(vec![api.url("")], "apikill", 4, Until::Ops(80), seed());
    let mut kills = 0;
    while !clients.is_finished() && kills < 6 {
        let wait = rand::rng().random_range(300..1500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        api.restart().unwrap(); // SIGKILL, then start again on the same port and data
        kills += 1;
    }
    clients.await.unwrap();
    assert!(
        kills >= 3,
        "the workload ended before the API was killed three times"
    );
    settle("api-sigkill", &api, &ledger, kills).await;
    // Uploads cut by the kills left spool files; a (graceful) restart removes them.
    let leftovers = api.spool_files().len();
    api.restart().unwrap();
    eprintln!("{leftovers} spool files left by the kills, removed at restart");
    assert!(api.spool_files().is_empty(), "{:?}", api.spool_files());
}

/// A small tmpfs mounted over the spool directory; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount runs");
        assert!(ok.success(), "mounting a tmpfs needs root (CAP_SYS_ADMIN)");
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_filesystem_gives_507_and_recovers() {
    let s3 = S3Server::start().unwrap();
    let api = Api::start_with(Backend::S3(&s3), &S3_ENV).unwrap();
    let spool = api.data_dir.join("spool");
    let _tmpfs = Tmpfs::mount(&spool, "8m");
    let ft = api.ft();
    let put = |path: &str, body: Vec<u8>| ft.put_request(path, 1).body(body).send();
    let before = unique_content("before-full", 100_000);
    assert_eq!(
        put("/full/before", before.clone()).await.unwrap().status(),
        200
    );

    // Leave about 1 MiB free, then upload 4 MiB of incompressible content.
    let filler = spool.join("filler");
    std::fs::write(&filler, vec![1u8; 7 << 20]).unwrap();
    let mut big = vec![0u8; 4 << 20];
    rand::rng().fill(&mut big[..]);
    let mut refused = 0;
    for i in 0..5 {
        let r = put(&format!("/full/big{i}"), big.clone()).await.unwrap();
        assert_eq!(r.status(), StatusCode::INSUFFICIENT_STORAGE);
        let why = r.headers()["x-exception"].to_str().unwrap().to_owned();
        assert!(why.contains("spool") || why.contains("space"), "{why}");
        refused += 1;
    }
    // Reads and small writes go on.
    let r = ft.get_request("/full/before").send().await.unwrap();
    assert!(body_of(r).await.unwrap() == before);
    assert_eq!(
        put("/full/small", b"tiny".to_vec()).await.unwrap().status(),
        200
    );
    let left: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != "filler")
        .collect();
    assert!(left.is_empty(), "refused uploads left {left:?}");

    std::fs::remove_file(&filler).unwrap();
    let r = put("/full/big-after", big.clone()).await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.headers().get("x-exception"));
    for i in 0..5 {
        let r = ft
            .get_request(&format!("/full/big{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "a refused upload was not stored");
    }
    let r = ft.get_request("/full/big-after").send().await.unwrap();
    assert!(body_of(r).await.unwrap() == big);
    api.collect_and_verify();
    report(&format!(
        "FAULTS spool-full: {refused} uploads refused with 507, 0 files lost"
    ));
}

/// Fills `dir` (a small filesystem) until it refuses more, in a file named `name`.
fn fill_up(dir: &Path, name: &str) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join(name)).unwrap();
    let chunk = vec![7u8; 16 << 10];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => return,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
}

/// The local object store's own filesystem full (objects on their own disk, the spool
/// elsewhere): uploads that do not fit are refused with 507 and leave no trace, small ones that
/// fit go on, reads go on, and once there is space again everything is stored and readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_local_store_gives_507_and_recovers() {
    let objects = tempfile::tempdir().unwrap();
    let _tmpfs = Tmpfs::mount(objects.path(), "4m");
    let path = objects.path().to_str().unwrap();
    let api = Api::start_with(Backend::Local, &[("S3DEDUP_STORE__LOCAL__PATH", path)]).unwrap();
    let ft = api.ft();
    let put = |path: &str, body: Vec<u8>| ft.put_request(path, 1).body(body).send();
    let get = |path: &str| ft.get_request(path).send();
    let before = unique_content("before-full", 100_000);
    assert_eq!(
        put("/lf/before", before.clone()).await.unwrap().status(),
        200
    );

    // Under 1 MiB left: 1 MiB of random content (through a spool file) does not fit, a small
    // upload does.
    std::fs::write(objects.path().join("filler"), vec![1u8; 3 << 20]).unwrap();
    let mut big = vec![0u8; 1 << 20];
    rand::rng().fill(&mut big[..]);
    let mut refused = 0;
    for i in 0..3 {
        let r = put(&format!("/lf/big{i}"), big.clone()).await.unwrap();
        assert_eq!(r.status(), StatusCode::INSUFFICIENT_STORAGE);
        let why = r.headers()["x-exception"].to_str().unwrap().to_owned();
        assert!(why.contains("out of space"), "{why}");
        refused += 1;
    }
    assert_eq!(
        put("/lf/tiny", b"tiny".to_vec()).await.unwrap().status(),
        200
    );

    // No room at all: a small upload (held in memory, written by the flushing thread) too.
    fill_up(objects.path(), "filler-rest");
    let mut small = vec![0u8; 30_000];
    rand::rng().fill(&mut small[..]);
    let r = put("/lf/small", small.clone()).await.unwrap();
    assert_eq!(r.status(), StatusCode::INSUFFICIENT_STORAGE);
    refused += 1;
    assert!(body_of(get("/lf/before").await.unwrap()).await.unwrap() == before);
    for p in ["/lf/big0", "/lf/big1", "/lf/big2", "/lf/small"] {
        assert_eq!(get(p).await.unwrap().status(), 404, "{p} was refused");
    }
    let strays: Vec<_> = walk(objects.path())
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            !name.starts_with("filler") && name.len() != 64
        })
        .collect();
    assert!(strays.is_empty(), "refused uploads left {strays:?}");
    assert!(api.spool_files().is_empty(), "{:?}", api.spool_files());

    std::fs::remove_file(objects.path().join("filler")).unwrap();
    std::fs::remove_file(objects.path().join("filler-rest")).unwrap();
    for (p, body) in [("/lf/big-after", &big), ("/lf/small", &small)] {
        let r = put(p, body.clone()).await.unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.headers().get("x-exception"));
        assert!(body_of(get(p).await.unwrap()).await.unwrap() == *body);
    }
    api.collect_and_verify();
    let log = api.log();
    assert!(!log.contains("panicked"), "API log: {log}");
    report(&format!(
        "FAULTS local-store-full: {refused} uploads refused with 507, 0 files lost"
    ));
}
