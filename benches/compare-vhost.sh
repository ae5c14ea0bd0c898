#!/usr/bin/env bash
# vhost-user-blk targets side by side, all driven by the same initiator: bdevperf -> the
# virtio_blk bdev (Pollux's virtio-user front-end) -> the target's socket. 4 KiB random reads
# and random writes at queue depth 128; the target pinned to one core, bdevperf to another.
# Prints IOPS and p99 latency per target and workload, then pollux/qsd (null bdev over
# null-co) per workload when both ran. A run with a failed I/O stops the script.
#
# Targets:
#   qsd-null       qemu-storage-daemon, blockdev null-co (no data moved, as Pollux's null bdev)
#   qsd-file       qemu-storage-daemon, blockdev file over FILE (page cache; aio=threads)
#   pollux-null    pollux-vhost over a null bdev      } when POLLUX_VHOST is built (see
#   pollux-malloc  pollux-vhost over a malloc bdev    } below); skipped with a note otherwise
#
# Usage: benches/compare-vhost.sh
# Environment (defaults in brackets):
#   RUNTIME_S      seconds per run [10]
#   QUEUE_DEPTH    [128]
#   TARGET_CORE    the core the target is pinned to [0]
#   BDEVPERF_CORE  the core bdevperf is pinned to [1]
#   FILE           qsd-file's backing file [/dev/shm/pollux-compare-vhost.img], created
#   SIZE_MIB       the size of FILE and of the null / malloc bdevs [1024; malloc: 512]
#   BDEVPERF       the bdevperf binary [built with cargo build --release]
#   POLLUX_VHOST   the pollux-vhost binary [target/release/pollux-vhost, built when
#                  apps/pollux-vhost exists]
#   TARGETS        which targets to run ["qsd-null qsd-file pollux-null pollux-malloc"]
#   POLLUX_RING    ring layout against pollux-vhost, split or packed [split, as against
#                  qemu-storage-daemon, which offers split rings only]
#
# Needs qemu-storage-daemon (Debian's qemu-system-common), jq and taskset. Writes nothing
# outside FILE and a temp folder.

set -euo pipefail

RUNTIME_S=${RUNTIME_S:-10}
QUEUE_DEPTH=${QUEUE_DEPTH:-128}
TARGET_CORE=${TARGET_CORE:-0}
BDEVPERF_CORE=${BDEVPERF_CORE:-1}
FILE=${FILE:-/dev/shm/pollux-compare-vhost.img}
SIZE_MIB=${SIZE_MIB:-1024}
MALLOC_MIB=${MALLOC_MIB:-512}
TARGETS=${TARGETS:-qsd-null qsd-file pollux-null pollux-malloc}
POLLUX_RING=${POLLUX_RING:-split}
IO_SIZE_BYTES=4096

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mktemp -d)
TARGET_PID=

die() {
    echo "compare-vhost: $*" >&2
    exit 1
}

stop_target() {
    if [[ -n "$TARGET_PID" ]]; then
        kill "$TARGET_PID" 2>/dev/null || true
        wait "$TARGET_PID" 2>/dev/null || true
        TARGET_PID=
    fi
}

cleanup() {
    stop_target
    rm -rf "$WORK"
    rm -f "$FILE"
}
trap cleanup EXIT

[[ $POLLUX_RING == split || $POLLUX_RING == packed ]] || die "POLLUX_RING must be split or packed"
command -v qemu-storage-daemon >/dev/null ||
    die "qemu-storage-daemon not found: apt-get install qemu-system-common"
command -v jq >/dev/null || die "jq not found: apt-get install jq"
command -v taskset >/dev/null || die "taskset not found: apt-get install util-linux"

target_dir=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ -z "${BDEVPERF:-}" ]]; then
    (cd "$ROOT" && cargo build --release -q -p pollux-bdevperf) || die "building bdevperf failed"
    BDEVPERF=$target_dir/release/bdevperf
fi
# --- pollux-vhost hook: the vhost-user-blk target of apps/pollux-vhost. ---------------------
if [[ -z "${POLLUX_VHOST:-}" && -f "$ROOT/apps/pollux-vhost/Cargo.toml" ]]; then
    if (cd "$ROOT" && cargo build --release -q -p pollux-vhost-app); then
        POLLUX_VHOST=$target_dir/release/pollux-vhost
    else
        echo "compare-vhost: building pollux-vhost failed; its rows are skipped" >&2
    fi
fi
POLLUX_VHOST=${POLLUX_VHOST:-}

SOCKET_DIR=$WORK/sockets
mkdir -p "$SOCKET_DIR"
SOCKET=$SOCKET_DIR/vhost.0

wait_for_socket() {
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -S "$SOCKET" ]] && return 0
        kill -0 "$TARGET_PID" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# start_target NAME: starts the target pinned to TARGET_CORE, listening on SOCKET.
start_target() {
    local name=$1 size_bytes=$((SIZE_MIB << 20))
    rm -f "$SOCKET"
    local export="type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=$SOCKET,writable=on,num-queues=1"
    case "$name" in
    qsd-null)
        taskset -c "$TARGET_CORE" qemu-storage-daemon \
            --blockdev "driver=null-co,node-name=disk,size=$size_bytes" \
            --export "$export" >"$WORK/$name.log" 2>&1 &
        ;;
    qsd-file)
        truncate -s "$size_bytes" "$FILE"
        # Every page exists before the run (no allocation inside the measurement).
        dd if=/dev/zero of="$FILE" bs=1M count="$SIZE_MIB" conv=notrunc status=none
        taskset -c "$TARGET_CORE" qemu-storage-daemon \
            --blockdev "driver=file,node-name=disk,filename=$FILE" \
            --export "$export" >"$WORK/$name.log" 2>&1 &
        ;;
    pollux-null | pollux-malloc)
        local bdev packed=false
        [[ $POLLUX_RING == packed ]] && packed=true
        if [[ $name == pollux-null ]]; then
            bdev="{\"method\": \"bdev_null_create\", \"params\": {\"name\": \"Disk0\", \"num_blocks\": $((size_bytes / 512)), \"block_size\": 512}}"
        else
            bdev="{\"method\": \"bdev_malloc_create\", \"params\": {\"name\": \"Disk0\", \"num_blocks\": $(((MALLOC_MIB << 20) / 512)), \"block_size\": 512}}"
        fi
        cat >"$WORK/$name.json" <<EOF
{"subsystems": [
  {"subsystem": "bdev", "config": [$bdev]},
  {"subsystem": "vhost_blk", "config": [
    {"method": "vhost_create_blk_controller", "params": {"ctrlr": "vhost.0", "dev_name": "Disk0", "packed_ring": $packed}}
  ]}
]}
EOF
        taskset -c "$TARGET_CORE" "$POLLUX_VHOST" -m "[$TARGET_CORE]" -S "$SOCKET_DIR" \
            -c "$WORK/$name.json" >"$WORK/$name.log" 2>&1 &
        ;;
    *) die "unknown target $name" ;;
    esac
    TARGET_PID=$!
    wait_for_socket || {
        cat "$WORK/$name.log" >&2
        die "$name did not create $SOCKET"
    }
}

# initiator_config FILE PACKED: the virtio_blk bdev's config (packed_ring is Pollux's extension).
initiator_config() {
    cat >"$1" <<EOF
{"subsystems": [{"subsystem": "bdev", "config": [
  {"method": "bdev_virtio_attach_controller",
   "params": {"name": "VirtioBlk0", "trtype": "user", "traddr": "$SOCKET", "dev_type": "blk",
              "vq_count": 1, "vq_size": 256, "packed_ring": $2}}
]}]}
EOF
}
initiator_config "$WORK/virtio-split.json" false
initiator_config "$WORK/virtio-packed.json" true

rows=()
declare -A iops_of=()
for target in $TARGETS; do
    if [[ $target == pollux-* && -z "$POLLUX_VHOST" ]]; then
        rows+=("$(printf '%-14s %-7s %-10s %12s %12s' "$target" "-" "-" "not built" "-")")
        continue
    fi
    ring="split"
    [[ $target == pollux-* ]] && ring=$POLLUX_RING
    for workload in randread randwrite; do
        start_target "$target"
        json=$WORK/$target-$workload.json
        if ! taskset -c "$BDEVPERF_CORE" "$BDEVPERF" -m "[$BDEVPERF_CORE]" -c "$WORK/virtio-$ring.json" \
            -q "$QUEUE_DEPTH" -o "$IO_SIZE_BYTES" -w "$workload" -t "$RUNTIME_S" \
            --json "$json" >"$WORK/$target-$workload.out" 2>&1; then
            cat "$WORK/$target-$workload.out" >&2
            die "bdevperf failed against $target ($workload)"
        fi
        stop_target
        iops=$(jq -r '.total.iops' "$json")
        p99=$(jq -r '.total.p99_latency_us' "$json")
        failed=$(jq -r '.total.io_failed // 0' "$json")
        [[ "$failed" == 0 ]] || die "$target $workload: $failed I/Os failed"
        iops_of[$target/$workload]=$iops
        rows+=("$(printf '%-14s %-7s %-10s %12.0f %12.1f' "$target" "$ring" "$workload" "$iops" "$p99")")
    done
done

echo
echo "vhost-user-blk targets, driven by bdevperf -> virtio_blk bdev (virtio-user)"
echo "  $(date -u '+%Y-%m-%d %H:%M UTC'), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
echo "  4 KiB, QD $QUEUE_DEPTH, $RUNTIME_S s per run; target on core $TARGET_CORE, bdevperf on core $BDEVPERF_CORE"
echo
printf '%-14s %-7s %-10s %12s %12s\n' target ring workload IOPS "p99 (us)"
printf '%s\n' "${rows[@]}"
# The issue's figure: Pollux over qemu-storage-daemon, both null, one target core each.
for workload in randread randwrite; do
    pollux=${iops_of[pollux-null/$workload]:-}
    qsd=${iops_of[qsd-null/$workload]:-}
    if [[ -n "$pollux" && -n "$qsd" ]]; then
        printf 'pollux/qsd null %-9s %.2f\n' "$workload" "$(jq -n "$pollux / $qsd")"
    fi
done
