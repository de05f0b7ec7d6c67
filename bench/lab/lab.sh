#!/usr/bin/env bash
# The weft lab: N "hosts" (2 by default) on one Linux machine, each a network namespace, all on
# one underlay segment (a bridge in a namespace of its own); etcd in host 1; an overlay (weftd,
# flanneld, kernel VXLAN or direct routing) in each host; and on each host K "container"
# namespaces (1 by default) behind a bridge, set up the way docker sets up its bridge from
# flannel's subnet.env.
#
# Every address, route, link and process lives in namespaces named <prefix>-ul (the underlay),
# <prefix>-hN (hosts) and <prefix>-cN[-J] (containers). Nothing is added to the root namespace.
# See docs/lab.md.
#
# Usage: bench/lab/lab.sh <demo|up|down|list|bench|help> [options]   (lab.sh help for details)
set -euo pipefail

LAB_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$LAB_DIR/../.." && pwd)
REPORT_PY="$LAB_DIR/report.py"
HOPS_PY="$LAB_DIR/hops.py"
PROFILE_PY="$LAB_DIR/cpu_profile.py"
MCAST_PY="$LAB_DIR/mcast.py"

# The lab's fixed addressing.
readonly NETWORK=10.1.0.0/16
readonly NETWORK_CONFIG='{"Network":"10.1.0.0/16","Backend":{"Type":"udp"}}'
# The encrypted mode's config: weft's WireGuard encryption between hosts.
readonly NETWORK_CONFIG_ENCRYPTED='{"Network":"10.1.0.0/16","Backend":{"Type":"udp","Encryption":"wireguard"}}'
# wireguard-go's MTU (wg-quick's default over a 1500-byte underlay) and listen port.
readonly WG_MTU=1420
readonly WG_PORT=51820
readonly ETCD_PREFIX=/coreos.com/network
readonly UNDERLAY=198.18.0 # host N is 198.18.0.N/24
readonly UNDERLAY_MTU=1500
readonly ETCD_URL="http://${UNDERLAY}.1:2379"
readonly HEALTHZ_PORT=8286
readonly VXLAN_MTU=1450
readonly IPERF_PORT=5201

# Options (see usage).
MODE=weft
HOSTS=2
CONTAINERS=1
JSON=0
DOCKER=0
DOCKERD_BIN=${DOCKERD_BIN:-dockerd}
DOCKER_CLI=${DOCKER_CLI:-docker}
readonly DOCKER_IMAGE=weft-lab/busybox:1
# Binaries copied with their libraries into the docker image besides busybox (iperf3 required).
readonly IMAGE_TOOLS=(iperf3 iperf socat)
MK_DOCKER_OPTS="$REPO_ROOT/deploy/docker/mk-docker-opts.sh"
PREFIX=""
KEEP=0
TIMEOUT=30
WORKERS=""
IO_MODE=""
DAEMON_EXTRA=()
MULTICAST=0
BROADCAST=0
# Hosts whose weftd gets --multicast/--broadcast (comma-separated; empty: every host).
MCAST_HOSTS=""
WEFTD_BIN=${WEFTD_BIN:-$REPO_ROOT/target/release/weftd}
ETCD_BIN=${ETCD_BIN:-/usr/bin/etcd}
ETCDCTL_BIN=${ETCDCTL_BIN:-etcdctl}
DO_SETUP=1
DO_BUILD=1
PID_LOG=""
BENCH_MODES=""
ROUNDS=3
DURATION=10
PINGS=200
STREAMS=1
INTERVAL=0.01
UDP_RATE=1G
UDP_LEN=1400
OUT_DIR=""
QUIET_LOAD=0.25
QUIET_TIMEOUT=120
POSITIONAL=()

# State of the lab this process manages (one at a time).
LAB_ACTIVE=0
LAB_SEQ=0
P=""
RUN=""
LAB_MODE=""
LAST_PID=""
C_ADDR=()            # host n's first container
SUBNET=()            # host n's subnet, network/len
declare -A C_IPS=()  # "n.j" -> container j of host n
declare -A C_NETNS=() # "n.j" -> a docker container's network namespace (its sandbox key)
DAEMON_PIDS=()

usage() {
	cat <<'EOF'
weft lab: hosts and containers in network namespaces on one machine.

  lab.sh demo  [--mode M] [--hosts N] [--containers K] [--keep] [--no-setup] [--no-build]
        Set up the machine (scripts/setup.sh), build weftd, bring the lab up, show the etcd keys,
        each host's subnet.env and each container's addresses, ping between the hosts' first
        containers both ways, run iperf3 c1 -> c2 for 5 s, and tear down (or leave the lab up
        with --keep).
  lab.sh up    [--mode M] [--hosts N] [--containers K] [--prefix P] [--json]
        Bring the lab up and leave it running; prints how to enter it and how to tear it down.
        With --json the last line of standard output is one JSON object describing the lab
        (everything else goes to standard error).
  lab.sh demo --docker ...   and   lab.sh up --docker ...
        The same with a real dockerd in every host, started from the host's subnet.env through
        deploy/docker/mk-docker-opts.sh as the docker drop-in does, and docker containers
        (an image of busybox and iperf3 built on the machine) in place of the plain namespaces.
        Needs a daemon mode (weft, flannel); the daemons run with --ip-masq, as flannel's docs
        advise for docker hosts.
  lab.sh down  <prefix>
        Tear down a lab left up by `up` or `demo --keep`.
  lab.sh list
        List labs left up.
  lab.sh bench [--modes weft,encrypted,wireguard-go,vxlan,direct] [--rounds 3] [--duration 10] [--pings 200]
               [--udp-rate 1G] [--out DIR] [--quiet-load 0.25] [--quiet-timeout 120]
        Measure ping RTT, iperf3 TCP (1 and 4 streams) and UDP, 64-byte UDP at full rate,
        sockperf request/response round trips (UDP and TCP), and CPU seconds, for each mode,
        modes interleaved over several rounds; and once, the cost of a 64 KiB memcpy (the floor
        of a TUN/UDP engine). Writes results.json, summary.md and chart.svg to
        bench/lab/results/<timestamp>/ (or --out).
  lab.sh hops  [--modes weft,vxlan,direct] [--pings 200] [--interval 0.01] [--out DIR]
        Split the ping round trip into hops: capture the pings (tcpdump, nanosecond
        timestamps) in each container, on each host's overlay device and on each host's
        underlay link, and print the median time of every hop, for each mode in turn.
  lab.sh profile [--modes weft,vxlan] [--duration 10] [--streams 1] [--out DIR]
        Sample the whole machine with `perf record -a -g` for --duration seconds in the middle
        of a TCP transfer (--streams parallel streams, default one), for each mode in turn, and
        print the CPU time per 64 KiB moved by kind of work (copies, network stack, user space,
        system calls, ...).

Modes (--mode):
  weft     weftd in each host (target/release/weftd, or --weftd PATH / $WEFTD_BIN), etcd in host 1
  encrypted  weftd as in weft, with encryption between hosts ("Encryption":"wireguard" in the
           network config; each host's key in <run dir>/hN/private.key)
  wireguard-go  Debian's wireguard-go in each host (interface <P>wgN, MTU 1420, port 51820),
           keys and peers set with wg; fixed subnets as vxlan
  flannel  flanneld ($FLANNELD_BIN) in each host, started exactly like weftd
  vxlan    kernel VXLAN set up as flannel's vxlan backend does (flannel.1, VNI 1, port 8472)
  direct   direct routing via the peer's underlay address (flannel's host-gw)

Options for the daemon modes:
  --workers N            pass --workers N to weftd
  --io uring|syscalls    pass --io to weftd
  --weftd-arg ARG        pass ARG to weftd (repeatable)
  --multicast            pass --multicast --multicast-bridge cbr0 to weftd (multicast across hosts;
                         demo: a group joined in the other hosts' containers, sent to from c1)
  --broadcast            pass --broadcast --multicast-bridge cbr0 to weftd (UDP broadcast across hosts)
  --multicast-hosts L    only these hosts (e.g. 1,2) get --multicast/--broadcast (default: all)
  --timeout S            seconds to wait for etcd, subnet.env and healthz (default 30)
Shape of the lab (demo, up; bench, hops and profile use hosts 1 and 2):
  --hosts N              hosts on the underlay segment, 2 to 16 (default 2)
  --containers K         containers per host, 1 to 16 (default 1)
Other:
  --pid-log FILE         append "pid starttime label" of every process the lab starts to FILE
EOF
}

indent() { sed 's/^/  /'; }
log() { printf '\033[1m[lab]\033[0m %s\n' "$*" >&2; }
warn() { printf '[lab] warning: %s\n' "$*" >&2; }
die() {
	printf '[lab] error: %s\n' "$*" >&2
	exit 1
}

# ---------------------------------------------------------------------------------------------
# Names

# Host n's namespace; container j of host n (j = 1 unless given) and its veth ends: the first
# container keeps the short names (<P>-c<n>, <P>c<n>, <P>b<n>), the others add "-<j>".
ns_h() { printf '%s-h%s' "$P" "$1"; }
ns_c() { printf '%s-c%s%s' "$P" "$1" "$(c_suffix "${2:-1}")"; }
ns_underlay() { printf '%s-ul' "$P"; }
c_suffix() { if [[ $1 != 1 ]]; then printf -- '-%s' "$1"; fi; }
link_underlay() { printf '%su%s' "$P" "$1"; }
link_underlay_port() { printf '%sp%s' "$P" "$1"; }
link_underlay_bridge() { printf '%sul' "$P"; }
link_bridge_port() { printf '%sb%s%s' "$P" "$1" "$(c_suffix "${2:-1}")"; }
link_container() { printf '%sc%s%s' "$P" "$1" "$(c_suffix "${2:-1}")"; }
# The lab's namespaces are exactly these names (used by teardown and `down`).
lab_ns_regex() { printf '^%s-(ul|h[0-9]+|c[0-9]+(-[0-9]+)?)$' "$P"; }

# check_shape: the interface names of N hosts and K containers fit in 15 characters.
check_shape() {
	local longest
	longest=$(link_bridge_port "$HOSTS" "$CONTAINERS")
	((${#longest} <= 15)) || die "interface name '$longest' is longer than 15 characters: use a shorter --prefix (or fewer hosts/containers)"
}

rundir_for() { printf '%s/weft-lab.%s' "${TMPDIR:-/tmp}" "$1"; }

valid_prefix() { [[ $1 =~ ^[a-z][a-z0-9]{1,11}$ ]]; }

ns_exists() { [[ -e /run/netns/$1 ]]; }

# ---------------------------------------------------------------------------------------------
# IPv4 arithmetic

ip_to_int() {
	local a b c d
	IFS=. read -r a b c d <<<"$1"
	echo $(((a << 24) | (b << 16) | (c << 8) | d))
}

int_to_ip() {
	local n=$1
	echo "$(((n >> 24) & 255)).$(((n >> 16) & 255)).$(((n >> 8) & 255)).$((n & 255))"
}

# network_plus <addr/len> <k>: the k-th address of the subnet holding addr.
network_plus() {
	local addr=${1%/*} len=${1#*/} k=$2
	local mask=$(((0xffffffff << (32 - len)) & 0xffffffff))
	int_to_ip $((($(ip_to_int "$addr") & mask) + k))
}

# ---------------------------------------------------------------------------------------------
# Processes: every process the lab starts is recorded as "pid starttime label", and only those
# are ever signalled (the start time guards against a recycled pid).

proc_starttime() {
	local stat
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	# Fields after "comm": state is field 3 of stat, starttime field 22.
	awk '{print $20}' <<<"$stat"
}

proc_state() {
	local stat
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	echo "${stat%% *}"
}

# proc_is <pid> <starttime>: the recorded process is still running.
proc_is() {
	local st state
	st=$(proc_starttime "$1") || return 1
	[[ $st == "$2" ]] || return 1
	state=$(proc_state "$1") || return 1
	[[ $state != Z && $state != X ]]
}

# start_bg <label> <namespace> <logfile> <command...>: start a process inside a namespace.
# `ip netns exec` execs the command, so the pid is the command's own. Sets LAST_PID. The
# process gets none of the script's own descriptors (with --json, fd 3 is the caller's standard
# output, which a process left running by `up` would otherwise hold open, so that a reader such
# as `lab.sh up --json | tail -1` never saw its end).
start_bg() {
	local label=$1 ns=$2 logf=$3
	shift 3
	ip netns exec "$ns" "$@" >"$logf" 2>&1 </dev/null 3>&- &
	record_pid "$!" "$label"
}

# start_bg_nsenter <label> <namespace> <logfile> <command...>: the same through nsenter, which
# enters only the network namespace (ip netns exec also remounts /sys, hiding the cgroup mounts
# that dockerd needs). nsenter execs the command, so the pid is the command's own.
start_bg_nsenter() {
	local label=$1 ns=$2 logf=$3
	shift 3
	nsenter --net="/run/netns/$ns" "$@" >"$logf" 2>&1 </dev/null 3>&- &
	record_pid "$!" "$label"
}

record_pid() {
	local pid=$1 label=$2 st
	st=$(proc_starttime "$pid") || st=-
	echo "$pid $st $label" >>"$RUN/pids"
	if [[ -n $PID_LOG ]]; then echo "$pid $st $label" >>"$PID_LOG"; fi
	LAST_PID=$pid
}

# stop_recorded: stop the recorded processes, last started first: SIGTERM, then SIGKILL after 5 s.
stop_recorded() {
	[[ -f $RUN/pids ]] || return 0
	local lines=() line pid st label i
	mapfile -t lines < <(tac "$RUN/pids")
	for line in "${lines[@]}"; do
		read -r pid st label <<<"$line"
		[[ $st != - ]] || continue
		proc_is "$pid" "$st" || {
			wait "$pid" 2>/dev/null || true
			continue
		}
		stop_pid "$pid" "$st" "$label" 5
	done
}

# stop_pid <pid> <starttime> <label> <seconds>: SIGTERM, then SIGKILL after <seconds>.
stop_pid() {
	local pid=$1 st=$2 label=$3 grace=$4 i
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < grace * 10; i++)); do
		proc_is "$pid" "$st" || break
		sleep 0.1
	done
	if proc_is "$pid" "$st"; then
		warn "$label (pid $pid) ignored SIGTERM for $grace s; sending SIGKILL"
		kill -KILL "$pid" 2>/dev/null || true
		for ((i = 0; i < 50; i++)); do
			proc_is "$pid" "$st" || break
			sleep 0.1
		done
	fi
	wait "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------------
# Bring-up

require_root() {
	[[ $EUID -eq 0 ]] || die "the lab creates network namespaces and needs root: run it as root (e.g. sudo -E bash $0 ...)"
}

require_cmd() {
	command -v "$1" >/dev/null 2>&1 || die "'$1' not found (${2:-install it}); scripts/setup.sh installs the lab's packages"
}

daemon_bin() {
	case $1 in
	weft | encrypted) echo "$WEFTD_BIN" ;;
	flannel) echo "${FLANNELD_BIN:-}" ;;
	esac
}

# preflight <mode>: check everything the mode needs before creating anything.
preflight() {
	local mode=$1
	require_root
	require_cmd ip "Debian package iproute2"
	require_cmd bridge "Debian package iproute2"
	require_cmd ping "Debian package iputils-ping"
	require_cmd iperf3 "Debian package iperf3"
	require_cmd python3 "Debian package python3"
	require_cmd awk
	require_cmd tac
	case $mode in
	weft | flannel | encrypted)
		local bin
		bin=$(daemon_bin "$mode")
		if [[ $mode == flannel && -z $bin ]]; then
			die "mode flannel needs FLANNELD_BIN=/path/to/flanneld"
		fi
		if [[ ! -x $bin ]]; then
			if [[ $mode != flannel ]]; then
				die "weftd binary not found at $bin: build it with 'cargo build --release -p weft-control' (or point --weftd / WEFTD_BIN at one)"
			fi
			die "flanneld binary not found or not executable at $bin"
		fi
		[[ -x $ETCD_BIN ]] || die "etcd not found at $ETCD_BIN (Debian package etcd-server, or set ETCD_BIN)"
		require_cmd "$ETCDCTL_BIN" "Debian package etcd-client"
		[[ -c /dev/net/tun ]] || die "/dev/net/tun is missing: the overlay daemon needs the tun module"
		;;
	vxlan | direct) ;;
	wireguard-go)
		require_cmd wireguard-go "Debian package wireguard-go"
		require_cmd wg "Debian package wireguard-tools"
		[[ -c /dev/net/tun ]] || die "/dev/net/tun is missing: wireguard-go needs the tun module"
		;;
	*) die "unknown mode '$mode' (weft, encrypted, flannel, vxlan, direct, wireguard-go)" ;;
	esac
	if ((DOCKER)); then
		is_daemon_mode "$mode" || die "--docker needs a daemon mode (weft, encrypted or flannel), not $mode"
		require_cmd "$DOCKERD_BIN" "Debian package docker.io"
		require_cmd "$DOCKER_CLI" "Debian package docker.io"
		require_cmd containerd "Debian package containerd"
		require_cmd runc "Debian package runc"
		require_cmd nsenter "Debian package util-linux"
		require_cmd tar
		require_cmd ldd "Debian package libc-bin"
		require_cmd iptables "Debian package iptables"
		if [[ ! -x /bin/busybox ]] || ldd /bin/busybox >/dev/null 2>&1; then
			die "a static /bin/busybox is needed for the docker image (Debian package busybox-static)"
		fi
		[[ -f $MK_DOCKER_OPTS ]] || die "$MK_DOCKER_OPTS is missing"
		if [[ -e /run/containerd/containerd.sock ]]; then
			warn "/run/containerd/containerd.sock exists: dockerd uses that containerd instead of starting its own"
		fi
	fi
}

# is_weft_mode <mode>: weftd runs in the hosts (plain or encrypted).
is_weft_mode() { [[ $1 == weft || $1 == encrypted ]]; }
# is_daemon_mode <mode>: a daemon with etcd leases runs in the hosts.
is_daemon_mode() { is_weft_mode "$1" || [[ $1 == flannel ]]; }

nsx() {
	local ns=$1
	shift
	ip netns exec "$ns" "$@"
}

# new_ns <name>: a namespace with loopback up and IPv6 off (the lab is IPv4 only; this keeps
# router solicitations and MLD reports out of the measurements).
new_ns() {
	ns_exists "$1" && die "namespace $1 already exists"
	ip netns add "$1"
	ip -n "$1" link set lo up
	nsx "$1" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 2>/dev/null || true
}

# make_hosts: the underlay segment (a bridge in namespace <P>-ul, like a switch: no address, no
# multicast snooping, so that it floods multicast as a plain segment does) and the hosts, each
# joined to it by a veth pair created inside <P>-ul with its other end placed straight into the
# host.
make_hosts() {
	local n ul br
	ul=$(ns_underlay)
	br=$(link_underlay_bridge)
	new_ns "$ul"
	ip -n "$ul" link add "$br" mtu "$UNDERLAY_MTU" type bridge mcast_snooping 0
	ip -n "$ul" link set "$br" up
	for ((n = 1; n <= HOSTS; n++)); do
		new_ns "$(ns_h "$n")"
		nsx "$(ns_h "$n")" sysctl -qw net.ipv4.ip_forward=1
		ip -n "$ul" link add "$(link_underlay_port "$n")" mtu "$UNDERLAY_MTU" type veth \
			peer name "$(link_underlay "$n")" mtu "$UNDERLAY_MTU" netns "$(ns_h "$n")"
		ip -n "$ul" link set "$(link_underlay_port "$n")" master "$br" up
		ip -n "$(ns_h "$n")" addr add "$UNDERLAY.$n/24" dev "$(link_underlay "$n")"
		ip -n "$(ns_h "$n")" link set "$(link_underlay "$n")" up
	done
}

etcdctl_h1() {
	nsx "$(ns_h 1)" env ETCDCTL_API=3 "$ETCDCTL_BIN" --endpoints "$ETCD_URL" --dial-timeout 2s "$@"
}

start_etcd() {
	mkdir -p "$RUN/etcd"
	start_bg etcd "$(ns_h 1)" "$RUN/etcd.log" "$ETCD_BIN" --name weft-lab --data-dir "$RUN/etcd/data" \
		--listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
		--listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
		--initial-cluster weft-lab=http://127.0.0.1:2380
	local pid=$LAST_PID i
	for ((i = 0; i < TIMEOUT * 5; i++)); do
		if etcdctl_h1 endpoint health >/dev/null 2>&1; then
			log "etcd is up on $ETCD_URL (host 1)"
			local config=$NETWORK_CONFIG
			[[ $LAB_MODE != encrypted ]] || config=$NETWORK_CONFIG_ENCRYPTED
			etcdctl_h1 put "$ETCD_PREFIX/config" "$config" >/dev/null
			return 0
		fi
		[[ -e /proc/$pid ]] || break
		sleep 0.2
	done
	tail -n 20 "$RUN/etcd.log" >&2 || true
	die "etcd did not become healthy within ${TIMEOUT}s (log above)"
}

start_daemon() {
	local n=$1 mode=$2 bin
	bin=$(daemon_bin "$mode")
	mkdir -p "$RUN/h$n"
	local args=(--etcd-endpoints "$ETCD_URL" --iface "$(link_underlay "$n")" --public-ip "$UNDERLAY.$n"
		--subnet-file "$RUN/h$n/subnet.env" --healthz-port "$HEALTHZ_PORT")
	# Docker hosts: the daemon masquerades what leaves the overlay, so that docker does not
	# (mk-docker-opts.sh turns FLANNEL_IPMASQ=true into --ip-masq=false), as flannel's docs advise.
	((DOCKER == 0)) || args+=(--ip-masq)
	if is_weft_mode "$mode"; then
		[[ $mode != encrypted ]] || args+=(--encryption-key-file "$RUN/h$n/private.key")
		[[ -z $WORKERS ]] || args+=(--workers "$WORKERS")
		[[ -z $IO_MODE ]] || args+=(--io "$IO_MODE")
		if mcast_host "$n" && ((MULTICAST || BROADCAST)); then
			# The lab's container bridge is cbr0 (docker's would be docker0, the default).
			args+=(--multicast-bridge cbr0)
			((MULTICAST == 0)) || args+=(--multicast)
			((BROADCAST == 0)) || args+=(--broadcast)
		fi
		args+=("${DAEMON_EXTRA[@]}")
	fi
	printf '%q ' "$bin" "${args[@]}" >"$RUN/h$n/cmdline"
	# The daemon sees only the lab's flags: no FLANNELD_* settings and no systemd notify socket
	# from the caller's environment.
	local unset=(-u NOTIFY_SOCKET) var
	for var in $(compgen -e); do
		[[ $var != FLANNELD_* ]] || unset+=(-u "$var")
	done
	start_bg "daemon$n" "$(ns_h "$n")" "$RUN/h$n/daemon.log" env "${unset[@]}" "$bin" "${args[@]}"
	DAEMON_PIDS+=("$LAST_PID")
}

# wait_daemon <n> <pid>: wait for the daemon's subnet.env, then for its healthz to answer 200.
wait_daemon() {
	local n=$1 pid=$2 name i
	name=$(basename "$(daemon_bin "$LAB_MODE")")
	for ((i = 0; i < TIMEOUT * 10; i++)); do
		[[ -s $RUN/h$n/subnet.env ]] && break
		if ! [[ -e /proc/$pid ]] || [[ $(proc_state "$pid") == Z ]]; then
			local rc=0
			wait "$pid" 2>/dev/null || rc=$?
			echo "--- $name log (host $n) ---" >&2
			tail -n 30 "$RUN/h$n/daemon.log" >&2 || true
			die "$name on host $n exited (status $rc) before writing $RUN/h$n/subnet.env"
		fi
		sleep 0.1
	done
	if [[ ! -s $RUN/h$n/subnet.env ]]; then
		echo "--- $name log (host $n) ---" >&2
		tail -n 30 "$RUN/h$n/daemon.log" >&2 || true
		die "$name on host $n wrote no subnet.env within ${TIMEOUT}s"
	fi
	local url="http://127.0.0.1:$HEALTHZ_PORT/healthz"
	for ((i = 0; i < TIMEOUT * 5; i++)); do
		if nsx "$(ns_h "$n")" python3 -c '
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=1).status == 200 else 1)
except Exception:
    sys.exit(1)' "$url"; then
			log "host $n: $name wrote subnet.env and answers $url with 200"
			return 0
		fi
		sleep 0.2
	done
	die "$name on host $n does not answer GET $url with 200 (--healthz-port $HEALTHZ_PORT)"
}

# Kernel modes write the subnet.env a flanneld would have written for fixed subnets 10.1.N.0/24.
write_static_env() {
	local n=$1 mtu=$2
	mkdir -p "$RUN/h$n"
	cat >"$RUN/h$n/subnet.env" <<EOF
FLANNEL_NETWORK=$NETWORK
FLANNEL_SUBNET=10.1.$n.1/24
FLANNEL_MTU=$mtu
FLANNEL_IPMASQ=false
EOF
}

# flannel's vxlan backend: device flannel.1 (VNI 1, port 8472, no learning) holding X.0/32, and for
# each peer a route "via peerX.0 onlink", a permanent ARP entry and an FDB entry. Besides, one
# all-zeros FDB entry per peer (kernel VXLAN's head-end replication), so that broadcast and
# multicast sent on flannel.1 reach every peer; unicast is unaffected.
setup_vxlan() {
	local n m mac=()
	for ((n = 1; n <= HOSTS; n++)); do
		write_static_env "$n" "$VXLAN_MTU"
		ip -n "$(ns_h "$n")" link add flannel.1 type vxlan id 1 local "$UNDERLAY.$n" \
			dev "$(link_underlay "$n")" dstport 8472 nolearning
		ip -n "$(ns_h "$n")" link set flannel.1 mtu "$VXLAN_MTU"
		ip -n "$(ns_h "$n")" addr add "10.1.$n.0/32" dev flannel.1
		ip -n "$(ns_h "$n")" link set flannel.1 up
		mac[n]=$(nsx "$(ns_h "$n")" cat /sys/class/net/flannel.1/address)
	done
	for ((n = 1; n <= HOSTS; n++)); do
		for ((m = 1; m <= HOSTS; m++)); do
			((m != n)) || continue
			ip -n "$(ns_h "$n")" neigh replace "10.1.$m.0" lladdr "${mac[m]}" dev flannel.1 nud permanent
			bridge -n "$(ns_h "$n")" fdb append "${mac[m]}" dev flannel.1 dst "$UNDERLAY.$m" self permanent
			bridge -n "$(ns_h "$n")" fdb append 00:00:00:00:00:00 dev flannel.1 dst "$UNDERLAY.$m" self permanent
			ip -n "$(ns_h "$n")" route add "10.1.$m.0/24" via "10.1.$m.0" dev flannel.1 onlink
		done
	done
}

# flannel's host-gw backend: the peer's subnet via the peer's underlay address.
setup_direct() {
	local n m
	for ((n = 1; n <= HOSTS; n++)); do
		write_static_env "$n" "$UNDERLAY_MTU"
		for ((m = 1; m <= HOSTS; m++)); do
			((m != n)) || continue
			ip -n "$(ns_h "$n")" route add "10.1.$m.0/24" via "$UNDERLAY.$m" dev "$(link_underlay "$n")"
		done
	done
}

# Debian's wireguard-go (userspace WireGuard, no offloads) in each host: interface <P>wgN (the
# name is unique per lab: wireguard-go's control socket /run/wireguard/<name>.sock is shared by all
# namespaces), address 10.1.N.0/32, MTU 1420, a key pair made with wg, every peer at its underlay
# address with its subnet as allowed IPs, and a route to each peer's subnet through it. It runs
# in the foreground (-f) so that its PID is the one the lab stops.
setup_wireguard_go() {
	local n m dev pub=()
	for ((n = 1; n <= HOSTS; n++)); do
		mkdir -p "$RUN/h$n"
		(umask 077 && wg genkey >"$RUN/h$n/wg.key")
		pub[n]=$(wg pubkey <"$RUN/h$n/wg.key")
	done
	for ((n = 1; n <= HOSTS; n++)); do
		dev="${P}wg$n"
		write_static_env "$n" "$WG_MTU"
		start_bg "wireguard-go$n" "$(ns_h "$n")" "$RUN/h$n/daemon.log" \
			env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go -f "$dev"
		DAEMON_PIDS+=("$LAST_PID")
		local i
		for ((i = 0; i < TIMEOUT * 10; i++)); do
			ip -n "$(ns_h "$n")" link show "$dev" >/dev/null 2>&1 && [[ -S /run/wireguard/$dev.sock ]] && break
			[[ -e /proc/$LAST_PID ]] || break
			sleep 0.1
		done
		ip -n "$(ns_h "$n")" link show "$dev" >/dev/null 2>&1 ||
			die "wireguard-go on host $n did not create $dev (log: $RUN/h$n/daemon.log)"
		nsx "$(ns_h "$n")" wg set "$dev" private-key "$RUN/h$n/wg.key" listen-port "$WG_PORT"
		for ((m = 1; m <= HOSTS; m++)); do
			((m != n)) || continue
			nsx "$(ns_h "$n")" wg set "$dev" peer "${pub[m]}" endpoint "$UNDERLAY.$m:$WG_PORT" \
				allowed-ips "10.1.$m.0/24"
		done
		ip -n "$(ns_h "$n")" link set "$dev" mtu "$WG_MTU"
		ip -n "$(ns_h "$n")" addr add "10.1.$n.0/32" dev "$dev"
		ip -n "$(ns_h "$n")" link set "$dev" up
		for ((m = 1; m <= HOSTS; m++)); do
			((m != n)) || continue
			ip -n "$(ns_h "$n")" route add "10.1.$m.0/24" dev "$dev"
		done
	done
}

# env_get <file> <KEY>: one value from a subnet.env, read as data (never sourced).
env_get() {
	local line
	while IFS= read -r line || [[ -n $line ]]; do
		if [[ $line == "$2="* ]]; then
			echo "${line#*=}"
			return 0
		fi
	done <"$1"
	return 1
}

# host_subnet <n>: read host n's subnet.env (FLANNEL_SUBNET, FLANNEL_MTU) into H_SUB (the
# bridge's address/len), H_MTU and SUBNET[n] (network/len).
H_SUB=""
H_MTU=""
host_subnet() {
	local n=$1 env=$RUN/h$1/subnet.env
	H_SUB=$(env_get "$env" FLANNEL_SUBNET) || die "$env has no FLANNEL_SUBNET"
	H_MTU=$(env_get "$env" FLANNEL_MTU) || die "$env has no FLANNEL_MTU"
	[[ $H_SUB =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+/[0-9]+$ ]] || die "$env: bad FLANNEL_SUBNET '$H_SUB'"
	[[ $H_MTU =~ ^[0-9]+$ ]] || die "$env: bad FLANNEL_MTU '$H_MTU'"
	SUBNET[n]="$(network_plus "$H_SUB" 0)/${H_SUB#*/}"
}

# make_containers <n>: what docker does with subnet.env: bridge cbr0 holding FLANNEL_SUBNET with
# MTU FLANNEL_MTU, and the host's containers on it at the subnet's .2, .3, ... with their
# default route via the bridge.
make_containers() {
	local n=$1 h j
	h=$(ns_h "$n")
	host_subnet "$n"
	local len=${H_SUB#*/} gw=${H_SUB%/*}
	ip -n "$h" link add cbr0 type bridge
	ip -n "$h" link set cbr0 mtu "$H_MTU"
	ip -n "$h" addr add "$H_SUB" dev cbr0
	ip -n "$h" link set cbr0 up
	for ((j = 1; j <= CONTAINERS; j++)); do
		local c addr
		c=$(ns_c "$n" "$j")
		addr=$(network_plus "$H_SUB" $((j + 1)))
		new_ns "$c"
		ip -n "$h" link add "$(link_bridge_port "$n" "$j")" mtu "$H_MTU" type veth \
			peer name "$(link_container "$n" "$j")" mtu "$H_MTU" netns "$c"
		ip -n "$h" link set "$(link_bridge_port "$n" "$j")" master cbr0 up
		ip -n "$c" addr add "$addr/$len" dev "$(link_container "$n" "$j")"
		ip -n "$c" link set "$(link_container "$n" "$j")" up
		ip -n "$c" route add default via "$gw"
		C_IPS[$n.$j]=$addr
	done
	C_ADDR[n]=${C_IPS[$n.1]}
}

# wait_overlay: wait until the first container of every host reaches the first container of
# every other host (a daemon learns its peers' leases from etcd some time after writing its own
# subnet.env).
wait_overlay() {
	local start=$SECONDS n m todo=()
	for ((n = 1; n <= HOSTS; n++)); do
		for ((m = 1; m <= HOSTS; m++)); do ((m == n)) || todo+=("$n:$m"); done
	done
	while ((SECONDS - start < TIMEOUT)); do
		local left=() pair
		for pair in "${todo[@]}"; do
			n=${pair%:*} m=${pair#*:}
			c_exec "$n" 1 ping -c 1 -W 1 "${C_ADDR[m]}" >/dev/null 2>&1 || left+=("$pair")
		done
		todo=("${left[@]}")
		if ((${#todo[@]} == 0)); then
			if ((HOSTS == 2)); then
				log "up: c1 and c2 reach each other (after $((SECONDS - start))s)"
			else
				log "up: the containers of all $HOSTS hosts reach each other (after $((SECONDS - start))s)"
			fi
			return 0
		fi
		sleep 0.2
	done
	for pair in "${todo[@]}"; do
		n=${pair%:*} m=${pair#*:}
		warn "c$n (${C_ADDR[n]}) cannot reach c$m (${C_ADDR[m]})"
	done
	die "the overlay did not connect the containers within ${TIMEOUT}s"
}

# c_exec <n> <j> <command...>: run a command in container j of host n (in a docker container,
# one of the image's).
c_exec() {
	local n=$1 j=$2
	shift 2
	if ((DOCKER)); then
		docker_h "$n" exec "c$n$(c_suffix "$j")" "$@"
	else
		nsx "$(ns_c "$n" "$j")" "$@"
	fi
}

# c_netns_exec <n> <j> <command...>: run one of the machine's commands in the network namespace
# of container j of host n.
c_netns_exec() {
	local n=$1 j=$2
	shift 2
	if ((DOCKER)); then
		nsenter --net="${C_NETNS[$n.$j]}" "$@"
	else
		nsx "$(ns_c "$n" "$j")" "$@"
	fi
}

# ---------------------------------------------------------------------------------------------
# Docker hosts

docker_dir() { printf '%s/h%s/docker' "$RUN" "$1"; }
docker_sock() { printf 'unix://%s/docker.sock' "$(docker_dir "$1")"; }

# docker_h <n> <docker arguments...>: the docker client, talking to host n's dockerd.
docker_h() {
	local n=$1
	shift
	"$DOCKER_CLI" -H "$(docker_sock "$n")" "$@"
}

# build_image: a root filesystem of busybox (static, with its applet links) and the IMAGE_TOOLS
# with their libraries, packed with tar (no registry is needed: each dockerd imports the tar).
build_image() {
	local root=$RUN/image/rootfs applet tool path lib
	mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp}
	chmod 1777 "$root/tmp"
	cp /bin/busybox "$root/bin/busybox"
	while read -r applet; do
		[[ -e $root/$applet || -L $root/$applet ]] || ln -s /bin/busybox "$root/$applet"
	done < <(/bin/busybox --list-full)
	echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
	echo 'root:x:0:' >"$root/etc/group"
	for tool in "${IMAGE_TOOLS[@]}"; do
		path=$(command -v "$tool") || {
			[[ $tool != iperf3 ]] || die "iperf3 not found (Debian package iperf3)"
			continue
		}
		cp -L "$path" "$root/usr/bin/$tool"
		# ldd lists "name => /path (addr)" and the loader as "/path (addr)".
		while read -r lib; do
			mkdir -p "$root$(dirname "$lib")"
			[[ -e $root$lib ]] || cp -L "$lib" "$root$lib"
		done < <(ldd "$path" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
	done
	tar -C "$root" -cf "$RUN/image/rootfs.tar" .
	rm -rf -- "$root"
}

# start_dockerd <n>: dockerd in host n from the host's subnet.env, as the docker drop-in
# (deploy/systemd/docker.service.d/weft.conf) starts it: mk-docker-opts.sh -i writes
# DOCKER_OPT_BIP, DOCKER_OPT_MTU and DOCKER_OPT_IPMASQ, which go on dockerd's command line. The
# lab adds what lets several dockerds share one machine: their own data and exec roots, socket,
# pidfile and (empty) config file, and the vfs storage driver.
start_dockerd() {
	local n=$1 d opts=() key value
	d=$(docker_dir "$n")
	# containerd's sockets live under the exec root; a unix socket's path has at most 107 bytes.
	local sock="$d/exec/containerd/containerd.sock.ttrpc"
	((${#sock} <= 107)) || die "the run dir's path is too long for dockerd's sockets ($sock): use a shorter TMPDIR"
	mkdir -p "$d/data" "$d/exec"
	echo '{}' >"$d/daemon.json"
	bash "$MK_DOCKER_OPTS" -i -f "$RUN/h$n/subnet.env" -d "$RUN/h$n/docker.env" ||
		die "mk-docker-opts.sh failed on $RUN/h$n/subnet.env"
	# Read as data, as systemd's EnvironmentFile= would: KEY="VALUE" lines.
	while IFS='=' read -r key value; do
		[[ $key == DOCKER_OPT_* ]] || continue
		value=${value#\"}
		opts+=("${value%\"}")
	done <"$RUN/h$n/docker.env"
	local args=(--data-root "$d/data" --exec-root "$d/exec" -H "$(docker_sock "$n")"
		--pidfile "$d/docker.pid" --config-file "$d/daemon.json" --storage-driver vfs "${opts[@]}")
	printf '%q ' "$DOCKERD_BIN" "${args[@]}" >"$d/cmdline"
	start_bg_nsenter "dockerd$n" "$(ns_h "$n")" "$d/dockerd.log" env -u NOTIFY_SOCKET "$DOCKERD_BIN" "${args[@]}"
}

# wait_dockerd <n> <pid>: wait until host n's dockerd answers, then import the image.
wait_dockerd() {
	local n=$1 pid=$2 i d
	d=$(docker_dir "$n")
	for ((i = 0; i < TIMEOUT * 5; i++)); do
		docker_h "$n" version >/dev/null 2>&1 && break
		if ! proc_is "$pid" "$(proc_starttime "$pid" || echo -)"; then
			tail -n 20 "$d/dockerd.log" >&2 || true
			die "dockerd on host $n exited (log above, command line in $d/cmdline)"
		fi
		sleep 0.2
	done
	docker_h "$n" version >/dev/null 2>&1 || {
		tail -n 20 "$d/dockerd.log" >&2 || true
		die "dockerd on host $n does not answer on $(docker_sock "$n") within ${TIMEOUT}s"
	}
	docker_h "$n" import - "$DOCKER_IMAGE" <"$RUN/image/rootfs.tar" >/dev/null ||
		die "docker import into host $n's dockerd failed"
	log "host $n: dockerd $(docker_h "$n" version -f '{{.Server.Version}}') on $(docker_sock "$n") (client $(command -v "$DOCKER_CLI") $(docker_h "$n" version -f '{{.Client.Version}}')), image $DOCKER_IMAGE imported"
}

# docker_containers <n>: the host's containers, run by its dockerd on docker's own bridge.
docker_containers() {
	local n=$1 j name
	host_subnet "$n"
	for ((j = 1; j <= CONTAINERS; j++)); do
		name=c$n$(c_suffix "$j")
		docker_h "$n" run -d --name "$name" --hostname "$name" "$DOCKER_IMAGE" \
			/bin/sleep 2147483647 >/dev/null || die "docker run on host $n failed"
		C_IPS[$n.$j]=$(docker_h "$n" inspect -f '{{.NetworkSettings.IPAddress}}' "$name")
		C_NETNS[$n.$j]=$(docker_h "$n" inspect -f '{{.NetworkSettings.SandboxKey}}' "$name")
		[[ -n ${C_IPS[$n.$j]} && -e ${C_NETNS[$n.$j]} ]] || die "container $name on host $n has no address or network namespace"
	done
	C_ADDR[n]=${C_IPS[$n.1]}
}

# docker_down: remove the containers of every dockerd still answering, then stop each dockerd by
# the pid in its pidfile (only if the lab recorded starting that process). dockerd takes its
# containerd with it.
docker_down() {
	local d n pid line rpid st label ids
	for d in "$RUN"/h*/docker; do
		[[ -d $d ]] || continue
		n=${d%/docker}
		n=${n##*/h}
		if [[ -S $d/docker.sock ]]; then
			ids=$(timeout 20 "$DOCKER_CLI" -H "unix://$d/docker.sock" ps -aq 2>/dev/null || true)
			if [[ -n $ids ]]; then
				# shellcheck disable=SC2086 # one id per word
				timeout 30 "$DOCKER_CLI" -H "unix://$d/docker.sock" rm -f $ids >/dev/null 2>&1 ||
					warn "could not remove host $n's containers"
			fi
		fi
		pid=$(cat "$d/docker.pid" 2>/dev/null) || continue
		while read -r rpid st label; do
			[[ $rpid == "$pid" && $label == "dockerd$n" ]] || continue
			proc_is "$pid" "$st" && stop_pid "$pid" "$st" "dockerd (host $n)" 20
		done <"$RUN/pids"
	done
}

# unmount_run_dir: unmount whatever dockerd left mounted under the run dir (deepest first).
unmount_run_dir() {
	local m
	while read -r m; do
		umount -l "$m" 2>/dev/null || warn "could not unmount $m"
	done < <(awk -v run="$RUN/" 'index($5, run) == 1 {print $5}' /proc/self/mountinfo | sort -r)
}

# lab_up <mode>: bring a whole lab up (etcd -> daemons -> containers). Uses PREFIX if set.
lab_up() {
	local mode=$1
	preflight "$mode"
	LAB_SEQ=$((LAB_SEQ + 1))
	if [[ -n $PREFIX ]]; then
		P=$PREFIX
	else
		P="wl$$"
		((LAB_SEQ == 1)) || P="wl$$x$LAB_SEQ"
	fi
	valid_prefix "$P" || die "bad prefix '$P': 2-12 characters, a-z then a-z/0-9"
	check_shape
	local n left
	left=$(lab_namespaces | tr '\n' ' ')
	[[ -z $left ]] || die "namespaces $left exist: prefix $P is in use"
	RUN=$(rundir_for "$P")
	mkdir -m 700 "$RUN" 2>/dev/null || die "cannot create $RUN (exists already?)"
	LAB_ACTIVE=1
	LAB_MODE=$mode
	DAEMON_PIDS=()
	C_ADDR=()
	SUBNET=()
	C_IPS=()
	echo "$mode" >"$RUN/mode"
	: >"$RUN/pids"
	log "bringing up the $mode lab, prefix $P, $HOSTS hosts, $CONTAINERS container(s) per host, run dir $RUN"
	make_hosts
	case $mode in
	weft | flannel | encrypted)
		start_etcd
		for ((n = 1; n <= HOSTS; n++)); do start_daemon "$n" "$mode"; done
		for ((n = 1; n <= HOSTS; n++)); do wait_daemon "$n" "${DAEMON_PIDS[n - 1]}"; done
		;;
	vxlan) setup_vxlan ;;
	direct) setup_direct ;;
	wireguard-go) setup_wireguard_go ;;
	esac
	if ((DOCKER)); then
		build_image
		local dpids=()
		for ((n = 1; n <= HOSTS; n++)); do
			start_dockerd "$n"
			dpids+=("$LAST_PID")
		done
		for ((n = 1; n <= HOSTS; n++)); do wait_dockerd "$n" "${dpids[n - 1]}"; done
		for ((n = 1; n <= HOSTS; n++)); do docker_containers "$n"; done
	else
		for ((n = 1; n <= HOSTS; n++)); do make_containers "$n"; done
	fi
	write_lab_description
	local line="" j
	for ((n = 1; n <= HOSTS; n++)); do
		for ((j = 1; j <= CONTAINERS; j++)); do
			line+="${line:+, }c$n$(c_suffix "$j") ${C_IPS[$n.$j]}"
		done
		line+=" (subnet ${SUBNET[n]})"
	done
	log "containers: $line"
	wait_overlay
}

# lab_namespaces: the namespaces of lab $P that exist.
lab_namespaces() {
	ip netns list 2>/dev/null | awk '{print $1}' | grep -E "$(lab_ns_regex)" || true
}

# write_lab_description: $RUN/containers (C<n>[-<j>]=<address>, read by test.sh) and
# $RUN/lab.json (what `up --json` prints).
write_lab_description() {
	local n j tsv=$RUN/lab.tsv
	: >"$RUN/containers"
	: >"$tsv"
	for ((n = 1; n <= HOSTS; n++)); do
		local docker_host="" image=""
		if ((DOCKER)); then
			docker_host=$(docker_sock "$n")
			image=$DOCKER_IMAGE
		fi
		printf 'host\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "h$n" "$(ns_h "$n")" "$UNDERLAY.$n" "$(link_underlay "$n")" \
			"${SUBNET[n]}" "$docker_host" "$image" >>"$tsv"
		for ((j = 1; j <= CONTAINERS; j++)); do
			local ns name=""
			ns=$(ns_c "$n" "$j")
			if ((DOCKER)); then
				ns=${C_NETNS[$n.$j]}
				name=c$n$(c_suffix "$j")
			fi
			echo "C$n$(c_suffix "$j")=${C_IPS[$n.$j]}" >>"$RUN/containers"
			printf 'container\t%s\t%s\t%s\n' "$ns" "${C_IPS[$n.$j]}" "$name" >>"$tsv"
		done
	done
	python3 - "$P" "$LAB_MODE" "$(ns_underlay)" "$RUN" "$tsv" >"$RUN/lab.json" <<'PY'
import json, sys
prefix, mode, underlay_ns, run_dir, tsv = sys.argv[1:6]
hosts = []
for line in open(tsv):
    kind, *fields = line.rstrip("\n").split("\t")
    if kind == "host":
        name, ns, ip, dev, subnet, docker_host, image = fields
        host = {"name": name, "namespace": ns, "underlay_ip": ip, "underlay_dev": dev,
                "subnet": subnet, "containers": []}
        if docker_host:
            host.update(docker_host=docker_host, docker_image=image)
        hosts.append(host)
    else:
        ns, ip, name = fields
        container = {"namespace": ns, "ip": ip}
        if name:
            container["name"] = name
        hosts[-1]["containers"].append(container)
print(json.dumps({"prefix": prefix, "mode": mode, "underlay_namespace": underlay_ns,
                  "run_dir": run_dir, "hosts": hosts}))
PY
	rm -f -- "$tsv"
}

# lab_down: stop the lab's processes, delete its namespaces and (unless kept) its run dir.
lab_down() {
	[[ $LAB_ACTIVE == 1 ]] || return 0
	LAB_ACTIVE=0
	set +e
	[[ -z $RUN || ! -f $RUN/pids ]] || docker_down
	stop_recorded
	[[ -z $RUN || ! -d $RUN ]] || unmount_run_dir
	local ns
	# Containers first, then hosts, then the underlay.
	for ns in $(lab_namespaces | sort); do
		local left
		left=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
		[[ -z $left ]] || warn "namespace $ns still holds processes the lab did not start: $left(not touched)"
		ip netns delete "$ns" || warn "could not delete namespace $ns"
	done
	if [[ $RUN == */weft-lab."$P" && -d $RUN ]]; then
		if [[ $KEEP == 1 ]]; then
			log "logs kept in $RUN"
		else
			rm -rf -- "$RUN"
		fi
	fi
	set -e
	log "lab $P is down"
}

on_exit() {
	local rc=$?
	trap - EXIT INT TERM
	# A signal may end the script inside a command whose output goes to /dev/null: the teardown
	# reports on the script's own standard output and error (saved by main).
	exec 1>&5 2>&6
	if [[ $LAB_ACTIVE == 1 ]]; then
		if ((rc != 0)) && [[ -n $RUN && -d $RUN ]]; then
			local f
			for f in "$RUN"/h*/daemon.log "$RUN"/h*/docker/dockerd.log; do
				[[ -s $f ]] || continue
				echo "--- last lines of $f ---" >&2
				tail -n 15 "$f" >&2
			done
		fi
		lab_down
	fi
	exit "$rc"
}

# ---------------------------------------------------------------------------------------------
# Looking at a lab

show_lab() {
	local n
	echo
	echo "=== weft lab '$P' ($LAB_MODE) ==="
	if is_daemon_mode "$LAB_MODE"; then
		echo
		echo "--- etcd: etcdctl get --prefix $ETCD_PREFIX (from host 1) ---"
		# etcdctl prints each key and its value on separate lines; shown here as "key value".
		etcdctl_h1 get --prefix "$ETCD_PREFIX" | paste -d' ' - - | sed 's/^/  /' || true
	fi
	for ((n = 1; n <= HOSTS; n++)); do
		echo
		echo "--- host $n ($UNDERLAY.$n): $RUN/h$n/subnet.env ---"
		sed 's/^/  /' "$RUN/h$n/subnet.env"
		echo "--- host $n: ip route ---"
		ip -n "$(ns_h "$n")" route show | indent
		if ((DOCKER)); then
			echo "--- host $n: mk-docker-opts.sh -i -f subnet.env -d $RUN/h$n/docker.env ---"
			indent <"$RUN/h$n/docker.env"
			echo "--- host $n: $(sed 's/ *$//' "$(docker_dir "$n")/cmdline") ---"
			echo "--- host $n: docker network inspect bridge ---"
			docker_h "$n" network inspect bridge -f \
				'{{range .IPAM.Config}}subnet {{.Subnet}}, gateway {{.Gateway}}{{end}}, mtu {{index .Options "com.docker.network.driver.mtu"}}' | indent
			echo "--- host $n: docker ps ---"
			docker_h "$n" ps --format '{{.Names}}  {{.Image}}  {{.Command}}  {{.Status}}' | indent
		fi
	done
	local j
	for ((n = 1; n <= HOSTS; n++)); do
		for ((j = 1; j <= CONTAINERS; j++)); do
			echo
			if ((DOCKER)); then
				echo "--- host $n: docker exec c$n$(c_suffix "$j") ip a ---"
			elif ((CONTAINERS == 1)); then
				echo "--- container $n: ip a ---"
			else
				echo "--- container c$n$(c_suffix "$j") (host $n): ip a ---"
			fi
			c_exec "$n" "$j" ip addr show | indent
		done
	done
	echo
}

print_enter_instructions() {
	local n j
	echo
	echo "The lab stays up (prefix $P, mode $LAB_MODE, run dir $RUN)."
	echo "Enter a namespace:"
	for ((n = 1; n <= HOSTS; n++)); do
		for ((j = 1; j <= CONTAINERS; j++)); do
			if ((DOCKER)); then
				printf '  %s\n    # container c%s (host %s), %s; its network namespace with the machine'"'"'s tools:\n' \
					"$DOCKER_CLI -H $(docker_sock "$n") exec -it c$n$(c_suffix "$j") sh" "$n$(c_suffix "$j")" "$n" "${C_IPS[$n.$j]}"
				printf '  nsenter --net=%s bash\n' "${C_NETNS[$n.$j]}"
			else
				printf '  %-40s # container c%s (host %s), %s\n' "ip netns exec $(ns_c "$n" "$j") bash" \
					"$n$(c_suffix "$j")" "$n" "${C_IPS[$n.$j]}"
			fi
		done
	done
	printf '  %-40s # host 1, %s (etcd, daemon logs in %s)\n' "ip netns exec $(ns_h 1) bash" "$UNDERLAY.1" "$RUN"
	for ((n = 2; n <= HOSTS; n++)); do
		printf '  %-40s # host %s, %s\n' "ip netns exec $(ns_h "$n") bash" "$n" "$UNDERLAY.$n"
	done
	echo "Try:"
	if ((DOCKER)); then
		echo "  $DOCKER_CLI -H $(docker_sock 1) exec c1 ping -c 3 ${C_ADDR[2]}"
	else
		echo "  ip netns exec $(ns_c 1) ping -c 3 ${C_ADDR[2]}"
	fi
	echo "Tear it down:"
	echo "  bash $LAB_DIR/lab.sh down $P"
}

# ping_check <from> <to>: 5 pings, 0 % loss asserted; prints the summary and sets PING_AVG.
PING_AVG=""
ping_check() {
	local from=$1 to=$2 out
	out=$(c_exec "$from" 1 ping -c 5 -i 0.2 -W 2 "${C_ADDR[to]}" 2>&1) || true
	indent <<<"$out"
	grep -q ' 0% packet loss' <<<"$out" || die "ping c$from -> c$to lost packets"
	# iputils: "rtt min/avg/max/mdev = a/b/c/d ms"; busybox: "round-trip min/avg/max = a/b/c ms".
	PING_AVG=$(sed -En 's#^(rtt|round-trip) [^=]*= [^/]*/([^/]*)/.*#\2#p' <<<"$out")
}

start_iperf_server() {
	local n=$1 i
	if ((DOCKER)); then
		# Inside the container (docker rm -f at teardown ends it).
		docker_h "$n" exec -d "c$n" iperf3 -s -B "${C_ADDR[n]}" -p "$IPERF_PORT"
	else
		start_bg "iperf3-server-c$n" "$(ns_c "$n")" "$RUN/iperf3-server-c$n.log" iperf3 -s -B "${C_ADDR[n]}" -p "$IPERF_PORT"
	fi
	for ((i = 0; i < 50; i++)); do
		if c_netns_exec "$n" 1 ss -Htln "sport = :$IPERF_PORT" | grep -q .; then return 0; fi
		sleep 0.1
	done
	die "iperf3 server in container $n did not start"
}

# ---------------------------------------------------------------------------------------------
# Subcommands

# cargo_release_build <args...>: cargo build --release <args>, as the user who ran sudo if there
# is one (so that target/ stays theirs and their toolchain is used).
cargo_release_build() {
	local cargo="" user=${SUDO_USER:-}
	[[ $user != root ]] || user=""
	if [[ -n $user ]]; then
		local home
		home=$(getent passwd "$user" | cut -d: -f6)
		if [[ -x $home/.cargo/bin/cargo ]]; then
			cargo=$home/.cargo/bin/cargo
		else
			cargo=$(sudo -u "$user" -H bash -lc 'command -v cargo' 2>/dev/null || true)
		fi
	else
		cargo=$(command -v cargo || true)
	fi
	[[ -n $cargo ]] || die "cargo not found: install Rust (https://rustup.rs), or pass --no-build with a built weftd"
	log "building (cargo build --release $*)${user:+ as $user}"
	if [[ -n $user ]]; then
		(cd "$REPO_ROOT" && sudo -u "$user" -H "$cargo" build --release "$@")
	else
		(cd "$REPO_ROOT" && "$cargo" build --release "$@")
	fi
}

build_weftd() { cargo_release_build -p weft-control; }

cmd_demo() {
	if is_weft_mode "$MODE"; then
		if [[ $DO_SETUP == 1 ]]; then
			require_root
			log "checking the machine (scripts/setup.sh)"
			bash "$REPO_ROOT/scripts/setup.sh"
		fi
		[[ $DO_BUILD == 0 ]] || build_weftd
	fi
	lab_up "$MODE"
	show_lab
	# Host 1's container and each other host's, both ways.
	local m pings=()
	for ((m = 2; m <= HOSTS; m++)); do
		echo "--- ping c1 -> c$m ---"
		ping_check 1 "$m"
		pings+=("ping c1 -> c$m: 5/5 replies, avg ${PING_AVG} ms")
		echo "--- ping c$m -> c1 ---"
		ping_check "$m" 1
		pings+=("ping c$m -> c1: 5/5 replies, avg ${PING_AVG} ms")
	done
	start_iperf_server 2
	echo "--- iperf3 c1 -> c2, 5 s ---"
	local out
	out=$(c_exec 1 1 iperf3 -c "${C_ADDR[2]}" -p "$IPERF_PORT" -t 5 -f g 2>&1) || {
		echo "$out"
		die "iperf3 c1 -> c2 failed"
	}
	indent <<<"$out"
	local rate
	rate=$(awk '/receiver/ {for (i = 1; i < NF; i++) if ($(i + 1) == "Gbits/sec") print $i}' <<<"$out" | tail -n 1)
	echo
	echo "=== summary ($LAB_MODE lab, prefix $P) ==="
	for ((m = 2; m <= HOSTS; m++)); do
		echo "  c1 ${C_ADDR[1]} (host 1 subnet ${SUBNET[1]}) <-> c$m ${C_ADDR[m]} (host $m subnet ${SUBNET[m]})"
	done
	printf '  %s\n' "${pings[@]}"
	echo "  iperf3 c1 -> c2 (TCP, 1 stream, 5 s): ${rate:-?} Gbit/s received"
	((MULTICAST == 0)) || multicast_demo
	if [[ $KEEP == 1 ]]; then
		LAB_ACTIVE=0
		print_enter_instructions
	fi
}

# multicast_demo: every other host's first container joins 239.1.1.1 (and the mDNS group), c1
# sends 5 datagrams to each with TTL 1, and each receiver says what it got.
multicast_demo() {
	local m group out dir="$RUN/mcast-demo"
	mkdir -p "$dir"
	for group in 239.1.1.1 224.0.0.251; do
		local port=5000 pids=()
		[[ $group != 224.0.0.251 ]] || port=5353
		echo
		echo "--- multicast: c2..c$HOSTS join $group:$port; c1 sends 5 datagrams with TTL 1 ---"
		for ((m = 2; m <= HOSTS; m++)); do
			c_netns_exec "$m" 1 python3 "$MCAST_PY" recv "$group" "$port" 6 >"$dir/c$m-$group" 2>&1 &
			pids+=($!)
		done
		# The joins travel: IGMP report -> weftd on the member's host -> its etcd record -> c1's host.
		sleep 3
		c_netns_exec 1 1 python3 "$MCAST_PY" send "$group" "$port" 5 --ttl 1 --tag "from-c1"
		wait "${pids[@]}" || true
		for ((m = 2; m <= HOSTS; m++)); do
			out=$(grep -c 'from-c1' "$dir/c$m-$group" || true)
			echo "  c$m (host $m) received $out of 5 datagrams sent by c1 to $group:$port"
		done
	done
	echo
	echo "--- etcd: this lab's host records (etcdctl get --prefix /weft.io$ETCD_PREFIX/hosts/) ---"
	etcdctl_h1 get --prefix "/weft.io$ETCD_PREFIX/hosts/" | paste -d' ' - - | indent || true
}

cmd_up() {
	lab_up "$MODE"
	show_lab
	LAB_ACTIVE=0
	KEEP=1
	print_enter_instructions
	# With --json, fd 3 is the original standard output (main points fd 1 at standard error).
	if ((JSON)); then cat "$RUN/lab.json" >&3; fi
}

cmd_down() {
	require_root
	[[ ${#POSITIONAL[@]} -eq 1 ]] || die "usage: lab.sh down <prefix>"
	P=${POSITIONAL[0]}
	valid_prefix "$P" || die "bad prefix '$P'"
	RUN=$(rundir_for "$P")
	if [[ ! -d $RUN ]]; then
		[[ -n $(lab_namespaces) ]] || die "no lab with prefix $P (no $RUN, no namespaces $P-*)"
		warn "no run dir $RUN: deleting namespaces only; processes are not known and are left alone"
	fi
	LAB_MODE=$(cat "$RUN/mode" 2>/dev/null || echo unknown)
	KEEP=0
	LAB_ACTIVE=1
	lab_down
}

cmd_list() {
	local d found=0
	for d in "${TMPDIR:-/tmp}"/weft-lab.*; do
		[[ -d $d ]] || continue
		found=1
		local p=${d##*/weft-lab.}
		printf '%s\t%s\t%s\n' "$p" "$(cat "$d/mode" 2>/dev/null || echo '?')" "$d"
	done
	((found)) || echo "no labs are up"
}

# ----- bench

readonly SOCKPERF_PORT=11111
# Seconds of each sockperf request/response test (at most --duration): a few seconds give a
# stable median and p99.
readonly RR_MAX_SECONDS=3
RR_SECONDS=$RR_MAX_SECONDS
COPY_COST_BIN=${COPY_COST_BIN:-$REPO_ROOT/target/release/examples/copy_cost}

cpu_busy_ticks() {
	# user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
	awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat
}

cpu_total_ticks() {
	awk '/^cpu / {print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9; exit}' /proc/stat
}

daemon_ticks() {
	local pid sum=0 stat
	for pid in "${DAEMON_PIDS[@]}"; do
		stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
		stat=${stat##*) }
		sum=$((sum + $(awk '{print $12 + $13}' <<<"$stat")))
	done
	echo "$sum"
}

# busy_fraction: share of all CPUs busy over one second.
busy_fraction() {
	local b0 t0 b1 t1
	b0=$(cpu_busy_ticks)
	t0=$(cpu_total_ticks)
	sleep 1
	b1=$(cpu_busy_ticks)
	t1=$(cpu_total_ticks)
	awk -v b=$((b1 - b0)) -v t=$((t1 - t0)) 'BEGIN { f = (t > 0 ? b / t : 0); printf "%.2f", (f > 1 ? 1 : f) }'
}

# wait_quiet: wait until the machine is quiet (busy share below --quiet-load) or the timeout ends.
QUIET_BUSY=""
QUIET_OK=0
wait_quiet() {
	local start=$SECONDS f
	while :; do
		f=$(busy_fraction)
		if awk -v f="$f" -v m="$QUIET_LOAD" 'BEGIN { exit !(f < m) }'; then
			QUIET_BUSY=$f
			QUIET_OK=1
			return 0
		fi
		if ((SECONDS - start >= QUIET_TIMEOUT)); then
			warn "machine still busy (${f} of all CPUs) after ${QUIET_TIMEOUT}s; measuring anyway (recorded as noisy)"
			QUIET_BUSY=$f
			QUIET_OK=0
			return 0
		fi
		log "waiting for a quiet machine (busy ${f}, want < ${QUIET_LOAD})"
		sleep 4
	done
}

# measure <name> <command...>: run a test, recording machine and daemon CPU ticks around it.
M_CPU=0
M_DAEMON=0
measure() {
	local m0 d0 m1 d1
	m0=$(cpu_busy_ticks)
	d0=$(daemon_ticks)
	"$@"
	m1=$(cpu_busy_ticks)
	d1=$(daemon_ticks)
	M_CPU=$((m1 - m0))
	M_DAEMON=$((d1 - d0))
}

iperf_json() {
	local out=$1
	shift
	if ! nsx "$(ns_c 1)" iperf3 -c "${C_ADDR[2]}" -p "$IPERF_PORT" -J "$@" >"$out" 2>"$out.err"; then
		cat "$out.err" >&2
		head -c 2000 "$out" >&2
		die "iperf3 $* failed (see $out)"
	fi
	[[ -s $out.err ]] || rm -f -- "$out.err"
}

# start_sockperf_servers <n>: sockperf servers for UDP and TCP in host n's first container.
start_sockperf_servers() {
	local n=$1 i proto
	for proto in udp tcp; do
		local args=()
		[[ $proto == udp ]] || args=(--tcp)
		start_bg "sockperf-$proto-server-c$n" "$(ns_c "$n")" "$RUN/sockperf-$proto-server-c$n.log" \
			sockperf server "${args[@]}" -i "${C_ADDR[n]}" -p "$SOCKPERF_PORT"
	done
	for ((i = 0; i < 50; i++)); do
		if nsx "$(ns_c "$n")" ss -Huln "sport = :$SOCKPERF_PORT" | grep -q . &&
			nsx "$(ns_c "$n")" ss -Htln "sport = :$SOCKPERF_PORT" | grep -q .; then
			return 0
		fi
		sleep 0.1
	done
	die "sockperf servers in container $n did not start"
}

# sockperf_rr <out> <seconds> [--tcp]: back-to-back 64-byte request/response from container 1
# to container 2. --full-rtt makes sockperf report round trips (by default it halves them).
sockperf_rr() {
	local out=$1 seconds=$2
	shift 2
	if ! nsx "$(ns_c 1)" sockperf ping-pong "$@" -i "${C_ADDR[2]}" -p "$SOCKPERF_PORT" -m 64 \
		-t "$seconds" --full-rtt >"$out" 2>&1; then
		tail -n 20 "$out" >&2
		die "sockperf ping-pong $* failed (see $out)"
	fi
}

# copy_cost <out>: the cost of one 64 KiB memcpy on this machine, cold and warm (the floor of a
# TUN/UDP engine is kernel VXLAN's cost plus four cold copies; docs/performance.md).
copy_cost() {
	local out=$1
	"$COPY_COST_BIN" >"$out" || die "$COPY_COST_BIN failed"
}

# lab_up_to_measure <mode>: wait for a quiet machine, bring the lab up, and resolve neighbours
# and warm the path with a few pings.
lab_up_to_measure() {
	local mode=$1
	wait_quiet
	lab_up "$mode"
	nsx "$(ns_c 1)" ping -c 3 -i 0.2 -W 2 "${C_ADDR[2]}" >/dev/null || die "$mode: c1 cannot reach c2"
}

bench_one() {
	local round=$1 mode=$2 raw=$3
	local tag="r$round-$mode"
	lab_up_to_measure "$mode"
	start_iperf_server 2
	log "$tag: ping x$PINGS"
	nsx "$(ns_c 1)" ping -q -c "$PINGS" -i 0.01 -W 2 "${C_ADDR[2]}" >"$raw/$tag-ping.txt" 2>&1 || true
	log "$tag: TCP, 1 stream, ${DURATION}s"
	measure iperf_json "$raw/$tag-tcp1.json" -t "$DURATION"
	local tcp1=("$M_CPU" "$M_DAEMON")
	log "$tag: TCP, 4 streams, ${DURATION}s"
	measure iperf_json "$raw/$tag-tcp4.json" -t "$DURATION" -P 4
	local tcp4=("$M_CPU" "$M_DAEMON")
	log "$tag: UDP at $UDP_RATE bit/s, ${UDP_LEN}-byte datagrams, ${DURATION}s"
	measure iperf_json "$raw/$tag-udp.json" -t "$DURATION" -u -b "$UDP_RATE" -l "$UDP_LEN"
	local udp=("$M_CPU" "$M_DAEMON")
	log "$tag: UDP at full rate, 64-byte datagrams, ${DURATION}s"
	measure iperf_json "$raw/$tag-udp64.json" -t "$DURATION" -u -b 0 -l 64
	local udp64=("$M_CPU" "$M_DAEMON")
	start_sockperf_servers 2
	log "$tag: request/response (sockperf ping-pong, 64 bytes), UDP and TCP, ${RR_SECONDS}s each"
	sockperf_rr "$raw/$tag-rr-udp.txt" "$RR_SECONDS"
	sockperf_rr "$raw/$tag-rr-tcp.txt" "$RR_SECONDS" --tcp
	local has_daemon=0
	is_daemon_mode "$mode" || [[ $mode == wireguard-go ]] && has_daemon=1
	python3 "$REPORT_PY" record --out "$OUT_DIR/raw.jsonl" --mode "$mode" --round "$round" \
		--clk-tck "$(getconf CLK_TCK)" --busy-before "$QUIET_BUSY" --quiet "$QUIET_OK" \
		--has-daemon "$has_daemon" \
		--ping "$raw/$tag-ping.txt" \
		--tcp1 "$raw/$tag-tcp1.json" --tcp1-cpu "${tcp1[0]}" --tcp1-daemon "${tcp1[1]}" \
		--tcp4 "$raw/$tag-tcp4.json" --tcp4-cpu "${tcp4[0]}" --tcp4-daemon "${tcp4[1]}" \
		--udp "$raw/$tag-udp.json" --udp-cpu "${udp[0]}" --udp-daemon "${udp[1]}" \
		--udp64 "$raw/$tag-udp64.json" --udp64-cpu "${udp64[0]}" --udp64-daemon "${udp64[1]}" \
		--rr-udp "$raw/$tag-rr-udp.txt" --rr-tcp "$raw/$tag-rr-tcp.txt"
	lab_down
}

cmd_bench() {
	local modes=()
	if [[ -n $BENCH_MODES ]]; then
		IFS=, read -r -a modes <<<"$BENCH_MODES"
	else
		modes=(weft vxlan direct)
		[[ -z ${FLANNELD_BIN:-} ]] || modes+=(flannel)
	fi
	[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer"
	[[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "--duration must be a positive integer (seconds)"
	[[ $PINGS =~ ^[1-9][0-9]*$ ]] || die "--pings must be a positive integer"
	RR_SECONDS=$((DURATION < RR_MAX_SECONDS ? DURATION : RR_MAX_SECONDS))
	local mode
	for mode in "${modes[@]}"; do preflight "$mode"; done
	require_cmd sockperf "Debian package sockperf"
	[[ $DO_BUILD == 0 ]] || cargo_release_build -p weft-bench --example copy_cost
	[[ -x $COPY_COST_BIN ]] || die "$COPY_COST_BIN not found: build it with 'cargo build --release -p weft-bench --example copy_cost' (or set COPY_COST_BIN)"
	[[ -n $OUT_DIR ]] || OUT_DIR="$LAB_DIR/results/$(date -u +%Y%m%dT%H%M%SZ)"
	mkdir -p "$OUT_DIR/raw"
	: >"$OUT_DIR/raw.jsonl"
	local weftd_version=""
	if [[ " ${modes[*]} " == *" weft "* || " ${modes[*]} " == *" encrypted "* ]]; then
		weftd_version=$("$WEFTD_BIN" --version 2>/dev/null | head -n 1 || true)
	fi
	python3 "$REPORT_PY" meta --out "$OUT_DIR/meta.json" \
		--modes "$(
			IFS=,
			echo "${modes[*]}"
		)" \
		--rounds "$ROUNDS" --duration "$DURATION" --pings "$PINGS" --udp-rate "$UDP_RATE" \
		--udp-len "$UDP_LEN" --workers "$WORKERS" --io "$IO_MODE" \
		--weftd-version "$weftd_version" \
		--iperf3-version "$(iperf3 --version 2>/dev/null | head -n 1)" \
		--sockperf-version "$(sockperf --version 2>/dev/null | head -n 1)" --rr-seconds "$RR_SECONDS" \
		--git "$(git -C "$REPO_ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
	log "bench: modes ${modes[*]}, $ROUNDS round(s), ${DURATION}s per test; results in $OUT_DIR"
	wait_quiet
	log "cost of a 64 KiB memcpy, cold and warm ($COPY_COST_BIN)"
	copy_cost "$OUT_DIR/copy_cost.json"
	local round
	for ((round = 1; round <= ROUNDS; round++)); do
		# Rotate the order each round so that no mode always runs first.
		local k i
		for ((k = 0; k < ${#modes[@]}; k++)); do
			i=$(((k + round - 1) % ${#modes[@]}))
			bench_one "$round" "${modes[i]}" "$OUT_DIR/raw"
		done
	done
	python3 "$REPORT_PY" summarize "$OUT_DIR"
	log "results: $OUT_DIR/{results.json,summary.md,chart.svg}"
}

# ---------------------------------------------------------------------------------------------
# Where a round trip's time goes

# hops_one <mode> <dir>: bring the lab up in <mode>, capture $PINGS pings at every point of the
# path, tear down, and print the per-hop table.
hops_one() {
	local mode=$1 dir=$2
	lab_up_to_measure "$mode"
	local overlay=""
	case $mode in
	weft | flannel) overlay=flannel0 ;;
	vxlan) overlay=flannel.1 ;;
	esac
	# Path order of the echo request: container 1, host 1's overlay device and underlay link,
	# host 2's underlay link and overlay device, container 2.
	local points=("c1:$(ns_c 1):$(link_container 1)")
	[[ -z $overlay ]] || points+=("h1-$overlay:$(ns_h 1):$overlay")
	points+=("h1-underlay:$(ns_h 1):$(link_underlay 1)" "h2-underlay:$(ns_h 2):$(link_underlay 2)")
	[[ -z $overlay ]] || points+=("h2-$overlay:$(ns_h 2):$overlay")
	points+=("c2:$(ns_c 2):$(link_container 2)")
	local point name ns dev args=() pids=()
	for point in "${points[@]}"; do
		IFS=: read -r name ns dev <<<"$point"
		# Buffered captures (no --immediate-mode): tcpdump wakes once per filled block, not per
		# packet, so it does not compete with the path for the CPUs.
		start_bg "tcpdump-$name" "$ns" "$dir/$mode-$name.log" \
			tcpdump -n -Z root -i "$dev" -s 256 --time-stamp-precision=nano -w "$dir/$mode-$name.pcap" \
			icmp or udp port 8285 or udp port 8472
		pids+=("$LAST_PID")
		args+=(--point "$name=$dir/$mode-$name.pcap")
	done
	local i
	for ((i = 0; i < 50; i++)); do
		[[ $(grep -l 'listening on' "$dir/$mode"-*.log 2>/dev/null | wc -l) -ge ${#points[@]} ]] && break
		sleep 0.1
	done
	sleep 0.3
	log "$mode: ping x$PINGS at ${INTERVAL}s, captured at ${#points[@]} points"
	nsx "$(ns_c 1)" ping -q -c "$PINGS" -i "$INTERVAL" -W 2 "${C_ADDR[2]}" >"$dir/$mode-ping.txt" 2>&1 || true
	# tcpdump hands over a part-filled block after its 1 s timeout; stopping earlier loses it.
	sleep 1.5
	kill -INT "${pids[@]}" 2>/dev/null || true
	for i in "${pids[@]}"; do wait "$i" 2>/dev/null || true; done
	lab_down
	tail -n 1 "$dir/$mode-ping.txt"
	python3 "$HOPS_PY" table "${args[@]}" --json "$dir/$mode.json" --title "$mode" | tee -a "$dir/hops.md"
	echo | tee -a "$dir/hops.md"
}

cmd_hops() {
	local modes=()
	IFS=, read -r -a modes <<<"${BENCH_MODES:-weft,vxlan,direct}"
	[[ $PINGS =~ ^[1-9][0-9]*$ ]] || die "--pings must be a positive integer"
	[[ $INTERVAL =~ ^(0|[1-9][0-9]*)?\.?[0-9]+$ ]] || die "--interval must be a number of seconds"
	require_cmd tcpdump "Debian package tcpdump"
	local mode
	for mode in "${modes[@]}"; do
		# A ping is matched across the capture points by its bytes, which encryption hides.
		[[ $mode != encrypted && $mode != wireguard-go ]] ||
			die "hops cannot follow a ping through the $mode mode's encrypted underlay"
		preflight "$mode"
	done
	[[ -n $OUT_DIR ]] || OUT_DIR="$LAB_DIR/results/hops-$(date -u +%Y%m%dT%H%M%SZ)"
	mkdir -p "$OUT_DIR"
	: >"$OUT_DIR/hops.md"
	for mode in "${modes[@]}"; do hops_one "$mode" "$OUT_DIR"; done
	log "results: $OUT_DIR/hops.md"
}

# profile_one <mode> <dir>: a $STREAMS-stream TCP transfer for $DURATION + 6 s with the whole
# machine sampled from its 3rd second for $DURATION s; leaves <dir>/<mode>.report and prints the
# Gbit/s moved while sampling.
profile_one() {
	local mode=$1 dir=$2
	lab_up_to_measure "$mode"
	start_iperf_server 2
	log "$mode: TCP, $STREAMS stream(s), $((DURATION + 6))s; perf from the 3rd second for ${DURATION}s"
	iperf_json "$dir/$mode-tcp.json" -t "$((DURATION + 6))" -i 1 -P "$STREAMS" &
	local iperf=$!
	sleep 3
	daemon_snapshot "$dir/$mode-before"
	perf record -a -g -q -o "$dir/$mode.data" -- sleep "$DURATION" >"$dir/$mode-perf.log" 2>&1 ||
		die "perf record failed (see $dir/$mode-perf.log)"
	daemon_snapshot "$dir/$mode-after"
	wait "$iperf" || die "$mode: iperf3 failed"
	lab_down
	if [[ -s $dir/$mode-before.threads ]]; then
		python3 "$PROFILE_PY" daemon --before "$dir/$mode-before" --after "$dir/$mode-after" \
			--seconds "$DURATION" >"$dir/$mode-daemon.md"
	fi
	perf report -i "$dir/$mode.data" --stdio --no-children --sort comm,dso,sym -g none \
		--percent-limit 0 >"$dir/$mode.report" 2>/dev/null
	# Gbit/s over the intervals inside the sampled window.
	python3 - "$dir/$mode-tcp.json" 3 "$DURATION" >"$dir/$mode.gbits" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
start, seconds = float(sys.argv[2]), float(sys.argv[3])
bits = [i["sum"]["bits_per_second"] for i in data["intervals"]
        if start <= i["sum"]["start"] < start + seconds]
print(f"{sum(bits) / len(bits) / 1e9:.3f}")
PY
}

# daemon_snapshot <prefix>: for the daemon modes, every daemon thread's CPU ticks
# (<prefix>.threads: host, thread name, utime + stime) and hosts 1 and 2's metrics
# (<prefix>.h<n>.prom), for the per-worker and per-operation figures of `profile`.
daemon_snapshot() {
	local prefix=$1 n pid task
	: >"$prefix.threads"
	((${#DAEMON_PIDS[@]})) || return 0
	for n in 1 2; do
		pid=${DAEMON_PIDS[n - 1]:-}
		[[ -n $pid ]] || continue
		for task in /proc/"$pid"/task/*; do
			# Fields after the parenthesised name: utime and stime are the 12th and 13th.
			awk -v host="$n" '{
				name = $0; sub(/^[^(]*\(/, "", name); sub(/\).*$/, "", name);
				rest = $0; sub(/^.*\) /, "", rest); split(rest, f, " ");
				print host, name, f[12] + f[13]
			}' "$task/stat" 2>/dev/null >>"$prefix.threads" || true
		done
	done
	# Both hosts at once, so that the two windows match.
	local fetches=()
	for n in 1 2; do
		nsx "$(ns_h "$n")" python3 -c '
import sys, urllib.request
sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' \
			"http://127.0.0.1:$HEALTHZ_PORT/metrics" >"$prefix.h$n.prom" 2>/dev/null &
		fetches+=($!)
	done
	wait "${fetches[@]}" || true
}

cmd_profile() {
	local modes=()
	IFS=, read -r -a modes <<<"${BENCH_MODES:-weft,vxlan}"
	[[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "--duration must be a positive integer (seconds)"
	[[ $STREAMS =~ ^[1-9][0-9]?$ ]] || die "--streams must be 1 to 99"
	require_cmd perf "Debian package linux-perf"
	local mode
	for mode in "${modes[@]}"; do preflight "$mode"; done
	[[ -n $OUT_DIR ]] || OUT_DIR="$LAB_DIR/results/profile-$(date -u +%Y%m%dT%H%M%SZ)"
	mkdir -p "$OUT_DIR"
	local args=()
	for mode in "${modes[@]}"; do
		profile_one "$mode" "$OUT_DIR"
		args+=(--mode "$mode=$OUT_DIR/$mode.report:$(cat "$OUT_DIR/$mode.gbits")")
	done
	python3 "$PROFILE_PY" table "${args[@]}" --seconds "$DURATION" --cpus "$(nproc)" \
		--json "$OUT_DIR/profile.json" | tee "$OUT_DIR/profile.md"
	for mode in "${modes[@]}"; do
		[[ -s $OUT_DIR/$mode-daemon.md ]] || continue
		printf '\n%s: daemon threads and packets per operation while sampled\n\n' "$mode"
		cat "$OUT_DIR/$mode-daemon.md"
	done | tee -a "$OUT_DIR/profile.md"
	log "results: $OUT_DIR/profile.md"
}

# ---------------------------------------------------------------------------------------------

parse_opts() {
	while (($#)); do
		case $1 in
		--mode) MODE=${2:?--mode needs a value} && shift ;;
		--prefix) PREFIX=${2:?--prefix needs a value} && shift ;;
		--keep) KEEP=1 ;;
		--hosts) HOSTS=${2:?--hosts needs a value} && shift ;;
		--containers) CONTAINERS=${2:?--containers needs a value} && shift ;;
		--json) JSON=1 ;;
		--docker) DOCKER=1 ;;
		--timeout) TIMEOUT=${2:?} && shift ;;
		--workers) WORKERS=${2:?--workers needs a value} && shift ;;
		--io) IO_MODE=${2:?--io needs a value} && shift ;;
		--weftd) WEFTD_BIN=${2:?} && shift ;;
		--weftd-arg) DAEMON_EXTRA+=("${2:?}") && shift ;;
		--multicast) MULTICAST=1 ;;
		--broadcast) BROADCAST=1 ;;
		--multicast-hosts) MCAST_HOSTS=${2:?--multicast-hosts needs a list} && shift ;;
		--no-setup) DO_SETUP=0 ;;
		--no-build) DO_BUILD=0 ;;
		--pid-log) PID_LOG=${2:?} && shift ;;
		--modes) BENCH_MODES=${2:?} && shift ;;
		--rounds) ROUNDS=${2:?} && shift ;;
		--duration) DURATION=${2:?} && shift ;;
		--pings) PINGS=${2:?} && shift ;;
		--streams) STREAMS=${2:?} && shift ;;
		--interval) INTERVAL=${2:?} && shift ;;
		--udp-rate) UDP_RATE=${2:?} && shift ;;
		--udp-len) UDP_LEN=${2:?} && shift ;;
		--out) OUT_DIR=${2:?} && shift ;;
		--quiet-load) QUIET_LOAD=${2:?} && shift ;;
		--quiet-timeout) QUIET_TIMEOUT=${2:?} && shift ;;
		-h | --help)
			usage
			exit 0
			;;
		-*) die "unknown option '$1' (lab.sh help)" ;;
		*) POSITIONAL+=("$1") ;;
		esac
		shift
	done
	[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive integer"
	if ! [[ $HOSTS =~ ^[0-9]+$ ]] || ((HOSTS < 2 || HOSTS > 16)); then
		die "--hosts must be a number from 2 to 16"
	fi
	if ! [[ $CONTAINERS =~ ^[0-9]+$ ]] || ((CONTAINERS < 1 || CONTAINERS > 16)); then
		die "--containers must be a number from 1 to 16"
	fi
	[[ -z $IO_MODE || $IO_MODE == uring || $IO_MODE == syscalls ]] || die "--io must be uring or syscalls"
	[[ -z $WORKERS || $WORKERS =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer"
	[[ -z $PREFIX ]] || valid_prefix "$PREFIX" || die "bad --prefix '$PREFIX': 2-12 characters, a-z then a-z/0-9"
	[[ -z $WEFTD_BIN || $WEFTD_BIN == /* ]] || WEFTD_BIN="$PWD/$WEFTD_BIN"
	[[ -z $MCAST_HOSTS || $MCAST_HOSTS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--multicast-hosts takes host numbers, e.g. 1,2"
	if ((MULTICAST || BROADCAST)) && [[ $MODE != weft ]]; then
		die "--multicast and --broadcast need --mode weft (flannel and the kernel modes carry neither)"
	fi
}

# mcast_host <n>: host n's weftd gets the --multicast/--broadcast flags asked for.
mcast_host() {
	[[ -z $MCAST_HOSTS || ",$MCAST_HOSTS," == *",$1,"* ]]
}

main() {
	local cmd=${1:-help}
	(($#)) && shift
	# The lab needs root: re-run through sudo when started as a user.
	if [[ $EUID -ne 0 && $cmd =~ ^(demo|up|down|bench|hops|profile)$ ]] && command -v sudo >/dev/null 2>&1; then
		echo "[lab] the lab needs root (network namespaces): re-running with sudo" >&2
		exec sudo -E bash "$LAB_DIR/lab.sh" "$cmd" "$@"
	fi
	parse_opts "$@"
	if [[ $cmd != down && ${#POSITIONAL[@]} -gt 0 ]]; then
		die "unexpected argument '${POSITIONAL[0]}' (lab.sh help)"
	fi
	if ((DOCKER)) && [[ $cmd != up && $cmd != demo ]]; then
		die "--docker is an option of 'up' and 'demo'"
	fi
	if ((JSON)); then
		[[ $cmd == up ]] || die "--json is an option of 'up'"
		# The JSON object is the only thing on standard output: everything else goes to stderr.
		exec 3>&1 1>&2
	fi
	exec 5>&1 6>&2
	trap on_exit EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	case $cmd in
	demo) cmd_demo ;;
	up) cmd_up ;;
	down) cmd_down ;;
	list) cmd_list ;;
	bench) cmd_bench ;;
	hops) cmd_hops ;;
	profile) cmd_profile ;;
	help | -h | --help) usage ;;
	*)
		usage >&2
		die "unknown subcommand '$cmd'"
		;;
	esac
}

main "$@"
