//! Soak: mixed load for `TESTS_SOAK_SECS` (default 600) on PostgreSQL with two API instances
//! sharing one S3 bucket, the cleaner running every few seconds with a short grace period, the
//! ledger workload (small and large PUT/GET/DELETE/list) and the real Filetracker client at once.
//! Nothing may be lost or wrong, and each API's RSS must stay flat; the curve is printed.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use s3dedup_tests::ledger::{Ledger, Until};
use s3dedup_tests::*;

fn soak_secs() -> u64 {
    std::env::var("TESTS_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL and minutes: run through tests/run-all.sh"]
async fn ten_minutes_of_mixed_load_on_postgres_with_two_apis_and_the_cleaner() {
    let secs = soak_secs();
    let s3 = S3Server::start().unwrap();
    let schema = unique_schema("soak");
    let mut env = pg_env(&schema);
    env.push(("S3DEDUP_STORE__CACHE__MAX_SIZE_MB".into(), "64".into()));
    let a = Api::start_with(Backend::S3(&s3), &env).unwrap();
    let b = Api::start_with(Backend::S3(&s3), &env).unwrap();
    let urls = vec![a.url(""), b.url("")];
    let deadline = Instant::now() + Duration::from_secs(secs);

    // The cleaner every 3 s, 5 s grace: it races the uploads all along.
    let stop = Arc::new(AtomicBool::new(false));
    let cleaner = {
        let mut cmd = a.cleaner_sweeping();
        cmd.args(["--grace-secs", "5"]).stdin(Stdio::null());
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut runs, mut failures) = (0u32, Vec::new());
            while !stop.load(Relaxed) {
                let out = cmd.output().expect("cleaner runs");
                runs += 1;
                if !out.status.success() {
                    failures.push(String::from_utf8_lossy(&out.stderr).into_owned());
                }
                std::thread::sleep(Duration::from_secs(3));
            }
            (runs, failures)
        })
    };
    let python = venv_bin("python");
    let ft_clients: Vec<_> = urls
        .iter()
        .enumerate()
        .map(|(i, url)| {
            Command::new(&python)
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/soak/ft_client_loop.py"
                ))
                .args([url.as_str(), &secs.to_string(), &format!("c{i}")])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("python from TESTS_VENV with filetracker")
        })
        .collect();

    let ledger = Ledger::new(&[1 << 10, 16 << 10, 256 << 10, 8 << 20]);
    let load = ledger.spawn(urls, "soak", 6, Until::Time(deadline), rand::random());
    let mut curve: Vec<(u64, u64, u64)> = Vec::new();
    let start = Instant::now();
    while !load.is_finished() {
        let rss = |api: &Api| proc_status_kib(api.proc.pid(), "VmRSS:") >> 10;
        curve.push((start.elapsed().as_secs(), rss(&a), rss(&b)));
        tokio::time::sleep(Duration::from_secs((secs / 20).max(1))).await;
    }
    load.await.unwrap();
    stop.store(true, Relaxed);
    let (runs, failures) = cleaner.join().unwrap();
    let mut ft_lines = Vec::new();
    for c in ft_clients {
        let out = c.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let text = stdout.lines().last().unwrap_or_default().to_owned();
        assert!(
            out.status.success(),
            "filetracker client: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ft_lines.push(text);
    }
    report(&format!(
        "SOAK RSS curve (s, API a MiB, API b MiB): {curve:?}"
    ));
    assert!(failures.is_empty(), "cleaner failures: {failures:#?}");

    let (files, lost) = ledger.check_all(&b.url("")).await;
    a.verify_deep();
    report(&format!(
        "SOAK {secs} s: {}, {files} files checked, {} lost; {runs} cleaner runs; {}",
        ledger.summary(),
        lost.len(),
        ft_lines.join("; ")
    ));
    assert!(lost.is_empty(), "{lost:#?}");
    assert!(ledger.violations().is_empty(), "{:#?}", ledger.violations());
    for api in [&a, &b] {
        assert!(!api.log().contains("panicked"), "{}", api.log());
    }
    // Flat: the last quarter's peak is no more than the second quarter's peak plus a margin
    // (the first quarter is warm-up: pools, caches and allocator arenas filling).
    let q = curve.len() / 4;
    if q > 0 {
        for (i, name) in [(1usize, "a"), (2, "b")] {
            let col = |s: &[(u64, u64, u64)]| {
                s.iter()
                    .map(|r| if i == 1 { r.1 } else { r.2 })
                    .max()
                    .unwrap_or(0)
            };
            let (warm, last) = (col(&curve[q..2 * q]), col(&curve[3 * q..]));
            assert!(
                last <= warm + warm / 2 + 32,
                "API {name} RSS grew from {warm} MiB to {last} MiB"
            );
        }
    }
}
