#!/bin/bash
# Sets up a single-member etcd (Debian's etcd-server, v3 API) that serves the overlay's
# configuration and leases to every host:
#   /etc/default/etcd                   listens on IP:2379 (other hosts) and 127.0.0.1:2379
#   /etc/weft/network-config.json       the overlay network configuration
# then installs and starts etcd and stores the configuration under PREFIX/config unless a
# configuration is already there (an existing overlay is never changed).
# With --root DIR only the files are written, under DIR (see lib.sh).
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

usage() {
	cat >&2 <<EOF
usage: $PROG --name NAME --ip IP [options]

  --name NAME             etcd member name (e.g. the host name)
  --ip IP                 address on which other hosts reach etcd
  --network-config JSON   overlay configuration (default: $default_config)
  --etcd-prefix PREFIX    key prefix (default: /coreos.com/network)
  --root DIR              write the files under DIR and change nothing else
EOF
	exit 1
}

default_config='{"Network":"10.1.0.0/16","Backend":{"Type":"udp"}}'
name="" ip="" network_config=$default_config prefix=/coreos.com/network

while [ $# -gt 0 ]; do
	case $1 in
	--name) need_value "$1" $#; name=$2; shift 2 ;;
	--ip) need_value "$1" $#; ip=$2; shift 2 ;;
	--network-config) need_value "$1" $#; network_config=$2; shift 2 ;;
	--etcd-prefix) need_value "$1" $#; prefix=$2; shift 2 ;;
	--root) need_value "$1" $#; set_root "$2"; shift 2 ;;
	-h | --help) usage ;;
	*) log "unknown argument: $1"; usage ;;
	esac
done

[ -n "$name" ] || { log "--name is required"; usage; }
[ -n "$ip" ] || { log "--ip is required"; usage; }
[[ $name =~ ^[A-Za-z0-9][A-Za-z0-9.-]*$ ]] || die "--name: not a host-name-like member name: $name"
is_ipv4 "$ip" || die "--ip needs an IPv4 address, got: $ip"
[[ $prefix =~ ^/[A-Za-z0-9_./-]*[A-Za-z0-9_.-]$ ]] || die "--etcd-prefix: not a key prefix: $prefix"
# A cheap shape check here; etcd stores the text as given and weftd validates it.
[[ $network_config =~ ^\{.*\}$ ]] || die "--network-config must be a JSON object, got: $network_config"
require_root_user

client_url=http://$ip:2379
peer_url=http://$ip:2380

render_etcd_env() {
	cat <<EOF
# /etc/default/etcd, written by deploy/provision/install-etcd.sh: a single-member cluster.
ETCD_NAME=$name
ETCD_DATA_DIR=/var/lib/etcd/default
ETCD_LISTEN_CLIENT_URLS=$client_url,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=$client_url
ETCD_LISTEN_PEER_URLS=$peer_url
ETCD_INITIAL_ADVERTISE_PEER_URLS=$peer_url
ETCD_INITIAL_CLUSTER=$name=$peer_url
ETCD_INITIAL_CLUSTER_STATE=new
ETCD_INITIAL_CLUSTER_TOKEN=weft-$name
EOF
}

render_etcd_env | write_file /etc/default/etcd 0644
printf '%s\n' "$network_config" | write_file /etc/weft/network-config.json 0644

if ! activating; then
	log "--root given: etcd is not installed or started"
	exit 0
fi

# The package starts etcd on installation; the file above is already in place, so that first
# start uses it (--force-confold keeps our file instead of the package's).
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
	etcd-server etcd-client
systemctl enable etcd.service
systemctl restart etcd.service

export ETCDCTL_API=3
for _ in $(seq 30); do
	etcdctl --endpoints="$client_url" endpoint health >/dev/null 2>&1 && break
	sleep 1
done
etcdctl --endpoints="$client_url" endpoint health || die "etcd does not answer on $client_url"

key=$prefix/config
current=$(etcdctl --endpoints="$client_url" get --print-value-only "$key")
if [ -z "$current" ]; then
	etcdctl --endpoints="$client_url" put "$key" "$network_config" >/dev/null
	log "stored $key = $network_config"
else
	log "keeping the existing $key = $current"
fi
