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
