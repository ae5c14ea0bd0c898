#!/usr/bin/env bash
# Runs every Pollux test on a fresh Debian 12 machine: installs what the tests need when it is
# missing (apt packages; scripts/vm-test.sh fetches and caches the guest kernel), then format and
# lint checks, every cargo test, and every QEMU suite.
#
#   scripts/test.sh            everything
#   SKIP_VM=1 scripts/test.sh  everything but the QEMU suites (a quick local loop; CI never sets it)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

step() { printf '\n==> %s\n' "$*"; }

step "build and test dependencies"
scripts/install-deps.sh --test

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "shellcheck"
shellcheck scripts/*.sh scripts/vm/*.sh tests/setup/*.sh benches/*.sh .ci/run
shellcheck --shell=bash scripts/vm/*.conf

step "scripts/setup.sh decisions on fake sysfs trees"
bash tests/setup/run.sh

step "cargo build --workspace --bins (pollux-vhost for crates/virtio's tests)"
cargo build --workspace --bins

step "cargo tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
    cargo test --workspace --doc
else
    cargo test --workspace --no-fail-fast
fi

step "bdev QoS rate limits held by bdevperf (scripts/qos-check.sh)"
scripts/qos-check.sh

step "fuzz targets: the checked-in inputs replayed, then 30 s of fuzzing each (scripts/fuzz.sh)"
scripts/fuzz.sh --seconds 30

step "benches build"
cargo bench --workspace --no-run

if [[ ${SKIP_VM:-0} == 1 && ${CI:-} != true ]]; then
    step "QEMU suites skipped (SKIP_VM=1)"
else
    step "QEMU suites"
    scripts/vm-test.sh all
fi
step "all tests passed"
