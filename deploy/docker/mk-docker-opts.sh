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
# Same options and output format as flannel's mk-docker-opts.sh, so units written for it work
# unchanged. Differences, all deliberate: the subnet file is parsed, never sourced (it is not
# executed as shell); a missing file, a missing FLANNEL_SUBNET or FLANNEL_MTU, or a malformed
# line is an error instead of an empty result; -m works; the output file is replaced
# atomically; the combined variable has no leading space.
set -euo pipefail

prog=${0##*/}

usage() {
	cat >&2 <<EOF
usage: $prog [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]

Generate Docker daemon options from a flannel/weft subnet file.
OPTIONS:
	-f	Path to the subnet file. Defaults to /run/flannel/subnet.env
	-d	Path to the Docker env file to write. Defaults to /run/docker_opts.env
	-i	Output each Docker option as an individual variable, e.g. DOCKER_OPT_MTU="--mtu=1472"
	-c	Output the combined Docker options into the DOCKER_OPTS variable
	-k	Name of the combined options variable (default DOCKER_OPTS)
	-m	Do not output --ip-masq
Without -i and -c both kinds are written. If the combined variable is set in the environment,
its value is kept in front of the generated options.
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

while getopts ":f:d:icmk:h" opt; do
	case $opt in
	f) flannel_env=$OPTARG ;;
	d) docker_env=$OPTARG ;;
	i) indiv_opts=true ;;
	c) combined_opts=true ;;
	m) ipmasq=false ;;
	k) combined_key=$OPTARG ;;
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

[ -e "$flannel_env" ] || die "subnet file $flannel_env does not exist (is weftd running?)"
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

opt_names=(DOCKER_OPT_BIP DOCKER_OPT_MTU)
opt_values=("--bip=$subnet" "--mtu=$mtu")
if [ "$have_ipmasq" = true ] && [ "$ipmasq" = true ]; then
	case $ipmasq_value in
	true) docker_ipmasq=false ;;
	false) docker_ipmasq=true ;;
	*) die "Invalid value of FLANNEL_IPMASQ: $ipmasq_value" ;;
	esac
	opt_names+=(DOCKER_OPT_IPMASQ)
	opt_values+=("--ip-masq=$docker_ipmasq")
fi

combined=${!combined_key:-}
output=""
for i in "${!opt_names[@]}"; do
	if [ "$indiv_opts" = true ]; then
		output+="${opt_names[$i]}=\"${opt_values[$i]}\""$'\n'
	fi
	combined+="${combined:+ }${opt_values[$i]}"
done
if [ "$combined_opts" = true ]; then
	output+="$combined_key=\"$combined\""$'\n'
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
