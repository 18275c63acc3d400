//! The real `s3dedup-cleaner` beside real API processes: it never deletes live data, however the
//! runs interleave with uploads, overwrites and deletes, and it recovers from being killed.

use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::Rng;
use reqwest::StatusCode;
use s3dedup_tests::*;

fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("program runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs the cleaner beside `api` with `args`, to success.
fn clean(api: &Api, args: &[&str]) -> Output {
    let mut c = api.sibling("s3dedup-cleaner");
    c.args(args);
    let out = run(c);
    assert!(out.status.success(), "{}", stdout(&out));
    out
}

/// Reads `path` back uncompressed and checks it is `content`.
async fn assert_reads_back(api: &Api, path: &str, content: &[u8]) {
    let (status, body) = api.ft().get_identity(path).await;
    assert_eq!(status, StatusCode::OK, "{path}");
    assert!(body == content, "{path} reads back");
}

/// Runs the cleaner back to back (grace 0) until stopped; returns (runs, blobs freed, failures).
fn cleaner_loop(
    api: &Api, stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u32, u64, Vec<String>)> {
    let mk = {
        let cmd = api.cleaner_sweeping();
        move || {
            let mut c = Command::new(cmd.get_program());
            c.args(cmd.get_args());
            for (k, v) in cmd.get_envs() {
                match v {
                    Some(v) => c.env(k, v),
                    None => c.env_remove(k),
                };
            }
            c.args(["--grace-secs", "0"]).env("RUST_LOG", "warn");
            c
        }
    };
    std::thread::spawn(move || {
        let (mut runs, mut total) = (0, 0);
        let mut failures = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let out = run(mk());
            runs += 1;
            total += freed(&out);
            if !out.status.success() {
                failures.push(format!(
                    "{}: {}{}",
                    out.status,
                    stdout(&out),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        (runs, total, failures)
    })
}

async fn torture(apis: &[&Api], tag: &str) {
    let stop = Arc::new(AtomicBool::new(false));
    let cleaner = cleaner_loop(apis[0], stop.clone());
    let workload = Workload::new(tag, 16, 250, 6);
    let urls: Vec<String> = apis.iter().map(|a| a.url("")).collect();
    let outcome = workload.run(&urls).await;
    stop.store(true, Ordering::Relaxed);
    for api in apis {
        let log = api.log();
        assert!(!log.contains("panicked"), "API log: {log}");
        if !log.is_empty() {
            eprintln!(
                "API log:\n{}",
                log.lines().take(20).collect::<Vec<_>>().join("\n")
            );
        }
    }
    let (runs, freed, failures) = cleaner.join().unwrap();
    eprintln!("{runs} cleaner runs during the workload freed {freed} blobs");
    assert!(failures.is_empty(), "cleaner failures: {failures:?}");
    assert!(
        runs >= 3,
        "the cleaner ran alongside the workload ({runs} runs)"
    );
    assert!(
        freed > 0,
        "the cleaner deleted blobs while the workload ran"
    );
    workload.check_final(&outcome, &urls).await;
    // A last run collects what is left; the store must still be complete.
    clean(apis[0], &["--grace-secs", "0"]);
    workload.check_final(&outcome, &urls).await;
    apis[0].verify_deep();
}

/// API and cleaner as separate processes on one host, sharing SQLite and the lock file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torture_sqlite() {
    let api = Api::start(Backend::Local).unwrap();
    torture(&[&api], "torture-sqlite").await;
}

/// Two API instances on PostgreSQL and S3, with the cleaner as a third process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run through tests/run-all.sh"]
async fn torture_postgres_two_instances() {
    let s3 = S3Server::start().unwrap();
    let schema = unique_schema("torture");
    let env = pg_env(&schema);
    let a = Api::start_with(Backend::S3(&s3), &env).unwrap();
    let b = Api::start_with(Backend::S3(&s3), &env).unwrap();
    torture(&[&a, &b], "torture-pg").await;
}

/// Uploads `n` contents and deletes their paths: garbage for the cleaner.
async fn make_garbage(api: &Api, n: usize, tag: &str) {
    let ft = api.ft();
    for i in 0..n {
        let path = format!("/garbage/{tag}/{i}");
        // Every other one an object, the rest kept in their rows: the cleaner deletes both.
        let len = if i % 2 == 0 {
            100 + i
        } else {
            OBJECT_SIZED + i
        };
        api.ft().put_ok(&path, 1, unique_content(tag, len)).await;
        let r = ft.delete_request(&path, 1).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
}

fn freed(out: &Output) -> u64 {
    let text = stdout(out);
    text.split_whitespace()
        .skip_while(|w| *w != "freed")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_cleaner_works_at_a_time() {
    let api = Api::start(Backend::Local).unwrap();
    make_garbage(&api, 150, "two").await;
    // Held by another process: the run says so, exits 0 and deletes nothing.
    let lockfile = api.data_dir.join("metadata.sqlite3.locks");
    let mut holder = Command::new(bin("lock-holder"))
        .args([
            &format!("file:{}", lockfile.display()),
            "cleaner",
            "exclusive",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    let out = clean(&api, &["--grace-secs", "0", "--json"]);
    let r = json_report(&stdout(&out), "s3dedup-cleaner/1", "collect");
    assert_eq!(
        (r["busy"].as_bool(), r["blobs_deleted"].as_u64()),
        (Some(true), Some(0)),
        "{r}"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();

    // Two started at once: exactly one of them does the work.
    let spawn = || {
        let mut c = api.sibling("s3dedup-cleaner");
        c.args(["--grace-secs", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        c.spawn().unwrap()
    };
    let (one, two) = (spawn(), spawn());
    let (one, two) = (
        one.wait_with_output().unwrap(),
        two.wait_with_output().unwrap(),
    );
    assert!(one.status.success() && two.status.success());
    let counts = [freed(&one), freed(&two)];
    assert_eq!(
        counts.iter().sum::<u64>(),
        150,
        "{} / {}",
        stdout(&one),
        stdout(&two)
    );
    assert_eq!(
        counts.iter().filter(|n| **n > 0).count(),
        1,
        "exactly one worked: {counts:?}"
    );
}

/// SIGKILL at random points, then a complete run: the store is consistent and complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_cleaner_leaves_a_consistent_store() {
    let s3 = S3Server::start().unwrap();
    let api = Api::start(Backend::S3(&s3)).unwrap();
    let ft = api.ft();
    let live: Vec<Vec<u8>> = (0..20)
        .map(|i| unique_content("live", OBJECT_SIZED + i))
        .collect();
    for (i, c) in live.iter().enumerate() {
        api.ft().put_ok(&format!("/live/{i}"), 1, c.clone()).await;
    }
    make_garbage(&api, 300, "killed").await;
    let mut rng = rand::rng();
    let mut killed = 0;
    for _ in 0..6 {
        let mut c = api.cleaner_sweeping();
        c.args(["--grace-secs", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = c.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(rng.random_range(20..250)));
        if child.try_wait().unwrap().is_none() {
            killed += 1;
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    clean(&api, &["--grace-secs", "0"]);
    api.verify_deep();
    for (i, c) in live.iter().enumerate() {
        let r = ft.get_request(&format!("/live/{i}")).send().await.unwrap();
        assert_eq!(
            gunzip(&r.bytes().await.unwrap()),
            *c,
            "live file {i} intact"
        );
    }
    let keys = s3.list_keys().await.unwrap();
    assert_eq!(
        keys.len(),
        live.len(),
        "all garbage collected, nothing else: {} objects",
        keys.len()
    );
    report(&format!(
        "FAULTS cleaner-sigkill: {killed} of 6 runs killed mid-way, {} live files checked, 0 lost",
        live.len()
    ));
}

/// On S3: objects without a row go, in batches; keys that are not of our layout stay; live
/// objects stay. A verify that finds a damaged object exits 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_orphans_go_in_batches_foreign_keys_stay_and_verify_exits_3() {
    let s3 = S3Server::start().unwrap();
    let api = Api::start(Backend::S3(&s3)).unwrap();
    let live = unique_content("live-orphan-test", OBJECT_SIZED);
    api.ft().put_ok("/live", 1, live.clone()).await;
    for i in 0..150 {
        let c = unique_content(&format!("orphan{i}"), 100);
        let hex = sha256_hex(&c);
        s3.put_raw(&sharded_key(&hex), gzip(&c)).await;
    }
    let foreign = ["notes/readme.txt", "ab/cd/not-a-digest", "00/00/backup.tar"];
    for k in foreign {
        s3.put_raw(k, b"not ours".to_vec()).await;
    }
    let out = clean(&api, &["--grace-secs", "0", "--json"]);
    let r = json_report(&stdout(&out), "s3dedup-cleaner/1", "collect");
    assert_eq!(r["orphans_deleted"], 150, "{r}");
    assert_eq!(
        (r["ok"].as_bool(), r["busy"].as_bool()),
        (Some(true), Some(false)),
        "{r}"
    );
    // s3s-fs cannot list multipart uploads: not an error, but the operator is told what to do.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lifecycle"), "{stderr}");
    let mut keys = s3.list_keys().await.unwrap();
    keys.sort();
    let hex = sha256_hex(&live);
    let mut want: Vec<String> = foreign.iter().map(|k| k.to_string()).collect();
    want.push(format!("{}/{}/{hex}", &hex[..2], &hex[2..4]));
    want.sort();
    assert_eq!(keys, want, "only orphans of our layout were deleted");

    // Damage the live object: verify reports it and exits 3.
    s3.put_raw(&sharded_key(&hex), b"truncated".to_vec()).await;
    let text = verify_finds_problems(&api, &["--verify"], &[]);
    assert!(text.contains("wrong size: blob"), "{text}");
    let text = verify_finds_problems(&api, &["--verify", "--json"], &[]);
    let r = json_report(&text, "s3dedup-cleaner/1", "verify");
    assert_eq!(r["problems"], 1, "{r}");
    assert_eq!(r["wrong_size"][0]["blob"], hex.as_str(), "{r}");
    assert_eq!(r["wrong_size"][0]["found"], 9, "{r}");
    // --stats as JSON: one live file.
    let out = clean(&api, &["--stats", "--json"]);
    let r = json_report(&stdout(&out), "s3dedup-cleaner/1", "stats");
    assert_eq!(
        (r["files"].as_u64(), r["blobs"].as_u64()),
        (Some(1), Some(1)),
        "{r}"
    );
}

/// The trap of a configuration switched to a new, empty metadata database over a store that
/// holds objects: every object looks like an orphan. The cleaner refuses to sweep them unless
/// told that this is intended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_metadata_database_does_not_sweep_a_full_store() {
    let api = Api::start(Backend::Local).unwrap();
    for i in 0..5 {
        let body = unique_content(&format!("kept-{i}"), OBJECT_SIZED);
        api.ft().put_ok(&format!("/kept/{i}"), 1, body).await;
    }
    let objects = api.data_dir.join("objects");
    // Written two hours ago, as a store in use for a while is.
    for f in walk(&objects) {
        let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
        let file = std::fs::File::options().write(true).open(&f).unwrap();
        file.set_modified(two_hours_ago).unwrap();
    }
    // A second instance on the same objects with a database of its own, as after a switch
    // of metadata.backend that forgot the migration.
    let objects_path = objects.to_str().unwrap();
    let fresh = Api::start_with(
        Backend::Local,
        &[("S3DEDUP_STORE__LOCAL__PATH", objects_path)],
    )
    .unwrap();
    // The API serves such a store (it deletes nothing) but says what looks wrong.
    let log = fresh.log();
    assert!(log.contains("the metadata database has no files"), "{log}");
    let mut c = fresh.sibling("s3dedup-cleaner");
    c.args(["--grace-secs", "0"]);
    let out = run(c);
    let said = String::from_utf8_lossy(&out.stderr).into_owned() + &stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("metadata database has no blobs"), "{said}");
    assert_eq!(api.local_objects().len(), 5, "nothing was deleted");
    for i in 0..5 {
        assert!(api.ft().content(&format!("/kept/{i}")).await.is_some());
    }
    // Told so, it empties the store.
    let out = clean(&fresh, &["--grace-secs", "0", "--allow-empty-metadata"]);
    assert!(
        stdout(&out).contains("5 orphaned objects"),
        "{}",
        stdout(&out)
    );
    assert_eq!(api.local_objects().len(), 0);
}

/// Multipart uploads that never completed (an API killed mid-upload, a lost connection) are
/// aborted once older than the grace period, on an S3 server that lists them (moto); uploads
/// of keys not of our layout stay, a dry run only counts, and live content is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs moto from the test venv: run through tests/run-all.sh"]
async fn abandoned_multipart_uploads_are_aborted_past_the_grace() {
    let moto = Moto::start().await.unwrap();
    let env = moto.env("ft");
    let api = Api::start_with(Backend::Local, &env).unwrap();
    let live = unique_content("live-beside-uploads", 5000);
    api.ft().put_ok("/live", 1, live.clone()).await;

    let s3 = moto.client();
    let start_upload = async |key: String| {
        let id = s3
            .create_multipart_upload()
            .bucket(S3_BUCKET)
            .key(&key)
            .send()
            .await
            .unwrap()
            .upload_id
            .unwrap();
        s3.upload_part()
            .bucket(S3_BUCKET)
            .key(&key)
            .upload_id(&id)
            .part_number(1)
            .body(vec![7u8; 1024].into())
            .send()
            .await
            .unwrap();
        key
    };
    let ours = |name: &str| format!("ft/{}", sharded_key(&sha256_hex(name.as_bytes())));
    let mut all = vec![
        start_upload(ours("abandoned")).await,
        start_upload(ours("abandoned too")).await,
    ];
    let foreign = vec![
        start_upload("ft/notes/upload.bin".into()).await,
        start_upload(sharded_key(&sha256_hex(b"outside the prefix"))).await,
    ];
    all.extend(foreign.iter().cloned());
    let listed = async || -> Vec<String> {
        let out = s3
            .list_multipart_uploads()
            .bucket(S3_BUCKET)
            .send()
            .await
            .unwrap();
        let mut keys: Vec<String> = out
            .uploads()
            .iter()
            .map(|u| u.key().unwrap().to_owned())
            .collect();
        keys.sort();
        keys
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    // Each run sweeps (--orphans): aborting abandoned uploads is part of the orphan sweep.
    let cleaner = |grace: &str, extra: &[&str]| {
        let args = [&["--orphans", "--grace-secs", grace], extra].concat();
        stdout(&clean(&api, &args))
    };
    // moto reports every upload as started on 2010-11-10 (a fixed value in its answer), so a
    // grace of 31 years makes them young: they stay.
    let out = cleaner("1000000000", &[]);
    assert!(out.contains("; 0 abandoned uploads aborted"), "{out}");
    assert_eq!(listed().await, sorted(all.clone()), "young uploads stay");

    let out = cleaner("3600", &["--dry-run"]);
    assert!(out.contains("; 2 abandoned uploads aborted"), "{out}");
    assert_eq!(listed().await, sorted(all), "a dry run aborts nothing");

    let out = cleaner("3600", &[]);
    assert!(out.contains("; 2 abandoned uploads aborted"), "{out}");
    assert_eq!(
        listed().await,
        sorted(foreign),
        "only old uploads of ours went"
    );
    assert_reads_back(&api, "/live", &live).await;
}

/// On the local store, the temporary files a crash left in the shard directories go once older
/// than the grace period; young ones (a write in progress) and objects stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_temporary_files_left_by_a_crash_go_past_the_grace() {
    let api = Api::start(Backend::Local).unwrap();
    let live = unique_content("live-beside-temporaries", OBJECT_SIZED);
    api.ft().put_ok("/live", 1, live.clone()).await;
    let [object] = &api.local_objects()[..] else {
        panic!("one object: {:?}", api.local_objects());
    };
    let shard = object.parent().unwrap();
    let (old, young) = (shard.join(".tmpOLDabc"), shard.join(".tmpNEWdef"));
    std::fs::write(&old, "half an object").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(7200))
        .unwrap();
    std::fs::write(&young, "a write in progress").unwrap();
    // A content just unreferenced waits for the grace period, and the report says so.
    api.ft()
        .put_ok("/doomed", 1, "unreferenced a moment ago")
        .await;
    assert_eq!(api.ft().delete("/doomed", 1).await.status(), StatusCode::OK);

    let out = clean(&api, &["--grace-secs", "3600"]);
    let said = stdout(&out);
    assert!(said.contains("; 1 abandoned uploads aborted"), "{said}");
    assert!(said.contains("; 1 unreferenced blobs ("), "{said}");
    let out = clean(&api, &["--grace-secs", "3600", "--json"]);
    let r = json_report(&stdout(&out), "s3dedup-cleaner/1", "collect");
    assert_eq!(
        (r["waiting_blobs"].as_u64(), r["blobs_deleted"].as_u64()),
        (Some(1), Some(0)),
        "{r}"
    );
    assert!(!old.exists(), "the old temporary file went");
    assert!(young.exists(), "the young one stays");
    assert!(object.exists(), "the object stays");
    assert_reads_back(&api, "/live", &live).await;
}

/// An object the store will not give is a problem `--verify` reports by name, and the check goes
/// on with the others: on S3 a GET refused with 403 (deep), on the local store an object whose
/// path cannot be resolved (shallow too). Exit 3, with every other blob checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_unreadable_objects_and_goes_on() {
    use s3dedup_tests::fault_proxy::{FaultProxy, Refuse};
    let s3 = S3Server::start().unwrap();
    let proxy = FaultProxy::start(s3.addr, 3).await.unwrap();
    let api = Api::start(Backend::S3(&s3)).unwrap();
    let contents: Vec<Vec<u8>> = (0..3)
        .map(|i| unique_content("unreadable", OBJECT_SIZED + i))
        .collect();
    for (i, c) in contents.iter().enumerate() {
        api.ft().put_ok(&format!("/u/{i}"), 1, c.clone()).await;
    }
    let refused = sha256_hex(&contents[1]);
    proxy.set_refuse(Some(Refuse {
        method: hyper::Method::GET,
        key: refused.clone(),
        status: 403,
    }));
    let via_proxy = [("S3DEDUP_STORE__S3__ENDPOINT", proxy.endpoint())];
    let text = verify_finds_problems(&api, &["--verify", "--deep"], &via_proxy);
    assert!(
        text.contains("deep verify: 3 blobs"),
        "all three checked: {text}"
    );
    assert!(
        text.contains("1 problems: 0 missing, 0 wrong size, 0 corrupt, 1 unreadable"),
        "{text}"
    );
    assert!(
        text.contains(&format!("unreadable: blob {refused}: ")) && text.contains("403"),
        "{text}"
    );

    let local = Api::start(Backend::Local).unwrap();
    for (i, c) in contents.iter().enumerate() {
        local.ft().put_ok(&format!("/u/{i}"), 1, c.clone()).await;
    }
    let object = local.data_dir.join("objects").join(sharded_key(&refused));
    std::fs::remove_file(&object).unwrap();
    std::os::unix::fs::symlink(&object, &object).unwrap(); // resolves to itself: ELOOP
    let text = verify_finds_problems(&local, &["--verify"], &[]);
    assert!(text.contains("shallow verify: 3 blobs"), "{text}");
    assert!(
        text.contains(&format!("unreadable: blob {refused}: ")),
        "{text}"
    );
    let text = verify_finds_problems(&local, &["--verify", "--json"], &[]);
    let r = json_report(&text, "s3dedup-cleaner/1", "verify");
    assert_eq!(
        (r["blobs_checked"].as_u64(), r["ok"].as_bool()),
        (Some(3), Some(false)),
        "{r}"
    );
    assert_eq!(r["unreadable"][0]["blob"], refused.as_str(), "{r}");
}

/// Runs the cleaner with `args` and `env` beside `api`; it must exit 3. Returns its output.
fn verify_finds_problems(api: &Api, args: &[&str], env: &[(&str, String)]) -> String {
    let mut v = api.sibling("s3dedup-cleaner");
    v.args(args).envs(env.iter().map(|(k, v)| (k, v)));
    let out = run(v);
    let text = stdout(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{text}{stderr}");
    text
}

/// The orphan sweep lists the whole object store, so a run does it only once
/// `cleaner.orphan_sweep_interval_secs` has passed since the last one (or with `--orphans`),
/// and its report says which; the last sweep shows on /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orphan_sweep_runs_once_an_interval_and_says_so() {
    let api = Api::start(Backend::Local).unwrap();
    api.ft().put_ok("/kept", 1, "kept").await;
    let objects = api.data_dir.join("objects");
    // An object without a row, as a crash between object and row leaves one.
    let orphan = |n: u8| {
        let hex = format!("{n:02x}").repeat(32);
        let path = objects.join(&hex[..2]).join(&hex[2..4]).join(&hex);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, gzip(b"orphan")).unwrap();
        path
    };
    let collect = |args: &[&str]| {
        let mut all = vec!["--grace-secs", "0", "--json"];
        all.extend(args);
        json_report(&stdout(&clean(&api, &all)), "s3dedup-cleaner/1", "collect")
    };
    // Whether the run swept, and how many orphans it deleted.
    let swept =
        |r: &serde_json::Value| (r["orphans_swept"].as_bool(), r["orphans_deleted"].as_u64());
    let first = orphan(1);
    let r = collect(&[]);
    assert_eq!(swept(&r), (Some(true), Some(1)), "{r}");
    assert!(r["orphan_sweep_next_at"].is_null(), "{r}");
    assert!(!first.exists());

    let second = orphan(2);
    let r = collect(&[]);
    assert_eq!(swept(&r), (Some(false), Some(0)), "{r}");
    let next = r["orphan_sweep_next_at"]
        .as_i64()
        .expect("when the next sweep is due");
    let in_a_day = s3dedup_common::unix_now() + 86400;
    assert!(
        (in_a_day - 60..=in_a_day).contains(&next),
        "{next} vs {in_a_day}"
    );
    assert!(second.exists(), "not swept before its time");
    let out = clean(&api, &["--grace-secs", "0"]);
    assert!(
        stdout(&out).contains("no orphan sweep this run: next due at"),
        "{}",
        stdout(&out)
    );

    let r = collect(&["--orphans"]);
    assert_eq!(swept(&r), (Some(true), Some(1)), "{r}");
    assert!(!second.exists());
    assert_eq!(
        api.ft().content("/kept").await.as_deref(),
        Some(&b"kept"[..])
    );

    // Interval 0: every run sweeps.
    let third = orphan(3);
    let mut c = api.sibling("s3dedup-cleaner");
    c.args(["--grace-secs", "0"])
        .env("S3DEDUP_CLEANER__ORPHAN_SWEEP_INTERVAL_SECS", "0");
    assert!(run(c).status.success());
    assert!(!third.exists());
    let m = api.ft().metrics().await;
    assert!(
        m.contains(
            "s3dedup_last_run_timestamp_seconds{tool=\"s3dedup-cleaner\",kind=\"orphan-sweep\"}"
        ),
        "{m}"
    );
}
