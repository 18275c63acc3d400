//! Small contents kept in their metadata rows and objects are one store: whichever way a
//! content was stored, under whatever `store.inline_max_bytes` was in force, it deduplicates,
//! reads, is collected and verifies the same.

use reqwest::StatusCode;
use s3dedup_tests::*;

const THRESHOLD: &str = "S3DEDUP_STORE__INLINE_MAX_BYTES";

/// `n` small contents tagged `tag`.
fn small(tag: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| unique_content(tag, 1000 + i)).collect()
}

async fn put_all(api: &Api, dir: &str, contents: &[Vec<u8>]) {
    for (i, c) in contents.iter().enumerate() {
        api.ft().put_ok(&format!("/{dir}/{i}"), 1, c.clone()).await;
    }
}

async fn assert_all(api: &Api, dir: &str, contents: &[Vec<u8>]) {
    for (i, c) in contents.iter().enumerate() {
        let path = format!("/{dir}/{i}");
        assert_eq!(api.ft().content(&path).await.unwrap(), *c, "{path}");
    }
}

async fn objects(s3: &S3Server) -> usize {
    s3.list_keys().await.unwrap().len()
}

/// The threshold lowered to 0, raised, lowered and raised again over one store on S3: each
/// content is stored once, as an object or in its row as the threshold said when it first
/// came, and found by later uploads either way; every file reads back; the cleaner at grace 0
/// removes both kinds, and deep verification finds nothing wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_and_object_contents_interchange_as_the_threshold_moves() {
    let s3 = S3Server::start().unwrap();
    let mut api = Api::start_with(Backend::S3(&s3), &[(THRESHOLD, "0")]).unwrap();
    let (a, b, c) = (small("a", 10), small("b", 10), small("c", 10));

    put_all(&api, "a", &a).await;
    assert_eq!(
        objects(&s3).await,
        10,
        "threshold 0: every content an object"
    );

    api.restart_setting(THRESHOLD, "4096").unwrap();
    put_all(&api, "b", &b).await;
    put_all(&api, "a2", &a).await;
    assert_eq!(
        objects(&s3).await,
        10,
        "new small contents in rows, old ones referenced"
    );
    assert_eq!(api.stored_contents(), 20);
    for (dir, contents) in [("a", &a), ("b", &b), ("a2", &a)] {
        assert_all(&api, dir, contents).await;
    }

    api.restart_setting(THRESHOLD, "0").unwrap();
    put_all(&api, "b2", &b).await;
    assert_eq!(
        objects(&s3).await,
        10,
        "contents in rows are found by object uploads"
    );
    put_all(&api, "c", &c).await;
    assert_eq!(objects(&s3).await, 20);
    assert_eq!(api.stored_contents(), 30);
    for (dir, contents) in [("a", &a), ("b", &b), ("a2", &a), ("b2", &b), ("c", &c)] {
        assert_all(&api, dir, contents).await;
    }

    // `a` (objects) loses all references, `b` (rows) one of two, half of `c` (objects) goes.
    let ft = api.ft();
    let mut gone: Vec<String> = (0..10)
        .flat_map(|i| [format!("/a/{i}"), format!("/a2/{i}")])
        .collect();
    gone.extend((0..10).map(|i| format!("/b/{i}")));
    gone.extend((0..5).map(|i| format!("/c/{i}")));
    for path in &gone {
        let r = ft.delete_request(path, 2).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    api.collect_and_verify();
    assert_eq!(
        objects(&s3).await,
        5,
        "the objects of a and of half of c are deleted"
    );
    assert_eq!(api.stored_contents(), 15, "b's rows stay, referenced by b2");
    assert_all(&api, "b2", &b).await;
    for (i, content) in c.iter().enumerate().skip(5) {
        assert_eq!(ft.content(&format!("/c/{i}")).await.unwrap(), *content);
    }

    // Back above: `a`, collected, comes again and is kept in rows this time.
    api.restart_setting(THRESHOLD, "4096").unwrap();
    put_all(&api, "a3", &a).await;
    assert_eq!(objects(&s3).await, 5);
    assert_all(&api, "a3", &a).await;
    assert_eq!(api.stored_contents(), 25);
    // Unreferenced rows go at grace 0 like objects: b2 deleted leaves b with no reference.
    for i in 0..10 {
        let r = ft
            .delete_request(&format!("/b2/{i}"), 2)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    api.collect_and_verify();
    assert_eq!(api.stored_contents(), 15);
    for path in ["/b2/0", "/b/3", "/a/1"] {
        assert_eq!(ft.get(path).await.status(), StatusCode::NOT_FOUND, "{path}");
    }
}

/// A small upload costs no object-store request on S3, and a content above the threshold is
/// an object: the threshold is in stored (gzip) bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_threshold_is_in_stored_bytes() {
    let s3 = S3Server::start().unwrap();
    let api = Api::start_with(Backend::S3(&s3), &[(THRESHOLD, "2000")]).unwrap();
    // 100 KB of zeros compresses to about 100 bytes: kept in the row.
    let zeros = vec![0u8; 100_000];
    api.ft().put_ok("/zeros", 1, zeros.clone()).await;
    assert_eq!(objects(&s3).await, 0);
    // 5,000 bytes of hex text compress to about 2,700: an object.
    let text = unique_content("text", 5000);
    api.ft().put_ok("/text", 1, text.clone()).await;
    assert_eq!(objects(&s3).await, 1);
    assert_eq!(api.ft().content("/zeros").await.unwrap(), zeros);
    assert_eq!(api.ft().content("/text").await.unwrap(), text);
    api.verify_deep();
}
