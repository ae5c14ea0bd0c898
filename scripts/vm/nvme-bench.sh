# shellcheck shell=sh
# NVMe benchmark, guest side (see nvme-bench.conf): 4 KiB random reads on one emulated NVMe
# controller, in one boot, first through the guest kernel's nvme driver (fio on /dev/nvme0n1,
# one job), then through pollux-nvme after rebinding the controller to vfio-pci (bdevperf on the
# nvme bdev, one core). Prints per run:
#   NVME-BENCH: engine=E qd=N runtime_s=S iops=I lat_us_avg=L vcpu_busy_pct=B
# engine: libaio, io_uring, io_uring-poll (fio --hipri on an nvme poll queue), pollux.
# vcpu_busy_pct: the guest's one vCPU not idle during the run (/proc/stat): fio sleeps in the
# kernel while it waits, bdevperf polls, so Pollux's figure is near 100 by design.
# $1: variant, qdN or qdN-tS (queue depth N, S seconds per run, default 10).
set -eu
# shellcheck source=scripts/vm/lib.sh
. /pollux/lib.sh

variant="${1:-}"
queue_depth="${variant#qd}"
queue_depth="${queue_depth%%-*}"
runtime_s=10
case "$variant" in
    qd*-t*) runtime_s="${variant##*-t}" ;;
esac
case "$queue_depth$runtime_s" in
    '' | *[!0-9]*) fail "bad variant '$variant' (want qdN or qdN-tS)" ;;
esac
if [ "$queue_depth" -lt 1 ] || [ "$queue_depth" -gt 1024 ]; then
    fail "queue depth $queue_depth not in 1..1024"
fi
[ "$runtime_s" -ge 1 ] || fail "runtime ${runtime_s}s too short"
io_size_bytes=4096

# The vCPU's busy and total jiffies so far, from the first line of /proc/stat.
cpu_jiffies() {
    read -r _ user nice system idle iowait irq softirq steal _ < /proc/stat
    total=$((user + nice + system + idle + iowait + irq + softirq + steal))
    echo "$((total - idle - iowait)) $total"
}

# Percentage of the vCPU busy since the `cpu_jiffies` sample in $1 ("busy total").
busy_pct_since() {
    now="$(cpu_jiffies)"
    busy_before="${1% *}" total_before="${1#* }"
    busy_now="${now% *}" total_now="${now#* }"
    if [ "$total_now" -gt "$total_before" ]; then
        echo $(( ((busy_now - busy_before) * 100) / (total_now - total_before) ))
    else
        echo 0
    fi
}

# result ENGINE IOPS LAT_US BUSY_PCT: prints the parseable line.
result() {
    echo "NVME-BENCH: engine=$1 qd=$queue_depth runtime_s=$runtime_s iops=$2 lat_us_avg=$3 vcpu_busy_pct=$4"
}

# fio_run ENGINE [FIO OPTION...]: one fio job on /dev/nvme0n1. Terse (v3) output: field 8 is
# the read IOPS, field 40 the mean total latency in microseconds.
fio_run() {
    engine="$1"
    shift
    step "fio $engine, randread $io_size_bytes B, iodepth $queue_depth, ${runtime_s} s, /dev/nvme0n1"
    sample="$(cpu_jiffies)"
    rc=0
    fio --name="randread-$engine" --filename=/dev/nvme0n1 --rw=randread --bs="$io_size_bytes" \
        --iodepth="$queue_depth" --direct=1 --numjobs=1 --thread --time_based \
        --runtime="$runtime_s" --norandommap --randrepeat=0 --minimal "$@" \
        > "/tmp/fio-$engine.out" 2>&1 || rc=$?
    busy="$(busy_pct_since "$sample")"
    cat "/tmp/fio-$engine.out"
    [ "$rc" -eq 0 ] || return "$rc"
    line="$(grep '^3;' "/tmp/fio-$engine.out" | tail -n 1)"
    [ -n "$line" ] || return 1
    iops="$(echo "$line" | awk -F';' '{ printf "%.0f", $8 }')"
    lat="$(echo "$line" | awk -F';' '{ printf "%.1f", $40 }')"
    result "$engine" "$iops" "$lat" "$busy"
}

step "loading modules"
modprobe vfio-pci
modprobe vfio_iommu_type1

step "finding the NVMe controller"
bdf="$(find_pci_class 0x010802)" || fail "no NVMe controller (class 0x010802)"
echo "NVMe controller at $bdf; $(grep -c '^processor' /proc/cpuinfo) vCPU(s)"

step "kernel nvme driver (one poll queue for io_uring --hipri)"
modprobe nvme poll_queues=1
wait_for "[ -b /dev/nvme0n1 ]" 30 || fail "/dev/nvme0n1 did not appear"
echo "nvme0n1: $(cat /sys/block/nvme0n1/size) sectors; $(cat /sys/block/nvme0n1/queue/scheduler 2>/dev/null || echo 'no scheduler file')"

fio_run libaio --ioengine=libaio || fail "fio libaio failed"
fio_run io_uring --ioengine=io_uring || fail "fio io_uring failed"
# Polled completions need an nvme poll queue; report rather than fail where there is none.
fio_run io_uring-poll --ioengine=io_uring --hipri ||
    echo "NVME-BENCH: engine=io_uring-poll qd=$queue_depth error=fio-failed"

step "binding $bdf to vfio-pci (from nvme)"
group="$(bind_vfio_pci "$bdf")"
echo "$bdf in IOMMU group $group"
echo 64 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages

step "bdevperf randread $io_size_bytes B, -q $queue_depth, ${runtime_s} s, Nvme0n1"
cat > /tmp/nvme.json <<JSON
{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_nvme_attach_controller",
  "params":{"name":"Nvme0","trtype":"PCIe","traddr":"$bdf"}}]}]}
JSON
sample="$(cpu_jiffies)"
rc=0
bdevperf -c /tmp/nvme.json -q "$queue_depth" -o "$io_size_bytes" -w randread -t "$runtime_s" \
    -m 0x1 > /tmp/bdevperf.out 2>&1 || rc=$?
busy="$(busy_pct_since "$sample")"
cat /tmp/bdevperf.out
[ "$rc" -eq 0 ] || fail "bdevperf exited with status $rc"
# The Total row: IOPS, MiB/s, Fail/s, TO/s, average latency (us), ...
total="$(grep '^ Total' /tmp/bdevperf.out | tail -n 1)"
[ -n "$total" ] || fail "no Total row in the bdevperf output"
fails="$(echo "$total" | awk -F: '{ split($2, f, " "); print f[3] }')"
[ "$fails" = 0.00 ] || fail "bdevperf reported failed I/O ($fails per second)"
result pollux "$(echo "$total" | awk -F: '{ split($2, f, " "); printf "%.0f", f[1] }')" \
    "$(echo "$total" | awk -F: '{ split($2, f, " "); printf "%.1f", f[5] }')" "$busy"
