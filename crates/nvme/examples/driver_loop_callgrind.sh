#!/usr/bin/env bash
# Instructions per 4 KiB read through the NVMe driver, counted by callgrind (deterministic, so
# the figure holds on a loaded or shared machine, unlike a time).
#
# Builds the driver_loop example in release mode, runs it under callgrind at two batch counts
# (32 reads per batch) and divides the difference of the two counts by the difference in reads,
# which cancels setup and teardown. Each instruction is put in one of three shares:
#
#   model    the software controller (every function of pollux_nvme::model, with everything
#            it calls: its doorbell handler decodes the commands and posts the completions)
#   harness  the example's own loop and completion closure (lines of examples/driver_loop.rs,
#            wherever inlined; library code inlined into the example counts as the driver's)
#   driver   everything else: the queue pair, PRP and controller code, env's translation
#            and DMA accessors it uses, wherever the compiler inlined them
#
# and prints each per read, then the driver's costliest functions (self cost, per read).
#
# Usage: crates/nvme/examples/driver_loop_callgrind.sh [--max N] [--from DIR]
#   --max N     exit 1 when the driver's share per read is above N
#   --from DIR  count the callgrind files a KEEP_DIR run left in DIR (another build's, for a
#               before/after comparison) instead of building and running
# Environment (defaults in brackets):
#   BATCHES_LOW, BATCHES_HIGH   the two batch counts [1000, 4000]
#   TOP                         how many driver functions to list [12]
#   KEEP_DIR                    keep the callgrind files in this directory (else a temp dir)
set -euo pipefail

max=""
from=""
while [ $# -gt 0 ]; do
    case "$1" in
        --max)
            max="${2:?--max needs a number}"
            shift 2
            ;;
        --from)
            from="${2:?--from needs a directory}"
            shift 2
            ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "unknown argument: $1" >&2
            exit 2
            ;;
    esac
done

low="${BATCHES_LOW:-1000}"
high="${BATCHES_HIGH:-4000}"
top="${TOP:-12}"
reads_per_batch=32
if [ "$high" -le "$low" ]; then
    echo "BATCHES_HIGH ($high) must be above BATCHES_LOW ($low)" >&2
    exit 2
fi
[ -n "$from" ] || command -v valgrind >/dev/null || {
    echo "valgrind is needed (Debian: apt-get install valgrind)" >&2
    exit 2
}

if [ -n "$from" ]; then
    out="$from"
elif [ -n "${KEEP_DIR:-}" ]; then
    out="$KEEP_DIR"
    mkdir -p "$out"
else
    out="$(mktemp -d)"
    trap 'rm -rf "$out"' EXIT
fi

# Self cost per (function, source file of the line) and call costs per (caller, callee), from
# callgrind's output format (names compressed as "(id) name" at first use, "(id)" after),
# summed into the three shares. Prints "model harness driver total" and then, one per line,
# "cost<TAB>function" for the driver's functions.
shares() {
    awk -v top_file="$1" '
        function name(kind, spec,    id, rest) {
            # "(12) some name" defines id 12; "(12)" refers to it; a bare name has no id.
            if (spec ~ /^\([0-9]+\)/) {
                id = substr(spec, 2, index(spec, ")") - 2)
                rest = substr(spec, index(spec, ")") + 1)
                sub(/^ /, "", rest)
                if (rest != "") names[kind, id] = rest
                return names[kind, id]
            }
            return spec
        }
        function is_model(fn) {
            return fn ~ /^pollux_nvme::model::/ || fn ~ /^<pollux_nvme::model::/
        }
        function is_example_file(file) {
            return file ~ /crates\/nvme\/examples\//
        }
        /^fl=/ { file = name("fl", substr($0, 4)); line_file = file; next }
        /^(fi|fe)=/ { line_file = name("fl", substr($0, 4)); next }
        /^fn=/ { fn = name("fn", substr($0, 4)); line_file = file; next }
        /^cf[il]=/ { name("fl", substr($0, 5)); next }
        /^cfn=/ { callee = name("fn", substr($0, 5)); next }
        /^calls=/ {
            in_call = 1
            if (!((fn, callee) in edge)) {
                edge[fn, callee] = 1
                edges[++edge_count] = fn SUBSEP callee
            }
            next
        }
        /^summary:/ { total = $2; next }
        /^[0-9+*-]/ {
            # Positions may be relative to the previous one ("+3", "-2") or repeat it ("*").
            if ($1 ~ /^\+/) line += substr($1, 2)
            else if ($1 ~ /^-/) line -= substr($1, 2)
            else if ($1 != "*") line = $1 + 0
            cost = $2 + 0
            if (in_call) {
                in_call = 0
                # A call from the model to anything outside it is the model'\''s cost.
                if (is_model(fn) && !is_model(callee)) model += cost
                next
            }
            if (is_model(fn)) {
                model += cost
            } else if (is_example_file(line_file) && line != 0) {
                # Only the example'\''s own lines: library code inlined into it may be the
                # driver'\''s (its fast path inlines into the caller), so it counts as the
                # driver'\''s, as does line 0 (register saves, spills), whichever file the
                # compiler named. This errs towards the driver by the loop'\''s iterator.
                harness += cost
            } else {
                by_fn[fn] += cost
            }
            next
        }
        END {
            printf "%d %d %d %d\n", model, harness, total - model - harness, total
            # Functions reached only from the model (its callees, theirs...) are in its share:
            # leave them out of the driver'\''s list.
            for (f in by_fn) if (is_model(f)) model_only[f] = 1
            do {
                changed = 0
                for (i = 1; i <= edge_count; i++) {
                    split(edges[i], pair, SUBSEP)
                    if (!(pair[2] in model_only)) candidate[pair[2]] = 1
                }
                for (f in candidate) {
                    only = 1
                    for (i = 1; i <= edge_count; i++) {
                        split(edges[i], pair, SUBSEP)
                        if (pair[2] == f && !is_model(pair[1]) && !(pair[1] in model_only)) only = 0
                    }
                    if (only) { model_only[f] = 1; changed = 1 }
                }
                for (f in candidate) delete candidate[f]
            } while (changed)
            for (f in by_fn) if (!(f in model_only)) printf "%d\t%s\n", by_fn[f], f > top_file
        }
    ' "$2"
}

if [ -z "$from" ]; then
    repo="$(cd "$(dirname "$0")/../../.." && pwd)"
    cd "$repo"
    cargo build --quiet --release -p pollux-nvme --example driver_loop
    target_dir="$(cargo metadata --format-version 1 --no-deps |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
    binary="$target_dir/release/examples/driver_loop"
    for batches in "$low" "$high"; do
        valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.$batches" \
            "$binary" "$batches" >"$out/run.$batches.log" 2>&1 || {
            cat "$out/run.$batches.log" >&2
            exit 1
        }
        grep -q "$((batches * reads_per_batch)) reads, 0 failed" "$out/run.$batches.log" || {
            echo "driver_loop $batches: reads failed" >&2
            cat "$out/run.$batches.log" >&2
            exit 1
        }
    done
fi

shares "$out/fns.$low" "$out/callgrind.$low" >"$out/shares.$low"
shares "$out/fns.$high" "$out/callgrind.$high" >"$out/shares.$high"
read -r model_low harness_low driver_low total_low <"$out/shares.$low"
read -r model_high harness_high driver_high total_high <"$out/shares.$high"
reads=$(((high - low) * reads_per_batch))

per_read() {
    awk -v a="$1" -v b="$2" -v n="$reads" 'BEGIN { printf "%.1f", (b - a) / n }'
}

driver="$(per_read "$driver_low" "$driver_high")"
echo "reads counted: $reads ($low and $high batches of $reads_per_batch, difference)"
echo "total instructions per read: $(per_read "$total_low" "$total_high")"
echo "model instructions per read: $(per_read "$model_low" "$model_high")"
echo "harness instructions per read: $(per_read "$harness_low" "$harness_high")"
echo "driver instructions per read: $driver"
echo "driver functions, self instructions per read (inlined code counted where it landed):"
# Functions present in both runs, by the difference of their self costs.
awk -F '\t' -v n="$reads" '
    NR == FNR { low[$2] = $1; next }
    { d = ($1 - low[$2]) / n; if (d >= 0.5) printf "%8.1f  %s\n", d, $2 }
' "$out/fns.$low" "$out/fns.$high" | sort -rn | head -n "$top"

if [ -n "$max" ]; then
    if awk -v d="$driver" -v m="$max" 'BEGIN { exit !(d > m) }'; then
        echo "driver instructions per read $driver above $max" >&2
        exit 1
    fi
fi
