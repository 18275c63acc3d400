//! The listening socket and the daemon's lifecycle: socket activation or bind, TCP_NODELAY,
//! readiness and watchdog notifications, and a bounded drain on SIGTERM.

use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::serve::ListenerExt;
use s3dedup_common::systemd;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::app::{AppState, dispatch};

/// How often `STATUS=` is refreshed for `systemctl status`.
const STATUS_EVERY: Duration = Duration::from_secs(5);

async fn listener(state: &AppState) -> anyhow::Result<TcpListener> {
    let inherited = systemd::listen_sockets().context("reading sockets passed by systemd")?;
    if let Some(l) = inherited.into_iter().next() {
        l.set_nonblocking(true)
            .context("making the systemd socket non-blocking")?;
        return TcpListener::from_std(l).context("adopting the systemd socket");
    }
    let addr = state.cfg.listen;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (api.listen)"))
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
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

/// Serves until SIGTERM/SIGINT, then drains in-flight requests for at most the configured time.
pub async fn run(state: Arc<AppState>) -> anyhow::Result<()> {
    // READY=1 means the database and the object store answer, not merely that we started.
    state.files.meta.check().await.with_context(|| {
        format!(
            "metadata store {} is not usable",
            state.files.meta.describe()
        )
    })?;
    state.files.store.check().await.with_context(|| {
        format!(
            "object store {} is not usable",
            state.files.store.describe()
        )
    })?;

    let listener = listener(&state).await?;
    let addr = listener
        .local_addr()
        .context("reading the listening address")?;
    let listener = listener.tap_io(|tcp| {
        // Without it every small response waits ~40 ms for the peer's delayed ACK.
        let _ = tcp.set_nodelay(true);
    });
    let app = Router::new()
        .fallback(dispatch)
        .with_state(state.clone())
        .layer(DefaultBodyLimit::disable());

    info!(%addr, metadata = %state.files.meta.describe(), store = %state.files.store.describe(), "listening");
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
        loop {
            tokio::time::sleep(STATUS_EVERY).await;
            systemd::notify_status(&status_line(&st));
        }
    });

    let signalled = Arc::new(Notify::new());
    let on_signal = signalled.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let which = wait_for_signal().await.unwrap_or("signal handler failure");
        info!(signal = which, "shutting down, draining in-flight requests");
        systemd::notify_stopping("draining in-flight requests");
        on_signal.notify_one();
    });
    let drain_limit = Duration::from_secs(state.cfg.shutdown_timeout_secs);
    tokio::select! {
        r = server.into_future() => r.context("serving HTTP")?,
        () = async { signalled.notified().await; tokio::time::sleep(drain_limit).await } => {
            warn!(in_flight = state.metrics.in_flight.load(Relaxed), "drain timed out; exiting");
        }
    }
    info!("stopped");
    Ok(())
}
