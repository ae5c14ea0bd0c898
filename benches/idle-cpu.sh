#!/usr/bin/env bash
# Interrupt mode, measured: the CPU an idle target uses, and the IOPS a loaded one keeps.
#
# Idle cases (each started, given SETTLE_S to set up, then sampled for SAMPLE_S seconds from
# /proc/PID/stat, utime + stime of all its threads):
#   vhost-malloc   pollux-vhost --interrupt-mode, a malloc bdev exported as vhost.0
#   vhost-aio      pollux-vhost --interrupt-mode, an aio bdev on a temp file, exported
#   vhost-virtio   pollux-vhost --interrupt-mode, a virtio_blk bdev attached to a
#                  qemu-storage-daemon vhost-user-blk export (null-co), exported again
#   bdevperf-z     bdevperf -z --interrupt-mode, waiting for perform_tests
# No front-end is connected to the exported controllers. Each case fails above LIMIT_PCT
# percent of one core.
#
# Loaded case: bdevperf on a malloc bdev (4 KiB randread, QD 128, LOAD_S seconds), poll mode
# then interrupt mode, one after the other; the IOPS ratio interrupt / poll is printed (a
# ratio within one run: the machine may be shared).
#
# Usage: benches/idle-cpu.sh            (about a minute with the defaults)
# Environment (defaults in brackets):
#   SAMPLE_S      idle sampling time per case [10]
#   SETTLE_S      time a case gets to start before sampling [1]
#   LOAD_S        bdevperf run time per loaded run [5]
#   LIMIT_PCT     idle CPU limit per case, percent of one core [1]
#   CASES         idle cases to run ["vhost-malloc vhost-aio vhost-virtio bdevperf-z"]
#   CORE          the core every process runs on [0]
#   POLLUX_VHOST  the pollux-vhost binary  } built with cargo build --release when unset
#   BDEVPERF      the bdevperf binary      }
#
# Needs qemu-storage-daemon for vhost-virtio (Debian's qemu-system-common; the case is skipped
# with a note without it) and jq. Runs as root (--no-huge locks memory). Writes nothing outside
# a temp folder.

set -euo pipefail

SAMPLE_S=${SAMPLE_S:-10}
SETTLE_S=${SETTLE_S:-1}
LOAD_S=${LOAD_S:-5}
LIMIT_PCT=${LIMIT_PCT:-1}
CASES=${CASES:-vhost-malloc vhost-aio vhost-virtio bdevperf-z}
CORE=${CORE:-0}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mktemp -d)
PIDS=()

die() {
    echo "idle-cpu: $*" >&2
    exit 1
}

stop_all() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}

# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
    stop_all
    rm -rf "$WORK"
}
trap cleanup EXIT

command -v jq >/dev/null || die "jq not found: apt-get install jq"

target_dir=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ -z "${POLLUX_VHOST:-}" || -z "${BDEVPERF:-}" ]]; then
    (cd "$ROOT" && cargo build --release -q -p pollux-vhost-app -p pollux-bdevperf) ||
        die "building pollux-vhost and bdevperf failed"
fi
POLLUX_VHOST=${POLLUX_VHOST:-$target_dir/release/pollux-vhost}
BDEVPERF=${BDEVPERF:-$target_dir/release/bdevperf}
CLK_TCK=$(getconf CLK_TCK)

# cpu_ticks PID: utime + stime of the process (all threads), in clock ticks. The fields
# after the command name, which may hold spaces, start at field 3 (state).
cpu_ticks() {
    local stat
    stat=$(<"/proc/$1/stat") || return 1
    stat=${stat##*) }
    # shellcheck disable=SC2086 # split into fields on purpose
    set -- $stat
    echo $((${12} + ${13}))
}

# wait_for PATH PID: waits (10 s at most) until PATH exists while PID lives.
wait_for() {
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -e "$1" ]] && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# start_vhost NAME BDEV_JSON: pollux-vhost --interrupt-mode exporting Disk0 as vhost.0.
start_vhost() {
    local name=$1 bdev=$2 dir=$WORK/$1
    mkdir -p "$dir"
    cat >"$dir/config.json" <<EOF
{"subsystems": [
  {"subsystem": "bdev", "config": [$bdev]},
  {"subsystem": "vhost_blk", "config": [
    {"method": "vhost_create_blk_controller", "params": {"ctrlr": "vhost.0", "dev_name": "Disk0"}}
  ]}
]}
EOF
    taskset -c "$CORE" "$POLLUX_VHOST" --interrupt-mode -m "[$CORE]" --no-huge -s 128 \
        -S "$dir" -r "$dir/rpc.sock" -c "$dir/config.json" >"$dir/log" 2>&1 &
    PIDS+=($!)
    wait_for "$dir/vhost.0" "$!" || {
        cat "$dir/log" >&2
        die "$name: pollux-vhost did not create its controller"
    }
    TARGET=$!
}

# start_qsd: qemu-storage-daemon exporting a null-co disk as vhost-user-blk at $WORK/qsd.sock.
start_qsd() {
    qemu-storage-daemon --blockdev "driver=null-co,node-name=disk,size=$((64 << 20))" \
        --export "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=$WORK/qsd.sock,writable=on,num-queues=1" \
        >"$WORK/qsd.log" 2>&1 &
    PIDS+=($!)
    wait_for "$WORK/qsd.sock" "$!" || {
        cat "$WORK/qsd.log" >&2
        die "qemu-storage-daemon did not create its socket"
    }
}

rows=()
failed=0
for case in $CASES; do
    TARGET=
    case "$case" in
    vhost-malloc)
        start_vhost "$case" '{"method": "bdev_malloc_create", "params": {"name": "Disk0", "num_blocks": 131072, "block_size": 512}}'
        ;;
    vhost-aio)
        truncate -s 64M "$WORK/aio.img"
        start_vhost "$case" "{\"method\": \"bdev_aio_create\", \"params\": {\"name\": \"Disk0\", \"filename\": \"$WORK/aio.img\"}}"
        ;;
    vhost-virtio)
        if ! command -v qemu-storage-daemon >/dev/null; then
            rows+=("$(printf '%-14s %10s   %s' "$case" "-" "skipped: no qemu-storage-daemon (apt-get install qemu-system-common)")")
            continue
        fi
        start_qsd
        start_vhost "$case" "{\"method\": \"bdev_virtio_attach_controller\", \"params\": {\"name\": \"Disk0\", \"trtype\": \"user\", \"traddr\": \"$WORK/qsd.sock\", \"dev_type\": \"blk\", \"vq_count\": 1, \"vq_size\": 128}}"
        ;;
    bdevperf-z)
        mkdir -p "$WORK/$case"
        taskset -c "$CORE" "$BDEVPERF" -z --interrupt-mode -m "[$CORE]" --no-huge \
            -r "$WORK/$case/rpc.sock" -q 32 -o 4096 -w randread -t 5 >"$WORK/$case/log" 2>&1 &
        PIDS+=($!)
        wait_for "$WORK/$case/rpc.sock" "$!" || {
            cat "$WORK/$case/log" >&2
            die "bdevperf -z did not create its RPC socket"
        }
        TARGET=$!
        ;;
    *) die "unknown case $case" ;;
    esac
    sleep "$SETTLE_S"
    before=$(cpu_ticks "$TARGET") || die "$case: the process exited"
    sleep "$SAMPLE_S"
    after=$(cpu_ticks "$TARGET") || die "$case: the process exited"
    stop_all
    pct=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v s="$SAMPLE_S" 'BEGIN { printf "%.2f", 100 * t / hz / s }')
    verdict=ok
    if awk -v p="$pct" -v l="$LIMIT_PCT" 'BEGIN { exit !(p > l) }'; then
        verdict="FAIL (limit $LIMIT_PCT%)"
        failed=1
    fi
    rows+=("$(printf '%-14s %9s%%   %s' "$case" "$pct" "$verdict")")
done

# Loaded: bdevperf on its default malloc bdev, poll mode then interrupt mode.
loaded() {
    local json=$WORK/loaded-$1.json
    shift
    taskset -c "$CORE" "$BDEVPERF" -m "[$CORE]" --no-huge -q 128 -o 4096 -w randread \
        -t "$LOAD_S" --json "$json" "$@" >"$json.out" 2>&1 || {
        cat "$json.out" >&2
        die "bdevperf failed ($*)"
    }
    jq -r '.total.iops' "$json"
}
poll_iops=$(loaded poll)
interrupt_iops=$(loaded interrupt --interrupt-mode)
ratio=$(awk -v i="$interrupt_iops" -v p="$poll_iops" 'BEGIN { printf "%.3f", i / p }')

echo
echo "Interrupt mode: idle CPU (utime + stime over ${SAMPLE_S} s, % of one core) and loaded IOPS"
echo "  $(date -u '+%Y-%m-%d %H:%M UTC'), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), core $CORE"
echo
printf '%-14s %10s   %s\n' case "idle CPU" verdict
printf '%s\n' "${rows[@]}"
echo
echo "bdevperf, malloc bdev, 4 KiB randread, QD 128, ${LOAD_S} s each:"
printf '  poll mode       %12.0f IOPS\n' "$poll_iops"
printf '  interrupt mode  %12.0f IOPS\n' "$interrupt_iops"
printf '  interrupt / poll %11s\n' "$ratio"
exit "$failed"
