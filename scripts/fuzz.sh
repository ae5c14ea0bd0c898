#!/usr/bin/env bash
# Builds and runs Pollux's coverage-guided fuzz targets (fuzz/, libFuzzer through the
# libfuzzer-sys crate, with AddressSanitizer), on the stable toolchain:
#
#   scripts/fuzz.sh [TARGET ...] [--seconds N]   fuzz each target N seconds (default 30; all
#                                                targets when none named)
#   scripts/fuzz.sh --replay [TARGET ...]        only replay the checked-in inputs
#   scripts/fuzz.sh --merge [TARGET ...]         minimise .cache/fuzz/corpus/T into fuzz/corpus/T
#                                                (to check in)
#   scripts/fuzz.sh --list
#
# Every run first replays the target's checked-in inputs (fuzz/corpus/T, the seed corpus, and
# fuzz/regressions/T, each crash found so far), then fuzzes from them with its working corpus in
# .cache/fuzz/corpus/T. A crash (panic, failed invariant, sanitizer report, timeout) stops the
# script with status 1 and leaves the input in .cache/fuzz/artifacts/T/: fix the bug, then copy
# the input to fuzz/regressions/T/ so it is replayed forever after. Per target it prints
# executions and coverage (libFuzzer's `cov:` edges and `ft:` features).
#
# libFuzzer needs unstable compiler flags (-Z sanitizer, sanitizer coverage): RUSTC_BOOTSTRAP=1
# is set here for this build alone (its own target directory), never for the main build.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

all_targets() {
    sed -n 's/^name = "\([a-z_]*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^pollux-fuzz$'
}

seconds=30
mode=fuzz
targets=()
while (($#)); do
    case "$1" in
    --seconds)
        seconds=${2:?--seconds needs a number}
        shift 2
        ;;
    --replay) mode=replay && shift ;;
    --merge) mode=merge && shift ;;
    --list)
        all_targets
        exit 0
        ;;
    -*)
        echo "fuzz.sh: unknown option '$1' (--seconds N, --replay, --merge, --list)" >&2
        exit 2
        ;;
    *)
        all_targets | grep -qx "$1" || {
            echo "fuzz.sh: unknown target '$1' (known: $(all_targets | tr '\n' ' '))" >&2
            exit 2
        }
        targets+=("$1")
        shift
        ;;
    esac
done
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(all_targets)
fi

"$repo/scripts/install-deps.sh"
triple=$(rustc -vV | sed -n 's/^host: //p')
target_dir="$repo/target/fuzz"
# Instrument only the target triple's code (not build scripts or proc macros): --target.
export RUSTC_BOOTSTRAP=1
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Zsanitizer=address \
-Cdebug-assertions -Coverflow-checks -Cforce-frame-pointers=yes"
echo "fuzz.sh: building ${targets[*]} (release, ASan, sanitizer coverage)"
cargo build --quiet --release --manifest-path "$repo/Cargo.toml" -p pollux-fuzz --bins \
    --target "$triple" --target-dir "$target_dir"
bin_dir="$target_dir/$triple/release"
# Leaks: the targets map one fake guest per process on purpose.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:symbolize=1"

# The targets' sockets and scratch files live in $TMPDIR; libFuzzer ends a process with exit(),
# which runs no destructor, so give them a folder of this run's own and remove it at the end.
scratch=$(mktemp -d "${TMPDIR:-/tmp}/pollux-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
export TMPDIR="$scratch"

cache="$repo/.cache/fuzz"
status=0
for target in "${targets[@]}"; do
    seeds="$repo/fuzz/corpus/$target"
    regressions="$repo/fuzz/regressions/$target"
    work="$cache/corpus/$target"
    artifacts="$cache/artifacts/$target/"
    mkdir -p "$seeds" "$regressions" "$work" "$artifacts"
    log="$cache/$target.log"
    # The checked-in inputs, each run once.
    if ! "$bin_dir/$target" -runs=0 -timeout=10 -artifact_prefix="$artifacts" \
        "$seeds" "$regressions" >"$log" 2>&1; then
        echo "fuzz.sh: $target: a checked-in input fails (log: $log)" >&2
        tail -30 "$log" >&2
        status=1
        continue
    fi
    replayed=$(find "$seeds" "$regressions" -type f | wc -l)
    case "$mode" in
    replay)
        echo "fuzz.sh: $target: $replayed checked-in inputs replayed"
        continue
        ;;
    merge)
        "$bin_dir/$target" -merge=1 -timeout=10 "$seeds" "$work" >"$log" 2>&1 || {
            echo "fuzz.sh: $target: merge failed (log: $log)" >&2
            status=1
            continue
        }
        echo "fuzz.sh: $target: fuzz/corpus/$target holds $(find "$seeds" -type f | wc -l) inputs"
        continue
        ;;
    esac
    if "$bin_dir/$target" -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$artifacts" "$work" "$seeds" "$regressions" >"$log" 2>&1; then
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1)
        echo "fuzz.sh: $target: ${seconds}s, ${execs:-?} executions, ${cov:-no coverage line}, $replayed checked-in inputs replayed, no crash"
    else
        echo "fuzz.sh: $target: CRASH (log: $log; input in $artifacts)" >&2
        grep -m5 -E 'panicked|ERROR: AddressSanitizer|SUMMARY|Test unit written' "$log" >&2 || tail -30 "$log" >&2
        status=1
    fi
done
exit "$status"
