#!/usr/bin/env bash
# Builds the Debian packages into target/debian/:  debian/build.sh
# Needs what debian/control's Build-Depends names. The Rust toolchain (rust-version in Cargo.toml)
# comes from Debian's rustc and cargo when they are new enough, else from rustup: the build then
# uses the pkg.s3dedup.rustup profile, which drops them from Build-Depends, and checks the
# toolchain on PATH itself. Checks that the package version is the workspace version.
set -euo pipefail
cd "$(dirname "$0")/.."
crate=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
deb=$(dpkg-parsechangelog -S Version)
if [ "${deb%%-*}" != "$crate" ]; then
    echo "debian/changelog says $deb but Cargo.toml says $crate: update debian/changelog" >&2
    exit 1
fi
need=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml | head -1)
profile=()
if ! dpkg-query -W -f='${Version}' rustc 2>/dev/null | grep -q .; then
    have=$(rustc --version 2>/dev/null | awk '{print $2}')
    if [ -z "$have" ] || ! dpkg --compare-versions "$have" ge "$need"; then
        echo "s3dedup needs Rust $need or newer (rust-version in Cargo.toml); found ${have:-no rustc}." >&2
        echo "Install it with rustup, or Debian's rustc and cargo when they are that new." >&2
        exit 1
    fi
    echo "Rust $have from outside Debian (rustup): building with -Ppkg.s3dedup.rustup"
    profile=(-Ppkg.s3dedup.rustup)
fi
# debhelper skips steps it has stamps for; drop them (not cargo's cache) so every run rebuilds.
rm -rf debian/debhelper-build-stamp debian/.debhelper debian/files debian/*.substvars \
    debian/s3dedup debian/s3dedup-api debian/s3dedup-cleaner debian/s3dedup-migrator
dpkg-buildpackage -b -us -uc --no-pre-clean "${profile[@]}"
mkdir -p target/debian
arch=$(dpkg --print-architecture)
for p in s3dedup_"${deb}"_all s3dedup-api_"${deb}"_"$arch" s3dedup-cleaner_"${deb}"_"$arch" s3dedup-migrator_"${deb}"_"$arch"; do
    mv -f "../$p.deb" target/debian/
done
rm -f ../s3dedup_"${deb}"_"$arch".buildinfo ../s3dedup_"${deb}"_"$arch".changes ../s3dedup-*dbgsym*.deb
ls -l target/debian/*.deb
