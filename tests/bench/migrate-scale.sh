#!/usr/bin/env bash
# Memory of a large import:  tests/bench/migrate-scale.sh [N]
# A source s3dedup store (SQLite, local directory) gets 1,000 small contents through its API,
# then N (default 1,000,000) files over them written directly into its database. Then
# s3dedup-migrator (release build) imports it (`--source s3dedup:`) into a fresh store on the
# embedded default, its resident set sampled every second. Prints a Markdown table, also saved
# to target/bench/migrate-scale.md. A benchmark: it measures, it asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
n=${1:-1000000}
contents=1000
cargo build --release --locked -q -p s3dedup-api -p s3dedup-migrator
bin="$PWD/target/release"
bench_work migrate-scale
port=$(free_port)

echo "source: $contents contents through the API, then $n files over them"
env -i PATH="$PATH" RUST_LOG=warn "$bin/s3dedup-api" --listen "127.0.0.1:$port" \
    --data-dir "$work/src" 2> "$work/api.log" &
api_pid=$!
pids+=("$api_pid")
for _ in $(seq 300); do curl -sf -o /dev/null "http://127.0.0.1:$port/status" && break; sleep 0.1; done
for i in $(seq "$contents"); do
    head -c 3000 /dev/urandom | base64 > "$work/c"
    curl -sf -o /dev/null -X PUT --data-binary @"$work/c" \
        "http://127.0.0.1:$port/files/seed/$i?last_modified=Tue,+14+Nov+2023+22:13:20+GMT"
done
kill "$api_pid"; wait "$api_pid" 2>/dev/null || true
sqlite3 -bail "$work/src/metadata.sqlite3" <<SQL > /dev/null
CREATE TEMP TABLE seeds AS SELECT row_number() OVER (ORDER BY digest) - 1 AS k, digest FROM blobs;
INSERT INTO files (path, version, digest)
SELECT '/d' || (value % 1000) || '/f' || value, 1700000000 + value % 86400,
       (SELECT digest FROM seeds WHERE k = value % $contents)
FROM generate_series(1, $n);
UPDATE blobs SET refcount = (SELECT COUNT(*) FROM files f WHERE f.digest = blobs.digest),
                 unreferenced_since = NULL;
PRAGMA wal_checkpoint(TRUNCATE);
SQL
echo "data_dir = \"$work/src\"" > "$work/src.toml"

echo "importing $n files"
started=$(date +%s.%N)
env -i PATH="$PATH" RUST_LOG=warn "$bin/s3dedup-migrator" --data-dir "$work/dst" \
    --source "s3dedup:$work/src.toml" > "$work/migrator.out" 2> "$work/migrator.err" &
mig=$!
pids+=("$mig")
samples=()
while kill -0 "$mig" 2>/dev/null; do
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$mig/status" 2>/dev/null || true)
    [ -n "$rss" ] && samples+=("$rss")
    sleep 1
done
wait "$mig" && status=0 || status=$?
wall=$(python3 -c "import time; print(f'{time.time() - $started:.0f}')")
summary=$(tail -n 3 "$work/migrator.out" | tr '\n' ' ')
python3 - "$n" "$wall" "$status" "${samples[@]}" <<'PY' | tee target/bench/migrate-scale.md
import sys
n, wall, status = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
kib = [int(s) for s in sys.argv[4:]]
def mib(k): return f"{k / 1024:.1f}"
tenth = max(1, len(kib) // 10)
print(f"{n:,} files over 1,000 contents, imported from another s3dedup store; exit {status}.")
print()
print("| files | wall | files/s | RSS after 10% of the run (MiB) | at 50% | at 90% | peak (MiB) |")
print("|---:|---:|---:|---:|---:|---:|---:|")
at = lambda f: mib(kib[min(len(kib) - 1, int(len(kib) * f))]) if kib else "-"
print(f"| {n:,} | {wall:.0f} s | {n / wall:,.0f} | {at(0.1)} | {at(0.5)} | {at(0.9)} | {mib(max(kib)) if kib else '-'} |")
PY
echo "migrator said: $summary"
