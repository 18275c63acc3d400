"""Outgrowing the embedded default: a store on SQLite and a local directory, filled and changed
through the real Filetracker client while it serves, moved with `s3dedup-migrator --source
s3dedup:OLD_CONFIG` to PostgreSQL (a throw-away server, pg_virtualenv) and a real S3 server
process, with a final delta run while the new store serves. Then everything is compared through
the real client, and the new store's cleaner runs at grace 0 without losing an object."""

import os
import random
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from filetracker.client import Client

from conftest import BIN_DIR, S3_BUCKET, S3_KEY, S3_SECRET, free_port, wait_http
from test_migration import compare, content


def postgres_url():
    """The test PostgreSQL as a conninfo string; without one this suite cannot run."""
    if "PGHOST" not in os.environ:
        if os.environ.get("TESTS_NEED_POSTGRES"):
            pytest.fail("PGHOST is not set: run this suite under pg_virtualenv (tests/run-all.sh)")
        pytest.skip("needs PostgreSQL: tests/run-all.sh runs this suite under pg_virtualenv")
    e = os.environ
    return (f"host={e['PGHOST']} port={e.get('PGPORT', '5432')} user={e.get('PGUSER', 'postgres')} "
            f"password={e.get('PGPASSWORD', '')} dbname={e.get('PGDATABASE', 'postgres')}")


def hermetic_env():
    return {k: v for k, v in os.environ.items()
            if not k.startswith("S3DEDUP_") and k not in ("NOTIFY_SOCKET", "LISTEN_FDS")}


class Api:
    def __init__(self, config, log):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [BIN_DIR / "s3dedup-api", "--config", config, "--listen", f"127.0.0.1:{self.port}"],
            env=hermetic_env(), stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        wait_http(self.url + "/status", self.proc, "s3dedup-api")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def run(program, config, *args):
    return subprocess.run([BIN_DIR / program, "--config", config, *args], env=hermetic_env(),
                          capture_output=True, text=True, timeout=600)


def put(c, tmp, path, version, body):
    f = tmp / "upload"
    f.write_bytes(body)
    assert c.put_file(f"{path}@{version}", str(f)) == f"{path}@{version}"


def test_moving_from_sqlite_and_a_directory_to_postgres_and_s3(tmp_path):
    url = postgres_url()
    procs = []
    s3 = subprocess.Popen([BIN_DIR / "s3-test-server", "--bucket", S3_BUCKET, tmp_path / "s3"],
                          stdout=subprocess.PIPE, text=True)
    procs.append(s3)
    try:
        endpoint = "http://" + s3.stdout.readline().strip().removeprefix("listening on ")
        old_cfg, new_cfg = tmp_path / "old.toml", tmp_path / "new.toml"
        old_cfg.write_text(f'data_dir = "{tmp_path / "old"}"\n')
        new_cfg.write_text(f"""data_dir = "{tmp_path / 'new'}"
[metadata]
backend = "postgres"
[metadata.postgres]
url = "{url}"
schema = "store_move_{os.getpid()}_{random.randrange(1 << 30)}"
[locks]
backend = "postgres"
[store]
backend = "s3"
[store.s3]
bucket = "{S3_BUCKET}"
endpoint = "{endpoint}"
access_key_id = "{S3_KEY}"
secret_access_key = "{S3_SECRET}"
""")
        old = Api(old_cfg, tmp_path / "old-api.log")
        procs.append(old.proc)
        c = Client(remote_url=old.url, local_store=None)
        rng = random.Random(11)
        expected = {}  # path -> (version, bytes); absent: deleted or never there
        names = [f"/p{i % 5}/t{i % 3}/in {i}.txt" for i in range(150)]
        names += [f"/zadania/żółw {i}.out" for i in range(10)]
        for n, name in enumerate(names):
            body = content(n % 30, rng.choice([0, 10, 3000, 70_000]))  # many duplicates
            for version in sorted(rng.sample(range(1_000_000, 2_000_000), rng.choice([1, 2]))):
                put(c, tmp_path, name, version, body + str(version).encode())
                expected[name] = (version, body + str(version).encode())
        big = os.urandom(5 << 20)
        put(c, tmp_path, "/big.bin", 1_500_000, big)
        expected["/big.bin"] = (1_500_000, big)
        for name in names[:10]:
            c.delete_file(f"{name}@{expected.pop(name)[0] + 1}")

        # The bulk copy, while clients go on changing the old store.
        started = time.monotonic()
        bulk = subprocess.Popen(
            [BIN_DIR / "s3dedup-migrator", "--config", new_cfg, "--source", f"s3dedup:{old_cfg}",
             "--jobs", "4"], env=hermetic_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        procs.append(bulk)
        for i, name in enumerate(names[10:30]):
            if i % 2:
                c.delete_file(f"{name}@{expected.pop(name)[0] + 1}")
            else:
                version = expected[name][0] + 10
                put(c, tmp_path, name, version, b"changed during the copy")
                expected[name] = (version, b"changed during the copy")
        out, err = bulk.communicate(timeout=600)
        assert bulk.returncode == 0, out + err
        bulk_secs = time.monotonic() - started

        # After the copy, before the switch: more changes, among them a path deleted and then
        # written again at a version older than its deletion (the protocol allows it).
        for name in names[30:40]:
            c.delete_file(f"{name}@{expected.pop(name)[0] + 1}")
        put(c, tmp_path, "/after/copy.txt", 1_900_000, b"written after the copy")
        expected["/after/copy.txt"] = (1_900_000, b"written after the copy")
        again = names[40]
        c.delete_file(f"{again}@1999999")
        put(c, tmp_path, again, 1_000_001, b"written again, older")
        expected[again] = (1_000_001, b"written again, older")
        old.stop()

        # The switch: clients now use the new store; the final delta runs while it serves.
        new = Api(new_cfg, tmp_path / "new-api.log")
        procs.append(new.proc)
        n = Client(remote_url=new.url, local_store=None)
        stop = threading.Event()
        written_here = {}

        def client_of_the_new_store():
            i = 0
            while not stop.is_set():
                path, body = f"/new/{i}.txt", f"written to the new store {i}".encode()
                put(n, tmp_path / "new-client", path, 2_100_000 + i, body)
                written_here[path] = (2_100_000 + i, body)
                i += 1

        (tmp_path / "new-client").mkdir()
        writer = threading.Thread(target=client_of_the_new_store)
        writer.start()
        started = time.monotonic()
        delta = run("s3dedup-migrator", new_cfg, "--source", f"s3dedup:{old_cfg}")
        delta_secs = time.monotonic() - started
        stop.set()
        writer.join()
        assert delta.returncode == 0, delta.stdout + delta.stderr
        assert " deleted as at the source" in delta.stdout, delta.stdout
        # Deleted on the new store meanwhile: the next delta must not bring it back.
        gone = names[50]
        n.delete_file(f"{gone}@{expected.pop(gone)[0]}")
        expected.update(written_here)

        last = run("s3dedup-migrator", new_cfg, "--source", f"s3dedup:{old_cfg}")
        assert last.returncode == 0 and " 0 files migrated" in last.stdout, last.stdout

        compare(new.url, expected)
        cleaned = run("s3dedup-cleaner", new_cfg, "--grace-secs", "0")
        assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
        compare(new.url, expected)
        verified = run("s3dedup-cleaner", new_cfg, "--verify", "--deep")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        print(f"STOREMOVE {len(expected)} files: bulk copy {bulk_secs:.1f} s while the old "
              f"store served, final delta {delta_secs:.1f} s while the new one served")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.kill()
                p.wait()
