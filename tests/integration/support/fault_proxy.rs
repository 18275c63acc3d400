//! A loopback HTTP proxy in front of the S3 server that injects faults: 500 and 503 answers,
//! slow answers, connections reset before an answer, and request or response bodies cut off
//! halfway. The Host header passes through unchanged, so SigV4 signatures stay valid.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::{Rng, SeedableRng};

type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// One kind of injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Status500,
    Status503,
    /// Forwarded after a pause of up to [`FaultProxy::set_max_delay`].
    Slow,
    /// The connection is closed with no answer.
    Reset,
    /// The request body is forwarded halfway, then both connections drop.
    CutRequest,
    /// The answer's body stops halfway and the connection drops.
    CutResponse,
    /// The answer's headers go out, then the connection drops before any body byte.
    CutAfterHeaders,
}

pub const FAULTS: [Fault; 7] = [
    Fault::Status500,
    Fault::Status503,
    Fault::Slow,
    Fault::Reset,
    Fault::CutRequest,
    Fault::CutResponse,
    Fault::CutAfterHeaders,
];

/// Requests the proxy holds back, whatever the fault plan says.
#[derive(Debug, Clone)]
pub enum Hold {
    /// Every delete (`DELETE`, and `POST ?delete` of several objects) is held this long, then
    /// forwarded even if its client gave up meanwhile: a slow front that still delivers.
    Deletes(Duration),
    /// A `PUT` whose path contains this text is forwarded at once, and its answer held this
    /// long: an upload done in the store that its client does not know about yet.
    PutAnswer { key: String, delay: Duration },
}

/// Requests of `method` whose path contains `key` are answered `status` (an S3 error) and never
/// forwarded: an object the server will not give, as a bucket policy or a damaged disk does.
#[derive(Debug, Clone)]
pub struct Refuse {
    pub method: hyper::Method,
    pub key: String,
    pub status: u16,
}

struct Plan {
    hold: Mutex<Option<Hold>>,
    refuse: Mutex<Option<Refuse>>,
    /// Requests held so far, and those of them forwarded.
    held: AtomicU64,
    held_forwarded: AtomicU64,
    /// Chance of a fault per request, in thousandths.
    rate: AtomicU32,
    max_delay_ms: AtomicU64,
    injected: [AtomicU64; FAULTS.len()],
    requests: AtomicU64,
    /// Draw only this fault (index into [`FAULTS`]), if set.
    only: Mutex<Option<usize>>,
    rng: Mutex<rand::rngs::StdRng>,
}

impl Plan {
    fn pick(&self) -> Option<(Fault, Duration)> {
        self.requests.fetch_add(1, Relaxed);
        let mut rng = self.rng.lock().expect("rng lock");
        if rng.random_range(0..1000) >= self.rate.load(Relaxed) {
            return None;
        }
        let only = *self.only.lock().expect("only lock");
        let i = only.unwrap_or_else(|| rng.random_range(0..FAULTS.len()));
        let delay = rng.random_range(0..=self.max_delay_ms.load(Relaxed));
        self.injected[i].fetch_add(1, Relaxed);
        Some((FAULTS[i], Duration::from_millis(delay)))
    }
}

/// The running proxy; stops when dropped.
pub struct FaultProxy {
    pub addr: SocketAddr,
    plan: Arc<Plan>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Proxies to `upstream`, injecting nothing until [`FaultProxy::set_rate`]; faults are drawn
    /// from `seed` so a failing run can be replayed.
    pub async fn start(upstream: SocketAddr, seed: u64) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let plan = Arc::new(Plan {
            hold: Mutex::new(None),
            refuse: Mutex::new(None),
            held: AtomicU64::new(0),
            held_forwarded: AtomicU64::new(0),
            rate: AtomicU32::new(0),
            max_delay_ms: AtomicU64::new(1000),
            injected: Default::default(),
            requests: AtomicU64::new(0),
            only: Mutex::new(None),
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
        });
        let client: Client<_, Body> = Client::builder(TokioExecutor::new()).build_http();
        let p = plan.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (plan, client) = (p.clone(), client.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        handle(req, plan.clone(), client.clone(), upstream)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Ok(FaultProxy { addr, plan, task })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Chance of a fault per request, in thousandths (0: a faithful proxy).
    pub fn set_rate(&self, per_mille: u32) {
        self.plan.rate.store(per_mille, Relaxed);
    }

    /// Injects only `fault` from now on (`None`: any of [`FAULTS`]).
    pub fn set_only(&self, fault: Option<Fault>) {
        *self.plan.only.lock().expect("only lock") =
            fault.and_then(|f| FAULTS.iter().position(|&g| g == f));
    }

    pub fn set_max_delay(&self, d: Duration) {
        self.plan.max_delay_ms.store(d.as_millis() as u64, Relaxed);
    }

    /// Faults injected so far, by kind.
    pub fn injected(&self) -> Vec<(Fault, u64)> {
        FAULTS
            .iter()
            .zip(&self.plan.injected)
            .map(|(f, n)| (*f, n.load(Relaxed)))
            .collect()
    }

    pub fn total_injected(&self) -> u64 {
        self.plan.injected.iter().map(|n| n.load(Relaxed)).sum()
    }

    pub fn requests(&self) -> u64 {
        self.plan.requests.load(Relaxed)
    }

    /// Holds requests as `hold` says from now on (`None`: none).
    pub fn set_hold(&self, hold: Option<Hold>) {
        *self.plan.hold.lock().expect("hold lock") = hold;
    }

    /// Refuses requests as `refuse` says from now on (`None`: none).
    pub fn set_refuse(&self, refuse: Option<Refuse>) {
        *self.plan.refuse.lock().expect("refuse lock") = refuse;
    }

    /// Requests held so far.
    pub fn held(&self) -> u64 {
        self.plan.held.load(Relaxed)
    }

    /// Held requests forwarded (deletes) or answered (PUTs) so far.
    pub fn held_forwarded(&self) -> u64 {
        self.plan.held_forwarded.load(Relaxed)
    }

    /// Waits until `n` requests have been held, up to `timeout`.
    pub async fn wait_held(&self, n: u64, timeout: Duration) -> bool {
        let end = tokio::time::Instant::now() + timeout;
        while self.held() < n {
            if tokio::time::Instant::now() > end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

/// What [`Hold`] does to this request, if anything.
fn held_for(plan: &Plan, parts: &hyper::http::request::Parts) -> Option<(bool, Duration)> {
    let hold = plan.hold.lock().expect("hold lock").clone()?;
    let query = parts.uri.query().unwrap_or("");
    match hold {
        Hold::Deletes(d)
            if parts.method == hyper::Method::DELETE
                || parts.method == hyper::Method::POST
                    && query.split('&').any(|q| q == "delete" || q == "delete=") =>
        {
            Some((true, d))
        }
        Hold::PutAnswer { key, delay }
            if parts.method == hyper::Method::PUT && parts.uri.path().contains(&key) =>
        {
            Some((false, delay))
        }
        _ => None,
    }
}

fn s3_error(status: u16, code: &str) -> Response<Body> {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>\
         <Message>injected by the fault proxy</Message></Error>"
    );
    Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .body(Full::new(Bytes::from(xml)).map_err(|e| match e {}).boxed())
        .expect("valid response")
}

/// A body that passes `keep` bytes through, then fails.
fn cut<B>(body: B, keep: u64) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let mut passed = 0u64;
    let stream = body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { e.into() })?;
        if passed >= keep {
            return Err("body cut off by the fault proxy".into());
        }
        let n = (keep - passed).min(chunk.len() as u64) as usize;
        passed += n as u64;
        Ok(Frame::data(chunk.slice(..n)))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    body.map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { e.into() })
        .boxed()
}

fn content_length(headers: &hyper::HeaderMap) -> u64 {
    headers
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0)
}

async fn handle(
    req: Request<Incoming>, plan: Arc<Plan>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Body>, upstream: SocketAddr,
) -> Result<Response<Body>, Box<dyn std::error::Error + Send + Sync>> {
    let (mut parts, body) = req.into_parts();
    let refused = plan
        .refuse
        .lock()
        .expect("refuse lock")
        .clone()
        .filter(|r| parts.method == r.method && parts.uri.path().contains(&r.key));
    if let Some(r) = refused {
        return Ok(s3_error(r.status, "AccessDenied"));
    }
    let hold = held_for(&plan, &parts);
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = format!("http://{upstream}{target}").parse()?;
    if let Some((before, delay)) = hold {
        plan.held.fetch_add(1, Relaxed);
        let body = body.collect().await?.to_bytes();
        let request = Request::from_parts(parts, boxed(Full::new(body)));
        // Detached: the request reaches the server even if its client hangs up meanwhile.
        let forwarded = tokio::spawn(async move {
            if before {
                tokio::time::sleep(delay).await;
            }
            let answer = client.request(request).await;
            if !before {
                tokio::time::sleep(delay).await;
            }
            plan.held_forwarded.fetch_add(1, Relaxed);
            answer
        });
        return Ok(forwarded.await??.map(boxed));
    }
    let fault = plan.pick();
    let len = content_length(&parts.headers);
    let body = match fault {
        Some((Fault::Status500, _)) => return Ok(s3_error(500, "InternalError")),
        Some((Fault::Status503, _)) => return Ok(s3_error(503, "SlowDown")),
        Some((Fault::Reset, _)) => return Err("connection reset by the fault proxy".into()),
        Some((Fault::Slow, d)) => {
            tokio::time::sleep(d).await;
            boxed(body)
        }
        Some((Fault::CutRequest, _)) => cut(body, len / 2),
        _ => boxed(body),
    };
    let answer = client.request(Request::from_parts(parts, body)).await?;
    if let Some((Fault::CutResponse, _)) = fault {
        let keep = content_length(answer.headers()) / 2;
        let (parts, body) = answer.into_parts();
        return Ok(Response::from_parts(parts, cut(body, keep)));
    }
    if let Some((Fault::CutAfterHeaders, _)) = fault {
        // A pause first, so the headers are surely out before the connection drops.
        let fail = futures::stream::once(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err::<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>(
                "connection dropped after the headers by the fault proxy".into(),
            )
        });
        let (parts, _) = answer.into_parts();
        return Ok(Response::from_parts(
            parts,
            BodyExt::boxed(StreamBody::new(fail)),
        ));
    }
    Ok(answer.map(boxed))
}
