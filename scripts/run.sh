#!/usr/bin/env bash
# Builds Pollux (installing its build dependencies when missing) and runs one of its programs:
#
#   scripts/run.sh bdevperf -q 128 -o 4k -w randread -t 5
#   scripts/run.sh pollux-reactor-demo -m 0x3 -t 5
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
program=${1:-bdevperf}
shift || true
case "$program" in
bdevperf) package=pollux-bdevperf ;;
pollux-reactor-demo) package=pollux-reactor-demo ;;
pollux-vfio-probe) package=pollux-vfio-probe ;;
nvme-identify) package=pollux-nvme-identify ;;
*)
    echo "run.sh: unknown program '$program' (bdevperf, nvme-identify, pollux-reactor-demo, pollux-vfio-probe)" >&2
    exit 2
    ;;
esac
"$repo/scripts/install-deps.sh"
cargo build --release --quiet --manifest-path "$repo/Cargo.toml" -p "$package"
exec "$repo/target/release/$program" "$@"
