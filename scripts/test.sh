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

# Build dependencies: hwloc for topology (through hwlocality), pkg-config to find it.
# The QEMU packages are installed by scripts/vm-test.sh, which needs them.
need_packages=()
for package in libhwloc-dev libudev-dev pkg-config shellcheck; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
        need_packages+=("$package")
done
if ((${#need_packages[@]})); then
    step "installing ${need_packages[*]}"
    sudo_cmd=()
    [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${need_packages[@]}"
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "shellcheck"
shellcheck scripts/*.sh scripts/vm/*.sh tests/setup/*.sh .ci/run
shellcheck --shell=bash scripts/vm/*.conf

step "scripts/setup.sh decisions on fake sysfs trees"
bash tests/setup/run.sh

step "cargo tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
    cargo test --workspace --doc
else
    cargo test --workspace --no-fail-fast
fi

step "benches build"
cargo bench --workspace --no-run

if [[ ${SKIP_VM:-0} == 1 && ${CI:-} != true ]]; then
    step "QEMU suites skipped (SKIP_VM=1)"
else
    step "QEMU suites"
    scripts/vm-test.sh all
fi
step "all tests passed"
