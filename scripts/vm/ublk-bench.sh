# shellcheck shell=sh
# ublk benchmark, guest side (see ublk-bench.conf): fio 4 KiB random reads and writes at QD 32
# and QD 1 on null_blk, brd and pollux-ublk's /dev/ublkb0 (Malloc0). Prints per run
#   UBLK-BENCH: dev=D rw=RW qd=Q iops=I busy_cores=B
# and per ublk run
#   UBLK-BENCH-RATIO: dev=D rw=RW qd=Q vs_null_blk=R vs_brd=R
# $1: variant tS (S seconds per QD 32 run, S/2 per QD 1 run).
set -u
# shellcheck source=/dev/null # lib.sh sits at /pollux in the guest
. /pollux/lib.sh

runtime_s="${1#t}"
case "$runtime_s" in
    '' | *[!0-9]*) fail "bad variant '$1' (want tS)" ;;
esac
qd1_runtime_s=$(((runtime_s + 1) / 2))
SOCK=/tmp/ublk.sock
LOG=/tmp/ublk.log
RESULTS=/tmp/results

# The busy and total jiffies of all vCPUs so far (first line of /proc/stat).
cpu_jiffies() {
    read -r _ user nice system idle iowait irq softirq steal _ < /proc/stat
    total=$((user + nice + system + idle + iowait + irq + softirq + steal))
    echo "$((total - idle - iowait)) $total"
}

# Busy vCPUs (cores, two decimals) since the sample in $1 ("busy total").
busy_cores_since() {
    now="$(cpu_jiffies)"
    cpus="$(grep -c '^cpu[0-9]' /proc/stat)"
    awk -v b0="${1% *}" -v t0="${1#* }" -v b1="${now% *}" -v t1="${now#* }" -v n="$cpus" \
        'BEGIN { if (t1 > t0) printf "%.2f", (b1 - b0) * n / (t1 - t0); else print 0 }'
}

# fio on device $2 (named $1 in the output): randread and randwrite at QD 32 and QD 1.
bench_device() {
    name="$1"
    dev="$2"
    for qd in 32 1; do
        for rw in randread randwrite; do
            seconds="$runtime_s"
            [ "$qd" = 1 ] && seconds="$qd1_runtime_s"
            before="$(cpu_jiffies)"
            fio --name="$rw" --filename="$dev" --ioengine=libaio --direct=1 --rw="$rw" --bs=4k \
                --iodepth="$qd" --numjobs=1 --cpus_allowed=1 --size=64M --time_based \
                --runtime="$seconds" --output-format=terse > /tmp/fio.terse 2> /tmp/fio.err ||
                { cat /tmp/fio.err /tmp/fio.terse; tail -n 40 "$LOG" 2>/dev/null; fail "fio $rw QD $qd on $dev failed"; }
            busy="$(busy_cores_since "$before")"
            # Terse v3: field 8 read IOPS, field 49 write IOPS.
            iops="$(awk -F';' '{ print $8 + $49 }' /tmp/fio.terse)"
            echo "UBLK-BENCH: dev=$name rw=$rw qd=$qd iops=$iops busy_cores=$busy"
            echo "$name $rw $qd $iops" >> "$RESULTS"
        done
    done
}

ratios() {
    name="$1"
    for qd in 32 1; do
        for rw in randread randwrite; do
            awk -v n="$name" -v rw="$rw" -v qd="$qd" '
                $2 == rw && $3 == qd { iops[$1] = $4 }
                END {
                    line = sprintf("UBLK-BENCH-RATIO: dev=%s rw=%s qd=%s", n, rw, qd)
                    split("null_blk brd", base, " ")
                    for (i = 1; i <= 2; i++) {
                        b = base[i]
                        if (iops[b] > 0) line = line sprintf(" vs_%s=%.3f", b, iops[n] / iops[b])
                    }
                    print line
                }' "$RESULTS"
        done
    done
}

rpc() {
    pollux-rpc -s "$SOCK" "$@" || { tail -n 40 "$LOG"; fail "pollux-rpc $* failed"; }
}

: > "$RESULTS"
echo "guest kernel $(uname -r), $(grep -c '^processor' /proc/cpuinfo) vCPUs, ${runtime_s} s per QD 32 run"

step "null_blk (memory backed, 4 KiB blocks)"
modprobe null_blk nr_devices=1 gb=1 bs=4096 memory_backed=1 irqmode=0 || fail "modprobe null_blk"
wait_for "[ -b /dev/nullb0 ]" 10 || fail "no /dev/nullb0"
bench_device null_blk /dev/nullb0

step "brd (64 MiB)"
modprobe brd rd_nr=1 rd_size=65536 || fail "modprobe brd"
wait_for "[ -b /dev/ram0 ]" 10 || fail "no /dev/ram0"
bench_device brd /dev/ram0

step "pollux-ublk -m 0x1: Malloc0 as /dev/ublkb0 (one queue, depth 128)"
modprobe ublk_drv || fail "modprobe ublk_drv"
wait_for "[ -c /dev/ublk-control ]" 10 || fail "no /dev/ublk-control"
RUST_LOG=warn pollux-ublk -m 0x1 --no-huge -s 256 -r "$SOCK" > "$LOG" 2>&1 &
ublk_pid=$!
wait_for "[ -S $SOCK ]" 60 || { cat "$LOG"; fail "pollux-ublk: no RPC socket"; }
rpc ublk_create_target
rpc bdev_malloc_create -b Malloc0 64 4096
rpc ublk_start_disk Malloc0 0 -q 1 -d 128
wait_for "[ -b /dev/ublkb0 ]" 30 || { cat "$LOG"; fail "no /dev/ublkb0"; }
bench_device ublk /dev/ublkb0
rpc ublk_stop_disk 0
ratios ublk

# User-copy mode (ublk_start_disk's user_copy, UBLK_F_USER_COPY: pollux-ublk copies the data
# with pread/pwrite on /dev/ublkc1 instead of the kernel copying into its buffers).
wait_for "[ ! -e /dev/ublkb0 ]" 30 || fail "/dev/ublkb0 still there after ublk_stop_disk"
if pollux-rpc -s "$SOCK" ublk_start_disk Malloc0 1 -q 1 -d 128 --user-copy; then
    step "pollux-ublk: Malloc0 as /dev/ublkb1 in user-copy mode"
    wait_for "[ -b /dev/ublkb1 ]" 30 || { cat "$LOG"; fail "no /dev/ublkb1"; }
    bench_device ublk-ucopy /dev/ublkb1
    rpc ublk_stop_disk 1
    ratios ublk-ucopy
else
    echo "ublk_start_disk refused user_copy: one mode measured"
fi
rpc ublk_destroy_target
kill -INT "$ublk_pid"
wait "$ublk_pid" || true
