# Shared by the benchmark scripts (sourced): a work directory under /var/tmp that goes at exit
# together with every process whose PID is in `pids`, the pg_virtualenv server as a conninfo
# string, and for the scale benchmarks an API on a PostgreSQL schema filled directly.
pids=()
# Runs the calling script again inside a throw-away PostgreSQL server (pg_virtualenv), unless
# it already runs in one.
in_pg_virtualenv() {
    [ -n "${PGHOST:-}" ] || exec pg_virtualenv -t "$0" "$@"
}
bench_work() { # name
    work=$(mktemp -d "/var/tmp/s3dedup-$1.XXXXXX")
    trap bench_cleanup EXIT
}
bench_cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null
    rm -rf "$work"
}
pg_conninfo() {
    echo "host=$PGHOST port=${PGPORT:-5432} user=${PGUSER:-postgres} password=${PGPASSWORD:-} dbname=${PGDATABASE:-postgres}"
}
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
# s3dedup-api from $bin on PostgreSQL ($url) schema $1 (made if missing), local objects under
# $work, listening on $port. The store's totals are counted once, at start (metrics-scale.sh
# measures that count; the requests are what the other rows measure).
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
# Fills schema $1 (made by a start of the API) directly with $2 files over min($2, 1 million)
# contents of 4 KiB (objects are not written: only the metadata's size matters here).
fill_schema() { # schema files
    local blobs=$(($2 < 1000000 ? $2 : 1000000))
    echo "filling $1: $2 files over $blobs contents"
    psql -q -v ON_ERROR_STOP=1 <<EOF
SET search_path TO $1;
INSERT INTO blobs (digest, logical_size, stored_size, refcount, state, created_at)
SELECT lpad(to_hex(i), 64, '0'), 4096, 1500, 0, 'live', 1700000000
FROM generate_series(1, $blobs) AS i;
INSERT INTO files (path, version, digest)
SELECT '/p' || (i % 1000) || '/f' || i, 1700000000, lpad(to_hex(i % $blobs + 1), 64, '0')
FROM generate_series(1, $2) AS i;
UPDATE blobs SET refcount = $2 / $blobs;
VACUUM ANALYZE;
CHECKPOINT;
EOF
}
