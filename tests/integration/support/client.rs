//! The Filetracker protocol as every suite speaks it: one client that knows the routes, the
//! version query and the headers, so a suite says what it asks ("PUT this at version 3",
//! "GET accepting identity") and a change to how the protocol is spoken is made once.

use std::time::Duration;

use reqwest::{RequestBuilder, Response, StatusCode};

use crate::*;

/// A Filetracker client for one server (`http://host:port`, no trailing slash).
#[derive(Clone)]
pub struct Ft {
    http: reqwest::Client,
    base: String,
}

/// A GET's answer read whole: status, the version it names and the content inflated.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub version: Option<i64>,
    pub content: Vec<u8>,
}

impl Ft {
    pub fn new(base: impl Into<String>) -> Self {
        Self::with_http(reqwest::Client::new(), base)
    }

    /// Clients for long concurrent loads over several instances, sharing one connection pool.
    pub fn for_load(urls: &[String]) -> Vec<Ft> {
        let http = reqwest::Client::builder()
            // Longer than any server-side bound (queue, lock and database waits), so a slow
            // server's error answer arrives instead of the client giving up first.
            .timeout(Duration::from_secs(300))
            // Well under the server's idle keep-alive limit (api.header_timeout_secs, 60 s):
            // reusing a connection the server is closing at that moment breaks the request
            // mid-body (the soak saw "Broken pipe" 0.0 s into a PUT), and no answer can come.
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .expect("HTTP client");
        urls.iter()
            .map(|u| Self::with_http(http.clone(), u))
            .collect()
    }

    /// The same routes over a client with its own timeouts or pool.
    pub fn with_http(http: reqwest::Client, base: impl Into<String>) -> Self {
        Ft {
            http,
            base: base.into(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn file(&self, path: &str) -> String {
        self.url(&format!("/files{path}"))
    }

    fn file_at(&self, path: &str, version: i64) -> String {
        self.url(&format!("/files{path}?last_modified={}", lm(version)))
    }

    // Requests not yet sent, for callers that add headers or count failures themselves.

    pub fn put_request(&self, path: &str, version: i64) -> RequestBuilder {
        self.http.put(self.file_at(path, version))
    }

    /// A PUT of `content` gzipped, with the digest and size hints the real client sends.
    pub fn put_gzip_request(&self, path: &str, version: i64, content: &[u8]) -> RequestBuilder {
        self.put_request(path, version)
            .header("Content-Encoding", "gzip")
            .header("SHA256-Checksum", sha256_hex(content))
            .header("Logical-Size", content.len().to_string())
            .body(gzip(content))
    }

    pub fn get_request(&self, path: &str) -> RequestBuilder {
        self.http.get(self.file(path))
    }

    pub fn head_request(&self, path: &str) -> RequestBuilder {
        self.http.head(self.file(path))
    }

    pub fn delete_request(&self, path: &str, version: i64) -> RequestBuilder {
        self.http.delete(self.file_at(path, version))
    }

    pub fn list_request(&self, dir: &str, cutoff: Option<i64>) -> RequestBuilder {
        let q = cutoff
            .map(|c| format!("?last_modified={}", lm(c)))
            .unwrap_or_default();
        self.http.get(self.url(&format!("/list{dir}{q}")))
    }

    /// Any other route (`/version`, `/metrics`, a malformed path).
    pub fn request(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        self.http.request(method, self.url(path))
    }

    // Sent; a request that cannot be sent fails the test, naming it.

    pub async fn put(&self, path: &str, version: i64, body: impl Into<reqwest::Body>) -> Response {
        send(self.put_request(path, version).body(body), "PUT", path).await
    }

    pub async fn put_gzip(&self, path: &str, version: i64, content: &[u8]) -> Response {
        send(self.put_gzip_request(path, version, content), "PUT", path).await
    }

    pub async fn get(&self, path: &str) -> Response {
        send(self.get_request(path), "GET", path).await
    }

    /// GET with the client's `Accept-Encoding`.
    pub async fn get_accepting(&self, path: &str, accept: &str) -> Response {
        let req = self.get_request(path).header("Accept-Encoding", accept);
        send(req, "GET", path).await
    }

    pub async fn head(&self, path: &str) -> Response {
        send(self.head_request(path), "HEAD", path).await
    }

    pub async fn delete(&self, path: &str, version: i64) -> Response {
        send(self.delete_request(path, version), "DELETE", path).await
    }

    /// The `/metrics` page.
    pub async fn metrics(&self) -> String {
        let r = send(
            self.request(reqwest::Method::GET, "/metrics"),
            "GET",
            "/metrics",
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK, "/metrics: {}", why(&r));
        r.text().await.expect("metrics body")
    }

    /// The listing's status and text.
    pub async fn list(&self, dir: &str, cutoff: Option<i64>) -> (StatusCode, String) {
        let r = send(self.list_request(dir, cutoff), "LIST", dir).await;
        (r.status(), r.text().await.expect("listing body"))
    }

    // Checked: the answer a test expects, or the test fails saying what came instead.

    /// PUTs `body` as is; fails unless the answer is 200.
    pub async fn put_ok(&self, path: &str, version: i64, body: impl Into<reqwest::Body>) {
        let r = self.put(path, version, body).await;
        assert_eq!(r.status(), StatusCode::OK, "PUT {path}: {}", why(&r));
    }

    /// GETs and reads the whole answer, inflating a gzip body.
    pub async fn fetch(&self, path: &str) -> Got {
        let r = self.get(path).await;
        let (status, version) = (r.status(), version_of(&r));
        let gzipped = r
            .headers()
            .get("content-encoding")
            .is_some_and(|v| v == "gzip");
        let body = r.bytes().await.expect("GET body");
        let content = if gzipped && status == StatusCode::OK {
            gunzip(&body)
        } else {
            body.to_vec()
        };
        Got {
            status,
            version,
            content,
        }
    }

    /// The content a client sees, or `None` on 404; fails on any other status.
    pub async fn content(&self, path: &str) -> Option<Vec<u8>> {
        let got = self.fetch(path).await;
        match got.status {
            StatusCode::NOT_FOUND => None,
            StatusCode::OK => Some(got.content),
            s => panic!("GET {path}: {s}: {}", String::from_utf8_lossy(&got.content)),
        }
    }

    /// GETs uncompressed (`Accept-Encoding: identity`): the status and the body.
    pub async fn get_identity(&self, path: &str) -> (StatusCode, Vec<u8>) {
        let r = self.get_accepting(path, "identity").await;
        let status = r.status();
        (status, r.bytes().await.expect("GET body").to_vec())
    }
}

async fn send(req: RequestBuilder, what: &str, path: &str) -> Response {
    req.send()
        .await
        .unwrap_or_else(|e| panic!("{what} {path}: {e}"))
}

/// The version an answer names (`Last-Modified`), as the client reads it.
pub fn version_of(r: &Response) -> Option<i64> {
    let v = r.headers().get("last-modified")?.to_str().ok()?;
    chrono::DateTime::parse_from_rfc2822(v)
        .ok()
        .map(|d| d.timestamp())
}

/// An answer's error message (`X-Exception`, empty if none).
pub fn why(r: &Response) -> String {
    r.headers()
        .get("x-exception")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}
