//! What the PostgreSQL metadata store and the PostgreSQL advisory locks share: bounding a
//! statement by the client deadline, and reading a driver error (its text, and whether the
//! connection it came from is lost).

use std::time::Duration;

/// `work`, or `None` if `deadline` passes first.
pub(crate) async fn within<T>(
    deadline: Option<Duration>, work: impl Future<Output = T>,
) -> Option<T> {
    match deadline {
        Some(d) => tokio::time::timeout(d, work).await.ok(),
        None => Some(work.await),
    }
}

/// The message for a statement that missed its `deadline`.
pub(crate) fn no_answer(deadline: Option<Duration>) -> String {
    format!(
        "the database did not answer within {} s",
        deadline.unwrap_or_default().as_secs()
    )
}

/// True when the error means the session is gone: the socket closed or failed, or the server
/// ended the backend (`pg_terminate_backend`, a shutdown, a failover, `idle_session_timeout`).
/// Nothing sent on that session after its last completed statement took effect.
pub fn connection_lost(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // 57P01 admin_shutdown (terminated), 57P02 crash_shutdown, 57P03 cannot_connect_now,
        // 57P05 idle_session_timeout; class 08: connection exceptions.
        Some(c) => {
            matches!(c.code(), "57P01" | "57P02" | "57P03" | "57P05") || c.code().starts_with("08")
        }
        // No SQLSTATE and no server message: an I/O error of the socket itself.
        None => e.as_db_error().is_none(),
    }
}

/// True when the server is unreachable or overloaded rather than refusing the statement: a
/// lost connection, a timeout or cancellation (class 57, 55P03), too many connections (53).
pub(crate) fn unavailable(e: &tokio_postgres::Error) -> bool {
    connection_lost(e)
        || e.code().is_some_and(|c| {
            let c = c.code();
            c.starts_with("53") || c.starts_with("57") || c == "55P03"
        })
}

/// The error's text with the server's own message or the underlying cause, which the driver's
/// `Display` leaves out.
pub fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{e}: {}", db.message()),
        None => match std::error::Error::source(e) {
            Some(src) => format!("{e}: {src}"),
            None => e.to_string(),
        },
    }
}
