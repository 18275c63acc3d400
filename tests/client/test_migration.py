"""s3dedup-migrator against the real old server: a filetracker-server (PyPI filetracker==2.3.3)
filled through the real client, imported from its data directory (v2), over HTTP from the running
server, and from a v1 directory of the same files, then compared through the real client."""

import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from filetracker.client import Client

from conftest import BIN_DIR, free_port, stored_contents, wait_http

# The venv running this suite also has the old server (and gunicorn, which it execs).
VENV_BIN = Path(sys.executable).parent


def content(i, size):
    seed = hashlib.sha256(f"mig-{i}".encode()).digest()
    return (seed * (size // 32 + 1))[:size]


def start_old_server(tmp):
    """A real filetracker-server on an empty data dir under `tmp`: (process, data dir, url)."""
    data = tmp / "data"
    port = free_port()
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    proc = subprocess.Popen(
        [VENV_BIN / "filetracker-server", "-d", data, "-l", "127.0.0.1", "-p", str(port), "-D",
         "-L", tmp / "old.log"], env=env)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/version/", proc, "filetracker-server")
    return proc, data, url


@pytest.fixture
def own_old_server(tmp_path):
    """A real filetracker-server of this test's own, on an empty data dir: (data dir, url)."""
    (tmp_path / "old").mkdir()
    proc, data, url = start_old_server(tmp_path / "old")
    yield data, url
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="module")
def old_server():
    """The old server on a fresh data dir, filled through the real client; yields
    (data dir, {path: (version, bytes)})."""
    tmp = Path(tempfile.mkdtemp(prefix="s3dedup-old-"))
    proc, data, url = start_old_server(tmp)
    c = Client(remote_url=url, local_store=None)
    rng = random.Random(7)
    expected = {}
    names = [f"/dir{i % 7}/sub{i % 3}/file {i}.txt" for i in range(200)]
    names += [f"/zażółć/gęślą jaźń {i}.in" for i in range(20)]
    for n, name in enumerate(names):
        body = content(n % 40, rng.choice([10, 1000, 50_000]))  # many duplicates
        for version in sorted(rng.sample(range(1_000_000, 2_000_000), rng.choice([1, 1, 2, 3]))):
            with tempfile.NamedTemporaryFile(delete=False) as f:
                f.write(body + str(version).encode())
            got = c.put_file(f"{name}@{version}", f.name)
            assert got == f"{name}@{version}"
            expected[name] = (version, body + str(version).encode())
            os.unlink(f.name)
    for name, body in [("/empty", b""), ("/big.bin", os.urandom(3 << 20))]:
        with tempfile.NamedTemporaryFile(delete=False) as f:
            f.write(body)
        c.put_file(f"{name}@1500000", f.name)
        expected[name] = (1500000, body)
    yield data, expected, url
    proc.terminate()
    proc.wait()
    shutil.rmtree(tmp, ignore_errors=True)


def migrate_and_serve(source, tmp):
    """A fresh s3dedup: migrate `source` into it, then start its API."""
    data_dir = tmp / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("S3DEDUP_")}
    run = lambda: subprocess.run(
        [BIN_DIR / "s3dedup-migrator", "--data-dir", data_dir, "--source", source],
        env=env, capture_output=True, text=True, timeout=600)
    first = run()
    assert first.returncode == 0, first.stdout + first.stderr
    again = run()
    assert again.returncode == 0 and " 0 files migrated" in again.stdout, again.stdout
    return first.stdout, again.stdout


def compare(url, expected):
    c = Client(remote_url=url, local_store=None)
    listed = sorted(c.list_remote_files(None, "/", False))
    assert listed == sorted(p[1:] for p in expected)
    for path, (version, body) in expected.items():
        assert c.file_version(path) == version, path
        stream, name = c.get_stream(path)
        assert name == f"{path}@{version}"
        assert stream.read() == body, path


@pytest.mark.parametrize("kind", ["v2", "v1", "http"])
def test_migration_from_the_real_old_server(old_server, tmp_path, kind):
    data, expected, url = old_server
    if kind == "v2":
        source = f"v2:{data}"
    elif kind == "http":
        source = url
    else:
        # The same files as a v1 directory: files/<path>, mtime = version.
        for path, (version, body) in expected.items():
            f = tmp_path / "v1" / "files" / path[1:]
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(body)
            os.utime(f, (version, version))
        source = f"v1:{tmp_path / 'v1'}"
    first, again = migrate_and_serve(source, tmp_path)
    assert f"{len(expected)} files migrated" in first, first
    assert f"{len(expected)} already present" in again, again
    # Serve the imported store with a real API and compare through the real client.
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("S3DEDUP_")}
    api = subprocess.Popen([BIN_DIR / "s3dedup-api", "--listen", f"127.0.0.1:{port}",
                            "--data-dir", tmp_path / "data"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/status", api, "s3dedup-api")
        compare(f"http://127.0.0.1:{port}", expected)
        distinct = {hashlib.sha256(b).hexdigest() for _, b in expected.values()}
        assert stored_contents(tmp_path / "data") == len(distinct), "each content stored once"
    finally:
        api.kill()
        api.wait()


def start_api(tmp, **config):
    """An s3dedup API on a fresh data dir; `config` become S3DEDUP_API__* settings."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("S3DEDUP_")}
    env.update({f"S3DEDUP_API__{k.upper()}": str(v) for k, v in config.items()})
    api = subprocess.Popen([BIN_DIR / "s3dedup-api", "--listen", f"127.0.0.1:{port}",
                            "--data-dir", tmp / "data"], env=env,
                           stdout=subprocess.DEVNULL, stderr=open(tmp / "api.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/status", api, "s3dedup-api")
    except Exception:
        api.kill()
        raise
    return api, url


def metric(url, name):
    import urllib.request
    for line in urllib.request.urlopen(url + "/metrics").read().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_live_migration_reads_through_and_deletes_stick(old_server, tmp_path):
    data, expected, old_url = old_server
    api, url = start_api(tmp_path, fallback_url=old_url)
    try:
        c = Client(remote_url=url, local_store=None)
        # A file deleted through s3dedup before anything read it: its deletion is remembered.
        gone = "/dir3/sub0/file 3.txt"
        version = expected[gone][0]
        c.delete_file(f"{gone}@{version}")
        with pytest.raises(Exception):
            c.file_version(gone)
        # Every other old file reads through s3dedup: versions and contents identical.
        for path, (version, body) in expected.items():
            if path == gone:
                continue
            assert c.file_version(path) == version, path
            stream, name = c.get_stream(path)
            assert name == f"{path}@{version}"
            assert stream.read() == body, path
        # Every other file was imported on its read; the deleted one was not downloaded at all.
        assert metric(url, "s3dedup_fallback_imports_total") == len(expected) - 1
        distinct = {hashlib.sha256(b).hexdigest() for p, (_, b) in expected.items() if p != gone}
        stored = stored_contents(tmp_path / "data")
        # The deleted file's content stays until the cleaner runs, unless another file has it.
        assert len(distinct) <= stored <= len(distinct) + 1
        # The old server still has it, but neither the fallback nor the migrator brings it back.
        assert Client(remote_url=old_url, local_store=None).file_version(gone) == expected[gone][0]
        for source in [old_url, f"v2:{data}"]:
            env = {k: v for k, v in os.environ.items() if not k.startswith("S3DEDUP_")}
            run = subprocess.run(
                [BIN_DIR / "s3dedup-migrator", "--data-dir", tmp_path / "data", "--source", source],
                env=env, capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, run.stdout + run.stderr
            assert " 0 files migrated" in run.stdout and "1 deleted here" in run.stdout, run.stdout
        with pytest.raises(Exception):
            c.get_stream(gone)
        with pytest.raises(Exception):
            c.file_version(gone)
    finally:
        api.kill()
        api.wait()


def test_live_migration_forwards_writes_to_the_old_server(old_server, tmp_path):
    _, expected, old_url = old_server
    api, url = start_api(tmp_path, fallback_url=old_url, fallback_forward_writes="true")
    try:
        c = Client(remote_url=url, local_store=None)
        old = Client(remote_url=old_url, local_store=None)
        src = tmp_path / "new.txt"
        src.write_bytes(b"written during the migration\n" * 100)
        assert c.put_file("/live/new.txt@1700000000", str(src)) == "/live/new.txt@1700000000"
        # The old server got the same file and version, so switching back to it loses nothing.
        assert old.file_version("/live/new.txt") == 1700000000
        stream, _ = old.get_stream("/live/new.txt")
        assert stream.read() == src.read_bytes()
        c.delete_file("/live/new.txt@1700000001")
        with pytest.raises(Exception):
            old.file_version("/live/new.txt")
        with pytest.raises(Exception):
            c.file_version("/live/new.txt")
        # Reads of old files still come through.
        path, (version, body) = next(iter(expected.items()))
        assert c.get_stream(path)[0].read() == body
    finally:
        api.kill()
        api.wait()


def test_live_migration_an_older_put_loses_to_the_old_servers_version(old_server, tmp_path):
    """A PUT of a path s3dedup has not imported yet, older than the old server's copy: the old
    server would ignore it, so s3dedup answers with the newer version and stores that one."""
    _, _, old_url = old_server
    api, url = start_api(tmp_path, fallback_url=old_url, fallback_forward_writes="true")
    try:
        c = Client(remote_url=url, local_store=None)
        old = Client(remote_url=old_url, local_store=None)
        # A path of its own, so the other tests' expectations of the old server stay true.
        path, version, body = "/older-put/x.txt", 1_800_000, b"the old server's copy\n"
        src = tmp_path / "older.txt"
        src.write_bytes(body)
        assert old.put_file(f"{path}@{version}", str(src)) == f"{path}@{version}"
        src.write_bytes(b"an older version than the old server holds\n")
        assert c.put_file(f"{path}@{version - 1}", str(src)) == f"{path}@{version}"
        # Both stores hold the old server's version and content.
        for client in (c, old):
            assert client.file_version(path) == version
            stream, name = client.get_stream(path)
            assert name == f"{path}@{version}" and stream.read() == body
        # A newer PUT of a path still wins, and is forwarded.
        src.write_bytes(b"newer than the old server's\n")
        assert c.put_file(f"{path}@{version + 1}", str(src)) == f"{path}@{version + 1}"
        assert old.file_version(path) == version + 1
        assert c.get_stream(path)[0].read() == src.read_bytes()
    finally:
        api.kill()
        api.wait()


def test_http_source_imports_files_versioned_after_the_old_servers_clock(tmp_path, own_old_server):
    """The old server's listing stops at its own "now" unless asked otherwise; a file whose
    version is ahead of that clock must still come over (v2:DIR always brought it)."""
    _, old_url = own_old_server
    old = Client(remote_url=old_url, local_store=None)
    future = int(time.time()) + 10 * 86400
    src = tmp_path / "f.txt"
    for path, version in [("/past.txt", 1_600_000_000), ("/future.txt", future)]:
        src.write_bytes(path.encode())
        assert old.put_file(f"{path}@{version}", str(src)) == f"{path}@{version}"
    first, _ = migrate_and_serve(old_url, tmp_path)
    assert "2 files migrated" in first, first
    api, url = start_api(tmp_path)
    try:
        c = Client(remote_url=url, local_store=None)
        assert c.file_version("/past.txt") == 1_600_000_000
        assert c.file_version("/future.txt") == future
        assert c.get_stream("/future.txt")[0].read() == b"/future.txt"
    finally:
        api.kill()
        api.wait()


def test_live_migration_concurrent_misses_of_one_path_import_it_once(tmp_path, own_old_server):
    """Six clients ask for the same large file s3dedup has not imported yet: one download
    from the old server and one import, and all six get the whole file. A HEAD downloads
    nothing."""
    from concurrent.futures import ThreadPoolExecutor
    _, old_url = own_old_server
    api = None
    try:
        body = os.urandom(24 << 20)
        src = tmp_path / "big.bin"
        src.write_bytes(body)
        old = Client(remote_url=old_url, local_store=None)
        assert old.put_file("/big.bin@1700000000", str(src)) == "/big.bin@1700000000"
        api, url = start_api(tmp_path, fallback_url=old_url)

        def fetch(_):
            c = Client(remote_url=url, local_store=None)
            stream, name = c.get_stream("/big.bin")
            return name, hashlib.sha256(stream.read()).hexdigest()

        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(fetch, range(6)))
        want = ("/big.bin@1700000000", hashlib.sha256(body).hexdigest())
        assert got == [want] * 6
        assert metric(url, "s3dedup_fallback_imports_total") == 1
        downloads = (tmp_path / "old" / "old.log").read_text().count("GET /files/big.bin")
        assert downloads == 1, f"{downloads} downloads from the old server"

        # A HEAD (the client's file_version and file_size) of another unimported file is
        # answered from the old server's HEAD: nothing downloaded, nothing imported.
        assert old.put_file("/other.bin@1700000001", str(src)) == "/other.bin@1700000001"
        c = Client(remote_url=url, local_store=None)
        assert c.file_version("/other.bin") == 1700000001
        assert c.file_size("/other.bin") == len(body)
        assert metric(url, "s3dedup_fallback_imports_total") == 1
        # gunicorn logs a HEAD as a GET that sent 0 bytes.
        sent = [int(line.split('" 200 ')[1].split()[0])
                for line in (tmp_path / "old" / "old.log").read_text().splitlines()
                if "GET /files/other.bin" in line]
        assert sent and not any(sent), f"bytes sent by the old server: {sent}"
    finally:
        if api:
            api.kill()
            api.wait()


def test_live_migration_lists_both_stores(old_server, tmp_path):
    """Before anything is imported, a listing through s3dedup shows the old server's files;
    one deleted here is gone from it, one written here is in it."""
    _, expected, old_url = old_server
    api, url = start_api(tmp_path, fallback_url=old_url)
    try:
        c = Client(remote_url=url, local_store=None)
        # Other tests add (ASCII-named) files to the shared old server; its own listing shows
        # non-ASCII names double-encoded, which s3dedup decodes.
        names = {p[1:] for p in expected}
        old_names = Client(remote_url=old_url, local_store=None).list_remote_files(None, "/", False)
        old_listing = names | {n for n in old_names if n.isascii()}
        assert sorted(c.list_remote_files(None, "/", False)) == sorted(old_listing)
        gone = sorted(expected)[3]
        c.delete_file(f"{gone}@{expected[gone][0]}")
        src = tmp_path / "new.txt"
        src.write_bytes(b"only in s3dedup")
        c.put_file("/dir1/new.txt@1700000000", str(src))
        want = (set(old_listing) - {gone[1:]}) | {"dir1/new.txt"}
        assert sorted(c.list_remote_files(None, "/", False)) == sorted(want)
        sub = sorted(p[len("dir1/"):] for p in want if p.startswith("dir1/"))
        assert sorted(c.list_remote_files(None, "/dir1", False)) == sub
        assert c.list_remote_files(None, "/nowhere", False) == []
    finally:
        api.kill()
        api.wait()


@pytest.mark.parametrize("kind", ["v2", "http"])
def test_final_delta_reports_files_deleted_on_the_old_server(tmp_path, own_old_server, kind):
    """After a bulk run, files deleted on the old server are listed by the next run and kept,
    deleted here with --delete-missing, unless a client wrote them here since; a file written
    on the old server again later comes over again."""
    data, old_url = own_old_server
    api = None
    try:
        old = Client(remote_url=old_url, local_store=None)
        files = {f"/d/f{i}.txt": f"file {i}".encode() for i in range(12)}
        for path, body in files.items():
            src = tmp_path / "upload"
            src.write_bytes(body)
            assert old.put_file(f"{path}@1700000000", str(src)) == f"{path}@1700000000"
        source = f"v2:{data}" if kind == "v2" else old_url
        env = {k: v for k, v in os.environ.items() if not k.startswith("S3DEDUP_")}

        def migrate(*extra):
            run = subprocess.run(
                [BIN_DIR / "s3dedup-migrator", "--data-dir", tmp_path / "data", "--source", source,
                 *extra], env=env, capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stdout + run.stderr
            return run.stdout

        assert "12 files migrated" in migrate()
        api, url = start_api(tmp_path)
        here = Client(remote_url=url, local_store=None)
        gone = sorted(files)[:3]
        for path in gone:
            old.delete_file(f"{path}@1700000001")
        out = migrate()
        assert " 0 files migrated" in out and "3 gone from the source but kept here" in out, out
        assert sorted(line.split(": ", 1)[1] for line in out.splitlines()
                      if line.startswith("gone from the source")) == gone
        assert here.get_stream(gone[0])[0].read() == files[gone[0]], "kept until asked"
        # Written here by a client since: it is the client's file now, not the import's.
        src = tmp_path / "upload"
        src.write_bytes(b"written here")
        here.put_file(f"{gone[0]}@1700000005", str(src))
        out = migrate("--delete-missing")
        assert "2 deleted as at the source" in out and "gone from the source" not in out, out
        listed = sorted("/" + p for p in here.list_remote_files(None, "/", False))
        assert listed == sorted(set(files) - set(gone[1:])), listed
        assert here.get_stream(gone[0])[0].read() == b"written here"
        out = migrate()
        assert " 0 files migrated" in out and "gone" not in out and "deleted as" not in out, out
        # Written again on the old server, at a newer version: a new file, imported.
        src.write_bytes(b"back again")
        old.put_file(f"{gone[1]}@1700000010", str(src))
        assert "1 files migrated" in migrate()
        assert here.get_stream(gone[1])[0].read() == b"back again"
    finally:
        if api:
            api.kill()
            api.wait()
