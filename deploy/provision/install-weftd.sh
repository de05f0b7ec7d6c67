#!/bin/bash
# Installs weftd as a systemd service on this host:
#   /usr/local/bin/weftd                       the binary (target/release/weftd by default)
#   /etc/systemd/system/weftd.service          deploy/systemd/weftd.service
#   /etc/default/weftd                         FLANNELD_* settings for this host
#   /usr/local/share/doc/weft/                 operations.md and weftd.env.example
# then checks that the binary runs on this host, installs iptables if it is missing (weftd
# runs iptables-save and iptables-restore, which a fresh Debian 12 does not have), enables and
# restarts weftd.service and shows the subnet file it wrote.
# With --root DIR only the configuration files are written, under DIR (see lib.sh).
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

usage() {
	cat >&2 <<EOF
usage: $PROG --etcd-endpoints URLS [options]

  --etcd-endpoints URLS   comma-separated etcd client URLs (FLANNELD_ETCD_ENDPOINTS)
  --etcd-prefix PREFIX    etcd key prefix (FLANNELD_ETCD_PREFIX; weftd's default: /coreos.com/network)
  --iface NAME|IP         interface for the overlay (FLANNELD_IFACE)
  --iface-of IP           use the interface that holds IP on this host (resolved now)
  --public-ip IP          address other hosts send to (FLANNELD_PUBLIC_IP)
  --subnet-file PATH      where weftd writes the subnet file (FLANNELD_SUBNET_FILE;
                          default /run/flannel/subnet.env; the unit can write only under /run)
  --ip-masq               masquerade traffic leaving the overlay (FLANNELD_IP_MASQ=true)
  --healthz-ip IP         healthz/metrics address (FLANNELD_HEALTHZ_IP)
  --healthz-port PORT     healthz/metrics port (FLANNELD_HEALTHZ_PORT; 0 = off)
  --binary PATH           weftd binary to install (default: <repo>/target/release/weftd)
  --root DIR              write the configuration under DIR and change nothing else
EOF
	exit 1
}

etcd_endpoints="" etcd_prefix="" iface="" iface_of="" public_ip="" ip_masq=false
healthz_ip="" healthz_port="" binary=$REPO_DIR/target/release/weftd
subnet_file=""

while [ $# -gt 0 ]; do
	case $1 in
	--etcd-endpoints) need_value "$1" $#; etcd_endpoints=$2; shift 2 ;;
	--etcd-prefix) need_value "$1" $#; etcd_prefix=$2; shift 2 ;;
	--iface) need_value "$1" $#; iface=$2; shift 2 ;;
	--iface-of) need_value "$1" $#; iface_of=$2; shift 2 ;;
	--public-ip) need_value "$1" $#; public_ip=$2; shift 2 ;;
	--subnet-file) need_value "$1" $#; subnet_file=$2; shift 2 ;;
	--ip-masq) ip_masq=true; shift ;;
	--healthz-ip) need_value "$1" $#; healthz_ip=$2; shift 2 ;;
	--healthz-port) need_value "$1" $#; healthz_port=$2; shift 2 ;;
	--binary) need_value "$1" $#; binary=$2; shift 2 ;;
	--root) need_value "$1" $#; set_root "$2"; shift 2 ;;
	-h | --help) usage ;;
	*) log "unknown argument: $1"; usage ;;
	esac
done

[ -n "$etcd_endpoints" ] || { log "--etcd-endpoints is required"; usage; }
[ -z "$iface" ] || [ -z "$iface_of" ] || die "give --iface or --iface-of, not both"
[ -z "$iface_of" ] || is_ipv4 "$iface_of" || die "--iface-of needs an IPv4 address, got: $iface_of"
[ -z "$public_ip" ] || is_ipv4 "$public_ip" || die "--public-ip needs an IPv4 address, got: $public_ip"
[ -z "$healthz_ip" ] || is_ipv4 "$healthz_ip" || die "--healthz-ip needs an IPv4 address, got: $healthz_ip"
if [ -n "$healthz_port" ]; then
	if ! [[ $healthz_port =~ ^[0-9]{1,5}$ ]] || [ "$healthz_port" -gt 65535 ]; then
		die "--healthz-port needs a port number, got: $healthz_port"
	fi
fi
check_env_value --etcd-endpoints "$etcd_endpoints"
check_env_value --etcd-prefix "$etcd_prefix"
check_env_value --iface "$iface"
check_env_value --subnet-file "$subnet_file"
case $subnet_file in
"" | /run/*) ;;
/*) log "note: weftd.service may write only under /run; add ReadWritePaths=${subnet_file%/*} in a drop-in" ;;
*) die "--subnet-file needs an absolute path, got: $subnet_file" ;;
esac
require_root_user

if [ -n "$iface_of" ]; then
	! activating || ensure_command ip iproute2
	iface=$(ip -o -4 addr show | iface_holding_ip "$iface_of") ||
		die "no interface on this host holds $iface_of"
	log "interface holding $iface_of: $iface"
fi

# The environment file: only the settings this host needs; weftd's defaults cover the rest.
render_env() {
	echo "# /etc/default/weftd for weftd.service, written by deploy/provision/install-weftd.sh."
	echo "# All variables: /usr/local/share/doc/weft/weftd.env.example"
	echo "FLANNELD_ETCD_ENDPOINTS=$etcd_endpoints"
	[ -z "$etcd_prefix" ] || echo "FLANNELD_ETCD_PREFIX=$etcd_prefix"
	[ -z "$iface" ] || echo "FLANNELD_IFACE=$iface"
	[ -z "$public_ip" ] || echo "FLANNELD_PUBLIC_IP=$public_ip"
	[ -z "$subnet_file" ] || echo "FLANNELD_SUBNET_FILE=$subnet_file"
	echo "FLANNELD_IP_MASQ=$ip_masq"
	[ -z "$healthz_ip" ] || echo "FLANNELD_HEALTHZ_IP=$healthz_ip"
	[ -z "$healthz_port" ] || echo "FLANNELD_HEALTHZ_PORT=$healthz_port"
}

# 0600: the file may hold the etcd password (FLANNELD_ETCD_PASSWORD), added by hand later.
render_env | write_file /etc/default/weftd 0600
# One unit for every host, with or without a local etcd (it orders itself after etcd.service
# but does not require it).
copy_file "$DEPLOY_DIR/systemd/weftd.service" /etc/systemd/system/weftd.service 0644
copy_file "$REPO_DIR/docs/operations.md" /usr/local/share/doc/weft/operations.md 0644
copy_file "$DEPLOY_DIR/systemd/weftd.env.example" /usr/local/share/doc/weft/weftd.env.example 0644

if ! activating; then
	log "--root given: the binary is not copied and no service is touched"
	exit 0
fi

[ -x "$binary" ] ||
	die "weftd binary $binary not found; build it first: cargo build --release -p weft-control"
# A binary built against a newer C library than this host's cannot run here: say so now,
# before it replaces a working one and systemd reports only a failed start.
version=$("$binary" --version 2>&1) ||
	die "$binary does not run on this host (built for a newer glibc? build it on the same or an older distribution): $version"

# What weftd runs besides itself, on a fresh Debian 12 (which has neither): iptables-save and
# iptables-restore for the ip-masq and FORWARD rules. docker.io would pull iptables in, but
# docker is installed after weftd has started.
ensure_command iptables-save iptables
ensure_command iptables-restore iptables

# Copy, then rename over the old binary: a running weftd keeps its file.
mkdir -p /usr/local/bin
install -m 0755 -- "$binary" /usr/local/bin/.weftd.new
mv -f -- /usr/local/bin/.weftd.new /usr/local/bin/weftd
log "installed /usr/local/bin/weftd ($version)"

systemctl daemon-reload
systemctl enable weftd.service
# Type=notify: this returns once weftd has written the subnet file and reported READY=1.
if ! systemctl restart weftd.service; then
	journalctl -u weftd.service -n 30 --no-pager >&2 || true
	die "weftd.service did not start (its log is above; full log: journalctl -u weftd)"
fi

subnet_file=${subnet_file:-/run/flannel/subnet.env}
[ -f "$subnet_file" ] || die "weftd started but $subnet_file is missing; see journalctl -u weftd"
log "weftd is running; $subnet_file:"
cat -- "$subnet_file" >&2
