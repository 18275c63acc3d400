#!/usr/bin/env bash
# Side-by-side benchmark, one run:  tests/bench/run.sh [--small-ops N] [--large-mib N] [--list-files N]
# Starts on loopback, each on fresh data: s3dedup-api on the local store, s3dedup-api on a real
# S3 server process (tests/s3-test-server), the old Python filetracker-server (PyPI
# filetracker==2.3.3), and the S3 server alone as the ceiling for a proxy. Drives identical
# workloads (tests/bench/main.rs) and prints a Markdown table, also saved to
# target/bench/report.md. Release builds. Ends every process it started.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${TESTS_VENV:-target/test-venv}"
if ! "$venv/bin/python" -c 'import filetracker' 2>/dev/null; then
    echo "needs the test venv with filetracker: run tests/run-all.sh once (or set TESTS_VENV)" >&2
    exit 2
fi
venv=$(cd "$venv" && pwd)
# Separate builds: `--bin` would otherwise filter the other packages' binaries out too.
cargo build --release --locked -q -p s3dedup-api -p s3-test-server
cargo build --release --locked -q -p s3dedup-tests --bin s3dedup-bench
bin=target/release
work=$(mktemp -d /var/tmp/s3dedup-bench.XXXXXX)
pids=()
mounted=
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null
    if [ -n "$mounted" ]; then umount "$work" && rm -f "$work.img"; fi
    rm -rf "$work"
}
trap cleanup EXIT
# Every server's data on a fresh filesystem in a sparse image, of the kind of this machine's
# root (ext4 without a journal): such an ext4 skips every inode deleted in the last minutes when
# it creates a file, so on a reused filesystem a run would pay for the files the previous run
# deleted. (A journal on a loop device would make every flush write twice, which the servers
# that flush, and only they, would pay for.) Needs root and a loop device; otherwise the data
# stay on /var/tmp, as the report's first line says.
fs_note="/var/tmp ($(findmnt -no FSTYPE --target /var/tmp 2>/dev/null || echo unknown))"
if [ "$(id -u)" = 0 ] && [ -z "${BENCH_NO_LOOP:-}" ] && truncate -s 100G "$work.img" &&
    mkfs.ext4 -q -O ^has_journal -E lazy_itable_init=1,nodiscard "$work.img" 2>/dev/null &&
    mount -o loop "$work.img" "$work" 2>/dev/null; then
    mounted=1
    fs_note="a fresh ext4 without a journal in a loop-mounted sparse image"
else
    rm -f "$work.img"
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.05; done; echo "no answer from $1" >&2; exit 1; }

# The S3 server (fresh root, one bucket).
"$bin/s3-test-server" --bucket s3dedup-test "$work/s3" > "$work/s3.addr" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/s3.addr" ] && break; sleep 0.05; done
s3="http://$(sed 's/listening on //' "$work/s3.addr")"

start_api() { # name port extra-env...
    local name=$1 port=$2; shift 2
    env -i PATH="$PATH" RUST_LOG=warn "$@" "$bin/s3dedup-api" --listen "127.0.0.1:$port" \
        --data-dir "$work/$name" 2> "$work/$name.log" &
    pids+=($!)
    echo $! > "$work/$name.pid"
    wait_http "http://127.0.0.1:$port/status"
}
p_local=$(free_port); start_api local "$p_local"
p_s3=$(free_port); start_api s3 "$p_s3" S3DEDUP_STORE__BACKEND=s3 S3DEDUP_STORE__S3__BUCKET=s3dedup-test \
    S3DEDUP_STORE__S3__ENDPOINT="$s3" S3DEDUP_STORE__S3__ACCESS_KEY_ID=test-access-key \
    S3DEDUP_STORE__S3__SECRET_ACCESS_KEY=test-secret-key

# The old server: gunicorn with gevent workers, as deployed.
p_old=$(free_port)
mkdir -p "$work/old"
PATH="$venv/bin:$PATH" "$venv/bin/filetracker-server" -d "$work/old" -l 127.0.0.1 -p "$p_old" -D \
    -L "$work/old.log" &
pids+=($!)
old_pid=$!
wait_http "http://127.0.0.1:$p_old/version/"

mkdir -p target/bench
echo "Servers' data on $fs_note." | tee target/bench/report.md
echo | tee -a target/bench/report.md
"$bin/s3dedup-bench" \
    --target "s3dedup-local=http://127.0.0.1:$p_local@$(cat "$work/local.pid")" \
    --target "s3dedup-s3=http://127.0.0.1:$p_s3@$(cat "$work/s3.pid")" \
    --target "old=http://127.0.0.1:$p_old@$old_pid" \
    --baseline old --s3 "$s3" "$@" | tee -a target/bench/report.md
