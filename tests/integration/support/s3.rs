//! Real S3 server processes: the workspace's s3s-fs test server and moto from the test venv.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::*;

/// Credentials the S3 test server accepts.
pub const S3_ACCESS_KEY: &str = "test-access-key";
pub const S3_SECRET_KEY: &str = "test-secret-key";
pub const S3_BUCKET: &str = "s3dedup-test";

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
