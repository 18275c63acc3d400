//! systemd integration: readiness, status and watchdog notifications, and socket activation.
//! Outside systemd every call is a harmless no-op. These read only systemd's own protocol
//! variables (`NOTIFY_SOCKET`, `LISTEN_FDS`, `WATCHDOG_USEC`), never configuration.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use sd_notify::NotifyState;

/// Tells systemd the service is ready, with a first status line.
pub fn notify_ready(status: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the one-line status `systemctl status` shows.
pub fn notify_status(status: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Status(status)]);
}

/// Tells systemd the service is shutting down.
pub fn notify_stopping(status: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Pets the watchdog.
pub fn notify_watchdog() {
    let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
}

/// How often to pet the watchdog (half its timeout), when systemd enabled one for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2))
}

/// Listening sockets passed by systemd socket activation (first is fd 3): TCP or Unix.
pub fn listen_sockets() -> std::io::Result<Vec<OwnedFd>> {
    let fds: Vec<RawFd> = sd_notify::listen_fds()?.collect();
    Ok(fds
        .into_iter()
        // SAFETY: systemd passed these descriptors to this process for it to own; each is
        // taken exactly once here (sd_notify only reads the variables).
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect())
}

/// Sends logs to journald with structured fields when `to_journal` (the program saw
/// `JOURNAL_STREAM`), else to stderr. `filter` is an `EnvFilter` directive such as `info`.
pub fn init_logging(to_journal: bool, filter: &str) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Event fields become S3DEDUP_<NAME> journal fields (journalctl S3DEDUP_ADDR=...).
    if to_journal
        && let Ok(journald) =
            tracing_journald::layer().map(|l| l.with_field_prefix(Some("S3DEDUP".into())))
    {
        tracing_subscriber::registry()
            .with(filter)
            .with(journald)
            .init();
        return;
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
}
