#!/usr/bin/env bash
# weft's full check, as CI runs it (.ci/run):
#   1. scripts/setup.sh                       machine prerequisites (root)
#   2. cargo fmt --all -- --check
#   3. cargo clippy --workspace --all-targets -- -D warnings
#   4. cargo build --release -p weft-control  (weftd, used by the lab)
#   5. the test suite: cargo nextest run --workspace (cargo test --workspace without nextest)
#   6. fuzz/run.sh 20                         a bounded fuzz run of every target (stable Rust;
#                                             installs cargo-fuzz from crates.io if missing)
#   7. bench/lab/test.sh                      the lab: weft, encrypted, wireguard-go, VXLAN, direct (root)
#   8. deploy/test.sh                         systemd units, docker options, CNI, Vagrant lab
# Every step runs even when an earlier one failed; the summary lists each step's result and the
# exit status is non-zero if any step failed. With CI=true a missing prerequisite (root, a cargo
# component, fuzz/run.sh) is a failure; otherwise the step is reported as SKIPPED.
set -uo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1

if [[ ${CI:-} == true || ${CI:-} == 1 ]]; then STRICT=1; else STRICT=0; fi
LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/weft-test.XXXXXX")
trap 'rm -rf -- "$LOGDIR"' EXIT

NAMES=()
RESULTS=()
TIMES=()
START=$SECONDS

banner() { printf '\n\033[1m==== %s ====\033[0m\n' "$*"; }

record() {
	NAMES+=("$1")
	RESULTS+=("$2")
	TIMES+=("$3")
}

# step <name> <command...>: run one step, recording ok/FAILED and its duration.
step() {
	local name=$1
	shift
	banner "$name"
	echo "\$ $*"
	local t0=$SECONDS rc=0
	"$@" || rc=$?
	if ((rc == 0)); then
		record "$name" ok $((SECONDS - t0))
	else
		echo "---- $name: FAILED (exit status $rc)"
		record "$name" FAILED $((SECONDS - t0))
	fi
	return 0
}

# missing <name> <why>: a prerequisite is missing: a failure under CI, a loud skip otherwise.
missing() {
	banner "$1"
	if ((STRICT)); then
		echo "---- $1: FAILED: $2"
		record "$1" FAILED 0
	else
		echo "---- $1: SKIPPED: $2 (a failure under CI=true)"
		record "$1" SKIPPED 0
	fi
}

# as_root <command...>: run a command as root (directly, or through sudo without a password).
ROOT_PREFIX=()
HAVE_ROOT=1
if [[ $EUID -ne 0 ]]; then
	if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
		ROOT_PREFIX=(sudo -n -E env "PATH=$PATH")
	else
		HAVE_ROOT=0
	fi
fi
as_root() { "${ROOT_PREFIX[@]}" "$@"; }

# The test runner's output is kept so that its closing lines can be repeated in the summary.
run_tests() {
	if cargo nextest --version >/dev/null 2>&1; then
		cargo nextest run --workspace 2>&1 | tee "$LOGDIR/tests.log"
	else
		echo "(cargo-nextest not installed: using cargo test)"
		cargo test --workspace 2>&1 | tee "$LOGDIR/tests.log"
	fi
}

if ((HAVE_ROOT)); then
	step "setup (scripts/setup.sh)" as_root bash scripts/setup.sh
else
	missing "setup (scripts/setup.sh)" "needs root (or passwordless sudo)"
fi

if cargo fmt --version >/dev/null 2>&1; then
	step "format (cargo fmt --check)" cargo fmt --all -- --check
else
	missing "format (cargo fmt --check)" "rustfmt is not installed (rustup component add rustfmt)"
fi

if cargo clippy --version >/dev/null 2>&1; then
	step "lints (cargo clippy -D warnings)" cargo clippy --workspace --all-targets -- -D warnings
else
	missing "lints (cargo clippy -D warnings)" "clippy is not installed (rustup component add clippy)"
fi

step "build weftd (cargo build --release -p weft-control)" cargo build --release -p weft-control

step "test suite" run_tests

if [[ -f fuzz/run.sh ]]; then
	step "fuzz (fuzz/run.sh 20)" bash fuzz/run.sh 20
else
	missing "fuzz (fuzz/run.sh 20)" "fuzz/run.sh does not exist"
fi

if ((HAVE_ROOT)); then
	step "lab (bench/lab/test.sh: weft, encrypted, wireguard-go, vxlan, direct)" as_root bash bench/lab/test.sh --weftd "$ROOT/target/release/weftd"
else
	missing "lab (bench/lab/test.sh: weft, encrypted, wireguard-go, vxlan, direct)" "needs root (or passwordless sudo) for network namespaces"
fi

if ((HAVE_ROOT)); then
	step "deploy (deploy/test.sh: units, docker options, CNI, vagrant validate)" as_root bash deploy/test.sh
else
	missing "deploy (deploy/test.sh)" "needs root (or passwordless sudo) to install vagrant and shellcheck"
fi

banner "summary ($((SECONDS - START)) s)"
if [[ -s $LOGDIR/tests.log ]]; then
	echo "test runner's closing lines:"
	if grep -q '^ *Summary \[' "$LOGDIR/tests.log"; then
		sed -n '/^ *Summary \[/,$p' "$LOGDIR/tests.log" | sed 's/^/  /'
	else
		grep -E '^test result:|error(\[|:)' "$LOGDIR/tests.log" | sed 's/^/  /'
		tail -n 1 "$LOGDIR/tests.log" | sed 's/^/  /'
	fi
	echo
fi
failed=0
skipped=0
for i in "${!NAMES[@]}"; do
	printf '  %-8s %5ss  %s\n' "${RESULTS[i]}" "${TIMES[i]}" "${NAMES[i]}"
	[[ ${RESULTS[i]} != FAILED ]] || failed=$((failed + 1))
	[[ ${RESULTS[i]} != SKIPPED ]] || skipped=$((skipped + 1))
done
if ((failed)); then
	echo "FAILED: $failed step(s) failed"
	exit 1
fi
if ((skipped)); then
	echo "INCOMPLETE: all steps that ran passed, $skipped step(s) skipped for a missing prerequisite"
	exit 0
fi
echo "OK: all steps passed"
