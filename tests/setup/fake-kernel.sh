#!/usr/bin/env bash
# The kernel's side of the sysfs writes scripts/setup.sh makes, acted out on a fake tree:
# setup.sh calls it (POLLUX_SETUP_TEST_KERNEL) after each write in test mode.
#   fake-kernel.sh SYSFS_ROOT PATH VALUE
# FAKE_KERNEL_REFUSE="bdf ..."  these devices bind to no driver on drivers_probe (a failed probe)
# FAKE_HUGEPAGES_MAX=N          a node gives at most N hugepages (fragmented memory)
set -euo pipefail

root="$1" path="$2" value="$3"
case "$path" in
    */unbind)
        dev="$root/bus/pci/devices/$value"
        # Leaving nvme takes the controller's character and block devices with it.
        if [[ "$(readlink "$dev/driver")" == */nvme && -d "$dev/nvme" ]]; then
            mv "$dev/nvme" "$dev/.nvme-unbound"
        fi
        rm -f "$dev/driver"
        ;;
    */drivers_probe)
        dev="$root/bus/pci/devices/$value"
        [[ -e "$dev/driver" ]] && exit 0
        [[ " ${FAKE_KERNEL_REFUSE:-} " == *" $value "* ]] && exit 0
        override="$(cat "$dev/driver_override")"
        driver=nvme
        [[ -n "$override" && "$override" != "(null)" ]] && driver="$override"
        # As the kernel: no driver of that name loaded, no binding.
        [[ -d "$root/bus/pci/drivers/$driver" ]] || exit 0
        ln -s "$root/bus/pci/drivers/$driver" "$dev/driver"
        if [[ "$driver" == nvme && -d "$dev/.nvme-unbound" ]]; then
            mv "$dev/.nvme-unbound" "$dev/nvme"
        fi
        ;;
    */driver_override)
        # The kernel shows an empty override as "(null)".
        [[ -n "$value" ]] || echo "(null)" > "$path"
        ;;
    */nr_hugepages)
        if [[ -n "${FAKE_HUGEPAGES_MAX:-}" && "$value" -gt "$FAKE_HUGEPAGES_MAX" ]]; then
            echo "$FAKE_HUGEPAGES_MAX" > "$path"
        fi
        ;;
esac
