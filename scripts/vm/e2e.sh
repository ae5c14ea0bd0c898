# shellcheck shell=sh
# End-to-end suite, guest side: NVMe -> vfio-pci -> pollux-vhost (nvme bdev exported as
# vhost.0) <- vhost-user <- bdevperf (virtio_blk bdev, -w verify). See e2e.conf.
# $1: variant (aw48: hugepages; aw39: 4 KiB pages).
set -eu
# shellcheck source=scripts/vm/lib.sh
. /pollux/lib.sh

variant="${1:-}"
no_huge=""
case "$variant" in
    aw48) echo 128 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages ;;
    aw39) no_huge="--no-huge" ;;
    *) fail "unknown variant '$variant'" ;;
esac

expect_line() {
    grep -q -- "$1" "$2" || fail "$3: no line matching '$1' in $2"
}

step "loading modules"
modprobe vfio-pci
modprobe vfio_iommu_type1

step "binding the NVMe controller to vfio-pci"
bdf="$(find_pci_class 0x010802)" || fail "no NVMe controller (class 0x010802)"
group="$(bind_vfio_pci "$bdf")"
echo "$bdf in IOMMU group $group"

step "starting pollux-vhost on core 0 (nvme bdev Nvme0n1 exported as vhost.0)"
mkdir -p /tmp/vhost
cat > /tmp/target.json <<JSON
{"subsystems":[
 {"subsystem":"bdev","config":[{"method":"bdev_nvme_attach_controller",
   "params":{"name":"Nvme0","trtype":"PCIe","traddr":"$bdf"}}]},
 {"subsystem":"vhost_blk","config":[{"method":"vhost_create_blk_controller",
   "params":{"ctrlr":"vhost.0","dev_name":"Nvme0n1","cpumask":"0x1"}}]}]}
JSON
# shellcheck disable=SC2086 # $no_huge is empty or one flag
RUST_LOG=info NO_COLOR=1 pollux-vhost -m 0x1 -S /tmp/vhost -r /tmp/pollux.sock -c /tmp/target.json -s 64 $no_huge \
    > /tmp/target.out 2>&1 &
target=$!
wait_for "[ -S /tmp/vhost/vhost.0 ]" 60 || { cat /tmp/target.out; fail "no socket /tmp/vhost/vhost.0"; }

step "bdevperf -w verify through the virtio_blk bdev (core 1)"
cat > /tmp/initiator.json <<JSON
{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_virtio_attach_controller",
  "params":{"name":"VirtioBlk0","trtype":"user","traddr":"/tmp/vhost/vhost.0",
            "dev_type":"blk","vq_count":1,"vq_size":128}}]}]}
JSON
rc=0
# shellcheck disable=SC2086
bdevperf -m 0x2 -c /tmp/initiator.json -q 32 -o 4096 -w verify -t 5 -s 64 $no_huge \
    --json /tmp/bdevperf.json > /tmp/bdevperf.out 2>&1 || rc=$?
cat /tmp/bdevperf.out
[ "$rc" -eq 0 ] || { cat /tmp/target.out; fail "bdevperf verify exited with status $rc"; }
grep -q '"io_failed": 0,' /tmp/bdevperf.json || fail "bdevperf: failed I/O in $(cat /tmp/bdevperf.json)"
grep -q '"iops": 0\.0*,' /tmp/bdevperf.json && fail "bdevperf: no I/O completed"

step "bdevperf 128 KiB verify (PRP lists into guest memory)"
rc=0
# shellcheck disable=SC2086
bdevperf -m 0x2 -c /tmp/initiator.json -q 8 -o 131072 -w verify -t 3 -s 64 $no_huge \
    --json /tmp/bdevperf-big.json > /tmp/bdevperf-big.out 2>&1 || rc=$?
cat /tmp/bdevperf-big.out
[ "$rc" -eq 0 ] || { cat /tmp/target.out; fail "bdevperf 128 KiB verify exited with status $rc"; }
grep -q '"io_failed": 0,' /tmp/bdevperf-big.json || fail "bdevperf 128 KiB: failed I/O"

step "stopping pollux-vhost (SIGINT): orderly shutdown, channels report their copies"
kill -INT "$target"
rc=0
wait "$target" || rc=$?
cat /tmp/target.out
[ "$rc" -eq 0 ] || fail "pollux-vhost exited with status $rc"
[ ! -e /tmp/vhost/vhost.0 ] || fail "pollux-vhost left its socket behind"
expect_line "nvme: channel closed" /tmp/target.out "nvme channel statistics"
[ "$(grep -c "nvme: channel closed" /tmp/target.out)" -eq 2 ] ||
    fail "expected one nvme channel per bdevperf run"
if grep "nvme: channel closed" /tmp/target.out | grep -qv " bounced=0"; then
    fail "a request was bounced: the path was not zero copy"
fi
grep "nvme: channel closed" /tmp/target.out | grep -q "prp_lists=[1-9]" ||
    fail "the 128 KiB run built no PRP list into guest memory"
# Its own DMA memory, then the front-end's memory table (once per bdevperf run).
[ "$(grep -c "DMA mapped" /tmp/target.out)" -ge 3 ] ||
    fail "pollux-vhost did not DMA-map the front-end's memory"
echo "per channel: $(grep "nvme: channel closed" /tmp/target.out | sed 's/.*bdev=/bdev=/')"
echo "e2e: verify passed through vhost-user into NVMe with no bounced request"
