#!/usr/bin/env bash
# Installs the Debian packages Pollux needs to build (hwloc for topology, through hwlocality;
# g++ for libFuzzer, which the fuzz/ member's libfuzzer-sys compiles) and, with --test, to run its checks (shellcheck; qemu-system-common for qemu-storage-daemon,
# the vhost-user-blk back-end of crates/virtio's tests). Installs only what is missing.
# The QEMU packages and the guest kernel are scripts/vm-test.sh's business.
set -euo pipefail

packages=(libhwloc-dev libudev-dev pkg-config g++)
[[ ${1:-} == --test ]] && packages+=(shellcheck qemu-system-common)

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
        missing+=("$package")
done
((${#missing[@]})) || exit 0

echo "installing ${missing[*]}" >&2
sudo_cmd=()
[[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
"${sudo_cmd[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}"
