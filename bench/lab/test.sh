#!/usr/bin/env bash
# Tests of the weft lab (bench/lab/lab.sh), run as root:
#   - for each mode given (default: weft encrypted wireguard-go vxlan direct): `lab.sh up`, ping
#     both ways, a 3 s iperf3
#     TCP transfer with more than 0 bytes received, `lab.sh down`, then nothing left behind (no
#     namespace with the run's prefix, no process the lab started, no run dir with its etcd data,
#     no trace in the root namespace); in the encrypted mode also every host keyed to its peer,
#     nothing refused, and the WireGuard messages counted as data moved;
#   - a 3-host weft lab with 2 containers per host brought up with `up --json`: every container
#     pings every container on the other hosts, and `down PREFIX` leaves nothing behind; the
#     vxlan and direct modes with 3 hosts, pinging across;
#   - the docker lab (`up --docker --json`): a real dockerd in each of two hosts started from
#     subnet.env, docker containers pinging each other both ways through weft, docker's bridge
#     network on the lease's subnet, eth0 with MTU 1472; then torn down to nothing; and torn
#     down to nothing too after a SIGTERM during `up --docker` and when dockerd exits at once;
#   - multicast and broadcast across hosts (mcast_check.py): on a 3-host lab with 2 containers
#     per host and `--multicast --broadcast`, a TTL-1 group reaches its members on the other hosts
#     and the sender's neighbour exactly once, a host without members gets nothing on its
#     underlay, a leave stops the traffic, mDNS (224.0.0.251:5353) and broadcast reach every
#     host, UDP to the Network's broadcast address (10.1.255.255) reaches every container but
#     the sender exactly once, a storm is rate-limited and counted, iperf 2 multicast runs with its loss reported; in
#     the default 3-host lab nothing crosses and the drops are counted; a weftd without
#     --multicast gets none;
#   - hops.py's and cpu_profile.py's unit tests, `lab.sh hops` in weft mode (a per-hop table that
#     adds up) and `lab.sh profile` in weft mode (CPU time per 64 KiB by kind of work);
#   - `lab.sh bench`, one short round of weft, encrypted, vxlan and direct: request/response round trips,
#     64-byte UDP at full rate and the TUN/UDP floor in results.json and summary.md;
#   - the harness itself: the demo tearing itself down, SIGTERM in the middle of a demo, a daemon
#     that exits before writing subnet.env, and a missing weftd binary (fails early, creates nothing).
#
# Usage: bench/lab/test.sh [--weftd PATH] [--no-harness] [--only CHECK]... [mode...]
#   CHECK: modes (the per-mode labs), multi (the 3-host labs), multicast, docker, harness (the rest)
set -euo pipefail

LAB_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
LAB="$LAB_DIR/lab.sh"

WEFTD_ARGS=()
HARNESS=1
ONLY=()
MODES=()
while (($#)); do
	case $1 in
	--weftd)
		WEFTD_ARGS=(--weftd "${2:?--weftd needs a path}")
		shift
		;;
	--no-harness) HARNESS=0 ;;
	--only)
		case ${2:-} in
		modes | multi | multicast | docker | harness) ONLY+=("$2") ;;
		*)
			echo "--only takes modes, multi, multicast, docker or harness" >&2
			exit 2
			;;
		esac
		shift
		;;
	-h | --help)
		sed -n '2,/^#   CHECK:/p' "$0"
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
((${#MODES[@]})) || MODES=(weft encrypted wireguard-go vxlan direct)
# wanted <check>: the check runs (all run unless --only names some).
wanted() {
	((${#ONLY[@]} == 0)) || [[ " ${ONLY[*]} " == *" $1 "* ]]
}

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
	local mounts
	mounts=$(awk -v run="$rundir/" 'index($5, run) == 1 {print $5}' /proc/self/mountinfo)
	[[ -z $mounts ]] || problems+=("mounts left: $(echo "$mounts" | tr '\n' ' ')")
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

# check_encrypted <name> <prefix>: each weftd has its peer's key, refused nothing on the
# way, and carried the transfer.
check_encrypted() {
	local name=$1 p=$2 n text keyed refused sent
	for n in 1 2; do
		text=$(ip netns exec "$p-h$n" curl -s --max-time 3 http://127.0.0.1:8286/metrics || true)
		keyed=$(sed -n 's/^weft_encryption_peers{state="keyed"} //p' <<<"$text")
		refused=$(sed -n -E 's/^weft_drops_total\{reason="(tampered|replayed|plaintext|unknown_key|truncated)"\} //p' <<<"$text" |
			awk '{s += $1} END {print s + 0}')
		sent=$(sed -n 's/^weft_packets_total{path="udp_tx"} //p' <<<"$text")
		if [[ $keyed == 1 && $refused == 0 && ${sent:-0} -gt 100 ]]; then
			pass "$name: host $n keyed to its peer, $sent datagrams sent encrypted, none refused"
		else
			fail "$name: host $n: keyed=$keyed refused=$refused sent=$sent"
		fi
	done
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

# check_down <name> <prefix>: `lab.sh down PREFIX` succeeds.
check_down() {
	if bash "$LAB" down "$2" >"$WORK/$2-down.log" 2>&1; then
		pass "$1: lab.sh down $2"
	else
		cat "$WORK/$2-down.log"
		fail "$1: lab.sh down $2"
	fi
}

test_mode() {
	local mode=$1
	local p="lt$$${mode:0:2}"
	local name="$mode lab" before pidlog="$WORK/$p.pids"
	say "--- $name (prefix $p) ---"
	before=$(root_snapshot "$p")
	local extra=()
	[[ $mode != weft && $mode != encrypted ]] || extra=("${WEFTD_ARGS[@]}")
	if bash "$LAB" up --mode "$mode" --prefix "$p" --pid-log "$pidlog" "${extra[@]}" >"$WORK/$p-up.log" 2>&1; then
		pass "$name: lab.sh up"
		check_ping "$name" "$p" 1 2
		check_ping "$name" "$p" 2 1
		check_tcp "$name" "$p"
		[[ $mode != encrypted ]] || check_encrypted "$name" "$p"
		check_down "$name" "$p"
	else
		tail -n 40 "$WORK/$p-up.log"
		fail "$name: lab.sh up"
	fi
	assert_clean "$name" "$p" "$pidlog" "$before" || true
}

# lab_json <file>: the last line of `up --json`'s standard output, checked to be one JSON object.
lab_json() {
	tail -n 1 "$1" | python3 -c 'import json, sys; d = json.loads(sys.stdin.read()); assert isinstance(d, dict); print(json.dumps(d))'
}

# ping_matrix <json>: every container pings every container on the other hosts, with the command
# that enters the container's network namespace (ip netns exec NAME, or nsenter --net=PATH for
# docker's). Prints "from to" for each failure.
read -r -d '' PING_MATRIX <<'PY' || true
import json, subprocess, sys
lab = json.loads(open(sys.argv[1]).read())
pairs = failed = 0
for host in lab["hosts"]:
    for c in host["containers"]:
        ns = c["namespace"]
        enter = ["nsenter", "--net=" + ns] if ns.startswith("/") else ["ip", "netns", "exec", ns]
        for other in lab["hosts"]:
            if other is host:
                continue
            for d in other["containers"]:
                pairs += 1
                r = subprocess.run(enter + ["ping", "-c", "2", "-i", "0.2", "-W", "2", d["ip"]],
                                   capture_output=True, text=True)
                if r.returncode != 0 or " 0% packet loss" not in r.stdout:
                    failed += 1
                    print(f"{host['name']} {c['ip']} -> {other['name']} {d['ip']}: {r.stdout[-200:]}")
print(f"{pairs - failed} of {pairs} pairs answer")
sys.exit(1 if failed or pairs == 0 else 0)
PY

# check_multicast <name> <on|off|plain> <lab json>: mcast_check.py's checks, one pass or fail each.
check_multicast() {
	local name=$1 what=$2 json=$3 out line rc=0
	out=$(python3 "$LAB_DIR/mcast_check.py" "$what" "$json" 2>&1) || rc=$?
	while IFS= read -r line; do
		case $line in
		PASS:*) pass "$name: ${line#PASS: }" ;;
		FAIL:*) fail "$name: ${line#FAIL: }" ;;
		*) echo "$line" ;;
		esac
	done <<<"$out"
	if ((rc != 0)) && ! grep -q '^FAIL:' <<<"$out"; then
		fail "$name: mcast_check.py $what exited with status $rc"
	fi
}

# test_multi <mode> <hosts> <containers> <tag> [<mcast check> <lab flags>...]: `up --json` with
# that many hosts and containers, the JSON's shape, every container pinging every container on
# the other hosts, the multicast checks asked for, `down PREFIX`, nothing left.
test_multi() {
	local mode=$1 hosts=$2 containers=$3 tag=$4 mcast_check=${5:-}
	shift $(($# < 5 ? $# : 5))
	local lab_flags=("$@")
	local p="lt$$$tag" name="$mode lab, $hosts hosts x $containers containers${lab_flags[*]:+ ${lab_flags[*]}}"
	local pidlog="$WORK/lt$$$tag.pids" before
	say "--- $name (prefix $p) ---"
	before=$(root_snapshot "$p")
	local extra=()
	[[ $mode != weft ]] || extra=("${WEFTD_ARGS[@]}")
	if bash "$LAB" up --mode "$mode" --hosts "$hosts" --containers "$containers" --json --prefix "$p" \
		--pid-log "$pidlog" "${extra[@]}" "${lab_flags[@]}" >"$WORK/$p.json" 2>"$WORK/$p-up.log" &&
		lab_json "$WORK/$p.json" >"$WORK/$p.lab.json"; then
		pass "$name: lab.sh up --json"
		local shape
		if shape=$(python3 - "$WORK/$p.lab.json" "$p" "$mode" "$hosts" "$containers" <<'PY' 2>&1
import ipaddress, json, sys
lab = json.load(open(sys.argv[1]))
prefix, mode, hosts, containers = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
assert lab["prefix"] == prefix and lab["mode"] == mode, lab
assert len(lab["hosts"]) == hosts, len(lab["hosts"])
subnets = set()
for n, h in enumerate(lab["hosts"], 1):
    assert h["namespace"] == f"{prefix}-h{n}" and h["underlay_ip"] == f"198.18.0.{n}", h
    assert h["underlay_dev"] == f"{prefix}u{n}", h
    net = ipaddress.ip_network(h["subnet"])
    subnets.add(net)
    assert len(h["containers"]) == containers, h
    for c in h["containers"]:
        assert ipaddress.ip_address(c["ip"]) in net, (c, net)
assert len(subnets) == hosts, subnets
print(f"{hosts} hosts on distinct subnets, {containers} container(s) each inside its host's subnet")
PY
		); then
			pass "$name: JSON: $shape"
		else
			echo "$shape"
			fail "$name: JSON describes the lab"
		fi
		local out
		if out=$(python3 -c "$PING_MATRIX" "$WORK/$p.lab.json" 2>&1); then
			pass "$name: ${out##*$'\n'}"
		else
			echo "$out"
			fail "$name: every container reaches every container on the other hosts"
		fi
		[[ -z $mcast_check ]] || check_multicast "$name" "$mcast_check" "$WORK/$p.lab.json"
		check_down "$name" "$p"
	else
		tail -n 40 "$WORK/$p-up.log"
		fail "$name: lab.sh up --json"
	fi
	assert_clean "$name" "$p" "$pidlog" "$before" || true
}

# The docker lab, checked from its JSON: both ways a ping from a container to the other host's
# (docker exec, busybox's ping), docker's bridge network on subnet.env's subnet, eth0's MTU.
read -r -d '' DOCKER_CHECK <<'PY' || true
import ipaddress, json, subprocess, sys
lab = json.loads(open(sys.argv[1]).read())
docker = sys.argv[2]
problems, done = [], []
def d(host, *args):
    r = subprocess.run([docker, "-H", host["docker_host"], *args], capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr
for host in lab["hosts"]:
    env = dict(l.strip().split("=", 1) for l in open(f"{lab['run_dir']}/{host['name']}/subnet.env") if "=" in l)
    lease = ipaddress.ip_interface(env["FLANNEL_SUBNET"]).network
    rc, out = d(host, "network", "inspect", "bridge", "-f", "{{range .IPAM.Config}}{{.Subnet}}{{end}}")
    if rc or out.strip() != str(lease) or host["subnet"] != str(lease):
        problems.append(f"{host['name']}: docker bridge network {out.strip()!r}, lease {lease}, JSON {host['subnet']}")
    for c in host["containers"]:
        rc, out = d(host, "exec", c["name"], "cat", "/sys/class/net/eth0/mtu")
        if rc or out.strip() != "1472" or env["FLANNEL_MTU"] != "1472":
            problems.append(f"{c['name']}: eth0 MTU {out.strip()!r}, FLANNEL_MTU {env['FLANNEL_MTU']}")
        rc, out = d(host, "exec", c["name"], "ip", "addr", "show", "eth0")
        if rc or f"inet {c['ip']}/{lease.prefixlen} " not in out or ipaddress.ip_address(c["ip"]) not in lease:
            problems.append(f"{c['name']}: eth0 {out.strip()!r}, expected {c['ip']} in {lease}")
        for other in lab["hosts"]:
            if other is host:
                continue
            for t in other["containers"]:
                rc, out = d(host, "exec", c["name"], "ping", "-c", "3", "-W", "2", t["ip"])
                if rc or " 0% packet loss" not in out:
                    problems.append(f"ping {c['name']} -> {t['name']} {t['ip']}: {out[-200:]}")
                else:
                    done.append(f"{c['name']}->{t['name']}")
for p in problems:
    print(p)
if problems or not done:
    sys.exit(1)
print(f"pings {', '.join(done)}; bridge networks on the leases' subnets; eth0 MTU 1472")
PY

test_docker() {
	local p="lt$$k" name="docker lab" pidlog="$WORK/lt$$k.pids" before
	say "--- $name (prefix $p) ---"
	before=$(root_snapshot "$p")
	if bash "$LAB" up --docker --json --prefix "$p" --pid-log "$pidlog" --timeout 60 "${WEFTD_ARGS[@]}" \
		>"$WORK/$p.json" 2>"$WORK/$p-up.log" && lab_json "$WORK/$p.json" >"$WORK/$p.lab.json"; then
		pass "$name: lab.sh up --docker --json"
		local out
		if out=$(python3 -c "$DOCKER_CHECK" "$WORK/$p.lab.json" "${DOCKER_CLI:-docker}" 2>&1); then
			pass "$name: $out"
		else
			echo "$out"
			fail "$name: containers through weft, bridge network and MTU"
		fi
		if grep -q '^[0-9]* [0-9]* dockerd1$' "$pidlog" && grep -q '^[0-9]* [0-9]* dockerd2$' "$pidlog"; then
			pass "$name: a dockerd per host, recorded"
		else
			fail "$name: no dockerd recorded in $pidlog"
		fi
		check_down "$name" "$p"
	else
		tail -n 40 "$WORK/$p-up.log"
		fail "$name: lab.sh up --docker --json"
	fi
	assert_clean "$name" "$p" "$pidlog" "$before" || true
}

# SIGTERM while `up --docker` runs, once both dockerds have started: the lab removes what docker
# made and stops the dockerds before deleting the namespaces.
test_docker_sigterm() {
	local p="lt$$j" name="SIGTERM during up --docker" pidlog="$WORK/lt$$j.pids" before
	say "--- $name (prefix $p) ---"
	before=$(root_snapshot "$p")
	bash "$LAB" up --docker --prefix "$p" --pid-log "$pidlog" --timeout 60 "${WEFTD_ARGS[@]}" >"$WORK/$p.log" 2>&1 &
	local lab_pid=$! i
	for ((i = 0; i < 600; i++)); do
		grep -q ' dockerd2$' "$pidlog" 2>/dev/null && break
		sleep 0.05
	done
	sleep 1
	kill -TERM "$lab_pid"
	local rc=0
	wait "$lab_pid" || rc=$?
	if ((rc == 143)) && grep -q ' dockerd2$' "$pidlog" && grep -q "lab $p is down" "$WORK/$p.log"; then
		pass "$name: exits 143 after tearing down"
	else
		tail -n 20 "$WORK/$p.log"
		fail "$name: exit status $rc, expected 143 and a teardown with dockerd running"
	fi
	assert_clean "$name" "$p" "$pidlog" "$before" || true
}

# A dockerd that exits at once: up --docker fails naming it, and nothing is left.
test_dockerd_dies() {
	local p="lt$$q" name="dockerd exits early" pidlog="$WORK/lt$$q.pids" before rc=0
	say "--- $name (prefix $p) ---"
	before=$(root_snapshot "$p")
	DOCKERD_BIN=/bin/false bash "$LAB" up --docker --prefix "$p" --pid-log "$pidlog" "${WEFTD_ARGS[@]}" \
		>"$WORK/$p.log" 2>&1 || rc=$?
	if ((rc != 0)) && grep -q 'dockerd on host 1 exited' "$WORK/$p.log"; then
		pass "$name: lab.sh up --docker fails and names the cause"
	else
		tail -n 20 "$WORK/$p.log"
		fail "$name: expected a failure naming dockerd's exit (status $rc)"
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

# lab.sh bench, one short round: the request/response, small-packet and floor figures are there
# for every mode, positive and plausible, with their ratios, and summary.md shows them.
read -r -d '' BENCH_CHECK <<'PY' || true
import json, os, sys
res = json.load(open(sys.argv[1]))
summary, ratios = res["summary"], res["ratios"]
modes = ("weft", "vxlan", "direct")
def median(key, mode):
    s = summary.get(key, {}).get(mode)
    assert s is not None and s["median"] is not None, f"{key} {mode}: missing"
    return s["median"]
for mode in modes:
    for proto in ("udp", "tcp"):
        p50, p99 = median(f"rr_{proto}_p50_us", mode), median(f"rr_{proto}_p99_us", mode)
        assert 1 < p50 <= p99 < 1_000_000, (mode, proto, p50, p99)
    assert 1 < median("udp64_kpps", mode) < 100_000, mode
    assert 0 <= median("udp64_loss_pct", mode) <= 100, mode
    assert 1 < median("tcp1_us_per_64k", mode) < 1_000_000, mode
for key in ("rr_udp_p50_us", "rr_udp_p99_us", "rr_tcp_p50_us", "rr_tcp_p99_us", "udp64_kpps", "tcp1_us_per_64k"):
    for pair in ("weft/vxlan", "weft/direct"):
        assert ratios.get(key, {}).get(pair, 0) > 0, (key, pair, ratios.get(key))
copy, floor = res["copy_cost"], res["floor"]
assert 0.05 < copy["warm_us"] and 0.05 < copy["cold_us"] < 1000, copy
assert abs(floor["us_per_64k"] - floor["vxlan_us_per_64k"] - 4 * copy["cold_us"]) < 1e-6, floor
assert 0 < floor["gbit_per_cpu_s"] < 1000, floor
for pair in ("weft/floor", "weft/vxlan", "weft/direct"):
    assert floor["ratios"].get(pair, 0) > 0, floor
assert median("tcp1_gbps", "encrypted") > 0, "encrypted mode: no TCP throughput"
md = open(os.path.join(os.path.dirname(sys.argv[1]), "summary.md"), encoding="utf-8").read()
assert "encrypted/weft" in md, "summary.md lacks the encrypted/weft ratio"
for text in ("UDP request/response RTT median", "TCP request/response RTT p99", "UDP 64 B at full rate",
             "The floor of a TUN/UDP engine", "weft/floor"):
    assert text in md, f"summary.md lacks {text!r}"
print(f"weft UDP request/response {median('rr_udp_p50_us', 'weft'):.0f} µs median, "
      f"64 B UDP {median('udp64_kpps', 'weft'):.0f} kpps, {floor['ratios']['weft/floor']:.2f}× the floor")
PY

start=$SECONDS
if wanted modes; then
	for mode in "${MODES[@]}"; do test_mode "$mode"; done
fi
if wanted multi; then
	test_multi weft 3 2 w3 off
	test_multi vxlan 3 1 v3
	test_multi direct 3 1 d3
fi
if wanted multicast; then
	test_multi weft 3 2 m3 on --multicast --broadcast
	test_multi weft 2 1 m2 plain --multicast --multicast-hosts 1
fi
if wanted docker; then
	test_docker
	test_docker_sigterm
	test_dockerd_dies
fi
if wanted harness; then test_python_units; fi
if ((HARNESS)) && wanted harness; then
	test_missing_weftd
	test_daemon_dies
	test_demo_tears_down
	test_sigterm
	lab_tool hops "hops (weft)" h weft.json "$HOPS_CHECK" --pings 40 --interval 0.02
	lab_tool profile "profile (weft)" p profile.json "$PROFILE_CHECK" --duration 2
	lab_tool bench "bench (one short round)" b results.json "$BENCH_CHECK" \
		--modes weft,encrypted,vxlan,direct --rounds 1 --duration 1 --pings 20
fi

say "${#PASSED[@]} passed, ${#FAILED[@]} failed ($((SECONDS - start)) s)"
if ((${#FAILED[@]})); then
	for f in "${FAILED[@]}"; do say "  failed: $f"; done
	exit 1
fi
