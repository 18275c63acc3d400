//! What every s3dedup program does before its own work, and the exit codes they share.
//! The programs read their environment and print; this module does neither.

use crate::config::{self, Config, ConfigArgs, Override, ProcessEnv};

/// Something failed (the store is unreachable, some deletions or imports failed).
pub const EXIT_FAILURE: u8 = 1;
/// The configuration is unusable.
pub const EXIT_CONFIG: u8 = 2;

/// Why a program could not start: its exit code and the one line to print.
#[derive(Debug)]
pub struct StartError {
    pub code: u8,
    pub message: String,
}

/// Loads the configuration (exit code 2 on error) and builds the multi-threaded runtime.
pub fn start(
    args: &ConfigArgs,
    flags: Vec<Override>,
    env: ProcessEnv,
) -> Result<(Config, tokio::runtime::Runtime), StartError> {
    let cfg = config::load_for_program(args, flags, env).map_err(|e| StartError {
        code: EXIT_CONFIG,
        message: e.to_string(),
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| StartError {
            code: EXIT_FAILURE,
            message: format!("cannot start the async runtime: {e}"),
        })?;
    Ok((cfg, runtime))
}
