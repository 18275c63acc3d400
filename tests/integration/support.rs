//! Helpers for suites that drive the real binaries: start an S3 server process and `s3dedup-api`
//! on free loopback ports with private directories, talk HTTP to them, look into their stores,
//! and read their memory high-water mark. Every process is killed when its handle drops.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod fault_proxy;
pub mod ledger;
pub mod stall_proxy;
use sha2::Digest as _;

/// Credentials the S3 test server accepts.
pub const S3_ACCESS_KEY: &str = "test-access-key";
pub const S3_SECRET_KEY: &str = "test-secret-key";
pub const S3_BUCKET: &str = "s3dedup-test";

/// Where cargo put the workspace binaries (next to this test's `deps/` directory), or
/// `TESTS_BIN_DIR` (binaries of another build, run as they are: an earlier commit's, say).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TESTS_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_owned()
}

/// A workspace binary, as the current sources build it: the first call in a test process runs
/// `cargo build --workspace --bins` (a second or so when nothing changed), so a suite never
/// tests what an earlier edit left in `target/`. With `TESTS_BIN_DIR` set, its binaries are run
/// as they are (an earlier commit's, to check that a test fails without a fix).
pub fn bin(name: &str) -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    if std::env::var_os("TESTS_BIN_DIR").is_none() {
        BUILD.call_once(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--quiet", "--workspace", "--bins", "--locked"])
                .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
                .status()
                .expect("cargo runs");
            assert!(status.success(), "cargo build --workspace --bins failed");
        });
    }
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} is missing", p.display());
    p
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A child process that is killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal and waits for the exit status.
    pub fn signal_and_wait(&mut self, sig: &str) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status();
        self.child.wait().expect("wait")
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A real S3 server process (s3s-fs) with one bucket.
pub struct S3Server {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub root: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl S3Server {
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().to_owned();
        let mut s = Self::start_at(&root, "127.0.0.1:0")?;
        s._dir = Some(dir);
        Ok(s)
    }

    /// Starts (or restarts) a server on `root` at `listen`.
    pub fn start_at(root: &Path, listen: &str) -> anyhow::Result<Self> {
        let child = Command::new(bin("s3-test-server"))
            .args(["--listen", listen, "--bucket", S3_BUCKET])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(root)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting s3-test-server")?;
        // Owned by a Proc at once, so a failure below kills it instead of leaking it.
        let mut proc = Proc {
            child,
            name: "s3-test-server".into(),
        };
        let mut line = String::new();
        let stdout = proc.child.stdout.take().context("stdout")?;
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected s3-test-server output {line:?}"))?
            .parse()?;
        Ok(S3Server {
            proc,
            addr,
            root: root.to_owned(),
            _dir: None,
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server, keeping its data.
    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// Starts it again on the same address and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Self::start_at(&self.root, &self.addr.to_string()) {
                Ok(mut s) => {
                    std::mem::swap(&mut self.proc, &mut s.proc);
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Keys of all objects in the bucket, through the S3 API.
    pub async fn list_keys(&self) -> anyhow::Result<Vec<String>> {
        let client = self.client();
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let out = client
                .list_objects_v2()
                .bucket(S3_BUCKET)
                .set_continuation_token(token)
                .send()
                .await?;
            keys.extend(
                out.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
            token = out.next_continuation_token().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
        Ok(keys)
    }

    pub fn client(&self) -> aws_sdk_s3::Client {
        s3_client(&self.endpoint())
    }

    /// Files of writes in progress, read from the server's directory: multipart uploads neither
    /// completed nor aborted (this server does not implement ListMultipartUploads), and PUTs
    /// whose body is still arriving.
    pub fn unfinished_writes(&self) -> Vec<PathBuf> {
        walk(&self.root)
            .into_iter()
            .filter(|p| {
                p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with(".upload") || n.starts_with(".tmp.")
                })
            })
            .collect()
    }

    /// Puts bytes at `key` behind s3dedup's back (foreign keys, another deployment's objects).
    pub async fn put_raw(&self, key: &str, body: Vec<u8>) {
        self.client()
            .put_object()
            .bucket(S3_BUCKET)
            .key(key)
            .body(body.into())
            .send()
            .await
            .unwrap_or_else(|e| panic!("putting {key}: {e}"));
    }
}

/// A program of the test venv (`TESTS_VENV`, else `target/test-venv`), which tests/run-all.sh
/// fills: the real Filetracker client and old server, and moto.
pub fn venv_bin(program: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv =
        std::env::var("TESTS_VENV").map_or_else(|_| root.join("target/test-venv"), PathBuf::from);
    venv.join("bin").join(program)
}

/// A moto S3 server process (PyPI `moto[server]`, from the test venv): a second S3
/// implementation, with the calls s3s-fs lacks (it answers `ListMultipartUploads` with 501).
/// It accepts any credentials and keeps everything in memory.
pub struct Moto {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Moto {
    /// Starts it with the test bucket created.
    pub async fn start() -> anyhow::Result<Self> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let program = venv_bin("moto_server");
        let child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &addr.port().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (tests/run-all.sh installs it)",
                    program.display()
                )
            })?;
        let mut moto = Moto {
            proc: Proc {
                child,
                name: "moto_server".into(),
            },
            addr,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(addr).is_err() {
            if let Some(status) = moto.proc.child.try_wait()? {
                bail!("moto_server exited at start: {status}");
            }
            if Instant::now() > deadline {
                bail!("moto_server did not listen on {addr} within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        moto.client()
            .create_bucket()
            .bucket(S3_BUCKET)
            .send()
            .await
            .context("creating the bucket in moto")?;
        Ok(moto)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn client(&self) -> aws_sdk_s3::Client {
        s3_client(&self.endpoint())
    }

    /// The `S3DEDUP_*` settings that point an instance at it, under `prefix`.
    pub fn env(&self, prefix: &str) -> Vec<(&'static str, String)> {
        vec![
            ("S3DEDUP_STORE__BACKEND", "s3".into()),
            ("S3DEDUP_STORE__S3__BUCKET", S3_BUCKET.into()),
            ("S3DEDUP_STORE__S3__ENDPOINT", self.endpoint()),
            ("S3DEDUP_STORE__S3__ACCESS_KEY_ID", S3_ACCESS_KEY.into()),
            ("S3DEDUP_STORE__S3__SECRET_ACCESS_KEY", S3_SECRET_KEY.into()),
            ("S3DEDUP_STORE__S3__PREFIX", prefix.into()),
        ]
    }
}

/// Where the object of the content with this hex SHA-256 lives: upstream s3dedup's layout,
/// written out here (not taken from `common`) because ours must match it.
pub fn sharded_key(hex: &str) -> String {
    format!("{}/{}/{hex}", &hex[..2], &hex[2..4])
}

/// An S3 client for the test server at `endpoint`, without extra checksums.
pub fn s3_client(endpoint: &str) -> aws_sdk_s3::Client {
    use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
    let cfg = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            S3_ACCESS_KEY,
            S3_SECRET_KEY,
            None,
            None,
            "test",
        ))
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    aws_sdk_s3::Client::from_conf(cfg)
}

/// Which object store an API instance uses.
pub enum Backend<'a> {
    Local,
    S3(&'a S3Server),
}

/// A running `s3dedup-api`.
pub struct Api {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub stderr_log: PathBuf,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Api {
    pub fn start(backend: Backend<'_>) -> anyhow::Result<Self> {
        Self::start_with(backend, &[] as &[(&str, &str)])
    }

    /// Starts the API with extra `S3DEDUP_*` environment overrides (borrowed or owned strings).
    pub fn start_with(
        backend: Backend<'_>,
        env: &[(impl AsRef<str>, impl AsRef<str>)],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut all: Vec<(String, String)> = vec![("RUST_LOG".into(), "warn".into())];
        if let Backend::S3(s3) = backend {
            for (k, v) in [
                ("S3DEDUP_STORE__BACKEND", "s3".to_owned()),
                ("S3DEDUP_STORE__S3__BUCKET", S3_BUCKET.to_owned()),
                ("S3DEDUP_STORE__S3__ENDPOINT", s3.endpoint()),
                ("S3DEDUP_STORE__S3__ACCESS_KEY_ID", S3_ACCESS_KEY.to_owned()),
                (
                    "S3DEDUP_STORE__S3__SECRET_ACCESS_KEY",
                    S3_SECRET_KEY.to_owned(),
                ),
            ] {
                all.push((k.into(), v));
            }
        }
        all.extend(
            env.iter()
                .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned())),
        );
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let data_dir = dir.path().join("data");
        let stderr_log = dir.path().join("api.log");
        let proc = Self::spawn(addr, &data_dir, &stderr_log, &all)?;
        let mut api = Api {
            proc,
            addr,
            data_dir,
            stderr_log,
            env: all,
            _dir: dir,
        };
        api.wait_ready()?;
        Ok(api)
    }

    fn spawn(
        addr: SocketAddr,
        data_dir: &Path,
        log: &Path,
        env: &[(String, String)],
    ) -> anyhow::Result<Proc> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(bin("s3dedup-api"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting s3dedup-api")?;
        Ok(Proc {
            child,
            name: "s3dedup-api".into(),
        })
    }

    /// A command for another program (`s3dedup-cleaner`, ...) configured like this instance.
    pub fn sibling(&self, program: &str) -> Command {
        let mut cmd = Command::new(bin(program));
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("S3DEDUP_")) {
            cmd.env_remove(k);
        }
        cmd.arg("--data-dir")
            .arg(&self.data_dir)
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Starts the process again (after it exited or was killed) on the same port and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill();
        self.proc = Self::spawn(self.addr, &self.data_dir, &self.stderr_log, &self.env)?;
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                bail!("s3dedup-api exited with {status}: {}", self.log());
            }
            if let Ok(r) = raw_request(
                self.addr,
                b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            ) && r.starts_with("HTTP/1.1 200")
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("s3dedup-api did not answer within 30 s: {}", self.log())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// PUTs `body` as is at `path` (`/…`) with version `version`; panics unless it gets a 200.
    pub async fn put_ok(&self, path: &str, version: i64, body: Vec<u8>) {
        let r = reqwest::Client::new()
            .put(self.url(&format!("/files{path}?last_modified={}", lm(version))))
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT {path}: {e}"));
        assert_eq!(r.status(), reqwest::StatusCode::OK, "PUT {path}");
    }

    /// GETs `path` uncompressed (`Accept-Encoding: identity`): the status and the body.
    pub async fn get_identity(&self, path: &str) -> (reqwest::StatusCode, Vec<u8>) {
        let r = reqwest::Client::new()
            .get(self.url(&format!("/files{path}")))
            .header("Accept-Encoding", "identity")
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = r.status();
        (status, r.bytes().await.expect("body").to_vec())
    }

    /// Runs `s3dedup-cleaner ARGS` on this instance's store; panics unless it exits 0. Returns
    /// what it printed.
    fn run_cleaner(&self, args: &[&str]) -> String {
        let out = self
            .sibling("s3dedup-cleaner")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("s3dedup-cleaner runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "cleaner {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// Collects garbage with no grace period, then [`Api::verify_deep`]; panics on any problem.
    pub fn collect_and_verify(&self) {
        self.run_cleaner(&["--grace-secs", "0"]);
        self.verify_deep();
    }

    /// Runs `s3dedup-cleaner --verify --deep` on this instance's store; panics unless it exits 0
    /// reporting 0 problems.
    pub fn verify_deep(&self) {
        let text = self.run_cleaner(&["--verify", "--deep"]);
        assert!(text.contains(" 0 problems"), "{text}");
        eprintln!("{}", text.trim());
    }

    /// One unlabelled value from `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    }

    /// Files in the local object store (`Backend::Local`).
    pub fn local_objects(&self) -> Vec<PathBuf> {
        walk(&self.data_dir.join("objects"))
    }

    /// Files left in the upload spool.
    pub fn spool_files(&self) -> Vec<PathBuf> {
        walk(&self.data_dir.join("spool"))
    }
}

/// All regular files below `dir`.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Sends raw bytes and reads the whole answer (the request should say `Connection: close`).
pub fn raw_request(addr: SocketAddr, request: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(request)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(9));
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

pub fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

/// Unique content for this run (both servers deduplicate; tests must not collide).
pub fn unique_content(tag: &str, len: usize) -> Vec<u8> {
    let seed = format!("{tag}-{}-{:?}", std::process::id(), Instant::now());
    let mut out = Vec::with_capacity(len + 64);
    let mut block = sha2::Sha256::digest(seed.as_bytes()).to_vec();
    while out.len() < len {
        out.extend_from_slice(hex::encode(&block).as_bytes());
        block = sha2::Sha256::digest(&block).to_vec();
    }
    out.truncate(len);
    out
}

/// The PostgreSQL that `pg_virtualenv` provides (tests/run-all.sh), as a libpq conninfo string.
pub fn pg_conninfo() -> String {
    let (host, port) = pg_host_port();
    pg_conninfo_at(&host, port)
}

/// The test server's host and port (pg_virtualenv's `PGHOST`, `PGPORT`).
pub fn pg_host_port() -> (String, u16) {
    assert!(
        std::env::var("PGHOST").is_ok(),
        "PostgreSQL suites need PGHOST etc.: run them through tests/run-all.sh (pg_virtualenv)"
    );
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let port = var("PGPORT", "5432").parse().expect("PGPORT is a port");
    (var("PGHOST", "localhost"), port)
}

/// A conninfo string for the test server's database and user, reached at `host:port` (a proxy).
pub fn pg_conninfo_at(host: &str, port: u16) -> String {
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    format!(
        "host={host} port={port} user={} password={} dbname={}",
        var("PGUSER", "postgres"),
        var("PGPASSWORD", ""),
        var("PGDATABASE", "postgres"),
    )
}

/// A result line for the people reading the test run: printed to stderr and, when `TESTS_REPORT`
/// names a file (tests/run-all.sh sets it), appended there so the run's summary shows it even
/// though cargo hides a passing test's output.
pub fn report(line: &str) {
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("TESTS_REPORT") {
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            eprintln!("cannot append to {}: {e}", Path::new(&path).display());
        }
    }
}

/// A schema name no other test uses.
pub fn unique_schema(tag: &str) -> String {
    format!("{tag}_{}_{}", std::process::id(), rand::random::<u32>())
}

/// A client of the test server for what an administrator (or a failover) does behind the
/// programs' backs.
pub async fn pg_admin() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&pg_conninfo(), tokio_postgres::NoTls)
        .await
        .expect("connect to the test PostgreSQL");
    tokio::spawn(connection);
    client
}

/// Ends the PostgreSQL session holding the advisory lock `name` of the deployment in `schema`
/// (as `pg_terminate_backend` does in a failover or by hand); returns how many sessions it
/// ended.
pub async fn terminate_lock_holder(schema: &str, name: &str) -> i64 {
    let key = s3dedup_common::locks::PgLocks::new(pg_conninfo().parse().expect("conninfo"), 1)
        .in_schema(schema)
        .key(name);
    pg_admin()
        .await
        .query_one(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory'
                AND granted AND classid::bigint = $1 AND objid::bigint = $2",
            &[&((key >> 32) as i64), &((key & 0xffff_ffff) as i64)],
        )
        .await
        .expect("terminate the lock's session")
        .get(0)
}

/// The name of the lock of the blob holding `content`.
pub fn blob_lock_of(content: &[u8]) -> String {
    format!("blob:{}", sha256_hex(content))
}

/// Environment that points `s3dedup-api` at PostgreSQL metadata and advisory locks.
pub fn pg_env(schema: &str) -> Vec<(String, String)> {
    vec![
        ("S3DEDUP_METADATA__BACKEND".into(), "postgres".into()),
        ("S3DEDUP_METADATA__POSTGRES__URL".into(), pg_conninfo()),
        ("S3DEDUP_METADATA__POSTGRES__SCHEMA".into(), schema.into()),
        ("S3DEDUP_LOCKS__BACKEND".into(), "postgres".into()),
    ]
}

/// The metadata store an API with `pg_env(schema)` uses, opened from the test to check it.
pub async fn pg_meta(schema: &str) -> s3dedup_common::meta::PostgresMeta {
    let cfg = s3dedup_common::config::PostgresConfig {
        url: pg_conninfo(),
        schema: schema.into(),
        pool_size: 2,
        ..Default::default()
    };
    s3dedup_common::meta::PostgresMeta::connect(&cfg, None)
        .await
        .expect("connect to the test PostgreSQL")
}

/// `last_modified` query value for a version, form-encoded the way the real client does
/// (`email.utils.formatdate`, a `-0000` zone).
pub fn lm(version: i64) -> String {
    let date = chrono::DateTime::from_timestamp(version, 0)
        .expect("version in range")
        .format("%a, %d %b %Y %H:%M:%S -0000")
        .to_string();
    date.replace(' ', "+")
        .replace(',', "%2C")
        .replace(':', "%3A")
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_dates_like_python() {
        // email.utils.formatdate(1700000000) == 'Tue, 14 Nov 2023 22:13:20 -0000'
        assert_eq!(
            super::lm(1_700_000_000),
            "Tue%2C+14+Nov+2023+22%3A13%3A20+-0000"
        );
    }
}

/// A concurrent mixed workload (PUT raw and gzip, GET, DELETE) over a few paths and contents,
/// with versions that climb, collide and lag, spread over several API instances.
pub struct Workload {
    pub clients: usize,
    pub ops: usize,
    pub paths: usize,
    pub contents: Vec<Vec<u8>>,
    pub prefix: String,
}

/// What the workload saw acknowledged.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Per path: (version, content index) of PUTs answered with their own version (stored).
    pub stored: std::collections::HashMap<usize, Vec<(i64, usize)>>,
    /// Per path: versions of DELETEs that deleted (200 without a newer version).
    pub deleted: std::collections::HashMap<usize, Vec<i64>>,
    /// 5xx answers and failed requests.
    pub server_errors: Vec<String>,
    pub ops: usize,
}

/// An answer's status and error message (`X-Exception`, empty if none).
fn answer(r: &reqwest::Response) -> (reqwest::StatusCode, String) {
    let why = r
        .headers()
        .get("x-exception")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    (r.status(), why.to_owned())
}

fn version_of(r: &reqwest::Response) -> Option<i64> {
    let h = r.headers().get("last-modified")?.to_str().ok()?;
    chrono::DateTime::parse_from_rfc2822(h)
        .ok()
        .map(|d| d.timestamp())
}

impl Workload {
    pub fn new(tag: &str, clients: usize, ops: usize, paths: usize) -> Self {
        Workload {
            clients,
            ops,
            paths,
            contents: (0..6)
                .map(|i| unique_content(&format!("{tag}{i}"), 2_000 + i * 5_000))
                .collect(),
            prefix: format!("/{tag}"),
        }
    }

    /// Draws from `n` small contents instead of six: with few references each, contents keep
    /// becoming garbage and coming back, and a cleaner at grace 0 deletes them all the time.
    pub fn churning(mut self, n: usize) -> Self {
        self.contents = (0..n)
            .map(|i| unique_content(&format!("{}-churn{i}", self.prefix), 500 + (i * 37) % 3000))
            .collect();
        self
    }

    fn digests(&self) -> std::collections::HashMap<String, usize> {
        self.contents
            .iter()
            .enumerate()
            .map(|(i, c)| (sha256_hex(c), i))
            .collect()
    }

    /// Runs every client to completion; any 5xx or failed request is recorded.
    pub async fn run(&self, urls: &[String]) -> Outcome {
        use rand::{Rng, SeedableRng};
        let record = std::sync::Arc::new(std::sync::Mutex::new(Outcome::default()));
        let contents = std::sync::Arc::new(self.contents.clone());
        let digests = std::sync::Arc::new(self.digests());
        // A connection left idle past the server's header timeout (60 s) is closed by the
        // server, and one reused just as that happens fails: keep idle ones for less.
        let http = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(20))
            .build()
            .expect("HTTP client");
        let mut tasks = Vec::new();
        for client in 0..self.clients {
            let (contents, digests, record, http) = (
                contents.clone(),
                digests.clone(),
                record.clone(),
                http.clone(),
            );
            let (urls, ops, paths, prefix) =
                (urls.to_vec(), self.ops, self.paths, self.prefix.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
                for op in 0..ops {
                    let base = &urls[(client + op) % urls.len()];
                    let p = rng.random_range(0..paths);
                    // Versions climb as the run goes on; neighbours collide (equal) or lag.
                    let v = op as i64 / 3 + rng.random_range(0..3);
                    let kind = rng.random_range(0..100);
                    let url = format!("{base}/files{prefix}/{p}?last_modified={}", lm(v));
                    let result = if kind < 60 {
                        let c = rng.random_range(0..contents.len());
                        let req = http.put(&url);
                        let req = if rng.random_bool(0.5) {
                            req.header("Content-Encoding", "gzip")
                                .header("SHA256-Checksum", sha256_hex(&contents[c]))
                                .body(gzip(&contents[c]))
                        } else {
                            req.body(contents[c].clone())
                        };
                        req.send().await.map(|r| {
                            if r.status() == reqwest::StatusCode::OK && version_of(&r) == Some(v) {
                                record
                                    .lock()
                                    .unwrap()
                                    .stored
                                    .entry(p)
                                    .or_default()
                                    .push((v, c));
                            }
                            answer(&r)
                        })
                    } else if kind < 85 {
                        let get = format!("{base}/files{prefix}/{p}");
                        let result = match http.get(&get).send().await {
                            Ok(r) if r.status() == reqwest::StatusCode::OK => {
                                let body = gunzip(&r.bytes().await.unwrap());
                                assert!(
                                    digests.contains_key(&sha256_hex(&body)),
                                    "GET returned unknown content"
                                );
                                Ok((reqwest::StatusCode::OK, String::new()))
                            }
                            other => other.map(|r| answer(&r)),
                        };
                        result.map(|(s, why)| (s, format!("GET: {why}")))
                    } else {
                        http.delete(&url).send().await.map(|r| {
                            if r.status() == reqwest::StatusCode::OK && version_of(&r).is_none() {
                                record.lock().unwrap().deleted.entry(p).or_default().push(v);
                            }
                            answer(&r)
                        })
                    };
                    let mut rec = record.lock().unwrap();
                    rec.ops += 1;
                    match result {
                        Ok((s, why)) if s.is_server_error() => {
                            rec.server_errors.push(format!("{url}: {s}: {why}"))
                        }
                        Ok(_) => {}
                        Err(e) => rec.server_errors.push(format!("{url}: {e:?}")),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("client task");
        }
        let outcome = std::mem::take(&mut *record.lock().unwrap());
        let puts: usize = outcome.stored.values().map(Vec::len).sum();
        let dels: usize = outcome.deleted.values().map(Vec::len).sum();
        eprintln!(
            "{} operations: {puts} stored PUTs, {dels} deleting DELETEs, {} failures",
            outcome.ops,
            outcome.server_errors.len()
        );
        outcome
    }

    /// No request failed, and each path (read through every instance) holds an acknowledged
    /// (version, content); nothing acknowledged at a higher version was lost unless a DELETE
    /// at or above that version was acknowledged.
    pub async fn check_final(&self, outcome: &Outcome, urls: &[String]) {
        assert!(
            outcome.server_errors.is_empty(),
            "5xx or failures: {:#?}",
            outcome.server_errors
        );
        assert_eq!(outcome.ops, self.clients * self.ops);
        let digests = self.digests();
        let http = reqwest::Client::new();
        for p in 0..self.paths {
            let stored = outcome.stored.get(&p).cloned().unwrap_or_default();
            let max_put = stored.iter().map(|(v, _)| *v).max();
            let max_del = outcome
                .deleted
                .get(&p)
                .and_then(|d| d.iter().copied().max());
            let deleted_above_max = matches!((max_put, max_del), (Some(m), Some(d)) if d >= m);
            for base in urls {
                let r = http
                    .get(format!("{base}/files{}/{p}", self.prefix))
                    .send()
                    .await
                    .unwrap();
                if r.status() == reqwest::StatusCode::NOT_FOUND {
                    assert!(
                        max_put.is_none() || deleted_above_max,
                        "path {p} lost version {max_put:?}"
                    );
                    continue;
                }
                assert_eq!(r.status(), reqwest::StatusCode::OK, "path {p}");
                let v = version_of(&r).expect("Last-Modified");
                let c = digests[&sha256_hex(&gunzip(&r.bytes().await.unwrap()))];
                assert!(
                    stored.contains(&(v, c)),
                    "path {p}: ({v}, content {c}) was never acknowledged"
                );
                assert!(
                    Some(v) == max_put || deleted_above_max,
                    "path {p}: {v} but {max_put:?} was acknowledged"
                );
            }
        }
    }
}
