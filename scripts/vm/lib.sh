# shellcheck shell=sh
# Helpers for guest suite scripts (POSIX sh, busybox). Source with `. /pollux/lib.sh`.

# Prints a step so the console log shows where a failure happened.
step() { echo "POLLUX-STEP: $*"; }

fail() {
    echo "POLLUX-FAIL: $*"
    exit 1
}

# Prints the BDF of the first PCI device whose class is $1 (e.g. 0x010802 for NVMe).
find_pci_class() {
    for dev in /sys/bus/pci/devices/*; do
        if [ "$(cat "$dev/class")" = "$1" ]; then
            basename "$dev"
            return 0
        fi
    done
    return 1
}

# Waits up to $2 seconds (default 30) for the shell condition $1 to hold.
wait_for() {
    tries=$(( ${2:-30} * 10 ))
    while [ "$tries" -gt 0 ]; do
        if eval "$1"; then
            return 0
        fi
        sleep 0.1
        tries=$((tries - 1))
    done
    return 1
}

# Binds PCI device $1 to vfio-pci the way scripts/setup.sh does on a host: driver_override,
# unbind from the current driver, reprobe. Prints the IOMMU group number.
bind_vfio_pci() {
    bdf="$1"
    dev="/sys/bus/pci/devices/$bdf"
    echo vfio-pci > "$dev/driver_override"
    if [ -e "$dev/driver" ]; then
        current="$(basename "$(readlink "$dev/driver")")"
        if [ "$current" != vfio-pci ]; then
            echo "unbinding $bdf from $current" >&2
            echo "$bdf" > "$dev/driver/unbind"
        fi
    fi
    if [ ! -e "$dev/driver" ]; then
        echo "$bdf" > /sys/bus/pci/drivers_probe
    fi
    wait_for "[ -e $dev/driver ]" 10 || fail "$bdf did not bind to vfio-pci"
    bound="$(basename "$(readlink "$dev/driver")")"
    [ "$bound" = vfio-pci ] || fail "$bdf bound to $bound instead of vfio-pci"
    group="$(basename "$(readlink "$dev/iommu_group")")"
    wait_for "[ -c /dev/vfio/$group ]" 10 || fail "/dev/vfio/$group did not appear for $bdf"
    echo "$group"
}
