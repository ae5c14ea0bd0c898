#!/usr/bin/env bash
# Pollux's aio and uring bdevs next to fio's libaio and io_uring engines, on the same file:
# 4 KiB random reads, queue depth 128, one job pinned to core 0. Two passes:
#
#   page cache  the file is read into the page cache first and both sides read it buffered
#               (fio --direct=0 --invalidate=0, the bdevs' "direct": false). io_uring serves a
#               cached read inline, in the submitter's own system call, so the device is as
#               fast as one core can ask: what is left to compare is the cost of each engine's
#               submission and completion path (the 4 KiB copy out of the cache is the same
#               for both). This is the pass the issue's ratio is about.
#   O_DIRECT    O_DIRECT where the file system allows it, as a deployment on a disk runs: the
#               reads reach the block device. On a device slower than one core's submission
#               path (this project's VMs: a virtio disk at 75-95 K IOPS) both engines run at
#               the device's rate and the ratio is about 1.0 whatever the engines cost.
#
# Each pass prints IOPS per engine and the ratio Pollux / fio, plus a row for the uring bdev
# with bdevperf --interrupt-mode (the reactor sleeps on the ring's completion eventfd instead
# of busy-polling; the aio bdev has no completion fd, so it gets no such row) and one for fio's
# io_uring engine tuned as far as its options go (registered file and buffers, submissions in
# batches of up to 32, completions reaped up to 128 at a time, no per-I/O clock reads: what a
# fio user chasing IOPS sets) against the poll-mode figure.
#
# fio's io_uring engine (3.33+) sets its ring up with SINGLE_ISSUER | DEFER_TASKRUN |
# COOP_TASKRUN; the uring bdev uses SINGLE_ISSUER | DEFER_TASKRUN too, so the default rows
# compare like with like.
#
# The default file lives on a disk file system (/var/tmp), where O_DIRECT reads reach the
# block layer and io_uring issues them inline, as for a real deployment on a disk. On tmpfs
# (FILE=/dev/shm/...) io_uring hands every read to an io-wq worker thread, which a
# busy-polling reactor pinned to the same core competes with (docs/performance.md).
#
# Usage: benches/compare-aio.sh
# Environment (defaults in brackets):
#   FILE        the backing file [/var/tmp/pollux-compare-aio.img], created if absent or
#               of another size, filled with zeroes so that every page exists
#   SIZE_MIB    its size [1024]; the page cache pass needs that much free memory
#   PASSES      which passes, in order ["cache direct"]
#   RUNTIME_S   seconds per run [10]
#   QUEUE_DEPTH [128]
#   BDEVPERF    the bdevperf binary [built once with cargo build --release]
#   KEEP_FILE   1 keeps the file afterwards [0]
#
# Needs fio, jq and a kernel with io_uring. Writes nothing outside FILE and a temp folder.

set -euo pipefail

FILE=${FILE:-/var/tmp/pollux-compare-aio.img}
SIZE_MIB=${SIZE_MIB:-1024}
PASSES=${PASSES:-cache direct}
RUNTIME_S=${RUNTIME_S:-10}
QUEUE_DEPTH=${QUEUE_DEPTH:-128}
IO_SIZE_BYTES=4096
KEEP_FILE=${KEEP_FILE:-0}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mktemp -d)

cleanup() {
    rm -rf "$WORK"
    if [[ "$KEEP_FILE" != 1 ]]; then
        rm -f "$FILE"
    fi
}
trap cleanup EXIT

die() {
    echo "compare-aio: $*" >&2
    exit 1
}

for tool in fio jq; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done

if [[ -z "${BDEVPERF:-}" ]]; then
    echo "building bdevperf (release, once)..." >&2
    (cd "$ROOT" && cargo build --release -p pollux-bdevperf --quiet) ||
        die "cargo build --release -p pollux-bdevperf failed"
    BDEVPERF="${CARGO_TARGET_DIR:-$ROOT/target}/release/bdevperf"
fi
[[ -x "$BDEVPERF" ]] || die "no bdevperf binary at $BDEVPERF"

size_bytes=$((SIZE_MIB * 1024 * 1024))
if [[ ! -f "$FILE" ]] || [[ $(stat -c %s "$FILE") -ne $size_bytes ]]; then
    echo "writing $SIZE_MIB MiB to $FILE..." >&2
    dd if=/dev/zero of="$FILE" bs=1M count="$SIZE_MIB" status=none ||
        die "cannot write $FILE"
fi

# O_DIRECT where the file system allows it (tmpfs does since Linux 6.6).
direct_allowed=0
if dd if="$FILE" of=/dev/null bs="$IO_SIZE_BYTES" count=1 iflag=direct status=none 2>/dev/null; then
    direct_allowed=1
fi
direct=$direct_allowed

# DMA memory for bdevperf: hugepages when the host has free ones.
huge_args=()
if [[ $(awk '/^HugePages_Free/ {print $2}' /proc/meminfo) == 0 ]]; then
    huge_args=(--no-huge)
fi

# fio_iops ENGINE [FIO ARGS...]: IOPS of one fio run.
fio_iops() {
    local engine=$1 out="$WORK/fio-$1-$#.json"
    shift
    fio --name="randread-$engine" --filename="$FILE" --ioengine="$engine" \
        --rw=randread --bs="$IO_SIZE_BYTES" --iodepth="$QUEUE_DEPTH" --direct="$direct" \
        --invalidate=$((1 - cached)) \
        --numjobs=1 --time_based --runtime="$RUNTIME_S" --cpus_allowed=0 \
        --norandommap --randrepeat=0 "$@" --output-format=json --output="$out" >/dev/null ||
        die "fio --ioengine=$engine failed (see $out)"
    jq '.jobs[0].read.iops' "$out"
}

# pollux_iops METHOD NAME [BDEVPERF ARGS...]: IOPS of one bdevperf run on a bdev made by
# METHOD.
pollux_iops() {
    local method=$1 name=$2 config="$WORK/$2.json" out="$WORK/bdevperf-$2.json"
    shift 2
    jq -n --arg method "$method" --arg name "$name" --arg file "$FILE" \
        --argjson block "$IO_SIZE_BYTES" \
        --argjson direct "$([[ $cached == 1 ]] && echo false || echo true)" \
        '{subsystems: [{subsystem: "bdev", config: [
            {method: $method, params: {name: $name, filename: $file, block_size: $block,
                                       direct: $direct}}]}]}' \
        >"$config"
    "$BDEVPERF" -c "$config" -q "$QUEUE_DEPTH" -o "$IO_SIZE_BYTES" -w randread \
        -t "$RUNTIME_S" -m 0x1 "${huge_args[@]}" "$@" --json "$out" >"$WORK/bdevperf-$name.log" 2>&1 ||
        die "bdevperf on $method failed: $(tail -n 5 "$WORK/bdevperf-$name.log")"
    jq '.total.iops' "$out"
}

ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'
}

cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
summary=()

# run_pass NAME: the six runs of one pass and its table.
run_pass() {
    local pass=$1 label
    case "$pass" in
    cache)
        cached=1 direct=0 label="page cache (buffered, file cached first)"
        cat "$FILE" >/dev/null
        ;;
    direct)
        cached=0 direct=$direct_allowed label="O_DIRECT (direct=$direct_allowed)"
        ;;
    *) die "unknown pass '$pass' (PASSES: cache, direct)" ;;
    esac
    echo "running ($label): fio libaio, Pollux aio, fio io_uring, Pollux uring, Pollux uring --interrupt-mode, fio io_uring tuned (${RUNTIME_S} s each)..." >&2
    local fio_libaio pollux_aio fio_uring pollux_uring pollux_uring_intr fio_uring_tuned
    fio_libaio=$(fio_iops libaio)
    pollux_aio=$(pollux_iops bdev_aio_create Aio0)
    fio_uring=$(fio_iops io_uring)
    pollux_uring=$(pollux_iops bdev_uring_create Uring0)
    pollux_uring_intr=$(pollux_iops bdev_uring_create UringIntr0 --interrupt-mode)
    fio_uring_tuned=$(fio_iops io_uring --registerfiles=1 --fixedbufs=1 \
        --iodepth_batch_submit=32 --iodepth_batch_complete_max="$QUEUE_DEPTH" --gtod_reduce=1)

    echo
    echo "$label: randread ${IO_SIZE_BYTES} B, queue depth $QUEUE_DEPTH, 1 job on core 0, ${RUNTIME_S} s"
    echo "file: $FILE (${SIZE_MIB} MiB); CPU: $cpu; kernel $(uname -r)"
    printf '%-20s %14s %14s %12s\n' engine "fio IOPS" "Pollux IOPS" "Pollux/fio"
    printf '%-20s %14.0f %14.0f %12s\n' aio "$fio_libaio" "$pollux_aio" "$(ratio "$pollux_aio" "$fio_libaio")"
    printf '%-20s %14.0f %14.0f %12s\n' io_uring "$fio_uring" "$pollux_uring" "$(ratio "$pollux_uring" "$fio_uring")"
    printf '%-20s %14.0f %14.0f %12s\n' "io_uring (interrupt)" "$fio_uring" "$pollux_uring_intr" \
        "$(ratio "$pollux_uring_intr" "$fio_uring")"
    printf '%-20s %14.0f %14.0f %12s\n' "io_uring (fio tuned)" "$fio_uring_tuned" "$pollux_uring" \
        "$(ratio "$pollux_uring" "$fio_uring_tuned")"
    summary+=("$(printf 'uring/fio-io_uring %-10s %s (poll), %s (interrupt), %s (poll vs fio tuned)' \
        "$pass:" "$(ratio "$pollux_uring" "$fio_uring")" "$(ratio "$pollux_uring_intr" "$fio_uring")" \
        "$(ratio "$pollux_uring" "$fio_uring_tuned")")")
}

for pass in $PASSES; do
    run_pass "$pass"
done
echo
printf '%s\n' "${summary[@]}"
