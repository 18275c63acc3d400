#!/usr/bin/env bash
# /metrics at the size of a real platform, measured:  tests/bench/metrics-scale.sh [MILLIONS...]
# For each size (default: 2 10) a PostgreSQL schema (a throw-away server from pg_virtualenv) is
# filled directly with that many million files over one million distinct blobs, s3dedup-api
# (release build, local object store) starts on it, and once its background count is done, 100
# scrapes of /metrics are timed one after another. Prints, per size, the 100 scrapes' wall time
# and the background count's duration (s3dedup_stats_count_seconds); saves them to
# target/bench/metrics-scale.md. A benchmark: it measures, it asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${PGHOST:-}" ]; then
    exec pg_virtualenv -t "$0" "$@"
fi
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(2 10)
cargo build --release --locked -q -p s3dedup-api
bin="$PWD/target/release"
. tests/bench/lib.sh
bench_work metrics
url=$(pg_conninfo)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

start_api() { # schema
    env -i PATH="$PATH" RUST_LOG=warn S3DEDUP_METADATA__BACKEND=postgres \
        S3DEDUP_METADATA__POSTGRES__URL="$url" S3DEDUP_METADATA__POSTGRES__SCHEMA="$1" \
        S3DEDUP_API__STATS_REFRESH_SECS=3600 \
        "$bin/s3dedup-api" --listen "127.0.0.1:$port" --data-dir "$work/data-$1" 2>> "$work/api.log" &
    api_pid=$!
    pids+=("$api_pid")
    for _ in $(seq 600); do curl -sf -o /dev/null "http://127.0.0.1:$port/status" && return 0; sleep 0.1; done
    echo "s3dedup-api did not start" >&2; cat "$work/api.log" >&2; exit 1
}
stop_api() { kill "$api_pid"; wait "$api_pid" 2>/dev/null || true; }
gauge() { curl -sf "http://127.0.0.1:$port/metrics" | awk -v n="$1" '$1 == n { print $2 }'; }

rows=()
for millions in "${sizes[@]}"; do
    schema="metrics_${millions}m"
    files=$((millions * 1000000))
    blobs=$((files < 1000000 ? files : 1000000))
    start_api "$schema"   # makes the schema
    stop_api
    echo "filling $schema: $files files over $blobs blobs"
    psql -q -v ON_ERROR_STOP=1 <<EOF
SET search_path TO $schema;
INSERT INTO blobs (digest, logical_size, stored_size, refcount, state, created_at)
SELECT lpad(to_hex(i), 64, '0'), 4096, 1500, 0, 'live', 1700000000
FROM generate_series(1, $blobs) AS i;
INSERT INTO files (path, version, digest)
SELECT '/p' || (i % 1000) || '/f' || i, 1700000000, lpad(to_hex(i % $blobs + 1), 64, '0')
FROM generate_series(1, $files) AS i;
UPDATE blobs SET refcount = $files / $blobs;
ANALYZE;
EOF
    start_api "$schema"
    until [ "$(gauge s3dedup_files)" = "$files" ]; do sleep 0.5; done
    count=$(gauge s3dedup_stats_count_seconds)
    scrapes=$(python3 - "$port" <<'EOF'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/metrics"
t = time.monotonic()
for _ in range(100):
    urllib.request.urlopen(url).read()
print(f"{time.monotonic() - t:.3f}")
EOF
)
    stop_api
    echo "$files files: 100 scrapes in $scrapes s; background count $count s"
    rows+=("| $files | $scrapes s | $count s |")
done
mkdir -p target/bench
{
    echo "/metrics with the store's totals counted in the background (PostgreSQL, $(nproc) cores):"
    echo
    echo "| files | 100 scrapes, one after another | one background count |"
    echo "|---|---|---|"
    printf '%s\n' "${rows[@]}"
} | tee target/bench/metrics-scale.md
