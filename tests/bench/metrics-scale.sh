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
. tests/bench/lib.sh
in_pg_virtualenv "$@"
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(2 10)
cargo build --release --locked -q -p s3dedup-api
bin="$PWD/target/release"
bench_work metrics
url=$(pg_conninfo)
port=$(free_port)

gauge() { curl -sf "http://127.0.0.1:$port/metrics" | awk -v n="$1" '$1 == n { print $2 }'; }

rows=()
for millions in "${sizes[@]}"; do
    schema="metrics_${millions}m"
    files=$((millions * 1000000))
    start_api "$schema"   # makes the schema
    stop_api
    fill_schema "$schema" "$files"
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
