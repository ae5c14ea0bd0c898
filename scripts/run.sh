#!/usr/bin/env bash
# Builds Pollux (installing its build dependencies when missing) and runs one of its programs:
#
#   scripts/run.sh pollux-vhost -S /var/tmp --no-huge     (the main job: the default target)
#   scripts/run.sh pollux-rpc vhost_get_controllers
#   scripts/run.sh bdevperf -q 128 -o 4k -w randread -t 5
#   scripts/run.sh pollux-reactor-demo -m 0x3 -t 5
#
# The binary lands in $CARGO_TARGET_DIR/release when CARGO_TARGET_DIR is set, else in
# target/release.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
program=${1:-bdevperf}
shift || true
case "$program" in
bdevperf) package=pollux-bdevperf ;;
pollux-vhost) package=pollux-vhost-app ;;
pollux-rpc) package=pollux-rpc-cli ;;
pollux-reactor-demo) package=pollux-reactor-demo ;;
pollux-vfio-probe) package=pollux-vfio-probe ;;
nvme-identify) package=pollux-nvme-identify ;;
*)
    echo "run.sh: unknown program '$program' (pollux-vhost, pollux-rpc, bdevperf, nvme-identify, pollux-reactor-demo, pollux-vfio-probe)" >&2
    exit 2
    ;;
esac
"$repo/scripts/install-deps.sh"
cargo build --release --quiet --manifest-path "$repo/Cargo.toml" -p "$package"
exec "${CARGO_TARGET_DIR:-$repo/target}/release/$program" "$@"
