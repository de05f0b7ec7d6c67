#!/bin/bash
# Checks deploy/ (systemd units, docker integration, CNI configuration, provisioning scripts),
# vagrant/ and docs/operations.md. Needs no network and changes nothing outside a temporary
# directory: VMs are not booted; the Vagrantfile is validated offline inside a network
# namespace of its own, and every VM's provisioning is rendered with --root and checked;
# install-weftd.sh's real-system half runs in a private mount namespace with stand-ins for the
# package manager and systemctl.
#
#   bash deploy/test.sh
#
# Prerequisites: root (namespaces), systemd-analyze, vagrant (with vagrant-libvirt), ruby,
# rsync, shellcheck, jq, python3, unshare, and the weftd binary (target/release/weftd, or
# WEFTD_BIN) for the flag documentation check. vagrant and shellcheck are installed with apt-get when missing. A missing
# prerequisite fails its checks under CI=true; elsewhere those checks are reported as skipped.
# Ends with "deploy: N passed, N failed" (", N skipped" when some were).
set -uo pipefail

REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
# Files written by a real flanneld, kept with the control plane's integration tests.
FIXTURES=$REPO/control/tests/fixtures/flannel-v0.20.2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/weft-deploy-test.XXXXXX")
trap 'rm -rf -- "$WORK"' EXIT
# The running check's own temporary directory (set by run_test).
TMP=$WORK

passed=0 failed=0 skipped=0
failed_names=()

# --- harness ------------------------------------------------------------------------------

# run_test NAME FUNCTION: runs FUNCTION in a subshell with its output captured; a non-zero
# exit is a failure and shows the output.
run_test() {
	local name=$1 fn=$2 n=$((passed + failed + skipped))
	local log=$WORK/log.$n
	# Each check gets a temporary directory of its own.
	TMP=$WORK/test.$n
	mkdir -p "$TMP"
	(
		set -e
		cd "$REPO"
		"$fn"
	) >"$log" 2>&1
	local rc=$?
	if [ $rc -eq 0 ]; then
		passed=$((passed + 1))
		printf 'ok      %s\n' "$name"
	else
		failed=$((failed + 1))
		failed_names+=("$name")
		printf 'FAIL    %s\n' "$name"
		sed 's/^/        | /' "$log"
	fi
}

# strict: CI=true or CI=1 (as scripts/test.sh reads it), where a missing prerequisite fails.
strict() { [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; }

# skip_or_fail NAME REASON: a check that cannot run. Under CI that is a failure.
skip_or_fail() {
	if strict; then
		failed=$((failed + 1))
		failed_names+=("$1")
		printf 'FAIL    %s: %s\n' "$1" "$2"
	else
		skipped=$((skipped + 1))
		printf 'SKIP    %s: %s (a failure under CI=true)\n' "$1" "$2"
	fi
}

fail() {
	printf 'assertion failed: %s\n' "$*" >&2
	exit 1
}

# assert_file FILE EXPECTED: FILE's content is exactly EXPECTED (plus a final newline).
assert_file() {
	[ -f "$1" ] || fail "$1 does not exist"
	diff -u --label expected --label "$1" <(printf '%s\n' "$2") "$1" || fail "$1 differs"
}

assert_eq() {
	[ "$1" = "$2" ] || fail "${3:-value}: expected [$1], got [$2]"
}

assert_grep() {
	grep -q -E -- "$2" "$1" || fail "$1 does not match /$2/"
}

# expect_failure PATTERN CMD...: CMD exits non-zero and says PATTERN on stderr.
expect_failure() {
	local pattern=$1
	shift
	if "$@" >"$TMP/out" 2>"$TMP/err"; then
		fail "expected a failure from: $*"
	fi
	grep -q -E -- "$pattern" "$TMP/err" || {
		cat "$TMP/err" >&2
		fail "stderr of [$*] does not match /$pattern/"
	}
}

have() { command -v "$1" >/dev/null 2>&1; }

# Install a Debian package when its command is missing (apt is the only network use, and only
# for installing).
ensure_tool() {
	local cmd=$1
	shift
	have "$cmd" && return 0
	if [ "$(id -u)" -eq 0 ] && have apt-get; then
		echo "deploy/test.sh: installing $* for $cmd" >&2
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >"$WORK/apt.log" 2>&1 ||
			{ apt-get update -q >/dev/null 2>&1 &&
				DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >"$WORK/apt.log" 2>&1; } ||
			tail -5 "$WORK/apt.log" >&2
	fi
	have "$cmd"
}

# --- shell scripts -------------------------------------------------------------------------

SCRIPTS=(
	deploy/docker/mk-docker-opts.sh
	deploy/provision/lib.sh
	deploy/provision/configure-network.sh
	deploy/provision/install-etcd.sh
	deploy/provision/install-weftd.sh
	deploy/provision/install-docker.sh
	deploy/test.sh
)

test_bash_syntax() {
	local f
	for f in "${SCRIPTS[@]}"; do
		bash -n "$f" || fail "bash -n $f"
	done
	for f in deploy/docker/mk-docker-opts.sh deploy/provision/{configure-network,install-etcd,install-weftd,install-docker}.sh; do
		[ -x "$f" ] || fail "$f is not executable"
	done
}

test_shellcheck() {
	shellcheck -x "${SCRIPTS[@]}"
}

# --- mk-docker-opts.sh ---------------------------------------------------------------------

MK=deploy/docker/mk-docker-opts.sh
MK_CASES=deploy/tests/mk-docker-opts.cases

# The script reads the routing table (`ip -4 route show`); the checks give it a table of their
# own: an `ip` that prints the file $FAKE_ROUTES (nothing when unset) and refuses anything else.
MK_BIN=$WORK/mk-bin
mkdir -p "$MK_BIN"
# shellcheck disable=SC2016
printf '%s\n' '#!/bin/sh' '[ "$*" = "-4 route show" ] || exit 1' 'cat "${FAKE_ROUTES:-/dev/null}"' >"$MK_BIN/ip"
chmod 0755 "$MK_BIN/ip"

# mk ARGS...: mk-docker-opts.sh with the stand-in routing table.
mk() { PATH="$MK_BIN:$PATH" "$REPO/$MK" "$@"; }

test_mk_fixture_default() {
	mk -f "$FIXTURES/subnet.env" -d "$TMP/opts.env"
	assert_file "$TMP/opts.env" 'DOCKER_OPT_BIP="--bip=10.1.15.1/24"
DOCKER_OPT_IPMASQ="--ip-masq=true"
DOCKER_OPT_MTU="--mtu=1472"
DOCKER_OPTS=" --bip=10.1.15.1/24 --ip-masq=true --mtu=1472"'
	[ "$(stat -c %a "$TMP/opts.env")" = 644 ] || fail "output mode is not 0644"
	# The file is usable both as a systemd EnvironmentFile and from a shell.
	# shellcheck disable=SC1091
	assert_eq " --bip=10.1.15.1/24 --ip-masq=true --mtu=1472" "$(. "$TMP/opts.env" && echo "$DOCKER_OPTS")"
	[ -z "$(find "$TMP" -maxdepth 1 -name '.opts.env.*')" ] || fail "temporary file left behind"
}

# mk_case INPUT ENVWORDS ARGS EXPECTED: run one case of $MK_CASES in an otherwise empty
# environment and compare the output file with EXPECTED byte for byte.
mk_case() {
	local input=$1 envwords=$2 args=$3 expected=$4
	local -a env_args=() opt_args=()
	[ "$envwords" = - ] || read -r -a env_args <<<"$envwords"
	[ "$args" = - ] || read -r -a opt_args <<<"$args"
	rm -f "$TMP/out.env"
	env -i PATH="$MK_BIN:$PATH" "${env_args[@]}" "$REPO/$MK" "${opt_args[@]}" \
		-f "$TMP/in/$input.env" -d "$TMP/out.env" || fail "case [$input | $envwords | $args] failed"
	cmp -s "$expected" "$TMP/out.env" || {
		diff -u --label "flannel: $input | $envwords | $args" --label ours "$expected" "$TMP/out.env"
		fail "case [$input | $envwords | $args] differs from flannel's output"
	}
}

# Every case of $MK_CASES gives flannel's output for the same subnet file, options and
# environment.
test_mk_flannel_cases() {
	local line block="" input="" envwords="" args="" cases=0 expected=$TMP/expected
	mkdir -p "$TMP/in"
	while IFS= read -r line; do
		case $line in
		'## input '* | '## case '*)
			if [ "$block" = case ]; then
				mk_case "$input" "$envwords" "$args" "$expected"
				cases=$((cases + 1))
			fi
			;;
		esac
		case $line in
		'## input '*)
			block=input input=${line#'## input '}
			: >"$TMP/in/$input.env"
			;;
		'## case '*)
			block=case
			IFS='|' read -r input envwords args <<<"${line#'## case '}"
			read -r input <<<"$input"
			read -r envwords <<<"$envwords"
			read -r args <<<"$args"
			[ -f "$TMP/in/$input.env" ] || fail "$line: no input named $input"
			: >"$expected"
			;;
		'#'*) [ -z "$block" ] || fail "$MK_CASES: a comment inside a block: $line" ;;
		*)
			case $block in
			input) printf '%s\n' "$line" >>"$TMP/in/$input.env" ;;
			case) printf '%s\n' "$line" >>"$expected" ;;
			*) fail "$MK_CASES: a line outside a block: $line" ;;
			esac
			;;
		esac
	done <"$MK_CASES"
	if [ "$block" = case ]; then
		mk_case "$input" "$envwords" "$args" "$expected"
		cases=$((cases + 1))
	fi
	echo "$cases cases give flannel's output"
	[ "$cases" -ge 40 ] || fail "only $cases cases in $MK_CASES"
}

test_mk_env_options() {
	local f=$TMP/s.env
	printf 'FLANNEL_SUBNET=10.1.15.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n' >"$f"
	# The three options made here always come from the file and the flags, never from a
	# previous run's output passed back in as environment (docker's drop-in does that).
	DOCKER_OPT_IPMASQ=--ip-masq=true DOCKER_OPT_BIP=--bip=10.9.9.1/24 mk -m -f "$f" -d "$TMP/out.env"
	assert_file "$TMP/out.env" 'DOCKER_OPT_BIP="--bip=10.1.15.1/24"
DOCKER_OPT_MTU="--mtu=1472"
DOCKER_OPTS=" --bip=10.1.15.1/24 --mtu=1472"'
	DOCKER_OPT_IPMASQ=--ip-masq=true mk -i -f "$f" -d "$TMP/out.env"
	assert_file "$TMP/out.env" 'DOCKER_OPT_BIP="--bip=10.1.15.1/24"
DOCKER_OPT_IPMASQ="--ip-masq=false"
DOCKER_OPT_MTU="--mtu=1472"'
	# Another option from the environment that cannot be written unquoted is an error.
	echo keep >"$TMP/out.env"
	DOCKER_OPT_DEBUG='--debug --log-level=info' expect_failure 'DOCKER_OPT_DEBUG in the environment' \
		mk -f "$f" -d "$TMP/out.env"
	assert_file "$TMP/out.env" keep
}

test_mk_route_check() {
	local f=$TMP/s.env routes=$TMP/routes
	printf 'FLANNEL_SUBNET=10.1.15.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n' >"$f"
	# The overlay's own routes, and a route whose text merely contains the subnet, are fine.
	printf '%s\n' 'default via 192.168.121.1 dev eth0' '10.1.0.0/16 dev flannel0' \
		'10.1.15.0/24 dev docker0 proto kernel scope link src 10.1.15.1' \
		'110.1.15.0/24 via 192.168.56.1 dev eth1' >"$routes"
	FAKE_ROUTES=$routes mk -c -f "$f" -d "$TMP/out.env"
	assert_file "$TMP/out.env" 'DOCKER_OPTS=" --bip=10.1.15.1/24 --ip-masq=true --mtu=1472"'
	# The subnet routed through a gateway (another backend's leftover): refused, output kept.
	echo '10.1.15.0/24 via 192.168.56.102 dev eth1 onlink' >>"$routes"
	FAKE_ROUTES=$routes expect_failure \
		'routing table already contains the subnet: 10\.1\.15\.0/24 via 192\.168\.56\.102' \
		mk -c -f "$f" -d "$TMP/out.env"
	assert_file "$TMP/out.env" 'DOCKER_OPTS=" --bip=10.1.15.1/24 --ip-masq=true --mtu=1472"'
}

test_mk_wait() {
	local f=$TMP/late.env
	# The subnet file appears a second after the start: -w waits for it.
	(sleep 1 && printf 'FLANNEL_SUBNET=10.1.15.1/24\nFLANNEL_MTU=1472\n' >"$f.tmp" && mv "$f.tmp" "$f") &
	mk -c -w 10 -f "$f" -d "$TMP/out.env"
	wait
	assert_file "$TMP/out.env" 'DOCKER_OPTS=" --bip=10.1.15.1/24 --mtu=1472"'
	expect_failure 'nope\.env did not appear within 1 s' mk -w 1 -f "$TMP/nope.env" -d "$TMP/out.env"
	expect_failure '-w: not a number of seconds' mk -w soon -f "$f" -d "$TMP/out.env"
}

test_mk_ipmasq_inverse() {
	printf 'FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n' >"$TMP/masq.env"
	mk -i -f "$TMP/masq.env" -d "$TMP/out.env"
	assert_grep "$TMP/out.env" '^DOCKER_OPT_IPMASQ="--ip-masq=false"$'
	printf 'FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n' >"$TMP/masq.env"
	mk -i -f "$TMP/masq.env" -d "$TMP/out.env"
	assert_grep "$TMP/out.env" '^DOCKER_OPT_IPMASQ="--ip-masq=true"$'
	# No FLANNEL_IPMASQ at all: no ip-masq option (docker keeps its default).
	printf 'FLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1450\n' >"$TMP/nomasq.env"
	mk -c -f "$TMP/nomasq.env" -d "$TMP/out.env"
	assert_file "$TMP/out.env" 'DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1450"'
}

test_mk_lenient_syntax() {
	# Comments, blank lines, quoted values, CRLF line ends, IPv6 lines and no final newline.
	printf '# written by hand\r\n\nFLANNEL_NETWORK="10.1.0.0/16"\r\nFLANNEL_SUBNET="10.1.0.65/26"\nFLANNEL_IPV6_SUBNET=fc00::1/64\n  # indented comment\nFLANNEL_MTU='"'"'1472'"'"'\nFLANNEL_IPMASQ=false' >"$TMP/loose.env"
	mk -c -f "$TMP/loose.env" -d "$TMP/out.env"
	assert_file "$TMP/out.env" 'DOCKER_OPTS=" --bip=10.1.0.65/26 --ip-masq=true --mtu=1472"'
}

test_mk_missing_file() {
	expect_failure 'subnet file .*/nope.env does not exist' mk -f "$TMP/nope.env" -d "$TMP/out.env"
	[ ! -e "$TMP/out.env" ] || fail "an output file was written for a missing subnet file"
	expect_failure 'is not a regular file' mk -f "$TMP" -d "$TMP/out.env"
}

test_mk_malformed() {
	echo 'DOCKER_OPTS="old"' >"$TMP/out.env"
	printf 'FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET 10.1.15.1/24\nFLANNEL_MTU=1472\n' >"$TMP/bad.env"
	expect_failure 'bad.env:2: malformed line' mk -f "$TMP/bad.env" -d "$TMP/out.env"
	assert_file "$TMP/out.env" 'DOCKER_OPTS="old"'

	printf 'FLANNEL_MTU=1472\n' >"$TMP/bad.env"
	expect_failure 'FLANNEL_SUBNET is missing' mk -f "$TMP/bad.env" -d "$TMP/out.env"
	printf 'FLANNEL_SUBNET=10.1.15.1/24\n' >"$TMP/bad.env"
	expect_failure 'FLANNEL_MTU is missing' mk -f "$TMP/bad.env" -d "$TMP/out.env"
	printf 'FLANNEL_SUBNET=10.1.15.1\nFLANNEL_MTU=1472\n' >"$TMP/bad.env"
	expect_failure 'FLANNEL_SUBNET is not an IPv4 address/prefix' mk -f "$TMP/bad.env" -d "$TMP/out.env"
	printf 'FLANNEL_SUBNET=10.1.256.1/24\nFLANNEL_MTU=1472\n' >"$TMP/bad.env"
	expect_failure 'FLANNEL_SUBNET is not an IPv4 address/prefix' mk -f "$TMP/bad.env" -d "$TMP/out.env"
	printf 'FLANNEL_SUBNET=10.1.15.1/24\nFLANNEL_MTU=14x2\n' >"$TMP/bad.env"
	expect_failure 'FLANNEL_MTU is not a number' mk -f "$TMP/bad.env" -d "$TMP/out.env"
	printf 'FLANNEL_SUBNET=10.1.15.1/24\nFLANNEL_MTU=40\n' >"$TMP/bad.env"
	expect_failure 'FLANNEL_MTU is not a number from 68 to 65535' mk -f "$TMP/bad.env" -d "$TMP/out.env"
	printf 'FLANNEL_SUBNET=10.1.15.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=yes\n' >"$TMP/bad.env"
	expect_failure 'Invalid value of FLANNEL_IPMASQ: yes' mk -f "$TMP/bad.env" -d "$TMP/out.env"
	assert_file "$TMP/out.env" 'DOCKER_OPTS="old"'
}

test_mk_not_executed() {
	# The subnet file is data: a command substitution in it is never run.
	# shellcheck disable=SC2016
	printf 'FLANNEL_SUBNET=$(touch %s/pwned)\nFLANNEL_MTU=1472\n' "$TMP" >"$TMP/evil.env"
	expect_failure 'FLANNEL_SUBNET is not an IPv4' mk -f "$TMP/evil.env" -d "$TMP/out.env"
	[ ! -e "$TMP/pwned" ] || fail "the subnet file was executed"
}

test_mk_usage_errors() {
	expect_failure 'unknown option -x' mk -x
	expect_failure 'usage:' mk -h
	expect_failure 'option -f needs a value' mk -f
	expect_failure 'unexpected argument: extra' mk -f "$FIXTURES/subnet.env" extra
	expect_failure 'not a valid variable name' mk -k 'BAD-NAME' -f "$FIXTURES/subnet.env" -d "$TMP/out.env"
	expect_failure 'would be taken for one of the DOCKER_OPT_' mk -k DOCKER_OPT_ALL -f "$FIXTURES/subnet.env" -d "$TMP/out.env"
	expect_failure 'directory .*/no/such/dir does not exist' mk -f "$FIXTURES/subnet.env" -d "$TMP/no/such/dir/out.env"
}

# --- systemd units -------------------------------------------------------------------------

UNIT_SRC=""
for d in /usr/lib/systemd/system /lib/systemd/system; do
	[ -f "$d/sysinit.target" ] && { UNIT_SRC=$d; break; }
done

# make_root DIR: an empty system under DIR for `systemd-analyze verify --root`: systemd's own
# targets and slices, and stand-ins for the programs and units the checked units refer to.
make_root() {
	local r=$1
	mkdir -p "$r/usr/lib/systemd/system" "$r/usr/local/bin" "$r/usr/sbin" "$r/etc/systemd/system"
	cp -a "$UNIT_SRC"/*.target "$UNIT_SRC"/*.slice "$r/usr/lib/systemd/system/"
	printf '#!/bin/sh\nexit 0\n' >"$r/usr/local/bin/weftd"
	printf '#!/bin/sh\nexit 0\n' >"$r/usr/sbin/dockerd"
	chmod 0755 "$r/usr/local/bin/weftd" "$r/usr/sbin/dockerd"
	# docker's package unit, reduced to what matters here (Debian's docker.io shape).
	cat >"$r/usr/lib/systemd/system/docker.service" <<-'EOF'
		[Unit]
		Description=stand-in for the docker package's unit
		Requires=docker.socket
		After=network-online.target docker.socket
		[Service]
		Type=notify
		EnvironmentFile=-/etc/default/docker
		ExecStart=/usr/sbin/dockerd -H fd:// --containerd=/run/containerd/containerd.sock $DOCKER_OPTS
	EOF
	cat >"$r/usr/lib/systemd/system/docker.socket" <<-'EOF'
		[Unit]
		Description=stand-in for the docker package's socket
		[Socket]
		ListenStream=/run/docker.sock
	EOF
}

add_etcd_unit() {
	cat >"$1/usr/lib/systemd/system/etcd.service" <<-'EOF'
		[Unit]
		Description=stand-in for the etcd package's unit
		[Service]
		Type=notify
		ExecStart=/usr/bin/etcd
	EOF
}

# verify_clean ROOT UNIT...: systemd-analyze verify succeeds and prints nothing at all.
verify_clean() {
	local root=$1
	shift
	if ! systemd-analyze verify --root="$root" "$@" >"$TMP/verify.out" 2>&1; then
		cat "$TMP/verify.out"
		fail "systemd-analyze verify $* failed"
	fi
	if [ -s "$TMP/verify.out" ]; then
		cat "$TMP/verify.out"
		fail "systemd-analyze verify $* printed warnings"
	fi
}

install_units() {
	local r=$1
	mkdir -p "$r/etc/systemd/system/docker.service.d" "$r/usr/local/libexec/weft"
	cp deploy/systemd/weftd.service "$r/etc/systemd/system/"
	cp deploy/systemd/docker.service.d/weft.conf "$r/etc/systemd/system/docker.service.d/"
	cp -p "$MK" "$r/usr/local/libexec/weft/"
}

test_unit_content() {
	local u=deploy/systemd/weftd.service
	assert_grep "$u" '^Type=notify$'
	assert_grep "$u" '^After=etcd\.service$'
	assert_grep "$u" '^Restart=on-failure$'
	assert_grep "$u" '^EnvironmentFile=-/etc/default/weftd$'
	assert_grep "$u" '^ExecStart=/usr/local/bin/weftd$'
	assert_grep "$u" '^LimitNOFILE=[0-9]+$'
	assert_grep "$u" '^CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW$'
	assert_grep "$u" '^DeviceAllow=/dev/net/tun rw$'
	assert_grep "$u" '^RestrictAddressFamilies=.*AF_NETLINK'
	assert_grep "$u" '^WantedBy=multi-user\.target$'
	local d=deploy/systemd/docker.service.d/weft.conf
	assert_grep "$d" '^Wants=weftd\.service$'
	assert_grep "$d" '^After=weftd\.service$'
	assert_grep "$d" '^ExecStartPre=.*/mk-docker-opts\.sh .*-w [0-9]+ '
	assert_grep "$d" '^ExecStart=$'
	# No hard chain: restarting etcd must not restart weftd, and restarting weftd must not
	# restart docker (and its containers). Dependencies that propagate stops and restarts, or
	# that fail a start when the other unit is missing or down, are not used.
	! grep -n -E '^(Requires|Requisite|BindsTo|PartOf|Upholds)=' "$u" "$d" ||
		fail "a hard dependency between etcd, weftd and docker"
}

test_units_verify() {
	local r=$TMP/root
	make_root "$r"
	add_etcd_unit "$r"
	install_units "$r"
	verify_clean "$r" weftd.service docker.service
	# The same units on a host without a local etcd, and docker's drop-in on a host where
	# weftd's unit is missing: neither start is refused for a missing unit.
	rm "$r/usr/lib/systemd/system/etcd.service"
	verify_clean "$r" weftd.service docker.service
	rm "$r/etc/systemd/system/weftd.service"
	verify_clean "$r" docker.service
}

test_units_verify_catches_errors() {
	# The verification is only worth something if it fails on broken units.
	local r=$TMP/root-broken
	make_root "$r"
	install_units "$r"
	# A unit that requires a missing unit is refused (what the shipped units no longer do).
	sed 's/^After=etcd\.service$/Requires=etcd.service/' deploy/systemd/weftd.service \
		>"$r/etc/systemd/system/weftd.service"
	expect_failure 'etcd\.service not found' systemd-analyze verify --root="$r" weftd.service
	cp deploy/systemd/weftd.service "$r/etc/systemd/system/weftd.service"
	rm "$r/usr/local/bin/weftd"
	expect_failure '/usr/local/bin/weftd is not executable' systemd-analyze verify --root="$r" weftd.service
	rm "$r/usr/local/libexec/weft/mk-docker-opts.sh"
	expect_failure 'mk-docker-opts\.sh is not executable' systemd-analyze verify --root="$r" docker.service
}

test_unit_exposure() {
	local r=$TMP/root-sec
	make_root "$r"
	add_etcd_unit "$r"
	install_units "$r"
	systemd-analyze security --offline=true --root="$r" weftd.service >"$TMP/sec.out" 2>&1 ||
		{ cat "$TMP/sec.out"; fail "systemd-analyze security failed"; }
	local level
	level=$(sed -n 's/.*Overall exposure level for weftd\.service: \([0-9.]*\).*/\1/p' "$TMP/sec.out")
	[ -n "$level" ] || { cat "$TMP/sec.out"; fail "no exposure level reported"; }
	echo "exposure level: $level"
	awk -v l="$level" 'BEGIN { exit !(l <= 4.5) }' || fail "exposure level $level is above 4.5"
}

# systemd expands $VAR in ExecStart to the variable's words, or to nothing when unset.
expand_exec() {
	local word name words=()
	for word in $1; do
		if [[ $word =~ ^\$([A-Za-z_][A-Za-z0-9_]*)$ ]]; then
			name=${BASH_REMATCH[1]}
			# shellcheck disable=SC2206
			[ -z "${!name:-}" ] || words+=(${!name})
		else
			words+=("$word")
		fi
	done
	printf '%s\n' "${words[*]}"
}

test_docker_dropin_wiring() {
	# Play docker.service's start the way systemd does, with the drop-in's paths moved under
	# a temporary root: ExecStartPre writes the options file, ExecStart reads both files.
	local r=$TMP/dockerstart d=deploy/systemd/docker.service.d/weft.conf pre start
	mkdir -p "$r/run/flannel" "$r/usr/local/libexec/weft"
	cp "$FIXTURES/subnet.env" "$r/run/flannel/subnet.env"
	cp -p "$MK" "$r/usr/local/libexec/weft/"
	pre=$(sed -n 's/^ExecStartPre=//p' "$d")
	start=$(sed -n 's/^ExecStart=\(..*\)$/\1/p' "$d")
	if [ -z "$pre" ] || [ -z "$start" ]; then
		fail "no ExecStartPre/ExecStart in $d"
	fi
	# shellcheck disable=SC2046
	PATH="$MK_BIN:$PATH" "$r${pre%% *}" $(printf '%s\n' "${pre#* }" | sed "s| /run/| $r/run/|g")
	local envfiles
	envfiles=$(sed -n 's/^EnvironmentFile=-\{0,1\}//p' "$d")
	assert_eq "/run/flannel/subnet.env
/run/flannel/docker.env" "$envfiles" "environment files"
	local argv
	argv=$(
		set -a
		# shellcheck disable=SC1090,SC1091
		. "$r/run/flannel/subnet.env"
		# shellcheck disable=SC1090,SC1091
		. "$r/run/flannel/docker.env"
		set +a
		expand_exec "$start"
	)
	assert_eq "dockerd -H fd:// --containerd=/run/containerd/containerd.sock --bip=10.1.15.1/24 --mtu=1472 --ip-masq=true" "$argv" "dockerd command line"
}

test_env_example() {
	local f=deploy/systemd/weftd.env.example flag var
	# Every flag of flanneld v0.20.2 that weftd takes, and weft's own settings, are listed.
	for flag in etcd-endpoints etcd-prefix etcd-keyfile etcd-certfile etcd-cafile etcd-username \
		etcd-password iface iface-regex iface-can-reach public-ip public-ipv6 subnet-file \
		subnet-lease-renew-margin ip-masq iptables-resync iptables-forward-rules healthz-ip \
		healthz-port v; do
		var=FLANNELD_$(echo "$flag" | tr 'a-z-' 'A-Z_')
		assert_grep "$f" "^#?$var="
	done
	for var in WEFTD_TUN_NAME WEFTD_WORKERS WEFTD_IO WEFTD_ALLOW_FOREIGN_SOURCES WEFTD_ENCRYPTION_KEY_FILE; do
		assert_grep "$f" "^#?$var="
	done
	# Only comments and KEY=VALUE lines of those two families.
	! grep -v -E '^(#.*|)$' "$f" | grep -v -E '^(FLANNELD|WEFTD)_[A-Z_]+=' || fail "unexpected lines in $f"
}

# --- CNI -----------------------------------------------------------------------------------

test_cni_conflist() {
	local f=deploy/cni/10-weft.conflist
	python3 -m json.tool "$f" >/dev/null || fail "$f is not valid JSON"
	jq -e '
		.name == "weft" and (.cniVersion | type) == "string" and (.plugins | length) == 2
		and .plugins[0].type == "flannel"
		and .plugins[0].subnetFile == "/run/flannel/subnet.env"
		and .plugins[0].delegate.type == "bridge"
		and .plugins[0].delegate.isDefaultGateway == true
		and .plugins[1].type == "portmap"
		and .plugins[1].capabilities.portMappings == true
	' "$f" >/dev/null || fail "$f is not the flannel + portmap chain"
}

# --- provisioning --------------------------------------------------------------------------

# A PATH where every command the scripts may run to change a system is a recorder that fails,
# and `ip` answers the one read-only query the scripts make with a VM's addresses.
make_fake_bin() {
	local bin=$1 cmd
	mkdir -p "$bin"
	for cmd in apt-get dpkg systemctl etcdctl modprobe sysctl docker dockerd install curl; do
		printf '#!/bin/sh\necho "%s $*" >>"%s/calls"\nexit 1\n' "$cmd" "$bin" >"$bin/$cmd"
		chmod 0755 "$bin/$cmd"
	done
	cat >"$bin/ip" <<-EOF
		#!/bin/sh
		echo "ip \$*" >>"$bin/ip-calls"
		[ "\$*" = "-o -4 addr show" ] || exit 1
		cat "$bin/ip-addr.txt"
	EOF
	chmod 0755 "$bin/ip"
}

# ip_addr_output IP: what `ip -o -4 addr show` prints on a lab VM (libvirt naming).
ip_addr_output() {
	cat <<-EOF
		1: lo    inet 127.0.0.1/8 scope host lo\       valid_lft forever preferred_lft forever
		2: eth0    inet 192.168.121.17/24 brd 192.168.121.255 scope global dynamic eth0\       valid_lft 3358sec preferred_lft 3358sec
		3: eth1    inet $1/24 brd 192.168.56.255 scope global eth1\       valid_lft forever preferred_lft forever
		4: docker0    inet 10.1.15.1/24 brd 10.1.15.255 scope global docker0\       valid_lft forever preferred_lft forever
	EOF
}

test_iface_holding_ip() {
	# shellcheck source=deploy/provision/lib.sh
	source deploy/provision/lib.sh
	assert_eq eth1 "$(ip_addr_output 192.168.56.101 | iface_holding_ip 192.168.56.101)"
	assert_eq eth0 "$(ip_addr_output 192.168.56.101 | iface_holding_ip 192.168.121.17)"
	# A prefix of an address is not the address.
	if ip_addr_output 192.168.56.101 | iface_holding_ip 192.168.56.10 >/dev/null; then
		fail "192.168.56.10 matched 192.168.56.101"
	fi
	assert_eq enp0s8 "$(printf '3: enp0s8    inet 10.0.0.5/16 brd 10.0.255.255 scope global enp0s8\\       valid_lft forever\n' | iface_holding_ip 10.0.0.5)"
	assert_eq vlan7 "$(printf '5: vlan7@eth0    inet 10.9.0.1/24 scope global vlan7\\   valid_lft forever\n' | iface_holding_ip 10.9.0.1)"
}

# The plan of the lab: what the Vagrantfile defines, read by a stand-in for Vagrant's API.
vagrant_plan() {
	ruby deploy/tests/vagrant_plan.rb vagrant/Vagrantfile
}

# render_lab OUT: runs every VM's provisioning exactly as the Vagrantfile calls it, with
# --root OUT/<vm> and /weft (the guest path of the repository) mapped to this checkout.
render_lab() {
	local out=$1 kind host ip name cmd guest_repo bin
	vagrant_plan >"$TMP/plan" || fail "cannot read the Vagrantfile's plan"
	guest_repo=$(awk '$1 == "sync" && $2 == ".." { print $3 }' "$TMP/plan")
	assert_eq /weft "$guest_repo" "guest path of the repository"
	while read -r kind host rest; do
		case $kind in
		sync) ;;
		machine)
			ip=$rest
			bin=$out/.bin-$host
			make_fake_bin "$bin"
			ip_addr_output "$ip" >"$bin/ip-addr.txt"
			;;
		provision)
			name=${rest%% *}
			cmd=${rest#* }
			[[ $cmd == "$guest_repo/deploy/provision/"* ]] || fail "$host/$name does not run a deploy/provision script: $cmd"
			cmd=$REPO/${cmd#"$guest_repo"/}
			echo "== $host/$name: $cmd --root $out/$host"
			PATH="$out/.bin-$host:$PATH" bash -c "$cmd --root '$out/$host'" ||
				fail "provisioning step $host/$name failed"
			;;
		*) fail "unexpected plan line: $kind $host $rest" ;;
		esac
	done <"$TMP/plan"
}

test_lab_plan() {
	vagrant_plan >"$TMP/plan"
	cat "$TMP/plan"
	assert_eq "core-01 192.168.56.101
core-02 192.168.56.102" "$(awk '$1 == "machine" { print $2, $3 }' "$TMP/plan")" machines
	assert_eq "core-01 network
core-01 etcd
core-01 weftd
core-01 docker
core-02 network
core-02 weftd
core-02 docker" "$(awk '$1 == "provision" { print $2, $3 }' "$TMP/plan")" "provisioning steps"
}

test_lab_render() {
	local out=$TMP/lab
	render_lab "$out"
	local host
	for host in core-01 core-02; do
		[ ! -e "$out/.bin-$host/calls" ] || {
			cat "$out/.bin-$host/calls"
			fail "--root provisioning of $host ran commands that change a system"
		}
		assert_eq "ip -o -4 addr show" "$(sort -u "$out/.bin-$host/ip-calls")" "ip queries"
	done

	# Exactly these files, nothing else (no temporary files left behind).
	assert_eq "./etc/default/etcd
./etc/default/weftd
./etc/modules-load.d/weft.conf
./etc/sysctl.d/60-weft.conf
./etc/systemd/system/docker.service.d/weft.conf
./etc/systemd/system/weftd.service
./etc/weft/network-config.json
./usr/local/libexec/weft/mk-docker-opts.sh
./usr/local/share/doc/weft/operations.md
./usr/local/share/doc/weft/weftd.env.example" "$(cd "$out/core-01" && find . -type f -o -type l | sort)" "core-01 files"
	assert_eq "./etc/default/weftd
./etc/modules-load.d/weft.conf
./etc/sysctl.d/60-weft.conf
./etc/systemd/system/docker.service.d/weft.conf
./etc/systemd/system/weftd.service
./usr/local/libexec/weft/mk-docker-opts.sh
./usr/local/share/doc/weft/operations.md
./usr/local/share/doc/weft/weftd.env.example" "$(cd "$out/core-02" && find . -type f -o -type l | sort)" "core-02 files"

	local c1=$out/core-01 c2=$out/core-02
	assert_file "$c1/etc/default/weftd" '# /etc/default/weftd for weftd.service, written by deploy/provision/install-weftd.sh.
# All variables: /usr/local/share/doc/weft/weftd.env.example
FLANNELD_ETCD_ENDPOINTS=http://192.168.56.101:2379
FLANNELD_IFACE=eth1
FLANNELD_IP_MASQ=true
FLANNELD_HEALTHZ_IP=127.0.0.1
FLANNELD_HEALTHZ_PORT=9285'
	diff -u "$c1/etc/default/weftd" "$c2/etc/default/weftd" || fail "core-01 and core-02 weftd settings differ"
	assert_file "$c1/etc/default/etcd" '# /etc/default/etcd, written by deploy/provision/install-etcd.sh: a single-member cluster.
ETCD_NAME=core-01
ETCD_DATA_DIR=/var/lib/etcd/default
ETCD_LISTEN_CLIENT_URLS=http://192.168.56.101:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://192.168.56.101:2379
ETCD_LISTEN_PEER_URLS=http://192.168.56.101:2380
ETCD_INITIAL_ADVERTISE_PEER_URLS=http://192.168.56.101:2380
ETCD_INITIAL_CLUSTER=core-01=http://192.168.56.101:2380
ETCD_INITIAL_CLUSTER_STATE=new
ETCD_INITIAL_CLUSTER_TOKEN=weft-core-01'
	jq -e '. == {"Network":"10.1.0.0/16","Backend":{"Type":"udp"}}' "$c1/etc/weft/network-config.json" >/dev/null ||
		fail "network config is not the lab's"

	# Both VMs get the unit as shipped, with or without a local etcd.
	cmp deploy/systemd/weftd.service "$c1/etc/systemd/system/weftd.service" || fail "core-01 unit differs"
	cmp deploy/systemd/weftd.service "$c2/etc/systemd/system/weftd.service" || fail "core-02 unit differs"
	for host in core-01 core-02; do
		cmp deploy/systemd/docker.service.d/weft.conf "$out/$host/etc/systemd/system/docker.service.d/weft.conf"
		cmp "$MK" "$out/$host/usr/local/libexec/weft/mk-docker-opts.sh"
		[ -x "$out/$host/usr/local/libexec/weft/mk-docker-opts.sh" ] || fail "mk-docker-opts.sh not executable on $host"
		assert_file "$out/$host/etc/modules-load.d/weft.conf" '# weftd creates its TUN device from a service that may not load kernel modules.
tun'
		assert_grep "$out/$host/etc/sysctl.d/60-weft.conf" '^net\.ipv4\.ip_forward = 1$'
		assert_eq 600 "$(stat -c %a "$out/$host/etc/default/weftd")" "mode of $host's /etc/default/weftd"
		cmp docs/operations.md "$out/$host/usr/local/share/doc/weft/operations.md"
	done

	# What each VM would run verifies cleanly: core-01 with its etcd, core-02 with no etcd at all.
	make_root "$c1"
	add_etcd_unit "$c1"
	verify_clean "$c1" weftd.service docker.service
	make_root "$c2"
	verify_clean "$c2" weftd.service docker.service
}

test_render_repeatable() {
	render_lab "$TMP/lab-a" >/dev/null 2>&1
	render_lab "$TMP/lab-b" >/dev/null 2>&1
	render_lab "$TMP/lab-b" >/dev/null 2>&1
	diff -r --exclude='.bin-*' "$TMP/lab-a" "$TMP/lab-b" || fail "rendering twice gives a different tree"
}

test_provision_options() {
	# Every setting install-weftd.sh knows lands in the environment file, in flanneld's names.
	local r=$TMP/opts
	deploy/provision/install-weftd.sh --root "$r" --etcd-endpoints https://10.0.0.1:2379,https://10.0.0.2:2379 \
		--etcd-prefix /weft/network --iface 198.18.0.1 --public-ip 203.0.113.7 \
		--subnet-file /run/lab/h1.env --healthz-port 0
	assert_file "$r/etc/default/weftd" '# /etc/default/weftd for weftd.service, written by deploy/provision/install-weftd.sh.
# All variables: /usr/local/share/doc/weft/weftd.env.example
FLANNELD_ETCD_ENDPOINTS=https://10.0.0.1:2379,https://10.0.0.2:2379
FLANNELD_ETCD_PREFIX=/weft/network
FLANNELD_IFACE=198.18.0.1
FLANNELD_PUBLIC_IP=203.0.113.7
FLANNELD_SUBNET_FILE=/run/lab/h1.env
FLANNELD_IP_MASQ=false
FLANNELD_HEALTHZ_PORT=0'
	# It may hold the etcd password once edited: readable by root only.
	assert_eq 600 "$(stat -c %a "$r/etc/default/weftd")" "mode of /etc/default/weftd"
	# Rewriting a file that was readable by all leaves it readable by root only as well.
	chmod 0644 "$r/etc/default/weftd"
	deploy/provision/install-weftd.sh --root "$r" --etcd-endpoints http://127.0.0.1:2379 2>/dev/null
	assert_eq 600 "$(stat -c %a "$r/etc/default/weftd")" "mode of the rewritten /etc/default/weftd"
	deploy/provision/install-weftd.sh --root "$r" --etcd-endpoints http://127.0.0.1:2379 \
		--subnet-file /var/lib/weft/subnet.env 2>"$TMP/err"
	grep -q 'ReadWritePaths=/var/lib/weft' "$TMP/err" || fail "no note about ReadWritePaths"
	# A root given with a trailing slash writes to the same place.
	deploy/provision/configure-network.sh --root "$r/" 2>/dev/null
	[ -f "$r/etc/sysctl.d/60-weft.conf" ] || fail "--root DIR/ wrote elsewhere"
}

# make_activation_bin BIN LOG: stand-ins for what install-weftd.sh runs on a real host, each
# recording its call in LOG. apt-get "installs" iptables by creating iptables-save and
# iptables-restore in BIN; systemctl's "restart weftd.service" behaves as weftd's start does
# on a fresh box: it fails when iptables-save is missing, else writes the subnet file.
make_activation_bin() {
	local bin=$1 log=$2
	mkdir -p "$bin"
	cat >"$bin/apt-get" <<-EOF
		#!/bin/sh
		echo "apt-get \$*" >>"$log"
		case " \$* " in
		*" install "*" iptables "*)
			printf '#!/bin/sh\nexit 0\n' >"$bin/iptables-save"
			printf '#!/bin/sh\nexit 0\n' >"$bin/iptables-restore"
			chmod 0755 "$bin/iptables-save" "$bin/iptables-restore" ;;
		esac
	EOF
	cat >"$bin/systemctl" <<-EOF
		#!/bin/sh
		echo "systemctl \$*" >>"$log"
		[ "\$*" = "restart weftd.service" ] || exit 0
		command -v iptables-save >/dev/null || { echo "weftd: iptables-save not found" >&2; exit 1; }
		mkdir -p /run/flannel
		printf 'FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.15.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n' >/run/flannel/subnet.env
	EOF
	printf '#!/bin/sh\necho "journalctl $*" >>"%s"\n' "$log" >"$bin/journalctl"
	chmod 0755 "$bin/apt-get" "$bin/systemctl" "$bin/journalctl"
}

# activate_weftd BIN ARGS...: install-weftd.sh on the "real" system, in a private mount
# namespace where /run, /usr/local, /etc/default and /etc/systemd/system are empty tmpfs
# mounts, with PATH holding BIN and /usr/bin only (no /usr/sbin: no iptables-save).
# Prints the mode and owner of /etc/default/weftd and the installed binary's first line.
activate_weftd() {
	local bin=$1
	shift
	# shellcheck disable=SC2016
	unshare --mount --propagation private -- bash -c '
		set -e
		for d in /run /usr/local /etc/default /etc/systemd/system; do mount -t tmpfs weft-test "$d"; done
		bin=$1
		shift
		PATH="$bin:/usr/bin:/bin" "$@"
		stat -c "env file %a %U" /etc/default/weftd
		sed -n 2p /usr/local/bin/weftd
	' activate "$bin" "$REPO/deploy/provision/install-weftd.sh" "$@"
}

test_weftd_activation_order() {
	# On a fresh Debian 12 iptables is missing until docker.io pulls it in, after weftd has
	# started; install-weftd.sh must install it before it starts weftd.
	local bin=$TMP/bin log=$TMP/calls
	make_activation_bin "$bin" "$log"
	printf '#!/bin/sh\necho "weftd 0.1.0"\n' >"$TMP/weftd"
	chmod 0755 "$TMP/weftd"
	activate_weftd "$bin" --etcd-endpoints http://192.168.56.101:2379 --ip-masq \
		--binary "$TMP/weftd" >"$TMP/out" 2>"$TMP/err" || { cat "$TMP/err"; fail "install-weftd.sh failed"; }
	assert_eq "apt-get update -q
apt-get install -y -q --no-install-recommends iptables
systemctl daemon-reload
systemctl enable weftd.service
systemctl restart weftd.service" "$(cat "$log")" "commands run, in order"
	assert_eq 'env file 600 root
echo "weftd 0.1.0"' "$(cat "$TMP/out")" "/etc/default/weftd's mode and owner, the installed binary"
	grep -q 'FLANNEL_SUBNET=10.1.15.1/24' "$TMP/err" || fail "the subnet file was not shown"

	# iptables already there: nothing is installed.
	: >"$log"
	activate_weftd "$bin" --etcd-endpoints http://192.168.56.101:2379 --binary "$TMP/weftd" \
		>/dev/null 2>"$TMP/err" || { cat "$TMP/err"; fail "second install-weftd.sh failed"; }
	! grep -q '^apt-get' "$log" || fail "apt-get ran although iptables was there"

	# A binary that cannot run here (built against a newer glibc) stops the script before it
	# installs or starts anything.
	: >"$log"
	printf '#!/bin/sh\necho "weftd: /lib/x86_64-linux-gnu/libc.so.6: version GLIBC_2.39 not found" >&2\nexit 1\n' >"$TMP/weftd"
	expect_failure 'does not run on this host .*GLIBC_2\.39 not found' \
		activate_weftd "$bin" --etcd-endpoints http://192.168.56.101:2379 --binary "$TMP/weftd"
	[ ! -s "$log" ] || { cat "$log"; fail "commands ran after the binary was found unusable"; }

	# The package manager leaves iptables missing: weftd is not started.
	: >"$log"
	rm -f "$bin/iptables-save" "$bin/iptables-restore"
	printf '#!/bin/sh\necho "apt-get $*" >>"%s"\n' "$log" >"$bin/apt-get"
	printf '#!/bin/sh\necho "weftd 0.1.0"\n' >"$TMP/weftd"
	expect_failure 'iptables-save is still missing after installing iptables' \
		activate_weftd "$bin" --etcd-endpoints http://192.168.56.101:2379 --binary "$TMP/weftd"
	! grep -q '^systemctl' "$log" || fail "weftd was started without iptables"

	# weftd does not start: its journal is shown and the script fails.
	: >"$log"
	make_activation_bin "$bin" "$log"
	printf '#!/bin/sh\necho "systemctl $*" >>"%s"\n[ "$*" != "restart weftd.service" ]\n' "$log" >"$bin/systemctl"
	expect_failure 'weftd.service did not start' \
		activate_weftd "$bin" --etcd-endpoints http://192.168.56.101:2379 --binary "$TMP/weftd"
	grep -q '^journalctl -u weftd.service' "$log" || fail "the journal was not shown"
}

test_provision_errors() {
	local p=deploy/provision r=$TMP/errs
	expect_failure '--etcd-endpoints is required' "$p/install-weftd.sh" --root "$r"
	expect_failure 'unknown argument: --etcd' "$p/install-weftd.sh" --root "$r" --etcd-endpoints http://a:2379 --etcd remote
	expect_failure '--root needs an absolute path' "$p/install-weftd.sh" --root relative --etcd-endpoints http://a:2379
	expect_failure 'unknown argument: --bogus' "$p/install-weftd.sh" --bogus
	expect_failure '--iface-of needs an IPv4 address' "$p/install-weftd.sh" --root "$r" --etcd-endpoints http://a:2379 --iface-of eth1
	expect_failure 'give --iface or --iface-of, not both' "$p/install-weftd.sh" --root "$r" --etcd-endpoints http://a:2379 --iface eth1 --iface-of 10.0.0.1
	expect_failure '--healthz-port needs a port number' "$p/install-weftd.sh" --root "$r" --etcd-endpoints http://a:2379 --healthz-port 70000
	expect_failure 'unsupported characters' "$p/install-weftd.sh" --root "$r" --etcd-endpoints 'http://a:2379 x'
	expect_failure '--etcd-endpoints needs a value' "$p/install-weftd.sh" --etcd-endpoints
	expect_failure '--subnet-file needs an absolute path' "$p/install-weftd.sh" --root "$r" --etcd-endpoints http://a:2379 --subnet-file subnet.env
	expect_failure '--ip needs an IPv4 address' "$p/install-etcd.sh" --root "$r" --name core-01 --ip 192.168.56
	expect_failure '--name is required' "$p/install-etcd.sh" --root "$r" --ip 192.168.56.101
	expect_failure 'must be a JSON object' "$p/install-etcd.sh" --root "$r" --name a --ip 10.0.0.1 --network-config 'Network'
	expect_failure 'unknown argument' "$p/install-docker.sh" --root "$r" extra
	expect_failure 'unknown argument' "$p/configure-network.sh" --root "$r" extra
	[ ! -e "$r" ] || fail "a failed call wrote files"
}

# --- vagrant -------------------------------------------------------------------------------

# vagrant_offline ARGS...: vagrant in a fresh network namespace (loopback only), with its
# state in the temporary directory.
vagrant_offline() {
	VAGRANT_HOME=$TMP/vagrant-home VAGRANT_DOTFILE_PATH=$TMP/vagrant-dot \
		VAGRANT_CHECKPOINT_DISABLE=1 \
		unshare --net -- vagrant "$@"
}

test_vagrant_validate() {
	(cd vagrant && vagrant_offline validate --ignore-provider)
	if vagrant plugin list 2>/dev/null | grep -q '^vagrant-libvirt'; then
		(cd vagrant && VAGRANT_DEFAULT_PROVIDER=libvirt vagrant_offline validate)
	else
		echo "vagrant-libvirt not installed: provider settings not validated"
		! strict || fail "vagrant-libvirt is missing"
	fi
	[ ! -e vagrant/.vagrant ] || fail "validate left vagrant/.vagrant behind"
}

test_vagrant_validate_catches_errors() {
	local d=$TMP/vagrant-broken
	mkdir -p "$d"
	cp vagrant/rsync.filter "$d/"
	sed 's/host\.vm\.hostname = name/host.vm.hostnme = name/' vagrant/Vagrantfile >"$d/Vagrantfile"
	! cmp -s vagrant/Vagrantfile "$d/Vagrantfile" || fail "the broken copy is not broken"
	(cd "$d" && expect_failure 'shouldn.t exist: hostnme' vagrant_offline validate --ignore-provider)
}

test_rsync_filter() {
	# What the VMs receive in /weft: sources and the release binary, not the build tree, the
	# git store or Vagrant's machine state (which holds private keys).
	local src=$TMP/tree dst=$TMP/synced f
	for f in deploy/provision/lib.sh docs/operations.md target/release/weftd \
		target/release/weftd.d target/release/deps/libx.rlib target/debug/weftd \
		.git/config vagrant/Vagrantfile vagrant/.vagrant/machines/core-01/libvirt/private_key \
		fuzz/target/x bench/lab/results/run.json control/src/lib.rs; do
		mkdir -p "$(dirname "$src/$f")"
		echo x >"$src/$f"
	done
	rsync --archive --filter="merge $REPO/vagrant/rsync.filter" "$src/" "$dst/"
	assert_eq "./control/src/lib.rs
./deploy/provision/lib.sh
./docs/operations.md
./target/release/weftd
./vagrant/Vagrantfile" "$(cd "$dst" && find . -type f | sort)" "synced files"
}

test_vagrantfile_syntax() {
	ruby -c vagrant/Vagrantfile >/dev/null
	ruby -c deploy/tests/vagrant_plan.rb >/dev/null
}

# --- docs ----------------------------------------------------------------------------------

# weftd's own account of its flags: "FLAG ENV DEFAULT" per line (DEFAULT "-" when none),
# from `weftd --help` run with an empty environment (a set variable would show up as a value).
WEFTD_BIN=${WEFTD_BIN:-$REPO/target/release/weftd}
weftd_flags() {
	# weftd prints its help on stderr, as flanneld does.
	env -i "$WEFTD_BIN" --help 2>&1 | awk '
		function emit() { if (flag != "" && envvar != "") print flag, envvar, (dflt == "" ? "-" : dflt) }
		/^ +(-[A-Za-z], )?--[a-z0-9-]+/ {
			emit()
			flag = $0; sub(/^ +(-[A-Za-z], )?--/, "", flag); sub(/[^a-z0-9-].*$/, "", flag)
			envvar = ""; dflt = ""
			next
		}
		/^ +\[env: [A-Z0-9_]+=/ { envvar = $0; sub(/^ +\[env: /, "", envvar); sub(/=.*$/, "", envvar) }
		/^ +\[default: / { dflt = $0; sub(/^ +\[default: /, "", dflt); sub(/\]$/, "", dflt) }
		END { emit() }'
}

# flanneld v0.20.2's flags that weftd takes (docs/operations.md and the README name them all).
FLANNELD_FLAGS=" etcd-endpoints etcd-prefix etcd-keyfile etcd-certfile etcd-cafile etcd-username \
etcd-password iface iface-regex iface-can-reach public-ip public-ipv6 subnet-file \
subnet-lease-renew-margin ip-masq iptables-resync iptables-forward-rules healthz-ip \
healthz-port v version "

test_flags_documented() {
	local flag var dflt row shown value f=deploy/systemd/weftd.env.example n=0
	weftd_flags >"$TMP/flags"
	[ "$(wc -l <"$TMP/flags")" -ge 20 ] || { cat "$TMP/flags"; fail "could not read the flags from weftd --help"; }
	while read -r flag var dflt; do
		n=$((n + 1))
		shown=--$flag
		[ "$flag" != v ] || shown=-v
		# docs/operations.md: a table row for the flag naming its variable and its default.
		row=$(grep -F -e "| \`$shown\` |" docs/operations.md) || fail "docs/operations.md: no row for $shown"
		[ "$flag" = version ] || [[ $row == *"\`$var\`"* ]] ||
			fail "docs/operations.md: the row for $shown does not name $var"
		case $flag in
		workers | version) ;; # the default is the host's core count; --version is no setting
		*)
			[ "$dflt" = - ] || [[ $row == *"\`$dflt\`"* ]] ||
				fail "docs/operations.md: the row for $shown does not give the default $dflt: $row"
			;;
		esac
		# The README's flag paragraph: flanneld's flags and weft's own.
		if [[ $var == WEFTD_* ]] || [[ $FLANNELD_FLAGS == *" $flag "* ]]; then
			grep -q -F -e "\`$shown" README.md || fail "README.md does not name $shown"
		fi
		# weftd.env.example: every setting, its commented line showing the default.
		[ "$flag" != version ] || continue
		grep -q -E "^#?$var=" "$f" || fail "$f does not list $var"
		if [ "$dflt" = - ] || [ "$flag" = workers ]; then
			continue
		fi
		value=$(sed -n "s/^#$var=//p" "$f")
		[ "$value" = "$dflt" ] || fail "$f: #$var=$value, but weftd's default is $dflt"
	done <"$TMP/flags"
	echo "$n flags documented"
}

test_operations_doc() {
	local f=docs/operations.md flag var path
	[ -s "$f" ] || fail "$f is missing"
	for flag in etcd-endpoints etcd-prefix etcd-keyfile etcd-certfile etcd-cafile etcd-username \
		etcd-password iface iface-regex iface-can-reach public-ip public-ipv6 subnet-file \
		subnet-lease-renew-margin ip-masq iptables-resync iptables-forward-rules healthz-ip \
		healthz-port version tun-name workers io allow-foreign-sources; do
		grep -q -e "--$flag\b" "$f" || fail "$f does not document --$flag"
	done
	for var in FLANNELD_ETCD_ENDPOINTS FLANNELD_IFACE FLANNELD_IP_MASQ FLANNELD_HEALTHZ_PORT \
		WEFTD_TUN_NAME WEFTD_WORKERS WEFTD_IO WEFTD_ALLOW_FOREIGN_SOURCES; do
		grep -q -e "$var" "$f" || fail "$f does not mention $var"
	done
	# Every repository path the page names exists.
	grep -o -E '\b(deploy|vagrant|docs)/[A-Za-z0-9_./-]*[A-Za-z0-9_]' "$f" | sort -u >"$TMP/paths"
	while read -r path; do
		[ -e "$path" ] || fail "$f names $path, which does not exist"
	done <"$TMP/paths"
}

# --- run -----------------------------------------------------------------------------------

# with_tools NAME FUNCTION TOOL...: run the check when all tools are there.
with_tools() {
	local name=$1 fn=$2 tool missing=()
	shift 2
	for tool in "$@"; do
		have "$tool" || missing+=("$tool")
	done
	if [ ${#missing[@]} -eq 0 ]; then
		run_test "$name" "$fn"
	else
		skip_or_fail "$name" "missing ${missing[*]}"
	fi
}

ensure_tool vagrant vagrant vagrant-libvirt >/dev/null || true
# The libvirt provider lets `vagrant validate` check the provider settings too.
if have vagrant && have dpkg && ! dpkg -s vagrant-libvirt >/dev/null 2>&1 &&
	[ "$(id -u)" -eq 0 ]; then
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q vagrant-libvirt >"$WORK/apt.log" 2>&1 ||
		tail -5 "$WORK/apt.log" >&2
fi
ensure_tool shellcheck shellcheck >/dev/null || true
[ -n "$UNIT_SRC" ] || echo "deploy/test.sh: systemd's unit directory (sysinit.target) not found" >&2
[ -d "$FIXTURES" ] || echo "deploy/test.sh: fixtures not found at $FIXTURES" >&2

run_test "shell scripts: bash -n, executable bits" test_bash_syntax
with_tools "shell scripts: shellcheck" test_shellcheck shellcheck

if [ -f "$FIXTURES/subnet.env" ]; then
	run_test "mk-docker-opts: fixture subnet.env -> DOCKER_OPTS" test_mk_fixture_default
	run_test "mk-docker-opts: malformed files and bad values" test_mk_malformed
	run_test "mk-docker-opts: usage errors" test_mk_usage_errors
	with_tools "docker drop-in: ExecStartPre output feeds ExecStart" test_docker_dropin_wiring
else
	skip_or_fail "mk-docker-opts and drop-in checks on the fixture" "no $FIXTURES/subnet.env"
fi
run_test "mk-docker-opts: flannel's output for every option combination" test_mk_flannel_cases
run_test "mk-docker-opts: DOCKER_OPT_* from the environment" test_mk_env_options
run_test "mk-docker-opts: subnet already routed through a gateway" test_mk_route_check
run_test "mk-docker-opts: -w waits for the subnet file" test_mk_wait
run_test "mk-docker-opts: ip-masq is the inverse of FLANNEL_IPMASQ" test_mk_ipmasq_inverse
run_test "mk-docker-opts: comments, quotes, CRLF" test_mk_lenient_syntax
run_test "mk-docker-opts: missing subnet file" test_mk_missing_file
run_test "mk-docker-opts: the subnet file is never executed" test_mk_not_executed

run_test "systemd: unit and drop-in settings, no hard dependency chain" test_unit_content
run_test "systemd: weftd.env.example lists every setting" test_env_example
if [ -n "$UNIT_SRC" ]; then
	with_tools "systemd: verify the units with and without etcd and weftd units" test_units_verify systemd-analyze
	with_tools "systemd: verify catches a hard dependency, missing binaries" test_units_verify_catches_errors systemd-analyze
	with_tools "systemd: security exposure of weftd.service" test_unit_exposure systemd-analyze
else
	skip_or_fail "systemd: verify" "no systemd unit directory"
fi

with_tools "cni: 10-weft.conflist is the flannel chain" test_cni_conflist python3 jq

run_test "provision: interface holding an address" test_iface_holding_ip
run_test "provision: install-weftd.sh options -> /etc/default/weftd" test_provision_options
run_test "provision: argument errors" test_provision_errors
if [ "$(id -u)" -eq 0 ]; then
	with_tools "provision: install-weftd.sh installs iptables before it starts weftd" test_weftd_activation_order unshare
else
	skip_or_fail "provision: install-weftd.sh installs iptables before it starts weftd" "needs root for a mount namespace"
fi
with_tools "vagrant: lab plan (machines and steps)" test_lab_plan ruby
if [ -n "$UNIT_SRC" ]; then
	with_tools "vagrant: each VM's provisioning rendered and verified" test_lab_render ruby jq systemd-analyze
else
	skip_or_fail "vagrant: each VM's provisioning rendered and verified" "no systemd unit directory"
fi
with_tools "vagrant: rendering is repeatable" test_render_repeatable ruby
with_tools "vagrant: Vagrantfile syntax" test_vagrantfile_syntax ruby
with_tools "vagrant: validate (offline)" test_vagrant_validate vagrant unshare
with_tools "vagrant: validate catches errors" test_vagrant_validate_catches_errors vagrant unshare
with_tools "vagrant: rsync filter" test_rsync_filter rsync

run_test "docs: operations.md covers flags, variables, paths" test_operations_doc
if [ -x "$WEFTD_BIN" ]; then
	run_test "docs: every flag of weftd --help in operations.md, README, weftd.env.example" test_flags_documented
else
	skip_or_fail "docs: every flag of weftd --help documented" "no weftd binary at $WEFTD_BIN (cargo build --release -p weft-control)"
fi

if [ ${#failed_names[@]} -gt 0 ]; then
	printf 'failed: %s\n' "${failed_names[@]}"
fi
summary="deploy: $passed passed, $failed failed"
[ "$skipped" -eq 0 ] || summary+=", $skipped skipped"
echo "$summary"
[ "$failed" -eq 0 ]
