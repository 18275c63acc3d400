//! A running `s3dedup-api` and what the suites ask of it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::*;

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
        backend: Backend<'_>, env: &[(impl AsRef<str>, impl AsRef<str>)],
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
        addr: SocketAddr, data_dir: &Path, log: &Path, env: &[(String, String)],
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

    /// The cleaner, sweeping for orphans every run (not once a day): the races of the sweep
    /// with uploads (an object is written before its row) are what the loops are for.
    pub fn cleaner_sweeping(&self) -> Command {
        let mut c = self.sibling("s3dedup-cleaner");
        c.env("S3DEDUP_CLEANER__ORPHAN_SWEEP_INTERVAL_SECS", "0");
        c
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

    /// [`Api::restart`] with `key` set to `value` in its (and its siblings') environment.
    pub fn restart_setting(&mut self, key: &str, value: &str) -> anyhow::Result<()> {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
        self.restart()
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

    /// A Filetracker client for this instance.
    pub fn ft(&self) -> Ft {
        Ft::new(format!("http://{}", self.addr))
    }

    /// Runs `s3dedup-cleaner ARGS` on this instance's store; panics unless it exits 0. Returns
    /// what it printed.
    pub fn run_cleaner(&self, args: &[&str]) -> String {
        let out = self
            .cleaner_sweeping()
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
        let text = self.ft().metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    }

    /// Distinct contents stored: live blob rows, whether the row keeps the content or it is
    /// an object (SQLite metadata).
    pub fn stored_contents(&self) -> usize {
        let db = self.data_dir.join("metadata.sqlite3");
        let conn =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap_or_else(|e| panic!("opening {}: {e}", db.display()));
        conn.query_row("SELECT COUNT(*) FROM blobs WHERE state = 'live'", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap_or_else(|e| panic!("counting blobs in {}: {e}", db.display())) as usize
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
