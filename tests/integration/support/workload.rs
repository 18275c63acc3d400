//! A concurrent mixed workload over a few paths and contents, and the check that nothing it
//! saw acknowledged was lost.

use crate::*;

/// A concurrent mixed workload (PUT raw and gzip, GET, DELETE) over a few paths and contents,
/// with versions that climb, collide and lag, spread over several API instances.
pub struct Workload {
    pub clients: usize,
    pub ops: usize,
    pub paths: usize,
    pub contents: Vec<Vec<u8>>,
    pub prefix: String,
}

/// What the workload saw acknowledged.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Per path: (version, content index) of PUTs answered with their own version (stored).
    pub stored: std::collections::HashMap<usize, Vec<(i64, usize)>>,
    /// Per path: versions of DELETEs that deleted (200 without a newer version).
    pub deleted: std::collections::HashMap<usize, Vec<i64>>,
    /// 5xx answers and failed requests.
    pub server_errors: Vec<String>,
    pub ops: usize,
}

/// An answer's status and error message (`X-Exception`, empty if none).
fn answer(r: &reqwest::Response) -> (reqwest::StatusCode, String) {
    (r.status(), why(r))
}

impl Workload {
    pub fn new(tag: &str, clients: usize, ops: usize, paths: usize) -> Self {
        Workload {
            clients,
            ops,
            paths,
            contents: (0..6)
                .map(|i| unique_content(&format!("{tag}{i}"), 2_000 + i * 5_000))
                .collect(),
            prefix: format!("/{tag}"),
        }
    }

    /// Draws from `n` contents instead of six: with few references each, contents keep
    /// becoming garbage and coming back, and a cleaner at grace 0 deletes them all the time.
    /// Half are small (kept in their rows), half objects.
    pub fn churning(mut self, n: usize) -> Self {
        self.contents = (0..n)
            .map(|i| {
                let small = 500 + (i * 37) % 3000;
                let len = if i % 2 == 0 {
                    small
                } else {
                    OBJECT_SIZED + small
                };
                unique_content(&format!("{}-churn{i}", self.prefix), len)
            })
            .collect();
        self
    }

    fn digests(&self) -> std::collections::HashMap<String, usize> {
        self.contents
            .iter()
            .enumerate()
            .map(|(i, c)| (sha256_hex(c), i))
            .collect()
    }

    /// Runs every client to completion; any 5xx or failed request is recorded.
    pub async fn run(&self, urls: &[String]) -> Outcome {
        use rand::{Rng, SeedableRng};
        let record = std::sync::Arc::new(std::sync::Mutex::new(Outcome::default()));
        let contents = std::sync::Arc::new(self.contents.clone());
        let digests = std::sync::Arc::new(self.digests());
        let servers = Ft::for_load(urls);
        let mut tasks = Vec::new();
        for client in 0..self.clients {
            let (contents, digests, record, servers) = (
                contents.clone(),
                digests.clone(),
                record.clone(),
                servers.clone(),
            );
            let (ops, paths, prefix) = (self.ops, self.paths, self.prefix.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
                for op in 0..ops {
                    let ft = &servers[(client + op) % servers.len()];
                    let p = rng.random_range(0..paths);
                    // Versions climb as the run goes on; neighbours collide (equal) or lag.
                    let v = op as i64 / 3 + rng.random_range(0..3);
                    let kind = rng.random_range(0..100);
                    let path = format!("{prefix}/{p}");
                    let result = if kind < 60 {
                        let c = rng.random_range(0..contents.len());
                        let req = if rng.random_bool(0.5) {
                            ft.put_gzip_request(&path, v, &contents[c])
                        } else {
                            ft.put_request(&path, v).body(contents[c].clone())
                        };
                        req.send().await.map(|r| {
                            if r.status() == reqwest::StatusCode::OK && version_of(&r) == Some(v) {
                                record
                                    .lock()
                                    .unwrap()
                                    .stored
                                    .entry(p)
                                    .or_default()
                                    .push((v, c));
                            }
                            answer(&r)
                        })
                    } else if kind < 85 {
                        let result = match ft.get_request(&path).send().await {
                            Ok(r) if r.status() == reqwest::StatusCode::OK => {
                                let body = gunzip(&r.bytes().await.unwrap());
                                assert!(
                                    digests.contains_key(&sha256_hex(&body)),
                                    "GET returned unknown content"
                                );
                                Ok((reqwest::StatusCode::OK, String::new()))
                            }
                            other => other.map(|r| answer(&r)),
                        };
                        result.map(|(s, why)| (s, format!("GET: {why}")))
                    } else {
                        ft.delete_request(&path, v).send().await.map(|r| {
                            if r.status() == reqwest::StatusCode::OK && version_of(&r).is_none() {
                                record.lock().unwrap().deleted.entry(p).or_default().push(v);
                            }
                            answer(&r)
                        })
                    };
                    let mut rec = record.lock().unwrap();
                    rec.ops += 1;
                    match result {
                        Ok((s, why)) if s.is_server_error() => {
                            rec.server_errors.push(format!("{path} v{v}: {s}: {why}"))
                        }
                        Ok(_) => {}
                        Err(e) => rec.server_errors.push(format!("{path} v{v}: {e:?}")),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("client task");
        }
        let outcome = std::mem::take(&mut *record.lock().unwrap());
        let puts: usize = outcome.stored.values().map(Vec::len).sum();
        let dels: usize = outcome.deleted.values().map(Vec::len).sum();
        eprintln!(
            "{} operations: {puts} stored PUTs, {dels} deleting DELETEs, {} failures",
            outcome.ops,
            outcome.server_errors.len()
        );
        outcome
    }

    /// No request failed, and each path (read through every instance) holds an acknowledged
    /// (version, content); nothing acknowledged at a higher version was lost unless a DELETE
    /// at or above that version was acknowledged.
    pub async fn check_final(&self, outcome: &Outcome, urls: &[String]) {
        assert!(
            outcome.server_errors.is_empty(),
            "5xx or failures: {:#?}",
            outcome.server_errors
        );
        assert_eq!(outcome.ops, self.clients * self.ops);
        let digests = self.digests();
        let servers: Vec<Ft> = urls.iter().map(Ft::new).collect();
        for p in 0..self.paths {
            let stored = outcome.stored.get(&p).cloned().unwrap_or_default();
            let max_put = stored.iter().map(|(v, _)| *v).max();
            let max_del = outcome
                .deleted
                .get(&p)
                .and_then(|d| d.iter().copied().max());
            let deleted_above_max = matches!((max_put, max_del), (Some(m), Some(d)) if d >= m);
            for ft in &servers {
                let got = ft.fetch(&format!("{}/{p}", self.prefix)).await;
                if got.status == reqwest::StatusCode::NOT_FOUND {
                    assert!(
                        max_put.is_none() || deleted_above_max,
                        "path {p} lost version {max_put:?}"
                    );
                    continue;
                }
                assert_eq!(got.status, reqwest::StatusCode::OK, "path {p}");
                let v = got.version.expect("Last-Modified");
                let c = digests[&sha256_hex(&got.content)];
                assert!(
                    stored.contains(&(v, c)),
                    "path {p}: ({v}, content {c}) was never acknowledged"
                );
                assert!(
                    Some(v) == max_put || deleted_above_max,
                    "path {p}: {v} but {max_put:?} was acknowledged"
                );
            }
        }
    }
}
