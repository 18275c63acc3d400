"""The real Filetracker client in a loop for the soak: put, get back, list, delete.

Usage: ft_client_loop.py URL SECONDS TAG
Prints one line of counts; exits 1 on any wrong content, a file missing that was put,
or a deleted file that comes back. Server errors (5xx) are counted, not fatal.
"""
import hashlib
import os
import sys
import tempfile
import time

from filetracker.client import Client, FiletrackerError

url, seconds, tag = sys.argv[1], float(sys.argv[2]), sys.argv[3]
client = Client(remote_url=url, local_store=None)
deadline = time.monotonic() + seconds
ops = errors = 0
live = {}
tmp = tempfile.mkdtemp()
n = 0
while time.monotonic() < deadline:
    n += 1
    data = os.urandom(64) * (1 + n % 300)  # 64 B .. 19 KiB, compressible
    path = f"/soak-ft/{tag}/{n}"
    src = os.path.join(tmp, "src")
    with open(src, "wb") as f:
        f.write(data)
    try:
        name = client.put_file(path, src)
        ops += 1
        live[path] = (name, hashlib.sha256(data).hexdigest())
        stream, _ = client.get_stream(path)
        ops += 1
        if hashlib.sha256(stream.read()).hexdigest() != live[path][1]:
            sys.exit(f"wrong content read back for {path}")
        if n % 5 == 0:
            listed = set(client.list_remote_files(None, f"/soak-ft/{tag}", False))
            ops += 1
            missing = [p for p in live if p.rsplit("/", 1)[1] not in listed]
            if missing:
                sys.exit(f"put but not listed: {missing[:5]}")
        if n % 3 == 0:
            old = next(iter(live))
            client.delete_file(live.pop(old)[0])
            ops += 1
            try:
                client.get_stream(old)
                sys.exit(f"deleted {old} came back")
            except FiletrackerError as e:
                if "404" not in str(e):
                    raise
            ops += 1
    except FiletrackerError as e:
        if "404" in str(e):
            sys.exit(f"false 404: {e}")
        errors += 1
for path, (_, digest) in live.items():
    stream, _ = client.get_stream(path)
    if hashlib.sha256(stream.read()).hexdigest() != digest:
        sys.exit(f"wrong content at the end for {path}")
print(f"filetracker client: {ops} operations, {errors} server errors, {len(live)} files kept, 0 lost")
