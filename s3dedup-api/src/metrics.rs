//! Prometheus counters of the HTTP daemon, rendered as text for `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use s3dedup_common::filestore::LockIncidents;
use s3dedup_common::last_runs::LastRun;
use s3dedup_common::meta::Stats;
use s3dedup_common::store::CacheStats;

use crate::hyper_errors::Refusal;

const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// The store's totals as last counted in the background: how long ago, and how long the count
/// took.
pub struct Totals {
    pub stats: Stats,
    pub age: Duration,
    pub took: Duration,
}

/// Live counters; cheap to update from every request.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, &'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub dedup_hits: AtomicU64,
    pub dedup_misses: AtomicU64,
    pub in_flight: AtomicU64,
    /// Files brought over from the old server on a miss (live migration).
    pub fallback_imports: AtomicU64,
    /// Responses whose body failed after the headers went out.
    pub responses_cut: AtomicU64,
    /// Error answers by the part of the system that failed.
    backend_errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Requests refused for their credentials: none, malformed, wrong.
    pub auth_missing: AtomicU64,
    pub auth_malformed: AtomicU64,
    pub auth_wrong: AtomicU64,
    /// Authenticated requests their principal may not make (403).
    pub auth_denied: AtomicU64,
    /// Logins refused unchecked: their address failed too often this minute (429).
    pub auth_limited: AtomicU64,
    /// Requests the HTTP layer refused, in the order of `Refusal::ALL`.
    malformed: [AtomicU64; Refusal::ALL.len()],
}

impl Metrics {
    /// Counts an error answer caused by `part` (the database, the object store, …).
    pub fn backend_error(&self, part: &'static str) {
        let mut m = self
            .backend_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *m.entry(part).or_default() += 1;
    }

    /// Counts a request the HTTP layer refused before it reached a handler.
    pub fn malformed_request(&self, refusal: Refusal) {
        if let Some(i) = Refusal::ALL.iter().position(|&r| r == refusal) {
            self.malformed[i].fetch_add(1, Relaxed);
        }
    }

    /// Records a finished request.
    pub fn record(&self, route: &'static str, method: &str, status: u16, took: Duration) {
        // A fixed set of labels: clients choose the method string, and must not grow this map.
        let method = match method {
            "GET" => "GET",
            "HEAD" => "HEAD",
            "PUT" => "PUT",
            "DELETE" => "DELETE",
            _ => "other",
        };
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route, method, status)).or_default() += 1;
        }
        if let Ok(mut h) = self.latency.lock() {
            let h = h.entry(route).or_default();
            let secs = took.as_secs_f64();
            for (i, b) in BUCKETS.iter().enumerate() {
                if secs <= *b {
                    h.counts[i] += 1;
                }
            }
            h.count += 1;
            h.sum += secs;
        }
    }

    /// Total requests answered so far.
    pub fn requests_total(&self) -> u64 {
        self.requests.lock().map_or(0, |m| m.values().sum())
    }

    /// The Prometheus text exposition, with store totals when the database answered.
    pub fn render(
        &self, totals: Option<&Totals>, runs: &[LastRun], s3_requests: &[(String, u64)],
        spool: (u64, u64), cache: Option<CacheStats>, locks: LockIncidents,
    ) -> String {
        let mut out = String::new();
        family(
            &mut out,
            "s3dedup_requests_total",
            "counter",
            "HTTP requests answered.",
        );
        if let Ok(m) = self.requests.lock() {
            for ((route, method, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "s3dedup_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let help = "Time to answer, until headers.";
        family(
            &mut out,
            "s3dedup_request_duration_seconds",
            "histogram",
            help,
        );
        if let Ok(m) = self.latency.lock() {
            for (route, h) in m.iter() {
                for (i, b) in BUCKETS.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "s3dedup_request_duration_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {}",
                        h.counts[i]
                    );
                }
                let _ = writeln!(
                    out,
                    "s3dedup_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                    h.count
                );
                let _ = writeln!(
                    out,
                    "s3dedup_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                    h.sum
                );
                let _ = writeln!(
                    out,
                    "s3dedup_request_duration_seconds_count{{route=\"{route}\"}} {}",
                    h.count
                );
            }
        }
        let counters = [
            (
                "s3dedup_received_bytes_total",
                "Request body bytes received.",
                self.bytes_in.load(Relaxed),
            ),
            (
                "s3dedup_sent_bytes_total",
                "Response body bytes sent.",
                self.bytes_out.load(Relaxed),
            ),
            (
                "s3dedup_dedup_hits_total",
                "Uploads whose content was already stored.",
                self.dedup_hits.load(Relaxed),
            ),
            (
                "s3dedup_dedup_misses_total",
                "Uploads that stored new content.",
                self.dedup_misses.load(Relaxed),
            ),
            (
                "s3dedup_responses_cut_total",
                "Responses whose body failed partway (the store's stream broke, or the object \
                 changed): the client got a truncated body.",
                self.responses_cut.load(Relaxed),
            ),
            (
                "s3dedup_fallback_imports_total",
                "Files imported from the old server on a miss (live migration).",
                self.fallback_imports.load(Relaxed),
            ),
            (
                "s3dedup_lock_waits_total",
                "Blob, path and cleaner locks taken after waiting for another holder.",
                locks.waits.waited,
            ),
            (
                "s3dedup_lock_timeouts_total",
                "Lock waits that ended at their deadline without the lock (the request failed).",
                locks.waits.timeouts,
            ),
            (
                "s3dedup_locks_lost_total",
                "Blob and cleaner locks this process lost with their PostgreSQL session.",
                locks.locks_lost,
            ),
            (
                "s3dedup_commits_retried_total",
                "Uploads whose blob changed under a lost lock before their commit; each looked \
                 again and stored it again if needed.",
                locks.commits_retried,
            ),
            (
                "s3dedup_deletion_waits_total",
                "Uploads that waited for a recent deletion of their content to settle.",
                locks.settle_waits,
            ),
        ];
        for (name, help, v) in counters {
            scalar(&mut out, name, "counter", help, v);
        }
        scalar(
            &mut out,
            "s3dedup_lock_wait_seconds_total",
            "counter",
            "Time spent waiting for locks another holder had, by the waits and the timeouts \
             above.",
            format_args!("{:.6}", locks.waits.seconds),
        );
        family(
            &mut out,
            "s3dedup_auth_failures_total",
            "counter",
            "Requests refused with 401, by why: no credentials, a malformed Authorization \
             header, a wrong user or password.",
        );
        for (reason, n) in [
            ("missing", &self.auth_missing),
            ("malformed", &self.auth_malformed),
            ("wrong", &self.auth_wrong),
        ] {
            let _ = writeln!(
                out,
                "s3dedup_auth_failures_total{{reason=\"{reason}\"}} {}",
                n.load(Relaxed)
            );
        }
        scalar(
            &mut out,
            "s3dedup_auth_denied_total",
            "counter",
            "Authenticated requests refused with 403: their role or prefixes do not allow them.",
            self.auth_denied.load(Relaxed),
        );
        scalar(
            &mut out,
            "s3dedup_auth_limited_total",
            "counter",
            "Logins refused with 429 without checking: their address failed \
             auth.max_failures_per_minute times this minute.",
            self.auth_limited.load(Relaxed),
        );
        family(
            &mut out,
            "s3dedup_malformed_requests_total",
            "counter",
            "Requests refused before any handler, by status: 400 a request line or header that \
             is not valid HTTP/1.1, 414 a URI too long, 431 a head too large. Not in \
             s3dedup_requests_total.",
        );
        for (refusal, n) in Refusal::ALL.iter().zip(&self.malformed) {
            let _ = writeln!(
                out,
                "s3dedup_malformed_requests_total{{status=\"{}\"}} {}",
                refusal.status().as_u16(),
                n.load(Relaxed)
            );
        }
        scalar(
            &mut out,
            "s3dedup_requests_in_flight",
            "gauge",
            "Requests being served.",
            self.in_flight.load(Relaxed),
        );
        if let Some(c) = cache {
            let lines = [
                (
                    "s3dedup_cache_hits_total",
                    "counter",
                    "Objects read from the local cache.",
                    c.hits,
                ),
                (
                    "s3dedup_cache_misses_total",
                    "counter",
                    "Objects read from the store past the cache.",
                    c.misses,
                ),
                (
                    "s3dedup_cache_entries",
                    "gauge",
                    "Objects in the local cache.",
                    c.entries,
                ),
                (
                    "s3dedup_cache_bytes",
                    "gauge",
                    "Bytes in the local cache.",
                    c.bytes,
                ),
            ];
            for (name, kind, help, v) in lines {
                scalar(&mut out, name, kind, help, v);
            }
        }
        if let Some(Totals {
            stats: s,
            age,
            took,
        }) = totals
        {
            scalar(
                &mut out,
                "s3dedup_stats_age_seconds",
                "gauge",
                "Seconds since the totals below were counted (api.stats_refresh_secs).",
                age.as_secs(),
            );
            scalar(
                &mut out,
                "s3dedup_stats_count_seconds",
                "gauge",
                "How long counting the totals below took.",
                format_args!("{:.3}", took.as_secs_f64()),
            );
            let gauges = [
                ("s3dedup_files", "Files (paths) stored.", s.files),
                ("s3dedup_blobs", "Distinct contents stored.", s.blobs),
                (
                    "s3dedup_logical_bytes",
                    "Uncompressed bytes of distinct contents.",
                    s.logical_bytes,
                ),
                (
                    "s3dedup_stored_bytes",
                    "Stored (gzip) bytes of distinct contents, as objects or in metadata rows.",
                    s.stored_bytes,
                ),
                (
                    "s3dedup_referenced_bytes",
                    "Uncompressed bytes of all files as clients see them.",
                    s.referenced_bytes,
                ),
            ];
            for (name, help, v) in gauges {
                scalar(&mut out, name, "gauge", help, v);
            }
        }
        last_run_metrics(&mut out, runs);
        let (spool_files, spool_bytes) = spool;
        let help = "Uploads waiting in the spool on disk (all processes), and their bytes.";
        scalar(&mut out, "s3dedup_spool_files", "gauge", help, spool_files);
        scalar(&mut out, "s3dedup_spool_bytes", "gauge", help, spool_bytes);
        family(
            &mut out,
            "s3dedup_backend_errors_total",
            "counter",
            "Error answers by the part of the system that failed (database, object_store, \
             lock, spool, old_server).",
        );
        if let Ok(m) = self.backend_errors.lock() {
            for (part, n) in m.iter() {
                let _ = writeln!(out, "s3dedup_backend_errors_total{{part=\"{part}\"}} {n}");
            }
        }
        if !s3_requests.is_empty() {
            family(
                &mut out,
                "s3dedup_s3_requests_total",
                "counter",
                "Requests sent to S3 by operation, each attempt of a retried one included (what \
                 S3 bills).",
            );
            for (op, n) in s3_requests {
                let _ = writeln!(out, "s3dedup_s3_requests_total{{operation=\"{op}\"}} {n}");
            }
        }
        process_metrics(&mut out);
        out
    }
}

/// The tools' last runs, as they recorded them: when each finished, whether it was ok, how long.
fn last_run_metrics(out: &mut String, runs: &[LastRun]) {
    /// A metric family of the last runs: name, help, and its value for a run.
    type Family = (&'static str, &'static str, fn(&LastRun) -> String);
    let families: [Family; 3] = [
        (
            "s3dedup_last_run_timestamp_seconds",
            "When each tool's last run of each kind finished (Unix time).",
            |r| r.finished_at.to_string(),
        ),
        (
            "s3dedup_last_run_ok",
            "Whether that run found nothing wrong (1) or not (0).",
            |r| u8::from(r.ok).to_string(),
        ),
        (
            "s3dedup_last_run_duration_seconds",
            "How long that run took.",
            |r| r.seconds.to_string(),
        ),
    ];
    for (name, help, value) in families {
        family(out, name, "gauge", help);
        for r in runs {
            let _ = writeln!(
                out,
                "{name}{{tool=\"{}\",kind=\"{}\"}} {}",
                r.tool,
                r.kind,
                value(r)
            );
        }
    }
}

/// What this build is, and this process's own resources (the names Prometheus' client
/// libraries use, so the usual dashboards find them).
fn process_metrics(out: &mut String) {
    let help = "The running build: version and gzip inflater.";
    family(out, "s3dedup_build_info", "gauge", help);
    let _ = writeln!(
        out,
        "s3dedup_build_info{{version=\"{}\",inflater=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        s3dedup_common::gunzip::INFLATER
    );
    if let Some(kib) = s3dedup_common::memory::resident_kib() {
        let help = "Resident memory of this process in bytes.";
        scalar(
            out,
            "process_resident_memory_bytes",
            "gauge",
            help,
            kib * 1024,
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let help = "Open file descriptors (connections, spool and lock files).";
        scalar(out, "process_open_fds", "gauge", help, fds.count() as u64);
    }
    if let Some(secs) = cpu_seconds() {
        let help = "User and system CPU time of this process.";
        let value = format_args!("{secs:.2}");
        scalar(out, "process_cpu_seconds_total", "counter", help, value);
    }
}

/// User plus system CPU time, from `/proc/self/stat` (fields 14 and 15, in clock ticks).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; the fields after it follow its `)`.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_sec = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    Some(ticks as f64 / per_sec as f64)
}

/// The `# HELP` and `# TYPE` lines that open a metric family in the text exposition format.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One unlabelled counter or gauge in the text exposition format.
fn scalar(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use s3dedup_common::locks::LockWaits;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.record("files", "GET", 200, Duration::from_millis(3));
        m.record("files", "GET", 200, Duration::from_millis(300));
        m.record("files", "PUT", 400, Duration::from_millis(1));
        m.record("other", "BREW", 405, Duration::from_millis(1));
        m.record("other", "WHEN", 405, Duration::from_millis(1));
        m.dedup_hits.fetch_add(2, Relaxed);
        let runs = [LastRun {
            tool: "s3dedup-cleaner".into(),
            kind: "collect".into(),
            finished_at: 1234,
            ok: true,
            seconds: 0.5,
        }];
        let text = m.render(
            Some(&Totals {
                stats: Stats {
                    files: 5,
                    ..Stats::default()
                },
                age: Duration::from_secs(7),
                took: Duration::from_millis(250),
            }),
            &runs,
            &[("PutObject".to_owned(), 3)],
            (2, 4096),
            Some(CacheStats {
                hits: 3,
                ..CacheStats::default()
            }),
            LockIncidents {
                locks_lost: 4,
                waits: LockWaits {
                    waited: 6,
                    seconds: 1.5,
                    timeouts: 1,
                },
                ..LockIncidents::default()
            },
        );
        assert!(text.contains("s3dedup_cache_hits_total 3"), "{text}");
        assert!(text.contains("s3dedup_files 5"), "{text}");
        assert!(text.contains("s3dedup_stats_age_seconds 7"), "{text}");
        assert!(text.contains("s3dedup_stats_count_seconds 0.250"), "{text}");
        assert!(text.contains("s3dedup_spool_bytes 4096"), "{text}");
        let put = "s3dedup_s3_requests_total{operation=\"PutObject\"} 3";
        assert!(text.contains(put), "{text}");
        assert!(text.contains("s3dedup_build_info{version=\""), "{text}");
        let run = "{tool=\"s3dedup-cleaner\",kind=\"collect\"}";
        assert!(
            text.contains(&format!("s3dedup_last_run_timestamp_seconds{run} 1234")),
            "{text}"
        );
        assert!(
            text.contains(&format!("s3dedup_last_run_ok{run} 1")),
            "{text}"
        );
        for name in [
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_cpu_seconds_total",
        ] {
            assert!(text.contains(&format!("\n{name} ")), "{name} in {text}");
        }
        assert!(text.contains("s3dedup_locks_lost_total 4"), "{text}");
        assert!(text.contains("s3dedup_lock_waits_total 6"), "{text}");
        assert!(text.contains("s3dedup_lock_timeouts_total 1"), "{text}");
        assert!(
            text.contains("s3dedup_lock_wait_seconds_total 1.500000"),
            "{text}"
        );
        assert!(text.contains("s3dedup_commits_retried_total 0"), "{text}");
        assert!(
            text.contains(
                "s3dedup_requests_total{route=\"files\",method=\"GET\",status=\"200\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "s3dedup_request_duration_seconds_bucket{route=\"files\",le=\"0.005\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("s3dedup_request_duration_seconds_bucket{route=\"files\",le=\"0.25\"} 2")
        );
        assert!(
            text.contains("s3dedup_request_duration_seconds_bucket{route=\"files\",le=\"0.5\"} 3")
        );
        assert!(text.contains("s3dedup_dedup_hits_total 2"));
        assert!(text.contains("s3dedup_files 5"));
        assert!(
            text.contains(
                "s3dedup_requests_total{route=\"other\",method=\"other\",status=\"405\"} 2"
            )
        );
        assert_eq!(m.requests_total(), 5);
    }
}
