//! The listening sockets and the daemon's lifecycle: socket activation or bind (TCP or Unix),
//! TCP_NODELAY, per-connection timeouts, readiness and watchdog notifications, and a bounded
//! drain on SIGTERM that still answers requests already on their way.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use s3dedup_common::config::ListenAddr;
use s3dedup_common::{memory, systemd};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

use crate::app::{AppState, Peer, dispatch};
use crate::hyper_errors::{Explained, Limits, Requests};
use crate::stall::StallGuard;
use crate::tls::Tls;

/// How often `STATUS=` is refreshed for `systemctl status`.
const STATUS_EVERY: Duration = Duration::from_secs(5);
/// Pause after a failed accept (out of file descriptors): retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long a TLS handshake may take when `api.header_timeout_secs` is 0.
const HANDSHAKE: Duration = Duration::from_secs(30);
/// How long a connection with no request under way is kept open once shutdown begins. A
/// client that connected just before the signal, or reuses a kept-alive connection, may have
/// its request on the wire; closing at once would drop it unanswered.
const IDLE_GRACE: Duration = Duration::from_millis(500);

/// A listening socket: one systemd passed, or the one bound from `api.listen`.
enum Listener {
    Tcp(TcpListener),
    /// The path is removed on exit when we created it (systemd owns the ones it passes).
    Unix(UnixListener, Option<PathBuf>),
}

impl Listener {
    fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "a TCP socket".into(), |a| a.to_string()),
            Listener::Unix(l, _) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "a Unix socket".into()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, Some(path)) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn adopt(fd: OwnedFd) -> anyhow::Result<Listener> {
    // std checks the address family: a TCP descriptor is not taken for a Unix one.
    let unix = std::os::unix::net::UnixListener::from(fd);
    if unix.local_addr().is_ok() {
        unix.set_nonblocking(true)
            .context("making the systemd socket non-blocking")?;
        let l = UnixListener::from_std(unix).context("adopting the systemd Unix socket")?;
        return Ok(Listener::Unix(l, None));
    }
    let tcp = std::net::TcpListener::from(OwnedFd::from(unix));
    tcp.set_nonblocking(true)
        .context("making the systemd socket non-blocking")?;
    Ok(Listener::Tcp(
        TcpListener::from_std(tcp).context("adopting the systemd socket")?,
    ))
}

fn bind_unix(path: &Path) -> anyhow::Result<Listener> {
    use std::os::unix::fs::FileTypeExt;
    // A socket file left by a killed predecessor would make bind fail; anything else is kept.
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("cannot listen on unix:{} (api.listen)", path.display()))?;
    Ok(Listener::Unix(l, Some(path.to_owned())))
}

/// Every socket systemd passed, or the one `api.listen` names.
async fn listeners(state: &AppState) -> anyhow::Result<Vec<Listener>> {
    let inherited = systemd::listen_sockets()?;
    if !inherited.is_empty() {
        return inherited.into_iter().map(adopt).collect();
    }
    Ok(vec![match &state.cfg.listen {
        ListenAddr::Tcp(addr) => Listener::Tcp(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (api.listen)"))?,
        ),
        ListenAddr::Unix(path) => bind_unix(path)?,
    }])
}

/// The most hyper reads from a connection at once. Each chunk of a request body shares the
/// buffer it was read into, and a buffer is freed only once every chunk in it is: at hyper's
/// default (~400 KiB) the chunks queued for the ingest of sixteen 1 GiB uploads held 46 MiB.
/// Request heads are far smaller. hyper applies the same bound to a response's queued writes,
/// which costs identity (inflated) downloads: sixteen 1 GiB at once from the local store went
/// at 1,115-1,353 MiB/s, 1,754-1,994 at the default, whose uploads peaked at 86-92 MiB, not 37.
/// Copying each body chunk out instead kept both speeds but peaked at 57 MiB (70 on S3, not 50).
const READ_BUFFER: usize = 64 * 1024;
/// The most header fields a request may have (hyper's default, named here for the 431 message).
const MAX_HEADERS: usize = 100;

fn secs(n: u64) -> Option<Duration> {
    (n > 0).then(|| Duration::from_secs(n))
}

/// Serves one connection until it closes or, once `stop` turns true, until its last answer.
fn serve<IO>(io: IO, peer: Peer, app: &Router, state: &Arc<AppState>, stop: &watch::Receiver<bool>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cfg = &state.cfg;
    let requests = Requests::default();
    let limits = Limits {
        head_bytes: READ_BUFFER,
        fields: MAX_HEADERS,
    };
    let io = StallGuard::new(io, secs(cfg.send_timeout_secs));
    let counted = state.clone();
    let on_refusal = Box::new(move |status| counted.metrics.malformed_request(status));
    let io = TokioIo::new(Explained::new(io, requests.clone(), limits, on_refusal));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(secs(cfg.header_timeout_secs))
        .max_buf_size(READ_BUFFER)
        .max_headers(MAX_HEADERS);
    let app = app.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        requests.received(req.method());
        req.extensions_mut().insert(peer);
        app.clone().oneshot(req)
    });
    let conn = builder.serve_connection(io, service);
    // The receiver lives as long as the connection: the drain waits for all of them to go.
    let mut stop = stop.clone();
    tokio::spawn(async move {
        let mut conn = std::pin::pin!(conn);
        let stopping = async {
            // A dropped sender means the daemon is going too.
            let _ = stop.wait_for(|stopping| *stopping).await;
        };
        let ended = tokio::select! {
            ended = conn.as_mut() => ended,
            () = stopping => {
                // hyper's own graceful shutdown closes a connection between requests at once,
                // even one whose request is in its buffer. Answers from now on say
                // `Connection: close`, so a request that arrives within the grace ends it.
                match tokio::time::timeout(IDLE_GRACE, conn.as_mut()).await {
                    Ok(ended) => ended,
                    Err(_) => {
                        // Closes it if idle; otherwise after the answer being sent.
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                }
            }
        };
        if let Err(e) = ended {
            // Timeouts, resets and malformed requests: the client's problem, not ours.
            debug!(error = %e, "connection ended with an error");
        }
    });
}

/// Once shutdown has begun, each answer closes its connection.
async fn close_when_stopping(
    State(stopping): State<Arc<AtomicBool>>, mut res: Response,
) -> Response {
    if stopping.load(Relaxed) {
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

enum Conn {
    Tcp(tokio::net::TcpStream, std::net::SocketAddr),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> std::io::Result<Conn> {
    Ok(match l {
        Listener::Tcp(l) => {
            let (tcp, addr) = l.accept().await?;
            Conn::Tcp(tcp, addr)
        }
        Listener::Unix(l, _) => Conn::Unix(l.accept().await?.0),
    })
}

/// Accepts and serves connections on one listener until `stop` turns true, then closes it.
async fn accept_until_stopped(
    listener: Listener, tls: Option<Arc<Tls>>, app: Router, state: Arc<AppState>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stopping| *stopping) => break,
            accepted = accept(&listener) => accepted,
        };
        match accepted {
            Ok(Conn::Tcp(tcp, addr)) => {
                // Without it every small response waits ~40 ms for the peer's delayed ACK.
                let _ = tcp.set_nodelay(true);
                let peer = Peer(Some(addr.ip().to_canonical()));
                match &tls {
                    None => serve(tcp, peer, &app, &state, &stop),
                    Some(tls) => {
                        let acceptor = tls.acceptor();
                        let (app, state, stop) = (app.clone(), state.clone(), stop.clone());
                        // Off the accept loop, and bounded like a request's headers.
                        let limit = secs(state.cfg.header_timeout_secs).unwrap_or(HANDSHAKE);
                        tokio::spawn(async move {
                            match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
                                Ok(Ok(tls)) => serve(tls, peer, &app, &state, &stop),
                                Ok(Err(e)) => {
                                    debug!(%addr, error = %e, "TLS handshake with {addr} failed: {e}")
                                }
                                Err(_) => debug!(%addr, "TLS handshake with {addr} timed out"),
                            }
                        });
                    }
                }
            }
            Ok(Conn::Unix(unix)) => serve(unix, Peer(None), &app, &state, &stop),
            Err(e) => {
                warn!(error = %e, listener = %listener.describe(), "accepting a connection failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Anyone who reaches a non-loopback address without `[auth]` may change every file: say so.
fn warn_if_open(state: &AppState, listeners: &[Listener]) {
    if state.gate.principals().enabled() {
        return;
    }
    for l in listeners {
        if let Listener::Tcp(tcp) = l
            && let Ok(addr) = tcp.local_addr()
            && !addr.ip().to_canonical().is_loopback()
        {
            warn!(%addr,
                "listening on {addr}, not a loopback address, with auth.mode = \"off\": anyone \
                 who reaches it may read, overwrite and delete every file (see [auth] in \
                 s3dedup.toml)");
        }
    }
}

/// On SIGHUP (`systemctl reload`), loads `[auth]` again and puts it in force; connections and
/// requests under way are not touched. Other settings take effect at the next restart.
async fn reload_on_sighup(state: Arc<AppState>, tls: Option<Arc<Tls>>) {
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot install the SIGHUP handler: reloading is not possible: {e}");
            return;
        }
    };
    while hup.recv().await.is_some() {
        if let Some(tls) = &tls {
            let reloaded = tokio::task::block_in_place(|| tls.reload());
            match reloaded {
                Ok(()) => info!("reloaded on SIGHUP: {} for new connections", tls.describe()),
                Err(e) => tracing::error!(error = %format!("{e:#}"),
                    "reload on SIGHUP: the TLS certificate in use stays: {e:#}"),
            }
        }
        let Some(reload) = state.reload.clone() else {
            continue;
        };
        let loaded = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let (cfg, files) = reload.load()?;
            Ok(s3dedup_common::auth::Principals::load(&cfg.auth, &files)?)
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
        match loaded {
            Ok(principals) => {
                let (users, on) = (principals.len(), principals.enabled());
                let mode = if on { "basic" } else { "off" };
                state.gate.replace(principals);
                info!(
                    users,
                    mode,
                    "reloaded on SIGHUP: auth {mode}, {users} users in force (other settings \
                     take effect at a restart)"
                );
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"),
                "reload on SIGHUP failed, the previous users stay in force: {e:#}"),
        }
    }
}

/// Which backend does not answer, and why; `None` when both do.
async fn backends_down(state: &AppState) -> Option<(&'static str, String)> {
    let (metadata, store) = state.files.describe();
    match state.files.check().await {
        (Err(e), _) => Some((
            "files",
            format!("the metadata database {metadata} does not answer: {e}"),
        )),
        // Small contents kept in the database are still served.
        (_, Err(e)) => Some((
            "files whose contents are objects",
            format!("the object store {store} does not answer: {e}"),
        )),
        _ => None,
    }
}

fn status_line(state: &AppState) -> String {
    let m = &state.metrics;
    format!(
        "serving: {} requests, {} in flight, {} dedup hits, {} new blobs",
        m.requests_total(),
        m.in_flight.load(Relaxed),
        m.dedup_hits.load(Relaxed),
        m.dedup_misses.load(Relaxed),
    )
}

/// Gives the allocator's free memory back to the system once no request has started or run for
/// a whole `every`, and something was served since the last time: after a burst of large
/// transfers glibc would keep tens of MiB it does not use; under load it is never interrupted.
async fn release_memory_when_idle(state: Arc<AppState>, every: Duration) {
    let mut released_after = state.idle_after();
    let mut last = released_after;
    loop {
        tokio::time::sleep(every).await;
        let now = state.idle_after();
        if now.is_some() && now == last && now != released_after {
            released_after = now;
            let took = Instant::now();
            let freed = tokio::task::spawn_blocking(|| {
                let before = memory::resident_kib();
                memory::release_free_memory();
                before.zip(memory::resident_kib())
            })
            .await;
            if let Ok(Some((before, after))) = freed {
                debug!(
                    before_kib = before,
                    after_kib = after,
                    took_ms = took.elapsed().as_millis() as u64,
                    "gave free memory back to the system"
                );
            }
        }
        last = now;
    }
}

/// Serves until SIGTERM/SIGINT, then drains in-flight requests for at most the configured time.
pub async fn run(state: Arc<AppState>, tls: Option<Arc<Tls>>) -> anyhow::Result<()> {
    // READY=1 means the database and the object store answer, not merely that we started.
    let (metadata, store) = state.files.describe();
    let (meta_ok, store_ok) = state.files.check().await;
    meta_ok.with_context(|| format!("metadata store {metadata} is not usable"))?;
    store_ok.with_context(|| format!("object store {store} is not usable"))?;
    // Serving such a store answers 404 for every old file; the cleaner refuses to sweep it.
    if let Ok(true) = state
        .files
        .metadata_looks_lost(s3dedup_common::unix_now())
        .await
    {
        tracing::warn!(%metadata, %store,
            "the metadata database has no files but the object store holds objects older than \
             an hour: a new or wrong database (metadata.backend, metadata.sqlite.path, \
             metadata.postgres.url)? Clients will not find the stored files. To move a store to \
             another database, import it: s3dedup-migrator --source s3dedup:OLD_CONFIG");
    }

    let listeners = listeners(&state).await?;
    let mut addr = listeners
        .iter()
        .map(Listener::describe)
        .collect::<Vec<_>>()
        .join(", ");
    if let Some(tls) = &tls {
        addr = format!("{addr} ({} on TCP)", tls.describe());
    }
    warn_if_open(&state, &listeners);
    let stopping = Arc::new(AtomicBool::new(false));
    let app = Router::new()
        .fallback(dispatch)
        .with_state(state.clone())
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::map_response_with_state(
            stopping.clone(),
            close_when_stopping,
        ));

    let inflater = s3dedup_common::gunzip::INFLATER;
    info!(%addr, %metadata, %store, inflater,
        "listening on {addr}: metadata {metadata}, objects {store}, gzip inflater {inflater}");
    systemd::notify_ready(&format!("listening on {addr}"));

    if let Some(every) = systemd::watchdog_interval() {
        // Pinged from the serving runtime: a stalled runtime stops the pings and systemd
        // restarts us.
        tokio::spawn(async move {
            loop {
                systemd::notify_watchdog();
                tokio::time::sleep(every).await;
            }
        });
    }
    let st = state.clone();
    tokio::spawn(async move {
        // A long count (a large store on a busy database) waits ten times as long before the
        // next, so counting takes at most a tenth of the database's time.
        let every = Duration::from_secs(st.cfg.stats_refresh_secs.max(1));
        loop {
            let took = st.count_stats().await;
            tokio::time::sleep(every.max(took * 10)).await;
        }
    });
    let st = state.clone();
    tokio::spawn(async move {
        let mut was_down: Option<(&str, String)> = None;
        loop {
            tokio::time::sleep(STATUS_EVERY).await;
            let down = backends_down(&st).await;
            match (&was_down, &down) {
                (None, Some((what, why))) => tracing::warn!("not serving {what}: {why}"),
                (Some(_), None) => {
                    tracing::info!("serving again: the database and the object store answer")
                }
                _ => {}
            }
            let line = match &down {
                None => status_line(&st),
                Some((_, why)) => format!("degraded: {why}"),
            };
            systemd::notify_status(&line);
            was_down = down;
        }
    });

    tokio::spawn(reload_on_sighup(state.clone(), tls.clone()));

    if state.cfg.release_memory_after_idle_secs > 0 {
        let every = Duration::from_secs(state.cfg.release_memory_after_idle_secs);
        tokio::spawn(release_memory_when_idle(state.clone(), every));
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut accepting = tokio::task::JoinSet::new();
    for listener in listeners {
        let (app, state, stop) = (app.clone(), state.clone(), stop_rx.clone());
        let tls = tls.clone();
        accepting.spawn(accept_until_stopped(listener, tls, app, state, stop));
    }
    let which = wait_for_signal().await.unwrap_or("signal handler failure");
    info!(
        signal = which,
        "shutting down on {which}, draining in-flight requests"
    );
    systemd::notify_stopping("draining in-flight requests");
    stopping.store(true, Relaxed);
    stop_tx.send_replace(true);
    // Each accept loop closes its listener as it ends.
    accepting.join_all().await;
    drop(stop_rx);
    let drain_limit = Duration::from_secs(state.cfg.shutdown_timeout_secs);
    if tokio::time::timeout(drain_limit, stop_tx.closed())
        .await
        .is_err()
    {
        let in_flight = state.metrics.in_flight.load(Relaxed);
        warn!(
            in_flight,
            "drain timed out after {} s (api.shutdown_timeout_secs) with {in_flight} requests in \
             flight; exiting",
            state.cfg.shutdown_timeout_secs
        );
    }
    info!("stopped");
    Ok(())
}
