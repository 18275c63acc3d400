"""Fixtures for the suite that drives s3dedup-api with the real Filetracker client (PyPI
`filetracker==2.3.3`): the real binary on the local directory store and on a real S3 server."""

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("TESTS_BIN_DIR", ROOT / "target" / "debug"))
S3_BUCKET = "s3dedup-test"
S3_KEY, S3_SECRET = "test-access-key", "test-secret-key"
DIGEST = re.compile(r"^[0-9a-f]{64}$")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, proc, what, context=None):
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            if e.code == 401:  # answering, with its status endpoints closed to strangers
                return
            time.sleep(0.05)
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer {url}")



def stored_contents(data_dir):
    """Distinct contents a store on SQLite holds: its live blob rows, whether a content is an
    object or kept in the database (small ones are)."""
    import sqlite3
    db = sqlite3.connect(f"file:{Path(data_dir) / 'metadata.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM blobs WHERE state = 'live'").fetchone()[0]
    finally:
        db.close()

class Server:
    """A running s3dedup-api and a way to look into its object store directly."""

    def __init__(self, backend, tmp, config=None, tls_context=None):
        self.backend = backend
        self.tmp = Path(tmp)
        self.config = config
        self.tls_context = tls_context  # serves HTTPS, trusted through this ssl context
        self.procs = []
        self.log = None
        try:
            self._start()
        except BaseException:
            self.stop()  # no teardown runs for a fixture that failed: end what we started
            raise

    def _start(self):
        backend = self.backend
        # Hermetic: no configuration or systemd variables leak in from the caller.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("S3DEDUP_")
               and k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "LISTEN_FDS")}
        env["RUST_LOG"] = "warn"
        if backend == "s3":
            self.s3_root = self.tmp / "s3"
            s3 = subprocess.Popen(
                [BIN_DIR / "s3-test-server", "--bucket", S3_BUCKET, self.s3_root],
                stdout=subprocess.PIPE, text=True)
            self.procs.append(s3)
            addr = s3.stdout.readline().strip().removeprefix("listening on ")
            env.update(
                S3DEDUP_STORE__BACKEND="s3",
                S3DEDUP_STORE__S3__BUCKET=S3_BUCKET,
                S3DEDUP_STORE__S3__ENDPOINT=f"http://{addr}",
                S3DEDUP_STORE__S3__ACCESS_KEY_ID=S3_KEY,
                S3DEDUP_STORE__S3__SECRET_ACCESS_KEY=S3_SECRET,
            )
        self.port = free_port()
        scheme = "https" if self.tls_context else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.data_dir = self.tmp / "data"
        self.log = open(self.tmp / "api.log", "w")
        # An own configuration file, or the built-in defaults (never the system's file).
        self.config_file = self.tmp / "s3dedup.toml"
        self.config_file.write_text(self.config or "")
        api = subprocess.Popen(
            [BIN_DIR / "s3dedup-api", "--listen", f"127.0.0.1:{self.port}",
             "--data-dir", self.data_dir, "--config", self.config_file],
            env=env, stdout=subprocess.DEVNULL, stderr=self.log)
        self.procs.append(api)
        self.api = api
        wait_http(self.url + "/status", api, "s3dedup-api", self.tls_context)

    def objects(self):
        """Digest-named objects in the store, found by walking its files (not via the API)."""
        root = self.s3_root / S3_BUCKET if self.backend == "s3" else self.data_dir / "objects"
        return sorted(p.name for p in root.rglob("*") if p.is_file() and DIGEST.match(p.name))

    def stop(self):
        for p in reversed(self.procs):
            p.kill()
            p.wait()
        if self.log:
            self.log.close()


@pytest.fixture(scope="module", params=["local", "s3"])
def server(request):
    tmp = tempfile.mkdtemp(prefix="s3dedup-client-")
    srv = Server(request.param, tmp)
    yield srv
    srv.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def client(server):
    from filetracker.client import Client
    return Client(remote_url=server.url, local_store=None)
