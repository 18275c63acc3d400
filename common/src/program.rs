//! The three programs' entry point, and the exit codes they share: the one module of this
//! library that reads the process environment and prints (a fatal error, once). The programs
//! parse their flags and do their own work in `run`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::config::{
    self, Config, ConfigArgs, ConfigFile, MetadataBackend, Override, ProcessEnv, StoreBackend,
};
use crate::filestore::FileStore;
use crate::privileges::{self, Identity};
use crate::secrets::{SecretError, SecretFiles, Secrets};

/// Something failed (the store is unreachable, some deletions or imports failed).
pub const EXIT_FAILURE: u8 = 1;
/// The configuration is unusable. The API's unit does not restart on it
/// (`RestartPreventExitStatus=2`): only an operator can fix it.
pub const EXIT_CONFIG: u8 = 2;

/// What a program may do to a store that is not there yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opens {
    /// Create it: the API's first start sets the store up, and the migrator fills a new one.
    CreatingIfMissing,
    /// Only an existing store (the cleaner: a new empty store has nothing to clean or report,
    /// and reporting on one would hide that the configuration names the wrong place).
    Existing,
}

/// The configuration names no store where a program needs one; nothing was created.
#[derive(Debug, thiserror::Error)]
#[error(
    "no s3dedup store at {path} (data_dir {data_dir}, configuration: {file}); {program} does not \
     create one: give --config or --data-dir naming the store"
)]
pub struct NoStore {
    pub program: String,
    pub path: PathBuf,
    pub data_dir: PathBuf,
    pub file: ConfigFile,
}

/// Flags every program takes: its configuration, and (hidden from `--help`) what the
/// packages' build generates from the command line itself.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommonArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print this program's manual page (roff) and exit.
    #[arg(long, hide = true)]
    pub man_page: bool,
    /// Print the manual page of the configuration file, s3dedup.toml(5), and exit.
    #[arg(long, hide = true)]
    pub config_man_page: bool,
    /// Print shell completions for this program and exit.
    #[arg(long, hide = true, value_name = "SHELL")]
    pub completions: Option<clap_complete::Shell>,
}

/// What a program's own work starts from.
pub struct Started {
    pub cfg: Config,
    /// The secrets the configuration names, read before root was given up.
    pub secrets: Secrets,
    /// Started by systemd with the journal as its output (`$JOURNAL_STREAM`).
    pub under_systemd: bool,
    /// The program's name, as its command line says.
    pub program: String,
    /// Where the configuration's secret files are found.
    pub secret_files: SecretFiles,
    /// Loads the configuration again, as at start.
    pub reload: Reload,
}

/// Where the configuration came from (file, flags, environment), to load it again on a reload.
#[derive(Debug, Clone)]
pub struct Reload {
    args: ConfigArgs,
    flags: Vec<Override>,
    env: ProcessEnv,
    credentials: Option<PathBuf>,
}

impl Reload {
    /// The configuration as it reads now, and where its secret files are.
    pub fn load(&self) -> Result<(Config, SecretFiles), config::ConfigError> {
        let (cfg, file) =
            config::load_for_program(&self.args, self.flags.clone(), self.env.clone())?;
        let files = SecretFiles::new(self.credentials.clone(), file.path());
        Ok((cfg, files))
    }
}

/// Where a tool says what its run did, so that it is said once: as JSON on standard output
/// with `--json`; otherwise as prose on standard output, except under systemd, where standard
/// output is the journal too and the log says it (with its fields).
#[derive(Debug, Clone)]
pub struct Telling {
    json: bool,
    systemd: bool,
    /// Where a real run (no dry run) is recorded for `/metrics`, and as which tool.
    last_runs: std::path::PathBuf,
    program: String,
}

impl Telling {
    /// Whether the prose summary and its lists go to standard output.
    pub fn prose(&self) -> bool {
        !self.json && !self.systemd
    }

    /// Whether the summary and each problem go to the log.
    pub fn log(&self) -> bool {
        self.json || self.systemd
    }

    /// Whether standard output is the JSON report (and nothing else).
    pub fn json(&self) -> bool {
        self.json
    }

    /// Records `report` (with its `kind`) as this tool's last run of that kind, for `/metrics`
    /// and for [`Telling::last_run`].
    pub fn record(&self, report: &serde_json::Value) {
        let now = crate::unix_now();
        if let Err(e) = crate::last_runs::record(&self.last_runs, &self.program, report, now) {
            tracing::warn!(dir = %self.last_runs.display(), error = %e,
                "cannot record this run for the API's /metrics");
        }
    }

    /// When this tool last finished a successful run of `kind` (Unix seconds), as recorded.
    pub fn last_run(&self, kind: &str) -> Option<i64> {
        crate::last_runs::read(&self.last_runs)
            .into_iter()
            .find(|r| r.tool == self.program && r.kind == kind && r.ok)
            .map(|r| r.finished_at)
    }

    /// Says what a run did, once: `report` (its JSON form, whose `ok` sets the log level) on
    /// standard output with `--json`; else the summary `line` and its `details` (a failure
    /// each) as prose on standard output, or in the log under systemd, the report as a field.
    /// `details_logged`: each detail was logged when it happened.
    pub fn tell(
        &self, line: &str, details: &[String], report: serde_json::Value, details_logged: bool,
    ) {
        if self.json {
            println!("{report}");
        }
        if report["dry_run"] != true && report["busy"] != true {
            self.record(&report);
        }
        if self.log() {
            if !details_logged {
                details.iter().for_each(|d| tracing::warn!("{d}"));
            }
            if report["ok"] == true {
                tracing::info!(%report, "{line}");
            } else {
                tracing::error!(%report, "{line}");
            }
        }
        if self.prose() {
            println!("{line}");
            details.iter().for_each(|d| println!("{d}"));
        }
    }
}

impl Started {
    /// Where this run's report goes, given `--json`.
    pub fn telling(&self, json: bool) -> Telling {
        Telling {
            json,
            systemd: self.under_systemd,
            last_runs: self.cfg.last_runs_dir(),
            program: self.program.clone(),
        }
    }

    /// The file store the configuration names.
    pub async fn file_store(&self) -> anyhow::Result<FileStore> {
        FileStore::from_config(&self.cfg, &self.secrets)
            .await
            .context("opening the store")
    }
}

/// Sets up logging (the journal under systemd, else stderr), loads the configuration from the
/// flags, the environment and the file (exit 2 when it is unusable), reads its secrets, checks
/// that the store is there if `opens` says it must be, gives root up to the data directory's
/// owner, builds the runtime and runs `run`, whose number is the exit code. With
/// `--check-config` it prints what the configuration sets up instead of running. An error is
/// reported once, as one line naming the program: at error level in the journal under systemd, on
/// stderr otherwise (exit 2 for the configuration, else 1).
pub fn main<C, F, Fut>(opens: Opens, common: &CommonArgs, flags: Vec<Override>, run: F) -> ExitCode
where
    C: clap::CommandFactory,
    F: FnOnce(Started) -> Fut,
    Fut: Future<Output = anyhow::Result<u8>>,
{
    if let Some(code) = generate::<C>(common) {
        return code;
    }
    crate::memory::map_large_blocks_apart();
    let command = C::command();
    let name = command.get_name();
    let args = &common.config;
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
        system_config: Some(PathBuf::from(config::SYSTEM_CONFIG)),
    };
    let reload = Reload {
        args: args.clone(),
        flags: flags.clone(),
        env: env.clone(),
        credentials: var("CREDENTIALS_DIRECTORY"),
    };
    let (cfg, file) = match config::load_for_program(args, flags, env) {
        Ok(loaded) => loaded,
        Err(e) => return fail(EXIT_CONFIG, &e.to_string()),
    };
    let files = SecretFiles::new(var("CREDENTIALS_DIRECTORY"), file.path());
    let secrets = match Secrets::read(&cfg, &files) {
        Ok(s) => s,
        Err(e) => return fail(EXIT_CONFIG, &e.to_string()),
    };
    if let Err(e) = check_store(name, opens, &cfg, &file) {
        // Under its timer on a fresh install, before the API's first start made the store.
        if opens == Opens::Existing && under_systemd && !args.check_config {
            tracing::info!(
                path = %e.path.display(),
                "no store yet, nothing to do (s3dedup-api creates it when it first starts)"
            );
            return ExitCode::SUCCESS;
        }
        return fail(EXIT_CONFIG, &e.to_string());
    }
    if args.check_config {
        if let Err(e) = crate::auth::Principals::load(&cfg.auth, &files) {
            return fail(EXIT_CONFIG, &e.to_string());
        }
        let tls = [
            ("api.tls_certificate_file", &cfg.api.tls_certificate_file),
            ("api.tls_key_file", &cfg.api.tls_key_file),
        ];
        for (key, file) in tls {
            let Some(path) = file.as_deref().map(|f| files.locate(f)) else {
                continue;
            };
            if let Err(e) = std::fs::read(&path) {
                let message = format!("cannot read {} ({key}): {e}", path.display());
                return fail(EXIT_CONFIG, &message);
            }
        }
        print!("{}", summary(&cfg, &file, &secrets));
        println!("{name}: configuration OK");
        return ExitCode::SUCCESS;
    }
    let data_dir = cfg.data_dir.display();
    tracing::info!(config = %file, %data_dir, "configuration loaded from {file}, data in {data_dir}");
    match privileges::become_owner_of(&cfg.data_dir) {
        Ok(Identity::Unchanged) => {}
        Ok(Identity::Became { user, uid, .. }) => tracing::info!(
            user,
            uid,
            data_dir = %cfg.data_dir.display(),
            "started as root: running as the data directory's owner, so that the daemon can \
             read what this run writes"
        ),
        Err(e) => return fail(EXIT_FAILURE, &e.to_string()),
    }
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
        secrets,
        under_systemd,
        program: name.to_owned(),
        secret_files: files,
        reload,
    };
    let outcome = runtime.block_on(run(started));
    // Work still in flight (a blocking read of a file the migrator abandoned when stopped) is
    // not waited for past this; the next run cleans up what it leaves.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match outcome {
        Ok(code) => ExitCode::from(code),
        // A setting the program found unusable.
        Err(e)
            if e.is::<config::ConfigError>()
                || e.is::<SecretError>()
                || e.is::<crate::auth::AuthConfigError>() =>
        {
            fail(EXIT_CONFIG, &format!("{e:#}"))
        }
        Err(e) => fail(EXIT_FAILURE, &format!("{e:#}")),
    }
}

/// What the hidden flags of [`CommonArgs`] ask for, printed to stdout; `None` when none is set.
fn generate<C: clap::CommandFactory>(common: &CommonArgs) -> Option<ExitCode> {
    use std::io::Write;
    let out = if common.man_page {
        crate::manual::program_page(C::command())
    } else if common.config_man_page {
        Ok(crate::manual::config_page(env!("CARGO_PKG_VERSION")).into_bytes())
    } else if let Some(shell) = common.completions {
        Ok(crate::manual::completions(shell, C::command()))
    } else {
        return None;
    };
    let written = out.and_then(|bytes| std::io::stdout().write_all(&bytes));
    Some(match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cannot write the generated text: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    })
}

/// Refuses to go on where `opens` says the store (or its directory) must exist and does not.
fn check_store(name: &str, opens: Opens, cfg: &Config, file: &ConfigFile) -> Result<(), NoStore> {
    let mut must_exist = Vec::new();
    match opens {
        Opens::CreatingIfMissing => {}
        Opens::Existing => {
            if cfg.metadata.backend == MetadataBackend::Sqlite {
                must_exist.push(cfg.sqlite_path());
            }
            if cfg.store.backend == StoreBackend::Local {
                must_exist.push(cfg.local_store_path());
            }
        }
    }
    match must_exist
        .into_iter()
        .find(|p| !p.try_exists().unwrap_or(true))
    {
        None => Ok(()),
        Some(path) => Err(NoStore {
            program: name.to_owned(),
            path,
            data_dir: cfg.data_dir.clone(),
            file: file.clone(),
        }),
    }
}

/// What `--check-config` prints: where each part of the store is, and what was read.
fn summary(cfg: &Config, file: &ConfigFile, secrets: &Secrets) -> String {
    let metadata = match cfg.metadata.backend {
        MetadataBackend::Sqlite => format!("sqlite {}", cfg.sqlite_path().display()),
        MetadataBackend::Postgres => {
            format!("postgres (schema {})", cfg.metadata.postgres.schema)
        }
    };
    let store = match cfg.store.backend {
        StoreBackend::Local => format!("local {}", cfg.local_store_path().display()),
        StoreBackend::S3 => {
            let s3 = &cfg.store.s3;
            let at = if s3.endpoint.is_empty() {
                "AWS"
            } else {
                &s3.endpoint
            };
            format!("s3 bucket {} at {at}", s3.bucket)
        }
    };
    let read = |s: &Option<config::Secret>| if s.is_some() { "read" } else { "none" };
    format!(
        "configuration: {file}\ndata_dir: {}\nmetadata: {metadata}\nstore: {store}\n\
         listen: {} (when systemd passes no socket)\nauth: {}\nsecrets: s3 {}, postgres {}\n",
        cfg.data_dir.display(),
        cfg.api.listen,
        match cfg.auth.mode {
            config::AuthMode::Off => "off".to_owned(),
            config::AuthMode::Basic => format!("basic, {} users", cfg.auth.users.len()),
        },
        read(&secrets.s3_secret_access_key),
        read(&secrets.postgres_password),
    )
}
