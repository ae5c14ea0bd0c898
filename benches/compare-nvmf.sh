#!/usr/bin/env bash
# NVMe/TCP, 4 KiB random reads at QD 128: Pollux's target and initiator next to the Linux
# kernel's nvmet-tcp target and nvme-tcp initiator. Prints IOPS and IOPS per target core.
#
#   (a) host, loopback TCP: pollux-nvmf on one core (-m, a null bdev) and bdevperf through
#       Pollux's NVMe/TCP initiator on another, 10 s. The target is one polled core.
#   (b) one QEMU TCG guest with two vCPUs (scripts/vm-test.sh nvmf-bench, see
#       scripts/vm/nvmf-bench.conf): the kernel's nvmet-tcp on null_blk with the kernel's
#       initiator and fio, then pollux-nvmf + bdevperf, over the guest's loopback: both under
#       the same emulation, so the ratio is like for like.
#
# Per target core: Pollux's target polls one core, so its IOPS per target core is its IOPS.
# The kernel's target has no core of its own (softirq and kworkers on both vCPUs, shared with
# the initiator's receive path); it is given the guest's busy cores minus fio's own CPU, which
# also charges it the kernel initiator's work outside fio's context: an estimate that favours
# Pollux. The whole-system figure (IOPS per busy guest core, both sides, which charges Pollux
# its two polling cores) is printed next to it.
#
# SPDK is not built here (no network access to fetch it): no SPDK column.
#
# Usage: benches/compare-nvmf.sh
# Environment (defaults in brackets):
#   NVMF_BENCH_TIME_S    seconds per run [10]
#   NVMF_BENCH_CORES     host cores for target and initiator, two core numbers ["0 1"]
#   NVMF_BENCH_SKIP_VM   1: only part (a)
#   POLLUX_VM_CACHE      as for scripts/vm-test.sh [<repo>/.cache/vm]
#   CARGO_TARGET_DIR     as for cargo

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE="${POLLUX_VM_CACHE:-$ROOT/.cache/vm}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
TIME_S="${NVMF_BENCH_TIME_S:-10}"
read -r TARGET_CORE INITIATOR_CORE <<<"${NVMF_BENCH_CORES:-0 1}"
PORT=44430
NQN=nqn.2016-06.io.pollux:bench
WORK=$(mktemp -d)
TARGET_PID=""

die() {
    echo "compare-nvmf: $*" >&2
    exit 1
}

cleanup() {
    if [[ -n "$TARGET_PID" ]]; then
        kill -INT "$TARGET_PID" 2>/dev/null || true
        wait "$TARGET_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 > 0) printf "%.2f", a / b; else print "n/a" }'
}

# field LINE KEY: the value of KEY=value in an NVMF-BENCH line.
field() {
    local word
    for word in $1; do
        if [[ "$word" == "$2="* ]]; then
            printf '%s\n' "${word#*=}"
            return 0
        fi
    done
    echo "n/a"
}

cargo build --release -p pollux-nvmf-app -p pollux-bdevperf >&2 || die "cargo build failed"

# (a) On the host.
cat > "$WORK/target.json" <<JSON
{"subsystems": [
  {"subsystem": "bdev", "config": [
    {"method": "bdev_null_create", "params": {"name": "Null0", "num_blocks": 2097152, "block_size": 512}}
  ]},
  {"subsystem": "nvmf", "config": [
    {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
    {"method": "nvmf_create_subsystem", "params": {"nqn": "$NQN", "allow_any_host": true}},
    {"method": "nvmf_subsystem_add_ns", "params": {"nqn": "$NQN", "namespace": {"bdev_name": "Null0"}}},
    {"method": "nvmf_subsystem_add_listener", "params": {"nqn": "$NQN", "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "$PORT"}}}
  ]}
]}
JSON
cat > "$WORK/initiator.json" <<JSON
{"subsystems": [{"subsystem": "bdev", "config": [
  {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme0", "trtype": "TCP",
   "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "$PORT", "subnqn": "$NQN"}}
]}]}
JSON
RUST_LOG=warn "$TARGET_DIR/release/pollux-nvmf" -c "$WORK/target.json" \
    -m "$(printf '0x%x' $((1 << TARGET_CORE)))" --no-huge -s 160 -r "$WORK/rpc.sock" \
    > "$WORK/target.log" 2>&1 &
TARGET_PID=$!
tries=100
until (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do
    tries=$((tries - 1))
    [[ "$tries" -gt 0 ]] || { cat "$WORK/target.log" >&2; die "pollux-nvmf did not listen"; }
    sleep 0.1
done
RUST_LOG=warn "$TARGET_DIR/release/bdevperf" -c "$WORK/initiator.json" -q 128 -o 4k \
    -w randread -t "$TIME_S" -m "$(printf '0x%x' $((1 << INITIATOR_CORE)))" --no-huge \
    --json "$WORK/bdevperf.json" > "$WORK/bdevperf.log" 2>&1 ||
    { cat "$WORK/bdevperf.log" >&2; die "bdevperf failed"; }
host_iops=$(grep -o '"iops": *[0-9.]*' "$WORK/bdevperf.json" | head -n1 | sed 's/.*: *//')
host_iops=${host_iops%.*}
kill -INT "$TARGET_PID"
wait "$TARGET_PID" || true
TARGET_PID=""

cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
echo
echo "NVMe/TCP 4 KiB randread, QD 128. date: $(date -u '+%Y-%m-%d %H:%M UTC'); host CPU: $cpu" \
    "($(nproc) CPUs); host kernel $(uname -r)"
echo "SPDK: not built here (no network access to fetch it), no SPDK figures."
echo
echo "(a) host loopback: pollux-nvmf on core $TARGET_CORE (null bdev), bdevperf on core $INITIATOR_CORE, ${TIME_S} s"
printf '%-34s %12s %22s\n' stack IOPS "IOPS per target core"
printf '%-34s %12s %22s\n' "Pollux target + Pollux initiator" "$host_iops" "$host_iops"

[[ "${NVMF_BENCH_SKIP_VM:-0}" == 1 ]] && exit 0

# (b) In one guest.
NVMF_BENCH_VARIANTS="t$TIME_S" "$ROOT/scripts/vm-test.sh" nvmf-bench >&2 ||
    die "scripts/vm-test.sh nvmf-bench failed"
log_file="$CACHE/logs/nvmf-bench-t$TIME_S.log"
[[ -f "$log_file" ]] || die "no log $log_file"
results=$(tr -d '\r' < "$log_file" | grep '^NVMF-BENCH: ' || true)
kernel=$(grep 'stack=kernel' <<<"$results" || true)
pollux=$(grep 'stack=pollux' <<<"$results" || true)
[[ -n "$kernel" ]] || die "no kernel result in $log_file"
[[ -n "$pollux" ]] || die "no Pollux result in $log_file"
k_iops=$(field "$kernel" iops)
p_iops=$(field "$pollux" iops)
k_busy=$(field "$kernel" busy_cores)
p_busy=$(field "$pollux" busy_cores)
k_target=$(awk -v b="$k_busy" -v f="$(field "$kernel" initiator_cores)" \
    'BEGIN { t = b - f; if (t < 0.01) t = 0.01; printf "%.2f", t }')
k_per_target=$(awk -v i="$k_iops" -v t="$k_target" 'BEGIN { printf "%d", i / t }')
p_per_target=$p_iops
k_per_busy=$(awk -v i="$k_iops" -v t="$k_busy" 'BEGIN { if (t > 0) printf "%d", i / t; else print 0 }')
p_per_busy=$(awk -v i="$p_iops" -v t="$p_busy" 'BEGIN { if (t > 0) printf "%d", i / t; else print 0 }')
echo
echo "(b) one QEMU TCG guest, 2 vCPUs, guest loopback, ${TIME_S} s per run (log: $log_file);" \
    "$(qemu-system-x86_64 --version | head -n 1)"
printf '%-40s %10s %12s %14s %16s %16s\n' stack IOPS "busy cores" "target cores" \
    "IOPS/target core" "IOPS/busy core"
printf '%-40s %10s %12s %14s %16s %16s\n' "kernel nvmet-tcp + nvme-tcp + fio" "$k_iops" \
    "$k_busy" "~$k_target" "$k_per_target" "$k_per_busy"
printf '%-40s %10s %12s %14s %16s %16s\n' "pollux-nvmf + Pollux initiator (bdevperf)" \
    "$p_iops" "$p_busy" "1.00" "$p_per_target" "$p_per_busy"
echo
echo "Pollux / kernel: IOPS $(ratio "$p_iops" "$k_iops"), IOPS per target core" \
    "$(ratio "$p_per_target" "$k_per_target"), IOPS per busy guest core (whole system)" \
    "$(ratio "$p_per_busy" "$k_per_busy")"
