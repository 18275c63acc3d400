#!/usr/bin/env bash
# What small contents kept in the metadata cost in database size:  tests/bench/inline-size.sh [N]
# For each backend (SQLite, PostgreSQL from pg_virtualenv) the schema is made by a start of
# s3dedup-api (release build), then filled directly with N (default 1,000,000) files, each
# over a content of its own of which the database keeps INLINE_BYTES (default 2048) random
# bytes, as small gzip contents are; then filled again with the same rows keeping none. The
# difference is what N inline contents cost the database. Prints a Markdown table, also saved
# to target/bench/inline-size.md. A benchmark: it measures, it asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
in_pg_virtualenv "$@"
n=${1:-1000000}
bytes=${INLINE_BYTES:-2048}
cargo build --release --locked -q -p s3dedup-api
bin="$PWD/target/release"
bench_work inline-size
url=$(pg_conninfo)
port=$(free_port)

# The rows of N files over N contents (SQLite's dialect).
fill_sql() {
    cat <<SQL
INSERT INTO blobs (digest, logical_size, stored_size, refcount, state, unreferenced_since,
                   created_at)
SELECT printf('%064x', value), $bytes * 2, $bytes, 1, 'live', NULL, 1700000000
FROM generate_series(1, $n);
INSERT INTO files (path, version, digest)
SELECT '/p' || (value % 1000) || '/f' || value, 1700000000, printf('%064x', value)
FROM generate_series(1, $n);
SQL
}

sqlite_size() { # inline|objects
    local dir="$work/sqlite-$RANDOM"
    env -i PATH="$PATH" RUST_LOG=warn "$bin/s3dedup-api" --listen "127.0.0.1:$port" \
        --data-dir "$dir" 2>> "$work/api.log" &
    local pid=$!
    for _ in $(seq 300); do curl -sf -o /dev/null "http://127.0.0.1:$port/status" && break; sleep 0.1; done
    kill "$pid"; wait "$pid" 2>/dev/null || true
    { fill_sql
      [ "$1" = objects ] || echo "INSERT INTO blob_contents (digest, content)
          SELECT printf('%064x', value), randomblob($bytes) FROM generate_series(1, $n);"
      echo "PRAGMA wal_checkpoint(TRUNCATE);"; } |
        sqlite3 -bail "$dir/metadata.sqlite3" > /dev/null
    stat -c %s "$dir/metadata.sqlite3"
    rm -rf "$dir"
}

pg_size() { # schema content-expression (PostgreSQL keeps a content in its blob row)
    start_api "$1"   # makes the schema
    stop_api
    { echo "SET search_path TO $1;"
      fill_sql | sed -e "s/printf('%064x', value)/lpad(to_hex(value), 64, '0')/g" \
          -e "s/generate_series(1, $n)/generate_series(1, $n) AS g(value)/" \
          -e "s/created_at)\$/created_at, content)/" -e "s#1700000000\$#1700000000, $2#"
      echo "VACUUM ANALYZE; CHECKPOINT;"; } | psql -q -v ON_ERROR_STOP=1
    psql -tAq -c "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = '$1' AND c.relkind = 'r'"
}

echo "filling SQLite with $n contents, $bytes bytes each in their rows, then none"
sqlite_inline=$(sqlite_size inline)
sqlite_object=$(sqlite_size objects)
# md5 of a random number: 16 bytes that do not compress, as gzip does not.
pg_random="(SELECT decode(string_agg(md5(random()::text || value || k), ''), 'hex') FROM generate_series(1, $bytes / 16) AS k)"
echo "filling PostgreSQL with $n contents, $bytes bytes each in their rows, then none"
pg_inline=$(pg_size inline_rows "$pg_random")
pg_object=$(pg_size object_rows "NULL")

mb() { python3 -c "print(f'{$1 / 1e6:,.0f}')"; }
per_million() { python3 -c "print(f'{($1 - $2) / $n * 1e6 / 1e9:,.2f}')"; }
per_content() { python3 -c "print(f'{($1 - $2) / $n:,.0f}')"; }
mkdir -p target/bench
{
    echo "$n files over $n distinct contents of $bytes stored bytes."
    echo
    echo "| backend | database, contents inline (MB) | database, contents as objects (MB) | growth per million inline contents (GB) | bytes per inline content |"
    echo "|---|---:|---:|---:|---:|"
    echo "| SQLite | $(mb "$sqlite_inline") | $(mb "$sqlite_object") | $(per_million "$sqlite_inline" "$sqlite_object") | $(per_content "$sqlite_inline" "$sqlite_object") |"
    echo "| PostgreSQL | $(mb "$pg_inline") | $(mb "$pg_object") | $(per_million "$pg_inline" "$pg_object") | $(per_content "$pg_inline" "$pg_object") |"
} | tee target/bench/inline-size.md
