#!/bin/bash
# Runs docker on this host's overlay subnet:
#   /usr/local/libexec/weft/mk-docker-opts.sh                 subnet.env -> dockerd options
#   /etc/systemd/system/docker.service.d/weft.conf            the docker.service drop-in
# then installs docker (Debian's docker.io) unless dockerd is already there, and restarts
# docker so that docker0 takes the overlay subnet. weftd must be installed first: the
# drop-in requires weftd.service and its subnet file.
# With --root DIR only the files are written, under DIR (see lib.sh).
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

parse_root_only "$@"
require_root_user

copy_file "$DEPLOY_DIR/docker/mk-docker-opts.sh" /usr/local/libexec/weft/mk-docker-opts.sh 0755
copy_file "$DEPLOY_DIR/systemd/docker.service.d/weft.conf" /etc/systemd/system/docker.service.d/weft.conf 0644

if ! activating; then
	log "--root given: docker is not installed or restarted"
	exit 0
fi

systemctl is-active --quiet weftd.service ||
	die "weftd.service is not running; run install-weftd.sh first"
systemctl daemon-reload
if ! command -v dockerd >/dev/null; then
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q
	apt-get install -y -q docker.io
fi
systemctl enable docker.service
systemctl restart docker.service
log "docker is running on the overlay subnet; /run/flannel/docker.env:"
cat /run/flannel/docker.env >&2
ip -4 addr show docker0 >&2 || true
