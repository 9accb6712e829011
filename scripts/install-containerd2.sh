#!/usr/bin/env bash
# containerd 2.x for the tests, as k3s v1.3x embeds it (Debian 12 ships 1.6): Debian sid's containerd
# package, downloaded by apt with a private sources list and state under the cache folder (the host's
# apt configuration and installed packages are not touched; apt checks the archive's signature with the
# host's keyring), then unpacked with dpkg-deb -x, not installed. Tests run its containerd and ctr from
# $DEST/root/usr/bin on a private socket (tests/unit/test_imagecache.py). Safe to run twice.
set -euo pipefail

DEST="${CSGHUB_CONTAINERD2_DIR:-/var/cache/csghub-appliance/containerd2}"
MIRROR="${CSGHUB_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if [ -x "$DEST/root/usr/bin/containerd" ] && "$DEST/root/usr/bin/containerd" --version | grep -q ' 2\.'; then
  echo "containerd 2.x: already unpacked in $DEST ($("$DEST/root/usr/bin/containerd" --version | awk '{print $3}'))"
  exit 0
fi
mkdir -p "$DEST/apt/lists/partial" "$DEST/apt/cache/archives/partial" "$DEST/deb"
echo "deb $MIRROR sid main" >"$DEST/apt/sources.list"
: >"$DEST/apt/status"
APT_OPTS=(
  -o "Dir::Etc::sourcelist=$DEST/apt/sources.list" -o "Dir::Etc::sourceparts=/dev/null"
  -o "Dir::State::Lists=$DEST/apt/lists" -o "Dir::State::status=$DEST/apt/status"
  -o "Dir::Cache=$DEST/apt/cache" -o "APT::Architecture=amd64" -o "APT::Sandbox::User=root"
)
apt-get "${APT_OPTS[@]}" -qq update
version="$(apt-cache "${APT_OPTS[@]}" policy containerd | awk '/Candidate:/ {print $2}')"
case "$version" in
  2.*) ;;
  *) echo "install-containerd2: Debian sid's containerd is '$version', not 2.x" >&2; exit 1 ;;
esac
(cd "$DEST/deb" && rm -f ./*.deb && apt-get "${APT_OPTS[@]}" -qq download "containerd=$version")
rm -rf "$DEST/root.new"
dpkg-deb -x "$DEST"/deb/containerd_*.deb "$DEST/root.new"
rm -rf "$DEST/root"
mv "$DEST/root.new" "$DEST/root"
echo "containerd 2.x: $("$DEST/root/usr/bin/containerd" --version | awk '{print $3}') unpacked in $DEST"
