#!/usr/bin/env bash
# Moving a store off the embedded default, measured:  tests/bench/store-move.sh [FILES]
# FILES (default 100000) small distinct files in a Filetracker v1 directory are imported into a
# store on SQLite and a local directory, which is then moved with
# `s3dedup-migrator --source s3dedup:OLD_CONFIG` to PostgreSQL (a throw-away server from
# pg_virtualenv) and a real S3 server process (tests/s3-test-server); then a final delta with
# nothing changed, and the new store's cleaner at grace 0 and `--verify`. Prints each step's wall
# time and the migrator's peak RSS; saves them to target/bench/store-move.md. Release builds,
# loopback only; ends every process it started. A benchmark: it measures and asserts nothing
# beyond each step exiting 0.
set -euo pipefail
cd "$(dirname "$0")/../.."
files="${1:-100000}"
. tests/bench/lib.sh
in_pg_virtualenv "$@"
cargo build --release --locked -q -p s3dedup-migrator -p s3dedup-cleaner -p s3-test-server
bin="$PWD/target/release"
bench_work move

# Runs a program; prints "seconds peak-RSS-MiB" of that run (its own rusage).
measured() {
    python3 - "$@" <<'EOF'
import resource, subprocess, sys, time
t = time.monotonic()
r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
secs = time.monotonic() - t
if r.returncode != 0:
    sys.exit(f"{sys.argv[1]} exited {r.returncode}:\n{r.stdout[-3000:]}")
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(f"{secs:.1f} {rss:.0f}")
print(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "", file=sys.stderr)
EOF
}

echo "generating $files files"
python3 - "$work/v1/files" "$files" <<'EOF'
import hashlib, os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"p{i % 100}", f"s{i // 100 % 100}")
    os.makedirs(d, exist_ok=True)
    seed = hashlib.sha256(str(i).encode()).hexdigest()
    size = 100 + (i * 37) % 4000
    path = os.path.join(d, f"f{i}.txt")
    with open(path, "w") as f:
        f.write((seed * (size // 64 + 1))[:size])
    os.utime(path, (1_600_000_000 + i, 1_600_000_000 + i))
EOF

"$bin/s3-test-server" --bucket s3dedup-test "$work/s3" > "$work/s3.addr" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/s3.addr" ] && break; sleep 0.05; done
s3="http://$(sed 's/listening on //' "$work/s3.addr")"
cat > "$work/old.toml" <<EOF
data_dir = "$work/old"
EOF
cat > "$work/new.toml" <<EOF
data_dir = "$work/new"
[metadata]
backend = "postgres"
[metadata.postgres]
url = "$(pg_conninfo)"
schema = "store_move_bench"
[locks]
backend = "postgres"
[store]
backend = "s3"
[store.s3]
bucket = "s3dedup-test"
endpoint = "$s3"
access_key_id = "test-access-key"
secret_access_key = "test-secret-key"
EOF
export RUST_LOG=warn
fill=$(measured "$bin/s3dedup-migrator" -c "$work/old.toml" --source "v1:$work/v1")
move=$(measured "$bin/s3dedup-migrator" -c "$work/new.toml" --source "s3dedup:$work/old.toml")
delta=$(measured "$bin/s3dedup-migrator" -c "$work/new.toml" --source "s3dedup:$work/old.toml")
clean=$(measured "$bin/s3dedup-cleaner" -c "$work/new.toml" --grace-secs 0)
verify=$(measured "$bin/s3dedup-cleaner" -c "$work/new.toml" --verify)
read -r t_fill rss_fill <<< "$fill"
read -r t_move rss_move <<< "$move"
read -r t_delta rss_delta <<< "$delta"
read -r t_clean rss_clean <<< "$clean"
read -r t_verify rss_verify <<< "$verify"

mkdir -p target/bench
{
    echo "Moving $files files ($(du -sh "$work/v1" | cut -f1) in a v1 directory) off the embedded default, $(nproc) cores:"
    echo
    echo "| step | wall | peak RSS |"
    echo "|---|---|---|"
    echo "| v1 directory → SQLite + local directory (the store to move) | ${t_fill} s | ${rss_fill} MiB |"
    echo "| SQLite + local → PostgreSQL + S3 (\`--source s3dedup:\`) | ${t_move} s | ${rss_move} MiB |"
    echo "| final delta, nothing changed | ${t_delta} s | ${rss_delta} MiB |"
    echo "| cleaner at grace 0 on the new store | ${t_clean} s | ${rss_clean} MiB |"
    echo "| cleaner --verify on the new store | ${t_verify} s | ${rss_verify} MiB |"
} | tee target/bench/store-move.md
