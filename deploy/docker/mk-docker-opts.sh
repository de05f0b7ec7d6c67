#!/bin/bash
# Turns the subnet file that weftd (or flanneld) writes into dockerd options:
#
#   FLANNEL_SUBNET=10.1.15.1/24   ->  --bip=10.1.15.1/24
#   FLANNEL_MTU=1472              ->  --mtu=1472
#   FLANNEL_IPMASQ=false          ->  --ip-masq=true
#   FLANNEL_IPMASQ=true           ->  --ip-masq=false
#
# The ip-masq option is the inverse of FLANNEL_IPMASQ: when the overlay daemon runs with
# --ip-masq it already masquerades traffic that leaves the overlay, and docker must not
# masquerade as well (docker's rule would also rewrite container-to-container traffic that
# crosses hosts through the TUN device). When FLANNEL_IPMASQ is false, docker does the
# masquerading itself. Without FLANNEL_IPMASQ in the file no ip-masq option is written.
#
# Same options and the same output as flannel's mk-docker-opts.sh (v0.20.2), byte for byte,
# so units and scripts written for it work unchanged: the DOCKER_OPT_* variables in the
# order of their names (BIP, IPMASQ, MTU), the combined variable last, its value built as
# flannel's is (a leading space, and two spaces after a value taken from the environment),
# DOCKER_OPT_* variables from the environment included in that order, and the same refusal
# when the routing table already routes this subnet through a gateway.
# Differences, all deliberate, all for input flannel's script mishandles:
#   - the subnet file is parsed, never sourced (it is not executed as shell), and FLANNEL_*
#     values come from it alone, not from the environment;
#   - a missing file, a missing or invalid FLANNEL_SUBNET or FLANNEL_MTU, an invalid
#     FLANNEL_IPMASQ or a malformed line is an error instead of an empty or broken result,
#     and so is a DOCKER_OPT_* value from the environment that cannot be written unquoted;
#   - DOCKER_OPT_BIP, DOCKER_OPT_MTU and DOCKER_OPT_IPMASQ always come from the subnet file
#     and the options: values of them in the environment are ignored. A docker unit that
#     reads this script's previous output as an EnvironmentFile (as the drop-in here does)
#     passes them in, and flannel's script would then keep a stale --ip-masq despite -m;
#   - on any error (the routing check included) the old output file is left as it was;
#     otherwise it is replaced atomically;
#   - -w SECONDS (not in flannel's script) waits that long for the subnet file to appear.
set -euo pipefail

prog=${0##*/}

usage() {
	cat >&2 <<EOF
usage: $prog [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY] [-w SECONDS]

Generate Docker daemon options from a flannel/weft subnet file.
OPTIONS:
	-f	Path to the subnet file. Defaults to /run/flannel/subnet.env
	-d	Path to the Docker env file to write. Defaults to /run/docker_opts.env
	-i	Output each Docker option as an individual variable, e.g. DOCKER_OPT_MTU="--mtu=1472"
	-c	Output the combined Docker options into the DOCKER_OPTS variable
	-k	Name of the combined options variable (default DOCKER_OPTS)
	-m	Do not output --ip-masq
	-w	Wait up to SECONDS for the subnet file to appear (default 0: do not wait)
Without -i and -c both kinds are written. If the combined variable is set in the environment,
its value is kept in front of the generated options; other DOCKER_OPT_* variables in the
environment are written too.
EOF
	exit 1
}

die() {
	printf '%s: %s\n' "$prog" "$*" >&2
	exit 1
}

flannel_env=/run/flannel/subnet.env
docker_env=/run/docker_opts.env
combined_key=DOCKER_OPTS
indiv_opts=false
combined_opts=false
ipmasq=true
wait_seconds=0

while getopts ":f:d:icmk:w:h" opt; do
	case $opt in
	f) flannel_env=$OPTARG ;;
	d) docker_env=$OPTARG ;;
	i) indiv_opts=true ;;
	c) combined_opts=true ;;
	m) ipmasq=false ;;
	k) combined_key=$OPTARG ;;
	w) wait_seconds=$OPTARG ;;
	:) printf '%s: option -%s needs a value\n' "$prog" "$OPTARG" >&2; usage ;;
	h) usage ;;
	*) printf '%s: unknown option -%s\n' "$prog" "$OPTARG" >&2; usage ;;
	esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || { printf '%s: unexpected argument: %s\n' "$prog" "$1" >&2; usage; }

if [ "$indiv_opts" = false ] && [ "$combined_opts" = false ]; then
	indiv_opts=true
	combined_opts=true
fi

[[ $combined_key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] ||
	die "-k: not a valid variable name: $combined_key"
[[ $combined_key != DOCKER_OPT_* ]] ||
	die "-k: $combined_key would be taken for one of the DOCKER_OPT_* options"
[[ $wait_seconds =~ ^[0-9]{1,5}$ ]] || die "-w: not a number of seconds: $wait_seconds"

# weftd writes the subnet file once it holds a lease, which can take a while after boot (etcd
# unreachable, weftd restarting): wait for it rather than fail at once.
for ((waited = 0; waited < 10#$wait_seconds; waited++)); do
	[ ! -e "$flannel_env" ] || break
	sleep 1
done

if [ ! -e "$flannel_env" ]; then
	[ "$wait_seconds" = 0 ] || die "subnet file $flannel_env did not appear within $wait_seconds s (is weftd running?)"
	die "subnet file $flannel_env does not exist (is weftd running?)"
fi
[ -f "$flannel_env" ] || die "subnet file $flannel_env is not a regular file"
[ -r "$flannel_env" ] || die "subnet file $flannel_env is not readable"

# Read KEY=VALUE lines; blank lines and # comments are allowed, anything else is an error.
subnet="" mtu="" ipmasq_value="" have_ipmasq=false
lineno=0
while IFS= read -r line || [ -n "$line" ]; do
	lineno=$((lineno + 1))
	line=${line%$'\r'}
	[[ $line =~ ^[[:space:]]*(#.*)?$ ]] && continue
	if ! [[ $line =~ ^([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]]; then
		die "$flannel_env:$lineno: malformed line (expected KEY=VALUE): $line"
	fi
	key=${BASH_REMATCH[1]}
	value=${BASH_REMATCH[2]}
	if [[ $value =~ ^\"(.*)\"$ ]] || [[ $value =~ ^\'(.*)\'$ ]]; then
		value=${BASH_REMATCH[1]}
	fi
	case $key in
	FLANNEL_SUBNET) subnet=$value ;;
	FLANNEL_MTU) mtu=$value ;;
	FLANNEL_IPMASQ) ipmasq_value=$value; have_ipmasq=true ;;
	esac
done <"$flannel_env"

[ -n "$subnet" ] || die "$flannel_env: FLANNEL_SUBNET is missing or empty"
[ -n "$mtu" ] || die "$flannel_env: FLANNEL_MTU is missing or empty"

octet='(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])'
if ! [[ $subnet =~ ^$octet\.$octet\.$octet\.$octet/(3[0-2]|[12]?[0-9])$ ]]; then
	die "$flannel_env: FLANNEL_SUBNET is not an IPv4 address/prefix: $subnet"
fi
if ! [[ $mtu =~ ^[0-9]{2,5}$ ]] || [ "$mtu" -lt 68 ] || [ "$mtu" -gt 65535 ]; then
	die "$flannel_env: FLANNEL_MTU is not a number from 68 to 65535: $mtu"
fi

# The options, by variable name. Besides the three made here, flannel's script writes every
# DOCKER_OPT_* variable it finds in its environment; so does this one.
declare -A opts=([DOCKER_OPT_BIP]="--bip=$subnet" [DOCKER_OPT_MTU]="--mtu=$mtu")
if [ "$have_ipmasq" = true ] && [ "$ipmasq" = true ]; then
	case $ipmasq_value in
	true) opts[DOCKER_OPT_IPMASQ]=--ip-masq=false ;;
	false) opts[DOCKER_OPT_IPMASQ]=--ip-masq=true ;;
	*) die "Invalid value of FLANNEL_IPMASQ: $ipmasq_value" ;;
	esac
fi
while IFS= read -r name; do
	case $name in
	DOCKER_OPT_BIP | DOCKER_OPT_MTU | DOCKER_OPT_IPMASQ) continue ;;
	DOCKER_OPT_*) ;;
	*) continue ;;
	esac
	[[ ${!name} =~ ^[A-Za-z0-9_./:,@%+=-]*$ ]] ||
		die "$name in the environment: only letters, digits and _ . / : , @ % + = - can be written: ${!name}"
	opts[$name]=${!name}
done < <(compgen -e)

# In the order of the names, bytewise, as the shell's `set` lists them for flannel's script.
mapfile -t names < <(printf '%s\n' "${!opts[@]}" | LC_ALL=C sort)

# flannel's combined value: the environment's value and a space, then " OPTION" for each.
combined=${!combined_key:-}
[ -z "$combined" ] || combined+=" "
output=""
for name in "${names[@]}"; do
	if [ "$indiv_opts" = true ]; then
		output+="$name=\"${opts[$name]}\""$'\n'
	fi
	combined+=" ${opts[$name]}"
done
if [ "$combined_opts" = true ]; then
	output+="$combined_key=\"$combined\""$'\n'
fi

# As flannel's script: refuse when the routing table already sends this host's subnet through
# a gateway (left over from another backend, or another host's route): docker0 would take
# addresses that are routed elsewhere. Without the ip command there is nothing to check.
if command -v ip >/dev/null 2>&1; then
	IFS=./ read -r a b c d len <<<"$subnet"
	addr=$(((a << 24) | (b << 16) | (c << 8) | d))
	net=$((addr & ~((1 << (32 - len)) - 1) & 0xffffffff))
	network=$((net >> 24)).$(((net >> 16) & 255)).$(((net >> 8) & 255)).$((net & 255))/$len
	while IFS= read -r route; do
		if [[ $route == "$network "* && $route == *" via "* ]]; then
			die "Your routing table already contains the subnet: $route"
		fi
	done < <(ip -4 route show 2>/dev/null || true)
fi

# Write next to the target and rename, so dockerd never reads a half-written file.
[ ! -d "$docker_env" ] || die "cannot write $docker_env: it is a directory"
out_dir=$(dirname -- "$docker_env")
[ -d "$out_dir" ] || die "cannot write $docker_env: directory $out_dir does not exist"
tmp=$(mktemp "$out_dir/.${docker_env##*/}.XXXXXX") || die "cannot create a temporary file in $out_dir"
trap 'rm -f -- "$tmp"' EXIT
printf '%s' "$output" >"$tmp"
chmod 0644 "$tmp"
mv -f -- "$tmp" "$docker_env" || die "cannot replace $docker_env"
trap - EXIT
