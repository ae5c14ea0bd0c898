#!/usr/bin/env bash
# Runs Pollux test suites inside QEMU guests (TCG, no KVM or host VFIO needed).
#
#   scripts/vm-test.sh <suite>...   run the named suites (see --list)
#   scripts/vm-test.sh all          run every test suite (benchmark suites are left out)
#   scripts/vm-test.sh --list       list the test suites (benchmark suites are left out)
#
# A suite is two files:
#   scripts/vm/<suite>.sh    the guest script, run by the initramfs /init as
#                            `sh /pollux/<suite>.sh <variant>` (helpers: scripts/vm/lib.sh);
#   scripts/vm/<suite>.conf  sourced here (bash): SUITE_PACKAGES (cargo packages to build in
#                            release mode), SUITE_BINS (their binaries to put in the guest),
#                            SUITE_MODULES (kernel modules, with dependencies, for the guest),
#                            SUITE_VARIANTS (one boot each), and suite_qemu_args VARIANT, which
#                            prints the suite's extra QEMU arguments one per line. The .conf may
#                            use $REPO, $CACHE, $TARGET_DIR and `vm_disk NAME MiB` (a cached raw
#                            disk image). Optionally suite_host_check VARIANT: run on the host
#                            after the guest passed and QEMU exited (e.g. to check disk images);
#                            a non-zero status fails the variant.
#                            Optionally suite_host_start VARIANT / suite_host_stop VARIANT: run
#                            on the host before QEMU boots (e.g. to start a daemon the guest's
#                            devices connect to) and after QEMU exited, whatever the outcome;
#                            a non-zero status from suite_host_start fails the variant.
#                            Optionally SUITE_HOST_BINS: host executables (absolute paths, e.g.
#                            /usr/bin/fio) to put in the guest's /bin with their shared libraries.
#                            Optionally SUITE_SMP: the guest's vCPU count (default 1).
#                            Optionally SUITE_MEM: the guest's RAM, as QEMU's -m (default 1G); a
#                            suite with its own memory backend sizes it the same.
#                            Optionally SUITE_CMDLINE: extra guest kernel parameters.
#                            Optionally SUITE_KERNEL_PACKAGE: the suite's own guest kernel, an
#                            extended regular expression for `apt-cache search --names-only`
#                            (anchor it, e.g. '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$'),
#                            resolved at run time to the installable match with the newest
#                            candidate version, downloaded and unpacked like the default kernel
#                            (the package linux-image-amd64 depends on, Debian 12: 6.1), which
#                            every other suite boots. SUITE_MODULES come from the suite's kernel;
#                            compressed modules (.ko.xz, .ko.zst, .ko.gz) are decompressed into
#                            the initramfs, since busybox's modprobe may not read them.
#                            Optionally SUITE_HOST_PACKAGES: Debian packages the suite needs on
#                            the host (e.g. fio for SUITE_HOST_BINS), installed when missing.
#                            Optionally SUITE_BENCHMARK=1: the suite measures rather than tests;
#                            `all` and `--list` leave it out (with a note on stderr), since CI
#                            time is limited: run it by name.
# Each variant's console goes to $CACHE/logs/<suite>-<variant>.log, its QEMU command line (shell
# words) to that path plus `.cmd` before suite_host_start runs (a suite that starts a second QEMU
# of the same machine, e.g. a migration destination, starts from it), and the hooks' output to
# `.host`. suite_host_stop may append to the log (what a second QEMU printed) before it is read.
# Each variant boots once; it passes when the guest prints `POLLUX-SUITE-RESULT: PASS`, exits
# in time, and its kernel log shows no IOMMU DMA fault (`DMAR: [DMA`).
#
# Environment:
#   POLLUX_VM_CACHE    cache for the guest kernel, initramfs, disks and logs
#                      (default: <repo>/.cache/vm; git-ignored)
#   POLLUX_VM_TIMEOUT  seconds one guest may run before it is killed (default 300)
#   POLLUX_VM_VERBOSE  1: stream the guest console while it runs
#   CARGO_TARGET_DIR   as for cargo (default <repo>/target)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VM_DIR="$REPO/scripts/vm"
CACHE="${POLLUX_VM_CACHE:-$REPO/.cache/vm}"
TIMEOUT_S="${POLLUX_VM_TIMEOUT:-300}"
VERBOSE="${POLLUX_VM_VERBOSE:-0}"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
PASS_MARKER="POLLUX-SUITE-RESULT: PASS"
DMA_FAULT_PATTERN='DMAR: \[DMA'

log() { printf 'vm-test: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

list_suites() {
    local conf
    for conf in "$VM_DIR"/*.conf; do
        [[ -e "$conf" ]] || continue
        basename "$conf" .conf
    done
}

# Succeeds when suite $1's .conf sets SUITE_BENCHMARK=1 (sourced in a subshell).
is_benchmark_suite() {
    (
        SUITE_BENCHMARK=0
        # shellcheck source=/dev/null
        source "$VM_DIR/$1.conf"
        [[ "$SUITE_BENCHMARK" == 1 ]]
    )
}

# Prints the test suites (benchmark suites left out, each with a note on stderr).
list_test_suites() {
    local suite
    while read -r suite; do
        if is_benchmark_suite "$suite"; then
            log "$suite: benchmark suite (SUITE_BENCHMARK=1), left out; run it by name"
        else
            printf '%s\n' "$suite"
        fi
    done < <(list_suites)
}

as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

APT_UPDATED=0
apt_update_once() {
    if [[ "$APT_UPDATED" -eq 0 ]]; then
        log "apt-get update"
        as_root apt-get update -qq
        APT_UPDATED=1
    fi
}

# Installs the host tools when one is missing. qemu-utils is pinned to qemu-system-x86's
# version: some images carry a newer backported qemu-utils that conflicts with it.
ensure_host_tools() {
    local missing=0 tool
    for tool in qemu-system-x86_64 qemu-img cpio depmod modprobe timeout xz; do
        command -v "$tool" >/dev/null || missing=1
    done
    [[ -x /bin/busybox ]] && dpkg -s busybox-static >/dev/null 2>&1 || missing=1
    [[ "$missing" -eq 0 ]] && return 0
    apt_update_once
    local qemu_version
    qemu_version="$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')"
    [[ -n "$qemu_version" && "$qemu_version" != "(none)" ]] || die "no qemu-system-x86 package available"
    log "installing qemu-system-x86 qemu-utils=$qemu_version busybox-static cpio kmod xz-utils"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        --allow-downgrades qemu-system-x86 "qemu-utils=$qemu_version" busybox-static cpio kmod \
        xz-utils
}

# Installs the Debian packages named in the arguments that are not installed yet.
ensure_host_packages() {
    local -a missing=()
    local package
    for package in "$@"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    [[ "${#missing[@]}" -gt 0 ]] || return 0
    apt_update_once
    log "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# Prints the package linux-image-amd64 depends on (Debian's current amd64 kernel).
default_kernel_package() {
    local package
    package="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')"
    if [[ -z "$package" ]]; then
        apt_update_once
        package="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')"
    fi
    [[ -n "$package" ]] || { log "error: cannot find the package linux-image-amd64 depends on"; return 1; }
    printf '%s\n' "$package"
}

# Prints the package matching the extended regular expression $1 (apt-cache search
# --names-only) that has an installation candidate, the newest candidate version first.
resolve_kernel_package() {
    local pattern="$1" try package
    for try in 1 2; do
        local -a names=()
        mapfile -t names < <(apt-cache search --names-only "$pattern" 2>/dev/null | awk '{print $1}')
        if [[ "${#names[@]}" -gt 0 ]]; then
            package="$(apt-cache policy "${names[@]}" 2>/dev/null | awk '
                /^[^ ]/ { name = $1; sub(/:$/, "", name) }
                /^ *Candidate:/ && $2 != "(none)" { print $2, name }' |
                sort -V | tail -n 1 | awk '{print $2}')"
            if [[ -n "$package" ]]; then
                printf '%s\n' "$package"
                return 0
            fi
        fi
        [[ "$try" -eq 1 && "$APT_UPDATED" -eq 0 ]] || break
        apt_update_once
    done
    log "error: no installable package matches SUITE_KERNEL_PACKAGE '$pattern'"
    return 1
}

# Sets KERNEL_ROOT, KERNEL_VERSION and KERNEL_IMAGE: kernel package $1 (default: Debian's
# current amd64 kernel), unpacked once into the cache (with depmod run on it).
ensure_kernel() {
    local package="${1:-}"
    if [[ -z "$package" ]]; then
        package="$(default_kernel_package)" || return 1
    fi
    KERNEL_ROOT="$CACHE/kernel/$package"
    if [[ ! -e "$KERNEL_ROOT/.ready" ]]; then
        log "downloading and unpacking $package"
        local debs="$CACHE/debs"
        mkdir -p "$debs"
        rm -rf "$KERNEL_ROOT"
        # apt-get download warns when the _apt user cannot write here; the download still works.
        (cd "$debs" && apt-get download -q "$package") 2>&1 |
            { grep -v '^W: Download is performed unsandboxed' || true; } >&2 || return 1
        local deb
        deb="$(find "$debs" -maxdepth 1 -name "${package}_*.deb" | sort | tail -n 1)"
        [[ -n "$deb" ]] || { log "error: apt-get download $package produced no .deb in $debs"; return 1; }
        mkdir -p "$KERNEL_ROOT"
        dpkg -x "$deb" "$KERNEL_ROOT" || return 1
        KERNEL_VERSION="$(ls "$KERNEL_ROOT/lib/modules")"
        depmod -b "$KERNEL_ROOT" "$KERNEL_VERSION" || return 1
        touch "$KERNEL_ROOT/.ready"
    fi
    KERNEL_VERSION="$(ls "$KERNEL_ROOT/lib/modules")"
    KERNEL_IMAGE="$KERNEL_ROOT/boot/vmlinuz-$KERNEL_VERSION"
    [[ -f "$KERNEL_IMAGE" ]] || { log "error: no kernel image at $KERNEL_IMAGE"; return 1; }
}

# Copies a host file into the initramfs tree at the same path (following links).
copy_host_file() {
    local file="$1" root="$2"
    mkdir -p "$root$(dirname "$file")"
    cp -L "$file" "$root$file"
}

# Copies executable $1 into the initramfs $3 as /bin/$2, with its shared libraries and the
# dynamic loader at their host paths.
copy_executable() {
    local path="$1" name="$2" root="$3" lib
    cp -L "$path" "$root/bin/$name"
    while read -r lib; do
        copy_host_file "$lib" "$root"
    done < <(ldd "$path" | awk '/=> \//{print $3} /^[[:space:]]*\/[^ ]*ld-linux/{print $1}')
}

# Builds the suite's initramfs into $INITRAMFS.
build_initramfs() {
    local suite="$1"
    local root="$CACHE/initramfs/$suite.root"
    INITRAMFS="$CACHE/initramfs/$suite.cpio.gz"
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,pollux,lib/modules}

    cp /bin/busybox "$root/bin/busybox"
    cp "$VM_DIR/init" "$root/init"
    chmod 755 "$root/init"
    cp "$VM_DIR/lib.sh" "$VM_DIR/$suite.sh" "$root/pollux/"

    # Kernel modules with their dependencies, in the layout modprobe expects.
    local module line path dest modules_dir="lib/modules/$KERNEL_VERSION"
    mkdir -p "$root/$modules_dir"
    for module in "${SUITE_MODULES[@]}"; do
        while read -r line; do
            case "$line" in
                insmod\ *)
                    path="${line#insmod }"
                    path="${path%% *}"
                    dest="$root${path#"$KERNEL_ROOT"}"
                    mkdir -p "$(dirname "$dest")"
                    case "$path" in
                        *.ko.xz) xz -dc "$path" > "${dest%.xz}" ;;
                        *.ko.zst) zstd -qdc "$path" > "${dest%.zst}" ;;
                        *.ko.gz) gzip -dc "$path" > "${dest%.gz}" ;;
                        *) cp "$path" "$dest" ;;
                    esac
                    ;;
            esac
        done < <(modprobe -d "$KERNEL_ROOT" -S "$KERNEL_VERSION" --show-depends "$module")
    done
    cp "$KERNEL_ROOT/$modules_dir"/modules.{order,builtin,builtin.modinfo} "$root/$modules_dir/"
    depmod -b "$root" "$KERNEL_VERSION"

    # Test binaries and host executables, their shared libraries and the dynamic loader.
    local bin
    for bin in "${SUITE_BINS[@]}"; do
        path="$TARGET_DIR/release/$bin"
        [[ -x "$path" ]] || die "binary $path missing after cargo build"
        copy_executable "$path" "$bin" "$root"
    done
    for path in "${SUITE_HOST_BINS[@]}"; do
        [[ "$path" == /* && -x "$path" ]] || die "SUITE_HOST_BINS: no executable at '$path'"
        copy_executable "$path" "$(basename "$path")" "$root"
    done

    (cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 > "$INITRAMFS"
}

# Creates (once) a zeroed raw disk image and prints its path; for suite_qemu_args.
vm_disk() {
    local name="$1" size_mib="$2"
    local path="$CACHE/disks/$name.img"
    mkdir -p "$CACHE/disks"
    if [[ ! -f "$path" ]]; then
        qemu-img create -q -f raw "$path" "${size_mib}M"
    fi
    printf '%s\n' "$path"
}

# Boots one variant of a suite; returns non-zero when it failed.
run_variant() {
    local suite="$1" variant="$2"
    local log_file="$CACHE/logs/$suite-$variant.log"
    local -a extra=()
    local extra_text
    # A failure in the suite's hook must fail the variant, so no process substitution here.
    extra_text=$(suite_qemu_args "$variant") || {
        echo "vm-test: $suite.conf: suite_qemu_args $variant failed" >&2
        return 1
    }
    [[ -z $extra_text ]] || mapfile -t extra <<<"$extra_text"
    # no_timer_check: under TCG on a loaded host the boot-time check that the IO-APIC timer
    # ticks can miss, and with interrupt remapping (intel-iommu) the kernel panics on it ("timer
    # doesn't work through Interrupt-remapped IO-APIC"); KVM guests skip the check the same way.
    # shellcheck disable=SC2054 # commas separate QEMU sub-options, not array elements
    local -a qemu=(
        qemu-system-x86_64
        -machine q35,kernel-irqchip=split -accel tcg -smp "$SUITE_SMP" -m "$SUITE_MEM"
        -nographic -no-reboot -monitor none
        -kernel "$KERNEL_IMAGE" -initrd "$INITRAMFS"
        -append "console=ttyS0 intel_iommu=on panic=-1 loglevel=4 no_timer_check pollux.suite=$suite pollux.variant=$variant${SUITE_CMDLINE:+ $SUITE_CMDLINE}"
        "${extra[@]}"
    )
    log "$suite/$variant: booting (log: $log_file)"
    printf '%q ' "${qemu[@]}" > "$log_file.cmd"
    if declare -F suite_host_start >/dev/null; then
        local start_rc=0
        suite_host_start "$variant" > "$log_file.host" 2>&1 || start_rc=$?
        if [[ "$start_rc" -ne 0 ]]; then
            declare -F suite_host_stop >/dev/null && suite_host_stop "$variant" >> "$log_file.host" 2>&1
            log "$suite/$variant: FAIL: suite_host_start failed (status $start_rc); see $log_file.host"
            tail -n 20 "$log_file.host" >&2
            return 1
        fi
    fi
    local start=$SECONDS rc=0
    if [[ "$VERBOSE" == 1 ]]; then
        timeout -k 10 "$TIMEOUT_S" "${qemu[@]}" < /dev/null 2>&1 | tee "$log_file" || rc=$?
    else
        timeout -k 10 "$TIMEOUT_S" "${qemu[@]}" < /dev/null > "$log_file" 2>&1 || rc=$?
    fi
    local elapsed=$((SECONDS - start))
    local failure=""
    if declare -F suite_host_stop >/dev/null; then
        local stop_rc=0
        suite_host_stop "$variant" >> "$log_file.host" 2>&1 || stop_rc=$?
        [[ "$stop_rc" -eq 0 ]] || failure="suite_host_stop failed (status $stop_rc); see $log_file.host"
    fi
    if [[ "$rc" -eq 124 || "$rc" -eq 137 ]]; then
        failure="guest killed after ${TIMEOUT_S}s (hung?)"
    elif [[ -n "$failure" ]]; then
        :
    elif [[ "$rc" -ne 0 ]]; then
        failure="qemu exited with status $rc"
    elif grep -q "$DMA_FAULT_PATTERN" "$log_file"; then
        failure="IOMMU DMA fault in the guest kernel log: $(grep -m1 "$DMA_FAULT_PATTERN" "$log_file" | tr -d '\r')"
    elif ! tr -d '\r' < "$log_file" | grep -qx "$PASS_MARKER"; then
        failure="no '$PASS_MARKER' from the guest: $(tr -d '\r' < "$log_file" | grep -m1 '^POLLUX-SUITE-RESULT:' || echo 'no result marker')"
    elif declare -F suite_host_check >/dev/null; then
        local check_rc=0
        suite_host_check "$variant" >> "$log_file" 2>&1 || check_rc=$?
        [[ "$check_rc" -eq 0 ]] ||
            failure="host check after the guest powered off failed (status $check_rc): $(tail -n 1 "$log_file")"
    fi
    if [[ -n "$failure" ]]; then
        log "$suite/$variant: FAIL after ${elapsed}s: $failure"
        # The guest prints its kernel log last: show what the suite printed before it too.
        if grep -q '^POLLUX-GUEST: ---- guest kernel log ----' "$log_file"; then
            log "--- the suite's last 30 lines before the guest kernel log ---"
            tr -d '\r' < "$log_file" | sed '/^POLLUX-GUEST: ---- guest kernel log ----$/,$d' |
                tail -n 30 >&2
        fi
        log "--- last 40 lines of $log_file ---"
        tail -n 40 "$log_file" | tr -d '\r' >&2
        return 1
    fi
    log "$suite/$variant: PASS in ${elapsed}s"
}

run_suite() {
    local suite="$1"
    [[ -f "$VM_DIR/$suite.conf" && -f "$VM_DIR/$suite.sh" ]] ||
        die "unknown suite '$suite' (known: $(list_suites | tr '\n' ' '))"
    SUITE_PACKAGES=() SUITE_BINS=() SUITE_HOST_BINS=() SUITE_MODULES=() SUITE_VARIANTS=()
    SUITE_BENCHMARK=0 SUITE_SMP=1 SUITE_MEM=1G SUITE_CMDLINE='' SUITE_HOST_PACKAGES=()
    SUITE_KERNEL_PACKAGE=''
    unset -f suite_qemu_args suite_host_check suite_host_start suite_host_stop
    # shellcheck source=/dev/null
    source "$VM_DIR/$suite.conf"
    declare -F suite_qemu_args >/dev/null || die "$suite.conf defines no suite_qemu_args"
    [[ "${#SUITE_VARIANTS[@]}" -gt 0 ]] || die "$suite.conf defines no SUITE_VARIANTS"
    ensure_host_packages "${SUITE_HOST_PACKAGES[@]}" ||
        { log "$suite: FAIL: cannot install ${SUITE_HOST_PACKAGES[*]}"; return 1; }

    if [[ "${#SUITE_PACKAGES[@]}" -gt 0 ]]; then
        local -a packages=()
        local package
        for package in "${SUITE_PACKAGES[@]}"; do packages+=(-p "$package"); done
        log "$suite: cargo build --release ${packages[*]}"
        (cd "$REPO" && cargo build --release --quiet "${packages[@]}") ||
            { log "$suite: FAIL: cargo build failed"; return 1; }
    fi
    if [[ -n "$SUITE_KERNEL_PACKAGE" ]]; then
        local kernel_package
        if ! kernel_package="$(resolve_kernel_package "$SUITE_KERNEL_PACKAGE")" ||
            ! ensure_kernel "$kernel_package"; then
            log "$suite: FAIL: no guest kernel for SUITE_KERNEL_PACKAGE"
            return 1
        fi
    else
        ensure_kernel || { log "$suite: FAIL: no guest kernel"; return 1; }
    fi
    log "$suite: guest kernel $KERNEL_VERSION"
    build_initramfs "$suite"

    local variant failed=0 log_file
    for variant in "${SUITE_VARIANTS[@]}"; do
        run_variant "$suite" "$variant" && continue
        log_file="$CACHE/logs/$suite-$variant.log"
        if crashed_while_booting "$log_file"; then
            # Nothing of Pollux's ran in the guest yet; the failure is the emulator's. Once.
            cp "$log_file" "$log_file.boot-crash"
            log "$suite/$variant: the guest kernel crashed while booting, before the suite's init ran (kept as $log_file.boot-crash); booting it once more"
            run_variant "$suite" "$variant" && continue
        fi
        failed=1
    done
    return "$failed"
}

# Succeeds when the guest log $1 shows a kernel oops or panic and no line from the suite's init
# (`POLLUX-GUEST:`): the kernel died while booting, before anything of the suite ran. Under TCG
# this happens now and then (seen: an int3 oops in sched_clock_cpu while the kernel patched its
# own text across two vCPUs, Debian's 6.12 kernel, one boot in a few hundred).
crashed_while_booting() {
    local log_file="$1"
    [[ -f "$log_file" ]] || return 1
    grep -q 'POLLUX-GUEST:' "$log_file" && return 1
    grep -qE 'Kernel panic|Oops: ' "$log_file"
}

main() {
    [[ $# -gt 0 ]] || die "usage: $0 <suite>... | all | --list"
    if [[ "$1" == "--list" ]]; then
        list_test_suites
        return 0
    fi
    local -a suites=("$@")
    if [[ "$1" == "all" ]]; then
        mapfile -t suites < <(list_test_suites)
    fi
    local suite
    for suite in "${suites[@]}"; do
        [[ -f "$VM_DIR/$suite.conf" && -f "$VM_DIR/$suite.sh" ]] ||
            die "unknown suite '$suite' (known: $(list_suites | tr '\n' ' '))"
    done
    ensure_host_tools
    mkdir -p "$CACHE/logs" "$CACHE/initramfs"

    local failed=()
    local start=$SECONDS
    for suite in "${suites[@]}"; do
        run_suite "$suite" || failed+=("$suite")
    done
    if [[ "${#failed[@]}" -gt 0 ]]; then
        log "FAILED suites: ${failed[*]} ($((SECONDS - start))s)"
        return 1
    fi
    log "all suites passed: ${suites[*]} ($((SECONDS - start))s)"
}

main "$@"
