# Shared by the benchmark scripts (sourced): a work directory under /var/tmp that goes at exit
# together with every process whose PID is in `pids`, and the pg_virtualenv server as a
# conninfo string.
pids=()
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
