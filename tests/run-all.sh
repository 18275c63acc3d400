#!/usr/bin/env bash
# Runs every test suite of s3dedup on a fresh Debian 12 machine with Rust, installing what the
# suites need first: Debian packages (PostgreSQL among them), a Python venv with the real
# Filetracker client from PyPI, and the S3 server process the suites start (built from the
# workspace: tests/s3-test-server).
#
#   tests/run-all.sh            everything: format, lint, unit, integration, client, package and
#                               systemd suites (what CI runs)
#   tests/run-all.sh --quick    the edit-test loop: format, lint, unit tests and the API suites
#                               (local store and the S3 test server; nothing to install)
#
# Environment: TESTS_VENV (default target/test-venv) to reuse a venv elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=false
case "${1:-}" in
    --quick) quick=true ;;
    "") ;;
    *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac

step() { printf '\n==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Both tiers start here: formatting, lints, and every binary the suites drive.
check_and_build() {
    step "Formatting (cargo fmt --check)"
    cargo fmt --all -- --check
    step "Lints (cargo clippy --all-targets -D warnings)"
    cargo clippy --workspace --all-targets --locked -- -D warnings
    step "Build every binary (the suites drive the real programs)"
    cargo build --workspace --bins --locked
}

if $quick; then
    check_and_build
    step "Unit tests, then the API suites"
    cargo test --locked -p s3dedup-common -p s3dedup-api -p s3dedup-cleaner -p s3dedup-migrator
    cargo test --locked -p s3dedup-tests --test api --test inline
    step "Quick tier passed (the full run: tests/run-all.sh)"
    exit 0
fi

step "System packages"
# libdb-dev: the Filetracker package builds bsddb3 against it; python3-dev/venv for the venv;
# postgresql: a real server for the metadata and lock suites (pg_virtualenv runs a throw-away one);
# libisal-dev: ISA-L, the fast gzip inflater (the Debian packages require it);
# debhelper, po-debconf, lintian: the Debian packages; systemd-container, debootstrap: a booted systemd.
missing=()
for pkg in libdb-dev python3-venv python3-dev pkg-config libisal-dev postgresql postgresql-common \
           debhelper po-debconf lintian systemd-container debootstrap; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
else
    echo "all present"
fi

step "Python venv with filetracker==2.3.3 (the real client and old server) and moto (an S3 server)"
venv="${TESTS_VENV:-target/test-venv}"
if ! "$venv/bin/python" -c 'import filetracker, pytest, requests, moto.server' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    YES_I_HAVE_THE_RIGHT_TO_USE_THIS_BERKELEY_DB_VERSION=1 \
        "$venv/bin/python" -m pip install -q 'filetracker[server]==2.3.3' 'pytest>=7' requests \
        'moto[server]==5.2.5'
fi
"$venv/bin/python" -c 'import filetracker; print("filetracker client ready")'

check_and_build

step "Rust unit and integration tests, with a throw-away PostgreSQL (pg_virtualenv)"
# Tests that need PostgreSQL are #[ignore]d for a plain `cargo test`; here they all run.
# The soak runs the real client from the venv; the fault suite mounts a small tmpfs (root).
# Suites append their fault and soak counts to TESTS_REPORT, printed at the end.
export TESTS_REPORT="$PWD/target/test-report.txt"
: > "$TESTS_REPORT"
# -t keeps the cluster in a temporary directory of its own, on a port nobody holds: a cluster
# left behind by an interrupted run, or a run beside this one, cannot make this one refuse to start.
pg_port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
TESTS_VENV="$(cd "$venv" && pwd)" PGPORT="$pg_port" pg_virtualenv -t cargo test --workspace --locked -- --include-ignored

step "Filetracker client suite (real client against the real binary: local store, S3, PostgreSQL)"
TESTS_BIN_DIR="$PWD/target/debug" TESTS_NEED_POSTGRES=1 PGPORT="$pg_port" \
    pg_virtualenv -t "$venv/bin/python" -m pytest -q tests/client

step "Debian packages (debian/build.sh) and lintian"
debian/build.sh
# No tag suppressed: a warning fails the run as an error does.
lintian --fail-on error,warning target/debian/*.deb

step "systemd suite: the packages in a booted Debian 12 container (tests/systemd/e2e.sh)"
FT_PIP="$venv/bin/pip" tests/systemd/e2e.sh target/debian/*.deb

step "What the fault, outage and soak suites measured ($TESTS_REPORT)"
cat "$TESTS_REPORT"

step "All suites passed"
