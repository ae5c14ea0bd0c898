# shellcheck shell=sh
# Setup suite, guest side: scripts/setup.sh on two NVMe controllers, one holding a mounted file
# system. config binds the free one and skips the mounted one with the reason; status shows both;
# nvme-identify initialises and identifies the bound one through VFIO and pollux-nvme; a second
# config changes nothing; reset gives it back to nvme (its /dev/nvme*n1 reappears) and releases
# the hugepages.
# $1: variant (two-ctrls).
set -eu
# shellcheck source=scripts/vm/lib.sh
. /pollux/lib.sh

[ "${1:-}" = two-ctrls ] || fail "unknown variant '${1:-}'"

# Prints the PCI address of the NVMe controller with serial $1.
ctrl_by_serial() {
    for ctrl in /sys/class/nvme/nvme*; do
        if [ "$(tr -d ' ' < "$ctrl/serial")" = "$1" ]; then
            basename "$(readlink -f "$ctrl/device")"
            return 0
        fi
    done
    return 1
}

# Prints the namespace block device (nvmeXn1) of the controller with serial $1, as its
# nvme-subsystem lists it (native multipath) or under the controller.
ns_by_serial() {
    for ctrl in /sys/class/nvme/nvme*; do
        [ "$(tr -d ' ' < "$ctrl/serial")" = "$1" ] || continue
        for ns in "$ctrl"/nvme*n1; do
            name="$(basename "$ns")"
            case "$name" in *c*) continue ;; esac  # nvmeXcYn1: multipath's hidden path device
            if [ -e "/sys/class/block/$name" ]; then
                echo "$name"
                return 0
            fi
        done
        for head in /sys/class/block/nvme*n1; do
            subsys="$(readlink -f "$head/device")"
            if [ -e "$subsys/$(basename "$ctrl")" ]; then
                basename "$head"
                return 0
            fi
        done
    done
    return 1
}

driver_of() {
    if [ -e "/sys/bus/pci/devices/$1/driver" ]; then
        basename "$(readlink "/sys/bus/pci/devices/$1/driver")"
    else
        echo none
    fi
}

# Kernel state setup.sh may change: drivers, overrides, hugepages, hugetlbfs mounts.
snapshot() {
    for bdf in "$busy" "$free"; do
        echo "$bdf $(driver_of "$bdf") $(cat "/sys/bus/pci/devices/$bdf/driver_override")"
    done
    cat /sys/devices/system/node/node*/hugepages/hugepages-2048kB/nr_hugepages
    grep hugetlbfs /proc/mounts || true
}

# Runs scripts/setup.sh with the bash from the mounted tools disk; output in /tmp/setup.out.
setup() {
    rc=0
    HUGEMEM=64 "$tools/lib/ld-linux-x86-64.so.2" --library-path "$tools/lib" "$tools/bin/bash" \
        "$tools/setup.sh" "$@" > /tmp/setup.out 2>&1 || rc=$?
    sed 's/^/  setup.sh| /' /tmp/setup.out
    return "$rc"
}

expect_line() {
    grep -q -- "$1" /tmp/setup.out || fail "$2: no line matching '$1'"
}

step "loading modules (vfio-pci is left for setup.sh to load)"
modprobe nvme
modprobe crc32c_generic  # ext4 needs it through a soft dependency, which busybox modprobe skips
modprobe ext4

step "finding the controllers"
wait_for "ctrl_by_serial POLLUXSETUP0 >/dev/null && ctrl_by_serial POLLUXSETUP1 >/dev/null" 30 ||
    fail "the two NVMe controllers did not appear"
busy="$(ctrl_by_serial POLLUXSETUP0)"
free="$(ctrl_by_serial POLLUXSETUP1)"
wait_for "ns_by_serial POLLUXSETUP0 >/dev/null && ns_by_serial POLLUXSETUP1 >/dev/null" 30 ||
    fail "the namespaces did not appear"
busy_ns="$(ns_by_serial POLLUXSETUP0)"
free_ns="$(ns_by_serial POLLUXSETUP1)"
echo "mounted: $busy ($busy_ns), free: $free ($free_ns)"
wait_for "[ -b /dev/$busy_ns ] && [ -b /dev/$free_ns ]" 30 || fail "no /dev nodes for the namespaces"

step "mounting /dev/$busy_ns (the tools disk)"
tools=/mnt/tools
mkdir -p "$tools"
mount -t ext4 "/dev/$busy_ns" "$tools"
[ -x "$tools/bin/bash" ] || fail "no bash on the tools disk"

step "setup.sh config"
setup config || fail "setup.sh config exited with status $rc"
expect_line "^$free (1b36:0010, $free_ns): bound to vfio-pci (was nvme)$" "config"
expect_line "^$busy (1b36:0010, $busy_ns): skipped, in use: $busy_ns mounted on $tools" "config"
expect_line "^hugetlbfs: mounted on /dev/hugepages$" "config"
[ "$(driver_of "$free")" = vfio-pci ] || fail "$free is on $(driver_of "$free"), not vfio-pci"
[ "$(driver_of "$busy")" = nvme ] || fail "$busy (mounted) left nvme: $(driver_of "$busy")"
[ "$(cat "/sys/bus/pci/devices/$free/driver_override")" = vfio-pci ] || fail "no driver_override on $free"
[ "$(cat /sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages)" = 32 ] ||
    fail "expected 32 hugepages on node0"
grep -q " $tools " /proc/mounts || fail "the mounted file system went away"

step "setup.sh status"
setup status || fail "setup.sh status exited with status $rc"
expect_line "^$free  *1b36:0010  *[-0-9]  *vfio-pci  *-  *no$" "status"
expect_line "^$busy  *1b36:0010  *[-0-9]  *nvme  *$busy_ns  *yes: $busy_ns mounted on $tools" "status"
expect_line "^node0  *2048kB  *32 " "status"

step "nvme-identify $free"
rc=0
nvme-identify "$free" > /tmp/identify.out 2>&1 || rc=$?
cat /tmp/identify.out
[ "$rc" -eq 0 ] || fail "nvme-identify exited with status $rc"
grep -q "^NVMe Controller at $free \[1b36:0010\]$" /tmp/identify.out || fail "nvme-identify did not name $free"
grep -q '^Serial Number: *POLLUXSETUP1$' /tmp/identify.out || fail "nvme-identify did not report the serial"
grep -q '^Namespace ID:1$' /tmp/identify.out || fail "nvme-identify did not report namespace 1"
grep -q '^Size (in LBAs): *131072 (64MiB)$' /tmp/identify.out || fail "nvme-identify did not report the 64 MiB namespace"

step "setup.sh config again changes nothing"
before="$(snapshot)"
setup config || fail "second setup.sh config exited with status $rc"
after="$(snapshot)"
echo "$after"
[ "$before" = "$after" ] || fail "second config changed the state: before '$before' after '$after'"
expect_line "^$free (1b36:0010, no block devices): already bound to vfio-pci, left alone$" "config again"
expect_line "^$busy (1b36:0010, $busy_ns): skipped, in use: $busy_ns mounted on $tools" "config again"
expect_line "^hugepages: node0 has 32 x 2048 kB already" "config again"

step "setup.sh reset"
setup reset || fail "setup.sh reset exited with status $rc"
expect_line "^$free (1b36:0010, no block devices): given back to nvme (was vfio-pci)$" "reset"
[ "$(driver_of "$free")" = nvme ] || fail "$free is on $(driver_of "$free") after reset"
[ "$(cat "/sys/bus/pci/devices/$free/driver_override")" = "(null)" ] || fail "driver_override left on $free"
wait_for "ns_by_serial POLLUXSETUP1 >/dev/null" 30 || fail "no namespace for $free after reset"
free_ns="$(ns_by_serial POLLUXSETUP1)"
wait_for "[ -b /dev/$free_ns ]" 30 || fail "/dev/$free_ns did not reappear"
echo "/dev/$free_ns is back"
[ "$(cat /sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages)" = 0 ] ||
    fail "hugepages not released"
grep -q hugetlbfs /proc/mounts && fail "hugetlbfs still mounted after reset"
grep -q " $tools " /proc/mounts || fail "the mounted file system went away"

step "setup.sh status after reset"
setup status || fail "setup.sh status exited with status $rc"
expect_line "^$free  *1b36:0010  *[-0-9]  *nvme  *$free_ns  *no$" "status after reset"

umount "$tools"
echo "setup: $free bound, identified and given back; $busy (mounted) never touched"
