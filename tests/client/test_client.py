"""s3dedup-api as OIOIOI and sioworkers use it: through the real Filetracker client and CLI."""

import gzip
import hashlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from filetracker.client import Client, FiletrackerError


def unique(tag, size=10_000):
    """Fresh content per run: the store deduplicates, so tests must not share contents."""
    seed = f"{tag}-{uuid.uuid4()}".encode()
    out = bytearray()
    block = hashlib.sha256(seed).digest()
    while len(out) < size:
        out += block.hex().encode()
        block = hashlib.sha256(block).digest()
    return bytes(out[:size])


@pytest.fixture
def root():
    """A fresh directory name per test."""
    return f"/t-{uuid.uuid4().hex[:12]}"


def write(tmp_path, data, name="f"):
    p = tmp_path / f"{name}-{uuid.uuid4().hex[:6]}"
    p.write_bytes(data)
    return str(p)


def test_put_get_and_stream(client, tmp_path, root):
    data = unique("put-get", 300_000)
    name = client.put_file(f"{root}/a.txt", write(tmp_path, data))
    assert name.startswith(f"{root}/a.txt@")
    version = int(name.split("@")[1])
    assert abs(version - time.time()) < 600
    out = tmp_path / "out"
    assert client.get_file(f"{root}/a.txt", str(out)) == name
    assert out.read_bytes() == data
    stream, vname = client.get_stream(f"{root}/a.txt")
    assert stream.read() == data
    assert vname == name


def test_versioned_names(client, tmp_path, root):
    data = unique("versioned")
    assert client.put_file(f"{root}/v@123", write(tmp_path, data)) == f"{root}/v@123"
    stream, name = client.get_stream(f"{root}/v@123")
    assert (stream.read(), name) == (data, f"{root}/v@123")
    assert client.file_version(f"{root}/v") == 123
    with pytest.raises(FiletrackerError, match="not available"):
        client.get_stream(f"{root}/v@124")


def test_older_put_is_ignored_and_reported(client, tmp_path, root):
    new, old = unique("new"), unique("old")
    assert client.put_file(f"{root}/o@2000", write(tmp_path, new)) == f"{root}/o@2000"
    # The client reports the version the server kept.
    assert client.put_file(f"{root}/o@1000", write(tmp_path, old)) == f"{root}/o@2000"
    stream, _ = client.get_stream(f"{root}/o")
    assert stream.read() == new
    # An equal version overwrites.
    assert client.put_file(f"{root}/o@2000", write(tmp_path, old)) == f"{root}/o@2000"
    stream, _ = client.get_stream(f"{root}/o")
    assert stream.read() == old


def test_file_size_is_the_logical_size(client, tmp_path, root):
    compressible = b"a" * 123_456
    incompressible = os.urandom(54_321)
    client.put_file(f"{root}/c", write(tmp_path, compressible))
    client.put_file(f"{root}/i", write(tmp_path, incompressible))
    assert client.file_size(f"{root}/c") == 123_456
    assert client.file_size(f"{root}/i") == 54_321
    empty = write(tmp_path, b"")
    client.put_file(f"{root}/empty", empty)
    assert client.file_size(f"{root}/empty") == 0
    stream, _ = client.get_stream(f"{root}/empty")
    assert stream.read() == b""


def test_listing_with_cutoffs_subpaths_and_absolute_paths(client, tmp_path, root):
    for rel, version in [("a", 100), ("d/b", 200), ("d/e/c", 300), ("z", 400)]:
        client.put_file(f"{root}/{rel}@{version}", write(tmp_path, unique(rel)))
    assert sorted(client.list_remote_files(None, root, False)) == ["a", "d/b", "d/e/c", "z"]
    assert sorted(client.list_remote_files(250, root, False)) == ["a", "d/b"]
    assert sorted(client.list_remote_files(200, root, False)) == ["a", "d/b"], "inclusive"
    assert sorted(client.list_remote_files(None, f"{root}/d", False)) == ["b", "e/c"]
    absolute = sorted(client.list_remote_files(None, f"{root}/d/", True))
    assert absolute == [f"{root[1:]}/d/b", f"{root[1:]}/d/e/c"]
    assert client.list_remote_files(None, f"{root}/nothing", False) == []
    everything = client.list_remote_files(None, "/", False)
    assert f"{root[1:]}/d/e/c" in everything


def test_delete_and_missing_file(client, tmp_path, root):
    name = client.put_file(f"{root}/gone", write(tmp_path, unique("gone")))
    client.delete_file(name)  # the exact version returned by the PUT, as OIOIOI does
    with pytest.raises(FiletrackerError, match="404"):
        client.get_stream(f"{root}/gone")
    with pytest.raises(FiletrackerError, match="404"):
        client.delete_file(f"{root}/gone@{2**31}")
    # An older DELETE is a no-op.
    client.put_file(f"{root}/kept@500", write(tmp_path, b"kept"))
    client.delete_file(f"{root}/kept@499")
    assert client.file_version(f"{root}/kept") == 500


def test_uncompressed_upload(client, tmp_path, root):
    data = unique("raw", 200_000)
    client.put_file(f"{root}/raw", write(tmp_path, data), compress_hint=False)
    stream, _ = client.get_stream(f"{root}/raw")
    assert stream.read() == data
    assert client.file_size(f"{root}/raw") == len(data)


def test_non_ascii_and_space_names(client, tmp_path, root):
    data = unique("żółw")
    name = f"{root}/zażółć gęślą/jaźń ✓ x.txt"
    got = client.put_file(name, write(tmp_path, data))
    assert got.startswith(name + "@")
    stream, _ = client.get_stream(name)
    assert stream.read() == data
    assert client.list_remote_files(None, root, False) == ["zażółć gęślą/jaźń ✓ x.txt"]
    client.delete_file(name + f"@{2**31}")
    assert client.list_remote_files(None, root, False) == []


@pytest.mark.parametrize("suffix", ["/", "/ft", "/ft/"])
def test_base_url_forms(server, tmp_path, root, suffix):
    c = Client(remote_url=server.url + suffix, local_store=None)
    data = unique("url" + suffix)
    name = c.put_file(f"{root}/u", write(tmp_path, data))
    stream, _ = c.get_stream(f"{root}/u")
    assert stream.read() == data
    assert c.list_remote_files(None, root, False) == ["u"]
    c.delete_file(name)
    assert c.list_remote_files(None, root, False) == []


def test_deduplication_is_visible_in_the_object_store(server, client, tmp_path, root):
    before = set(server.objects())
    data = unique("dedup", 40_000)
    local = write(tmp_path, data)
    names = [client.put_file(f"{root}/same/{i}", local) for i in range(50)]
    client.put_file(f"{root}/raw-copy", local, compress_hint=False)
    added = set(server.objects()) - before
    assert added == {hashlib.sha256(data).hexdigest()}, "50 paths, gzip and raw: one object"
    for n in names[:49]:
        client.delete_file(n)
    assert hashlib.sha256(data).hexdigest() in server.objects()
    stream, _ = client.get_stream(f"{root}/same/49")
    assert stream.read() == data


def test_cli_put_get_rm(server, tmp_path, root):
    data = unique("cli")
    src = write(tmp_path, data)
    cache = tmp_path / "cache"
    ft = [str(Path(sys.executable).with_name("filetracker")), "-r", server.url, "-c", str(cache)]
    run = lambda *args: subprocess.run(ft + list(args), capture_output=True, text=True, timeout=60)
    r = run("put", src, f"{root}/cli.txt")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "cli-out"
    r = run("get", f"{root}/cli.txt", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data
    r = run("rm", f"{root}/cli.txt")
    assert r.returncode == 0, r.stderr
    c = Client(remote_url=server.url, local_store=None)
    with pytest.raises(FiletrackerError, match="404"):
        c.get_stream(f"{root}/cli.txt")


def test_wrong_checksum_from_a_buggy_client_is_refused(server, client, tmp_path, root):
    """The old server trusts SHA256-Checksum; s3dedup checks it, so nothing is poisoned."""
    import requests
    data = unique("liar")
    before = server.objects()
    r = requests.put(
        f"{server.url}/files{root}/liar?last_modified=Tue,+14+Nov+2023+22:13:20+-0000",
        data=gzip.compress(data),
        headers={"Content-Encoding": "gzip", "Logical-Size": str(len(data)),
                 "SHA256-Checksum": hashlib.sha256(b"other").hexdigest()})
    assert r.status_code == 400
    assert "mismatch" in r.headers["X-Exception"]
    assert server.objects() == before
    with pytest.raises(FiletrackerError, match="404"):
        client.get_stream(f"{root}/liar")
