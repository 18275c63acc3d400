//! Advisory locks held by real processes (`lock-holder`), for both backends: exclusion across
//! processes, shared locks coexisting, waiting, and release when the holder is SIGKILLed.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use s3dedup_common::locks::{FileLocks, LockManager, LockMode, PgLocks};
use s3dedup_tests::*;

struct Holder {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Holder {
    fn start(backend: &str, name: &str, mode: &str) -> Holder {
        let mut child = Command::new(bin("lock-holder"))
            .args([backend, name, mode, "20"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("lock-holder starts");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        Holder { child, out }
    }

    /// Waits for the next line the holder prints.
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).expect("read");
        l.trim().to_owned()
    }

    fn release(&mut self) {
        drop(self.child.stdin.take());
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn cross_process_suite(backend: &str, here: &dyn LockManager) {
    // An exclusive lock held by another process excludes us, in both modes.
    let mut a = Holder::start(backend, "x", "exclusive");
    assert_eq!(a.line(), "locked");
    assert!(
        here.try_lock("x", LockMode::Exclusive)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        here.try_lock("x", LockMode::Shared)
            .await
            .unwrap()
            .is_none()
    );
    // Other keys are independent.
    assert!(
        here.try_lock("y", LockMode::Exclusive)
            .await
            .unwrap()
            .is_some()
    );

    // Held across two processes: a second holder waits until the first releases.
    let mut b = Holder::start(backend, "x", "exclusive");
    std::thread::sleep(Duration::from_millis(300));
    a.release();
    assert_eq!(a.line(), "released");
    assert_eq!(
        b.line(),
        "locked",
        "the waiting process got the lock after the release"
    );

    // SIGKILL of the holder releases its lock.
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let g = here
        .lock("x", LockMode::Exclusive, Duration::from_secs(10))
        .await
        .expect("a killed holder's lock is released");
    g.release().await;

    // Shared locks coexist across processes and keep exclusive out.
    let mut s1 = Holder::start(backend, "s", "shared");
    let mut s2 = Holder::start(backend, "s", "shared");
    assert_eq!(s1.line(), "locked");
    assert_eq!(s2.line(), "locked");
    let shared_here = here.try_lock("s", LockMode::Shared).await.unwrap();
    assert!(shared_here.is_some(), "a third shared holder fits");
    shared_here.unwrap().release().await;
    assert!(
        here.try_lock("s", LockMode::Exclusive)
            .await
            .unwrap()
            .is_none()
    );
    s1.release();
    assert_eq!(s1.line(), "released");
    assert!(
        here.try_lock("s", LockMode::Exclusive)
            .await
            .unwrap()
            .is_none(),
        "s2 still holds it"
    );
    s2.child.kill().unwrap();
    s2.child.wait().unwrap();
    let g = here
        .lock("s", LockMode::Exclusive, Duration::from_secs(10))
        .await;
    assert!(g.is_ok(), "all shared holders gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_locks_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metadata.sqlite3.locks");
    let here = FileLocks::open(&path).unwrap();
    cross_process_suite(&format!("file:{}", path.display()), &here).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run through tests/run-all.sh"]
async fn postgres_locks_across_processes() {
    let conninfo = pg_conninfo();
    let here = PgLocks::new(conninfo.parse().unwrap(), 2);
    cross_process_suite(&format!("postgres:{conninfo}"), &here).await;
}

/// What an operator sees of contention: an upload that waited for a blob lock another process
/// held, and one that gave up, on /metrics; the one that gave up is a 503 naming the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_waits_and_timeouts_are_on_metrics() {
    let api = Api::start_with(Backend::Local, &[("S3DEDUP_API__LOCK_TIMEOUT_SECS", "2")]).unwrap();
    let ft = api.ft();
    let backend = format!(
        "file:{}",
        api.data_dir.join("metadata.sqlite3.locks").display()
    );
    let content = unique_content("contended", 5000);
    let lock = blob_lock_of(&content);
    assert_eq!(api.metric("s3dedup_lock_waits_total").await, 0);

    // Held for a second, well within the timeout: the upload waits, then stores.
    let mut holder = Holder::start(&backend, &lock, "exclusive");
    assert_eq!(holder.line(), "locked");
    let put = tokio::spawn({
        let (ft, content) = (ft.clone(), content.clone());
        async move { ft.put("/contended/a", 1, content).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    holder.release();
    assert_eq!(holder.line(), "released");
    let r = put.await.unwrap();
    assert_eq!(r.status(), 200, "{}", why(&r));
    assert_eq!(api.metric("s3dedup_lock_waits_total").await, 1);
    assert_eq!(api.metric("s3dedup_lock_timeouts_total").await, 0);
    let text = ft.metrics().await;
    let waited: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("s3dedup_lock_wait_seconds_total ")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no lock wait seconds in {text}"));
    assert!((0.5..30.0).contains(&waited), "waited {waited} s");

    // Held past the timeout: a 503 that names the lock, counted as a timeout.
    let mut holder = Holder::start(&backend, &lock, "exclusive");
    assert_eq!(holder.line(), "locked");
    let r = ft.put("/contended/b", 1, content.clone()).await;
    assert_eq!(r.status(), 503, "{}", why(&r));
    assert!(why(&r).contains(&lock), "{}", why(&r));
    assert_eq!(api.metric("s3dedup_lock_timeouts_total").await, 1);
    assert_eq!(api.metric("s3dedup_lock_waits_total").await, 1);
    holder.release();
    assert_eq!(holder.line(), "released");
    assert_eq!(
        ft.content("/contended/b").await,
        None,
        "the refused upload left nothing"
    );
    assert_eq!(ft.content("/contended/a").await, Some(content));
}
