//! `s3dedup-common`: everything the s3dedup programs share, one module per decision
//! (docs/design.md lists them, with what each hides and uses). Only `program`, their common
//! entry point, reads the process environment or prints.

pub mod auth;
pub mod blob;
pub mod config;
pub mod filestore;
pub mod group;
pub mod gunzip;
pub mod inflating;
pub mod last_runs;
pub mod locks;
pub mod manual;
pub mod memory;
pub mod meta;
pub mod migrate;
pub mod old_server;
pub mod pg;
pub mod privileges;
pub mod program;
pub mod protocol;
pub mod reports;
pub mod secrets;
pub mod source;
pub mod spool;
pub mod store;
pub mod systemd;
pub mod throttle;

/// Seconds since the Unix epoch, the clock of versions and grace periods.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// An error and its causes in one line, joined by ": ". A cause whose text is the same as the
/// one before is said once: wrappers often display their cause's text as their own.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut last = text.clone();
    let mut cause = err.source();
    while let Some(c) = cause {
        let said = c.to_string();
        if said != last {
            text = format!("{text}: {said}");
        }
        last = said;
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error saying `text`, caused by `cause`.
    #[derive(Debug)]
    struct Said(&'static str, Option<Box<Said>>);

    impl std::fmt::Display for Said {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Said {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|c| c as _)
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let bad = Said("bad chunk", None);
        let read = Said("error reading a body", Some(Box::new(bad)));
        // A wrapper that displays its cause's text as its own.
        let wrapper = Said("error reading a body", Some(Box::new(read)));
        assert_eq!(error_chain(&wrapper), "error reading a body: bad chunk");
        assert_eq!(error_chain(&Said("plain", None)), "plain");
    }
}
