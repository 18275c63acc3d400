//! Admission: whether a request's credentials let it do what it asks (`[auth]`), with the
//! expensive part bounded: argon2 verifications run off the runtime, a few at a time, and an
//! address that keeps failing gets 429 for the rest of the minute instead of more of them.
//! The principals are swapped whole on reload; requests under way keep the set they started
//! with.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, StatusCode};
use s3dedup_common::auth::{Action, Credentials, Principals, Refusal};
use tokio::sync::Semaphore;

use super::error::ApiError;
use crate::metrics::Metrics;

/// argon2 verifications at once: each takes a core for tens of milliseconds.
const VERIFYING: usize = 2;
/// The window failed logins are counted in, per source address.
const WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at most; the oldest windows go first.
const ADDRESSES: usize = 10_000;

/// The source address of a request's connection (none on a Unix socket), put in each
/// request's extensions by the server.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub Option<IpAddr>);

pub struct Gate {
    principals: RwLock<Arc<Principals>>,
    verifying: Arc<Semaphore>,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Gate {
    pub fn new(principals: Principals) -> Self {
        Gate {
            principals: RwLock::new(Arc::new(principals)),
            verifying: Arc::new(Semaphore::new(VERIFYING)),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// The principals in force now.
    pub fn principals(&self) -> Arc<Principals> {
        self.principals
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Puts a newly loaded set in force (a reload).
    pub fn replace(&self, principals: Principals) {
        *self
            .principals
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(principals);
    }

    /// Lets the request through, or says why not (401, 403 or 429).
    pub(super) async fn admit(
        &self, metrics: &Metrics, peer: Option<IpAddr>, authorization: Option<&HeaderValue>,
        action: Action, path: Option<&str>,
    ) -> Result<(), ApiError> {
        let principals = self.principals();
        if !principals.enabled() || (action == Action::Status && principals.public_status()) {
            return Ok(());
        }
        let credentials = match Credentials::from_header(authorization.map(HeaderValue::as_bytes)) {
            Ok(c) => c,
            Err(refusal) => {
                let counter = match refusal {
                    Refusal::Missing => &metrics.auth_missing,
                    _ => &metrics.auth_malformed,
                };
                counter.fetch_add(1, Relaxed);
                return Err(refused(refusal));
            }
        };
        let principal = match principals.remembered(&credentials) {
            Some(p) => p,
            None => {
                if let Some((from, left)) = self.limited(peer, principals.max_failures_per_minute())
                {
                    metrics.auth_limited.fetch_add(1, Relaxed);
                    return Err(ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        format!(
                            "too many failed logins from {from} within a minute \
                             (auth.max_failures_per_minute = {}); retry in {} s",
                            principals.max_failures_per_minute(),
                            left.as_secs().max(1)
                        ),
                    ));
                }
                let user = credentials.user().to_owned();
                match self.verify(principals, credentials).await? {
                    Ok(p) => p,
                    Err(refusal) => {
                        metrics.auth_wrong.fetch_add(1, Relaxed);
                        self.failed(peer);
                        let from = peer.map_or_else(|| "a Unix socket".into(), |a| a.to_string());
                        tracing::warn!(user, %from, "login failed: user {user:?} from {from}: {refusal}");
                        return Err(refused(refusal));
                    }
                }
            }
        };
        principal.may(action, path).map_err(|refusal| {
            metrics.auth_denied.fetch_add(1, Relaxed);
            refused(refusal)
        })
    }

    async fn verify(
        &self, principals: Arc<Principals>, credentials: Credentials,
    ) -> Result<Result<Arc<s3dedup_common::auth::Principal>, Refusal>, ApiError> {
        let unavailable = |what: &str| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot check the credentials: {what}"),
            )
        };
        let _permit = self
            .verifying
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| unavailable("shutting down"))?;
        tokio::task::spawn_blocking(move || principals.verify(&credentials))
            .await
            .map_err(|e| unavailable(&e.to_string()))
    }

    /// `peer`, and how long it must still wait, when it failed too often this minute (a Unix
    /// socket's peers have no address and no limit).
    fn limited(&self, peer: Option<IpAddr>, max: u32) -> Option<(IpAddr, Duration)> {
        let peer = peer?;
        let failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let (since, n) = failures.get(&peer)?;
        let left = WINDOW.checked_sub(since.elapsed())?;
        (*n >= max).then_some((peer, left))
    }

    fn failed(&self, peer: Option<IpAddr>) {
        let Some(peer) = peer else { return };
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if failures.len() >= ADDRESSES && !failures.contains_key(&peer) {
            failures.retain(|_, (since, _)| since.elapsed() < WINDOW);
            if failures.len() >= ADDRESSES
                && let Some(oldest) = failures
                    .iter()
                    .min_by_key(|(_, (s, _))| *s)
                    .map(|(a, _)| *a)
            {
                failures.remove(&oldest);
            }
        }
        let entry = failures.entry(peer).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

fn refused(refusal: Refusal) -> ApiError {
    let status = match refusal {
        Refusal::Forbidden { .. } => StatusCode::FORBIDDEN,
        _ => StatusCode::UNAUTHORIZED,
    };
    ApiError::new(status, refusal.to_string())
}
