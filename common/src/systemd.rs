//! systemd integration: readiness, status and watchdog notifications, and socket activation.
//! Outside systemd every call is a harmless no-op. These read only systemd's own protocol
//! variables (`NOTIFY_SOCKET`, `LISTEN_FDS`, `WATCHDOG_USEC`), never configuration.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
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

/// A socket systemd passed that the API cannot serve, or passed sockets it cannot read.
#[derive(Debug, thiserror::Error)]
pub enum PassedSocketError {
    #[error("cannot read the sockets systemd passed (LISTEN_FDS): {0}")]
    Environment(std::io::Error),
    #[error(
        "systemd passed fd {fd}, {what}: only listening stream sockets (ListenStream=, \
         Accept=no) can be served; remove it from the socket unit"
    )]
    Unservable { fd: RawFd, what: String },
}

/// Listening sockets passed by systemd socket activation (the first is fd 3), every one of
/// them: TCP or Unix stream sockets. A descriptor that is not a listening stream socket is an
/// error naming it, rather than one address that is accepted and never answered.
pub fn listen_sockets() -> Result<Vec<OwnedFd>, PassedSocketError> {
    let fds: Vec<RawFd> = sd_notify::listen_fds()
        .map_err(PassedSocketError::Environment)?
        .collect();
    let owned: Vec<OwnedFd> = fds
        .into_iter()
        // SAFETY: systemd passed these descriptors to this process for it to own; each is
        // taken exactly once here (sd_notify only reads the variables).
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    for fd in &owned {
        if let Some(what) = unservable(fd) {
            return Err(PassedSocketError::Unservable {
                fd: fd.as_raw_fd(),
                what,
            });
        }
    }
    Ok(owned)
}

/// Why `fd` cannot be served, or `None` when it is a listening stream socket.
fn unservable(fd: &OwnedFd) -> Option<String> {
    use nix::sys::socket::{SockType, SockaddrStorage, getsockname, getsockopt, sockopt};
    let at = getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .map_or_else(|_| String::new(), |a| format!(" on {a}"));
    match getsockopt(fd, sockopt::SockType) {
        Err(_) => Some("which is not a socket".into()),
        Ok(SockType::Stream) => match getsockopt(fd, sockopt::AcceptConn) {
            Ok(true) => None,
            _ => Some(format!("a stream socket{at} that is not listening")),
        },
        Ok(other) => Some(format!("a {other:?} socket{at}")),
    }
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
    // Colours only for a person at a terminal: in a pipe or a file they are escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi),
        )
        .init();
}
