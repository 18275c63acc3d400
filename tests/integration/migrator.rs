//! `s3dedup-migrator` importing Filetracker v1 and v2 directories beside a running API.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use reqwest::StatusCode;
use s3dedup_tests::*;

fn set_mtime(path: &Path, version: i64, symlink: bool) {
    let mut c = Command::new("touch");
    if symlink {
        c.arg("-h");
    }
    let ok = c
        .arg("-d")
        .arg(format!("@{version}"))
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "touch {}", path.display());
}

/// Adds `name` to a v2 data directory at `root` as filetracker-server lays it out: a gzip blob
/// named by the content's digest (`corrupt`: with a broken trailer), and a symlink to it whose
/// own mtime is the version. Returns the blob's path.
fn add_v2(root: &Path, name: &str, content: &[u8], version: i64, corrupt: bool) -> PathBuf {
    let hex = sha256_hex(content);
    let blob = root.join("blobs").join(&hex[..2]).join(&hex);
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    let mut gz = gzip(content);
    if corrupt {
        let n = gz.len();
        gz[n - 5] ^= 0x55; // breaks the CRC / length trailer
    }
    std::fs::write(&blob, gz).unwrap();
    // v2 stores non-ASCII names double-encoded.
    let stored: String = name.bytes().map(char::from).collect();
    let link = root.join("links").join(&stored[1..]);
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    let depth = name.matches('/').count();
    let rel = format!("{}blobs/{}/{hex}", "../".repeat(depth), &hex[..2]);
    std::os::unix::fs::symlink(&rel, &link).unwrap();
    set_mtime(&link, version, true);
    blob
}

fn migrate(api: &Api, source: &str) -> (bool, String) {
    let out = api
        .sibling("s3dedup-migrator")
        .args(["--source", source])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Starts `s3dedup-migrator` on `source` in the background, reading at most `rate` bytes/s,
/// its standard output to `out`.
fn spawn_migrator(api: &Api, source: &str, rate: u64, out: Stdio) -> Proc {
    let child = api
        .sibling("s3dedup-migrator")
        .args(["--source", source, "--max-bytes-per-sec", &rate.to_string()])
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Proc {
        child,
        name: "background migrator".into(),
    }
}

async fn assert_file(api: &Api, path: &str, content: &[u8], version: i64) {
    let r = api.ft().get(&path.replace(' ', "%20")).await;
    assert_eq!(r.status(), StatusCode::OK, "{path}");
    let lm = r.headers()["last-modified"].to_str().unwrap().to_owned();
    let got = chrono::DateTime::parse_from_rfc2822(&lm)
        .unwrap()
        .timestamp();
    assert_eq!(got, version, "{path}: version preserved");
    assert_eq!(gunzip(&r.bytes().await.unwrap()), content, "{path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_directory_is_imported_with_versions_and_idempotently() {
    let api = Api::start(Backend::Local).unwrap();
    let src = tempfile::tempdir().unwrap();
    let files: Vec<(&str, Vec<u8>, i64)> = vec![
        ("/a.txt", b"first".to_vec(), 1_500_000_000),
        (
            "/dir/sub/b c.txt",
            unique_content("v1", 100_000),
            1_600_000_000,
        ),
        ("/dir/zażółć.txt", b"first".to_vec(), 1_600_000_001),
        ("/empty", Vec::new(), 1_000),
    ];
    for (p, c, v) in &files {
        let f = src.path().join("files").join(&p[1..]);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, c).unwrap();
        set_mtime(&f, *v, false);
    }
    let source = format!("v1:{}", src.path().display());
    let (ok, out) = migrate(&api, &source);
    assert!(ok, "{out}");
    assert!(out.contains("4 files migrated"), "{out}");
    for (p, c, v) in &files {
        assert_file(&api, p, c, *v).await;
    }
    let (ok, out) = migrate(&api, &source);
    assert!(
        ok && out.contains("0 files migrated") && out.contains("4 already present"),
        "{out}"
    );
    // A path stored in s3dedup at a newer version is left alone.
    api.ft().put_ok("/a.txt", 1_700_000_000, "newer").await;
    set_mtime(&src.path().join("files/a.txt"), 1_650_000_000, false);
    let (ok, out) = migrate(&api, &source);
    assert!(ok && out.contains("0 files migrated"), "{out}");
    assert_file(&api, "/a.txt", b"newer", 1_700_000_000).await;
    // "first" (two paths), the big file, the empty one and "newer": duplicates stored once.
    assert_eq!(api.stored_contents(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_directory_is_imported_verified_and_decoded() {
    let api = Api::start(Backend::Local).unwrap();
    let src = tempfile::tempdir().unwrap();
    let root = src.path();
    let add = |name: &str, content: &[u8], version: i64, corrupt: bool| {
        add_v2(root, name, content, version, corrupt);
    };
    let big = unique_content("v2", 300_000);
    add("/p/one.txt", &big, 1_600_000_000, false);
    add("/p/dup.txt", &big, 1_600_000_005, false);
    add("/żółw/ąę ść.txt", b"polish", 1_600_000_010, false);
    add("/bad.txt", b"this blob is corrupt", 1_600_000_020, true);
    // A dry run predicts the failure, and stores nothing.
    let dry = api
        .sibling("s3dedup-migrator")
        .args(["--source", &format!("v2:{}", root.display()), "--dry-run"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert!(!dry.status.success(), "{said}");
    assert!(
        said.contains("failed: /bad.txt (") && said.contains("3 files migrated"),
        "{said}"
    );
    assert_eq!(
        api.ft().list("/", None).await.1,
        "",
        "a dry run stores nothing"
    );
    assert!(api.local_objects().is_empty() && api.spool_files().is_empty());
    let (ok, out) = migrate(&api, &format!("v2:{}", root.display()));
    assert!(!ok, "a corrupt blob makes the run exit 1: {out}");
    assert!(
        out.contains("3 files migrated") && out.contains("1 failed"),
        "{out}"
    );
    assert!(
        out.contains("failed: /bad.txt ("),
        "the failure is listed by path: {out}"
    );
    assert_file(&api, "/p/one.txt", &big, 1_600_000_000).await;
    assert_file(&api, "/p/dup.txt", &big, 1_600_000_005).await;
    assert_file(
        &api,
        "/%C5%BC%C3%B3%C5%82w/%C4%85%C4%99 %C5%9B%C4%87.txt",
        b"polish",
        1_600_000_010,
    )
    .await;
    let r = api.ft().get("/bad.txt").await;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "the corrupt file is not imported"
    );
    assert_eq!(api.stored_contents(), 2);
}

fn count_in(out: &str, what: &str) -> u64 {
    let at = out
        .find(what)
        .unwrap_or_else(|| panic!("{what:?} not in {out}"));
    let digits: String = out[..at]
        .chars()
        .rev()
        .skip_while(|c| *c == ' ')
        .take_while(char::is_ascii_digit)
        .collect();
    digits.chars().rev().collect::<String>().parse().unwrap()
}

async fn listed(api: &Api) -> usize {
    api.ft().list("/", None).await.1.lines().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_resumes_from_its_checkpoint_within_its_bandwidth() {
    let api = Api::start(Backend::Local).unwrap();
    let src = tempfile::tempdir().unwrap();
    let (n, size) = (1500usize, 2048usize);
    let path = |i: usize| format!("/d{:02}/f{i:05}", i % 17);
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| unique_content(&format!("resume-{i}"), size))
        .collect();
    for (i, body) in bodies.iter().enumerate() {
        let f = src.path().join("files").join(&path(i)[1..]);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, body).unwrap();
        set_mtime(&f, 1_600_000_000 + i as i64, false);
    }
    let source = format!("v1:{}", src.path().display());
    let limit = 100_000u64;
    let log = src.path().join("first.log");
    let first = api
        .sibling("s3dedup-migrator")
        .args(["--source", &source, "--jobs", "4"])
        .args(["--max-bytes-per-sec", &limit.to_string()])
        .env("RUST_LOG", "debug")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut first = Proc {
        child: first,
        name: "first migrator".into(),
    };
    let started = std::time::Instant::now();
    // Past a few checkpoints (one every 2 s), then kill it.
    let mut done = 0;
    while started.elapsed() < std::time::Duration::from_secs(5) || done < 150 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        done = listed(&api).await;
        assert!(
            started.elapsed().as_secs() < 60,
            "no progress: {done}; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    first.kill();
    let done = listed(&api).await;
    assert!(done < n / 2, "the throttle let {done} files through");
    // The bandwidth bound: what was read fits in the limit (plus one file in flight per job).
    let read = (done * size) as f64;
    assert!(
        read <= limit as f64 * elapsed + (4 * size) as f64,
        "{read} bytes in {elapsed:.1} s exceeds {limit} B/s"
    );

    let (ok, out) = migrate(&api, &source);
    assert!(ok, "{out}");
    assert!(out.contains("resumed after d"), "{out}");
    let (migrated, present) = (
        count_in(&out, "files migrated"),
        count_in(&out, "already present"),
    );
    assert!(migrated > 0, "{out}");
    assert!(
        (migrated + present) < n as u64,
        "a resumed run starts after its checkpoint, not from the start: {out}"
    );
    assert_eq!(
        listed(&api).await,
        n,
        "everything is there after the resume"
    );
    for (i, body) in bodies.iter().enumerate() {
        assert_file(&api, &path(i), body, 1_600_000_000 + i as i64).await;
    }
    // Finished: the checkpoint is gone, so a third run walks everything and copies nothing.
    let (ok, out) = migrate(&api, &source);
    assert!(ok && !out.contains("resumed"), "{out}");
    assert_eq!(count_in(&out, "files migrated"), 0, "{out}");
    assert_eq!(count_in(&out, "already present"), n as u64, "{out}");
    assert_eq!(api.stored_contents(), n);
    api.verify_deep();
    report(&format!(
        "FAULTS migrator-sigkill: killed after {done} of {n} files, resumed; {n} files checked, 0 lost"
    ));
}

/// SIGTERM (systemctl stop): the run abandons the files in flight, keeps its checkpoint, prints
/// its summary saying it stopped, exits non-zero and leaves no spool file; the next run goes
/// on from the checkpoint and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_run_cleanly() {
    let api = Api::start(Backend::Local).unwrap();
    let src = tempfile::tempdir().unwrap();
    let n = 120;
    for i in 0..n {
        let f = src.path().join(format!("files/d{}/f{i:03}", i % 3));
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, unique_content(&format!("term-{i}"), 60_000)).unwrap();
    }
    let source = format!("v1:{}", src.path().display());
    let out_file = src.path().join("first.out");
    let out = std::fs::File::create(&out_file).unwrap().into();
    let mut first = spawn_migrator(&api, &source, 1_000_000, out);
    // Past two checkpoints (every 2 s), well before the end (about 7 s of reading).
    tokio::time::sleep(std::time::Duration::from_millis(4500)).await;
    let status = first.signal_and_wait("TERM");
    let said = std::fs::read_to_string(&out_file).unwrap();
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(said.contains("stopped before the end"), "{said}");
    assert_eq!(api.spool_files(), Vec::<std::path::PathBuf>::new());
    let done = listed(&api).await;
    assert!(done > 0 && done < n, "{done} of {n}");

    let (ok, out) = migrate(&api, &source);
    assert!(ok && out.contains("resumed after"), "{out}");
    assert_eq!(listed(&api).await, n);
}

/// A run killed while it spools a large file leaves that file; the next run removes it, not
/// the API an hour later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_run_removes_what_a_killed_run_left_in_the_spool() {
    let api = Api::start(Backend::Local).unwrap();
    let src = tempfile::tempdir().unwrap();
    let f = src.path().join("files/large.bin");
    std::fs::create_dir_all(f.parent().unwrap()).unwrap();
    std::fs::write(&f, unique_content("spooled", 8 << 20)).unwrap();
    let source = format!("v1:{}", src.path().display());
    let mut first = spawn_migrator(&api, &source, 1_000_000, Stdio::null());
    let started = std::time::Instant::now();
    while api.spool_files().is_empty() {
        assert!(started.elapsed().as_secs() < 20, "no spool file appeared");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    first.kill();
    assert!(
        !api.spool_files().is_empty(),
        "the killed run left its spool file"
    );
    let (ok, out) = migrate(&api, &source);
    assert!(ok && out.contains("1 files migrated"), "{out}");
    assert_eq!(api.spool_files(), Vec::<std::path::PathBuf>::new());
}

/// An object store that does not answer is one clear line and exit 1 before the source is
/// read, not a failure line per file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_does_not_answer_stops_the_run_before_it_starts() {
    let mut s3 = S3Server::start().unwrap();
    let api = Api::start(Backend::S3(&s3)).unwrap();
    let src = tempfile::tempdir().unwrap();
    for i in 0..20 {
        let f = src.path().join(format!("files/f{i:02}"));
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, format!("file {i}")).unwrap();
    }
    s3.stop();
    let (ok, out) = migrate(&api, &format!("v1:{}", src.path().display()));
    assert!(!ok, "{out}");
    assert_eq!(out.trim().lines().count(), 1, "one line: {out}");
    assert!(out.contains("object store does not answer"), "{out}");
    assert!(!out.contains("f00"), "no file was tried: {out}");
}

/// A file that fails early, then a kill after a few checkpoints: the resumed run must not end
/// "0 failed" with exit 0 while that file is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_run_still_fails_for_a_file_that_failed_before_the_kill() {
    let api = Api::start(Backend::Local).unwrap();
    let src = tempfile::tempdir().unwrap();
    let (n, size) = (600usize, 2048usize);
    for i in 0..n {
        let f = src.path().join(format!("files/d{:02}/f{i:05}", i % 5));
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, unique_content(&format!("failed-{i}"), size)).unwrap();
        set_mtime(&f, 1_600_000_000 + i as i64, false);
    }
    // First in the walk's order, and unreadable: a link to nothing.
    std::os::unix::fs::symlink("/nonexistent/target", src.path().join("files/d00/a-broken"))
        .unwrap();
    let source = format!("v1:{}", src.path().display());
    let mut first = spawn_migrator(&api, &source, 100_000, Stdio::null());
    // Past two checkpoints (one every 2 s) and well before the end (about 12 s of reading).
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    first.kill();
    let done = listed(&api).await;
    assert!(done > 50 && done < n, "{done} of {n} before the kill");

    let (ok, out) = migrate(&api, &source);
    assert!(
        !ok,
        "a resumed run that did not import every file exits non-zero: {out}"
    );
    assert!(out.contains("a-broken"), "the failure is named: {out}");
    assert_eq!(count_in(&out, "failed"), 1, "{out}");
    assert_eq!(listed(&api).await, n, "everything else came over");
    report(&format!(
        "FAULTS migrator-resume-failure: killed after {done} of {n} files with 1 failed; \
         the resumed run reported it and exited non-zero"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_deleted_here_is_not_brought_back() {
    let api = Api::start(Backend::Local).unwrap();
    let src = tempfile::tempdir().unwrap();
    for (name, version) in [("kept", 1_600_000_000), ("gone", 1_600_000_000)] {
        let f = src.path().join("files").join(name);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, name).unwrap();
        set_mtime(&f, version, false);
    }
    let source = format!("v1:{}", src.path().display());
    let (ok, out) = migrate(&api, &source);
    assert!(ok && out.contains("2 files migrated"), "{out}");
    let r = api.ft().delete("/gone", 1_600_000_100).await;
    assert_eq!(r.status(), StatusCode::OK);
    let (ok, out) = migrate(&api, &source);
    assert!(ok, "{out}");
    assert_eq!(count_in(&out, "files migrated"), 0, "{out}");
    assert_eq!(count_in(&out, "deleted here"), 1, "{out}");
    let r = api.ft().get("/gone").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "stays deleted");
    // A version written to the old store after the deletion is a new file: it comes over.
    set_mtime(&src.path().join("files/gone"), 1_600_000_200, false);
    let (ok, out) = migrate(&api, &source);
    assert!(ok && out.contains("1 files migrated"), "{out}");
    assert_file(&api, "/gone", b"gone", 1_600_000_200).await;
}

/// Where the upstream deployment under test keeps its metadata.
enum UpstreamDb {
    Sqlite,
    Postgres,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_s3dedup_bucket_on_sqlite_is_adopted_in_place_and_verified() {
    adopt_upstream(UpstreamDb::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run through tests/run-all.sh (pg_virtualenv)"]
async fn an_upstream_s3dedup_bucket_on_postgres_is_adopted_in_place_and_verified() {
    adopt_upstream(UpstreamDb::Postgres).await;
}

/// Upstream's tables: shared by buckets on SQLite, prefixed by the bucket on PostgreSQL.
fn upstream_schema(prefix: &str) -> String {
    [
        "refcount (bucket TEXT, hash TEXT, refcount INTEGER, PRIMARY KEY (bucket, hash))",
        "modified (bucket TEXT, path TEXT, modified BIGINT, PRIMARY KEY (bucket, path))",
        "ref_file (bucket TEXT, path TEXT, hash TEXT, PRIMARY KEY (bucket, path))",
        "logical_size (bucket TEXT, hash TEXT, logical_size BIGINT, PRIMARY KEY (bucket, hash))",
    ]
    .iter()
    .map(|t| format!("CREATE TABLE {prefix}{t};"))
    .collect()
}

fn psql(sql: &str) {
    let out = Command::new("psql")
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn adopt_upstream(db_kind: UpstreamDb) {
    let s3 = S3Server::start().unwrap();
    let api = Api::start(Backend::S3(&s3)).unwrap();
    // The upstream deployment's objects: gzip under <aa>/<bb>/<sha256>, in the same bucket.
    let shared = unique_content("upstream-shared", 70_000);
    let single = b"only once".to_vec();
    let (h_shared, h_single) = (sha256_hex(&shared), sha256_hex(&single));
    s3.put_raw(&sharded_key(&h_shared), gzip(&shared)).await;
    s3.put_raw(&sharded_key(&h_single), gzip(&single)).await;
    // It trusted client hints: an object that does not hold what its name says.
    let h_lie = sha256_hex(b"what the client claimed");
    s3.put_raw(&sharded_key(&h_lie), gzip(b"something else entirely"))
        .await;
    let h_missing = sha256_hex(b"never uploaded");
    let objects_before = s3.list_keys().await.unwrap().len();

    let rows: [(&str, &str, i64, &str); 7] = [
        (S3_BUCKET, "tests/a.in", 1_600_000_001, &h_shared),
        (S3_BUCKET, "tests/b.in", 1_600_000_002, &h_shared),
        (S3_BUCKET, "zażółć/c d.out", 1_600_000_003, &h_single),
        (S3_BUCKET, "gone.txt", 0, &h_single), // modified 0: deleted upstream
        (S3_BUCKET, "lie.txt", 1_600_000_004, &h_lie),
        (S3_BUCKET, "missing.txt", 1_600_000_005, &h_missing),
        ("other-bucket", "elsewhere.txt", 1_600_000_006, &h_single),
    ];
    let dir = tempfile::tempdir().unwrap();
    let source = match db_kind {
        UpstreamDb::Sqlite => {
            let db = dir.path().join("upstream.sqlite");
            let conn = rusqlite::Connection::open(&db).unwrap();
            conn.execute_batch(&upstream_schema("")).unwrap();
            for (bucket, path, modified, hash) in rows {
                conn.execute(
                    "INSERT INTO modified VALUES (?1, ?2, ?3)",
                    rusqlite::params![bucket, path, modified],
                )
                .unwrap();
                conn.execute(
                    "INSERT INTO ref_file VALUES (?1, ?2, ?3)",
                    rusqlite::params![bucket, path, hash],
                )
                .unwrap();
            }
            format!("upstream:{S3_BUCKET}:sqlite:{}", db.display())
        }
        UpstreamDb::Postgres => {
            let _ = pg_conninfo(); // asserts pg_virtualenv's environment
            let prefix = format!("{}_", S3_BUCKET.replace('-', "_"));
            let mut sql = format!(
                "DROP TABLE IF EXISTS {prefix}refcount, {prefix}modified, {prefix}ref_file, \
                 {prefix}logical_size; {}",
                upstream_schema(&prefix)
            );
            for (bucket, path, modified, hash) in rows {
                sql += &format!(
                    "INSERT INTO {prefix}modified VALUES ('{bucket}', '{path}', {modified});
                     INSERT INTO {prefix}ref_file VALUES ('{bucket}', '{path}', '{hash}');"
                );
            }
            psql(&sql);
            let var = |k: &str| std::env::var(k).unwrap_or_default();
            format!(
                "upstream:{S3_BUCKET}:postgres://{}:{}@{}:{}/{}",
                var("PGUSER"),
                var("PGPASSWORD"),
                var("PGHOST"),
                var("PGPORT"),
                var("PGDATABASE")
            )
        }
    };
    let (ok, out) = migrate(&api, &source);
    assert!(!ok, "two bad rows make the run exit 1: {out}");
    assert_eq!(count_in(&out, "files migrated"), 3, "{out}");
    assert_eq!(count_in(&out, "failed"), 2, "{out}");
    assert!(
        out.contains("failed: /lie.txt: ") && out.contains("SHA256"),
        "{out}"
    );
    assert!(out.contains("failed: /missing.txt: "), "{out}");
    assert_file(&api, "/tests/a.in", &shared, 1_600_000_001).await;
    assert_file(&api, "/tests/b.in", &shared, 1_600_000_002).await;
    assert_file(
        &api,
        "/za%C5%BC%C3%B3%C5%82%C4%87/c%20d.out",
        &single,
        1_600_000_003,
    )
    .await;
    for absent in ["/gone.txt", "/lie.txt", "/missing.txt", "/elsewhere.txt"] {
        let r = api.ft().get(absent).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{absent}");
    }
    assert_eq!(
        s3.list_keys().await.unwrap().len(),
        objects_before,
        "adoption copies nothing"
    );
    let (_, out) = migrate(&api, &source);
    assert_eq!(count_in(&out, "files migrated"), 0, "{out}");
    assert_eq!(count_in(&out, "already present"), 3, "{out}");
    // The adopted store is consistent: refcounts, sizes and every object's digest.
    api.verify_deep();
}

/// `--source s3dedup:CONFIG`: a store that is not there is refused (and not made); a damaged
/// object of the source is reported (exit 1) while the other files are copied, verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_store_is_copied_verified_and_never_created() {
    let old = Api::start(Backend::Local).unwrap();
    let new = Api::start(Backend::Local).unwrap();
    let good = b"a file that comes over".repeat(50);
    // Stored as an object, whose bytes are damaged below.
    let bad = unique_content("a file whose object is damaged", OBJECT_SIZED);
    for (path, body) in [("/good", &good), ("/bad", &bad)] {
        let r = old.ft().put(path, 1_600_000_000, body.clone()).await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    let dir = tempfile::tempdir().unwrap();
    let config = |name: &str, data_dir: &Path| {
        let file = dir.path().join(name);
        std::fs::write(&file, format!("data_dir = {:?}\n", data_dir)).unwrap();
        format!("s3dedup:{}", file.display())
    };
    let nowhere = dir.path().join("nowhere");
    let (ok, out) = migrate(&new, &config("none.toml", &nowhere));
    assert!(
        !ok && out.contains("does not exist: no store there"),
        "{out}"
    );
    assert!(!nowhere.exists(), "nothing made where no store was");

    let object = old
        .local_objects()
        .into_iter()
        .find(|p| p.file_name().unwrap().to_string_lossy() == sha256_hex(&bad))
        .expect("the object of /bad");
    let len = std::fs::metadata(&object).unwrap().len() as usize;
    std::fs::write(&object, vec![0x1f; len]).unwrap();
    let source = config("old.toml", &old.data_dir);
    let json = new
        .sibling("s3dedup-migrator")
        .args(["--source", &source, "--dry-run", "--json"])
        .output()
        .unwrap();
    assert_eq!(json.status.code(), Some(1));
    let r = json_report(
        &String::from_utf8_lossy(&json.stdout),
        "s3dedup-migrator/1",
        "migrate",
    );
    assert_eq!(
        (r["ok"].as_bool(), r["dry_run"].as_bool()),
        (Some(false), Some(true)),
        "{r}"
    );
    assert_eq!(r["failed"][0]["file"], "/bad", "{r}");
    assert_eq!(r["migrated"], 1, "{r}");
    let (ok, out) = migrate(&new, &source);
    assert!(!ok, "a damaged file fails the run: {out}");
    assert!(
        out.contains("failed: /bad") && out.contains("1 files migrated"),
        "{out}"
    );
    assert_file(&new, "/good", &good, 1_600_000_000).await;
    assert_eq!(new.ft().get("/bad").await.status(), StatusCode::NOT_FOUND);
}

/// A large file first in the walk does not hold up the small files after it: they are imported
/// while it is still being read (with in-order completion only one more file could finish). The
/// large file's blob is a pipe fed slowly, so it stays in flight as long as the test wants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_does_not_hold_up_the_small_ones_after_it() {
    let api = Api::start(Backend::Local).unwrap();
    let src = tempfile::tempdir().unwrap();
    let root = src.path();
    let large = unique_content("large", 1 << 20);
    let blob = add_v2(root, "/a-large", &large, 1_600_000_000, false);
    std::fs::remove_file(&blob).unwrap();
    assert!(
        Command::new("mkfifo")
            .arg(&blob)
            .status()
            .unwrap()
            .success()
    );
    for i in 0..40 {
        let body = format!("small {i}");
        add_v2(
            root,
            &format!("/b-small-{i:02}"),
            body.as_bytes(),
            1_600_000_000,
            false,
        );
    }
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        let mut pipe = std::fs::OpenOptions::new().write(true).open(&blob).unwrap();
        let gz = gzip(&large);
        let (head, tail) = gz.split_at(gz.len() / 2);
        pipe.write_all(head).unwrap();
        // Held here until the test has looked; then the rest.
        std::thread::sleep(std::time::Duration::from_secs(5));
        pipe.write_all(tail).unwrap();
    });
    let mut run = api.sibling("s3dedup-migrator");
    run.args(["--source", &format!("v2:{}", root.display()), "--jobs", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut proc = Proc {
        child: run.spawn().unwrap(),
        name: "migrator".into(),
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(4);
    let mut small = 0;
    while std::time::Instant::now() < deadline && small < 40 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        small = listed(&api).await;
    }
    let large_done = api.ft().get("/a-large").await.status() == StatusCode::OK;
    assert!(!large_done, "the large file is still in flight");
    assert_eq!(small, 40, "every small file imported meanwhile");
    assert!(proc.child.wait().unwrap().success());
    feeder.join().unwrap();
    assert_eq!(listed(&api).await, 41);
}

/// The reverse move: a store on S3 copied into one on a local directory, files, versions and a
/// deletion carried over; a second run copies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_on_s3_moves_back_to_a_local_directory() {
    let s3 = S3Server::start().unwrap();
    let old = Api::start(Backend::S3(&s3)).unwrap();
    let new = Api::start(Backend::Local).unwrap();
    let files = [
        ("/a.txt", 1_600_000_001),
        ("/d/b.bin", 1_600_000_002),
        ("/d/gone", 1_600_000_003),
    ];
    let contents: Vec<Vec<u8>> = files
        .iter()
        .map(|(p, _)| unique_content(p, 70_000))
        .collect();
    for ((path, version), content) in files.iter().zip(&contents) {
        old.ft().put_ok(path, *version, content.clone()).await;
    }
    assert_eq!(
        old.ft().delete("/d/gone", 1_600_000_004).await.status(),
        StatusCode::OK
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("old.toml");
    let toml = format!(
        "data_dir = {:?}\n[store]\nbackend = \"s3\"\n[store.s3]\nbucket = {S3_BUCKET:?}\n\
         endpoint = {:?}\naccess_key_id = {S3_ACCESS_KEY:?}\nsecret_access_key = {S3_SECRET_KEY:?}\n",
        old.data_dir,
        s3.endpoint()
    );
    std::fs::write(&config, toml).unwrap();
    let source = format!("s3dedup:{}", config.display());
    let (ok, out) = migrate(&new, &source);
    assert!(ok && out.contains("2 files migrated"), "{out}");
    for ((path, version), content) in files.iter().zip(&contents).take(2) {
        assert_file(&new, path, content, *version).await;
    }
    assert_eq!(
        new.ft().get("/d/gone").await.status(),
        StatusCode::NOT_FOUND
    );
    let (ok, out) = migrate(&new, &source);
    assert!(ok && out.contains(" 0 files migrated"), "{out}");
    new.verify_deep();
}
