//! A workload that remembers what the server promised. Every PUT writes a path of its own, so
//! each answer pins down what the path must hold: a 200 means "stored" until a DELETE's 200, a
//! 5xx or a dropped request means "either". Reads are checked against that as they happen
//! (never a wrong body, never a false 404, never a resurrected file, every 5xx explains itself)
//! and once more at the end, when nothing may be lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use reqwest::StatusCode;

use crate::{Ft, sha256_hex};

#[derive(Clone)]
enum State {
    Stored(Want),
    /// The PUT or DELETE failed: the path holds this content or nothing.
    Either(Want),
    Deleted,
}

/// A content by its digest and size: the ledger keeps no bodies (a soak writes gigabytes).
#[derive(Clone)]
struct Want {
    sha256: String,
    len: usize,
}

impl Want {
    fn of(content: &[u8]) -> Self {
        Want {
            sha256: sha256_hex(content),
            len: content.len(),
        }
    }

    fn matches(&self, body: &[u8]) -> bool {
        body.len() == self.len && sha256_hex(body) == self.sha256
    }
}

/// Counts of what the workload did and saw.
#[derive(Debug, Default)]
pub struct Tally {
    pub ops: AtomicU64,
    pub ok: AtomicU64,
    /// 5xx answers carrying a message.
    pub server_errors: AtomicU64,
    /// Requests the server dropped, and bodies cut off after the headers.
    pub dropped: AtomicU64,
    pub bytes: AtomicU64,
}

/// A GET's content, inflated when the server sent it gzipped.
pub async fn body_of(r: reqwest::Response) -> reqwest::Result<Vec<u8>> {
    let gz = r
        .headers()
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes() == b"gzip");
    let body = r.bytes().await?;
    Ok(if gz {
        crate::gunzip(&body)
    } else {
        body.to_vec()
    })
}

/// What one run of clients must never see.
pub struct Ledger {
    files: Mutex<HashMap<String, State>>,
    violations: Mutex<Vec<String>>,
    pub tally: Tally,
    /// Dropped connections are violations unless the test kills servers on purpose.
    pub drops_allowed: AtomicBool,
    /// Content sizes drawn from, e.g. `[1 << 10, 64 << 10, 6 << 20]`.
    sizes: Vec<usize>,
}

/// When a client stops.
#[derive(Clone, Copy)]
pub enum Until {
    Ops(usize),
    Time(Instant),
}

impl Ledger {
    pub fn new(sizes: &[usize]) -> Arc<Self> {
        Arc::new(Ledger {
            files: Mutex::default(),
            violations: Mutex::default(),
            tally: Tally::default(),
            drops_allowed: AtomicBool::new(false),
            sizes: sizes.to_vec(),
        })
    }

    fn violation(&self, what: String) {
        eprintln!("VIOLATION: {what}");
        self.violations.lock().expect("lock").push(what);
    }

    pub fn violations(&self) -> Vec<String> {
        self.violations.lock().expect("lock").clone()
    }

    fn set(&self, path: &str, s: State) {
        self.files.lock().expect("lock").insert(path.to_owned(), s);
    }

    fn get(&self, path: &str) -> Option<State> {
        self.files.lock().expect("lock").get(path).cloned()
    }

    /// A 5xx must say what failed; anything else unexpected is a violation.
    fn failed(&self, what: &str, r: &reqwest::Response) -> bool {
        if r.status().is_server_error() {
            let said = r
                .headers()
                .get("x-exception")
                .is_some_and(|v| !v.as_bytes().is_empty());
            if !said {
                self.violation(format!("{what}: {} without a message", r.status()));
            }
            self.tally.server_errors.fetch_add(1, Relaxed);
            return true;
        }
        false
    }

    /// Records an answer other than success: a 5xx (which must explain itself), any other
    /// status (a violation), or no answer at all.
    fn not_ok(&self, what: &str, r: reqwest::Result<reqwest::Response>) {
        match r {
            Ok(r) => {
                if !self.failed(what, &r) {
                    self.violation(format!("{what}: unexpected {}", r.status()));
                }
            }
            Err(e) => self.dropped(what, &e),
        }
    }

    fn dropped(&self, what: &str, e: &reqwest::Error) {
        self.tally.dropped.fetch_add(1, Relaxed);
        if !self.drops_allowed.load(Relaxed) {
            // reqwest's message hides the cause (reset, early close, timeout): name it.
            let mut cause = String::new();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                cause += &format!(": {s}");
                source = s.source();
            }
            let timeout = if e.is_timeout() {
                " (client timeout)"
            } else {
                ""
            };
            self.violation(format!(
                "{what}: request failed without an answer{timeout}: {e}{cause}"
            ));
        }
    }

    /// Checks one GET answer of `path` against what it may hold.
    async fn check_get(&self, path: &str, state: &State, r: reqwest::Result<reqwest::Response>) {
        let what = format!("GET {path}");
        let r = match r {
            Ok(r) => r,
            Err(e) => return self.dropped(&what, &e),
        };
        match (r.status(), state) {
            (StatusCode::OK, State::Deleted) => {
                self.violation(format!("{what}: a deleted file came back"))
            }
            (StatusCode::OK, State::Stored(want) | State::Either(want)) => match body_of(r).await {
                // A body cut off after its headers: the client sees a short read, not success.
                Err(_) => {
                    self.tally.dropped.fetch_add(1, Relaxed);
                }
                Ok(body) if !want.matches(&body) => self.violation(format!(
                    "{what}: wrong body ({} bytes, sha256 {}; wanted {} bytes)",
                    body.len(),
                    sha256_hex(&body),
                    want.len
                )),
                Ok(body) => {
                    self.tally.ok.fetch_add(1, Relaxed);
                    self.tally.bytes.fetch_add(body.len() as u64, Relaxed);
                }
            },
            (StatusCode::NOT_FOUND, State::Stored(_)) => {
                self.violation(format!("{what}: false 404 for a stored file"))
            }
            (StatusCode::NOT_FOUND, _) => {
                self.tally.ok.fetch_add(1, Relaxed);
            }
            (s, _) if s.is_server_error() => {
                self.failed(&what, &r);
            }
            (s, _) => self.violation(format!("{what}: unexpected {s}")),
        }
    }

    /// One client: PUTs new paths under `/<tag>/<client>/`, reads, deletes and lists them.
    pub async fn client(
        self: Arc<Self>, urls: Vec<String>, tag: String, id: usize, until: Until, seed: u64,
    ) {
        let servers = Ft::for_load(&urls);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ id as u64);
        let mut mine: Vec<String> = Vec::new();
        for n in 0.. {
            match until {
                Until::Ops(k) if n >= k => break,
                Until::Time(t) if Instant::now() >= t => break,
                _ => {}
            }
            self.tally.ops.fetch_add(1, Relaxed);
            let ft = &servers[rng.random_range(0..servers.len())];
            let kind = rng.random_range(0..100);
            if kind < 40 || mine.is_empty() {
                let path = format!("/{tag}/{id}/{n}");
                let size = self.sizes[rng.random_range(0..self.sizes.len())];
                let mut content = vec![0u8; size];
                rng.fill(&mut content[..]);
                // Half compressible text, so gzip has work to do.
                if rng.random_bool(0.5) {
                    for b in content.iter_mut() {
                        *b = b'a' + (*b % 4);
                    }
                }
                let want = Want::of(&content);
                let req = if rng.random_bool(0.5) {
                    ft.put_gzip_request(&path, 1, &content)
                } else {
                    ft.put_request(&path, 1).body(content)
                };
                let started = Instant::now();
                let r = req.send().await;
                let what = format!("PUT {path} ({:.1} s)", started.elapsed().as_secs_f64());
                match r {
                    Ok(r) if r.status() == StatusCode::OK => {
                        self.tally.ok.fetch_add(1, Relaxed);
                        self.tally.bytes.fetch_add(want.len as u64, Relaxed);
                        self.set(&path, State::Stored(want));
                    }
                    other => {
                        self.not_ok(&what, other);
                        self.set(&path, State::Either(want));
                    }
                }
                mine.push(path);
            } else if kind < 80 {
                let path = &mine[rng.random_range(0..mine.len())];
                let state = self.get(path).expect("own path");
                let mut req = ft.get_request(path);
                if rng.random_bool(0.5) {
                    req = req.header("Accept-Encoding", "identity");
                }
                let r = req.send().await;
                self.check_get(path, &state, r).await;
            } else if kind < 92 {
                let i = rng.random_range(0..mine.len());
                let path = mine.swap_remove(i);
                let (want, was_stored) = match self.get(&path) {
                    Some(State::Stored(c)) => (c, true),
                    Some(State::Either(c)) => (c, false),
                    _ => continue,
                };
                let started = Instant::now();
                let r = ft.delete_request(&path, 2).send().await;
                let what = format!("DELETE {path} ({:.1} s)", started.elapsed().as_secs_f64());
                match r {
                    // After a failed PUT the path may never have existed.
                    Ok(r)
                        if r.status() == StatusCode::OK
                            || (r.status() == StatusCode::NOT_FOUND && !was_stored) =>
                    {
                        self.tally.ok.fetch_add(1, Relaxed);
                        self.set(&path, State::Deleted);
                    }
                    other => {
                        self.not_ok(&what, other);
                        self.set(&path, State::Either(want));
                    }
                }
                // Keep reading it: it must stay gone (or, after a failure, be right).
                mine.push(path);
            } else {
                let dir = format!("/{tag}/{id}");
                let what = format!("LIST {dir}");
                match ft.list_request(&dir, None).send().await {
                    Ok(r) if r.status() == StatusCode::OK => {
                        let Ok(text) = r.text().await else {
                            self.tally.dropped.fetch_add(1, Relaxed);
                            continue;
                        };
                        let listed: std::collections::HashSet<&str> = text.lines().collect();
                        for p in &mine {
                            let rel = &p[dir.len() + 1..];
                            match self.get(p) {
                                Some(State::Stored(_)) if !listed.contains(rel) => {
                                    self.violation(format!("{what}: stored {p} not listed"))
                                }
                                Some(State::Deleted) if listed.contains(rel) => {
                                    self.violation(format!("{what}: deleted {p} listed"))
                                }
                                _ => {}
                            }
                        }
                        self.tally.ok.fetch_add(1, Relaxed);
                    }
                    other => self.not_ok(&what, other),
                }
            }
        }
    }

    /// Runs `clients` clients to completion.
    pub async fn run(
        self: &Arc<Self>, urls: &[String], tag: &str, clients: usize, until: Until, seed: u64,
    ) {
        let tasks: Vec<_> = (0..clients)
            .map(|id| {
                tokio::spawn(
                    self.clone()
                        .client(urls.to_vec(), tag.to_owned(), id, until, seed),
                )
            })
            .collect();
        for t in tasks {
            t.await.expect("client task");
        }
    }

    /// [`Ledger::run`] in a task of its own, for a test that breaks things meanwhile.
    pub fn spawn(
        self: &Arc<Self>, urls: Vec<String>, tag: &'static str, clients: usize, until: Until,
        seed: u64,
    ) -> tokio::task::JoinHandle<()> {
        let ledger = self.clone();
        tokio::spawn(async move { ledger.run(&urls, tag, clients, until, seed).await })
    }

    /// Reads every path once more through `url` with nothing failing; returns (files checked,
    /// files lost). A lost file is a stored one that is missing or wrong.
    pub async fn check_all(&self, url: &str) -> (usize, Vec<String>) {
        let ft = Ft::new(url);
        let files: Vec<(String, State)> = self
            .files
            .lock()
            .expect("lock")
            .iter()
            .map(|(p, s)| (p.clone(), s.clone()))
            .collect();
        let mut lost = Vec::new();
        for (path, state) in &files {
            let r = ft
                .get_request(path)
                .send()
                .await
                .expect("the server answers once the faults stop");
            let status = r.status();
            let body = body_of(r).await.expect("whole body");
            match (status, state) {
                (StatusCode::OK, State::Stored(want) | State::Either(want))
                    if want.matches(&body) => {}
                (StatusCode::NOT_FOUND, State::Deleted | State::Either(_)) => {}
                (s, State::Stored(_)) => lost.push(format!("{path}: {s}, {} bytes", body.len())),
                (s, _) => self.violation(format!("final GET {path}: {s} ({} bytes)", body.len())),
            }
        }
        (files.len(), lost)
    }

    /// One line for the suite's log and the closing note.
    pub fn summary(&self) -> String {
        let t = &self.tally;
        format!(
            "{} operations: {} ok, {} 5xx with a message, {} dropped, {} MiB moved",
            t.ops.load(Relaxed),
            t.ok.load(Relaxed),
            t.server_errors.load(Relaxed),
            t.dropped.load(Relaxed),
            t.bytes.load(Relaxed) >> 20
        )
    }
}
