#!/bin/sh
# Make a Python 3.11 base image from Debian's packages, for machines that reach a Debian mirror but no image registry:
#   sudo docker/debian-base.sh digit-base:bookworm [MIRROR]
#   docker build --network host --build-arg BASE_IMAGE=digit-base:bookworm ...
# debootstrap (Debian's package) writes a minimal bookworm (python3, venv, pip, CA certificates) into a temporary
# folder, which `docker import` turns into the image. pip in the image trusts the certificates of the machine that
# made it (PIP_CERT): where a proxy re-signs HTTPS, as on some build machines, pip then reaches the package index.
set -eu
NAME=${1:?usage: debian-base.sh IMAGE_NAME [MIRROR]}
MIRROR=${2:-http://deb.debian.org/debian}
DOCKER=${DOCKER:-docker}
command -v debootstrap >/dev/null || { echo "error: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root (run it with sudo)" >&2; exit 1; }
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$DIR" "$MIRROR" \
  >"$DIR.log" 2>&1 || { tail -5 "$DIR.log" >&2; echo "error: debootstrap failed (log: $DIR.log)" >&2; exit 1; }
rm -f "$DIR.log"
ln -sf python3 "$DIR/usr/bin/python"
cp /etc/ssl/certs/ca-certificates.crt "$DIR/etc/ssl/certs/host-ca.crt"
rm -rf "$DIR/var/cache/apt/archives"/*.deb "$DIR/var/lib/apt/lists"/*
tar -C "$DIR" -c . | $DOCKER import --change 'ENV PIP_CERT=/etc/ssl/certs/host-ca.crt' \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$NAME" >/dev/null
echo "$NAME"
