//! The API's local read cache in front of a real S3 server: hits skip S3, the cache survives a
//! restart, stays within its size bound, is never stale and never serves a deleted path.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use s3dedup_tests::*;

/// Waits until the cache holds `n` objects (fills finish after the response does).
async fn wait_entries(api: &Api, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let have = api.metric("s3dedup_cache_entries").await;
        if have == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "cache has {have} entries, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_skip_s3_and_survive_a_restart() {
    let mut s3 = S3Server::start().unwrap();
    let mut api = Api::start(Backend::S3(&s3)).unwrap();
    let ft = api.ft();
    let body = unique_content("cached", 300_000);
    api.ft().put_ok("/t/in", 1, body.to_vec()).await;
    assert_eq!(ft.content("/t/in").await.unwrap(), body);
    assert_eq!(api.metric("s3dedup_cache_misses_total").await, 1);
    wait_entries(&api, 1).await;

    // Served from the cache: S3 is not needed any more.
    s3.stop();
    for _ in 0..3 {
        assert_eq!(ft.content("/t/in").await.unwrap(), body);
    }
    assert_eq!(api.metric("s3dedup_cache_hits_total").await, 3);

    // ...also after a restart, which finds the cache on disk.
    s3.restart().unwrap();
    api.restart().unwrap();
    assert_eq!(api.metric("s3dedup_cache_entries").await, 1);
    assert_eq!(ft.content("/t/in").await.unwrap(), body);
    assert_eq!(api.metric("s3dedup_cache_hits_total").await, 1);
    assert_eq!(api.metric("s3dedup_cache_misses_total").await, 0);

    // A deleted path is gone although its content is still cached.
    let r = ft.delete_request("/t/in", 2).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(ft.content("/t/in").await, None);
}

/// The check that decides whether a copy is kept (inflating the whole object) runs on a thread
/// of its own at the lowest priority, so it never takes a core from the requests being served;
/// the copies it passes are kept all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_are_checked_at_the_lowest_priority() {
    let s3 = S3Server::start().unwrap();
    let api = Api::start(Backend::S3(&s3)).unwrap();
    let ft = api.ft();
    let body = unique_content("checked-idle", 3 << 20);
    api.ft().put_ok("/idle/in", 1, body.to_vec()).await;
    assert_eq!(ft.content("/idle/in").await.unwrap(), body);
    wait_entries(&api, 1).await;
    let tasks = std::fs::read_dir(format!("/proc/{}/task", api.proc.pid())).unwrap();
    let nice_of_checker = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
        .find(|stat| stat.contains("(cache-check)"))
        .map(|stat| {
            // Fields after the parenthesised name: state is field 3, nice field 19.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            rest.split(' ').nth(16).unwrap().parse::<i32>().unwrap()
        });
    assert_eq!(nice_of_checker, Some(19));
}

/// A judge reads a submission right after it is uploaded, and each worker a new test input: a
/// small upload is kept as it is stored, so those first reads do not go to S3 either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_uploads_are_kept_as_they_are_stored() {
    let mut s3 = S3Server::start().unwrap();
    let api = Api::start(Backend::S3(&s3)).unwrap();
    let ft = api.ft();
    let raw = unique_content("submission", 20_000);
    api.ft().put_ok("/k/raw", 1, raw.to_vec()).await;
    // The way the Filetracker client uploads: pre-gzipped, with its digest and size.
    let pre = unique_content("input", 30_000);
    let r = ft
        .put_request("/k/gz", 1)
        .header("Content-Encoding", "gzip")
        .header("SHA256-Checksum", sha256_hex(&pre))
        .header("Logical-Size", pre.len().to_string())
        .body(gzip(&pre))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // A large upload is not (its first read fills the cache).
    let large = unique_content("large", 300_000);
    api.ft().put_ok("/k/large", 1, large.to_vec()).await;
    wait_entries(&api, 2).await;

    s3.stop();
    assert_eq!(ft.content("/k/raw").await.unwrap(), raw);
    assert_eq!(ft.content("/k/gz").await.unwrap(), pre);
    assert_eq!(api.metric("s3dedup_cache_hits_total").await, 2);
    assert_eq!(api.metric("s3dedup_cache_misses_total").await, 0);
    let r = ft.get_request("/k/large").send().await.unwrap();
    assert!(
        r.status().is_server_error(),
        "a large upload's first read needs S3: {}",
        r.status()
    );
}

/// Cache entries are not flushed to disk when they are made, so after a crash of the machine one
/// may have lost its content: an entry an earlier run left is checked on its first hit, and one
/// that does not hold its content is read through from S3 and made again, never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_an_earlier_run_left_are_checked_before_they_are_served() {
    let mut s3 = S3Server::start().unwrap();
    let mut api = Api::start(Backend::S3(&s3)).unwrap();
    let ft = api.ft();
    // Kept as uploaded (small ones), or filled by a read (a large one).
    let zeroed = unique_content("zeroed", 20_000);
    let intact = unique_content("intact", 20_000);
    let flipped = unique_content("flipped", 300_000);
    api.ft().put_ok("/c/zeroed", 1, zeroed.to_vec()).await;
    api.ft().put_ok("/c/intact", 1, intact.to_vec()).await;
    api.ft().put_ok("/c/flipped", 1, flipped.to_vec()).await;
    assert_eq!(ft.content("/c/flipped").await.unwrap(), flipped);
    wait_entries(&api, 3).await;

    api.proc.kill();
    let entry = |body: &[u8]| api.data_dir.join("cache").join(sha256_hex(body));
    // What a crash before writeback can leave: the length, but zeros.
    let len = std::fs::metadata(entry(&zeroed)).unwrap().len() as usize;
    std::fs::write(entry(&zeroed), vec![0u8; len]).unwrap();
    // And a copy damaged on disk.
    let mut bytes = std::fs::read(entry(&flipped)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(entry(&flipped), bytes).unwrap();
    api.restart().unwrap();
    assert_eq!(api.metric("s3dedup_cache_entries").await, 3);

    for (path, body) in [
        ("/c/zeroed", &zeroed),
        ("/c/intact", &intact),
        ("/c/flipped", &flipped),
    ] {
        assert_eq!(&ft.content(path).await.unwrap(), body, "{path}");
    }
    assert_eq!(api.metric("s3dedup_cache_hits_total").await, 1);
    assert_eq!(api.metric("s3dedup_cache_misses_total").await, 2);
    assert!(
        api.log().contains("does not hold its content"),
        "{}",
        api.log()
    );

    // Made again from S3: served from the cache from now on.
    wait_entries(&api, 3).await;
    s3.stop();
    for (path, body) in [("/c/zeroed", &zeroed), ("/c/flipped", &flipped)] {
        assert_eq!(&ft.content(path).await.unwrap(), body, "{path}");
    }
    assert_eq!(api.metric("s3dedup_cache_hits_total").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_verified_content_is_kept() {
    let s3 = S3Server::start().unwrap();
    let api = Api::start(Backend::S3(&s3)).unwrap();
    let ft = api.ft();
    // Stored larger than the spool keeps in memory, so the PUT does not fill the cache itself.
    let good = unique_content("good", 200_000);
    api.ft().put_ok("/v/good", 1, good.to_vec()).await;
    let key = sharded_key(&sha256_hex(&good));
    let stored = s3
        .client()
        .get_object()
        .bucket(S3_BUCKET)
        .key(&key)
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .to_vec();
    // Replace the object in the bucket with other bytes: the cache must not keep them under the
    // wrong digest.
    let other = unique_content("other", 200_000);
    s3.put_raw(&key, gzip(&other)).await;
    // The sizes differ: an error that says so, never a 200 with other bytes.
    let r = ft.get_request("/v/good").send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::INTERNAL_SERVER_ERROR);
    let why = r.headers()["x-exception"].to_str().unwrap().to_owned();
    assert!(why.contains("where its metadata says"), "{why}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(api.metric("s3dedup_cache_entries").await, 0);

    // Cached content is the content of its digest, whatever happens in the bucket later.
    s3.put_raw(&key, stored).await;
    assert_eq!(ft.content("/v/good").await.unwrap(), good);
    wait_entries(&api, 1).await;
    s3.put_raw(&key, gzip(&other)).await;
    assert_eq!(ft.content("/v/good").await.unwrap(), good);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_bound_evicts_least_recently_used() {
    let s3 = S3Server::start().unwrap();
    let api = Api::start_with(
        Backend::S3(&s3),
        &[("S3DEDUP_STORE__CACHE__MAX_SIZE_MB", "1")],
    )
    .unwrap();
    let ft = api.ft();
    // Random content does not compress: each object is ~101 KB, so ten fit in the bound.
    let bodies: Vec<Vec<u8>> = (0..14)
        .map(|i| {
            let mut b = vec![0; 96_000];
            rand_fill(&mut b, i);
            b
        })
        .collect();
    for (i, b) in bodies.iter().enumerate() {
        api.ft().put_ok(&format!("/l/{i}"), 1, b.to_vec()).await;
    }
    // Read 0 and 1 first, then the rest, touching 0 again halfway.
    for i in 0..14 {
        assert_eq!(
            ft.content(&format!("/l/{i}")).await.as_ref(),
            Some(&bodies[i])
        );
        wait_cached(&api, &bodies[i]).await;
        if i == 7 {
            assert_eq!(ft.content("/l/0").await.as_ref(), Some(&bodies[0]));
        }
    }
    let bytes = api.metric("s3dedup_cache_bytes").await;
    assert!(bytes <= 1 << 20, "cache holds {bytes} bytes");
    let on_disk: u64 = walk(&api.data_dir.join("cache"))
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(on_disk <= 1 << 20, "cache directory holds {on_disk} bytes");
    // Ten fit. 1 was used longest ago and is gone; 0 (used again halfway) and 13 are kept.
    assert_eq!(api.metric("s3dedup_cache_entries").await, 10);
    let misses = api.metric("s3dedup_cache_misses_total").await;
    ft.content("/l/13").await.unwrap();
    ft.content("/l/0").await.unwrap();
    assert_eq!(api.metric("s3dedup_cache_misses_total").await, misses);
    ft.content("/l/1").await.unwrap();
    assert_eq!(api.metric("s3dedup_cache_misses_total").await, misses + 1);
}

/// Waits until the fill of `body`'s object has landed in the cache directory.
async fn wait_cached(api: &Api, body: &[u8]) {
    let file = api.data_dir.join("cache").join(sha256_hex(body));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !file.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Overwrites `b` with bytes that do not compress (seeded, so reruns are alike).
fn rand_fill(b: &mut [u8], seed: usize) {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed as u64;
    for byte in b.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
}

/// One content can come back stored as other gzip bytes (a client's own gzip after the server's
/// was collected): a cached copy of the old encoding must not be served for the new row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_encoding_of_cached_content_is_read_through() {
    let s3 = S3Server::start().unwrap();
    let api = Api::start(Backend::S3(&s3)).unwrap();
    let ft = api.ft();
    let body = unique_content("encodings", 200_000);
    api.ft().put_ok("/e/raw", 1, body.to_vec()).await;
    assert_eq!(ft.content("/e/raw").await.unwrap(), body);
    wait_cached(&api, &body).await;

    let r = ft.delete_request("/e/raw", 2).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut cleaner = api.sibling("s3dedup-cleaner");
    cleaner.args(["--grace-secs", "0"]);
    assert!(cleaner.status().unwrap().success());
    assert!(
        s3.list_keys().await.unwrap().is_empty(),
        "the blob was collected"
    );

    // The client's gzip (best compression) differs from the server's level-1 bytes.
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut e, &body).unwrap();
    let theirs = e.finish().unwrap();
    let r = ft
        .put_request("/e/gz", 3)
        .header("Content-Encoding", "gzip")
        .header("SHA256-Checksum", sha256_hex(&body))
        .header("Logical-Size", body.len().to_string())
        .body(theirs)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let misses = api.metric("s3dedup_cache_misses_total").await;
    assert_eq!(ft.content("/e/gz").await.unwrap(), body);
    assert_eq!(api.metric("s3dedup_cache_misses_total").await, misses + 1);
}
