#!/usr/bin/env bash
# Pollux's NVMe driver next to the guest kernel's nvme driver, on the same emulated controller
# in the same boot: runs the benchmark suite scripts/vm-test.sh nvme-bench (QEMU TCG, one vCPU;
# see scripts/vm/nvme-bench.conf), takes its `NVME-BENCH:` lines from the suite log and prints
# a table: engine, IOPS, mean latency, guest vCPU busy, and the ratio Pollux / engine.
#
# These are figures of an emulated machine: QEMU TCG emulates the CPU, the IOMMU and the NVMe
# controller (which serves I/O from a host file). They compare the two drivers' costs under
# emulation, not what either reaches on hardware.
#
# Usage: benches/compare-nvme.sh
# Environment (defaults in brackets):
#   NVME_BENCH_VARIANTS  boots to run, `qdN` or `qdN-tS` (queue depth N, S seconds per run)
#                        ["qd32"], e.g. "qd32 qd128"
#   POLLUX_VM_CACHE      as for scripts/vm-test.sh [<repo>/.cache/vm]; the logs are read there
#   CARGO_TARGET_DIR     as for cargo
# Needs what scripts/vm-test.sh needs, plus fio on the host (/usr/bin/fio, copied into the guest).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE="${POLLUX_VM_CACHE:-$ROOT/.cache/vm}"
export NVME_BENCH_VARIANTS="${NVME_BENCH_VARIANTS:-qd32}"

die() {
    echo "compare-nvme: $*" >&2
    exit 1
}

[[ -x /usr/bin/fio ]] || die "fio is not installed on the host (apt-get install fio)"

"$ROOT/scripts/vm-test.sh" nvme-bench || die "scripts/vm-test.sh nvme-bench failed"

# field LINE KEY: the value of KEY=value in an NVME-BENCH line.
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

ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 > 0) printf "%.2f", a / b; else print "n/a" }'
}

cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
echo
echo "NVMe 4 KiB randread in a QEMU TCG guest (1 vCPU): Pollux (bdevperf, nvme bdev, vfio-pci)"
echo "next to the guest kernel's nvme driver (fio, 1 job, direct=1, /dev/nvme0n1), same boot."
echo "Emulated figures (TCG CPU, emulated intel-iommu and NVMe): compare ratios, not IOPS."
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); host CPU: $cpu ($(nproc) CPUs);" \
    "host kernel $(uname -r); $(qemu-system-x86_64 --version | head -n 1)"

read -r -a variants <<<"$NVME_BENCH_VARIANTS"
for variant in "${variants[@]}"; do
    log_file="$CACHE/logs/nvme-bench-$variant.log"
    [[ -f "$log_file" ]] || die "no log $log_file"
    mapfile -t lines < <(tr -d '\r' <"$log_file" | grep '^NVME-BENCH: ')
    [[ "${#lines[@]}" -gt 0 ]] || die "no NVME-BENCH lines in $log_file"
    pollux_iops="n/a"
    for line in "${lines[@]}"; do
        [[ "$(field "$line" engine)" == pollux ]] && pollux_iops=$(field "$line" iops)
    done
    [[ "$pollux_iops" != n/a ]] || die "no Pollux result in $log_file"
    echo
    echo "variant $variant: queue depth $(field "${lines[0]}" qd), $(field "${lines[0]}" runtime_s) s per run (log: $log_file)"
    printf '%-16s %10s %14s %16s %14s\n' engine IOPS "lat avg (us)" "vCPU busy (%)" "Pollux/engine"
    for line in "${lines[@]}"; do
        engine=$(field "$line" engine)
        iops=$(field "$line" iops)
        if [[ "$iops" == n/a ]]; then
            printf '%-16s %10s   (%s)\n' "$engine" n/a "$(field "$line" error)"
            continue
        fi
        printf '%-16s %10s %14s %16s %14s\n' "$engine" "$iops" "$(field "$line" lat_us_avg)" \
            "$(field "$line" vcpu_busy_pct)" "$(ratio "$pollux_iops" "$iops")"
    done
done
