//! HTTP handling: maps Filetracker requests onto the file store, and its errors onto statuses.
//! This module routes and bounds requests; each kind of request has a module of its own.

mod delete;
mod error;
mod fallback;
mod gate;
mod get;
mod headers;
mod list;
mod put;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use s3dedup_common::auth::{Action, Principals};
use s3dedup_common::blob::IngestOptions;
use s3dedup_common::config::ApiConfig;
use s3dedup_common::filestore::FileStore;
use s3dedup_common::last_runs;
use s3dedup_common::meta::Stats;
use s3dedup_common::old_server::{OldServer, OldServerError};
use s3dedup_common::protocol::Route;
use s3dedup_common::store::ReadCache;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::{Metrics, Totals};
pub(crate) use error::ApiError;
pub use gate::{Gate, Peer};

/// Everything a request needs.
pub struct AppState {
    pub files: Arc<FileStore>,
    pub metrics: Metrics,
    pub cfg: ApiConfig,
    /// Who may do what (`[auth]`), replaced on reload.
    pub gate: Gate,
    /// Request slots, one pool for reads (GET, HEAD, listings) and one for writes (PUT,
    /// DELETE): uploads that trickle in cannot keep every read waiting.
    read_slots: Arc<Semaphore>,
    write_slots: Arc<Semaphore>,
    /// Slots handed out so far: whether anything happened between two looks.
    slots_granted: AtomicU64,
    /// Each source address's share of each pool (`api.max_requests_per_address`).
    per_address: std::sync::Mutex<HashMap<(IpAddr, Slot), Arc<Semaphore>>>,
    /// Live migration: the old server that misses are imported from.
    fallback: Option<OldServer>,
    /// Live migration: imports under way, so one path is downloaded once.
    imports: fallback::ImportsInFlight,
    /// The local read cache in front of S3, if any (for `/metrics`).
    pub cache: Option<Arc<ReadCache>>,
    /// Where the tools record their last runs (shown on `/metrics`).
    pub last_runs: Option<std::path::PathBuf>,
    /// Loads the configuration again on SIGHUP (for `[auth]`).
    pub reload: Option<s3dedup_common::program::Reload>,
    /// The store's totals as last counted in the background, and when.
    stats: std::sync::Mutex<Option<(Stats, Instant, Duration)>>,
    /// The last `/health` answer and when its check ended. `/health` is served beside the slot
    /// bound, so its checks (a query, and an S3 request) run one at a time and one younger than
    /// [`HEALTH_FRESH`] is answered again: a flood of them costs the backends nothing more.
    health: tokio::sync::Mutex<Option<(Instant, StatusCode, serde_json::Value)>>,
}

/// See `AppState::health`.
const HEALTH_FRESH: Duration = Duration::from_millis(250);

impl AppState {
    /// Whether a live migration's old server stands behind this one.
    pub(super) fn has_fallback(&self) -> bool {
        self.fallback.is_some()
    }

    pub fn new(
        files: Arc<FileStore>, cfg: ApiConfig, principals: Principals,
    ) -> Result<Self, OldServerError> {
        let timeout = Duration::from_secs(cfg.fallback_timeout_secs);
        let fallback = match &cfg.fallback_url {
            None => None,
            Some(url) => Some(OldServer::new(url.as_str(), timeout)?),
        };
        Ok(AppState {
            read_slots: Arc::new(Semaphore::new(cfg.max_concurrent_requests)),
            write_slots: Arc::new(Semaphore::new(cfg.max_concurrent_requests)),
            slots_granted: AtomicU64::new(0),
            per_address: Default::default(),
            files,
            metrics: Metrics::default(),
            cfg,
            gate: Gate::new(principals),
            fallback,
            imports: Default::default(),
            cache: None,
            last_runs: None,
            reload: None,
            stats: Default::default(),
            health: Default::default(),
        })
    }

    /// Counts the store's totals for `/metrics` (a scan of the metadata database, so this runs
    /// in the background, never in a scrape); returns how long the count took.
    pub async fn count_stats(&self) -> Duration {
        let started = Instant::now();
        match self.files.stats().await {
            Ok(stats) => {
                let mut last = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
                *last = Some((stats, Instant::now(), started.elapsed()));
            }
            // /health and the request errors say the database is down; the gauges go stale and
            // their age shows it.
            Err(e) => tracing::debug!(error = %e, "cannot count the store's totals for /metrics"),
        }
        started.elapsed()
    }

    /// How many file and list requests have started, if none is running now (a GET's body
    /// holds its slot until it is sent); `None` while one is.
    pub fn idle_after(&self) -> Option<u64> {
        let granted = self.slots_granted.load(Relaxed);
        let all = self.cfg.max_concurrent_requests;
        let idle = self.read_slots.available_permits() == all
            && self.write_slots.available_permits() == all;
        idle.then_some(granted)
    }
}

fn ingest_options(cfg: &ApiConfig) -> IngestOptions {
    IngestOptions {
        level: cfg.compression_level,
        max_logical_size: cfg.max_file_size,
        max_gzip_ratio: cfg.max_gzip_ratio,
    }
}

fn route_label(route: &Route) -> &'static str {
    match route {
        Route::Version => "version",
        Route::Status => "status",
        Route::Health => "health",
        Route::Metrics => "metrics",
        Route::File(_) => "files",
        Route::List(_) => "list",
    }
}

/// The single entry point: method check, routing, concurrency bound, metrics.
pub async fn dispatch(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let (label, response) = match route(&state, req).await {
        Ok((label, r)) => (label, r),
        Err((label, e)) => {
            // What failed, for which request, and why: the message the client gets too.
            let status = e.status.as_u16();
            if let Some(part) = e.failing {
                state.metrics.backend_error(part.label());
            }
            let error = &e.message;
            if e.status == StatusCode::SERVICE_UNAVAILABLE {
                tracing::warn!(%method, ?path, status, %error,
                    "request failed: {method} {path:?} answered {status}: {error}");
            } else if e.status.is_server_error() {
                tracing::error!(%method, ?path, status, %error,
                    "request failed: {method} {path:?} answered {status}: {error}");
            }
            (label, e.into_response())
        }
    };
    state.metrics.record(
        label,
        method.as_str(),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// Counts a file request in flight until dropped, however the request ends (a client that
/// hangs up drops it halfway).
struct InFlight<'a>(&'a Metrics);

impl<'a> InFlight<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.in_flight.fetch_add(1, Relaxed);
        InFlight(metrics)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

async fn route(
    state: &Arc<AppState>, req: Request,
) -> Result<(&'static str, Response), (&'static str, ApiError)> {
    let (parts, body) = req.into_parts();
    let method = parts.method.clone();
    if ![Method::GET, Method::HEAD, Method::PUT, Method::DELETE].contains(&method) {
        let e = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} not allowed"),
        );
        return Err(("other", e));
    }
    let r = Route::parse(parts.uri.path(), state.cfg.max_path_length)
        .map_err(|e| ("other", ApiError::from(e)))?;
    let label = route_label(&r);
    let read_only = method == Method::GET || method == Method::HEAD;
    let (action, target) = match &r {
        Route::File(p) if method == Method::PUT => (Action::Write, Some(p.as_str())),
        Route::File(p) if method == Method::DELETE => (Action::Delete, Some(p.as_str())),
        Route::File(p) => (Action::Read, Some(p.as_str())),
        Route::List(dir) => (Action::Read, dir.as_ref().map(|d| d.as_str())),
        _ => (Action::Status, None),
    };
    let peer = parts.extensions.get::<Peer>().and_then(|p| p.0);
    let authorization = parts.headers.get(header::AUTHORIZATION);
    (state.gate)
        .admit(&state.metrics, peer, authorization, action, target)
        .await
        .map_err(|e| (label, e))?;
    let not_allowed = || {
        (
            label,
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {method} not allowed here"),
            ),
        )
    };
    let result = match r {
        // The one answer an exhausted server still gives: whether it is healthy.
        Route::Health if read_only => Ok(health(state).await),
        Route::Version | Route::Status | Route::Metrics if read_only => {
            let slot = acquire_slot(state, Slot::Read, peer).await;
            let _permit = slot.map_err(|e| (label, e))?;
            Ok(match r {
                Route::Version => version(),
                Route::Status => (StatusCode::OK, "OK\n").into_response(),
                _ => metrics(state).await,
            })
        }
        Route::File(path) => {
            let slot = acquire_work_slot(state, Slot::of(&method), peer).await;
            let permit = slot.map_err(|e| (label, e))?;
            let _in_flight = InFlight::new(&state.metrics);
            match method {
                Method::GET => get::get_file(state, &path, &parts.headers, permit).await,
                Method::HEAD => get::head_file(state, &path, &parts.headers).await,
                Method::PUT => put::put_file(state, path, &parts, body).await,
                _ => delete::delete_file(state, &path, &parts).await,
            }
        }
        Route::List(dir) if read_only => {
            let slot = acquire_work_slot(state, Slot::Read, peer).await;
            let permit = slot.map_err(|e| (label, e))?;
            list::list(
                state,
                dir,
                parts.uri.query(),
                method == Method::HEAD,
                permit,
            )
            .await
        }
        _ => return Err(not_allowed()),
    };
    result.map(|r| (label, r)).map_err(|e| (label, e))
}

/// Which pool of request slots a request takes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Slot {
    Read,
    Write,
}

impl Slot {
    fn of(method: &Method) -> Slot {
        if method == Method::GET || method == Method::HEAD {
            Slot::Read
        } else {
            Slot::Write
        }
    }
}

/// A request slot, held until the answer is sent: one of its pool's, and one of its source
/// address's share of that pool.
pub(super) struct SlotPermit {
    _pool: OwnedSemaphorePermit,
    _address: Option<OwnedSemaphorePermit>,
}

/// Entries of the per-address map before the idle ones are dropped.
const ADDRESSES_KEPT: usize = 4096;

/// [`acquire_slot`] for a file or list request, counted as the activity after which an idle
/// server gives memory back (a monitoring probe of the status endpoints is not).
async fn acquire_work_slot(
    state: &AppState, kind: Slot, peer: Option<IpAddr>,
) -> Result<SlotPermit, ApiError> {
    let permit = acquire_slot(state, kind, peer).await?;
    state.slots_granted.fetch_add(1, Relaxed);
    Ok(permit)
}

async fn acquire_slot(
    state: &AppState, kind: Slot, peer: Option<IpAddr>,
) -> Result<SlotPermit, ApiError> {
    let wait = Duration::from_secs(state.cfg.queue_timeout_secs);
    let deadline = tokio::time::Instant::now() + wait;
    let (slots, what) = match kind {
        Slot::Read => (&state.read_slots, "reads"),
        Slot::Write => (&state.write_slots, "writes"),
    };
    let share = state.cfg.max_requests_per_address;
    let address = match peer.filter(|_| share > 0) {
        None => None,
        Some(ip) => {
            let semaphore = state.address_share(ip, kind, share);
            match tokio::time::timeout_at(deadline, semaphore.acquire_owned()).await {
                Ok(Ok(p)) => Some(p),
                _ => {
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "too many requests from {ip} at once: {share} {what} in progress \
                             from it (api.max_requests_per_address), waited {}s for one to end",
                            state.cfg.queue_timeout_secs
                        ),
                    ));
                }
            }
        }
    };
    match tokio::time::timeout_at(deadline, slots.clone().acquire_owned()).await {
        Ok(Ok(p)) => Ok(SlotPermit {
            _pool: p,
            _address: address,
        }),
        _ => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "server busy: {} {what} in progress, waited {}s for a slot",
                state.cfg.max_concurrent_requests, state.cfg.queue_timeout_secs
            ),
        )),
    }
}

impl AppState {
    /// The semaphore bounding `ip`'s requests in pool `kind`, made on first use.
    fn address_share(&self, ip: IpAddr, kind: Slot, share: usize) -> Arc<Semaphore> {
        let mut map = self
            .per_address
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if map.len() >= ADDRESSES_KEPT && !map.contains_key(&(ip, kind)) {
            // Idle entries: nobody holds or awaits a permit (the map's is the only handle).
            map.retain(|_, s| Arc::strong_count(s) > 1 || s.available_permits() < share);
        }
        map.entry((ip, kind))
            .or_insert_with(|| Arc::new(Semaphore::new(share)))
            .clone()
    }
}

fn version() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        "{\"protocol_versions\": [2]}",
    )
        .into_response()
}

async fn health(state: &AppState) -> Response {
    let mut last = state.health.lock().await;
    if let Some((at, status, body)) = &*last
        && at.elapsed() < HEALTH_FRESH
    {
        return (*status, axum::Json(body.clone())).into_response();
    }
    let (meta, store) = state.files.check().await;
    let ok = meta.is_ok() && store.is_ok();
    let show = |r: Result<(), String>| match r {
        Ok(()) => serde_json::Value::from("ok"),
        Err(e) => serde_json::Value::from(e),
    };
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "unavailable" },
        "metadata": show(meta.map_err(|e| e.to_string())),
        "store": show(store.map_err(|e| e.to_string())),
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    *last = Some((Instant::now(), status, body.clone()));
    (status, axum::Json(body)).into_response()
}

async fn metrics(state: &AppState) -> Response {
    let files = state.files.clone();
    let spool = tokio::task::spawn_blocking(move || files.spool_usage()).await;
    let stats = *state.stats.lock().unwrap_or_else(PoisonError::into_inner);
    let stats = stats.map(|(stats, at, took)| Totals {
        stats,
        age: at.elapsed(),
        took,
    });
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(
            stats.as_ref(),
            &(state.last_runs.as_deref())
                .map(last_runs::read)
                .unwrap_or_default(),
            &state.files.store_requests(),
            spool.unwrap_or_default(),
            state.cache.as_ref().map(|c| c.stats()),
            state.files.lock_incidents(),
        ),
    )
        .into_response()
}
