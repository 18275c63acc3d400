"""[auth] as OIOIOI and sioworkers would use it: the real Filetracker client with the user and
password in its URL (it sends them as HTTP Basic on every request), roles, prefixes, reload."""

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
import uuid

import pytest
from filetracker.client import Client, FiletrackerError

from conftest import BIN_DIR, Server
from test_client import unique, write

PASSWORDS = {"oioioi": "admin-pw", "worker": "worker-pw", "sio": "sio:pw", "late": "late-pw"}


def hash_of(password):
    out = subprocess.run([BIN_DIR / "s3dedup-api", "--hash-password"], input=password + "\n",
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("$argon2id$"), out
    return out.stdout.strip()


HASHES = {}


def config(users, extra=""):
    """An [auth] section with `users`: (name, role, prefixes)."""
    text = f'[auth]\nmode = "basic"\n{extra}\n'
    for name, role, prefixes in users:
        if name not in HASHES:
            HASHES[name] = hash_of(PASSWORDS[name])
        text += (f'[[auth.users]]\nname = "{name}"\nrole = "{role}"\n'
                 f'password_hash = "{HASHES[name]}"\nprefixes = {prefixes!r}\n'.replace("'", '"'))
    return text


USERS = [("oioioi", "admin", []), ("worker", "read", []), ("sio", "write", ["/outputs/"])]


@pytest.fixture(scope="module")
def server():
    tmp = tempfile.mkdtemp(prefix="s3dedup-auth-")
    srv = Server("local", tmp, config=config(USERS))
    yield srv
    srv.stop()
    shutil.rmtree(tmp, ignore_errors=True)


def as_user(server, name, password=None):
    password = PASSWORDS[name] if password is None else password
    url = server.url.replace("http://", f"http://{name}:{password}@")
    return Client(remote_url=url, local_store=None)


def status_of(url, user=None, password=None):
    req = urllib.request.Request(url)
    if user:
        import base64
        req.add_header("Authorization", "Basic " + base64.b64encode(
            f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.headers


def test_a_read_only_worker_gets_and_lists_but_cannot_put_or_delete(server, tmp_path):
    root = f"/tests/{uuid.uuid4().hex[:8]}"
    data = unique("auth-read")
    name = as_user(server, "oioioi").put_file(f"{root}/in", write(tmp_path, data))
    worker = as_user(server, "worker")
    stream, got = worker.get_stream(f"{root}/in")
    assert stream.read() == data and got == name
    assert worker.list_remote_files(None, root, False) == ["in"]
    with pytest.raises(FiletrackerError, match="user worker \\(role read\\) may not write"):
        worker.put_file(f"{root}/out", write(tmp_path, b"nope"))
    with pytest.raises(FiletrackerError, match="may not delete"):
        worker.delete_file(name)
    # Nothing changed: the admin still sees the one file, as it was.
    assert as_user(server, "oioioi").list_remote_files(None, root, False) == ["in"]


def test_a_prefix_limited_principal_writes_only_within_its_prefix(server, tmp_path):
    sio = as_user(server, "sio")  # a password with a colon in it
    out = f"/outputs/{uuid.uuid4().hex[:8]}/out"
    name = sio.put_file(out, write(tmp_path, unique("auth-prefix")))
    assert sio.file_size(name) == 10_000
    with pytest.raises(FiletrackerError, match="limited to /outputs/"):
        sio.put_file(f"/tests/{uuid.uuid4().hex[:8]}", write(tmp_path, b"x"))
    with pytest.raises(FiletrackerError, match="limited to /outputs/"):
        sio.get_stream(f"/outputsX/{uuid.uuid4().hex[:8]}")
    with pytest.raises(FiletrackerError, match="may not delete"):
        sio.delete_file(name)


def test_wrong_or_missing_credentials_are_401_with_a_challenge(server, tmp_path):
    with pytest.raises(FiletrackerError, match="wrong user name or password"):
        as_user(server, "worker", "not-it").get_stream("/tests/anything")
    with pytest.raises(FiletrackerError, match="wrong user name or password"):
        as_user(server, "nobody", "worker-pw").list_remote_files(None, "/", False)
    with pytest.raises(FiletrackerError, match="authentication required"):
        Client(remote_url=server.url, local_store=None).put_file(
            "/tests/anon", write(tmp_path, b"anonymous"))
    status, headers = status_of(server.url + "/files/tests/anon")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic realm=")
    # The status endpoints stay open (auth.public_status), and count the failures.
    status, _ = status_of(server.url + "/status")
    assert status == 200
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert 's3dedup_auth_failures_total{reason="wrong"} 2' in metrics, metrics
    assert 's3dedup_auth_failures_total{reason="missing"} 2' in metrics, metrics


def test_reload_adds_a_user_without_dropping_a_request(server, tmp_path):
    late = as_user(server, "late")
    with pytest.raises(FiletrackerError, match="wrong user name or password"):
        late.list_remote_files(None, "/outputs", False)
    # A client keeps putting and getting through the reload.
    stop, failures, done = threading.Event(), [], [0]
    admin = as_user(server, "oioioi")

    def busy():
        path = write(tmp_path, unique("auth-reload", 200_000))
        while not stop.is_set():
            try:
                name = admin.put_file(f"/reload/{uuid.uuid4().hex}", path)
                admin.get_stream(name)[0].read()
                done[0] += 1
            except Exception as e:  # noqa: BLE001 - every failure counts
                failures.append(repr(e))

    t = threading.Thread(target=busy)
    t.start()
    try:
        server.config_file.write_text(config(USERS + [("late", "read", ["/outputs/"])]))
        before = done[0]
        os.kill(server.api.pid, signal.SIGHUP)
        deadline = 100
        while deadline:
            try:
                late.list_remote_files(None, "/outputs", False)
                break
            except FiletrackerError:
                deadline -= 1
                threading.Event().wait(0.1)
        assert deadline, "the new user was never accepted"
        threading.Event().wait(0.5)
    finally:
        stop.set()
        t.join()
    assert failures == [] and done[0] > before, (failures, done)
    assert server.api.poll() is None, "the daemon still runs (SIGHUP did not end it)"
    with pytest.raises(FiletrackerError, match="may not write"):
        late.put_file("/outputs/late", write(tmp_path, b"read only"))
    # A broken file on reload keeps the users in force.
    server.config_file.write_text('[auth]\nmode = "basic"\n')
    os.kill(server.api.pid, signal.SIGHUP)
    threading.Event().wait(0.5)
    assert late.list_remote_files(None, "/outputs", False) is not None
    assert "reload on SIGHUP failed" in (server.tmp / "api.log").read_text()


def test_an_address_that_keeps_failing_gets_429_but_known_users_go_on(tmp_path):
    srv = Server("local", tmp_path,
                 config=config(USERS, extra="max_failures_per_minute = 5"))
    try:
        oioioi = as_user(srv, "oioioi")
        oioioi.list_remote_files(None, "/", False)  # verified once before the attack
        url = srv.url + "/files/x"
        codes = [status_of(url, "worker", f"guess{i}")[0] for i in range(8)]
        assert codes == [401] * 5 + [429] * 3, codes
        status, headers = status_of(url, "worker", "worker-pw")
        assert status == 429 and headers["Retry-After"] == "60", "even the right one waits"
        assert oioioi.list_remote_files(None, "/", False) == []
        with urllib.request.urlopen(srv.url + "/metrics", timeout=10) as r:
            assert "s3dedup_auth_limited_total 4" in r.read().decode()
    finally:
        srv.stop()


def test_a_refused_upload_is_answered_before_its_body(server):
    """`Expect: 100-continue` without credentials: a 401 at once, no 100, no body read."""
    import socket
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"PUT /files/tests/expect?last_modified=Tue,+14+Nov+2023+22:13:20+GMT "
                  b"HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 401"), head
    assert b"100 Continue" not in head and b"authentication required" in head, head


def test_status_endpoints_can_be_closed_too(tmp_path):
    srv = Server("local", tmp_path, config=config(USERS, extra="public_status = false"))
    try:
        for path in ("/metrics", "/health", "/version"):
            assert status_of(srv.url + path)[0] == 401, path
            assert status_of(srv.url + path, "worker", "worker-pw")[0] == 200, path
    finally:
        srv.stop()
