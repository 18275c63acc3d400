//! Configuration: one TOML file, each key overridable from the environment
//! (`S3DEDUP_<SECTION>__<KEY>`, e.g. `S3DEDUP_API__LISTEN`, `S3DEDUP_STORE__S3__BUCKET`) and by
//! command-line flags, in that order of precedence. Every key has a default, so no file at all
//! gives the embedded default (SQLite + a local directory store under `./s3dedup-data`).
//!
//! This module never reads the environment itself: the programs pass the variables in.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::source::{OldServerUrl, Source};

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "S3DEDUP_";

/// A configuration that cannot be used; names the key and where its value came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("invalid configuration key `{key}` (from {origin}): {message}")]
    Key {
        key: String,
        origin: String,
        message: String,
    },
}

/// A string that is never printed: `Debug` shows `***`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// The whole configuration shared by the three programs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where SQLite, the local object store and the upload spool live by default.
    pub data_dir: PathBuf,
    pub api: ApiConfig,
    pub auth: AuthConfig,
    pub metadata: MetadataConfig,
    pub store: StoreConfig,
    pub locks: LocksConfig,
    pub cleaner: CleanerConfig,
    pub migrator: MigratorConfig,
}

/// `[migrator]`: what `s3dedup-migrator` (and its systemd unit) imports.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigratorConfig {
    /// `v1:DIR` (Filetracker v1 `files/`), `v2:DIR` (`filetracker-server -d DIR`), an old
    /// server's `http://HOST:PORT`, another s3dedup store (`s3dedup:CONFIG_FILE`) or an
    /// upstream s3dedup bucket (`upstream:BUCKET:…`); empty: none.
    #[serde(deserialize_with = "crate::source::optional")]
    pub source: Option<Source>,
    /// Files imported at once.
    pub jobs: usize,
    /// Bytes read from the source per second, over all jobs; 0: unlimited.
    pub max_bytes_per_sec: u64,
}

impl Default for MigratorConfig {
    fn default() -> Self {
        MigratorConfig {
            source: None,
            jobs: 4,
            max_bytes_per_sec: 0,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("s3dedup-data"),
            api: ApiConfig::default(),
            auth: AuthConfig::default(),
            metadata: MetadataConfig::default(),
            store: StoreConfig::default(),
            locks: LocksConfig::default(),
            cleaner: CleanerConfig::default(),
            migrator: MigratorConfig::default(),
        }
    }
}

/// `[auth]`: who may use the API (HTTP Basic, as the Filetracker client sends it from the
/// user and password in its URL).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `off` (anyone who reaches the socket may do anything) or `basic`.
    pub mode: AuthMode,
    /// Whether `/health`, `/status`, `/version` and `/metrics` answer without credentials.
    pub public_status: bool,
    /// Failed logins from one address within a minute before it gets 429 for the rest of it.
    pub max_failures_per_minute: u32,
    /// The principals, as `[[auth.users]]` tables.
    pub users: Vec<UserConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Off,
            public_status: true,
            max_failures_per_minute: 20,
            users: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Off,
    Basic,
}

/// What a principal may do; each role may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// GET, HEAD and listings (judging workers that only download).
    Read,
    /// And PUT.
    Write,
    /// And DELETE.
    Admin,
}

/// One `[[auth.users]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub role: Role,
    /// The password's argon2 hash (`$argon2id$...`, from `s3dedup-api --hash-password`).
    #[serde(default)]
    pub password_hash: Option<String>,
    /// Or a file holding that hash, found like the other secret files.
    #[serde(default)]
    pub password_hash_file: Option<PathBuf>,
    /// Paths the principal is limited to (`/outputs/`: that directory and below); empty: all.
    #[serde(default)]
    pub prefixes: Vec<String>,
}

/// `[cleaner]`: garbage collection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CleanerConfig {
    /// Unreferenced blobs and row-less objects younger than this are kept. It must exceed the
    /// longest upload (an object is written before its row) and the clock skew between hosts.
    pub grace_period_secs: u64,
    /// How long to wait for a blob's lock (held by a PUT) before leaving it to the next run.
    pub lock_timeout_secs: u64,
    /// Rows or keys per round trip; bounds the cleaner's memory.
    pub page_size: usize,
    /// Deleted paths are remembered this long, so a migration (migrator or the API's fallback)
    /// does not bring them back; 0: forever.
    pub remember_deletions_days: u64,
    /// Every request deleting one object is sent within this time; past it the cleaner drops
    /// it and leaves the object to its next run.
    pub delete_timeout_secs: u64,
    /// How long after a delete request was dropped (or its sender died) the object store may
    /// still carry it out. A PUT of that content in the meantime waits until both have passed.
    pub delete_settle_secs: u64,
    /// How often a run also lists the whole object store for objects without a row (and
    /// abandoned uploads), which costs in proportion to the store; 0: every run.
    pub orphan_sweep_interval_secs: u64,
}

impl Default for CleanerConfig {
    fn default() -> Self {
        CleanerConfig {
            grace_period_secs: 3600,
            lock_timeout_secs: 5,
            page_size: 1000,
            remember_deletions_days: 90,
            delete_timeout_secs: 30,
            delete_settle_secs: 30,
            orphan_sweep_interval_secs: 86400,
        }
    }
}

/// `[api]`: the HTTP daemon.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address to bind when systemd passes no socket: `HOST:PORT` (Filetracker's default
    /// `127.0.0.1:9999`) or `unix:/PATH` for a Unix socket (behind a reverse proxy).
    pub listen: ListenAddr,
    /// TLS on the TCP listeners: the certificate chain (PEM), found like the secret files.
    pub tls_certificate_file: Option<PathBuf>,
    /// And its private key (PEM). Both are read again on reload (a renewed certificate).
    pub tls_key_file: Option<PathBuf>,
    /// File and list requests served at once, reads (GET, HEAD) and writes (PUT, DELETE)
    /// each; more wait up to `queue_timeout_secs`, then get 503. Separate, so uploads that
    /// trickle in cannot keep reads waiting.
    pub max_concurrent_requests: usize,
    /// How long a request may wait for a free slot before a 503.
    pub queue_timeout_secs: u64,
    /// Of each pool's slots, how many the requests from one source address may hold at once;
    /// more wait like any request for a slot. 0: no bound (one proxy in front of all clients).
    pub max_requests_per_address: usize,
    /// Largest accepted file, uncompressed, in bytes (also bounds gzip bombs).
    pub max_file_size: u64,
    /// Longest accepted file path, in bytes.
    pub max_path_length: usize,
    /// gzip level for bodies sent uncompressed (the client's own gzip is stored as is).
    pub compression_level: u32,
    /// How long a request waits for a blob's lock before failing with 503.
    pub lock_timeout_secs: u64,
    /// On SIGTERM, how long in-flight requests may take to finish.
    pub shutdown_timeout_secs: u64,
    /// Live migration: the old Filetracker server's root URL (`http://HOST:PORT`). A GET, HEAD
    /// or DELETE of a path not stored here first imports it from there. Empty: off.
    #[serde(deserialize_with = "crate::source::optional")]
    pub fallback_url: Option<OldServerUrl>,
    /// With `fallback_url`: PUTs and DELETEs that succeed here are also sent to the old server,
    /// so switching back to it loses nothing.
    pub fallback_forward_writes: bool,
    /// With `fallback_url`: how long one request to the old server may stall.
    pub fallback_timeout_secs: u64,
    /// A client must send a request's headers within this time (also closes idle
    /// keep-alive connections). 0: no limit.
    pub header_timeout_secs: u64,
    /// A request body that sends nothing for this long is abandoned. 0: no limit.
    pub body_timeout_secs: u64,
    /// Bytes a second an upload must average once it has run `body_timeout_secs`; slower, it
    /// fails and frees its slot (a byte now and then would otherwise hold it). 0: no minimum.
    pub min_body_rate: u64,
    /// A client that reads nothing of a response for this long is disconnected. 0: no limit.
    pub send_timeout_secs: u64,
    /// Refuse a gzip upload once its content exceeds this many times the compressed bytes
    /// received (past the first MiB). 0: off, since deflate itself stops near 1032:1 and
    /// periodic test data gets close to that; `max_file_size` bounds the work either way.
    pub max_gzip_ratio: u64,
    /// After this many seconds without a file or list request, the memory the allocator kept
    /// from the last burst is given back to the system. 0: never.
    pub release_memory_after_idle_secs: u64,
    /// How often the store's totals that `/metrics` shows (files, blobs, bytes) are counted
    /// again, in the background: a scrape only reads the last count, however large the store.
    /// A count that takes long waits ten times its duration before the next.
    pub stats_refresh_secs: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 9999))),
            tls_certificate_file: None,
            tls_key_file: None,
            max_concurrent_requests: 256,
            queue_timeout_secs: 30,
            max_requests_per_address: 128,
            max_file_size: 64 << 30,
            max_path_length: crate::protocol::DEFAULT_MAX_PATH_LEN,
            compression_level: 1,
            lock_timeout_secs: 60,
            shutdown_timeout_secs: 30,
            fallback_url: None,
            fallback_forward_writes: false,
            fallback_timeout_secs: 30,
            header_timeout_secs: 60,
            body_timeout_secs: 60,
            min_body_rate: 1024,
            send_timeout_secs: 120,
            max_gzip_ratio: 0,
            release_memory_after_idle_secs: 10,
            stats_refresh_secs: 30,
        }
    }
}

/// Where the API listens: a TCP address or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("unix socket path {path:?} must be absolute"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse()
            .map(ListenAddr::Tcp)
            .map_err(|e| format!("{s:?} is neither HOST:PORT nor unix:/PATH ({e})"))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => a.fmt(f),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Which metadata database to use.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MetadataBackend {
    Sqlite,
    Postgres,
}

/// `[metadata]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetadataConfig {
    pub backend: MetadataBackend,
    pub sqlite: SqliteConfig,
    pub postgres: PostgresConfig,
}

impl Default for MetadataConfig {
    fn default() -> Self {
        MetadataConfig {
            backend: MetadataBackend::Sqlite,
            sqlite: SqliteConfig::default(),
            postgres: PostgresConfig::default(),
        }
    }
}

/// `[metadata.postgres]`: also the server of `postgres` advisory locks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// libpq-style `host=... port=... user=... dbname=...` or a `postgres://` URL.
    pub url: String,
    /// Overrides any password in `url`.
    pub password: Secret,
    /// Read the password from this file (relative: see `secrets`).
    pub password_file: Option<PathBuf>,
    /// Schema holding the tables (created if missing); one per bucket on a shared server.
    pub schema: String,
    /// Connections for metadata queries.
    pub pool_size: usize,
    pub connect_timeout_secs: u64,
    /// Server-side `statement_timeout` and `idle_in_transaction_session_timeout`; with
    /// `connect_timeout_secs` added, the client's deadline for each statement or transaction
    /// (a server or network that stalls with the connection open). 0: no limit.
    pub statement_timeout_secs: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: String::new(),
            password: Secret::default(),
            password_file: None,
            schema: "public".into(),
            pool_size: 16,
            connect_timeout_secs: 5,
            statement_timeout_secs: 30,
        }
    }
}

impl PostgresConfig {
    /// How long the client waits for one statement or transaction before it gives the
    /// connection up; `None` when `statement_timeout_secs` is 0.
    pub fn client_deadline(&self) -> Option<Duration> {
        (self.statement_timeout_secs > 0).then(|| {
            Duration::from_secs(self.statement_timeout_secs + self.connect_timeout_secs.max(1))
        })
    }
}

/// `[metadata.sqlite]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqliteConfig {
    /// Database file; default `<data_dir>/metadata.sqlite3`.
    pub path: Option<PathBuf>,
    /// Read connections kept open (writes use one connection of their own).
    pub readers: usize,
    /// `full` survives power loss after a 200; `normal` only survives process crashes.
    pub synchronous: SqliteSync,
    /// How long a statement waits for another process's write lock before answering 503.
    pub busy_timeout_ms: u64,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        SqliteConfig {
            path: None,
            readers: 4,
            synchronous: SqliteSync::Full,
            busy_timeout_ms: 10_000,
        }
    }
}

/// SQLite's `PRAGMA synchronous` in WAL mode.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSync {
    Full,
    Normal,
}

/// Which object store keeps blob contents.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    Local,
    S3,
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    pub local: LocalStoreConfig,
    pub s3: S3Config,
    pub cache: CacheConfig,
    /// Spool files untouched this long are leftovers of a killed process; the API removes
    /// them when it starts. A live upload touches its file at least every
    /// `api.body_timeout_secs`.
    pub spool_max_age_secs: u64,
    /// Uploads whose stored (gzip) size is at most this many KiB wait in memory, not in a spool
    /// file; 0: always a file. Bounds memory at `api.max_concurrent_requests` times this.
    pub spool_memory_kib: u64,
    /// Contents whose stored (gzip) size is at most this many bytes are kept in their blob's
    /// metadata row instead of the object store; 0: every content is an object. Changing it
    /// affects new contents only: rows and objects stored under other values stay readable.
    pub inline_max_bytes: u64,
}

/// `[store.cache]`: the API's local disk cache of objects read from S3 (unused with the local
/// store, whose objects are on local disk already).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub enabled: bool,
    /// Directory; default systemd's `$CACHE_DIRECTORY`, else `<data_dir>/cache`.
    pub path: Option<PathBuf>,
    /// Bound on the cache's total size; objects above an eighth of it are not cached.
    pub max_size_mb: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            path: None,
            max_size_mb: 2048,
        }
    }
}

/// Default of `store.inline_max_bytes`: most sources, small tests and outputs of a contest
/// platform compress below it.
pub const DEFAULT_INLINE_MAX_BYTES: u64 = 8192;
/// Bound on `store.inline_max_bytes`: rows stay small enough to read whole for every GET.
pub const MAX_INLINE_BYTES: u64 = 65536;

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            cache: CacheConfig::default(),
            spool_max_age_secs: 3600,
            spool_memory_kib: (crate::spool::DEFAULT_MEMORY_LIMIT / 1024) as u64,
            inline_max_bytes: DEFAULT_INLINE_MAX_BYTES,
            backend: StoreBackend::Local,
            local: LocalStoreConfig::default(),
            s3: S3Config::default(),
        }
    }
}

/// `[store.local]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalStoreConfig {
    /// Directory of objects; default `<data_dir>/objects`. Must be on the spool's filesystem
    /// for uploads to commit by rename (otherwise they are copied).
    pub path: Option<PathBuf>,
}

/// `[store.s3]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix: objects live at `<prefix>/<aa>/<bb>/<sha256>` (no prefix: `<aa>/<bb>/<sha256>`,
    /// the upstream s3dedup layout).
    pub prefix: String,
    /// e.g. `http://127.0.0.1:9000`; empty means AWS.
    pub endpoint: String,
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`), what most self-hosted servers need.
    pub path_style: bool,
    pub access_key_id: String,
    pub secret_access_key: Secret,
    /// Read the secret from this file instead (relative: see `secrets`).
    pub secret_access_key_file: Option<PathBuf>,
    /// Objects at least this large are uploaded in parts.
    pub multipart_threshold: u64,
    pub part_size: u64,
    /// Parts of one object uploaded at once.
    pub upload_concurrency: usize,
    /// Ranges of one large object downloaded at once (1: one GET per object).
    pub download_concurrency: usize,
    pub connect_timeout_secs: u64,
    /// Longest silence while reading a response.
    pub read_timeout_secs: u64,
    /// Attempts per request, including the first (retries use exponential backoff).
    pub max_attempts: u32,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            bucket: String::new(),
            prefix: String::new(),
            endpoint: String::new(),
            region: "us-east-1".into(),
            path_style: true,
            access_key_id: String::new(),
            secret_access_key: Secret::default(),
            secret_access_key_file: None,
            multipart_threshold: 64 << 20,
            part_size: 16 << 20,
            upload_concurrency: 4,
            download_concurrency: 4,
            connect_timeout_secs: 5,
            read_timeout_secs: 60,
            max_attempts: 3,
        }
    }
}

/// Which advisory lock implementation coordinates processes.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LocksBackend {
    File,
    Postgres,
}

/// `[locks]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocksConfig {
    pub backend: LocksBackend,
    /// Lock file for `file` locks; default beside the SQLite database (`<db>.locks`).
    pub path: Option<PathBuf>,
    /// Connections (to `metadata.postgres`) that hold `postgres` advisory locks.
    pub postgres_connections: usize,
}

impl Default for LocksConfig {
    fn default() -> Self {
        LocksConfig {
            backend: LocksBackend::File,
            path: None,
            postgres_connections: 4,
        }
    }
}

impl Config {
    /// The SQLite database file.
    pub fn sqlite_path(&self) -> PathBuf {
        self.metadata
            .sqlite
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("metadata.sqlite3"))
    }

    /// The local object store directory.
    pub fn local_store_path(&self) -> PathBuf {
        self.store
            .local
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("objects"))
    }

    /// The read cache's directory.
    pub fn cache_path(&self) -> PathBuf {
        self.store
            .cache
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("cache"))
    }

    /// Where uploads in flight are spooled (same filesystem as the data directory).
    pub fn spool_dir(&self) -> PathBuf {
        self.data_dir.join("spool")
    }

    /// Where the tools record their last runs, for the API's `/metrics`.
    pub fn last_runs_dir(&self) -> PathBuf {
        self.data_dir.join("last-runs")
    }

    /// The lock file of `file` locks.
    pub fn lock_file_path(&self) -> PathBuf {
        self.locks.path.clone().unwrap_or_else(|| {
            let mut p = self.sqlite_path().into_os_string();
            p.push(".locks");
            PathBuf::from(p)
        })
    }

    /// PostgreSQL holds the metadata or the locks.
    pub fn uses_postgres(&self) -> bool {
        self.metadata.backend == MetadataBackend::Postgres
            || self.locks.backend == LocksBackend::Postgres
    }

    /// Checks what serde cannot: ranges and keys required by the chosen backends.
    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: &str| Err((k.to_owned(), m.to_owned()));
        if self.api.compression_level > 9 {
            return bad("api.compression_level", "must be between 0 and 9");
        }
        if self.migrator.jobs == 0 {
            return bad("migrator.jobs", "must be at least 1");
        }
        if self.cleaner.delete_timeout_secs == 0 {
            return bad("cleaner.delete_timeout_secs", "must be at least 1");
        }
        if self.cleaner.page_size == 0 {
            return bad("cleaner.page_size", "must be at least 1");
        }
        if self.api.tls_certificate_file.is_some() != self.api.tls_key_file.is_some() {
            return bad(
                "api.tls_certificate_file",
                "set both api.tls_certificate_file and api.tls_key_file, or neither",
            );
        }
        if self.store.inline_max_bytes > MAX_INLINE_BYTES {
            return bad(
                "store.inline_max_bytes",
                &format!("must be at most {MAX_INLINE_BYTES} (larger contents are objects)"),
            );
        }
        if self.api.max_concurrent_requests == 0 {
            return bad("api.max_concurrent_requests", "must be at least 1");
        }
        if self.metadata.sqlite.readers == 0 {
            return bad("metadata.sqlite.readers", "must be at least 1");
        }
        self.validate_auth()?;
        let pg = &self.metadata.postgres;
        if self.uses_postgres() {
            if pg.url.is_empty() {
                return bad("metadata.postgres.url", "required when PostgreSQL is used");
            }
            if let Err(e) = pg.url.parse::<tokio_postgres::Config>() {
                return Err(("metadata.postgres.url".into(), e.to_string()));
            }
            if pg.pool_size == 0 {
                return bad("metadata.postgres.pool_size", "must be at least 1");
            }
            if pg.schema.is_empty()
                || !pg
                    .schema
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return bad("metadata.postgres.schema", "must be letters, digits and _");
            }
            if self.locks.postgres_connections == 0 {
                return bad("locks.postgres_connections", "must be at least 1");
            }
        }
        if self.store.backend == StoreBackend::S3 {
            let s3 = &self.store.s3;
            if s3.bucket.is_empty() {
                return bad("store.s3.bucket", "required when store.backend = \"s3\"");
            }
            if s3.part_size < 5 << 20 {
                return bad("store.s3.part_size", "S3 parts must be at least 5 MiB");
            }
            if s3.multipart_threshold < s3.part_size {
                return bad("store.s3.multipart_threshold", "must be at least part_size");
            }
            if s3.upload_concurrency == 0 {
                return bad("store.s3.upload_concurrency", "must be at least 1");
            }
            if s3.download_concurrency == 0 {
                return bad("store.s3.download_concurrency", "must be at least 1");
            }
            if s3.max_attempts == 0 {
                return bad("store.s3.max_attempts", "must be at least 1");
            }
        }
        Ok(())
    }
}

impl Config {
    fn validate_auth(&self) -> Result<(), (String, String)> {
        let auth = &self.auth;
        let bad = |k: String, m: &str| Err((k, m.to_owned()));
        if auth.mode == AuthMode::Basic && auth.users.is_empty() {
            return bad(
                "auth.users".into(),
                "auth.mode = \"basic\" needs at least one user",
            );
        }
        for (i, u) in auth.users.iter().enumerate() {
            let key = |k: &str| format!("auth.users[{i}].{k}");
            if u.name.is_empty() || u.name.contains(':') || u.name.chars().any(char::is_control) {
                return bad(
                    key("name"),
                    "must be non-empty, without `:` or control characters",
                );
            }
            if auth.users[..i].iter().any(|o| o.name == u.name) {
                return bad(key("name"), "another user has this name");
            }
            if u.password_hash.is_some() == u.password_hash_file.is_some() {
                return bad(
                    key("password_hash"),
                    "set one of password_hash, password_hash_file",
                );
            }
            if let Some(p) = u.prefixes.iter().find(|p| !p.starts_with('/')) {
                return Err((key("prefixes"), format!("{p:?} does not start with /")));
            }
        }
        Ok(())
    }
}

/// Where a program looks for its configuration when given no `--config`: the file the
/// packages install, so that a program run by hand uses the store the services use.
pub const SYSTEM_CONFIG: &str = "/etc/s3dedup/s3dedup.toml";

/// Command-line flags every program takes to find its configuration.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file [default: /etc/s3dedup/s3dedup.toml when it exists, else the
    /// built-in defaults; `--config /dev/null` for the built-in defaults]. Every key can also be
    /// set as S3DEDUP_<SECTION>__<KEY>.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for SQLite, local objects and the upload spool (data_dir).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Check the configuration and the secrets it names, print what it sets up, and exit: 0 when
    /// usable, 2 when not. Connects to nothing.
    #[arg(long)]
    pub check_config: bool,
}

/// Which configuration file a program read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigFile {
    /// Named by `--config`.
    Given(PathBuf),
    /// No `--config`: the system's file, which exists.
    System(PathBuf),
    /// No `--config` and no system file: the built-in defaults.
    BuiltIn { looked_for: Option<PathBuf> },
}

impl ConfigFile {
    /// The file read, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ConfigFile::Given(p) | ConfigFile::System(p) => Some(p),
            ConfigFile::BuiltIn { .. } => None,
        }
    }
}

impl fmt::Display for ConfigFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigFile::Given(p) => write!(f, "{}", p.display()),
            ConfigFile::System(p) => write!(f, "{} (the default)", p.display()),
            ConfigFile::BuiltIn {
                looked_for: Some(p),
            } => write!(f, "built-in defaults (no {})", p.display()),
            ConfigFile::BuiltIn { looked_for: None } => f.write_str("built-in defaults"),
        }
    }
}

/// What a program found in its process environment, passed in so this module reads none.
#[derive(Debug, Clone, Default)]
pub struct ProcessEnv {
    /// All environment variables; only `S3DEDUP_*` ones are used.
    pub vars: Vec<(String, String)>,
    /// systemd's `$STATE_DIRECTORY`: the data directory unless one is configured.
    pub state_directory: Option<PathBuf>,
    /// systemd's `$CACHE_DIRECTORY`: the read cache's directory unless one is configured.
    pub cache_directory: Option<PathBuf>,
    /// The file read when there is no `--config` and it exists ([`SYSTEM_CONFIG`]).
    pub system_config: Option<PathBuf>,
}

/// Loads a program's configuration: defaults, file, `S3DEDUP_*` variables, then flags
/// (`args` and `extra`, e.g. `--listen`). Says which file it read.
pub fn load_for_program(
    args: &ConfigArgs, extra: Vec<Override>, env: ProcessEnv,
) -> Result<(Config, ConfigFile), ConfigError> {
    let mut overrides = env_overrides(env.vars);
    if let Some(d) = &args.data_dir {
        overrides.push(Override::new(
            "data_dir",
            d.display().to_string(),
            "--data-dir",
        ));
    }
    overrides.extend(extra);
    let file = match (&args.config, env.system_config) {
        (Some(given), _) => ConfigFile::Given(given.clone()),
        // A file that cannot even be looked at (a directory we may not search) is still read,
        // so that the error names it rather than the defaults taking over quietly.
        (None, Some(system)) if system.try_exists().unwrap_or(true) => ConfigFile::System(system),
        (None, looked_for) => ConfigFile::BuiltIn { looked_for },
    };
    let mut cfg = load(file.path(), &overrides)?;
    if let Some(dir) = env.state_directory
        && cfg.data_dir == Config::default().data_dir
    {
        cfg.data_dir = dir;
    }
    if cfg.store.cache.path.is_none() {
        cfg.store.cache.path = env.cache_directory;
    }
    Ok((cfg, file))
}

/// One override of a configuration key, e.g. from an environment variable or a flag.
#[derive(Debug, Clone)]
pub struct Override {
    /// Dotted key, e.g. `api.listen`.
    pub key: String,
    pub value: String,
    /// Where it came from, for error messages (`environment variable S3DEDUP_API__LISTEN`).
    pub origin: String,
}

impl Override {
    /// `key` set to `value`; `origin` says where it came from (`--listen`).
    pub fn new(key: &str, value: impl Into<String>, origin: impl Into<String>) -> Self {
        Override {
            key: key.into(),
            value: value.into(),
            origin: origin.into(),
        }
    }
}

/// Turns `S3DEDUP_*` environment variables into overrides (`S3DEDUP_STORE__S3__BUCKET` →
/// `store.s3.bucket`). Other variables are ignored.
pub fn env_overrides(vars: impl IntoIterator<Item = (String, String)>) -> Vec<Override> {
    let mut out: Vec<Override> = vars
        .into_iter()
        .filter_map(|(name, value)| {
            let rest = name.strip_prefix(ENV_PREFIX)?;
            if rest.is_empty() {
                return None;
            }
            let key = rest
                .split("__")
                .map(|s| s.to_ascii_lowercase())
                .collect::<Vec<_>>()
                .join(".");
            Some(Override {
                key,
                value,
                origin: format!("environment variable {name}"),
            })
        })
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// Loads the configuration: defaults, then the file (if any), then the overrides in order.
pub fn load(file: Option<&Path>, overrides: &[Override]) -> Result<Config, ConfigError> {
    let (table, file_origin) = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
                path: path.to_owned(),
                message: one_line(&e.to_string()),
            })?;
            (table, format!("config file {}", path.display()))
        }
        None => (toml::Table::new(), "defaults".to_owned()),
    };
    // Values from strings are typed by a guess (`8` is an integer); when the guess does not fit
    // the key's type, the value is retried as a string.
    let mut as_string: Vec<bool> = vec![false; overrides.len()];
    loop {
        let mut t = table.clone();
        for (i, o) in overrides.iter().enumerate() {
            let value = if as_string[i] {
                toml::Value::String(o.value.clone())
            } else {
                guess_value(&o.value)
            };
            set_key(&mut t, &o.key, value).map_err(|message| ConfigError::Key {
                key: o.key.clone(),
                origin: o.origin.clone(),
                message,
            })?;
        }
        let result: Result<Config, _> = serde_path_to_error::deserialize(toml::Value::Table(t));
        match result {
            Ok(cfg) => {
                cfg.validate().map_err(|(key, message)| ConfigError::Key {
                    origin: origin_of(&key, overrides, &file_origin),
                    key,
                    message,
                })?;
                return Ok(cfg);
            }
            Err(e) => {
                let key = e.path().to_string();
                let retry = overrides
                    .iter()
                    .enumerate()
                    .rev()
                    .find(|(i, o)| o.key == key && !as_string[*i])
                    .map(|(i, _)| i);
                match retry {
                    Some(i)
                        if !matches!(guess_value(&overrides[i].value), toml::Value::String(_)) =>
                    {
                        as_string[i] = true;
                    }
                    _ => {
                        let message = one_line(&e.into_inner().to_string());
                        return Err(ConfigError::Key {
                            origin: origin_of(&key, overrides, &file_origin),
                            key,
                            message,
                        });
                    }
                }
            }
        }
    }
}

/// toml's messages span lines (a source snippet, "in `key`"); keep the first and the last,
/// which say where and what.
fn one_line(message: &str) -> String {
    let lines: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.starts_with("in `"))
        .filter(|l| !l.chars().next().is_some_and(|c| c.is_ascii_digit()) || !l.contains(" | "))
        .collect();
    match lines.as_slice() {
        [] => message.trim().to_owned(),
        [one] => (*one).to_owned(),
        [first, .., last] => format!("{first}: {last}"),
    }
}

fn origin_of(key: &str, overrides: &[Override], file_origin: &str) -> String {
    overrides
        .iter()
        .rev()
        .find(|o| o.key == key)
        .map_or_else(|| file_origin.to_owned(), |o| o.origin.clone())
}

fn guess_value(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    match raw {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(raw.to_owned()),
    }
}

fn set_key(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    let (last, parents) = parts.split_last().ok_or("empty key")?;
    let mut t = table;
    for p in parents {
        let entry = t
            .entry((*p).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` is not a section"))?;
    }
    t.insert((*last).to_owned(), value);
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    pub(crate) fn ov(key: &str, value: &str) -> Override {
        Override::new(key, value, format!("test {key}"))
    }

    /// Loading with `overrides` fails with an error that contains every one of `needles`.
    fn refused(overrides: &[Override], needles: &[&str]) {
        let e = load(None, overrides).unwrap_err().to_string();
        for n in needles {
            assert!(e.contains(n), "{n:?} not in: {e}");
        }
    }

    #[test]
    fn auth_sections_that_cannot_work_are_refused_naming_the_key() {
        let with = |users: &str| {
            let dir = tempfile::tempdir().unwrap();
            let f = dir.path().join("c.toml");
            std::fs::write(&f, format!("[auth]\nmode = \"basic\"\n{users}")).unwrap();
            load(Some(&f), &[]).map(|c| c.auth.users.len())
        };
        let user = |name: &str, extra: &str| {
            format!("[[auth.users]]\nname = \"{name}\"\nrole = \"read\"\n{extra}\n")
        };
        let err = |r: Result<usize, ConfigError>| r.unwrap_err().to_string();
        assert!(err(with("")).contains("auth.users"));
        let hash = "password_hash = \"$argon2id$x\"";
        assert!(err(with(&user("a", ""))).contains("auth.users[0].password_hash"));
        let both = format!("{hash}\npassword_hash_file = \"f\"");
        assert!(err(with(&user("a", &both))).contains("set one of"));
        let twice = user("a", hash) + &user("a", hash);
        assert!(err(with(&twice)).contains("auth.users[1].name"));
        assert!(err(with(&user("a:b", hash))).contains("without `:`"));
        let prefix = format!("{hash}\nprefixes = [\"outputs/\"]");
        assert!(err(with(&user("a", &prefix))).contains("does not start with /"));
        assert_eq!(with(&user("a", hash)).unwrap(), 1);
        assert_eq!(load(None, &[]).unwrap().auth.mode, AuthMode::Off);
    }

    #[test]
    fn inline_bound_is_capped() {
        refused(
            &[ov("store.inline_max_bytes", "65537")],
            &["store.inline_max_bytes", "at most 65536"],
        );
        let c = load(None, &[ov("store.inline_max_bytes", "0")]).unwrap();
        assert_eq!(c.store.inline_max_bytes, 0);
        let c = load(None, &[]).unwrap();
        assert_eq!(c.store.inline_max_bytes, DEFAULT_INLINE_MAX_BYTES);
    }

    #[test]
    fn no_config_is_the_embedded_default() {
        let c = load(None, &[]).unwrap();
        assert_eq!(c.api.listen.to_string(), "127.0.0.1:9999");
        assert_eq!(c.metadata.backend, MetadataBackend::Sqlite);
        assert_eq!(c.store.backend, StoreBackend::Local);
        assert_eq!(
            c.sqlite_path(),
            PathBuf::from("s3dedup-data/metadata.sqlite3")
        );
        assert_eq!(c.local_store_path(), PathBuf::from("s3dedup-data/objects"));
        assert_eq!(
            c.lock_file_path(),
            PathBuf::from("s3dedup-data/metadata.sqlite3.locks")
        );
    }

    #[test]
    fn file_then_env_then_flags() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "data_dir = \"/srv/x\"\n[api]\nlisten = \"127.0.0.1:1\"\nmax_concurrent_requests = 7\n\
             [store]\nbackend = \"s3\"\n[store.s3]\nbucket = \"b\"\nsecret_access_key = \"hunter2\""
        )
        .unwrap();
        let env = env_overrides([
            ("S3DEDUP_API__LISTEN".to_owned(), "127.0.0.1:2".to_owned()),
            ("S3DEDUP_STORE__S3__BUCKET".to_owned(), "123".to_owned()),
            ("PATH".to_owned(), "/bin".to_owned()),
        ]);
        assert_eq!(env.len(), 2);
        let mut all = env.clone();
        all.push(ov("api.listen", "127.0.0.1:3"));
        let c = load(Some(f.path()), &all).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/srv/x"));
        assert_eq!(c.api.listen.to_string(), "127.0.0.1:3");
        assert_eq!(c.api.max_concurrent_requests, 7);
        assert_eq!(
            c.store.s3.bucket, "123",
            "numeric-looking strings stay strings"
        );
        assert!(
            !format!("{c:?}").contains("hunter2"),
            "secrets are not printed"
        );
        assert_eq!(c.store.s3.secret_access_key.0, "hunter2");
    }

    #[test]
    fn errors_name_the_key_and_origin() {
        refused(
            &[ov("api.listen", "not an address")],
            &["api.listen", "test api.listen"],
        );

        refused(
            &[ov("api.max_concurrent_requests", "many")],
            &["api.max_concurrent_requests"],
        );

        refused(&[ov("api.lisen", "x")], &["lisen"]);

        refused(&[ov("store.backend", "s3")], &["store.s3.bucket"]);

        refused(
            &[ov("api.compression_level", "12")],
            &["api.compression_level"],
        );

        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "[api\nlisten=").unwrap();
        let e = load(Some(f.path()), &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
        assert_eq!(e.to_string().lines().count(), 1, "{e}");
        let e = load(None, &[ov("api.listen", "nope")]).unwrap_err();
        assert_eq!(e.to_string().lines().count(), 1, "{e}");
        let e = load(Some(Path::new("/nonexistent/s3dedup.toml")), &[]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/s3dedup.toml"), "{e}");
        refused(&[ov("api.listen", "unix:run/api.sock")], &["absolute"]);
    }

    #[test]
    fn sources_are_parsed_with_the_configuration() {
        let cfg = load(None, &[ov("migrator.source", "v2:/srv/ft")]).unwrap();
        let want: Source = "v2:/srv/ft".parse().unwrap();
        assert_eq!(cfg.migrator.source, Some(want));
        let cfg = load(
            None,
            &[ov("migrator.source", ""), ov("api.fallback_url", "")],
        )
        .unwrap();
        assert_eq!((cfg.migrator.source, cfg.api.fallback_url), (None, None));
        refused(
            &[ov("migrator.source", "v3:/x")],
            &["migrator.source", "unknown source"],
        );
        refused(
            &[ov("api.fallback_url", "v2:/srv/ft")],
            &["api.fallback_url", "http://HOST:PORT"],
        );
        let cfg = load(None, &[ov("api.fallback_url", "http://old:9999/")]).unwrap();
        assert_eq!(cfg.api.fallback_url.unwrap().as_str(), "http://old:9999");
    }

    #[test]
    fn listen_on_a_unix_socket() {
        let c = load(None, &[ov("api.listen", "unix:/run/s3dedup/api.sock")]).unwrap();
        assert_eq!(
            c.api.listen,
            ListenAddr::Unix(PathBuf::from("/run/s3dedup/api.sock"))
        );
        assert_eq!(c.api.listen.to_string(), "unix:/run/s3dedup/api.sock");
        let c = load(None, &[ov("api.listen", "[::1]:80")]).unwrap();
        assert_eq!(c.api.listen.to_string(), "[::1]:80");
    }

    #[test]
    fn the_system_file_is_the_default_when_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let system = dir.path().join("s3dedup.toml");
        let env = |p: &Path| ProcessEnv {
            system_config: Some(p.to_owned()),
            ..ProcessEnv::default()
        };
        let (cfg, file) = load_for_program(&ConfigArgs::default(), vec![], env(&system)).unwrap();
        assert_eq!(
            file,
            ConfigFile::BuiltIn {
                looked_for: Some(system.clone())
            }
        );
        assert_eq!(cfg.data_dir, PathBuf::from("s3dedup-data"));
        assert!(file.to_string().contains("no "), "{file}");

        std::fs::write(&system, "data_dir = \"/var/lib/x\"\n").unwrap();
        let (cfg, file) = load_for_program(&ConfigArgs::default(), vec![], env(&system)).unwrap();
        assert_eq!(file, ConfigFile::System(system.clone()));
        assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/x"));
        assert!(file.to_string().contains("(the default)"), "{file}");

        // --config wins; /dev/null is the built-in defaults.
        let args = ConfigArgs {
            config: Some(PathBuf::from("/dev/null")),
            ..ConfigArgs::default()
        };
        let (cfg, file) = load_for_program(&args, vec![], env(&system)).unwrap();
        assert_eq!(file, ConfigFile::Given(PathBuf::from("/dev/null")));
        assert_eq!(cfg.data_dir, PathBuf::from("s3dedup-data"));
    }

    #[test]
    fn an_unreadable_system_file_is_an_error_not_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading it fails, as EACCES would.
        let system = dir.path().join("s3dedup.toml");
        std::fs::create_dir(&system).unwrap();
        let env = ProcessEnv {
            system_config: Some(system.clone()),
            ..ProcessEnv::default()
        };
        let e = load_for_program(&ConfigArgs::default(), vec![], env).unwrap_err();
        assert!(e.to_string().contains(&*system.to_string_lossy()), "{e}");
    }
}
