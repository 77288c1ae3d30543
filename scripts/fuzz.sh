#!/usr/bin/env bash
# Build kiln's libFuzzer targets (fuzz/) on a stable toolchain and run each
# for SECONDS (default 60) on a scratch copy of its committed seed corpus.
# A crash fails the script; libFuzzer's input that caused it is kept under
# fuzz/artifacts/<target>/ (add it to fuzz/corpus/<target>/ once fixed).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# `cargo fuzz run -s none` needs cargo-fuzz installed and still asks for
# nightly for some of its flags; these are the flags it passes with
# `-s none` (coverage-guided libFuzzer, no sanitizer), all stable rustc.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_EACH="${1:-60}"
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(dockerfile dockerignore image_archive layer_apply registry_manifest cache_records)
fi

export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# its own target directory: these flags would rebuild the workspace's
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# an explicit --target keeps RUSTFLAGS off build scripts and proc macros,
# which would otherwise need libFuzzer's symbols to link (as cargo-fuzz does)
host=$(rustc -vV | sed -n 's/^host: //p')
start=$(date +%s)
cargo build --release --locked --bins --target "$host"
echo "fuzz.sh: built the fuzz targets in $(($(date +%s) - start)) s"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t" "$scratch/$t"
    cp -r "corpus/$t/." "$scratch/$t/"
    echo "fuzz.sh: $t for ${SECONDS_EACH} s"
    # -rss_limit_mb: a layer or archive that makes kiln allocate without
    # bound is a finding too; -timeout: so is one input taking 10 s
    if ! "$CARGO_TARGET_DIR/$host/release/$t" "$scratch/$t" \
        -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 \
        -max_len=65536 -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" 2>"$scratch/$t.log"; then
        tail -n 60 "$scratch/$t.log" >&2
        echo "fuzz.sh: $t FAILED; the input is in fuzz/artifacts/$t/" >&2
        failed+=("$t")
    else
        grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' \
            "$scratch/$t.log" | sed "s/^/fuzz.sh: $t /"
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: crashes in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: ${#TARGETS[@]} passed, 0 failed"
