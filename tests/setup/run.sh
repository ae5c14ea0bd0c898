#!/usr/bin/env bash
# Fast tests for scripts/setup.sh: no root, no devices. Each test builds a fake sysfs / procfs /
# dev tree in a temporary directory, runs setup.sh on it (SYSFS_ROOT, PROC_ROOT, DEV_ROOT and
# POLLUX_SETUP_TEST=1), and checks what it decided, printed and wrote. The fake kernel
# (fake-kernel.sh) plays the kernel's part of the writes: unbind, drivers_probe, driver_override.
#
#   bash tests/setup/run.sh            all tests
#   bash tests/setup/run.sh NAME...    the named tests (see the test_* functions)
#
# Prints `N passed, N failed` last; exits non-zero when a test failed.
set -euo pipefail
shopt -s nullglob

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
SETUP="$REPO/scripts/setup.sh"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pollux-setup-test.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------------------------------------
# Fake trees. T: the test's directory; S, P, D: its sysfs, procfs and /dev.

new_tree() {
    T="$(mktemp -d "$WORK/t.XXXXXX")"
    S="$T/sys" P="$T/proc" D="$T/dev"
    mkdir -p "$S/devices/pci0000:00" "$S/bus/pci/devices" "$S/bus/pci/drivers/nvme" \
        "$S/bus/pci/drivers/vfio-pci" "$S/class/block" "$S/class/nvme" "$S/kernel/iommu_groups" \
        "$P/self" "$D"
    : > "$S/bus/pci/drivers_probe"
    : > "$P/mounts"
    : > "$P/self/mountinfo"
    printf 'Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n' > "$P/swaps"
    printf 'processor\t: 0\nvendor_id\t: GenuineIntel\n' > "$P/cpuinfo"
    local node
    for node in 0 1; do
        mkdir -p "$S/devices/system/node/node$node/hugepages/hugepages-2048kB"
        echo 0 > "$S/devices/system/node/node$node/hugepages/hugepages-2048kB/nr_hugepages"
        echo 0 > "$S/devices/system/node/node$node/hugepages/hugepages-2048kB/free_hugepages"
    done
    # A hugetlbfs is mounted unless a test says otherwise.
    echo "hugetlbfs $D/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0" >> "$P/mounts"
    mkdir -p "$D/hugepages"
}

# add_ctrl BDF N [DRIVER]: NVMe controller nvmeN at BDF, bound to DRIVER (default nvme; "-" none),
# alone in IOMMU group N.
add_ctrl() {
    local bdf="$1" n="$2" driver="${3:-nvme}"
    local pdev="$S/devices/pci0000:00/$bdf"
    mkdir -p "$pdev/nvme/nvme$n" "$S/kernel/iommu_groups/$n/devices"
    # Off nvme, the controller has no nvmeN (its directory waits where the fake kernel's
    # reprobe finds it).
    echo 0x010802 > "$pdev/class"
    echo 0x1b36 > "$pdev/vendor"
    echo 0x0010 > "$pdev/device"
    echo "$((n % 2))" > "$pdev/numa_node"
    echo "(null)" > "$pdev/driver_override"
    [[ "$driver" == - ]] || ln -s "$S/bus/pci/drivers/$driver" "$pdev/driver"
    ln -s "$pdev" "$S/bus/pci/devices/$bdf"
    ln -s "$S/kernel/iommu_groups/$n" "$pdev/iommu_group"
    ln -s "$pdev" "$S/kernel/iommu_groups/$n/devices/$bdf"
    echo "240:$n" > "$pdev/nvme/nvme$n/dev"
    ln -s "$pdev" "$pdev/nvme/nvme$n/device"
    ln -s "$pdev/nvme/nvme$n" "$S/class/nvme/nvme$n"
    [[ "$driver" == nvme ]] || mv "$pdev/nvme" "$pdev/.nvme-unbound"
}

# add_other BDF CLASS: a PCI device that is no NVMe controller.
add_other() {
    local pdev="$S/devices/pci0000:00/$1"
    mkdir -p "$pdev"
    echo "$2" > "$pdev/class"
    echo "(null)" > "$pdev/driver_override"
    ln -s "$pdev" "$S/bus/pci/devices/$1"
}

# add_ns BDF N NS: namespace block device nvmeNnNS of controller nvmeN (major:minor 259:N*10+NS).
add_ns() {
    local bdf="$1" n="$2" ns="$3"
    local disk="$S/devices/pci0000:00/$bdf/nvme/nvme$n/nvme${n}n$ns"
    mkdir -p "$disk/holders"
    echo "259:$((n * 10 + ns))" > "$disk/dev"
    ln -s "$S/devices/pci0000:00/$bdf/nvme/nvme$n" "$disk/device"
    ln -s "$disk" "$S/class/block/nvme${n}n$ns"
}

# add_part BDF N NS P: partition nvmeNnNSpP (major:minor 259:100+N*10+P).
add_part() {
    local bdf="$1" n="$2" ns="$3" p="$4"
    local part="$S/devices/pci0000:00/$bdf/nvme/nvme$n/nvme${n}n$ns/nvme${n}n${ns}p$p"
    mkdir -p "$part/holders"
    echo "$p" > "$part/partition"
    echo "259:$((100 + n * 10 + p))" > "$part/dev"
    ln -s "$part" "$S/class/block/nvme${n}n${ns}p$p"
}

# add_dm NAME UUID HOLDER_DIR: device-mapper device dm-0 holding the disk or partition.
add_dm() {
    mkdir -p "$S/devices/virtual/block/dm-0/dm"
    echo "$1" > "$S/devices/virtual/block/dm-0/dm/name"
    echo "$2" > "$S/devices/virtual/block/dm-0/dm/uuid"
    ln -s "$S/devices/virtual/block/dm-0" "$S/class/block/dm-0"
    ln -s "$S/devices/virtual/block/dm-0" "$3/holders/dm-0"
}

# add_proc PID COMM: a process (for fds and maps to hang off).
add_proc() {
    mkdir -p "$P/$1/fd"
    echo "$2" > "$P/$1/comm"
    : > "$P/$1/maps"
}

disk_dir() { readlink -f "$S/class/block/$1"; }

# The usual machine: 0000:00:04.0 holds the root file system (nvme0n1p1 on /), 0000:00:05.0
# (nvme1n1) is free.
two_ctrls() {
    new_tree
    add_ctrl 0000:00:04.0 0
    add_ns 0000:00:04.0 0 1
    add_part 0000:00:04.0 0 1 1
    add_ctrl 0000:00:05.0 1
    add_ns 0000:00:05.0 1 1
    echo "/dev/nvme0n1p1 / ext4 rw,relatime 0 0" >> "$P/mounts"
    add_other 0000:00:02.0 0x020000
}

# run_setup ARGS...: runs setup.sh on the fake tree; sets OUT (stdout and stderr) and RC.
# HUGEMEM defaults to 0 here so that device tests see only device writes.
run_setup() {
    : > "$T/log"
    RC=0
    OUT="$(env SYSFS_ROOT="$S" PROC_ROOT="$P" DEV_ROOT="$D" POLLUX_SETUP_TEST=1 \
        POLLUX_SETUP_TEST_LOG="$T/log" POLLUX_SETUP_TEST_KERNEL="$HERE/fake-kernel.sh" \
        POLLUX_STATE_DIR="$T/state" POLLUX_SETUP_BIND_TIMEOUT=0 HUGEMEM="${HUGEMEM:-0}" \
        bash "$SETUP" "$@" 2>&1)" || RC=$?
    LOG="$(cat "$T/log")"
}

# ---------------------------------------------------------------------------------------------
# Assertions: each prints what went wrong and fails the test (tests run in a subshell).

fail() {
    printf '    %s\n' "$@" >&2
    printf '    --- output (rc %s) ---\n%s\n    --- writes and commands ---\n%s\n' \
        "${RC:-?}" "${OUT:-}" "${LOG:-}" | sed 's/^/    | /' >&2
    exit 1
}
expect_rc() { [[ "$RC" == "$1" ]] || fail "expected exit status $1, got $RC"; }
expect_out() { [[ "$OUT" == *"$1"* ]] || fail "output lacks: $1"; }
expect_no_out() { [[ "$OUT" != *"$1"* ]] || fail "output should not contain: $1"; }
expect_log() { [[ "$LOG" == *"$1"* ]] || fail "no write or command: $1"; }
expect_no_log() { [[ "$LOG" != *"$1"* ]] || fail "unexpected write or command: $1"; }
expect_file() {
    local got
    got="$(cat "$1" 2> /dev/null || echo '<missing>')"
    [[ "$got" == "$2" ]] || fail "${1#"$T"/}: expected '$2', got '$got'"
}
expect_driver() {
    local got
    got="$(readlink "$S/bus/pci/devices/$1/driver" 2> /dev/null || true)"
    [[ "${got##*/}" == "$2" ]] || fail "$1: expected driver '$2', got '${got##*/}'"
}

# Asserts that controller $1 was skipped with a reason containing $2 and not touched at all.
expect_skipped() {
    expect_out "$1"
    local line
    line="$(grep -F "$1" <<< "$OUT" | head -n 1)"
    [[ "$line" == *"skipped"*"$2"* ]] || fail "$1 not skipped with reason '$2': $line"
    expect_no_log "$1"
    expect_no_log "devices/$1/"
    expect_driver "$1" nvme
    expect_file "$S/bus/pci/devices/$1/driver_override" "(null)"
}

# Asserts that controller $1 went from nvme to vfio-pci through driver_override.
expect_bound() {
    expect_log "write /sys/bus/pci/devices/$1/driver_override vfio-pci"
    expect_log "write /sys/bus/pci/devices/$1/driver/unbind $1"
    expect_log "write /sys/bus/pci/drivers_probe $1"
    expect_no_log "new_id"
    expect_driver "$1" vfio-pci
    expect_out "$1 (1b36:0010"
    [[ "$(grep -F "$1" <<< "$OUT")" == *"bound to vfio-pci (was nvme)"* ]] || fail "$1 not reported bound"
}

# ---------------------------------------------------------------------------------------------
# Tests.

test_binds_free_and_skips_mounted_partition() {
    two_ctrls
    run_setup config
    expect_rc 0
    expect_bound 0000:00:05.0
    expect_skipped 0000:00:04.0 "nvme0n1p1 mounted on /"
    expect_no_log 0000:00:02.0
}

test_default_command_is_config() {
    two_ctrls
    run_setup
    expect_rc 0
    expect_bound 0000:00:05.0
}

test_mounted_whole_disk() {
    two_ctrls
    echo "/dev/nvme1n1 /data xfs rw 0 0" >> "$P/mounts"
    run_setup config
    expect_rc 0
    expect_skipped 0000:00:05.0 "nvme1n1 mounted on /data"
}

test_mounted_by_devno_as_dev_root() {
    # The root file system often shows as /dev/root in /proc/mounts; mountinfo has major:minor.
    new_tree
    add_ctrl 0000:00:05.0 1
    add_ns 0000:00:05.0 1 1
    add_part 0000:00:05.0 1 1 2
    echo "/dev/root / ext4 rw 0 0" >> "$P/mounts"
    echo "22 1 259:112 / / rw,relatime shared:1 - ext4 /dev/root rw" > "$P/self/mountinfo"
    run_setup config
    expect_rc 0
    expect_skipped 0000:00:05.0 "nvme1n1p2 mounted on /"
}

test_mounted_through_by_uuid_link() {
    new_tree
    add_ctrl 0000:00:05.0 1
    add_ns 0000:00:05.0 1 1
    mkdir -p "$D/disk/by-uuid"
    : > "$D/nvme1n1"
    ln -s ../../nvme1n1 "$D/disk/by-uuid/1234-abcd"
    echo "/dev/disk/by-uuid/1234-abcd /srv ext4 rw 0 0" >> "$P/mounts"
    run_setup config
    expect_rc 0
    expect_skipped 0000:00:05.0 "nvme1n1 mounted on /srv"
}

test_swap_partition() {
    two_ctrls
    add_part 0000:00:05.0 1 1 3
    printf '/dev/nvme1n1p3                          partition\t8388604\t\t0\t\t-2\n' >> "$P/swaps"
    run_setup config
    expect_rc 0
    expect_skipped 0000:00:05.0 "nvme1n1p3 is active swap"
}

test_lvm_member() {
    two_ctrls
    add_dm vg0-data LVM-Abc123 "$(disk_dir nvme1n1)"
    run_setup config
    expect_rc 0
    expect_skipped 0000:00:05.0 "nvme1n1: LVM physical volume (logical volume vg0-data, dm-0)"
}

test_lvm_on_partition() {
    two_ctrls
    add_part 0000:00:05.0 1 1 1
    add_dm vg1-root LVM-Xyz "$(disk_dir nvme1n1)/nvme1n1p1"
    run_setup config
    expect_rc 0
    expect_skipped 0000:00:05.0 "nvme1n1p1: LVM physical volume"
}

test_dm_crypt_member() {
    two_ctrls
    add_dm secret CRYPT-LUKS2-0011 "$(disk_dir nvme1n1)"
    run_setup config
    expect_rc 0
    expect_skipped 0000:00:05.0 "dm-crypt device secret (dm-0)"
}

test_md_raid_member() {
    two_ctrls
    mkdir -p "$(disk_dir nvme1n1)/holders/md127"
    run_setup config
    expect_rc 0
    expect_skipped 0000:00:05.0 "nvme1n1: MD RAID member (md127)"
}

test_btrfs_member() {
    two_ctrls
    mkdir -p "$S/fs/btrfs/5d3c-uuid/devices"
    ln -s "$(disk_dir nvme1n1)" "$S/fs/btrfs/5d3c-uuid/devices/nvme1n1"
    run_setup config
    expect_rc 0
    expect_skipped 0000:00:05.0 "member of btrfs file system 5d3c-uuid"
}

test_held_open_by_process() {
    two_ctrls
    add_proc 4242 fio
    add_proc 17 bash
    ln -s /dev/null "$P/17/fd/0"
    ln -s /dev/nvme1n1 "$P/4242/fd/5"
    ln -s /dev/nvme1n1 "$P/4242/fd/6"
    run_setup config
    expect_rc 0
    expect_skipped 0000:00:05.0 "/dev/nvme1n1 held open by 4242 (fio)"
    [[ "$OUT" != *"4242 (fio), 4242"* ]] || fail "process listed twice"
    [[ "$OUT" != *"17 (bash)"* ]] || fail "a process without the device open was blamed"
}

test_controller_char_device_held_open() {
    # One process only: ls prints no "DIR:" header then, which the parser must handle.
    two_ctrls
    add_proc 900 smartd
    ln -s "$D/nvme1" "$P/900/fd/3"
    run_setup config
    expect_rc 0
    expect_skipped 0000:00:05.0 "/dev/nvme1 held open by 900 (smartd)"
}

test_multipath_namespace_head() {
    # Native multipath: the block device hangs off the subsystem, which lists the controller.
    new_tree
    add_ctrl 0000:00:05.0 1
    local subsys="$S/devices/virtual/nvme-subsystem/nvme-subsys3"
    mkdir -p "$subsys/nvme3n1/holders"
    echo "259:5" > "$subsys/nvme3n1/dev"
    ln -s "$subsys" "$subsys/nvme3n1/device"
    ln -s "$S/devices/pci0000:00/0000:00:05.0/nvme/nvme1" "$subsys/nvme1"
    ln -s "$subsys/nvme3n1" "$S/class/block/nvme3n1"
    echo "/dev/nvme3n1 /var ext4 rw 0 0" >> "$P/mounts"
    run_setup config
    expect_rc 0
    expect_skipped 0000:00:05.0 "nvme3n1 mounted on /var"
    expect_out "0000:00:05.0 (1b36:0010, nvme3n1)"
}

test_pci_blocked() {
    two_ctrls
    add_ctrl 0000:00:06.0 2
    add_ns 0000:00:06.0 2 1
    PCI_BLOCKED="0000:00:05.0" run_setup config
    expect_rc 0
    expect_skipped 0000:00:05.0 "listed in PCI_BLOCKED"
    expect_bound 0000:00:06.0
}

test_pci_allowed_short_form() {
    two_ctrls
    add_ctrl 0000:00:06.0 2
    add_ns 0000:00:06.0 2 1
    PCI_ALLOWED="00:06.0" run_setup config
    expect_rc 0
    expect_skipped 0000:00:05.0 "not listed in PCI_ALLOWED"
    expect_bound 0000:00:06.0
}

test_pci_allowed_cannot_force_a_disk_in_use() {
    two_ctrls
    PCI_ALLOWED="0000:00:04.0" run_setup config
    expect_rc 0
    expect_skipped 0000:00:04.0 "mounted on /"
}

test_already_bound_left_alone() {
    new_tree
    add_ctrl 0000:00:05.0 1 vfio-pci
    echo vfio-pci > "$S/bus/pci/devices/0000:00:05.0/driver_override"
    run_setup config
    expect_rc 0
    expect_out "0000:00:05.0 (1b36:0010, no block devices): already bound to vfio-pci, left alone"
    [[ -z "$LOG" ]] || fail "writes for a device already on vfio-pci"
}

test_config_twice_changes_nothing() {
    two_ctrls
    HUGEMEM=1024 run_setup config
    expect_rc 0
    expect_bound 0000:00:05.0
    local first_state
    first_state="$(cat "$T/state/setup.state")"
    HUGEMEM=1024 run_setup config
    expect_rc 0
    [[ -z "$LOG" ]] || fail "second config wrote or ran something"
    expect_out "already bound to vfio-pci, left alone"
    expect_out "hugepages: node0 has 256 x 2048 kB already"
    expect_file "$T/state/setup.state" "$first_state"
}

test_other_driver_left_alone() {
    new_tree
    mkdir -p "$S/bus/pci/drivers/uio_pci_generic"
    add_ctrl 0000:00:05.0 1 uio_pci_generic
    run_setup config
    expect_rc 0
    expect_out "skipped, bound to uio_pci_generic"
    [[ -z "$LOG" ]] || fail "touched a device on another driver"
}

test_unbound_controller_is_bound() {
    new_tree
    add_ctrl 0000:00:05.0 1 -
    run_setup config
    expect_rc 0
    expect_log "write /sys/bus/pci/devices/0000:00:05.0/driver_override vfio-pci"
    expect_no_log "unbind"
    expect_driver 0000:00:05.0 vfio-pci
    expect_out "bound to vfio-pci (was unbound)"
}

test_loads_vfio_pci_when_missing() {
    two_ctrls
    rmdir "$S/bus/pci/drivers/vfio-pci"
    run_setup config
    # The fake modprobe loads nothing, so the bind fails: an error naming the device.
    expect_rc 1
    expect_log "run modprobe vfio-pci"
    expect_log "run modprobe vfio_iommu_type1"
    expect_out "0000:00:05.0 did not bind to vfio-pci"
    expect_skipped 0000:00:04.0 "mounted on /"
}

test_bind_failure_names_device_and_restores() {
    two_ctrls
    FAKE_KERNEL_REFUSE="0000:00:05.0" run_setup config
    expect_rc 1
    expect_out "error: 0000:00:05.0 did not bind to vfio-pci"
    expect_out "0000:00:05.0 (1b36:0010, nvme1n1): binding to vfio-pci failed"
    expect_file "$S/bus/pci/devices/0000:00:05.0/driver_override" "(null)"
}

test_no_iommu_refuses() {
    two_ctrls
    rm -rf "$S/kernel/iommu_groups"
    mkdir -p "$S/kernel/iommu_groups"
    run_setup config
    expect_rc 1
    expect_out "no IOMMU is enabled"
    expect_out "intel_iommu=on"
    expect_out "POLLUX_UNSAFE_NOIOMMU=1"
    expect_no_log "driver_override"
    expect_driver 0000:00:05.0 nvme
}

test_no_iommu_amd_hint() {
    two_ctrls
    rm -rf "$S/kernel/iommu_groups"
    printf 'vendor_id\t: AuthenticAMD\n' > "$P/cpuinfo"
    run_setup config
    expect_rc 1
    expect_out "amd_iommu=on"
    expect_no_out "intel_iommu=on"
}

test_no_iommu_opt_in() {
    two_ctrls
    rm -rf "$S/kernel/iommu_groups"
    mkdir -p "$S/module/vfio/parameters"
    echo N > "$S/module/vfio/parameters/enable_unsafe_noiommu_mode"
    POLLUX_UNSAFE_NOIOMMU=1 run_setup config
    expect_rc 0
    expect_out "unsafe no-IOMMU mode"
    expect_file "$S/module/vfio/parameters/enable_unsafe_noiommu_mode" 1
    expect_bound 0000:00:05.0
}

test_hugepages_spread_over_nodes() {
    two_ctrls
    local h0="$S/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages"
    local h1="$S/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages"
    HUGEMEM=2048 run_setup config
    expect_rc 0
    expect_file "$h0" 512
    expect_file "$h1" 512
    expect_out "hugepages: node0 0 -> 512 x 2048 kB"
    expect_no_log "run mount"
}

test_hugenode_and_existing_pages() {
    two_ctrls
    local h0="$S/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages"
    local h1="$S/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages"
    echo 2000 > "$h1"
    HUGEMEM=4096 HUGENODE=0 run_setup config
    expect_rc 0
    expect_file "$h0" 2048
    expect_file "$h1" 2000
    HUGEMEM=2048 HUGENODE=1 run_setup config
    expect_rc 0
    expect_file "$h1" 2000
    expect_out "node1 has 2000 x 2048 kB already (wanted 1024), left alone"
    HUGENODE=7 HUGEMEM=2 run_setup config
    expect_rc 1
    expect_out "HUGENODE: there is no NUMA node 7"
}

test_hugepages_shortfall_fails() {
    two_ctrls
    FAKE_HUGEPAGES_MAX=100 HUGEMEM=2048 run_setup config
    expect_rc 1
    expect_out "hugepages: node0 got only 100 of 512"
    expect_bound 0000:00:05.0
}

test_hugetlbfs_mounted_when_missing() {
    two_ctrls
    sed -i '/hugetlbfs/d' "$P/mounts"
    HUGEMEM=2 run_setup config
    expect_rc 0
    expect_log "run mount -t hugetlbfs -o pagesize=2048K nodev $D/hugepages"
    grep -q "^mount $D/hugepages" "$T/state/setup.state" || fail "mount not recorded for reset"
    run_setup reset
    expect_rc 0
    expect_log "run umount $D/hugepages"
}

test_reset_gives_back_and_releases_hugepages() {
    two_ctrls
    local h0="$S/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages"
    echo 10 > "$h0"
    HUGEMEM=2048 run_setup config
    expect_rc 0
    expect_driver 0000:00:05.0 vfio-pci
    expect_file "$h0" 512
    run_setup reset
    expect_rc 0
    expect_log "write /sys/bus/pci/devices/0000:00:05.0/driver_override "
    expect_log "write /sys/bus/pci/devices/0000:00:05.0/driver/unbind 0000:00:05.0"
    expect_log "write /sys/bus/pci/drivers_probe 0000:00:05.0"
    expect_driver 0000:00:05.0 nvme
    expect_file "$S/bus/pci/devices/0000:00:05.0/driver_override" "(null)"
    expect_out "0000:00:05.0 (1b36:0010, no block devices): given back to nvme (was vfio-pci)"
    expect_out "0000:00:04.0 (1b36:0010, nvme0n1): on nvme already, left alone"
    expect_file "$h0" 10
    [[ ! -e "$T/state/setup.state" ]] || fail "state file left after reset"
    run_setup reset
    expect_rc 0
    [[ -z "$LOG" ]] || fail "second reset wrote something"
    expect_out "hugepages: none reserved by setup.sh"
}

test_reset_refuses_device_in_use_by_vfio_user() {
    new_tree
    add_ctrl 0000:00:05.0 1 vfio-pci
    echo vfio-pci > "$S/bus/pci/devices/0000:00:05.0/driver_override"
    add_proc 3131 pollux
    ln -s /dev/vfio/1 "$P/3131/fd/9"
    run_setup reset
    expect_rc 1
    expect_out "0000:00:05.0 (1b36:0010, no block devices): not reset, its VFIO group is open by 3131 (pollux)"
    expect_driver 0000:00:05.0 vfio-pci
    [[ -z "$LOG" ]] || fail "reset wrote to a device in use"
}

test_reset_respects_pci_blocked() {
    new_tree
    add_ctrl 0000:00:05.0 1 vfio-pci
    PCI_BLOCKED=0000:00:05.0 run_setup reset
    expect_rc 0
    expect_out "skipped, listed in PCI_BLOCKED"
    expect_driver 0000:00:05.0 vfio-pci
}

test_status_table() {
    two_ctrls
    add_ctrl 0000:00:06.0 2 vfio-pci
    echo 64 > "$S/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages"
    echo 60 > "$S/devices/system/node/node1/hugepages/hugepages-2048kB/free_hugepages"
    run_setup status
    expect_rc 0
    [[ -z "$LOG" ]] || fail "status wrote something"
    local row
    row="$(grep '^0000:00:04.0' <<< "$OUT")"
    [[ "$row" =~ ^0000:00:04.0\ +1b36:0010\ +0\ +nvme\ +nvme0n1\ nvme0n1p1\ +yes:\ nvme0n1p1\ mounted\ on\ /$ ]] ||
        fail "bad row for 0000:00:04.0: $row"
    row="$(grep '^0000:00:05.0' <<< "$OUT")"
    [[ "$row" =~ ^0000:00:05.0\ +1b36:0010\ +1\ +nvme\ +nvme1n1\ +no$ ]] || fail "bad row for 0000:00:05.0: $row"
    row="$(grep '^0000:00:06.0' <<< "$OUT")"
    [[ "$row" =~ ^0000:00:06.0\ +1b36:0010\ +0\ +vfio-pci\ +-\ +no$ ]] || fail "bad row for 0000:00:06.0: $row"
    row="$(grep '^node1' <<< "$OUT")"
    [[ "$row" =~ ^node1\ +2048kB\ +64\ +60$ ]] || fail "bad hugepage row: $row"
    expect_out "hugetlbfs: $D/hugepages"
    expect_no_out "0000:00:02.0"
}

test_cleanup_removes_only_stale_files() {
    new_tree
    local huge="$D/hugepages"
    add_proc 100 pollux-app
    add_proc 200 other
    : > "$huge/pollux_pid999_map0"
    : > "$huge/pollux_pid100_map0"
    : > "$huge/pollux_pid998_map1"
    : > "$huge/pollux_noowner"
    : > "$huge/spdk_pid997map_0"
    echo "7f0000000000-7f0000200000 rw-s 00000000 00:2e 1234    $huge/pollux_pid998_map1" > "$P/200/maps"
    run_setup cleanup
    expect_rc 0
    [[ ! -e "$huge/pollux_pid999_map0" ]] || fail "stale file of dead process 999 kept"
    [[ -e "$huge/pollux_pid100_map0" ]] || fail "file of live process 100 removed"
    [[ -e "$huge/pollux_pid998_map1" ]] || fail "file mapped by process 200 removed"
    [[ -e "$huge/pollux_noowner" ]] || fail "file without owner pid removed"
    [[ -e "$huge/spdk_pid997map_0" ]] || fail "another program's file removed"
    expect_out "removed 1 stale hugepage file(s), left 3"
}

test_help() {
    new_tree
    run_setup --help
    expect_rc 0
    local word
    for word in config reset status cleanup PCI_ALLOWED PCI_BLOCKED HUGEMEM HUGENODE \
        POLLUX_UNSAFE_NOIOMMU Examples:; do
        expect_out "$word"
    done
    run_setup frobnicate
    expect_rc 2
    expect_out "unknown command 'frobnicate'"
}

# Runs $@ as an unprivileged user when we are root (setpriv), as is otherwise.
as_user() {
    if [[ "$EUID" -eq 0 ]]; then
        setpriv --reuid=65534 --regid=65534 --clear-groups "$@"
    else
        "$@"
    fi
}

test_not_root_is_refused() {
    two_ctrls
    chmod -R a+rX "$T" "$WORK"
    # Without the test flag, and with the test flag but the real /sys: both need root.
    RC=0
    OUT="$(as_user env SYSFS_ROOT="$S" PROC_ROOT="$P" DEV_ROOT="$D" bash "$SETUP" config 2>&1)" || RC=$?
    LOG=""
    expect_rc 1
    expect_out "needs root: run 'sudo"
    RC=0
    OUT="$(as_user env POLLUX_SETUP_TEST=1 POLLUX_STATE_DIR="$T/state" bash "$SETUP" reset 2>&1)" || RC=$?
    expect_rc 1
    expect_out "needs root"
    expect_driver 0000:00:05.0 nvme
}

# ---------------------------------------------------------------------------------------------

main() {
    local tests=("$@") name passed=0 failed=0 failures=()
    if [[ "${#tests[@]}" -eq 0 ]]; then
        mapfile -t tests < <(declare -F | awk '$3 ~ /^test_/ {print $3}')
    fi
    for name in "${tests[@]}"; do
        [[ "$name" == test_* ]] || name="test_$name"
        if ("$name"); then
            printf 'ok   %s\n' "${name#test_}"
            passed=$((passed + 1))
        else
            printf 'FAIL %s\n' "${name#test_}"
            failed=$((failed + 1))
            failures+=("${name#test_}")
        fi
    done
    [[ "$failed" -eq 0 ]] || printf 'failed: %s\n' "${failures[*]}"
    printf '%d passed, %d failed\n' "$passed" "$failed"
    [[ "$failed" -eq 0 ]]
}

main "$@"
