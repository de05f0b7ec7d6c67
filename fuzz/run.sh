#!/usr/bin/env bash
# Run every fuzz target for a bounded time and fail if any finds a crash.
#
#   fuzz/run.sh [SECONDS]      (default 30 seconds per target)
#
# Needs a nightly toolchain; installs cargo-fuzz if it is missing. The growing corpus lives in
# fuzz/corpus/<target> (not checked in), the seeds in fuzz/seeds/<target>, and a crashing
# input is left in fuzz/artifacts/<target>.
set -euo pipefail

seconds="${1:-30}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

mapfile -t targets < <(cargo +nightly fuzz list)
failed=()
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target"
    echo "== fuzz target $target for ${seconds}s"
    if ! cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1; then
        failed+=("$target")
    fi
done

if ((${#failed[@]})); then
    echo "fuzzing found crashes in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
echo "no crashes in: ${targets[*]} (${seconds}s each)"
