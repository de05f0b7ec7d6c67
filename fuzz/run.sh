#!/usr/bin/env bash
# Run every fuzz target for a bounded time and fail if any finds a crash.
#
#   fuzz/run.sh [SECONDS]      (default 30 seconds per target)
#
# Works on the stable toolchain; no nightly is needed. cargo-fuzz builds the targets with
# `-Zsanitizer=address` (AddressSanitizer) next to the SanitizerCoverage passes and flags
# (`-Cpasses=sancov-module`, `-Cllvm-args=-sanitizer-coverage-*`, which are stable). `-Z` flags
# are refused by a stable rustc unless RUSTC_BOOTSTRAP=1 is set, the switch the Rust project
# uses to build its own compiler with a stable one; the stable toolchain ships the sanitizer
# runtimes (librustc-stable_rt.asan.a) that the flag links. So this script sets
# RUSTC_BOOTSTRAP=1 for the fuzz build only (the workspace is built without it) and uses
# whatever toolchain `cargo` selects. It then checks that what ran was really instrumented:
# the binary links AddressSanitizer and SanitizerCoverage, and libFuzzer reports a non-zero
# number of coverage counters and coverage found from the seeds; an uninstrumented build fails
# the run instead of fuzzing blind.
#
# Installs cargo-fuzz from crates.io (`cargo install`) if it is missing, and g++ (as root, with
# apt-get) if there is no C++ compiler for libFuzzer. The growing corpus lives in
# fuzz/corpus/<target> (not checked in), the seeds in fuzz/seeds/<target>, and a crashing
# input is left in fuzz/artifacts/<target>.
set -euo pipefail

seconds="${1:-30}"
[[ $seconds =~ ^[1-9][0-9]*$ ]] || { echo "usage: fuzz/run.sh [SECONDS]" >&2; exit 2; }
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

# The cargo-fuzz release this script was checked with; a newer one already installed is used as is.
CARGO_FUZZ_VERSION=0.13.2

# libfuzzer-sys compiles libFuzzer (C++) with the cc crate: it needs a C++ compiler, which a
# machine with only Rust and a C linker may lack.
cxx=${CXX:-c++}
if ! command -v "$cxx" >/dev/null 2>&1; then
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "== no C++ compiler ($cxx) for libFuzzer: installing g++"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends g++ ||
            { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends g++; } ||
            true
    fi
    command -v "$cxx" >/dev/null 2>&1 ||
        { echo "fuzz/run.sh: libFuzzer needs a C++ compiler ($cxx): install g++ (Debian: apt-get install g++)" >&2; exit 1; }
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

export RUSTC_BOOTSTRAP=1
echo "== $(rustc --version), $(cargo fuzz --version)"

logs=$(mktemp -d "${TMPDIR:-/tmp}/weft-fuzz.XXXXXX")
trap 'rm -rf -- "$logs"' EXIT

# instrumented TARGET LOG: the target's binary and libFuzzer's log show a build with
# AddressSanitizer and coverage feedback that found coverage.
instrumented() {
    local target=$1 log=$2 bin counters cov
    bin=$(find fuzz/target -path "*/release/$target" -type f -perm -u+x | head -n 1)
    [[ -n $bin ]] || { echo "no binary for $target under fuzz/target" >&2; return 1; }
    LC_ALL=C grep -q -a -F __asan_init "$bin" ||
        { echo "$bin is not built with AddressSanitizer" >&2; return 1; }
    LC_ALL=C grep -q -a -F __sanitizer_cov_8bit_counters_init "$bin" ||
        { echo "$bin is not built with SanitizerCoverage" >&2; return 1; }
    counters=$(sed -n 's/^INFO: Loaded [0-9]* modules *(\([0-9]*\) inline 8-bit counters).*/\1/p' "$log" | head -n 1)
    ((${counters:-0} > 0)) || { echo "libFuzzer saw no coverage counters in $target" >&2; return 1; }
    cov=$(sed -n 's/^#[0-9]*[[:space:]]*INITED cov: \([0-9]*\).*/\1/p' "$log" | head -n 1)
    ((${cov:-0} > 0)) || { echo "the seeds of $target reached no coverage" >&2; return 1; }
    echo "== $target: $counters coverage counters, $cov covered after the seeds, ASan linked"
}

mapfile -t targets < <(cargo fuzz list)
((${#targets[@]})) || { echo "cargo fuzz list found no targets" >&2; exit 1; }
failed=()
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target"
    echo "== fuzz target $target for ${seconds}s"
    if ! cargo fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 2>&1 | tee "$logs/$target.log"; then
        failed+=("$target")
    elif ! instrumented "$target" "$logs/$target.log"; then
        failed+=("$target (not instrumented)")
    fi
done

if ((${#failed[@]})); then
    echo "fuzzing failed for: ${failed[*]} (crashing inputs under fuzz/artifacts/)" >&2
    exit 1
fi
echo "no crashes in: ${targets[*]} (${seconds}s each)"
