#!/usr/bin/env bash
# Prepares a Debian (or Ubuntu) machine to build, test and run weft's lab. Run as root.
#
# Installs what is missing of: etcd (server and etcdctl), protoc and protobuf's well-known .proto
# files (etcd-client's build needs both),
# iperf3, iproute2, ping, iptables, jq, python3, tcpdump and perf (the lab's hops and profile),
# docker.io and busybox-static (the lab's docker hosts and their image), nsenter, and iperf (2),
# socat and sockperf (multicast and latency tools for the lab's containers), wireguard-go and
# wireguard-tools (the lab's wireguard-go mode, the userspace WireGuard weft's encryption is
# measured against).
# Runs `apt-get update` only when something is missing, so a second run changes nothing and needs
# no network. docker.io's service is not started by the installation: the lab runs its own
# dockerd inside its namespaces, and a dockerd in the root namespace would add docker0 and
# iptables rules there. Then checks /dev/net/tun and that
# a Rust toolchain (cargo) is installed. Exits non-zero, saying why, if anything is missing.
set -euo pipefail

PACKAGES=(etcd-server etcd-client protobuf-compiler libprotobuf-dev iperf3 iproute2 iputils-ping iptables jq python3 curl tcpdump linux-perf
	docker.io busybox-static util-linux iperf socat sockperf wireguard-go wireguard-tools nftables)
# What each package must provide.
COMMANDS=(/usr/bin/etcd etcdctl protoc iperf3 ip bridge ping iptables jq python3 tcpdump perf
	dockerd containerd runc docker /bin/busybox nsenter iperf socat sockperf wireguard-go wg nft)

say() { printf '[setup] %s\n' "$*"; }
die() {
	printf '[setup] error: %s\n' "$*" >&2
	exit 1
}

[[ $EUID -eq 0 ]] || die "run as root: sudo bash scripts/setup.sh"
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
	die "apt-get/dpkg-query not found: this script supports Debian and Ubuntu; install by hand: ${PACKAGES[*]}"
fi

installed() {
	[[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]
}

missing=()
for p in "${PACKAGES[@]}"; do
	installed "$p" || missing+=("$p")
done

# block_service_starts: while packages are installed, keep their maintainer scripts from starting
# docker or containerd (a policy-rc.d that refuses them, removed again on exit). An existing
# policy-rc.d is left as it is.
POLICY=/usr/sbin/policy-rc.d
block_service_starts() {
	[[ ! -e $POLICY ]] || return 0
	cat >"$POLICY" <<'EOF'
#!/bin/sh
# Written by weft's scripts/setup.sh for the length of one apt-get install.
case "$1" in
docker | docker.service | docker.socket | containerd | containerd.service) exit 101 ;;
esac
exit 0
EOF
	chmod 755 "$POLICY"
	trap 'rm -f -- "$POLICY"' EXIT
}

if ((${#missing[@]})); then
	say "installing: ${missing[*]}"
	block_service_starts
	export DEBIAN_FRONTEND=noninteractive
	apt-get update || die "apt-get update failed"
	apt-get install -y --no-install-recommends "${missing[@]}" || die "apt-get install ${missing[*]} failed"
	for p in "${missing[@]}"; do
		installed "$p" || die "package $p is still not installed"
	done
else
	say "packages present: ${PACKAGES[*]}"
fi

for c in "${COMMANDS[@]}"; do
	command -v "$c" >/dev/null 2>&1 || die "'$c' not found after installing ${PACKAGES[*]}"
done

# docker.io's units stay off: a dockerd in the root namespace (at boot, or started by its socket
# when a docker client runs without -H) would add docker0 and iptables rules there, and a system
# containerd would be shared by the lab's dockerds. The lab starts its own dockerd per host.
if command -v systemctl >/dev/null 2>&1; then
	units=(docker.service docker.socket containerd.service)
	systemctl --root=/ disable "${units[@]}" >/dev/null 2>&1 || true
	for u in "${units[@]}"; do
		state=$(systemctl --root=/ is-enabled "$u" 2>/dev/null || true)
		[[ $state != enabled ]] || die "cannot disable $u: it would start a dockerd in the root network namespace"
	done
fi

[[ -f /usr/include/google/protobuf/descriptor.proto ]] ||
	die "protobuf's well-known types (/usr/include/google/protobuf/*.proto) are missing after installing libprotobuf-dev"

if [[ ! -c /dev/net/tun ]]; then
	modprobe tun 2>/dev/null || true
	[[ -c /dev/net/tun ]] || die "/dev/net/tun is missing: the kernel needs TUN support (CONFIG_TUN, 'modprobe tun')"
fi

cargo_found=""
if command -v cargo >/dev/null 2>&1; then
	cargo_found=$(command -v cargo)
elif [[ -n ${SUDO_USER:-} ]]; then
	# Under sudo, root's PATH usually lacks the invoking user's ~/.cargo/bin.
	home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
	[[ -x $home/.cargo/bin/cargo ]] && cargo_found=$home/.cargo/bin/cargo
fi
[[ -n $cargo_found ]] || die "cargo not found: install a Rust toolchain (https://rustup.rs), version 1.85 or later"

say "ok: packages installed, /dev/net/tun present, cargo at $cargo_found"
