# shellcheck shell=sh
# Smoke suite, guest side: bind the NVMe controller to vfio-pci and probe it.
# $1: variant (aw48: IOVA = VA expected; aw39: allocated IOVAs expected; group: the
# controller shares its IOMMU group with an e1000 NIC, see smoke.conf).
set -eu
# shellcheck source=scripts/vm/lib.sh
. /pollux/lib.sh

variant="${1:-}"
case "$variant" in
    aw48 | group) mode=identity ;;
    aw39) mode=allocated ;;
    *) fail "unknown variant '$variant'" ;;
esac

# Runs the probe with the smoke expectations; output in /tmp/probe.out, status returned.
# QEMU 7.2's NVMe controller: VS 1.4.0; CAP MQES 0x7ff, CQR, TO 0xf (7.5 s), DSTRD 0,
# CSS 0xc1 (NVM, I/O command sets, admin only), MPSMIN 4 KiB, MPSMAX 64 KiB.
probe() {
    rc=0
    RUST_LOG=info pollux-vfio-probe "$1" \
        --expect-vs 0x00010400 \
        --expect-cap 0x0040_1820_0f01_07ff \
        --expect-mode "$mode" \
        --expect-serial POLLUXSMOKE1 > /tmp/probe.out 2>&1 || rc=$?
    cat /tmp/probe.out
    return "$rc"
}

# Expects the probe to fail on $1 with an error that contains $2.
probe_refused() {
    if probe "$1"; then
        fail "probe of $1 succeeded; expected an error containing '$2'"
    fi
    grep -qF -- "$2" /tmp/probe.out || fail "probe of $1 failed without '$2' in its error"
    echo "refused as expected: $2"
}

step "loading modules"
modprobe nvme
modprobe vfio-pci
modprobe vfio_iommu_type1

step "finding the NVMe controller"
bdf="$(find_pci_class 0x010802)" || fail "no NVMe controller (class 0x010802)"
echo "NVMe controller at $bdf"
# Let the kernel's nvme driver bind first, so the unbind path of scripts/setup.sh is exercised.
wait_for "[ -e /sys/bus/pci/devices/$bdf/driver ]" 30 || echo "nvme did not bind $bdf (continuing)"

step "probing $bdf while the nvme driver holds it (must be refused)"
if [ -e "/sys/bus/pci/devices/$bdf/driver" ]; then
    probe_refused "$bdf" "is not bound to vfio-pci (driver: nvme); bind it with \`scripts/setup.sh\`"
fi
probe_refused 0000:00:1f.7 "PCI device 0000:00:1f.7 not found"

if [ "$variant" = group ]; then
    modprobe e1000
    nic="$(find_pci_class 0x020000)" || fail "no e1000 NIC"
    wait_for "[ -e /sys/bus/pci/devices/$nic/driver ]" 30 || fail "e1000 did not bind $nic"
    nvme_group="$(basename "$(readlink "/sys/bus/pci/devices/$bdf/iommu_group")")"
    nic_group="$(basename "$(readlink "/sys/bus/pci/devices/$nic/iommu_group")")"
    [ "$nvme_group" = "$nic_group" ] || fail "$bdf (group $nvme_group) and $nic (group $nic_group) should share a group"
    echo "IOMMU group $nvme_group:" /sys/kernel/iommu_groups/"$nvme_group"/devices/*
fi

step "binding $bdf to vfio-pci"
group="$(bind_vfio_pci "$bdf")"
echo "$bdf in IOMMU group $group, /dev/vfio/$group present"

if [ "$variant" = group ]; then
    step "probing $bdf while e1000 holds $nic in the same group (must be refused)"
    probe_refused "$bdf" "IOMMU group $group of PCI device $bdf also holds $nic, bound to e1000 (not vfio-pci)"
    step "unbinding $nic from e1000"
    echo "$nic" > "/sys/bus/pci/devices/$nic/driver/unbind"
fi

step "pollux-vfio-probe $bdf (expecting $mode IOVAs)"
probe "$bdf" || fail "pollux-vfio-probe exited with status $rc"
out=/tmp/probe.out
grep -q "^DMA: buffer .* mode $mode " "$out" || fail "probe did not report $mode IOVA mode"
grep -q '^IDENTIFY: .*serial "POLLUXSMOKE1"' "$out" || fail "probe did not report the serial"
grep -q '^PROBE: OK$' "$out" || fail "probe did not report PROBE: OK"
grep -q "locked anonymous memory" "$out" || fail "expected locked anonymous DMA memory (no hugepages yet)"

# Again on 2 MiB hugepages: checks that the first run released the group and left the
# controller disabled, and maps hugepage-backed memory through the IOMMU.
step "pollux-vfio-probe $bdf again, on hugepages"
echo 4 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
probe "$bdf" || fail "second pollux-vfio-probe run exited with status $rc"
grep -q "^DMA: buffer .* mode $mode .*, hugepages)" "$out" || fail "second run: no $mode mapping of hugepages"
grep -q '^PROBE: OK$' "$out" || fail "second run did not report PROBE: OK"
echo "smoke: $bdf probed twice, $mode IOVAs"
