#!/usr/bin/env bash
# What an operation costs against the size of the store:  tests/bench/scale.sh [PATHS...]
# For each size (default: 10000 10000000) a PostgreSQL schema (a throw-away server from
# pg_virtualenv) is filled directly with that many files over min(size, 1 million) distinct
# small contents, and s3dedup-api (release build, local object store) starts on it. Then, each
# on a new connection as the Filetracker client makes them, N PUTs of new 4 KiB files, N GETs,
# N HEADs and N DELETEs of them are timed one by one (p50, p99), then one cleaner run that
# collects those N contents (without the orphan sweep, which is daily), and the schema's size.
# Prints a Markdown table, also saved to target/bench/scale.md. A benchmark: it measures, it
# asserts nothing. N: SCALE_OPS (default 300).
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
in_pg_virtualenv "$@"
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(10000 10000000)
ops=${SCALE_OPS:-300}
cargo build --release --locked -q -p s3dedup-api -p s3dedup-cleaner
bin="$PWD/target/release"
bench_work scale
url=$(pg_conninfo)
port=$(free_port)

rows=()
for files in "${sizes[@]}"; do
    schema="scale_${files}"
    start_api "$schema"   # makes the schema
    stop_api
    filled=$(date +%s)
    fill_schema "$schema" "$files"
    echo "filled in $(( $(date +%s) - filled )) s"
    size=$(psql -tAq -c "SELECT pg_size_pretty(sum(pg_total_relation_size(c.oid))) FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = '$schema' AND c.relkind = 'r'")
    start_api "$schema"
    sleep "${SCALE_SETTLE:-10}"   # past the count at start
    latency=$(python3 - "$port" "$ops" <<'EOF'
import http.client, os, statistics, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
lm = "last_modified=Tue,+14+Nov+2023+22:13:20+GMT"
def timed(method, path, body=None):
    t = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request(method, path, body=body)
    r = c.getresponse()
    r.read()
    c.close()
    assert r.status == 200, (method, path, r.status)
    return time.perf_counter() - t
runs = {}
runs["PUT"] = [timed("PUT", f"/files/scale/{i}?{lm}", os.urandom(4096)) for i in range(n)]
runs["GET"] = [timed("GET", f"/files/scale/{i}") for i in range(n)]
runs["HEAD"] = [timed("HEAD", f"/files/scale/{i}") for i in range(n)]
runs["DELETE"] = [timed("DELETE", f"/files/scale/{i}?{lm}") for i in range(n)]
def ms(v):
    return f"{v * 1000:.2f}"
print(" | ".join(f"{ms(statistics.median(t))} / {ms(sorted(t)[int(len(t) * 0.99) - 1])}"
                 for t in runs.values()))
EOF
)
    stop_api
    started=$(date +%s.%N)
    env -i PATH="$PATH" RUST_LOG=warn S3DEDUP_METADATA__BACKEND=postgres \
        S3DEDUP_METADATA__POSTGRES__URL="$url" S3DEDUP_METADATA__POSTGRES__SCHEMA="$schema" \
        "$bin/s3dedup-cleaner" --data-dir "$work/data-$schema" --grace-secs 0 --no-orphans \
        > "$work/cleaner.out"
    cleaner=$(python3 -c "import time; print(f'{time.time() - $started:.2f}')")
    echo "$files files: p50 / p99 ms: $latency; cleaner $cleaner s; $size"
    echo "  cleaner: $(cat "$work/cleaner.out")"
    rows+=("| $files | $latency | $cleaner s | $size |")
done
mkdir -p target/bench
{
    echo "Cost against the store's size (PostgreSQL, local objects, $(nproc) cores; $ops new 4 KiB"
    echo "files, each request on a new connection; p50 / p99 in ms):"
    echo
    echo "| files | PUT | GET | HEAD | DELETE | cleaner collecting them | tables and indexes |"
    echo "|---|---|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
} | tee target/bench/scale.md
