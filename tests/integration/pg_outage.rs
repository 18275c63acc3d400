//! PostgreSQL stopped while the API serves: 503s with a message (never a false 404), the daemon
//! keeps running, and it recovers by itself when PostgreSQL returns, with nothing lost.
//! Its own test binary, because it stops the server every PostgreSQL test shares.

use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use s3dedup_tests::*;

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
    let schema = unique_schema("outage");
    let env = pg_env(&schema);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut api = Api::start_with(Backend::Local, &env).unwrap();
    let http = reqwest::Client::new();
    let content = unique_content("outage", 20_000);
    let base = api.url("");
    let put = |path: &str, v: i64, body: Vec<u8>| {
        http.put(format!("{base}/files{path}?last_modified={}", lm(v)))
            .body(body)
            .send()
    };
    assert_eq!(
        put("/kept", 1, content.clone()).await.unwrap().status(),
        StatusCode::OK
    );

    pg_ctl("stop");
    let during: Vec<(&str, reqwest::Response)> = vec![
        (
            "GET",
            http.get(api.url("/files/kept")).send().await.unwrap(),
        ),
        (
            "HEAD",
            http.head(api.url("/files/kept")).send().await.unwrap(),
        ),
        (
            "GET missing",
            http.get(api.url("/files/never")).send().await.unwrap(),
        ),
        ("PUT", put("/new", 1, b"x".to_vec()).await.unwrap()),
        (
            "DELETE",
            http.delete(api.url(&format!("/files/kept?last_modified={}", lm(5))))
                .send()
                .await
                .unwrap(),
        ),
        ("LIST", http.get(api.url("/list/")).send().await.unwrap()),
        ("health", http.get(api.url("/health")).send().await.unwrap()),
    ];
    for (what, r) in &during {
        assert_eq!(
            r.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "{what} while PostgreSQL is down"
        );
        if *what != "HEAD" && *what != "health" {
            let msg = r.headers()["x-exception"].to_str().unwrap();
            assert!(msg.contains("metadata"), "{what}: {msg}");
        }
    }
    assert!(
        api.proc.child.try_wait().unwrap().is_none(),
        "the daemon keeps running"
    );

    pg_ctl("start");
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        let r = http.get(api.url("/files/kept")).send().await.unwrap();
        if r.status() != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(r.status(), StatusCode::OK, "recovered by itself");
    assert_eq!(gunzip(&r.bytes().await.unwrap()), content, "nothing lost");
    assert_eq!(
        http.get(api.url("/files/new"))
            .send()
            .await
            .unwrap()
            .status(),
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
    api.proc.kill();
}
