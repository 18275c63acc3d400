//! `s3dedup-bench`: identical workloads against several Filetracker servers (and an S3 server
//! directly, the ceiling for a proxy), side by side in one run; prints a Markdown table with
//! ratios. Run it through tests/bench/run.sh, which starts the servers on fresh data.
//!
//!   s3dedup-bench --target NAME=URL[@PID] ... [--s3 ENDPOINT] [--baseline NAME] [--small-ops N]
//!                 [--large-mib N] [--list-files N] [--huge-gib N] [--only LABEL]
//!
//! Every content is fresh random bytes (both kinds of server deduplicate). Bounded in work, not
//! timed by the test suite: this measures, it does not assert.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use hyper::Method;
use rand::RngCore;
use s3dedup_tests::{S3_BUCKET, gzip, lm, proc_status_kib, s3_client, sha256_hex};

mod http;
use http::Http;

struct Target {
    name: String,
    url: String,
    pid: Option<u32>,
}

#[derive(Default, Clone)]
struct Measure {
    ops: usize,
    bytes: u64,
    wall: Duration,
    latencies: Vec<Duration>,
    errors: usize,
}

impl Measure {
    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.wall.as_secs_f64().max(1e-9)
    }
    fn mib_per_sec(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.wall.as_secs_f64().max(1e-9)
    }
    fn pct(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get(((l.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    }
}

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rng().fill_bytes(&mut v);
    v
}

/// Compressible like real test data: random words from a small alphabet.
fn text_like(n: usize) -> Vec<u8> {
    let mut rng = rand::rng();
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let w = rng.next_u32();
        for i in 0..(w % 8 + 1) {
            v.push(b'a' + ((w >> (i * 3)) % 20) as u8);
        }
        v.push(if w.is_multiple_of(11) { b'\n' } else { b' ' });
    }
    v.truncate(n);
    v
}

/// Each workload's figures, and the server's peak resident set (KiB, process tree) while it ran
/// (with whatever preparation it needed on the server since the previous workload: the listing's
/// includes populating its directory).
struct Results {
    pid: Option<u32>,
    rows: BTreeMap<String, (Measure, Option<u64>)>,
    /// The server's address when it counts its S3 requests on `/metrics`, and the count so far.
    s3_counter: Option<(std::net::SocketAddr, u64)>,
    /// S3 requests the server sent per operation of each workload (what a user is billed by).
    s3_per_op: BTreeMap<String, f64>,
}

impl Results {
    /// Starts measuring the peak resident set of `pid`'s tree from now on.
    fn new(pid: Option<u32>) -> Results {
        if let Some(p) = pid {
            reset_peak(p);
        }
        Results {
            pid,
            rows: BTreeMap::new(),
            s3_counter: None,
            s3_per_op: BTreeMap::new(),
        }
    }

    /// Also counts the S3 requests of each workload, from the s3dedup at `url`'s `/metrics`.
    fn counting_s3_requests(mut self, url: &str) -> anyhow::Result<Results> {
        let addr = url.trim_start_matches("http://").parse()?;
        self.s3_counter = Some((addr, s3_requests_sent(addr)?));
        Ok(self)
    }

    /// Records `m` under `label` with the peak resident set since the previous record, and
    /// starts a new one.
    fn record(&mut self, label: impl Into<String>, m: Measure) {
        let peak = self.pid.map(|p| {
            let kib = tree_kib(p, "VmHWM:");
            reset_peak(p);
            kib
        });
        let label = label.into();
        if let Some((addr, before)) = self.s3_counter
            && let Ok(now) = s3_requests_sent(addr)
        {
            let per_op = (now - before) as f64 / m.ops.max(1) as f64;
            self.s3_per_op.insert(label.clone(), per_op);
            self.s3_counter = Some((addr, now));
        }
        self.rows.insert(label, (m, peak));
    }

    fn get(&self, label: &str) -> Option<&Measure> {
        self.rows.get(label).map(|(m, _)| m)
    }

    /// The highest of the recorded peaks, and the workload it was reached in.
    fn peak(&self) -> Option<(u64, &str)> {
        self.rows
            .iter()
            .filter_map(|(l, (_, p))| p.map(|p| (p, l.as_str())))
            .max()
    }
}

/// The S3 requests an s3dedup at `addr` has sent for objects, summed over operations from
/// `/metrics` (not its HeadBucket every few seconds, which checks the store whatever happens).
fn s3_requests_sent(addr: std::net::SocketAddr) -> anyhow::Result<u64> {
    let text = s3dedup_tests::raw_request(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n",
    )?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("s3dedup_s3_requests_total{") && !l.contains("HeadBucket"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// Runs `ops` requests, `concurrency` at a time; `f(i)` performs request `i` and returns its bytes.
async fn drive<F, Fut>(ops: usize, concurrency: usize, f: F) -> Measure
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u64>>,
{
    let started = Instant::now();
    let results: Vec<(Duration, anyhow::Result<u64>)> = futures::stream::iter(0..ops)
        .map(|i| {
            let fut = f(i);
            async move {
                let t = Instant::now();
                let r = fut.await;
                (t.elapsed(), r)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut m = Measure {
        wall: started.elapsed(),
        ..Measure::default()
    };
    for (lat, r) in results {
        match r {
            Ok(b) => {
                m.ops += 1;
                m.bytes += b;
                m.latencies.push(lat);
            }
            Err(e) => {
                if m.errors == 0 {
                    eprintln!("  first error: {e:#}");
                }
                m.errors += 1;
            }
        }
    }
    m
}

/// A body ready to send: raw, or pre-gzipped with its hints (prepared before timing), at level 9
/// as the Filetracker client gzips (Python's `gzip.GzipFile` default).
#[derive(Clone)]
enum Body {
    Raw(Bytes),
    Gzip {
        gz: Bytes,
        sha256: String,
        size: usize,
    },
}

impl Body {
    fn gzipped(content: &[u8]) -> Body {
        Body::Gzip {
            gz: gzip(content).into(),
            sha256: sha256_hex(content),
            size: content.len(),
        }
    }
}

async fn ft_put(http: &Http, path: &str, body: Body) -> anyhow::Result<u64> {
    let target = format!("/files{path}?last_modified={}", lm(1_700_000_000));
    let len = match &body {
        Body::Gzip { size, .. } => *size as u64,
        Body::Raw(b) => b.len() as u64,
    };
    let status = match body {
        Body::Gzip { gz, sha256, size } => {
            let size = size.to_string();
            let headers = [
                ("Content-Encoding", "gzip"),
                ("SHA256-Checksum", sha256.as_str()),
                ("Logical-Size", size.as_str()),
            ];
            http.send(Method::PUT, &target, &headers, gz, |_| ())
                .await?
        }
        Body::Raw(b) => http.send(Method::PUT, &target, &[], b, |_| ()).await?,
    };
    if !status.is_success() {
        bail!("PUT {path}: {status}");
    }
    Ok(len)
}

/// GETs `target`, handing each chunk of the body to `chunk`; returns the body's size.
async fn get(http: &Http, target: &str, mut chunk: impl FnMut(&[u8])) -> anyhow::Result<u64> {
    let mut n = 0u64;
    let status = http
        .send(Method::GET, target, &[], Bytes::new(), |c| {
            n += c.len() as u64;
            chunk(c);
        })
        .await?;
    if !status.is_success() {
        bail!("GET {target}: {status}");
    }
    Ok(n)
}

async fn ft_get(http: &Http, path: &str) -> anyhow::Result<u64> {
    get(http, &format!("/files{path}"), |_| ()).await
}

/// Transfers of each large workload, one at a time (a 64 MiB transfer takes a few hundred
/// milliseconds; fewer would leave the ratios to chance on a noisy machine).
const LARGE_REPS: usize = 6;

struct Config {
    /// Only workloads whose label contains this (GETs read what the PUT workloads wrote).
    only: Option<String>,
    small_ops: usize,
    /// Size of each of the 16 concurrent transfers of the memory run; 0: skipped.
    huge_gib: usize,
    large_mib: usize,
    list_files: usize,
}

async fn filetracker_suite(t: &Target, cfg: &Config, out: &mut Results) -> anyhow::Result<()> {
    let run = format!("/bench/{}", rand::rng().next_u32());
    let (fresh, keep) = (Http::new(&t.url, false)?, Http::new(&t.url, true)?);
    let (fresh, keep) = (&fresh, &keep);
    let small: Vec<Bytes> = (0..cfg.small_ops * 3)
        .map(|_| random(4096).into())
        .collect();
    let want = |label: &str| cfg.only.as_deref().is_none_or(|o| label.contains(o));
    // What the load generator and the kernel can do at all on this machine: the smallest
    // request there is, through the same client.
    for (label, http) in [
        (
            "empty GET /version/, new conn, c=16 (harness ceiling)",
            &fresh,
        ),
        (
            "empty GET /version/, keep-alive, c=16 (harness ceiling)",
            &keep,
        ),
    ] {
        if !want(label) {
            continue;
        }
        let m = drive(cfg.small_ops, 16, |_| get(http, "/version/", |_| ())).await;
        eprintln!("  {label}: {:.0} ops/s", m.ops_per_sec());
        out.record(label, m);
    }
    let mut slot = 0;
    for (label, http, conc) in [
        ("4 KiB PUT, new conn, c=1", &fresh, 1),
        ("4 KiB PUT, new conn, c=16", &fresh, 16),
        ("4 KiB PUT, keep-alive, c=16", &keep, 16),
    ] {
        let ops = if conc == 1 {
            cfg.small_ops / 4
        } else {
            cfg.small_ops
        };
        if !want(label) {
            continue;
        }
        // Only rows that run write paths: the GETs below read just those.
        let base = slot;
        slot += ops;
        let m = drive(ops, conc, |i| {
            let body = Body::Raw(small[base + i].clone());
            let path = format!("{run}/s/{}", base + i);
            async move { ft_put(http, &path, body).await }
        })
        .await;
        eprintln!("  {label}: {:.0} ops/s", m.ops_per_sec());
        out.record(label, m);
    }
    for (label, http, conc) in [
        ("4 KiB GET, new conn, c=1", &fresh, 1),
        ("4 KiB GET, new conn, c=16", &fresh, 16),
        ("4 KiB GET, keep-alive, c=16", &keep, 16),
    ] {
        let ops = if conc == 1 {
            cfg.small_ops / 4
        } else {
            cfg.small_ops
        };
        if !want(label) {
            continue;
        }
        if slot == 0 {
            bail!("{label} reads what the 4 KiB PUT rows write: select one of them too");
        }
        let m = drive(ops, conc, |i| {
            let path = format!("{run}/s/{}", i % slot);
            async move { ft_get(http, &path).await }
        })
        .await;
        eprintln!("  {label}: {:.0} ops/s", m.ops_per_sec());
        out.record(label, m);
    }
    let label = "4 KiB re-upload of known content (dedup hit), c=16";
    if want(label) {
        let m = drive(cfg.small_ops, 16, |i| {
            let body = Body::Raw(small[i % 8].clone());
            let path = format!("{run}/dup/{i}");
            async move { ft_put(keep, &path, body).await }
        })
        .await;
        eprintln!("  dedup hit: {:.0} ops/s", m.ops_per_sec());
        out.record(label, m);
    }

    if want("MiB") {
        large(keep, &run, cfg, out).await?;
    }

    if cfg.list_files > 0 && want("list") {
        let populate = drive(cfg.list_files, 16, |i| {
            let body = Body::Raw(format!("{i}").into());
            let path = format!("{run}/list/{i:06}");
            async move { ft_put(keep, &path, body).await }
        })
        .await;
        eprintln!(
            "  populated {} files at {:.0} ops/s",
            populate.ops,
            populate.ops_per_sec()
        );
        let listing = format!("/list{run}/list");
        let m = drive(3, 1, |_| async {
            let mut lines = 0;
            let bytes = get(keep, &listing, |c| {
                lines += c.iter().filter(|b| **b == b'\n').count()
            })
            .await?;
            if lines != populate.ops {
                bail!("listing has {lines} lines, expected {}", populate.ops);
            }
            Ok(bytes)
        })
        .await;
        eprintln!("  list: p50 {:?}", m.pct(0.5));
        out.record(format!("list a directory of {} files", cfg.list_files), m);
    }
    // Last: 16 × `--huge-gib` GiB written leave the disk busy with writeback for a while, which
    // would slow the rows after them, and only on the servers that run them (S3 directly does
    // not): a 64 MiB GET from S3 ran at 0.49× direct S3 after them, 0.89–0.93× without.
    if cfg.huge_gib > 0 && want("GiB") {
        huge(keep, &run, cfg.huge_gib, out).await?;
    }
    Ok(())
}

/// The 64 MiB (`--large-mib`) PUTs, pre-gzipped and raw, then GETs, cold and warm.
async fn large(keep: &Http, run: &str, cfg: &Config, out: &mut Results) -> anyhow::Result<()> {
    let large = cfg.large_mib << 20;
    for (label, gz) in [
        ("64 MiB PUT, pre-gzipped + hints", true),
        ("64 MiB PUT, raw", false),
    ] {
        let bodies: Vec<Body> = (0..LARGE_REPS)
            .map(|_| text_like(large))
            .map(|c| {
                if gz {
                    Body::gzipped(&c)
                } else {
                    Body::Raw(c.into())
                }
            })
            .collect();
        let m = drive(LARGE_REPS, 1, |i| {
            let body = bodies[i].clone();
            let path = format!("{run}/large/{gz}/{i}");
            async move { ft_put(keep, &path, body).await }
        })
        .await;
        eprintln!("  {label}: {:.0} MiB/s", m.mib_per_sec());
        out.record(label.replace("64", &cfg.large_mib.to_string()), m);
    }
    let large_get = |i| {
        let path = format!("{run}/large/false/{i}");
        async move { ft_get(keep, &path).await }
    };
    let m = drive(LARGE_REPS, 1, large_get).await;
    eprintln!("  large GET: {:.0} MiB/s", m.mib_per_sec());
    out.record(format!("{} MiB GET (bytes on the wire)", cfg.large_mib), m);
    // The same objects again: s3dedup on S3 now serves them from its read cache (filled, and
    // verified, just after the first read).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = drive(LARGE_REPS, 1, large_get).await;
    eprintln!("  large GET again: {:.0} MiB/s", m.mib_per_sec());
    out.record(
        format!("{} MiB GET again (warm read cache)", cfg.large_mib),
        m,
    );
    Ok(())
}

async fn s3_suite(endpoint: &str, cfg: &Config, out: &mut Results) -> anyhow::Result<()> {
    let s3 = s3_client(endpoint);
    let run = rand::rng().next_u32();
    let put = |key: String, body: Vec<u8>| {
        let s3 = s3.clone();
        async move {
            let n = body.len() as u64;
            s3.put_object()
                .bucket(S3_BUCKET)
                .key(key)
                .body(body.into())
                .send()
                .await?;
            Ok::<_, anyhow::Error>(n)
        }
    };
    let get = |key: String| {
        let s3 = s3.clone();
        async move {
            let o = s3.get_object().bucket(S3_BUCKET).key(key).send().await?;
            Ok::<_, anyhow::Error>(o.body.collect().await?.into_bytes().len() as u64)
        }
    };
    let m = drive(cfg.small_ops, 16, |i| {
        put(format!("{run}/s/{i}"), random(4096))
    })
    .await;
    out.record("4 KiB PUT, keep-alive, c=16", m);
    let m = drive(cfg.small_ops, 16, |i| get(format!("{run}/s/{i}"))).await;
    out.record("4 KiB GET, keep-alive, c=16", m);
    let large = cfg.large_mib << 20;
    let bodies: Vec<Vec<u8>> = (0..LARGE_REPS).map(|_| gzip(&text_like(large))).collect();
    let logical = large as u64;
    let m = drive(LARGE_REPS, 1, |i| {
        let b = bodies[i].clone();
        let put = &put;
        async move { put(format!("{run}/l/{i}"), b).await.map(|_| logical) }
    })
    .await;
    out.record(format!("{} MiB PUT, pre-gzipped + hints", cfg.large_mib), m);
    let m = drive(LARGE_REPS, 1, |i| get(format!("{run}/l/{i}"))).await;
    out.record(format!("{} MiB GET (bytes on the wire)", cfg.large_mib), m);
    let m = drive(LARGE_REPS, 1, |i| get(format!("{run}/l/{i}"))).await;
    out.record(
        format!("{} MiB GET again (warm read cache)", cfg.large_mib),
        m,
    );
    Ok(())
}

/// Sixteen concurrent uploads of `gib` GiB each (pre-gzipped with hints, so every one is
/// inflated and hashed by the server), then sixteen concurrent downloads without gzip (the
/// server inflates each on the fly): what the peak RSS column then shows.
async fn huge(http: &Http, run: &str, gib: usize, out: &mut Results) -> anyhow::Result<()> {
    let block = text_like(1 << 20);
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(1));
    let mut hash = sha2::Sha256::default();
    for _ in 0..(gib << 10) {
        e.write_all(&block)?;
        sha2::Digest::update(&mut hash, &block);
    }
    let size = gib << 30;
    let body = Body::Gzip {
        gz: e.finish()?.into(),
        sha256: hex::encode(sha2::Digest::finalize(hash)),
        size,
    };
    let m = drive(16, 16, |i| {
        let (body, path) = (body.clone(), format!("{run}/huge/{i}"));
        async move { ft_put(http, &path, body).await }
    })
    .await;
    eprintln!("  16 × {gib} GiB PUT: {:.0} MiB/s", m.mib_per_sec());
    out.record(format!("16 × {gib} GiB PUT at once, pre-gzipped"), m);
    let m = drive(16, 16, |i| {
        let path = format!("{run}/huge/{i}");
        async move { ft_get(http, &path).await }
    })
    .await;
    eprintln!("  16 × {gib} GiB GET: {:.0} MiB/s", m.mib_per_sec());
    out.record(format!("16 × {gib} GiB GET at once, inflated"), m);
    Ok(())
}

/// Seconds `sha256sum` and then `gzip -1` take over `data`: the floor for a raw PUT, which must
/// do both.
fn sha256sum_and_gzip(data: &[u8]) -> anyhow::Result<Duration> {
    let f = tempfile::NamedTempFile::new()?;
    std::fs::write(f.path(), data)?;
    let started = Instant::now();
    for cmd in [
        "sha256sum \"$0\" > /dev/null",
        "gzip -1 -c \"$0\" > /dev/null",
    ] {
        let ok = std::process::Command::new("sh")
            .args(["-c", cmd])
            .arg(f.path())
            .status()?
            .success();
        if !ok {
            bail!("{cmd} failed");
        }
    }
    Ok(started.elapsed())
}

/// Resets the peak resident set (`VmHWM`) of a process and all its descendants to what each
/// holds now (`clear_refs` 5, Linux ≥ 4.0), so the next reading covers only what follows.
fn reset_peak(pid: u32) {
    for p in tree(pid) {
        // A process that has just exited has nothing left to measure.
        let _ = std::fs::write(format!("/proc/{p}/clear_refs"), "5");
    }
}

/// A process and all its descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            all.extend(tree(c));
        }
    }
    all
}

/// A memory figure of `/proc/PID/status` (`VmHWM:` for the peak, `VmRSS:` for now) summed
/// over a process and all its descendants, in KiB.
fn tree_kib(pid: u32, field: &str) -> u64 {
    tree(pid)
        .into_iter()
        .map(|p| proc_status_kib(p, field))
        .sum()
}

/// One server's name, its figures, and its resident set (KiB) after idling, if its PID is known.
type ServerResult = (String, Results, Option<u64>);

/// How long a server is left idle before its resident set is read: past twice s3dedup's
/// default `api.release_memory_after_idle_secs`, when it has given back what it will.
const IDLE_WAIT: Duration = Duration::from_secs(22);

// One thread, like `wrk -t1`: on two cores, a second one would take CPU from the server measured.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut targets = Vec::new();
    let mut s3 = None;
    let mut baseline = "old".to_owned();
    let mut cfg = Config {
        only: None,
        small_ops: 2000,
        huge_gib: 0,
        large_mib: 64,
        list_files: 0,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().context(format!("{a} needs a value"));
        match a.as_str() {
            "--target" => {
                let v = val()?;
                let (name, rest) = v.split_once('=').context("--target NAME=URL[@PID]")?;
                let (url, pid) = match rest.rsplit_once('@') {
                    Some((u, p)) => (u.to_owned(), Some(p.parse()?)),
                    None => (rest.to_owned(), None),
                };
                targets.push(Target {
                    name: name.into(),
                    url,
                    pid,
                });
            }
            "--s3" => s3 = Some(val()?),
            "--baseline" => baseline = val()?,
            "--only" => cfg.only = Some(val()?),
            "--huge-gib" => cfg.huge_gib = val()?.parse()?,
            "--small-ops" => cfg.small_ops = val()?.parse()?,
            "--large-mib" => cfg.large_mib = val()?.parse()?,
            "--list-files" => cfg.list_files = val()?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    let mut results: Vec<ServerResult> = Vec::new();
    for t in &targets {
        eprintln!("== {} ({})", t.name, t.url);
        let mut out = Results::new(t.pid);
        if t.name.starts_with("s3dedup") {
            out = out.counting_s3_requests(&t.url)?;
        }
        filetracker_suite(t, &cfg, &mut out).await?;
        let idle = match t.pid {
            Some(p) => {
                tokio::time::sleep(IDLE_WAIT).await;
                Some(tree_kib(p, "VmRSS:"))
            }
            None => None,
        };
        results.push((t.name.clone(), out, idle));
    }
    if let Some(ep) = &s3 {
        eprintln!("== S3 directly ({ep})");
        let mut out = Results::new(None);
        s3_suite(ep, &cfg, &mut out).await?;
        results.push(("s3-direct".into(), out, None));
    }
    print_table(&results, &baseline);
    let reference = sha256sum_and_gzip(&text_like(cfg.large_mib << 20))?;
    let mib = cfg.large_mib as f64;
    println!();
    println!(
        "Floor for a raw {mib} MiB PUT: `sha256sum` then `gzip -1` of the same kind of file take \
         {:.2} s ({:.0} MiB/s).",
        reference.as_secs_f64(),
        mib / reference.as_secs_f64()
    );
    let raw = format!("{} MiB PUT, raw", cfg.large_mib);
    for (name, out, _) in &results {
        if let Some(m) = out.get(&raw).filter(|m| m.ops > 0) {
            println!(
                "- {name}: a raw PUT takes {:.2}× that",
                m.wall.as_secs_f64() / m.ops as f64 / reference.as_secs_f64()
            );
        }
    }
    Ok(())
}

fn print_table(results: &[ServerResult], baseline: &str) {
    let workloads: Vec<&String> = results[0].1.rows.keys().collect();
    let find = |name: &str, w: &str| {
        results
            .iter()
            .find(|r| r.0 == name)
            .and_then(|r| r.1.get(w))
    };
    println!(
        "| workload | server | ops/s | MiB/s | p50 ms | p99 ms | errors | peak RSS MiB | vs {baseline} | vs s3-direct |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for w in workloads {
        let large = w.contains("MiB");
        for (name, out, _) in results {
            let Some((m, peak)) = out.rows.get(w.as_str()) else {
                continue;
            };
            let ratio = |other: Option<&Measure>| match other {
                Some(o) if name != baseline && o.ops > 0 => {
                    let (a, b) = if large {
                        (m.mib_per_sec(), o.mib_per_sec())
                    } else {
                        (m.ops_per_sec(), o.ops_per_sec())
                    };
                    format!("{:.2}×", a / b)
                }
                _ => String::new(),
            };
            let vs_s3 = if name == "s3-direct" {
                String::new()
            } else {
                ratio(find("s3-direct", w))
            };
            println!(
                "| {w} | {name} | {:.0} | {:.1} | {:.2} | {:.2} | {} | {} | {} | {vs_s3} |",
                m.ops_per_sec(),
                m.mib_per_sec(),
                m.pct(0.5).as_secs_f64() * 1e3,
                m.pct(0.99).as_secs_f64() * 1e3,
                m.errors,
                peak.map_or(String::new(), mib),
                ratio(find(baseline, w)),
            );
        }
    }
    let counted: Vec<&ServerResult> = results
        .iter()
        .filter(|r| r.1.s3_per_op.values().any(|n| *n > 0.0))
        .collect();
    if !counted.is_empty() {
        println!();
        let names: Vec<&str> = counted.iter().map(|r| r.0.as_str()).collect();
        println!(
            "| workload | S3 requests per operation: {} |",
            names.join(" | ")
        );
        println!("|---|{}", "---:|".repeat(counted.len()));
        for w in counted[0].1.s3_per_op.keys() {
            let cells: Vec<String> = counted
                .iter()
                .map(|r| {
                    r.1.s3_per_op
                        .get(w)
                        .map_or(String::new(), |n| format!("{n:.2}"))
                })
                .collect();
            println!("| {w} | {} |", cells.join(" | "));
        }
    }
    println!();
    println!(
        "| server | peak RSS over the run (MiB, process tree) | reached in | RSS after {} s idle |",
        IDLE_WAIT.as_secs()
    );
    println!("|---|---:|---|---:|");
    for (name, out, idle) in results {
        if let (Some((peak, during)), Some(idle)) = (out.peak(), idle) {
            println!("| {name} | {} | {during} | {} |", mib(peak), mib(*idle));
        }
    }
}

/// KiB as MiB, one decimal.
fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}
