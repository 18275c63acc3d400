//! Locks lost at the worst moment, with the real programs, a real S3 server process behind a
//! proxy that holds requests, and real PostgreSQL sessions ended from the server side:
//!
//! - the cleaner's DELETE is still on its way when its lock goes (its PostgreSQL session ended,
//!   or the cleaner SIGKILLed), and a PUT of the same content comes through the API;
//! - a PUT's upload is done but not committed when its lock goes (its session ended, or the
//!   lock file replaced), and the orphan sweep finds the object without a row.
//!
//! In every case the acknowledged file must read back and `--verify --deep` find nothing.
//! The settle times are short here (2 s to send a delete, 6 s more for it to land), and the
//! proxy holds a delete 4 s: past its sender's deadline, within the settle time.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use s3dedup_tests::fault_proxy::{FaultProxy, Hold};
use s3dedup_tests::*;

const HOLD: Duration = Duration::from_secs(4);

/// Short deletion bounds, and no read cache: a cached copy would hide a lost object.
fn deletion_bounds(settle_secs: u32) -> Vec<(String, String)> {
    [
        ("S3DEDUP_CLEANER__DELETE_TIMEOUT_SECS", "2".to_owned()),
        (
            "S3DEDUP_CLEANER__DELETE_SETTLE_SECS",
            settle_secs.to_string(),
        ),
        ("S3DEDUP_STORE__CACHE__ENABLED", "false".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The scenarios' bounds: a settle long enough to hold a delete in flight past a lost lock.
fn settings() -> Vec<(String, String)> {
    deletion_bounds(6)
}

fn with(mut env: Vec<(String, String)>, more: &[(&str, String)]) -> Vec<(String, String)> {
    env.extend(more.iter().map(|(k, v)| (k.to_string(), v.clone())));
    env
}

/// How a holder loses its lock.
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// Its PostgreSQL lock session is ended by the server (failover, administrator).
    SessionEnded,
    /// The process is SIGKILLed (the OOM killer, a deploy).
    Killed,
    /// The lock file is deleted under it (a well-meant clean-up of /var/lib).
    LockFileReplaced,
}

async fn delete_path(api: &Api, path: &str, version: i64) {
    let r = api.ft().delete(path, version).await;
    assert_eq!(r.status(), StatusCode::OK, "DELETE {path}");
}

fn cleaner(api: &Api, s3_endpoint: &str, args: &[&str]) -> Command {
    let mut c = api.cleaner_sweeping();
    c.args(args)
        .env("S3DEDUP_STORE__S3__ENDPOINT", s3_endpoint)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn finish(child: Child) -> (String, String) {
    let out = child.wait_with_output().expect("cleaner output");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The cleaner tombstones a blob and sends its DELETE, which the proxy holds; its lock is lost;
/// the same content is PUT again through the API; then the DELETE lands.
/// The PostgreSQL schema the settings name, if any.
fn schema(env: &[(String, String)]) -> String {
    env.iter()
        .find(|(k, _)| k == "S3DEDUP_METADATA__POSTGRES__SCHEMA")
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

async fn deletion_in_flight_when_the_lock_goes(env: Vec<(String, String)>, loss: Loss, tag: &str) {
    let schema = schema(&env);
    let s3 = S3Server::start().unwrap();
    let proxy = FaultProxy::start(s3.addr, 7).await.unwrap();
    let api = Api::start_with(Backend::S3(&s3), &with(env, &[])).unwrap();
    let content = unique_content(tag, OBJECT_SIZED);
    api.ft().put_ok("/first", 1, content.clone()).await;
    delete_path(&api, "/first", 1).await;

    proxy.set_hold(Some(Hold::Deletes(HOLD)));
    let mut child = cleaner(
        &api,
        &proxy.endpoint(),
        &["--grace-secs", "0", "--no-orphans"],
    )
    .spawn()
    .unwrap();
    if !proxy.wait_held(1, Duration::from_secs(30)).await {
        let _ = child.kill();
        let (stdout, stderr) = finish(child);
        panic!("the cleaner's DELETE never reached the proxy: {stdout}{stderr}");
    }
    let sent = Instant::now();
    match loss {
        Loss::SessionEnded => {
            let ended = terminate_lock_holder(&schema, &blob_lock_of(&content)).await;
            assert_eq!(ended, 1, "the cleaner's lock session");
        }
        Loss::Killed => {
            child.kill().unwrap();
        }
        Loss::LockFileReplaced => unreachable!("the API would not find the blob's lock either"),
    }

    api.ft().put_ok("/again", 2, content.clone()).await;
    let acknowledged = sent.elapsed();
    let end = Instant::now() + Duration::from_secs(30);
    while proxy.held_forwarded() < 1 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(proxy.held_forwarded(), 1, "the held DELETE was delivered");
    let (stdout, stderr) = finish(child);

    let (status, body) = api.ft().get_identity("/again").await;
    assert_eq!(status, StatusCode::OK, "the acknowledged file reads back");
    assert!(body == content, "with its content");
    api.verify_deep();
    assert_eq!(api.metric("s3dedup_deletion_waits_total").await, 1);
    if let Loss::SessionEnded = loss {
        let lock = blob_lock_of(&content);
        assert!(stdout.contains(" 1 locks lost"), "{stdout}{stderr}");
        assert!(
            stderr.contains(&lock),
            "the log names the lost lock: {stderr}"
        );
    }
    report(&format!(
        "LOCKLOSS {tag}: DELETE held {HOLD:?}, lock lost by {loss:?}; the PUT of the same \
         content was acknowledged {acknowledged:.1?} after the DELETE left, after it landed; \
         file intact, verify --deep clean"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run through tests/run-all.sh"]
async fn postgres_cleaner_session_ended_while_its_delete_is_in_flight() {
    let env = with(pg_env(&unique_schema("ll_end")), &[]);
    let env = [env, settings()].concat();
    deletion_in_flight_when_the_lock_goes(env, Loss::SessionEnded, "pg-session-ended").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run through tests/run-all.sh"]
async fn postgres_cleaner_killed_while_its_delete_is_in_flight() {
    let env = [pg_env(&unique_schema("ll_kill")), settings()].concat();
    deletion_in_flight_when_the_lock_goes(env, Loss::Killed, "pg-cleaner-killed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_cleaner_killed_while_its_delete_is_in_flight() {
    deletion_in_flight_when_the_lock_goes(settings(), Loss::Killed, "sqlite-cleaner-killed").await;
}

/// A PUT's upload reaches the store but its answer is held; the PUT's lock is lost; the
/// cleaner's orphan sweep (grace 0) deletes the object, which has no row yet; then the PUT
/// goes on to commit.
async fn upload_swept_before_its_commit(env: Vec<(String, String)>, loss: Loss, tag: &str) {
    let schema = schema(&env);
    let s3 = S3Server::start().unwrap();
    let proxy = FaultProxy::start(s3.addr, 11).await.unwrap();
    let env = with(env, &[("S3DEDUP_STORE__S3__ENDPOINT", proxy.endpoint())]);
    let api = Api::start_with(Backend::S3(&s3), &env).unwrap();
    let content = unique_content(tag, OBJECT_SIZED);
    let hex = sha256_hex(&content);
    proxy.set_hold(Some(Hold::PutAnswer {
        key: hex.clone(),
        delay: Duration::from_secs(6),
    }));
    let put = {
        let (ft, body) = (api.ft(), content.clone());
        tokio::spawn(async move { ft.put_request("/x", 1).body(body).send().await })
    };
    assert!(
        proxy.wait_held(1, Duration::from_secs(30)).await,
        "the upload reached the proxy"
    );
    match loss {
        Loss::SessionEnded => {
            let ended = terminate_lock_holder(&schema, &blob_lock_of(&content)).await;
            assert_eq!(ended, 1, "the API's lock session");
        }
        Loss::LockFileReplaced => {
            std::fs::remove_file(api.data_dir.join("metadata.sqlite3.locks")).unwrap();
        }
        Loss::Killed => unreachable!("a killed API acknowledges nothing"),
    }
    let (stdout, stderr) = finish(
        cleaner(&api, &s3.endpoint(), &["--grace-secs", "0"])
            .spawn()
            .unwrap(),
    );
    assert!(
        stdout.contains("and 1 orphaned objects"),
        "the sweep deleted the upload: {stdout}{stderr}"
    );
    proxy.set_hold(None);
    let answer = put.await.unwrap().unwrap();
    assert_eq!(answer.status(), StatusCode::OK, "{}", api.log());
    let (status, body) = api.ft().get_identity("/x").await;
    assert_eq!(status, StatusCode::OK, "the acknowledged file reads back");
    assert!(body == content, "with its content");
    assert!(
        s3.list_keys().await.unwrap().contains(&sharded_key(&hex)),
        "its object is in the bucket"
    );
    api.verify_deep();
    assert!(
        api.log().contains("changed under its lock"),
        "the API says why it stored the content again: {}",
        api.log()
    );
    assert_eq!(api.metric("s3dedup_commits_retried_total").await, 1);
    if let Loss::SessionEnded = loss {
        assert_eq!(api.metric("s3dedup_locks_lost_total").await, 1);
        assert!(
            api.log().contains(&blob_lock_of(&content)),
            "the log names the lost lock"
        );
    }
    report(&format!(
        "LOCKLOSS {tag}: upload done, lock lost by {loss:?}, orphan sweep deleted it before \
         the commit; the commit noticed and stored it again; file intact, verify --deep clean"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_upload_swept_after_its_lock_file_was_replaced() {
    upload_swept_before_its_commit(settings(), Loss::LockFileReplaced, "sqlite-upload-swept").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run through tests/run-all.sh"]
async fn postgres_upload_swept_after_its_session_ended() {
    let env = [pg_env(&unique_schema("ll_sweep")), settings()].concat();
    upload_swept_before_its_commit(env, Loss::SessionEnded, "pg-upload-swept").await;
}

/// A database of its own: ending every session in it touches no other suite.
async fn own_database(tag: &str) -> (String, String) {
    let name = format!("{tag}_{}_{}", std::process::id(), rand::random::<u32>());
    pg_admin()
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create a database");
    let (host, port) = pg_host_port();
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let conninfo = format!(
        "host={host} port={port} user={} password={} dbname={name}",
        var("PGUSER", "postgres"),
        var("PGPASSWORD", ""),
    );
    (name, conninfo)
}

/// What a program run in a loop beside the workload did.
#[derive(Debug, Default)]
struct Runs {
    runs: u64,
    /// Blobs and orphans freed (cleaner).
    freed: u64,
    /// Locks the cleaner reported lost.
    locks_lost: u64,
    /// Runs that exited 3 (verify: problems found), with what they printed.
    alarms: Vec<String>,
    /// Runs that exited otherwise non-zero, with what they printed.
    failed: Vec<String>,
}

fn number_before(text: &str, word: &str) -> u64 {
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[1].trim_end_matches([',', ';']) == word)
        .filter_map(|w| w[0].parse::<u64>().ok())
        .sum()
}

/// Runs `args` back to back until `stop`.
fn looping(
    api: &Api, args: Vec<Vec<&'static str>>, stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Runs> {
    let base = api.cleaner_sweeping();
    let program = base.get_program().to_owned();
    let base_args: Vec<_> = base.get_args().map(|a| a.to_owned()).collect();
    let envs: Vec<_> = base
        .get_envs()
        .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
        .collect();
    std::thread::spawn(move || {
        let mut r = Runs::default();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut c = Command::new(&program);
            c.args(&base_args).args(&args[r.runs as usize % args.len()]);
            for (k, v) in &envs {
                match v {
                    Some(v) => c.env(k, v),
                    None => c.env_remove(k),
                };
            }
            let out = c
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            r.runs += 1;
            r.freed += number_before(&text, "blobs") + number_before(&text, "orphaned");
            r.locks_lost += number_before(&text, "locks");
            let all = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
            match out.status.code() {
                Some(0) => {}
                Some(3) => r.alarms.push(all),
                _ => r.failed.push(all),
            }
        }
        r
    })
}

/// Ends sessions of database `db` every 1 to 2.5 s until `stop`: the lock sessions, and every
/// fourth round all of them. Returns (rounds, sessions ended).
fn end_sessions(
    db: String, stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64)> {
    use std::sync::atomic::Ordering;
    tokio::spawn(async move {
        let admin = pg_admin().await;
        let (mut rounds, mut ended) = (0u64, 0u64);
        while !stop.load(Ordering::Relaxed) {
            let pause = 1000 + rand::random::<u64>() % 1500;
            tokio::time::sleep(Duration::from_millis(pause)).await;
            rounds += 1;
            let whom = if rounds % 4 == 0 {
                "true"
            } else {
                "application_name = 's3dedup-locks'"
            };
            let sql = format!(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid() AND {whom}"
            );
            let n: i64 = admin.query_one(&sql, &[&db]).await.unwrap().get(0);
            ended += n as u64;
        }
        (rounds, ended)
    })
}

/// A churning pool of contents through `apis`, with the cleaner at grace 0 and `--verify`
/// looping beside them (and, given a database, its sessions ended all along). Nothing
/// acknowledged may be lost, no verify may raise a false alarm, and no request may fail.
async fn torture(apis: &[&Api], sessions_of: Option<String>, tag: &str) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let cleaner = looping(apis[0], vec![vec!["--grace-secs", "0"]], stop.clone());
    let verifier = looping(
        apis[apis.len() - 1],
        vec![
            vec!["--verify"],
            vec!["--verify"],
            vec!["--verify", "--deep"],
        ],
        stop.clone(),
    );
    let killer = sessions_of.map(|db| end_sessions(db, stop.clone()));
    let workload = Workload::new(tag, 16, 1000, 100).churning(200);
    let urls: Vec<String> = apis.iter().map(|a| a.url("")).collect();
    let started = Instant::now();
    let outcome = workload.run(&urls).await;
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (rounds, ended) = match killer {
        Some(k) => k.await.unwrap(),
        None => (0, 0),
    };
    let cleaned = cleaner.join().unwrap();
    let verified = verifier.join().unwrap();
    eprintln!(
        "cleaner: {cleaned:?}\nverify: {} runs, {} failed",
        verified.runs,
        verified.failed.len()
    );
    assert!(
        verified.alarms.is_empty(),
        "verify raised {} false alarms: {:#?}",
        verified.alarms.len(),
        verified.alarms
    );
    if !outcome.server_errors.is_empty() {
        for (i, api) in apis.iter().enumerate() {
            eprintln!("API {i} log:\n{}", api.log());
        }
    }
    assert!(
        outcome.server_errors.is_empty(),
        "{} requests failed: {:#?}",
        outcome.server_errors.len(),
        outcome.server_errors
    );
    workload.check_final(&outcome, &urls).await;
    // A last run with nothing in the way collects what is left; the store must stay complete.
    apis[0].run_cleaner(&["--grace-secs", "0"]);
    workload.check_final(&outcome, &urls).await;
    apis[0].verify_deep();
    assert!(
        cleaned.freed >= 1000,
        "the cleaner freed blobs all along: {cleaned:?}"
    );
    assert!(
        verified.runs >= 5,
        "verify ran all along: {} runs",
        verified.runs
    );
    let mut lost = 0;
    let mut retried = 0;
    for api in apis {
        lost += api.metric("s3dedup_locks_lost_total").await;
        retried += api.metric("s3dedup_commits_retried_total").await;
    }
    let sessions = if rounds > 0 {
        assert!(
            rounds >= 10,
            "sessions were ended throughout ({rounds} rounds)"
        );
        assert!(lost > 0, "the instances count the locks they lost");
        format!("{rounds} rounds ended {ended} sessions (every 4th round all of them); ")
    } else {
        String::new()
    };
    report(&format!(
        "LOCKLOSS {tag}: {} operations in {took:.0?} through {} instance(s); {sessions}the \
         cleaner ran {} times and freed {} blobs, {} locks lost and {} runs failed; {} verify \
         runs, 0 false alarms, {} failed; the instances lost {lost} locks and {retried} \
         commits found their blob changed; 0 lost, 0 5xx",
        outcome.ops,
        apis.len(),
        cleaned.runs,
        cleaned.freed,
        cleaned.locks_lost,
        cleaned.failed.len(),
        verified.runs,
        verified.failed.len(),
    ));
}

/// Torture: a short settle, so tombstones settle and are purged within the run.
fn torture_settings() -> Vec<(String, String)> {
    deletion_bounds(2)
}

/// Two instances on PostgreSQL and S3 whose sessions are ended all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run through tests/run-all.sh"]
async fn torture_postgres_sessions_ended_under_load_lose_nothing() {
    let (db, conninfo) = own_database("lockloss").await;
    let s3 = S3Server::start().unwrap();
    let env = with(
        torture_settings(),
        &[
            ("S3DEDUP_METADATA__BACKEND", "postgres".into()),
            ("S3DEDUP_LOCKS__BACKEND", "postgres".into()),
            ("S3DEDUP_METADATA__POSTGRES__URL", conninfo),
        ],
    );
    let a = Api::start_with(Backend::S3(&s3), &env).unwrap();
    let b = Api::start_with(Backend::S3(&s3), &env).unwrap();
    torture(&[&a, &b], Some(db), "torture-pg").await;
}

/// One host: SQLite and file locks, objects on S3 (deletes that take time), the cleaner and
/// verify as processes of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torture_sqlite_cleaner_and_verify_beside_load_lose_nothing() {
    let s3 = S3Server::start().unwrap();
    let api = Api::start_with(Backend::S3(&s3), &torture_settings()).unwrap();
    torture(&[&api], None, "torture-sqlite").await;
}
