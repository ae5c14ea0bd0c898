#!/usr/bin/env bash
# Multi-core scaling of the bdev layer and the reactors: bdevperf on a null and a malloc bdev
# with 1, 2, 4, ... cores (`-m` masks of the first N cores; one job per core on the same bdev,
# each with its own channel), 4 KiB random reads at queue depth 128. Prints IOPS per core count
# and the scaling efficiency: IOPS(N) / (N * IOPS(1)), where 1.0 is linear (the goal: at
# least 0.9 per added core).
#
# Then pollux-vhost on the same core counts: the target (one controller over a null or malloc
# bdev, cpumask = all N cores, so its N queues run one per reactor: queue i on reactor i % N)
# and its initiator (bdevperf -> virtio_blk bdev, vq_count N, one job and queue per core) share
# the first N cores. Both run with --interrupt-mode, so that each sleeps while the other works
# on the same core; busy-polling both on shared cores makes the scheduler alternate two
# spinning threads per core and measures its time slice, not Pollux.
#
# Usage: benches/scaling.sh
# Environment (defaults in brackets):
#   CORES       core counts to run ["1 2 4 8 16", cut to what this machine has]
#   RUNTIME_S   seconds per run [5]
#   QUEUE_DEPTH [128]
#   BDEVPERF    the bdevperf binary [built with cargo build --release]
#   VHOST       1 runs the pollux-vhost part [1]
#   POLLUX_VHOST  the pollux-vhost binary [built with cargo build --release]
#
# Needs jq. Writes nothing outside a temp folder. A shared machine is noisy: compare the ratios
# of one run, and run it more than once.
set -euo pipefail

RUNTIME_S=${RUNTIME_S:-5}
QUEUE_DEPTH=${QUEUE_DEPTH:-128}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VHOST=${VHOST:-1}
WORK=$(mktemp -d)
TARGET_PID=
cleanup() {
    if [[ -n "$TARGET_PID" ]]; then
        kill "$TARGET_PID" 2>/dev/null || true
        wait "$TARGET_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

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
if [[ $VHOST == 1 && -z "${POLLUX_VHOST:-}" ]]; then
    (cd "$ROOT" && cargo build --release -q -p pollux-vhost-app) || die "building pollux-vhost failed"
    POLLUX_VHOST=${CARGO_TARGET_DIR:-$ROOT/target}/release/pollux-vhost
fi

# mask N: the first N cores as a hex mask.
mask() {
    printf '0x%x' $(((1 << $1) - 1))
}

# bdev_entry BDEV: the config entry of the bdev under test (null or malloc), named Disk0.
bdev_entry() {
    case $1 in
    null) echo '{"method": "bdev_null_create", "params": {"name": "Disk0", "num_blocks": 2097152, "block_size": 512}}' ;;
    malloc) echo '{"method": "bdev_malloc_create", "params": {"name": "Disk0", "num_blocks": 131072, "block_size": 4096}}' ;;
    esac
}

# bdevperf_run BDEV N: total IOPS of bdevperf's jobs on the first N cores.
bdevperf_run() {
    local json="$WORK/result.json"
    echo "{\"subsystems\": [{\"subsystem\": \"bdev\", \"config\": [$(bdev_entry "$1")]}]}" >"$WORK/bdev.json"
    NO_COLOR=1 "$BDEVPERF" --no-huge -c "$WORK/bdev.json" -m "$(mask "$2")" -q "$QUEUE_DEPTH" -o 4096 \
        -w randread -t "$RUNTIME_S" --json "$json" >"$WORK/out" 2>&1 ||
        die "bdevperf on $1, -m $(mask "$2") failed: $(tail -5 "$WORK/out")"
    jq '.total.iops' "$json"
}

# table RUN: for each bdev and core count, IOPS from `RUN BDEV N`, per core, and efficiency.
table() {
    printf '%-8s %6s %14s %12s %12s\n' bdev cores IOPS per-core efficiency
    local bdev n iops base
    for bdev in null malloc; do
        base=""
        for n in "${counts[@]}"; do
            iops=$("$1" "$bdev" "$n")
            [[ -n "$base" ]] || base=$iops
            awk -v b="$bdev" -v n="$n" -v i="$iops" -v base="$base" 'BEGIN {
                printf "%-8s %6d %14.0f %12.0f %12.2f\n", b, n, i, i / n, i / (n * base)
            }'
        done
    done
}

echo "bdevperf scaling: 4 KiB randread, QD $QUEUE_DEPTH per job, one job per core, $RUNTIME_S s per run"
echo "  $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'), $online cores online, $(date -u +%F)"
table bdevperf_run

[[ $VHOST == 1 ]] || exit 0

SOCKET_DIR=$WORK/sock
mkdir -p "$SOCKET_DIR"

# vhost_run BDEV N: IOPS of bdevperf through pollux-vhost, both on the first N cores.
vhost_run() {
    local bdev n=$2 json="$WORK/vhost-result.json"
    bdev=$(bdev_entry "$1")
    cat >"$WORK/target.json" <<EOF
{"subsystems": [
  {"subsystem": "bdev", "config": [$bdev]},
  {"subsystem": "vhost_blk", "config": [{"method": "vhost_create_blk_controller",
    "params": {"ctrlr": "vhost.0", "dev_name": "Disk0", "cpumask": "$(mask "$n")"}}]}
]}
EOF
    cat >"$WORK/initiator.json" <<EOF
{"subsystems": [{"subsystem": "bdev", "config": [{"method": "bdev_virtio_attach_controller",
  "params": {"name": "VirtioBlk0", "trtype": "user", "traddr": "$SOCKET_DIR/vhost.0",
             "dev_type": "blk", "vq_count": $n, "vq_size": 256}}]}]}
EOF
    rm -f "$SOCKET_DIR/vhost.0"
    NO_COLOR=1 "$POLLUX_VHOST" -m "$(mask "$n")" --interrupt-mode --no-huge -S "$SOCKET_DIR" \
        -r "$WORK/rpc.sock" -c "$WORK/target.json" >"$WORK/target.log" 2>&1 &
    TARGET_PID=$!
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -S "$SOCKET_DIR/vhost.0" ]] && break
        kill -0 "$TARGET_PID" 2>/dev/null || die "pollux-vhost exited: $(tail -5 "$WORK/target.log")"
        sleep 0.1
    done
    [[ -S "$SOCKET_DIR/vhost.0" ]] || die "pollux-vhost did not create its socket"
    NO_COLOR=1 "$BDEVPERF" --no-huge --interrupt-mode -c "$WORK/initiator.json" -m "$(mask "$n")" \
        -q "$QUEUE_DEPTH" -o 4096 -w randread -t "$RUNTIME_S" --json "$json" >"$WORK/out" 2>&1 ||
        die "bdevperf through pollux-vhost on $n cores failed: $(tail -5 "$WORK/out")"
    kill -INT "$TARGET_PID"
    wait "$TARGET_PID" || die "pollux-vhost failed: $(tail -5 "$WORK/target.log")"
    TARGET_PID=
    [[ $(jq '.total.io_failed' "$json") == 0 ]] || die "I/Os failed through pollux-vhost"
    jq '.total.iops' "$json"
}

echo
echo "pollux-vhost scaling: bdevperf -> virtio_blk -> pollux-vhost, both --interrupt-mode on the same N cores,"
echo "  one controller with N queues (one per reactor), one bdevperf job per core, QD $QUEUE_DEPTH per job"
table vhost_run
