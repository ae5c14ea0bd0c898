# shellcheck shell=sh
# ublk suite, guest side (see ublk.conf): pollux-ublk exports Malloc0 and Nvme0n1 (QEMU's NVMe
# controller through vfio-pci) as /dev/ublkb0 and /dev/ublkb1 through the kernel's ublk_drv.
# $1: variant (disks, kill, probe).
set -u
# shellcheck source=/dev/null # lib.sh sits at /pollux in the guest
. /pollux/lib.sh

variant="${1:-}"
case "$variant" in
    disks | kill | probe) ;;
    *) fail "unknown variant '$variant'" ;;
esac

# What ublk.conf gives QEMU, and the bdevs made here.
NVME_MIB=96
MALLOC_MIB=64
SOCK=/tmp/ublk.sock
LOG=/tmp/ublk.log
UBLK_PID=""

uptime_s() { cut -d. -f1 /proc/uptime; }

# Fails with the tail of pollux-ublk's log.
ufail() {
    echo "---- last lines of pollux-ublk's log ($LOG) ----"
    tail -n 60 "$LOG" 2>/dev/null
    echo "---- end of pollux-ublk's log ----"
    fail "$@"
}

rpc() { pollux-rpc -s "$SOCK" "$@"; }

# Runs an RPC that must succeed, printing its output.
rpc_ok() {
    out=""
    rc=0
    out="$(rpc "$@" 2>&1)" || rc=$?
    echo "pollux-rpc $*: $out"
    [ "$rc" -eq 0 ] || ufail "pollux-rpc $* failed (status $rc)"
}

# Runs an RPC that must fail; its output goes to /tmp/rpc-fail.out.
rpc_fails() {
    what="$1"
    shift
    if rpc "$@" > /tmp/rpc-fail.out 2>&1; then
        cat /tmp/rpc-fail.out
        ufail "$what: pollux-rpc $* succeeded"
    fi
    echo "pollux-rpc $* failed as it must: $(cat /tmp/rpc-fail.out)"
}

# Starts pollux-ublk (two reactors, locked anonymous memory) with the extra arguments given.
start_target() {
    rm -f "$SOCK"
    echo "=== pollux-ublk -m 0x3 --no-huge -s 256 -r $SOCK $* ===" >> "$LOG"
    RUST_LOG="${RUST_LOG:-info}" pollux-ublk -m 0x3 --no-huge -s 256 -r "$SOCK" "$@" >> "$LOG" 2>&1 &
    UBLK_PID=$!
    wait_for "[ -S $SOCK ] || ! kill -0 $UBLK_PID 2>/dev/null" 60 || ufail "no RPC socket $SOCK after 60 s"
    kill -0 "$UBLK_PID" 2>/dev/null || ufail "pollux-ublk exited at start"
    echo "pollux-ublk running (pid $UBLK_PID)"
}

# SIGINT must stop pollux-ublk cleanly.
stop_target() {
    kill -INT "$UBLK_PID" || ufail "pollux-ublk is gone before SIGINT"
    deadline=$(($(uptime_s) + 30))
    while kill -0 "$UBLK_PID" 2>/dev/null; do
        [ "$(uptime_s)" -lt "$deadline" ] || ufail "pollux-ublk did not exit within 30 s of SIGINT"
        sleep 0.2
    done
    rc=0
    wait "$UBLK_PID" || rc=$?
    [ "$rc" -eq 0 ] || ufail "pollux-ublk exited with status $rc after SIGINT"
    ! grep -q panicked "$LOG" || ufail "pollux-ublk panicked"
    [ ! -S "$SOCK" ] || ufail "pollux-ublk left its RPC socket behind"
    echo "pollux-ublk stopped cleanly; its warnings and errors:"
    grep -E 'WARN|ERROR' "$LOG" | tail -n 20 || true
}

# ublk_get_disks as one line per disk (whitespace removed, one flat object per line).
disks_lines() {
    rpc ublk_get_disks > /tmp/disks.json 2>&1 || { cat /tmp/disks.json; ufail "ublk_get_disks failed"; }
    tr -d ' \t\r\n' < /tmp/disks.json | tr '}' '\n' | grep '"id":' || true
}

# ublk_get_disks must list disk $1 on bdev $2 with $3 queues of depth $4.
expect_disk() {
    line="$(disks_lines | grep -E "\"id\":$1(,|\$)")" || true
    [ -n "$line" ] || { cat /tmp/disks.json; ufail "ublk_get_disks does not list id $1"; }
    for want in "\"bdev_name\":\"$2\"" "\"ublk_device\":\"/dev/ublkb$1\"" "\"num_queues\":$3" \
        "\"queue_depth\":$4"; do
        case "$line" in
            *"$want"*) ;;
            *) cat /tmp/disks.json; ufail "ublk_get_disks: disk $1 lacks $want" ;;
        esac
    done
}

expect_no_disk() {
    if disks_lines | grep -qE "\"id\":$1(,|\$)"; then
        cat /tmp/disks.json
        ufail "ublk_get_disks still lists id $1"
    fi
}

# save_config into file $1.
save_config() {
    rpc save_config > "$1" 2> /tmp/save-config.err || { cat "$1" /tmp/save-config.err; ufail "save_config failed"; }
}

# The ublk_start_disk entry for id $2 in saved configuration $1, as one line (whitespace
# removed); fails when there is none.
config_disk_line() {
    tr -d ' \t\r\n' < "$1" | tr '}' '\n' | grep '"method":"ublk_start_disk"' | grep -E "\"ublk_id\":$2(,|\$)"
}

# Saved configuration $1 must start disk $2 with user copy ($3 true) or without ($3 false).
expect_user_copy() {
    line="$(config_disk_line "$1" "$2")" || { cat "$1"; ufail "$1 has no ublk_start_disk for id $2"; }
    case "$line" in
        *'"user_copy":true'*) got=true ;;
        *) got=false ;;
    esac
    [ "$got" = "$3" ] || { cat "$1"; ufail "$1: disk $2 has user_copy $got, want $3"; }
}

# True when neither /dev/ublkbN nor /dev/ublkcN exists for any id N given.
no_ublk_devices() {
    for id in "$@"; do
        if [ -e "/dev/ublkb$id" ] || [ -e "/dev/ublkc$id" ]; then
            return 1
        fi
    done
}

# MD5 of the whole block device $1, read with O_DIRECT.
dev_md5() {
    dd if="$1" bs=1M iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1
}

wait_disk() {
    wait_for "[ -b /dev/ublkb$1 ]" 30 || ufail "no /dev/ublkb$1 30 s after ublk_start_disk"
    echo "/dev/ublkb$1: $(blockdev --getsize64 "/dev/ublkb$1") bytes, logical blocks of $(blockdev --getss "/dev/ublkb$1")"
}

# fio verify on block device $1: random writes of 4 KiB to 128 KiB at QD 32 on two jobs (one
# per vCPU), 16 MiB each, crc32c verify of everything written.
fio_verify() {
    rc=0
    fio --name=verify --filename="$1" --ioengine=libaio --direct=1 --rw=randwrite \
        --bsrange=4k-128k --iodepth=32 --numjobs=2 --size=16M --offset_increment=16M \
        --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting > /tmp/fio.log 2>&1 || rc=$?
    cat /tmp/fio.log
    [ "$rc" -eq 0 ] || ufail "fio verify on $1 failed (status $rc)"
    grep -q "err= 0" /tmp/fio.log || ufail "fio verify on $1 reported an error"
}

# Discards on block device $1 when it advertises them: 1 MiB at 1 MiB, then the whole device
# (what mkfs.ext4 does first); the kernel must log no I/O error for it.
discard_check() {
    max="$(cat "/sys/block/${1#/dev/}/queue/discard_max_bytes")"
    if [ "$max" -gt 0 ]; then
        blkdiscard -o 1048576 -l 1048576 "$1" || ufail "blkdiscard of 1 MiB on $1 failed"
        blkdiscard "$1" || ufail "blkdiscard of the whole $1 failed"
        echo "$1: discards done (discard_max_bytes $max)"
    else
        echo "$1: no discard support advertised"
    fi
    no_io_errors
}

no_io_errors() {
    if dmesg | grep -q 'I/O error, dev ublkb'; then
        dmesg | grep 'I/O error, dev ublkb' | head -n 5
        ufail "the guest kernel logged an I/O error on a ublk disk"
    fi
}

# ext4 on block device $1 with checksummed files; umount, e2fsck, remount and compare. $2: 1 to
# print the checksums for the host check.
fs_check() {
    dev="$1"
    mkfs.ext4 -q -F "$dev" || ufail "mkfs.ext4 $dev"
    mkdir -p /mnt
    mount -t ext4 "$dev" /mnt || ufail "mount $dev"
    dd if=/dev/urandom of=/mnt/random.bin bs=64k count=96 2>/dev/null || ufail "write random.bin on $dev"
    cp /bin/busybox /mnt/busybox || ufail "copy busybox to $dev"
    mkdir -p /mnt/dir
    i=0
    while [ "$i" -lt 16 ]; do
        dd if=/dev/urandom of="/mnt/dir/f$i" bs=4k count=$((i + 1)) 2>/dev/null || ufail "write f$i on $dev"
        i=$((i + 1))
    done
    (cd /mnt && find . -type f | sort | xargs md5sum) > /tmp/sums || ufail "md5sum on $dev"
    umount /mnt || ufail "umount $dev"
    e2fsck -fn "$dev" || ufail "e2fsck -fn $dev after the umount"
    echo 3 > /proc/sys/vm/drop_caches
    mount -t ext4 -o ro "$dev" /mnt || ufail "remount $dev"
    (cd /mnt && md5sum -c /tmp/sums > /dev/null) || ufail "files on $dev differ after the remount"
    umount /mnt || ufail "umount $dev after the check"
    echo "$dev: ext4 clean, $(wc -l < /tmp/sums) files intact after the remount"
    if [ "$2" = 1 ]; then
        while read -r sum name; do
            echo "POLLUX-UBLK-MD5: ${name#./} $sum"
        done < /tmp/sums
    fi
}

load_vfio() {
    modprobe vfio-pci || fail "modprobe vfio-pci"
    modprobe vfio_iommu_type1 || fail "modprobe vfio_iommu_type1"
    BDF="$(find_pci_class 0x010802)" || fail "no NVMe controller (class 0x010802)"
    group="$(bind_vfio_pci "$BDF")"
    echo "NVMe controller $BDF bound to vfio-pci, IOMMU group $group"
}

# ext4 needs the crc32c crypto driver, a module in Debian's kernels.
load_ext4() {
    modprobe crc32c_generic || fail "modprobe crc32c_generic"
    modprobe ext4 || fail "modprobe ext4"
}

load_ublk() {
    modprobe ublk_drv || fail "modprobe ublk_drv"
    wait_for "[ -c /dev/ublk-control ]" 10 || fail "no /dev/ublk-control after modprobe ublk_drv"
    echo "ublk_drv loaded: /dev/ublk-control"
}

echo "guest kernel $(uname -r), $(grep -c '^processor' /proc/cpuinfo) vCPUs"

if [ "$variant" = probe ]; then
    step "probe: the guest kernel's modules"
    load_ublk
    load_vfio
    load_ext4
    modprobe null_blk nr_devices=1 gb=1 || fail "modprobe null_blk"
    wait_for "[ -b /dev/nullb0 ]" 10 || fail "no /dev/nullb0"
    modprobe brd rd_nr=1 rd_size=65536 || fail "modprobe brd"
    wait_for "[ -b /dev/ram0 ]" 10 || fail "no /dev/ram0"
    [ "$(cat /proc/sys/kernel/io_uring_disabled 2>/dev/null || echo 0)" = 0 ] || fail "io_uring disabled"
    fio_verify /dev/ram0
    fs_check /dev/ram0 0
    rc=0
    fio --name=nullb --filename=/dev/nullb0 --ioengine=libaio --direct=1 --rw=randread --bs=4k \
        --iodepth=32 --time_based --runtime=3 > /tmp/fio-null.log 2>&1 || rc=$?
    grep -E 'IOPS|err=' /tmp/fio-null.log
    [ "$rc" -eq 0 ] || fail "fio on /dev/nullb0"
    lsmod
    echo "ublk probe: the guest kernel has everything the suite needs"
    exit 0
fi

if [ "$variant" = disks ]; then
    step "vfio-pci for the NVMe controller; ext4"
    load_vfio
    load_ext4

    step "ublk_create_target without ublk_drv (must fail, naming ublk_drv)"
    [ ! -e /dev/ublk-control ] || fail "/dev/ublk-control exists before modprobe ublk_drv"
    start_target
    rpc_fails "ublk_create_target without ublk_drv" ublk_create_target
    grep -q ublk_drv /tmp/rpc-fail.out || ufail "the error does not name ublk_drv"
    expect_no_disk 0

    step "modprobe ublk_drv; ublk_create_target"
    load_ublk
    rpc_ok ublk_create_target

    step "bdevs: Malloc0 ($MALLOC_MIB MiB, 4 KiB blocks), Nvme0 at $BDF"
    rpc_ok bdev_malloc_create -b Malloc0 "$MALLOC_MIB" 4096
    rpc_ok bdev_nvme_attach_controller -b Nvme0 -t pcie -a "$BDF"
    rpc bdev_get_bdevs -b Nvme0n1 > /dev/null 2>&1 || ufail "no bdev Nvme0n1 after the attach"

    step "ublk_start_disk Malloc0 0 and Nvme0n1 1 (-q 2 -d 128)"
    rpc_ok ublk_start_disk Malloc0 0 -q 2 -d 128
    rpc_ok ublk_start_disk Nvme0n1 1 -q 2 -d 128
    wait_disk 0
    wait_disk 1
    [ "$(blockdev --getsize64 /dev/ublkb0)" = $((MALLOC_MIB << 20)) ] || ufail "/dev/ublkb0 has the wrong size"
    [ "$(blockdev --getsize64 /dev/ublkb1)" = $((NVME_MIB << 20)) ] || ufail "/dev/ublkb1 has the wrong size"
    [ "$(blockdev --getss /dev/ublkb0)" = 4096 ] || ufail "/dev/ublkb0: logical block size is not 4096"
    [ "$(blockdev --getss /dev/ublkb1)" = 512 ] || ufail "/dev/ublkb1: logical block size is not 512"
    queues="$(find /sys/block/ublkb0/mq -mindepth 1 -maxdepth 1 | wc -l)"
    [ "$queues" = 2 ] || ufail "/dev/ublkb0 has $queues hardware queues, want 2"
    rpc ublk_get_disks
    expect_disk 0 Malloc0 2 128
    expect_disk 1 Nvme0n1 2 128
    rpc ublk_get_disks -n 1 > /tmp/disk1.json 2>&1 || { cat /tmp/disk1.json; ufail "ublk_get_disks -n 1 failed"; }
    if [ "$(tr -d ' \t\r\n' < /tmp/disk1.json | tr '}' '\n' | grep -c '"id":')" != 1 ] ||
        ! tr -d ' \t\r\n' < /tmp/disk1.json | grep -q '"id":1[,}]'; then
        cat /tmp/disk1.json
        ufail "ublk_get_disks -n 1 does not list disk 1 alone"
    fi

    for id in 0 1; do
        step "discards on /dev/ublkb$id"
        discard_check "/dev/ublkb$id"
        step "fio verify on /dev/ublkb$id (QD 32, two jobs)"
        fio_verify "/dev/ublkb$id"
        step "ext4 on /dev/ublkb$id: checksummed files, umount, e2fsck, remount"
        fs_check "/dev/ublkb$id" "$id"
        no_io_errors
    done

    step "bad input: nothing may be left behind"
    before="$(disks_lines)"
    rpc_ok bdev_malloc_create -b Malloc1 32 4096
    rpc_fails "a missing bdev" ublk_start_disk Nope0 2 -q 1 -d 32
    rpc_fails "ublk id 0 in use" ublk_start_disk Malloc1 0 -q 1 -d 32
    rpc_fails "queue depth 5000" ublk_start_disk Malloc1 2 -q 1 -d 5000
    rpc_fails "ublk_stop_disk of an unknown id" ublk_stop_disk 7
    [ "$(disks_lines)" = "$before" ] || { cat /tmp/disks.json; ufail "ublk_get_disks changed after the refused calls"; }
    for path in /dev/ublkb2 /dev/ublkc2 /dev/ublkb7 /dev/ublkc7; do
        [ ! -e "$path" ] || ufail "$path exists after the refused calls"
    done
    dd if=/dev/ublkb0 of=/dev/null bs=1M count=4 iflag=direct 2>/dev/null || ufail "/dev/ublkb0 broken after the refused calls"

    step "ublk_start_disk Malloc1 2, then ublk_stop_disk 2 on the idle disk"
    rpc_ok ublk_start_disk Malloc1 2 -q 1 -d 32
    wait_disk 2
    expect_disk 2 Malloc1 1 32
    rpc_ok ublk_stop_disk 2
    wait_for "[ ! -e /dev/ublkb2 ] && [ ! -e /dev/ublkc2 ]" 30 ||
        ufail "/dev/ublkb2 or /dev/ublkc2 still there 30 s after ublk_stop_disk 2"
    expect_no_disk 2
    if [ ! -b /dev/ublkb0 ] || [ ! -b /dev/ublkb1 ]; then
        ufail "ublk_stop_disk 2 took another disk with it"
    fi

    step "user copy: Malloc1 as /dev/ublkb3 with user_copy (UBLK_F_USER_COPY), fio verify"
    rpc_ok ublk_start_disk Malloc1 3 -q 2 -d 64 --user-copy
    wait_disk 3
    expect_disk 3 Malloc1 2 64
    fio_verify /dev/ublkb3

    step "save_config with live disks 0, 1 and 3 (user copy); checksum of /dev/ublkb1"
    save_config /tmp/saved.json
    for id in 0 1 3; do
        config_disk_line /tmp/saved.json "$id" > /dev/null ||
            { cat /tmp/saved.json; ufail "save_config has no ublk_start_disk for id $id"; }
    done
    expect_user_copy /tmp/saved.json 3 true
    sum_before="$(dev_md5 /dev/ublkb1)"
    echo "/dev/ublkb1: MD5 $sum_before"

    step "SIGINT with live disks 0, 1 and 3: exit 0, /dev/ublkb* and /dev/ublkc* gone"
    stop_target
    wait_for "no_ublk_devices 0 1 3" 10 ||
        { ls -l /dev/ublk*; fail "/dev/ublkb or /dev/ublkc of disk 0, 1 or 3 left 10 s after pollux-ublk exited on SIGINT"; }
    echo "/dev/ublkb0,1,3 and /dev/ublkc0,1,3 gone"

    step "restart pollux-ublk -c with save_config's output: the same disks, ids and data"
    start_target -c /tmp/saved.json
    for id in 0 1 3; do
        wait_disk "$id"
    done
    expect_disk 0 Malloc0 2 128
    expect_disk 1 Nvme0n1 2 128
    expect_disk 3 Malloc1 2 64
    [ "$(disks_lines | wc -l)" = 3 ] || { cat /tmp/disks.json; ufail "ublk_get_disks lists other disks than 0, 1 and 3"; }
    save_config /tmp/saved2.json
    expect_user_copy /tmp/saved2.json 3 true
    expect_user_copy /tmp/saved2.json 0 false
    expect_user_copy /tmp/saved2.json 1 false
    sum_after="$(dev_md5 /dev/ublkb1)"
    [ "$sum_after" = "$sum_before" ] ||
        ufail "/dev/ublkb1 (Nvme0n1) changed across the restart: MD5 $sum_before before, $sum_after after"
    mount -t ext4 -o ro /dev/ublkb1 /mnt || ufail "mount /dev/ublkb1 after the restart"
    (cd /mnt && md5sum -c /tmp/sums > /dev/null) || ufail "files on /dev/ublkb1 differ after the restart"
    umount /mnt || ufail "umount /dev/ublkb1 after the restart"
    echo "/dev/ublkb1: MD5 unchanged across the restart, $(wc -l < /tmp/sums) files intact"
    head -c 1048576 /dev/urandom > /tmp/uc-pattern
    dd if=/tmp/uc-pattern of=/dev/ublkb3 bs=64k oflag=direct 2>/dev/null || ufail "write to /dev/ublkb3 (user copy) after the restart"
    dd if=/dev/ublkb3 of=/tmp/uc-back bs=64k count=16 iflag=direct 2>/dev/null || ufail "read of /dev/ublkb3 (user copy) after the restart"
    cmp /tmp/uc-pattern /tmp/uc-back || ufail "/dev/ublkb3 (user copy) reads back other data after the restart"
    rpc_ok ublk_stop_disk 3
    wait_for "[ ! -e /dev/ublkb3 ] && [ ! -e /dev/ublkc3 ]" 30 ||
        ufail "/dev/ublkb3 or /dev/ublkc3 still there 30 s after ublk_stop_disk 3"

    step "stop every disk, ublk_destroy_target, SIGINT"
    rpc_ok ublk_stop_disk 0
    rpc_ok ublk_stop_disk 1
    wait_for "[ ! -e /dev/ublkb0 ] && [ ! -e /dev/ublkb1 ] && [ ! -e /dev/ublkc0 ] && [ ! -e /dev/ublkc1 ]" 30 ||
        ufail "a ublk device is still there 30 s after ublk_stop_disk"
    [ -z "$(disks_lines)" ] || { cat /tmp/disks.json; ufail "ublk_get_disks not empty after stopping every disk"; }
    rpc_ok ublk_destroy_target
    stop_target
    no_io_errors
    if dmesg | grep -qE 'blocked for more than|BUG:|WARNING:|Oops:|Call Trace:'; then
        fail "the guest kernel logged a hang, BUG, WARNING, Oops or a call trace"
    fi
    echo "ublk disks: every check passed"
    exit 0
fi

# kill: kill -9 pollux-ublk while fio writes to /dev/ublkb1 (Nvme0n1).
step "kill: vfio-pci, ublk_drv, pollux-ublk -c (Nvme0 at BDF), /dev/ublkb1"
load_vfio
load_ublk
cat > /tmp/ublk.json <<EOF
{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_nvme_attach_controller",
  "params":{"name":"Nvme0","trtype":"PCIe","traddr":"$BDF"}}]}]}
EOF
start_target -c /tmp/ublk.json
rpc_ok ublk_create_target
rpc_ok ublk_start_disk Nvme0n1 1 -q 2 -d 128
wait_disk 1

step "fio randwrite QD 32 on /dev/ublkb1; kill -9 pollux-ublk under it"
fio --name=killed --filename=/dev/ublkb1 --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
    --iodepth=32 --size=64M --time_based --runtime=20 > /tmp/fio-kill.log 2>&1 &
fio_pid=$!
sleep 3
kill -0 "$fio_pid" 2>/dev/null || { cat /tmp/fio-kill.log; fail "fio ended before the kill"; }
kill -9 "$UBLK_PID"
wait "$UBLK_PID" 2>/dev/null
echo "pollux-ublk killed at $(cat /proc/uptime)"

# The kernel either keeps the disk for a new server (user recovery) or removes it (its monitor
# notices the dead server within seconds).
mode=""
deadline=$(($(uptime_s) + 25))
while [ "$(uptime_s)" -lt "$deadline" ]; do
    if [ ! -e /dev/ublkb1 ]; then
        mode=removed
        break
    fi
    sleep 0.5
done
[ -n "$mode" ] || mode=kept
echo "after the kill the kernel $mode /dev/ublkb1 (fio $(kill -0 "$fio_pid" 2>/dev/null && echo running || echo ended))"

# Waits up to $1 s for fio to end; sets fio_rc.
wait_fio() {
    deadline=$(($(uptime_s) + $1))
    while kill -0 "$fio_pid" 2>/dev/null; do
        [ "$(uptime_s)" -lt "$deadline" ] || { cat /tmp/fio-kill.log; fail "fio still running $1 s later: hung"; }
        sleep 0.5
    done
    fio_rc=0
    wait "$fio_pid" || fio_rc=$?
    cat /tmp/fio-kill.log
    echo "fio ended with status $fio_rc"
}

# Starts a 64 KiB write of new random data (/tmp/pattern) at 64 KiB block $1 of /dev/ublkb1,
# with no server running; it must still be waiting 2 s later. Sets held_pid.
held_write() {
    dd if=/dev/urandom of=/tmp/pattern bs=64k count=1 2>/dev/null
    dd if=/tmp/pattern of=/dev/ublkb1 bs=64k seek="$1" count=1 oflag=direct 2>/tmp/held.err &
    held_pid=$!
    sleep 2
    kill -0 "$held_pid" 2>/dev/null ||
        { cat /tmp/held.err; fail "the write to a disk with no server ended at once instead of waiting"; }
}

# After a recovery: the held write (at 64 KiB block $1) must complete within 60 s, its data on
# the disk.
held_write_done() {
    deadline=$(($(uptime_s) + 60))
    while kill -0 "$held_pid" 2>/dev/null; do
        [ "$(uptime_s)" -lt "$deadline" ] || fail "the held write did not complete within 60 s of the recovery"
        sleep 0.2
    done
    held_rc=0
    wait "$held_pid" || held_rc=$?
    [ "$held_rc" -eq 0 ] || { cat /tmp/held.err; fail "the held write failed (status $held_rc)"; }
    dd if=/dev/ublkb1 of=/tmp/readback bs=64k skip="$1" count=1 iflag=direct 2>/dev/null ||
        fail "reading the held write back failed"
    cmp /tmp/pattern /tmp/readback || fail "the held write's data is not on the disk after the recovery"
    echo "the write held while no server ran completed after the recovery, data intact"
}

if [ "$mode" = kept ]; then
    # A write issued while no server runs must wait in the quiesced queue and complete after
    # the recovery, with its data there.
    step "a 64 KiB write to /dev/ublkb1 while no server runs: held"
    held_write 100
    step "user recovery: restart pollux-ublk -c, ublk_recover_disk Nvme0n1 1"
    start_target -c /tmp/ublk.json
    rpc_ok ublk_create_target
    rpc_ok ublk_recover_disk Nvme0n1 1
    held_write_done 100
    wait_fio 90
    expect_disk 1 Nvme0n1 2 128
else
    step "disk removed: fio must end with errors, then the same id must start again"
    wait_fio 60
    [ "$fio_rc" -ne 0 ] || fail "fio ended without an error although its disk went away"
    start_target -c /tmp/ublk.json
    rpc_ok ublk_create_target
    rpc_ok ublk_start_disk Nvme0n1 1 -q 2 -d 128
fi
wait_disk 1
step "fio verify on /dev/ublkb1 after the restart"
fio_verify /dev/ublkb1

if [ "$mode" = kept ]; then
    # Second round: the quiesced disk recovered by ublk_start_disk (which finds it quiesced),
    # after a refused ublk_recover_disk onto a bdev of another size.
    step "round 2: 4 MiB written to /dev/ublkb1, kill -9 pollux-ublk with the disk idle"
    dd if=/dev/urandom of=/tmp/before bs=1M count=4 2>/dev/null
    dd if=/tmp/before of=/dev/ublkb1 bs=1M seek=48 count=4 oflag=direct 2>/dev/null ||
        ufail "writing 4 MiB to /dev/ublkb1 before the second kill failed"
    kill -9 "$UBLK_PID"
    wait "$UBLK_PID" 2>/dev/null
    sleep 2
    [ -b /dev/ublkb1 ] || fail "round 2: the kernel removed /dev/ublkb1 after kill -9 (it kept it in round 1)"
    held_write 640
    step "round 2: restart; ublk_recover_disk onto Small (32 MiB, not $NVME_MIB MiB) must be refused"
    start_target -c /tmp/ublk.json
    rpc_ok ublk_create_target
    rpc_ok bdev_malloc_create -b Small 32 512
    rpc_fails "ublk_recover_disk onto a bdev of another size" ublk_recover_disk Small 1
    sed -n '/^response:/,$p' /tmp/rpc-fail.out > /tmp/rpc-fail.response
    grep -q -- '-32602' /tmp/rpc-fail.response ||
        ufail "the refused ublk_recover_disk Small 1 did not answer -32602 (invalid params)"
    grep -q 'bdev_name' /tmp/rpc-fail.response || ufail "the refused ublk_recover_disk Small 1 does not name bdev_name"
    grep -q 'Small' /tmp/rpc-fail.response || ufail "the refused ublk_recover_disk Small 1 does not name the bdev Small"
    expect_no_disk 1
    [ -b /dev/ublkb1 ] || ufail "the refused ublk_recover_disk removed /dev/ublkb1"
    kill -0 "$held_pid" 2>/dev/null ||
        { cat /tmp/held.err; ufail "the held write ended after the refused ublk_recover_disk"; }
    step "round 2: ublk_start_disk Nvme0n1 1 recovers the quiesced disk"
    rpc_ok ublk_start_disk Nvme0n1 1 -q 2 -d 128
    held_write_done 640
    expect_disk 1 Nvme0n1 2 128
    dd if=/dev/ublkb1 of=/tmp/after bs=1M skip=48 count=4 iflag=direct 2>/dev/null ||
        ufail "reading back the 4 MiB written before the second kill failed"
    cmp /tmp/before /tmp/after || ufail "the 4 MiB written before the second kill differ after the recovery"
    echo "round 2: the 4 MiB written before the kill read back intact"
    ! grep -q panicked "$LOG" || ufail "pollux-ublk panicked"
fi
rpc_ok ublk_stop_disk 1
wait_for "[ ! -e /dev/ublkb1 ] && [ ! -e /dev/ublkc1 ]" 30 || ufail "/dev/ublkb1 still there after ublk_stop_disk"
rpc_ok ublk_destroy_target
stop_target
if dmesg | grep -qE 'blocked for more than|BUG:|Oops:'; then
    fail "the guest kernel logged a hang, BUG or Oops"
fi
echo "ublk kill ($mode): every check passed"
