#!/usr/bin/env bash
# Builds the Debian packages into target/debian/:  debian/build.sh
# Needs: debhelper (apt-get install debhelper), cargo. Checks that the package version is the
# workspace version.
set -euo pipefail
cd "$(dirname "$0")/.."
crate=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
deb=$(dpkg-parsechangelog -S Version)
if [ "${deb%%-*}" != "$crate" ]; then
    echo "debian/changelog says $deb but Cargo.toml says $crate: update debian/changelog" >&2
    exit 1
fi
# debhelper skips steps it has stamps for; drop them (not cargo's cache) so every run rebuilds.
rm -rf debian/debhelper-build-stamp debian/.debhelper debian/files debian/*.substvars \
    debian/s3dedup debian/s3dedup-api debian/s3dedup-cleaner debian/s3dedup-migrator
dpkg-buildpackage -b -us -uc --no-pre-clean
mkdir -p target/debian
arch=$(dpkg --print-architecture)
for p in s3dedup_"${deb}"_all s3dedup-api_"${deb}"_"$arch" s3dedup-cleaner_"${deb}"_"$arch" s3dedup-migrator_"${deb}"_"$arch"; do
    mv -f "../$p.deb" target/debian/
done
rm -f ../s3dedup_"${deb}"_"$arch".buildinfo ../s3dedup_"${deb}"_"$arch".changes ../s3dedup-*dbgsym*.deb
ls -l target/debian/*.deb
