"""The real Filetracker client inside the systemd container (tests/systemd/e2e.sh).

    client_check.py basic       put, get, list and delete a file
    client_check.py stream N    N seconds of put/get, each on a new connection; exit 1 on any failure
    client_check.py migrated    the files the migrator imported, with their versions
    client_check.py probe N     N seconds of connection attempts every 20 ms; exit 1 if any was
                                refused or unanswered
    client_check.py has PATH    the file at PATH exists (exit 1 if not)
"""

import os
import socket
import sys
import tempfile
import time
import uuid

from filetracker.client import Client

# FT_URL: another address, or one with a user and password in it (user:password@host).
URL = os.environ.get("FT_URL", "http://127.0.0.1:9999")


def client():
    return Client(remote_url=URL, local_store=None)


def put_get(c, root, data):
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
    name = c.put_file(f"{root}/file.txt", f.name)
    stream, got = c.get_stream(f"{root}/file.txt")
    assert stream.read() == data and got == name, (got, name)
    os.unlink(f.name)
    return name


def basic():
    c = client()
    root = f"/e2e/{uuid.uuid4().hex}"
    data = os.urandom(100_000) + "zażółć".encode()
    name = put_get(c, root, data)
    assert c.file_size(f"{root}/file.txt") == len(data)
    assert c.list_remote_files(None, root, False) == ["file.txt"], c.list_remote_files(None, root, False)
    c.delete_file(name)
    assert c.list_remote_files(None, root, False) == []
    print("basic ok")


def stream(seconds):
    deadline = time.time() + seconds
    ok = failed = 0
    while time.time() < deadline:
        try:
            put_get(client(), f"/stream/{uuid.uuid4().hex}", os.urandom(2000))
            ok += 1
        except Exception as e:  # noqa: BLE001 - every failure counts
            failed += 1
            print(f"failed: {e!r}", flush=True)
    print(f"{ok} put+get pairs, {failed} failed")
    return 1 if failed or not ok else 0


def migrated():
    c = client()
    for path, version, content in [
        ("/imported/sub/old.txt", 1500000000, b"from the old filetracker\n"),
        ("/imported/two.txt", 1600000000, b"second\n"),
    ]:
        stream_, name = c.get_stream(path)
        assert name == f"{path}@{version}", name
        assert stream_.read() == content
    print("migrated ok")


def probe(seconds):
    """Whether the port stays open: a refused connection is what a closed socket gives."""
    deadline = time.time() + seconds
    ok = refused = other = 0
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", 9999), timeout=5) as s:
                s.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                s.settimeout(60)
                if s.recv(12).startswith(b"HTTP/1.1 200"):
                    ok += 1
                else:
                    other += 1
        except ConnectionRefusedError:
            refused += 1
        except OSError as e:
            other += 1
            print(f"failed: {e!r}", flush=True)
        time.sleep(0.02)
    print(f"{ok} answered, {refused} refused, {other} failed otherwise")
    return 1 if refused or other or not ok else 0


def has(path):
    c = client()
    try:
        c.file_size(path)
    except Exception as e:  # noqa: BLE001 - any failure means it is not there
        print(f"{path}: {e!r}")
        return 1
    print(f"{path} ok")
    return 0


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "basic":
        basic()
    elif mode == "stream":
        sys.exit(stream(int(sys.argv[2])))
    elif mode == "migrated":
        migrated()
    elif mode == "probe":
        sys.exit(probe(int(sys.argv[2])))
    elif mode == "has":
        sys.exit(has(sys.argv[2]))
    else:
        sys.exit(f"unknown mode {mode}")
