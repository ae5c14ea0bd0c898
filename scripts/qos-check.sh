#!/usr/bin/env bash
# Checks that bdev QoS rate limits hold what they promise, with bdevperf on a malloc bdev:
#
#   1. unlimited, 4 KiB randread QD 128 (the bdev's capacity: millions of IOPS);
#   2. `bdev_set_qos_limit` in a -c config, rw_ios_per_sec 10000: 10000 IOPS +- 5%;
#   3. bdevperf -z, the limit set over RPC (`pollux-rpc bdev_set_qos_limit Malloc0
#      --rw_ios_per_sec 10000`), then perform_tests: 10000 IOPS +- 5%, and bdev_get_bdevs
#      shows the limit in assigned_rate_limits;
#   4. rw_mbytes_per_sec 20, 64 KiB randrw: 20 MiB/s +- 5%.
#
#   scripts/qos-check.sh [--seconds N]     (default 3 per run)
#
# The limits are at least 100 times below what the bdev does unlimited (checked: 1 must exceed
# 10 times the limit), so the tolerance is about the limiter's accuracy, not the machine's speed.
# Run by scripts/test.sh as a step of its own, not beside the parallel cargo tests: a reactor
# starved of its core for more than 5% of a run would miss timeslices.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
seconds=3
while (($#)); do
    case "$1" in
    --seconds)
        seconds=${2:?--seconds needs a number}
        shift 2
        ;;
    *)
        echo "qos-check: unknown argument '$1' (--seconds N)" >&2
        exit 2
        ;;
    esac
done

cargo build --release --quiet --manifest-path "$repo/Cargo.toml" -p pollux-bdevperf -p pollux-rpc-cli
bin="${CARGO_TARGET_DIR:-$repo/target}/release"
work=$(mktemp -d)
bdevperf_pid=""
cleanup() {
    if [[ -n "$bdevperf_pid" ]]; then
        kill "$bdevperf_pid" 2>/dev/null || true
        wait "$bdevperf_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

fail() {
    echo "qos-check: FAIL: $*" >&2
    exit 1
}

# config FILE [QOS_PARAMS_JSON]: a 64 MiB malloc bdev, limited when QOS_PARAMS_JSON is given.
config() {
    local qos=""
    [[ -n "${2:-}" ]] && qos=", {\"method\": \"bdev_set_qos_limit\", \"params\": {\"name\": \"Malloc0\", $2}}"
    cat >"$1" <<EOF
{"subsystems": [{"subsystem": "bdev", "config": [
  {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 16384, "block_size": 4096}}$qos
]}]}
EOF
}

# column N of bdevperf's Malloc0 result line (4: IOPS, 5: MiB/s) from its output on stdin.
column() {
    awk -v n="$1" '$1 == "Malloc0" && $2 == ":" { print $n; found = 1 } END { exit !found }'
}

# within VALUE TARGET: VALUE is TARGET +- 5%.
within() {
    awk -v v="$1" -v t="$2" 'BEGIN { exit !(v >= t * 0.95 && v <= t * 1.05) }'
}

run_bdevperf() {
    NO_COLOR=1 "$bin/bdevperf" --no-huge -t "$seconds" "$@" 2>"$work/bdevperf.err" ||
        fail "bdevperf $*: $(cat "$work/bdevperf.err")"
}

config "$work/unlimited.json"
unlimited=$(run_bdevperf -c "$work/unlimited.json" -q 128 -o 4096 -w randread | column 4)
echo "qos-check: unlimited: $unlimited IOPS"
awk -v v="$unlimited" 'BEGIN { exit !(v > 100000) }' ||
    fail "unlimited run: $unlimited IOPS, not 10 times the 10000 limit: the check below would prove nothing"

config "$work/ios.json" '"rw_ios_per_sec": 10000'
limited=$(run_bdevperf -c "$work/ios.json" -q 128 -o 4096 -w randread | column 4)
echo "qos-check: -c rw_ios_per_sec 10000: $limited IOPS"
within "$limited" 10000 || fail "rw_ios_per_sec 10000 from the config: $limited IOPS (10000 +- 5% expected)"

socket="$work/bdevperf.sock"
NO_COLOR=1 "$bin/bdevperf" --no-huge -z -r "$socket" -q 128 -o 4096 -w randread -t "$seconds" \
    >"$work/z.out" 2>"$work/z.err" &
bdevperf_pid=$!
for _ in $(seq 100); do
    [[ -S "$socket" ]] && break
    sleep 0.1
done
[[ -S "$socket" ]] || fail "bdevperf -z did not open $socket: $(cat "$work/z.err")"
rpc() { "$bin/pollux-rpc" -s "$socket" "$@"; }
rpc bdev_malloc_create -b Malloc0 64 4096 >/dev/null
rpc bdev_set_qos_limit Malloc0 --rw_ios_per_sec 10000
rpc bdev_get_bdevs -b Malloc0 >"$work/bdevs.json"
grep -q '"rw_ios_per_sec": 10000' "$work/bdevs.json" ||
    fail "bdev_get_bdevs does not show the limit in assigned_rate_limits"
rpc_iops=$(rpc perform_tests | grep -m1 '"iops"' | tr -dc '0-9.')
rpc spdk_kill_instance SIGTERM
wait "$bdevperf_pid" || fail "bdevperf -z exited with an error: $(cat "$work/z.err")"
bdevperf_pid=""
echo "qos-check: -z, bdev_set_qos_limit --rw_ios_per_sec 10000 over RPC: $rpc_iops IOPS"
within "$rpc_iops" 10000 || fail "rw_ios_per_sec 10000 over RPC: $rpc_iops IOPS (10000 +- 5% expected)"

config "$work/mbytes.json" '"rw_mbytes_per_sec": 20'
mibps=$(run_bdevperf -c "$work/mbytes.json" -q 32 -o 65536 -w randrw -M 50 | column 5)
echo "qos-check: -c rw_mbytes_per_sec 20, 64 KiB randrw: $mibps MiB/s"
within "$mibps" 20 || fail "rw_mbytes_per_sec 20: $mibps MiB/s (20 +- 5% expected)"

echo "qos-check: PASS"
