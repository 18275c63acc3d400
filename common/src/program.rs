//! The three programs' entry point, and the exit codes they share: the one module of this
//! library that reads the process environment and prints (a fatal error, once). The programs
//! parse their flags and do their own work in `run`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::config::{self, Config, ConfigArgs, Override, ProcessEnv};
use crate::filestore::FileStore;

/// Something failed (the store is unreachable, some deletions or imports failed).
pub const EXIT_FAILURE: u8 = 1;
/// The configuration is unusable.
pub const EXIT_CONFIG: u8 = 2;

/// What a program's own work starts from.
pub struct Started {
    pub cfg: Config,
    /// `$CREDENTIALS_DIRECTORY` (systemd's `LoadCredential=`), where secret files are read.
    pub credentials: Option<PathBuf>,
    /// Started by systemd with the journal as its output (`$JOURNAL_STREAM`).
    pub under_systemd: bool,
}

impl Started {
    /// The file store the configuration names, its secrets read from the credentials.
    pub async fn file_store(&self) -> anyhow::Result<FileStore> {
        FileStore::from_config(&self.cfg, self.credentials.as_deref())
            .await
            .context("opening the store")
    }
}

/// Sets up logging (the journal under systemd, else stderr), loads the configuration from the
/// flags, the environment and the file (exit 2 when it is unusable), builds the runtime and
/// runs `run`, whose number is the exit code. An error is reported once, as one line naming
/// `name`: at error level in the journal under systemd, on stderr otherwise (exit 2 for a
/// [`config::ConfigError`], else 1).
pub fn main<F, Fut>(name: &str, args: &ConfigArgs, flags: Vec<Override>, run: F) -> ExitCode
where
    F: FnOnce(Started) -> Fut,
    Fut: Future<Output = anyhow::Result<u8>>,
{
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    crate::systemd::init_logging(under_systemd, &filter);
    let fail = |code: u8, message: &str| {
        if under_systemd {
            tracing::error!("{message}");
        } else {
            eprintln!("{name}: {message}");
        }
        ExitCode::from(code)
    };
    let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let env = ProcessEnv {
        vars: std::env::vars().collect(),
        state_directory: var("STATE_DIRECTORY"),
        cache_directory: var("CACHE_DIRECTORY"),
    };
    let cfg = match config::load_for_program(args, flags, env) {
        Ok(cfg) => cfg,
        Err(e) => return fail(EXIT_CONFIG, &e.to_string()),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fail(
                EXIT_FAILURE,
                &format!("cannot start the async runtime: {e}"),
            );
        }
    };
    let started = Started {
        cfg,
        credentials: var("CREDENTIALS_DIRECTORY"),
        under_systemd,
    };
    match runtime.block_on(run(started)) {
        Ok(code) => ExitCode::from(code),
        // A setting the program found unusable (a secret file it cannot read, say).
        Err(e) if e.is::<config::ConfigError>() => fail(EXIT_CONFIG, &format!("{e:#}")),
        Err(e) => fail(EXIT_FAILURE, &format!("{e:#}")),
    }
}
