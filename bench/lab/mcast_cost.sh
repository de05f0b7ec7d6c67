#!/usr/bin/env bash
# What multicast costs weftd, measured on a lab left up with
# `lab.sh up --hosts 3 --multicast --prefix P`: iperf 2 sends PPS datagrams of 1000 bytes per
# second for SECONDS to 239.1.1.1 from host 1's container (TTL 1) while MEMBERS (0, 1 or 2) of
# the other hosts' containers listen; prints the datagrams sent, the copies host 1 replicated,
# and each host's weftd CPU time over the run, and the receivers' loss.
#
# Usage: bench/lab/mcast_cost.sh PREFIX MEMBERS [PPS] [SECONDS]   (PPS 4000 and 5 s by default;
# keep MEMBERS x PPS under --multicast-rate-limit, 10000 by default)
set -euo pipefail
P=${1:?prefix of a lab up with --multicast} M=${2:?members: 0, 1 or 2} PPS=${3:-4000} T=${4:-5}
[[ $M =~ ^[0-2]$ ]] || { echo "MEMBERS must be 0, 1 or 2" >&2; exit 2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/weft-mcost.XXXXXX")
SERVERS=()
cleanup() {
	local pid
	for pid in "${SERVERS[@]}"; do kill "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf -- "$WORK"
}
trap cleanup EXIT
weftd_pid() {
	local p
	for p in $(ip netns pids "$P-h$1"); do
		[[ $(cat "/proc/$p/comm" 2>/dev/null) == weftd ]] && echo "$p"
	done
}
# CPU time (user + system) in clock ticks.
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
replicated() {
	ip netns exec "$P-h1" python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:8286/metrics").read().decode())' |
		awk '$1 == "weft_multicast_packets_total{event=\"replicated\"}" {print int($2)}'
}
pids=("$(weftd_pid 1)" "$(weftd_pid 2)" "$(weftd_pid 3)")
for ((n = 2; n < 2 + M; n++)); do
	ip netns exec "$P-c$n" iperf -s -u -B 239.1.1.1 >"$WORK/server$n.log" 2>&1 &
	SERVERS+=($!)
done
sleep 4 # the joins reach host 1 through etcd
r0=$(replicated)
before=() after=()
for pid in "${pids[@]}"; do before+=("$(cpu "$pid")"); done
ip netns exec "$P-c1" iperf -c 239.1.1.1 -u -T 1 -t "$T" -l 1000 -b $((PPS * 8000)) >"$WORK/client.log" 2>&1
for pid in "${pids[@]}"; do after+=("$(cpu "$pid")"); done
r1=$(replicated)
sleep 1
sent=$(grep -o 'Sent [0-9]* datagrams' "$WORK/client.log" | awk '{print $2}' | tail -n 1)
tck=$(getconf CLK_TCK)
printf 'members %s, %s datagrams/s for %s s: sent %s, replicated by host 1 %s\n' "$M" "$PPS" "$T" "${sent:-?}" "$((r1 - r0))"
for n in 1 2 3; do
	ms=$(((after[n - 1] - before[n - 1]) * 1000 / tck))
	printf '  weftd host %s: %s ms CPU' "$n" "$ms"
	[[ -z $sent || $sent == 0 ]] || printf ', %s µs per datagram sent' "$((ms * 1000 / sent))"
	echo
done
for ((n = 2; n < 2 + M; n++)); do
	kill "${SERVERS[n - 2]}" 2>/dev/null || true
	printf '  receiver c%s: %s\n' "$n" "$(grep -h '%)' "$WORK/server$n.log" | tail -n 1)"
done
