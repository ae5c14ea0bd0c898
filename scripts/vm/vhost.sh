# shellcheck shell=sh
# Guest side of the vhost suite (see vhost.conf): vda is pollux-vhost's vhost.rw (aio bdev,
# two queues), vdb its vhost.ro (read-only).
# shellcheck source=/dev/null # lib.sh sits at /pollux in the guest
. /pollux/lib.sh

PATTERN_BLOCK=256
DISCARD_MIB=32
FIO_OFFSET_MIB=4
FIO_SIZE_MIB=28

step "load virtio"
modprobe virtio_pci || fail "modprobe virtio_pci"
modprobe virtio_blk || fail "modprobe virtio_blk"
wait_for "[ -b /dev/vda ] && [ -b /dev/vdb ]" 60 || fail "virtio-blk disks did not appear"

step "geometry and features"
[ "$(blockdev --getsize64 /dev/vda)" = $((64 << 20)) ] || fail "vda size $(blockdev --getsize64 /dev/vda)"
[ "$(cat /sys/block/vdb/ro)" = 1 ] || fail "vdb is not read-only"
[ "$(cat /sys/block/vda/ro)" = 0 ] || fail "vda is read-only"
# Linux uses min(num_queues, CPUs) queues: one on this one-vCPU guest, whatever the device offers.
queues="$(find /sys/block/vda/mq -mindepth 1 -maxdepth 1 | wc -l)"
[ "$queues" -ge 1 ] || fail "vda has no queue"
[ "$(cat /sys/block/vda/queue/discard_max_bytes)" != 0 ] || fail "vda offers no discard"

size="$(wc -c < /bin/busybox)"
blocks=$(( (size + 4095) / 4096 ))

step "write busybox at block $PATTERN_BLOCK and read it back"
dd if=/bin/busybox of=/dev/vda bs=4096 seek="$PATTERN_BLOCK" conv=fsync 2>/dev/null || fail "write"
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=4096 skip="$PATTERN_BLOCK" count="$blocks" 2>/dev/null || fail "read"
head -c "$size" /tmp/back | cmp - /bin/busybox || fail "read-back differs"
rm -f /tmp/back

step "discard ${DISCARD_MIB} MiB + 1 MiB"
dd if=/bin/busybox of=/dev/vda bs=1M seek="$DISCARD_MIB" count=1 conv=fsync 2>/dev/null || fail "write before discard"
blkdiscard -o $((DISCARD_MIB << 20)) -l $((1 << 20)) /dev/vda || fail "blkdiscard"
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/disc bs=1M skip="$DISCARD_MIB" count=1 2>/dev/null || fail "read after discard"
dd if=/dev/zero bs=1M count=1 2>/dev/null | cmp - /tmp/disc || fail "discarded range is not zero"
rm -f /tmp/disc

step "both queues at once"
i=0
while [ "$i" -lt 8 ]; do
    dd if=/dev/vda of=/dev/null bs=64k skip=$((i * 16)) count=64 2>/dev/null &
    i=$((i + 1))
done
wait
dd if=/dev/vda of=/tmp/again bs=4096 skip="$PATTERN_BLOCK" count="$blocks" 2>/dev/null || fail "read again"
head -c "$size" /tmp/again | cmp - /bin/busybox || fail "second read-back differs"

step "read-only controller"
dd if=/dev/vdb of=/tmp/ro bs=4096 count="$blocks" 2>/dev/null || fail "read vdb"
head -c "$size" /tmp/ro | cmp - /bin/busybox || fail "vdb does not hold busybox"
if dd if=/bin/busybox of=/dev/vdb bs=4096 count=1 conv=fsync 2>/dev/null; then
    fail "a write to the read-only disk succeeded"
fi
if [ "$1" = reconnect ] || [ "$1" = reconnect-packed ]; then
    # vhost.rw sits on a delay bdev (400 ms per write), so fio's 32 writes are in flight at the
    # target whenever the host kills it (SIGKILL, up to three times, restarting it each time):
    # the writes stall, are resubmitted from the inflight region, and complete without error.
    step "reconnect workload"
    fio --name=reconnect --filename=/dev/vda --ioengine=libaio --direct=1 --rw=write \
        --bs=64k --iodepth=32 --offset="${FIO_OFFSET_MIB}M" --size="${FIO_SIZE_MIB}M" \
        --verify=crc32c --verify_fatal=1 --do_verify=1 > /tmp/fio.log 2>&1
    fio_rc=$?
    step "reconnect workload done"
    cat /tmp/fio.log
    [ "$fio_rc" = 0 ] || fail "fio failed across the reconnect (status $fio_rc)"
    grep -q "err= 0" /tmp/fio.log || fail "fio reported an error"
    if dmesg | grep -qi "i/o error"; then
        fail "the guest saw an I/O error"
    fi
    echo 3 > /proc/sys/vm/drop_caches
    md5="$(dd if=/dev/vda bs=1M skip="$FIO_OFFSET_MIB" count="$FIO_SIZE_MIB" 2>/dev/null | md5sum)" ||
        fail "read of the fio region"
    echo "POLLUX-FIO-MD5: ${md5%% *}"
fi
sync
echo "vhost suite done"
