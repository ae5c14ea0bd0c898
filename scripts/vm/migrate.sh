# shellcheck shell=sh
# Guest side of the migrate suite (see migrate.conf): vda is a pollux-vhost controller's disk
# (aio bdev on a host file). fio writes and verifies while the host live-migrates this guest
# to a second QEMU on a second pollux-vhost (and, for `twice`, back to the first target).
# shellcheck source=/dev/null # lib.sh sits at /pollux in the guest
. /pollux/lib.sh

FIO_OFFSET_MIB=4
FIO_SIZE_MIB=16
# Writes per second: slow enough that the workload spans the migrations (see migrate.conf).
FIO_RATE_IOPS=150
# A region the host filled with random bytes, read through the page cache while the guest
# migrates (MiB; repeated in migrate.conf), at a rate that spans the migrations.
CACHED_OFFSET_MIB=24
CACHED_SIZE_MIB=24
CACHED_RATE=1m

# Sectors read from vda so far (/proc/diskstats' sixth field).
vda_sectors_read() {
    awk '$3 == "vda" { print $6 }' /proc/diskstats
}

step "load virtio"
modprobe virtio_pci || fail "modprobe virtio_pci"
modprobe virtio_blk || fail "modprobe virtio_blk"
wait_for "[ -b /dev/vda ]" 60 || fail "the virtio-blk disk did not appear"

# Job `migrate`: random 4 KiB writes, each read back and checked a few writes later
# (verify_backlog), so the target writes guest buffers (read data, status bytes, used ring) all
# through the migration. Job `cached`: buffered reads of the host's random region, whose data
# the target writes straight into fresh page-cache pages that the guest CPU never touches: a
# page the target wrote but did not log reaches the destination stale, and the kernel serves
# it from its cache afterwards (checked below, and against disk.img by the host).
# The kernel drops a block device's page cache at its last close: hold vda open until the check.
exec 3< /dev/vda
step "migrate workload"
# invalidate=0: fio's default flushes vda's whole page cache (BLKFLSBUF) each time it opens it.
fio --invalidate=0 --name=migrate --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite \
    --bs=4k --iodepth=16 --offset="${FIO_OFFSET_MIB}M" --size="${FIO_SIZE_MIB}M" \
    --rate_iops="$FIO_RATE_IOPS" --verify=crc32c --verify_backlog=16 --verify_fatal=1 \
    --do_verify=1 \
    --name=cached --filename=/dev/vda --ioengine=psync --direct=0 --rw=read --bs=64k \
    --offset="${CACHED_OFFSET_MIB}M" --size="${CACHED_SIZE_MIB}M" --rate="$CACHED_RATE" \
    > /tmp/fio.log 2>&1
fio_rc=$?
step "migrate workload done"
cat /tmp/fio.log
[ "$fio_rc" = 0 ] || fail "fio failed across the migration (status $fio_rc)"
grep -q "err= 0" /tmp/fio.log || fail "fio reported an error"
if dmesg | grep -qi "i/o error"; then
    fail "the guest saw an I/O error"
fi
# Through the page cache first (what the reads above left there), then from the disk.
sectors_before="$(vda_sectors_read)"
md5="$(dd if=/dev/vda bs=1M skip="$CACHED_OFFSET_MIB" count="$CACHED_SIZE_MIB" 2>/dev/null | md5sum)" ||
    fail "read of the cached region"
sectors_read=$(($(vda_sectors_read) - sectors_before))
echo "cached region read back with $sectors_read sectors from the disk"
# A few readahead sectors at most: the check must see the page cache, not the disk.
[ "$sectors_read" -le 2048 ] || fail "the cached region was read from the disk ($sectors_read sectors), not the page cache"
echo "POLLUX-CACHED-MD5: ${md5%% *}"
exec 3<&-
echo 3 > /proc/sys/vm/drop_caches
md5="$(dd if=/dev/vda bs=1M skip="$FIO_OFFSET_MIB" count="$FIO_SIZE_MIB" 2>/dev/null | md5sum)" ||
    fail "read of the fio region"
echo "POLLUX-FIO-MD5: ${md5%% *}"
sync
echo "migrate suite done"
