#!/usr/bin/env bash
# Tests of the weft lab (bench/lab/lab.sh), run as root:
#   - for each mode given (default: weft vxlan direct): `lab.sh up`, ping both ways, a 3 s iperf3
#     TCP transfer with more than 0 bytes received, `lab.sh down`, then nothing left behind (no
#     namespace with the run's prefix, no process the lab started, no run dir with its etcd data,
#     no trace in the root namespace);
#   - hops.py's and cpu_profile.py's unit tests, `lab.sh hops` in weft mode (a per-hop table that
#     adds up) and `lab.sh profile` in weft mode (CPU time per 64 KiB by kind of work);
#   - the harness itself: the demo tearing itself down, SIGTERM in the middle of a demo, a daemon
#     that exits before writing subnet.env, and a missing weftd binary (fails early, creates nothing).
#
# Usage: bench/lab/test.sh [--weftd PATH] [--no-harness] [mode...]
set -euo pipefail

LAB_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
LAB="$LAB_DIR/lab.sh"

WEFTD_ARGS=()
HARNESS=1
MODES=()
while (($#)); do
	case $1 in
	--weftd)
		WEFTD_ARGS=(--weftd "${2:?--weftd needs a path}")
		shift
		;;
	--no-harness) HARNESS=0 ;;
	-h | --help)
		sed -n '2,13p' "$0"
		exit 0
		;;
	-*)
		echo "unknown option $1" >&2
		exit 2
		;;
	*) MODES+=("$1") ;;
	esac
	shift
done
((${#MODES[@]})) || MODES=(weft vxlan direct)

if [[ $EUID -ne 0 ]]; then
	echo "bench/lab/test.sh: FAIL: the lab needs root (network namespaces)" >&2
	exit 1
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/weft-labtest.XXXXXX")
export TMPDIR=$WORK
PASSED=()
FAILED=()
SERVER_PIDS=()

cleanup() {
	local pid
	for pid in "${SERVER_PIDS[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	rm -rf -- "$WORK"
}
trap cleanup EXIT

say() { printf '\033[1m[lab test]\033[0m %s\n' "$*"; }
pass() {
	say "PASS: $*"
	PASSED+=("$*")
}
fail() {
	say "FAIL: $*"
	FAILED+=("$*")
}

# What the root namespace looks like, limited to what the lab could ever add there.
root_snapshot() {
	local p=$1
	{
		ip -o link show | awk -F': ' '{print "link " $2}' | grep -F "$p" || true
		ip -4 -o addr show | grep -E ' (198\.18\.0\.|10\.1\.)' || true
		ip -4 route show | grep -E '^(198\.18\.0\.|10\.1\.)' || true
	} | sort
}

# running_starttime <pid>: the start time of a process that is running (not a zombie waiting for
# its parent to reap it).
running_starttime() {
	local stat
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	[[ ${stat%% *} != [ZX] ]] || return 1
	awk '{print $20}' <<<"$stat"
}

# assert_clean <name> <prefix> <pidlog> <root snapshot before>
assert_clean() {
	local name=$1 p=$2 pidlog=$3 before=$4 problems=()
	local left
	left=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$p-" || true)
	[[ -z $left ]] || problems+=("namespaces left: $(echo "$left" | tr '\n' ' ')")
	if [[ -f $pidlog ]]; then
		local pid st label
		while read -r pid st label; do
			[[ $st != - ]] || continue
			if [[ $(running_starttime "$pid" || true) == "$st" ]]; then
				problems+=("process left: $label (pid $pid)")
			fi
		done <"$pidlog"
	fi
	local rundir="$WORK/weft-lab.$p"
	[[ ! -e $rundir ]] || problems+=("run dir left: $rundir")
	local f
	for f in /proc/[0-9]*/cmdline; do
		if { tr '\0' ' ' <"$f"; } 2>/dev/null | grep -qF "$rundir"; then
			problems+=("process left: $({ tr '\0' ' ' <"$f"; } 2>/dev/null)")
		fi
	done
	local after
	after=$(root_snapshot "$p")
	[[ $after == "$before" ]] || problems+=("root namespace changed: $(diff <(echo "$before") <(echo "$after") | tr '\n' ' ')")
	if ((${#problems[@]})); then
		local x
		for x in "${problems[@]}"; do fail "$name: $x"; done
		return 1
	fi
	pass "$name: nothing left behind"
}

container_addr() {
	local p=$1 n=$2
	sed -n "s/^C$n=//p" "$WORK/weft-lab.$p/containers"
}

check_ping() {
	local name=$1 p=$2 from=$3 to=$4 addr out
	addr=$(container_addr "$p" "$to")
	if out=$(ip netns exec "$p-c$from" ping -c 3 -i 0.2 -W 2 "$addr" 2>&1) && grep -q ' 0% packet loss' <<<"$out"; then
		pass "$name: ping c$from -> c$to ($addr)"
	else
		echo "$out"
		fail "$name: ping c$from -> c$to ($addr)"
	fi
}

check_tcp() {
	local name=$1 p=$2 addr json
	addr=$(container_addr "$p" 2)
	ip netns exec "$p-c2" iperf3 -s -1 -B "$addr" -p 5201 >"$WORK/$p-iperf-server.log" 2>&1 </dev/null &
	local spid=$!
	SERVER_PIDS+=("$spid")
	local i
	for ((i = 0; i < 50; i++)); do
		ip netns exec "$p-c2" ss -Htln 'sport = :5201' | grep -q . && break
		sleep 0.1
	done
	json="$WORK/$p-iperf.json"
	ip netns exec "$p-c1" iperf3 -c "$addr" -p 5201 -t 3 -J >"$json" 2>&1 || true
	wait "$spid" 2>/dev/null || true
	local bytes
	bytes=$(python3 -c '
import json, sys
try:
    print(int(json.load(open(sys.argv[1]))["end"]["sum_received"]["bytes"]))
except Exception:
    print(0)' "$json")
	if ((bytes > 0)); then
		pass "$name: iperf3 TCP c1 -> c2, 3 s: $((bytes / 1000000)) MB received"
	else
		head -c 1500 "$json"
		fail "$name: iperf3 TCP c1 -> c2 received nothing"
	fi
}

test_mode() {
	local mode=$1
	local p="lt$$${mode:0:1}"
	local name="$mode lab" before pidlog="$WORK/$p.pids"
	say "--- $name (prefix $p) ---"
	before=$(root_snapshot "$p")
	local extra=()
	[[ $mode != weft ]] || extra=("${WEFTD_ARGS[@]}")
	if bash "$LAB" up --mode "$mode" --prefix "$p" --pid-log "$pidlog" "${extra[@]}" >"$WORK/$p-up.log" 2>&1; then
		pass "$name: lab.sh up"
		check_ping "$name" "$p" 1 2
		check_ping "$name" "$p" 2 1
		check_tcp "$name" "$p"
		if bash "$LAB" down "$p" >"$WORK/$p-down.log" 2>&1; then
			pass "$name: lab.sh down"
		else
			cat "$WORK/$p-down.log"
			fail "$name: lab.sh down"
		fi
	else
		tail -n 40 "$WORK/$p-up.log"
		fail "$name: lab.sh up"
	fi
	assert_clean "$name" "$p" "$pidlog" "$before" || true
}

test_demo_tears_down() {
	local p="lt$$d" name="demo (direct)" before pidlog="$WORK/lt$$d.pids"
	say "--- $name ---"
	before=$(root_snapshot "$p")
	if bash "$LAB" demo --mode direct --prefix "$p" --pid-log "$pidlog" --no-setup --no-build >"$WORK/$p.log" 2>&1 &&
		grep -q 'iperf3 c1 -> c2 (TCP, 1 stream, 5 s): [0-9.]* Gbit/s' "$WORK/$p.log"; then
		pass "$name: runs to its summary"
	else
		tail -n 40 "$WORK/$p.log"
		fail "$name: runs to its summary"
	fi
	assert_clean "$name" "$p" "$pidlog" "$before" || true
}

test_sigterm() {
	local p="lt$$s" name="SIGTERM during a demo (vxlan)" before pidlog="$WORK/lt$$s.pids"
	say "--- $name ---"
	before=$(root_snapshot "$p")
	bash "$LAB" demo --mode vxlan --prefix "$p" --pid-log "$pidlog" --no-setup --no-build >"$WORK/$p.log" 2>&1 &
	local lab_pid=$! i
	# Wait until the iperf3 server runs: the lab is fully up and busy.
	for ((i = 0; i < 300; i++)); do
		grep -q iperf3-server "$pidlog" 2>/dev/null && break
		sleep 0.05
	done
	kill -TERM "$lab_pid"
	local rc=0
	wait "$lab_pid" || rc=$?
	if ((rc == 143)) && grep -q "lab $p is down" "$WORK/$p.log"; then
		pass "$name: exits 143 after tearing down"
	else
		tail -n 20 "$WORK/$p.log"
		fail "$name: exit status $rc, expected 143 and a teardown"
	fi
	assert_clean "$name" "$p" "$pidlog" "$before" || true
}

test_daemon_dies() {
	local p="lt$$f" name="daemon exits early" before pidlog="$WORK/lt$$f.pids"
	say "--- $name ---"
	before=$(root_snapshot "$p")
	local rc=0
	bash "$LAB" up --mode weft --weftd /bin/false --prefix "$p" --pid-log "$pidlog" --timeout 10 >"$WORK/$p.log" 2>&1 || rc=$?
	if ((rc != 0)) && grep -q 'exited (status 1) before writing' "$WORK/$p.log"; then
		pass "$name: lab.sh up fails and names the cause"
	else
		tail -n 20 "$WORK/$p.log"
		fail "$name: expected a failure naming the daemon's exit (status $rc)"
	fi
	assert_clean "$name" "$p" "$pidlog" "$before" || true
}

test_missing_weftd() {
	local p="lt$$m" name="missing weftd" before pidlog="$WORK/lt$$m.pids"
	say "--- $name ---"
	before=$(root_snapshot "$p")
	local rc=0
	bash "$LAB" up --mode weft --weftd "$WORK/no-such-weftd" --prefix "$p" --pid-log "$pidlog" >"$WORK/$p.log" 2>&1 || rc=$?
	if ((rc != 0)) && grep -q 'weftd binary not found' "$WORK/$p.log" && [[ ! -s $pidlog ]]; then
		pass "$name: fails before starting anything"
	else
		cat "$WORK/$p.log"
		fail "$name: expected an early failure (status $rc)"
	fi
	assert_clean "$name" "$p" "$pidlog" "$before" || true
}

test_python_units() {
	local script name
	for script in test_hops test_cpu_profile; do
		name="${script#test_}.py"
		say "--- $name ---"
		if python3 "$LAB_DIR/$script.py" >"$WORK/$script.log" 2>&1; then
			pass "$name: unit tests"
		else
			cat "$WORK/$script.log"
			fail "$name: unit tests"
		fi
	done
}

# lab_tool <tool> <name> <tag> <json> <check> [args...]: run `lab.sh <tool> --modes weft args...`
# under a fresh prefix, then the Python program <check> on the JSON file it wrote (<check> asserts
# and prints the pass message), then check that nothing is left behind.
lab_tool() {
	local tool=$1 name=$2 tag=$3 json=$4 check=$5
	shift 5
	local p="lt$$$tag" before pidlog="$WORK/lt$$$tag.pids" out="$WORK/$tool" message=""
	say "--- $name ---"
	before=$(root_snapshot "$p")
	if bash "$LAB" "$tool" --modes weft --quiet-timeout 1 --prefix "$p" --pid-log "$pidlog" \
		--out "$out" "${WEFTD_ARGS[@]}" "$@" >"$WORK/$p.log" 2>&1 &&
		message=$(python3 -c "$check" "$out/$json" 2>&1); then
		pass "$name: $message"
	else
		tail -n 30 "$WORK/$p.log"
		echo "$message"
		fail "$name: lab.sh $tool"
	fi
	assert_clean "$name" "$p" "$pidlog" "$before" || true
}

# lab.sh hops: every ping seen at all six points, and the hops add up to the round trip (the
# legs tile it, so the means must agree to rounding).
read -r -d '' HOPS_CHECK <<'PY' || true
import json, sys
result = json.load(open(sys.argv[1]))
hops = [h for h in result["hops"] if h["us"]]
assert result["pings"] >= 38, f"only {result['pings']} of 40 round trips seen at every point"
assert len(hops) == 11, f"{len(hops)} hops, expected 11"
total = result["total_us"]["mean"]
assert 0 < total < 100_000, total
parts = sum(h["us"]["mean"] for h in hops)
assert abs(parts - total) < 0.01, (parts, total)
print(f"{result['pings']} round trips seen at every point, the hops add up")
PY

# lab.sh profile for 2 s: a table whose buckets hold the samples, weftd among the processes,
# and a transfer that moved data while sampled.
read -r -d '' PROFILE_CHECK <<'PY' || true
import json, sys
[weft] = json.load(open(sys.argv[1]))
assert weft["gbits"] > 0, weft
assert weft["processes_percent"].get("weftd", 0) > 1, weft["processes_percent"]
costs = weft["us_per_64k"]
assert costs["copies"] > 0 and sum(costs.values()) > costs["copies"], costs
print(f"{sum(costs.values()):.0f} µs of CPU per 64 KiB")
PY

start=$SECONDS
test_python_units
for mode in "${MODES[@]}"; do test_mode "$mode"; done
if ((HARNESS)); then
	test_missing_weftd
	test_daemon_dies
	test_demo_tears_down
	test_sigterm
	lab_tool hops "hops (weft)" h weft.json "$HOPS_CHECK" --pings 40 --interval 0.02
	lab_tool profile "profile (weft)" p profile.json "$PROFILE_CHECK" --duration 2
fi

say "${#PASSED[@]} passed, ${#FAILED[@]} failed ($((SECONDS - start)) s)"
if ((${#FAILED[@]})); then
	for f in "${FAILED[@]}"; do say "  failed: $f"; done
	exit 1
fi
