#!/bin/bash
# Host settings the overlay relies on:
#   /etc/modules-load.d/weft.conf   loads tun at boot (weftd.service may not load modules)
#   /etc/sysctl.d/60-weft.conf      IPv4 forwarding, so the host routes between its
#                                   containers' bridge and the TUN device
# and applies both now. With --root DIR only the files are written, under DIR (see lib.sh).
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

parse_root_only "$@"
require_root_user

write_file /etc/modules-load.d/weft.conf 0644 <<'EOF2'
# weftd creates its TUN device from a service that may not load kernel modules.
tun
EOF2
write_file /etc/sysctl.d/60-weft.conf 0644 <<'EOF2'
# Containers reach other hosts through the TUN device: the host forwards between them.
net.ipv4.ip_forward = 1
EOF2

if ! activating; then
	log "--root given: nothing is applied"
	exit 0
fi

ensure_command modprobe kmod
ensure_command sysctl procps
modprobe tun
sysctl -q -p /etc/sysctl.d/60-weft.conf
log "tun loaded, IPv4 forwarding on"
