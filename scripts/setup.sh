#!/usr/bin/env bash
# Prepares a host for Pollux, as SPDK's scripts/setup.sh does for SPDK: binds the NVMe controllers
# that nothing uses to vfio-pci, reserves hugepages, and gives everything back on `reset`.
# Safe on a machine in use: a controller whose namespaces are mounted, swapped on, part of LVM,
# MD RAID or device-mapper, or held open by a process is skipped with the reason, never unbound.
# Run `scripts/setup.sh --help` for the commands and variables.
#
# How the decisions are made (all reads go through SYSFS_ROOT, PROC_ROOT and DEV_ROOT, which the
# fast tests in tests/setup/run.sh point at fake trees):
#   controller -> block devices   /sys/bus/pci/devices/<bdf>/nvme/nvmeX/nvmeXnY (non-multipath),
#                                 or a namespace head whose `device` is an nvme-subsystem that
#                                 lists one of this controller's nvmeX (native multipath);
#   in use                        /proc/self/mountinfo and /proc/mounts (by name and major:minor),
#                                 /proc/swaps, holders/ of each disk and partition (dm-*: LVM or
#                                 device-mapper, md*: MD RAID), /sys/fs/btrfs/*/devices, fds under
#                                 /proc/<pid>/fd pointing at the controller's /dev nodes, and
#                                 `pvs` / `zpool status -P` when those tools exist.
set -euo pipefail
shopt -s nullglob

readonly PROG="${0##*/}"
readonly NVME_CLASS=0x010802
# Pollux maps DMA memory with MAP_HUGETLB | MAP_HUGE_2MB (crates/env/src/dma.rs), so 2 MiB pages
# are what it needs whatever the kernel's default hugepage size is.
readonly DEFAULT_HUGEPGSZ_KB=2048

SYSFS_ROOT="${SYSFS_ROOT:-/sys}"
PROC_ROOT="${PROC_ROOT:-/proc}"
DEV_ROOT="${DEV_ROOT:-/dev}"
# Test mode: only with POLLUX_SETUP_TEST=1 *and* a redirected sysfs, so a stray variable on a
# real host never disables the root check. It skips the root check, logs commands (modprobe,
# mount) instead of running them, and logs every sysfs write (which goes to the fake tree).
TEST_MODE=0
if [[ "${POLLUX_SETUP_TEST:-0}" == 1 && "$SYSFS_ROOT" != /sys ]]; then
    TEST_MODE=1
fi
if [[ "$TEST_MODE" == 1 ]]; then
    STATE_DIR="${POLLUX_STATE_DIR:-$SYSFS_ROOT/.pollux-state}"
else
    STATE_DIR="${POLLUX_STATE_DIR:-/run/pollux}"
fi
readonly STATE_FILE="$STATE_DIR/setup.state"
TEST_LOG="${POLLUX_SETUP_TEST_LOG:-/dev/null}"
BIND_TIMEOUT_S="${POLLUX_SETUP_BIND_TIMEOUT:-10}"

usage() {
    cat <<EOF
Usage: $PROG [config|reset|status|cleanup|help]

Prepares this machine for Pollux: NVMe controllers to vfio-pci, hugepages.

Commands:
  config   (default) load vfio-pci if needed; bind every NVMe controller (PCI class
           $NVME_CLASS) that nothing uses to vfio-pci through driver_override; reserve
           HUGEMEM MiB of ${DEFAULT_HUGEPGSZ_KB} kB hugepages spread over the NUMA nodes (or
           HUGENODE); mount hugetlbfs on /dev/hugepages when none is mounted. Prints what it did
           per device. Running it again changes nothing.
  reset    give the controllers on vfio-pci back to the kernel nvme driver (clear
           driver_override, unbind, reprobe) and release the hugepages config reserved
           (restores each node's count from before config; unmounts the hugetlbfs it mounted).
  status   per NVMe controller: PCI address, vendor:device, NUMA node, driver, block devices,
           whether they are in use and why; hugepages per NUMA node. Needs no root (but without
           root, processes holding devices open cannot be seen).
  cleanup  remove hugepage files left by dead Pollux processes: files named pollux*pid<PID>*
           in a hugetlbfs mount whose process is gone and that no process has open or mapped.

Never touched: a controller with a namespace or partition that is mounted, used as swap, a
member of LVM, MD RAID, device-mapper, btrfs or a ZFS pool, or held open by a process (the
reason is printed); a controller bound to a driver other than nvme; one already on vfio-pci.

Variables:
  PCI_ALLOWED         space-separated PCI addresses (0000:01:00.0 or 01:00.0): touch only these
  PCI_BLOCKED         space-separated PCI addresses never to touch
  HUGEMEM             MiB of hugepages to reserve (default 2048; 0: leave hugepages alone)
  HUGENODE            NUMA nodes to put them on, comma- or space-separated (default: all,
                      spread evenly)
  HUGEPGSZ            hugepage size in kB (default $DEFAULT_HUGEPGSZ_KB, what Pollux maps)
  POLLUX_UNSAFE_NOIOMMU=1
                      without an IOMMU, use VFIO's unsafe no-IOMMU mode (no DMA isolation: a
                      device can then write anywhere in memory). Never set by default.
  POLLUX_STATE_DIR    where config records what reset must undo (default /run/pollux)

Exit status: 0 when every controller was handled or skipped with a reason; 1 when something
failed (the message names the device); 2 on a usage error.

Examples:
  sudo scripts/setup.sh                                   # bind free NVMe, 2 GiB hugepages
  sudo HUGEMEM=8192 HUGENODE=0 scripts/setup.sh config    # 8 GiB on node 0 only
  sudo PCI_ALLOWED="0000:01:00.0" scripts/setup.sh        # only this controller
  sudo PCI_BLOCKED="0000:02:00.0 0000:03:00.0" scripts/setup.sh
  scripts/setup.sh status
  sudo scripts/setup.sh reset
  sudo scripts/setup.sh cleanup
EOF
}

log() { printf '%s\n' "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
err() { printf '%s: error: %s\n' "$PROG" "$*" >&2; }

# Path as the operator knows it (/sys/...), also in test mode, for messages and the test log.
shown() {
    local path="$1"
    case "$path" in
        "$SYSFS_ROOT"/*) printf '/sys%s' "${path#"$SYSFS_ROOT"}" ;;
        *) printf '%s' "$path" ;;
    esac
}

# Writes $2 to the sysfs file $1. In test mode the write also goes to the log, and the fake
# kernel (POLLUX_SETUP_TEST_KERNEL) may then act on it as the kernel would.
sysfs_write() {
    local path="$1" value="$2"
    if [[ "$TEST_MODE" == 1 ]]; then
        printf 'write %s %s\n' "$(shown "$path")" "$value" >> "$TEST_LOG"
    fi
    if ! { printf '%s\n' "$value" > "$path"; } 2> /dev/null; then
        err "cannot write '$value' to $(shown "$path")"
        return 1
    fi
    if [[ "$TEST_MODE" == 1 && -n "${POLLUX_SETUP_TEST_KERNEL:-}" ]]; then
        "$POLLUX_SETUP_TEST_KERNEL" "$SYSFS_ROOT" "$path" "$value"
    fi
}

# Runs a command that changes the system (modprobe, mount); in test mode only logs it.
run_cmd() {
    if [[ "$TEST_MODE" == 1 ]]; then
        printf 'run %s\n' "$*" >> "$TEST_LOG"
        return 0
    fi
    "$@"
}

# Prints the first line of file $1, or nothing when it cannot be read.
# Sets array $1 to the output lines of command $2... Process substitution (< <(...)) would need
# /dev/fd, which a minimal /dev (an initramfs, a container) may lack.
read_lines() {
    local -n lines_out="$1"
    shift
    local text
    text="$("$@")" || return 1
    lines_out=()
    if [[ -n "$text" ]]; then
        # shellcheck disable=SC2034 # lines_out is a nameref: the caller's array is assigned
        mapfile -t lines_out <<< "$text"
    fi
}

read_file() {
    local value=""
    if [[ -r "$1" ]]; then
        read -r value < "$1" 2> /dev/null || true
    fi
    printf '%s' "$value"
}

need_root() {
    [[ "$TEST_MODE" == 1 || "$EUID" -eq 0 ]] && return 0
    err "'$PROG $1' changes driver bindings and kernel settings under /sys and needs root: run 'sudo $0 $1'"
    exit 1
}

# ---------------------------------------------------------------------------------------------
# PCI address filters.

# Prints a PCI address in the 0000:bb:dd.f form the kernel uses.
normalize_bdf() {
    local bdf="${1,,}"
    [[ "$bdf" == *:*:* ]] || bdf="0000:$bdf"
    printf '%s' "$bdf"
}

ALLOWED=()
BLOCKED=()
load_filters() {
    local word
    for word in ${PCI_ALLOWED:-}; do ALLOWED+=("$(normalize_bdf "$word")"); done
    for word in ${PCI_BLOCKED:-}; do BLOCKED+=("$(normalize_bdf "$word")"); done
}

# Prints why $1 is excluded by PCI_ALLOWED / PCI_BLOCKED; prints nothing when it is not.
filter_reason() {
    local bdf="$1" entry
    for entry in "${BLOCKED[@]}"; do
        if [[ "$entry" == "$bdf" ]]; then
            printf 'listed in PCI_BLOCKED'
            return
        fi
    done
    if [[ "${#ALLOWED[@]}" -gt 0 ]]; then
        for entry in "${ALLOWED[@]}"; do
            [[ "$entry" == "$bdf" ]] && return
        done
        printf 'not listed in PCI_ALLOWED'
    fi
}

# ---------------------------------------------------------------------------------------------
# Controllers and their block devices.

# Prints the PCI addresses of the NVMe controllers, one per line.
nvme_controllers() {
    local dev
    for dev in "$SYSFS_ROOT"/bus/pci/devices/*; do
        [[ "$(read_file "$dev/class")" == "$NVME_CLASS" ]] && printf '%s\n' "${dev##*/}"
    done
    return 0
}

pci_dir() { printf '%s' "$SYSFS_ROOT/bus/pci/devices/$1"; }

# Prints the driver bound to PCI device $1, or nothing.
pci_driver() {
    local link
    link="$(readlink "$(pci_dir "$1")/driver" 2> /dev/null)" || return 0
    printf '%s' "${link##*/}"
}

# Prints the driver_override of PCI device $1, or nothing when unset ("(null)").
pci_override() {
    local value
    value="$(read_file "$(pci_dir "$1")/driver_override")"
    [[ "$value" == "(null)" ]] && value=""
    printf '%s' "$value"
}

contains() {
    local needle="$1" item
    shift
    for item in "$@"; do
        [[ "$item" == "$needle" ]] && return 0
    done
    return 1
}

# Fills CTRLS (nvmeX), DISKS (nvmeXnY), PARTS (nvmeXnYpZ) and CHARS (the controllers' and
# namespaces' character devices) for the controller at PCI address $1.
collect_devices() {
    local bdf="$1" pdev entry name bpath devlink part owned
    CTRLS=() DISKS=() PARTS=() CHARS=()
    pdev="$(readlink -f "$(pci_dir "$bdf")")"
    for entry in "$pdev"/nvme/nvme*; do
        CTRLS+=("${entry##*/}")
    done
    # Newer layouts: /sys/class/nvme/nvmeX/device points at the PCI device.
    for entry in "$SYSFS_ROOT"/class/nvme/nvme*; do
        name="${entry##*/}"
        if [[ "$(readlink -f "$entry/device")" == "$pdev" ]] && ! contains "$name" "${CTRLS[@]}"; then
            CTRLS+=("$name")
        fi
    done
    for name in "${CTRLS[@]}"; do
        CHARS+=("$name")
        for entry in "$pdev/nvme/$name"/ng* "$SYSFS_ROOT/class/nvme/$name"/ng*; do
            contains "${entry##*/}" "${CHARS[@]}" || CHARS+=("${entry##*/}")
        done
    done
    for entry in "$SYSFS_ROOT"/class/block/nvme*; do
        [[ -e "$entry" ]] || continue
        name="${entry##*/}"
        # Partitions are found under their disk; nvmeXcYnZ are multipath's hidden per-path disks.
        [[ -e "$entry/partition" || "$name" =~ ^nvme[0-9]+c[0-9]+n[0-9]+$ ]] && continue
        bpath="$(readlink -f "$entry")"
        owned=0
        if [[ "$bpath" == "$pdev"/* ]]; then
            owned=1
        else
            # Native multipath: the namespace head hangs off nvme-subsysN, which lists its
            # controllers; a namespace shared by several controllers keeps all of them.
            devlink="$(readlink -f "$bpath/device" 2> /dev/null || true)"
            if [[ "${devlink##*/}" == nvme-subsys* ]]; then
                for part in "$devlink"/nvme*; do
                    [[ -L "$part" ]] || continue
                    if [[ "$(readlink -f "$part")" == "$pdev"/* ]] || contains "${part##*/}" "${CTRLS[@]}"; then
                        owned=1
                    fi
                done
            fi
        fi
        [[ "$owned" == 1 ]] || continue
        DISKS+=("$name")
        for part in "$bpath/$name"*; do
            [[ -e "$part/partition" ]] && PARTS+=("${part##*/}")
        done
        part="ng${name#nvme}"
        if [[ -e "$SYSFS_ROOT/class/nvme-generic/$part" ]] && ! contains "$part" "${CHARS[@]}"; then
            CHARS+=("$part")
        fi
    done
    return 0
}

# ---------------------------------------------------------------------------------------------
# What uses a block device. The system-wide tables are read once.

MOUNTS_LOADED=0
MOUNT_SRC=() MOUNT_DEVNO=() MOUNT_POINT=()
load_mounts() {
    [[ "$MOUNTS_LOADED" == 1 ]] && return 0
    MOUNTS_LOADED=1
    local id parent devno root point rest fstype source
    if [[ -r "$PROC_ROOT/self/mountinfo" ]]; then
        while read -r id parent devno root point rest; do
            rest="${rest#* - }"
            read -r fstype source _ <<< "$rest"
            MOUNT_SRC+=("$source") MOUNT_DEVNO+=("$devno") MOUNT_POINT+=("$point")
            : "$id" "$parent" "$root" "$fstype"
        done < "$PROC_ROOT/self/mountinfo"
    fi
    if [[ -r "$PROC_ROOT/mounts" ]]; then
        while read -r source point rest; do
            MOUNT_SRC+=("$source") MOUNT_DEVNO+=("") MOUNT_POINT+=("$point")
        done < "$PROC_ROOT/mounts"
    fi
}

# Prints the kernel name of /dev path $1 (following /dev/disk/by-* and /dev/mapper links).
dev_name() {
    local path="$1" target
    if [[ "$path" == /dev/* && -L "$DEV_ROOT/${path#/dev/}" ]]; then
        target="$(readlink -f "$DEV_ROOT/${path#/dev/}" 2> /dev/null || true)"
        [[ -n "$target" ]] && path="$target"
    fi
    printf '%s' "${path##*/}"
}

FDS_LOADED=0
# Open file (absolute path) -> "PID PID ..." of the processes holding it open.
declare -A FD_PIDS=()
# Reads every process's open files from one `ls -l` of the fd directories (one process, not one
# readlink per fd); processes that cannot be read (not root, or gone meanwhile) are skipped.
load_fds() {
    [[ "$FDS_LOADED" == 1 ]] && return 0
    FDS_LOADED=1
    local dirs=("$PROC_ROOT"/[0-9]*/fd) line pid="" target listing
    [[ "${#dirs[@]}" -gt 0 ]] || return 0
    # ls prints a "DIR:" header before each directory only when it lists several.
    if [[ "${#dirs[@]}" -eq 1 ]]; then
        pid="${dirs[0]#"$PROC_ROOT"/}"
        pid="${pid%/fd}"
    fi
    listing="$(ls -l "${dirs[@]}" 2> /dev/null || true)"
    while IFS= read -r line; do
        if [[ "$line" == "$PROC_ROOT"/*/fd: ]]; then
            pid="${line#"$PROC_ROOT"/}"
            pid="${pid%/fd:}"
        elif [[ "$line" == *" -> /"* && -n "$pid" ]]; then
            target="${line##* -> }"
            [[ " ${FD_PIDS[$target]:-}" == *" $pid "* ]] || FD_PIDS["$target"]+="$pid "
        fi
    done <<< "$listing"
}

# Prints "PID (comm)" for each process holding /dev/$1 open, comma-separated.
holders_of_node() {
    local name="$1" pids pid out=""
    load_fds
    pids="${FD_PIDS[/dev/$name]:-} ${FD_PIDS[$DEV_ROOT/$name]:-}"
    for pid in $pids; do
        [[ ", $out," == *", $pid ("* ]] && continue
        out+="${out:+, }$pid ($(read_file "$PROC_ROOT/$pid/comm"))"
    done
    printf '%s' "$out"
}

# Describes the block-layer holder $1 (dm-N, mdN, ...) of a disk or partition.
describe_holder() {
    local holder="$1" dm="$SYSFS_ROOT/class/block/$1/dm" uuid name
    case "$holder" in
        dm-*)
            uuid="$(read_file "$dm/uuid")"
            name="$(read_file "$dm/name")"
            case "$uuid" in
                LVM-*) printf 'LVM physical volume (logical volume %s, %s)' "${name:-?}" "$holder" ;;
                CRYPT-*) printf 'dm-crypt device %s (%s)' "${name:-?}" "$holder" ;;
                *) printf 'device-mapper device %s (%s)' "${name:-?}" "$holder" ;;
            esac
            ;;
        md*) printf 'MD RAID member (%s)' "$holder" ;;
        *) printf 'held by %s' "$holder" ;;
    esac
}

# External tools: an LVM physical volume that is not active (no dm holder yet) and ZFS vdevs
# (opened by the kernel, invisible in holders/ and fds). Not consulted in test mode.
TOOLS_LOADED=0
LVM_PVS=() ZFS_VDEVS=()
load_tools() {
    [[ "$TOOLS_LOADED" == 1 ]] && return 0
    TOOLS_LOADED=1
    [[ "$TEST_MODE" == 1 ]] && return 0
    local word
    if command -v pvs > /dev/null 2>&1; then
        for word in $(pvs --noheadings -o pv_name 2> /dev/null || true); do
            LVM_PVS+=("$(dev_name "$word")")
        done
    fi
    if command -v zpool > /dev/null 2>&1; then
        for word in $(zpool status -P 2> /dev/null | awk '$1 ~ /^\/dev\// {print $1}' || true); do
            ZFS_VDEVS+=("$(dev_name "$word")")
        done
    fi
}

# Appends to REASONS why the disk or partition $1 (a kernel name; $2: its sysfs directory)
# is in use.
usage_of_blockdev() {
    local name="$1" dir="$2" devno i holder swap_line swap_name
    devno="$(read_file "$dir/dev")"
    load_mounts
    for i in "${!MOUNT_SRC[@]}"; do
        if [[ "$(dev_name "${MOUNT_SRC[$i]}")" == "$name" ]] ||
            [[ -n "$devno" && "${MOUNT_DEVNO[$i]}" == "$devno" ]]; then
            contains "$name mounted on ${MOUNT_POINT[$i]}" "${REASONS[@]}" ||
                REASONS+=("$name mounted on ${MOUNT_POINT[$i]}")
        fi
    done
    if [[ -r "$PROC_ROOT/swaps" ]]; then
        while read -r swap_line _; do
            [[ "$swap_line" == /* ]] || continue
            swap_name="$(dev_name "$swap_line")"
            [[ "$swap_name" == "$name" ]] && REASONS+=("$name is active swap")
        done < "$PROC_ROOT/swaps"
    fi
    for holder in "$dir"/holders/*; do
        REASONS+=("$name: $(describe_holder "${holder##*/}")")
    done
    for holder in "$SYSFS_ROOT"/fs/btrfs/*/devices/"$name"; do
        holder="${holder%/devices/*}"
        REASONS+=("$name: member of btrfs file system ${holder##*/}")
    done
    load_tools
    contains "$name" "${LVM_PVS[@]}" && REASONS+=("$name: LVM physical volume (pvs)")
    contains "$name" "${ZFS_VDEVS[@]}" && REASONS+=("$name: ZFS pool member (zpool status)")
    holder="$(holders_of_node "$name")"
    [[ -n "$holder" ]] && REASONS+=("/dev/$name held open by $holder")
    return 0
}

# Fills REASONS with why the controller whose devices collect_devices found is in use.
collect_usage() {
    local name bpath part
    REASONS=()
    for name in "${DISKS[@]}"; do
        bpath="$(readlink -f "$SYSFS_ROOT/class/block/$name")"
        usage_of_blockdev "$name" "$bpath"
        for part in "${PARTS[@]}"; do
            [[ -d "$bpath/$part" ]] && usage_of_blockdev "$part" "$bpath/$part"
        done
    done
    for name in "${CHARS[@]}"; do
        part="$(holders_of_node "$name")"
        [[ -n "$part" ]] && REASONS+=("/dev/$name held open by $part")
    done
    return 0
}

# Prints "PID (comm)" of the processes holding the VFIO group of PCI device $1 open.
vfio_users() {
    local group
    group="$(readlink "$(pci_dir "$1")/iommu_group" 2> /dev/null)" || return 0
    holders_of_node "vfio/${group##*/}"
}

join_reasons() {
    local IFS=';'
    local joined="${REASONS[*]}"
    printf '%s' "${joined//;/; }"
}

# ---------------------------------------------------------------------------------------------
# Binding.

# Waits until PCI device $1 is bound to driver $2.
wait_driver() {
    local bdf="$1" want="$2" tries=$((BIND_TIMEOUT_S * 10))
    while true; do
        [[ "$(pci_driver "$bdf")" == "$want" ]] && return 0
        ((tries-- > 0)) || return 1
        sleep 0.1
    done
}

# Binds PCI device $1 (on driver $2, possibly empty) to vfio-pci: driver_override, unbind,
# drivers_probe. On failure hands the device back to the kernel driver.
bind_vfio() {
    local bdf="$1" current="$2" dev
    dev="$(pci_dir "$bdf")"
    sysfs_write "$dev/driver_override" vfio-pci || return 1
    if [[ -n "$current" ]]; then
        sysfs_write "$dev/driver/unbind" "$bdf" || return 1
    fi
    sysfs_write "$SYSFS_ROOT/bus/pci/drivers_probe" "$bdf" || true
    if ! wait_driver "$bdf" vfio-pci; then
        err "$bdf did not bind to vfio-pci within ${BIND_TIMEOUT_S}s (driver now: $(pci_driver "$bdf" || true)); see dmesg"
        sysfs_write "$dev/driver_override" "" || true
        [[ -z "$(pci_driver "$bdf")" ]] && { sysfs_write "$SYSFS_ROOT/bus/pci/drivers_probe" "$bdf" || true; }
        return 1
    fi
}

# Hands PCI device $1 back to the kernel nvme driver.
unbind_vfio() {
    local bdf="$1" dev
    dev="$(pci_dir "$bdf")"
    sysfs_write "$dev/driver_override" "" || return 1
    if [[ -n "$(pci_driver "$bdf")" ]]; then
        sysfs_write "$dev/driver/unbind" "$bdf" || return 1
    fi
    sysfs_write "$SYSFS_ROOT/bus/pci/drivers_probe" "$bdf" || true
    if ! wait_driver "$bdf" nvme; then
        err "$bdf did not bind to nvme within ${BIND_TIMEOUT_S}s (driver now: $(pci_driver "$bdf" || true)); see dmesg"
        return 1
    fi
}

iommu_enabled() {
    local groups=("$SYSFS_ROOT"/kernel/iommu_groups/*)
    [[ "${#groups[@]}" -gt 0 ]]
}

no_iommu_help() {
    local vendor hint="intel_iommu=on (Intel) or amd_iommu=on (AMD)"
    vendor="$(awk -F': *' '/^vendor_id/ {print $2; exit}' "$PROC_ROOT/cpuinfo" 2> /dev/null || true)"
    case "$vendor" in
        GenuineIntel) hint="intel_iommu=on" ;;
        AuthenticAMD) hint="amd_iommu=on" ;;
    esac
    cat >&2 <<EOF
$PROG: error: no IOMMU is enabled (/sys/kernel/iommu_groups is empty), so vfio-pci cannot
  isolate the devices. Enable VT-d / AMD-Vi in the firmware, add $hint iommu=pt to the kernel
  command line (GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub) and reboot.
  Without an IOMMU, POLLUX_UNSAFE_NOIOMMU=1 uses VFIO's no-IOMMU mode: no DMA protection at all.
EOF
}

# Makes sure vfio-pci can take devices: module loaded, IOMMU present or no-IOMMU opted into.
prepare_vfio() {
    local param="$SYSFS_ROOT/module/vfio/parameters/enable_unsafe_noiommu_mode"
    if ! iommu_enabled; then
        if [[ "${POLLUX_UNSAFE_NOIOMMU:-0}" != 1 ]]; then
            no_iommu_help
            return 1
        fi
        warn "no IOMMU: POLLUX_UNSAFE_NOIOMMU=1, using VFIO's unsafe no-IOMMU mode (no DMA isolation)"
        if [[ -e "$param" ]]; then
            [[ "$(read_file "$param")" == Y ]] || sysfs_write "$param" 1 || return 1
        else
            run_cmd modprobe vfio enable_unsafe_noiommu_mode=1 || {
                err "modprobe vfio enable_unsafe_noiommu_mode=1 failed"
                return 1
            }
        fi
    fi
    if [[ ! -d "$SYSFS_ROOT/bus/pci/drivers/vfio-pci" ]]; then
        log "loading vfio-pci"
        run_cmd modprobe vfio-pci || {
            err "modprobe vfio-pci failed: is the vfio-pci module installed for kernel $(uname -r)?"
            return 1
        }
    fi
    # vfio only asks for its IOMMU backend through a soft dependency, which not every modprobe
    # (busybox's) follows; without it opening the container fails.
    if iommu_enabled && [[ ! -d "$SYSFS_ROOT/module/vfio_iommu_type1" ]]; then
        run_cmd modprobe vfio_iommu_type1 || {
            err "modprobe vfio_iommu_type1 failed"
            return 1
        }
    fi
}

# Prints a one-line description of controller $1 for messages: "bdf (vvvv:dddd, nvme0n1 ...)".
describe_ctrl() {
    local bdf="$1" dev ids names
    dev="$(pci_dir "$bdf")"
    ids="$(read_file "$dev/vendor"):$(read_file "$dev/device")"
    ids="${ids//0x/}"
    names="${DISKS[*]:-${CTRLS[*]:-no block devices}}"
    printf '%s (%s, %s)' "$bdf" "$ids" "$names"
}

cmd_config_devices() {
    local bdf reason driver override failed=0 vfio_ready=-1 ctrls
    read_lines ctrls nvme_controllers
    if [[ "${#ctrls[@]}" -eq 0 ]]; then
        log "no NVMe controllers (PCI class $NVME_CLASS) found"
        return 0
    fi
    for bdf in "${ctrls[@]}"; do
        collect_devices "$bdf"
        reason="$(filter_reason "$bdf")"
        if [[ -n "$reason" ]]; then
            log "$(describe_ctrl "$bdf"): skipped, $reason"
            continue
        fi
        driver="$(pci_driver "$bdf")"
        override="$(pci_override "$bdf")"
        if [[ "$driver" == vfio-pci ]]; then
            log "$(describe_ctrl "$bdf"): already bound to vfio-pci, left alone"
            continue
        fi
        if [[ -n "$driver" && "$driver" != nvme ]]; then
            log "$(describe_ctrl "$bdf"): skipped, bound to $driver (not the kernel nvme driver)"
            continue
        fi
        if [[ -n "$override" && "$override" != vfio-pci ]]; then
            log "$(describe_ctrl "$bdf"): skipped, driver_override is '$override'"
            continue
        fi
        collect_usage
        if [[ "${#REASONS[@]}" -gt 0 ]]; then
            log "$(describe_ctrl "$bdf"): skipped, in use: $(join_reasons)"
            continue
        fi
        if [[ "$vfio_ready" == -1 ]]; then
            vfio_ready=0
            prepare_vfio && vfio_ready=1
        fi
        if [[ "$vfio_ready" != 1 ]]; then
            err "$(describe_ctrl "$bdf"): not bound, vfio-pci is not usable (see above)"
            failed=1
            continue
        fi
        if bind_vfio "$bdf" "$driver"; then
            log "$(describe_ctrl "$bdf"): bound to vfio-pci (was ${driver:-unbound})"
            group_warning "$bdf"
        else
            err "$(describe_ctrl "$bdf"): binding to vfio-pci failed"
            failed=1
        fi
    done
    return "$failed"
}

# VFIO hands out a whole IOMMU group or nothing: warn when the group holds devices that are
# bound to other drivers.
group_warning() {
    local bdf="$1" group member driver
    group="$(readlink -f "$(pci_dir "$bdf")/iommu_group" 2> /dev/null)" || return 0
    for member in "$group"/devices/*; do
        member="${member##*/}"
        [[ "$member" == "$bdf" ]] && continue
        driver="$(pci_driver "$member")"
        case "$driver" in
            "" | vfio-pci | pci-stub | pcieport) ;;
            *) warn "$bdf shares IOMMU group ${group##*/} with $member (driver $driver): VFIO cannot open it until $member is unbound too" ;;
        esac
    done
}

# ---------------------------------------------------------------------------------------------
# Hugepages.

# Prints the NUMA nodes hugepages go on, one per line; nothing on a kernel without NUMA.
huge_nodes() {
    local node nodes=()
    for node in "$SYSFS_ROOT"/devices/system/node/node[0-9]*; do
        nodes+=("${node##*/node}")
    done
    [[ "${#nodes[@]}" -gt 0 ]] || return 0
    if [[ -n "${HUGENODE:-}" ]]; then
        for node in ${HUGENODE//,/ }; do
            if ! contains "$node" "${nodes[@]}"; then
                err "HUGENODE: there is no NUMA node $node (nodes: ${nodes[*]})"
                return 1
            fi
            printf '%s\n' "$node"
        done
    else
        printf '%s\n' "${nodes[@]}"
    fi
}

# Prints the nr_hugepages file of node $1 (empty: the global one) for $2 kB pages.
huge_file() {
    if [[ -n "$1" ]]; then
        printf '%s' "$SYSFS_ROOT/devices/system/node/node$1/hugepages/hugepages-$2kB/nr_hugepages"
    else
        printf '%s' "$SYSFS_ROOT/kernel/mm/hugepages/hugepages-$2kB/nr_hugepages"
    fi
}

# Records, once, a line of what reset must undo.
state_record() {
    local key="$1" line="$1 $2"
    mkdir -p "$STATE_DIR"
    if [[ -f "$STATE_FILE" ]] && grep -q -F -- "$key " "$STATE_FILE"; then
        return 0
    fi
    printf '%s\n' "$line" >> "$STATE_FILE"
}

cmd_config_hugepages() {
    local mem_mib="${HUGEMEM:-2048}" size_kb="${HUGEPGSZ:-$DEFAULT_HUGEPGSZ_KB}"
    local nodes total per_node node file have got label failed=0
    if ! [[ "$mem_mib" =~ ^[0-9]+$ && "$size_kb" =~ ^[1-9][0-9]*$ ]]; then
        err "HUGEMEM ($mem_mib) and HUGEPGSZ ($size_kb) must be whole numbers (MiB, kB)"
        return 1
    fi
    if [[ "$mem_mib" == 0 ]]; then
        log "hugepages: HUGEMEM=0, left alone"
        return 0
    fi
    nodes="$(huge_nodes)" || return 1
    if [[ -n "$nodes" ]]; then
        mapfile -t nodes <<< "$nodes"
    else
        nodes=("")
    fi
    total=$(((mem_mib * 1024 + size_kb - 1) / size_kb))
    per_node=$(((total + ${#nodes[@]} - 1) / ${#nodes[@]}))
    for node in "${nodes[@]}"; do
        file="$(huge_file "$node" "$size_kb")"
        label="${node:+node$node}"
        label="${label:-system}"
        if [[ ! -e "$file" ]]; then
            err "hugepages: no ${size_kb} kB hugepages on $label ($(shown "$file") missing); check HUGEPGSZ"
            failed=1
            continue
        fi
        have="$(read_file "$file")"
        if [[ "${have:-0}" -ge "$per_node" ]]; then
            log "hugepages: $label has $have x ${size_kb} kB already (wanted $per_node), left alone"
            continue
        fi
        state_record "hugepages $file" "$have"
        sysfs_write "$file" "$per_node" || { failed=1; continue; }
        got="$(read_file "$file")"
        if [[ "${got:-0}" -lt "$per_node" ]]; then
            err "hugepages: $label got only $got of $per_node x ${size_kb} kB pages (memory fragmented? reserve them at boot with hugepages= on the kernel command line)"
            failed=1
            continue
        fi
        log "hugepages: $label $have -> $got x ${size_kb} kB"
    done
    mount_hugetlbfs "$size_kb" || failed=1
    return "$failed"
}

hugetlbfs_mounts() {
    local source point fstype rest
    [[ -r "$PROC_ROOT/mounts" ]] || return 0
    while read -r source point fstype rest; do
        [[ "$fstype" == hugetlbfs ]] && printf '%s\n' "$point"
        : "$source" "$rest"
    done < "$PROC_ROOT/mounts"
    return 0
}

mount_hugetlbfs() {
    local size_kb="$1" point="$DEV_ROOT/hugepages" mounted
    mounted="$(hugetlbfs_mounts | head -n 1)"
    if [[ -n "$mounted" ]]; then
        log "hugetlbfs: mounted on $mounted already"
        return 0
    fi
    if ! run_cmd mkdir -p "$point" || ! run_cmd mount -t hugetlbfs -o "pagesize=${size_kb}K" nodev "$point"; then
        err "hugetlbfs: mount on $point failed"
        return 1
    fi
    state_record "mount $point" "hugetlbfs"
    log "hugetlbfs: mounted on $point"
}

# ---------------------------------------------------------------------------------------------
# Commands.

cmd_config() {
    need_root config
    load_filters
    local failed=0
    cmd_config_devices || failed=1
    cmd_config_hugepages || failed=1
    return "$failed"
}

cmd_reset() {
    need_root reset
    load_filters
    local bdf reason driver override users failed=0 nvme_ready=0 ctrls
    read_lines ctrls nvme_controllers
    for bdf in "${ctrls[@]}"; do
        collect_devices "$bdf"
        reason="$(filter_reason "$bdf")"
        if [[ -n "$reason" ]]; then
            log "$(describe_ctrl "$bdf"): skipped, $reason"
            continue
        fi
        driver="$(pci_driver "$bdf")"
        override="$(pci_override "$bdf")"
        if [[ "$driver" == nvme ]]; then
            log "$(describe_ctrl "$bdf"): on nvme already, left alone"
            continue
        fi
        if [[ -n "$driver" && "$driver" != vfio-pci ]] || [[ -z "$driver" && -n "$override" && "$override" != vfio-pci ]]; then
            log "$(describe_ctrl "$bdf"): skipped, bound to ${driver:-nothing} (driver_override '${override}'), not set up by $PROG"
            continue
        fi
        users="$(vfio_users "$bdf")"
        if [[ -n "$users" ]]; then
            err "$(describe_ctrl "$bdf"): not reset, its VFIO group is open by $users; stop it first"
            failed=1
            continue
        fi
        if [[ "$nvme_ready" == 0 && ! -d "$SYSFS_ROOT/bus/pci/drivers/nvme" ]]; then
            run_cmd modprobe nvme || { err "modprobe nvme failed"; failed=1; }
        fi
        nvme_ready=1
        if unbind_vfio "$bdf"; then
            log "$(describe_ctrl "$bdf"): given back to nvme (was ${driver:-unbound})"
        else
            err "$(describe_ctrl "$bdf"): could not give it back to nvme"
            failed=1
        fi
    done
    reset_hugepages || failed=1
    return "$failed"
}

# Undoes what config recorded: hugepage counts back to what they were, our hugetlbfs unmounted.
reset_hugepages() {
    local kind path value failed=0 now
    if [[ ! -f "$STATE_FILE" ]]; then
        log "hugepages: none reserved by $PROG, left alone"
        return 0
    fi
    while read -r kind path value; do
        case "$kind" in
            mount)
                if run_cmd umount "$path"; then
                    log "hugetlbfs: unmounted $path"
                else
                    warn "hugetlbfs: could not unmount $path (in use?); left mounted"
                fi
                ;;
            hugepages)
                now="$(read_file "$path")"
                if sysfs_write "$path" "$value"; then
                    log "hugepages: $(shown "$path"): $now -> $(read_file "$path") (as before config)"
                else
                    failed=1
                fi
                ;;
        esac
    done < "$STATE_FILE"
    [[ "$failed" == 0 ]] && rm -f "$STATE_FILE"
    return "$failed"
}

cmd_status() {
    local bdf dev ids numa driver blocks use ctrls users reason all
    if [[ "$TEST_MODE" == 0 && "$EUID" -ne 0 ]]; then
        warn "not root: processes holding devices open cannot be seen; run with sudo for a full answer"
    fi
    load_filters
    read_lines ctrls nvme_controllers
    printf '%-13s %-9s %-4s %-9s %-24s %s\n' "PCI" "VID:DID" "NUMA" "DRIVER" "BLOCK DEVICES" "IN USE"
    for bdf in "${ctrls[@]}"; do
        dev="$(pci_dir "$bdf")"
        collect_devices "$bdf"
        collect_usage
        ids="$(read_file "$dev/vendor"):$(read_file "$dev/device")"
        numa="$(read_file "$dev/numa_node")"
        [[ -z "$numa" || "$numa" == -1 ]] && numa=-
        driver="$(pci_driver "$bdf")"
        all=("${DISKS[@]}" "${PARTS[@]}")
        blocks="${all[*]}"
        use=no
        if [[ "$driver" == vfio-pci ]]; then
            users="$(vfio_users "$bdf")"
            [[ -n "$users" ]] && REASONS+=("VFIO group open by $users")
        fi
        [[ "${#REASONS[@]}" -gt 0 ]] && use="yes: $(join_reasons)"
        reason="$(filter_reason "$bdf")"
        [[ -n "$reason" ]] && use+=" [$reason]"
        printf '%-13s %-9s %-4s %-9s %-24s %s\n' "$bdf" "${ids//0x/}" "$numa" "${driver:--}" "${blocks:--}" "$use"
    done
    [[ "${#ctrls[@]}" -gt 0 ]] || log "(no NVMe controllers)"
    printf '\n%-8s %-10s %-8s %s\n' "NODE" "PAGE SIZE" "TOTAL" "FREE"
    local node size any=0
    for node in "$SYSFS_ROOT"/devices/system/node/node[0-9]*; do
        for size in "$node"/hugepages/hugepages-*; do
            any=1
            printf '%-8s %-10s %-8s %s\n' "${node##*/}" "${size##*/hugepages-}" \
                "$(read_file "$size/nr_hugepages")" "$(read_file "$size/free_hugepages")"
        done
    done
    if [[ "$any" == 0 ]]; then
        for size in "$SYSFS_ROOT"/kernel/mm/hugepages/hugepages-*; do
            printf '%-8s %-10s %-8s %s\n' "system" "${size##*/hugepages-}" \
                "$(read_file "$size/nr_hugepages")" "$(read_file "$size/free_hugepages")"
        done
    fi
    local mounts
    read_lines mounts hugetlbfs_mounts
    log "hugetlbfs: ${mounts[*]:-not mounted}"
}

cmd_cleanup() {
    need_root cleanup
    local point file name pid removed=0 kept=0 failed=0 mapped=() line points=()
    local -A in_use=()
    local maps=("$PROC_ROOT"/[0-9]*/maps)
    read_lines points hugetlbfs_mounts
    for point in "${points[@]}"; do
        # Files mapped or open by any process are in use, whatever their name says.
        if [[ "${#maps[@]}" -gt 0 ]]; then
            read_lines mapped grep -h -F -- "$point/" "${maps[@]}" || mapped=()
            for line in "${mapped[@]}"; do
                line="/${line#*/}"
                in_use["${line% (deleted)}"]=1
            done
        fi
        load_fds
        for file in "$point"/pollux*; do
            [[ -f "$file" ]] || continue
            name="${file##*/}"
            if ! [[ "$name" =~ pid([0-9]+) ]]; then
                log "cleanup: $file: no owner pid in its name, left alone"
                kept=$((kept + 1))
                continue
            fi
            pid="${BASH_REMATCH[1]}"
            if [[ -d "$PROC_ROOT/$pid" ]]; then
                log "cleanup: $file: process $pid is alive, left alone"
                kept=$((kept + 1))
            elif [[ -n "${in_use[$file]:-}" || -n "${FD_PIDS[$file]:-}" ]]; then
                log "cleanup: $file: still open or mapped by a process, left alone"
                kept=$((kept + 1))
            elif rm -f -- "$file"; then
                log "cleanup: removed $file (process $pid is gone)"
                removed=$((removed + 1))
            else
                err "cleanup: cannot remove $file"
                failed=1
            fi
        done
    done
    log "cleanup: removed $removed stale hugepage file(s), left $kept"
    return "$failed"
}

main() {
    local command="${1:-config}"
    [[ $# -le 1 ]] || { usage >&2; exit 2; }
    case "$command" in
        config) cmd_config ;;
        reset) cmd_reset ;;
        status) cmd_status ;;
        cleanup) cmd_cleanup ;;
        -h | --help | help) usage ;;
        *)
            err "unknown command '$command'"
            usage >&2
            exit 2
            ;;
    esac
}

main "$@"
