# shellcheck shell=bash
# Shared by the provisioning scripts in this directory (sourced, not run).
#
# Every script works in two modes:
#   - on the real system (the default): writes its files to / and then activates them
#     (installs packages, reloads systemd, starts services);
#   - with --root DIR: writes the same files under DIR and changes nothing else: no package
#     manager, no systemctl, no network. This is how the files are checked on a machine that
#     cannot run the VMs, and how other tools (the namespace lab) can reuse the rendering.

set -euo pipefail

PROG=${0##*/}
# deploy/ and the repository root, found from this file's location; used by the scripts.
# shellcheck disable=SC2034
DEPLOY_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC2034
REPO_DIR=$(cd -- "$DEPLOY_DIR/.." && pwd)

# Empty for the real system, else the directory given with --root (no trailing slash).
ROOT=""

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
	printf '%s: error: %s\n' "$PROG" "$*" >&2
	exit 1
}

# set_root DIR: switch to writing under DIR (which must be an absolute path).
set_root() {
	case $1 in
	/) ROOT="" ;;
	/*) ROOT=${1%/} ;;
	*) die "--root needs an absolute path, got: $1" ;;
	esac
}

# True when the script acts on the real system, false with --root.
activating() { [ -z "$ROOT" ]; }

# need_value OPTION ARGC: an option that takes a value must have one.
need_value() { [ "$2" -ge 2 ] || die "$1 needs a value"; }

# parse_root_only ARGS...: the command line of a script whose only option is --root DIR.
parse_root_only() {
	while [ $# -gt 0 ]; do
		case $1 in
		--root) need_value "$1" $#; set_root "$2"; shift 2 ;;
		-h | --help) root_only_usage ;;
		*) log "unknown argument: $1"; root_only_usage ;;
		esac
	done
}

root_only_usage() {
	cat >&2 <<EOF2
usage: $PROG [--root DIR]

  --root DIR   write the files under DIR and change nothing else
EOF2
	exit 1
}

# Fail early when changes to the real system would fail half-way for lack of rights.
require_root_user() {
	if activating && [ "$(id -u)" -ne 0 ]; then
		die "must run as root (or use --root DIR to only write the files)"
	fi
}

# write_file PATH MODE: write stdin to PATH under $ROOT, atomically (temp file, rename).
write_file() {
	local path=$ROOT$1 mode=$2 dir tmp
	dir=$(dirname -- "$path")
	mkdir -p -- "$dir"
	tmp=$(mktemp "$dir/.${path##*/}.XXXXXX")
	if ! cat >"$tmp"; then
		rm -f -- "$tmp"
		die "cannot write $path"
	fi
	chmod "$mode" "$tmp"
	mv -f -- "$tmp" "$path"
	log "wrote $1"
}

# copy_file SOURCE PATH MODE: copy a file from the repository to PATH under $ROOT.
copy_file() {
	[ -f "$1" ] || die "missing source file $1"
	write_file "$2" "$3" <"$1"
}

# ensure_command COMMAND PACKAGE: install the Debian PACKAGE unless COMMAND is already
# there, and fail unless it is there afterwards. A fresh Debian box lacks packages that a
# later step takes for granted (iptables before docker.io pulls it in), so each step installs
# what it needs itself instead of relying on the order of the steps.
ensure_command() {
	local cmd=$1 pkg=$2
	command -v "$cmd" >/dev/null 2>&1 && return 0
	command -v apt-get >/dev/null 2>&1 ||
		die "$cmd is missing and there is no apt-get to install it: install $pkg first"
	log "$cmd is missing: installing $pkg"
	DEBIAN_FRONTEND=noninteractive apt-get update -q || die "apt-get update failed"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$pkg" ||
		die "apt-get install $pkg failed"
	command -v "$cmd" >/dev/null 2>&1 || die "$cmd is still missing after installing $pkg"
}

# is_ipv4 ADDR: a dotted-quad IPv4 address.
is_ipv4() {
	local octet='(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])'
	[[ $1 =~ ^$octet\.$octet\.$octet\.$octet$ ]]
}

# check_env_value NAME VALUE: VALUE can be written as NAME=VALUE in a systemd EnvironmentFile
# without quoting: letters, digits and _ . / : , @ % + = - only.
check_env_value() {
	local safe='^[A-Za-z0-9_./:,@%+=-]*$'
	[[ $2 =~ $safe ]] || die "$1: unsupported characters in value: $2"
}

# iface_holding_ip IP: reads `ip -o -4 addr show` output on stdin and prints the name of the
# interface that holds IP; fails if none does.
iface_holding_ip() {
	local want=$1 found="" line name addr
	while IFS= read -r line; do
		# "3: eth1    inet 192.168.56.101/24 brd ... scope global eth1\       valid_lft ..."
		[[ $line =~ ^[0-9]+:[[:space:]]+([^[:space:]]+)[[:space:]]+inet[[:space:]]+([0-9.]+)/ ]] || continue
		name=${BASH_REMATCH[1]%%@*}
		addr=${BASH_REMATCH[2]}
		if [ "$addr" = "$want" ]; then
			found=$name
			break
		fi
	done
	[ -n "$found" ] || return 1
	printf '%s\n' "$found"
}
