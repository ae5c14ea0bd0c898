# shellcheck shell=sh
# NVMe suite, guest side: bind the controller to vfio-pci, identify it with nvme-identify, then
# run bdevperf verify on the nvme bdevs, then nvme-vmtest (pollux-nvme I/O tests, final pattern
# checked by the host afterwards).
# $1: variant (aw48: hugepages for nvme-vmtest; aw39: locked anonymous memory). See nvme.conf.
set -eu
# shellcheck source=scripts/vm/lib.sh
. /pollux/lib.sh

variant="${1:-}"
case "$variant" in
    aw48 | aw39) ;;
    *) fail "unknown variant '$variant'" ;;
esac

# What nvme.conf gives QEMU: namespaces of 32 and 16 MiB in 512-byte blocks.
serial=POLLUXNVME1
model="QEMU NVMe Ctrl"
ns1_blocks=65536
ns2_blocks=32768
final_seed=0xf1a1

expect_line() {
    grep -q -- "$1" "$2" || fail "$3: no line matching '$1' in $2"
}

# Runs nvme-identify with the given arguments into $1; status returned.
identify() {
    out="$1"
    shift
    rc=0
    nvme-identify "$@" > "$out" 2>&1 || rc=$?
    cat "$out"
    return "$rc"
}

step "loading modules"
modprobe vfio-pci
modprobe vfio_iommu_type1

step "finding the NVMe controller"
bdf="$(find_pci_class 0x010802)" || fail "no NVMe controller (class 0x010802)"
echo "NVMe controller at $bdf"

step "nvme-identify on a device not bound to vfio-pci (must be refused)"
if identify /tmp/refused.out 0000:00:00.0; then
    fail "nvme-identify 0000:00:00.0 succeeded"
fi
expect_line "is not bound to vfio-pci (driver: none); bind it with \`scripts/setup.sh\`" /tmp/refused.out "refusal"

step "binding $bdf to vfio-pci"
group="$(bind_vfio_pci "$bdf")"
echo "$bdf in IOMMU group $group"

step "nvme-identify $bdf"
identify /tmp/identify.out "$bdf" || fail "nvme-identify exited with status $rc"
out=/tmp/identify.out
expect_line "^NVMe Controller at $bdf \[1b36:0010\]$" "$out" identify
expect_line "^Serial Number: *$serial$" "$out" identify
expect_line "^Model Number: *$model$" "$out" identify
expect_line "^Vendor ID: *1b36$" "$out" identify
expect_line "^Max Number of Namespaces: *[1-9]" "$out" identify
expect_line "^Write Zeroes Command: *Supported$" "$out" identify
expect_line "^Dataset Management Command: *Supported$" "$out" identify
expect_line "^Namespace ID:1$" "$out" identify
expect_line "^Size (in LBAs): *$ns1_blocks (32MiB)$" "$out" identify
expect_line "^Namespace ID:2$" "$out" identify
expect_line "^Size (in LBAs): *$ns2_blocks (16MiB)$" "$out" identify
expect_line "^LBA Format #00: Data Size: *512 " "$out" identify

step "nvme-identify -r 'trtype:PCIe traddr:$bdf'"
identify /tmp/identify-r.out -r "trtype:PCIe traddr:$bdf" || fail "nvme-identify -r exited with status $rc"
expect_line "^Serial Number: *$serial$" /tmp/identify-r.out "identify -r"

if [ "$variant" = aw48 ]; then
    echo 32 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
fi

step "bdevperf -w verify on the nvme bdevs (bdev_nvme_attach_controller $bdf)"
cat > /tmp/nvme.json <<EOF
{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_nvme_attach_controller",
  "params":{"name":"Nvme0","trtype":"PCIe","traddr":"$bdf"}}]}]}
EOF
rc=0
bdevperf -c /tmp/nvme.json -q 32 -o 4096 -w verify -t 3 --json /tmp/bdevperf.json \
    > /tmp/bdevperf.out 2>&1 || rc=$?
cat /tmp/bdevperf.out
[ "$rc" -eq 0 ] || fail "bdevperf verify exited with status $rc"
expect_line "Job: Nvme0n1 " /tmp/bdevperf.out bdevperf
expect_line "Job: Nvme0n2 " /tmp/bdevperf.out bdevperf
[ "$(grep -c '"io_failed": 0,' /tmp/bdevperf.json)" -eq 3 ] ||
    fail "bdevperf: failed I/O in $(cat /tmp/bdevperf.json)"

step "bdevperf -w verify with 1 MiB I/O (above the controller's MDTS: split into commands)"
rc=0
bdevperf -c /tmp/nvme.json -q 4 -o 1048576 -w verify -t 2 --json /tmp/bdevperf-big.json \
    > /tmp/bdevperf-big.out 2>&1 || rc=$?
cat /tmp/bdevperf-big.out
[ "$rc" -eq 0 ] || fail "bdevperf 1 MiB verify exited with status $rc"
[ "$(grep -c '"io_failed": 0,' /tmp/bdevperf-big.json)" -eq 3 ] ||
    fail "bdevperf 1 MiB: failed I/O in $(cat /tmp/bdevperf-big.json)"

step "nvme-vmtest run $bdf"
rc=0
nvme-vmtest run "$bdf" --expect-serial "$serial" --expect-model "$model" \
    --expect-ns "1:$ns1_blocks" --expect-ns "2:$ns2_blocks" --final-seed "$final_seed" \
    > /tmp/vmtest.out 2>&1 || rc=$?
cat /tmp/vmtest.out
[ "$rc" -eq 0 ] || fail "nvme-vmtest exited with status $rc"
expect_line "^NVME-VMTEST: PASS$" /tmp/vmtest.out vmtest
if [ "$variant" = aw48 ]; then
    expect_line "^NVME-VMTEST: 48 MiB of DMA memory (hugepages)$" /tmp/vmtest.out vmtest
else
    expect_line "^NVME-VMTEST: 48 MiB of DMA memory (locked anonymous memory)$" /tmp/vmtest.out vmtest
fi

step "nvme-identify $bdf after the test (the shutdown left it usable)"
identify /tmp/identify2.out "$bdf" || fail "second nvme-identify exited with status $rc"
expect_line "^Serial Number: *$serial$" /tmp/identify2.out "identify after the test"
echo "nvme: $bdf identified and tested; the host checks the final pattern"
