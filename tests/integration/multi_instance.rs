//! Several `s3dedup-api` processes on one PostgreSQL and one real S3 server process, as an
//! operator runs them behind a load balancer. Needs PostgreSQL: run through tests/run-all.sh.

use std::time::Duration;

use reqwest::StatusCode;
use s3dedup_common::locks::{LockManager, LockMode, PgLocks, blob_lock};
use s3dedup_common::meta::MetaStore;
use s3dedup_tests::*;

struct Cluster {
    s3: S3Server,
    apis: Vec<Api>,
    schema: String,
}

impl Cluster {
    fn start(instances: usize) -> Cluster {
        let s3 = S3Server::start().expect("s3 server");
        let schema = unique_schema("multi");
        let env = pg_env(&schema);
        let apis = (0..instances)
            .map(|_| Api::start_with(Backend::S3(&s3), &env).expect("api starts"))
            .collect();
        Cluster { s3, apis, schema }
    }

    /// The store is consistent: refcounts match the files, and every live blob's bytes (in its
    /// row, or its object in the bucket) have the SHA-256 it is named by.
    async fn assert_consistent(&self) {
        let meta = pg_meta(&self.schema).await;
        assert_eq!(
            meta.refcount_mismatches().await.unwrap(),
            vec![],
            "refcounts match the files"
        );
        let client = self.s3.client();
        let mut after = None;
        let mut checked = 0;
        loop {
            let page = meta.list_blobs(after.as_ref(), 100).await.unwrap();
            let Some(last) = page.last() else { break };
            after = Some(last.info.digest);
            for row in page.iter().filter(|r| r.live) {
                let hex = row.info.digest.to_hex();
                let bytes = if row.inline {
                    let content = meta.inline_content(&row.info.digest).await.unwrap();
                    content.unwrap_or_else(|| panic!("inline blob {hex} has no bytes"))
                } else {
                    let key = format!("{}/{}/{hex}", &hex[..2], &hex[2..4]);
                    let obj = client
                        .get_object()
                        .bucket(S3_BUCKET)
                        .key(&key)
                        .send()
                        .await
                        .unwrap_or_else(|e| panic!("live blob {hex} has no object: {e}"));
                    obj.body.collect().await.unwrap().into_bytes()
                };
                assert_eq!(
                    bytes.len() as u64,
                    row.info.stored_size,
                    "{hex} stored size"
                );
                assert_eq!(
                    sha256_hex(&gunzip(&bytes)),
                    hex,
                    "object {hex} holds its content"
                );
                checked += 1;
            }
        }
        eprintln!("verified {checked} live blobs against their bytes");
    }
}

/// Many clients, two instances, overlapping paths, contents and versions (equal ones too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run through tests/run-all.sh"]
async fn two_instances_many_clients_lose_nothing() {
    let cluster = Cluster::start(2);
    let workload = Workload::new("multi", 16, 120, 8);
    let urls: Vec<String> = cluster.apis.iter().map(|a| a.url("")).collect();
    let outcome = workload.run(&urls).await;
    workload.check_final(&outcome, &urls).await;
    cluster.assert_consistent().await;
}

/// SIGKILL of one instance in the middle of uploads: the other keeps serving, no metadata points
/// at a missing object, and no lock stays held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run through tests/run-all.sh"]
async fn sigkill_of_one_instance_mid_upload() {
    let mut cluster = Cluster::start(2);
    let victim = cluster.apis[0].ft();
    // Slow uploads of new contents to the victim, cut off by the kill.
    let big: Vec<Vec<u8>> = (0..6)
        .map(|i| unique_content(&format!("killed{i}"), 3 << 20))
        .collect();
    let mut uploads = Vec::new();
    for (i, content) in big.iter().cloned().enumerate() {
        let victim = victim.clone();
        uploads.push(tokio::spawn(async move {
            let chunks: Vec<Vec<u8>> = content.chunks(64 << 10).map(<[u8]>::to_vec).collect();
            let slow = futures::StreamExt::then(futures::stream::iter(chunks), |c| async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok::<_, std::io::Error>(c)
            });
            victim
                .put_request(&format!("/killed/{i}"), 1)
                .body(reqwest::Body::wrap_stream(slow))
                .send()
                .await
                .map(|r| r.status())
        }));
    }
    // Small uploads that complete on the victim before the kill (so it held locks and rows).
    for i in 0..20 {
        victim
            .put_ok(&format!("/small/{i}"), 1, unique_content("small", 1000 + i))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.apis[0].proc.child.kill().unwrap();
    cluster.apis[0].proc.child.wait().unwrap();
    for u in uploads {
        let _ = u.await.unwrap(); // errors are expected: the server died
    }
    // The survivor serves reads and writes, including the contents the victim was uploading.
    let survivor = cluster.apis[1].ft();
    for (i, content) in big.iter().enumerate() {
        let path = format!("/after/{i}");
        survivor.put_ok(&path, 2, content.clone()).await;
        assert_eq!(survivor.content(&path).await.as_ref(), Some(content));
    }
    for i in 0..20 {
        let r = survivor.get(&format!("/small/{i}")).await;
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "files acknowledged by the dead instance survive"
        );
    }
    cluster.assert_consistent().await;
    // No advisory lock of the dead instance stays held.
    let locks = PgLocks::new(pg_conninfo().parse().unwrap(), 1).in_schema(&cluster.schema);
    for content in &big {
        let digest = sha256_hex(content).parse().unwrap();
        let g = locks
            .try_lock(&blob_lock(&digest), LockMode::Exclusive)
            .await
            .unwrap();
        assert!(g.is_some(), "lock of {digest} still held");
    }
}
