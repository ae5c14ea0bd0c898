#!/usr/bin/env bash
# Multi-core scaling of the bdev layer and the reactors: bdevperf on a null and a malloc bdev
# with 1, 2, 4, ... cores (`-m` masks of the first N cores; one job per core on the same bdev,
# each with its own channel), 4 KiB random reads at queue depth 128. Prints IOPS per core count
# and the scaling efficiency: IOPS(N) / (N * IOPS(1)), where 1.0 is linear (the goal: at
# least 0.9 per added core).
#
# Usage: benches/scaling.sh
# Environment (defaults in brackets):
#   CORES       core counts to run ["1 2 4 8 16", cut to what this machine has]
#   RUNTIME_S   seconds per run [5]
#   QUEUE_DEPTH [128]
#   BDEVPERF    the bdevperf binary [built with cargo build --release]
#
# Needs jq. Writes nothing outside a temp folder. A shared machine is noisy: compare the ratios
# of one run, and run it more than once.
set -euo pipefail

RUNTIME_S=${RUNTIME_S:-5}
QUEUE_DEPTH=${QUEUE_DEPTH:-128}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

die() {
    echo "scaling: $*" >&2
    exit 1
}

command -v jq >/dev/null || die "needs jq (apt-get install jq)"
online=$(nproc)
CORES=${CORES:-1 2 4 8 16}
counts=()
for n in $CORES; do
    ((n <= online)) && counts+=("$n")
done
((${#counts[@]})) || die "no core count in '$CORES' fits this machine's $online cores"

if [[ -z "${BDEVPERF:-}" ]]; then
    (cd "$ROOT" && cargo build --release -q -p pollux-bdevperf) || die "building bdevperf failed"
    BDEVPERF=${CARGO_TARGET_DIR:-$ROOT/target}/release/bdevperf
fi

# mask N: the first N cores as a hex mask.
mask() {
    printf '0x%x' $(((1 << $1) - 1))
}

# config FILE METHOD PARAMS: one bdev.
config() {
    cat >"$1" <<EOF
{"subsystems": [{"subsystem": "bdev", "config": [{"method": "$2", "params": $3}]}]}
EOF
}
config "$WORK/null.json" bdev_null_create '{"name": "Null0", "num_blocks": 2097152, "block_size": 512}'
config "$WORK/malloc.json" bdev_malloc_create '{"name": "Malloc0", "num_blocks": 131072, "block_size": 4096}'

# run CONFIG CORES: total IOPS of every job.
run() {
    local json="$WORK/result.json"
    NO_COLOR=1 "$BDEVPERF" --no-huge -c "$1" -m "$(mask "$2")" -q "$QUEUE_DEPTH" -o 4096 \
        -w randread -t "$RUNTIME_S" --json "$json" >"$WORK/out" 2>&1 ||
        die "bdevperf -c $1 -m $(mask "$2") failed: $(tail -5 "$WORK/out")"
    jq '.total.iops' "$json"
}

echo "bdevperf scaling: 4 KiB randread, QD $QUEUE_DEPTH per job, one job per core, $RUNTIME_S s per run"
echo "  $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'), $online cores online, $(date -u +%F)"
printf '%-8s %6s %14s %12s %12s\n' bdev cores IOPS per-core efficiency
for bdev in null malloc; do
    base=""
    for n in "${counts[@]}"; do
        iops=$(run "$WORK/$bdev.json" "$n")
        [[ -n "$base" ]] || base=$iops
        awk -v b="$bdev" -v n="$n" -v i="$iops" -v base="$base" 'BEGIN {
            printf "%-8s %6d %14.0f %12.0f %12.2f\n", b, n, i, i / n, i / (n * base)
        }'
    done
done
