#!/usr/bin/env bash
# Base OS settings that k3s and CSGHub need, and nothing else:
#   - a few packages (installed only when missing; the base box already holds them),
#   - kernel modules br_netfilter and overlay, loaded now and at every boot,
#   - sysctls: IPv4 forwarding, bridged traffic through iptables, inotify limits,
#   - swap off, now and in /etc/fstab (the kubelet refuses to run with swap by default),
#   - time sync with systemd-timesyncd (certificates and tokens need a sane clock).
# Checks before it acts: each real change prints a line starting "changed:", each thing
# already right a line starting "ok:" with the reason. Safe to run any number of times.
# Inputs: none (it reads no APPLIANCE_* variables).
# appliance: timeout=900
# appliance: files=common
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=files/common/lib.sh
source "${PROVISION_DIR:-/var/tmp/csghub-provision}/files/common/lib.sh"

# What the provisioning scripts and k3s use from the OS (openssl: first boot makes Casdoor's key with
# it, the readiness gate checks Casdoor's tokens with it). Not iptables, conntrack or socat:
# k3s ships its own. Not nfs-common or open-iscsi: volumes are local-path (ReadWriteOnce).
PACKAGES=(ca-certificates curl iproute2 kmod openssl procps systemd-timesyncd)
MODULES=(br_netfilter overlay)
MODULES_FILE=/etc/modules-load.d/csghub-appliance.conf
SYSCTL_FILE=/etc/sysctl.d/60-csghub-appliance.conf
# key=value pairs; inotify limits sized for the many watchers a k3s node with CSGHub runs.
SYSCTLS=(
    "net.ipv4.ip_forward=1"
    "net.bridge.bridge-nf-call-iptables=1"
    "net.bridge.bridge-nf-call-ip6tables=1"
    "fs.inotify.max_user_instances=8192"
    "fs.inotify.max_user_watches=524288"
)

packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        if [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" != "install ok installed" ]]; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} == 0)); then
        echo "ok: packages ${PACKAGES[*]} already installed"
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q -o Acquire::Retries=3
    apt-get install -y -q --no-install-recommends -o Acquire::Retries=3 "${missing[@]}"
    echo "changed: installed ${missing[*]}"
}

kernel_modules() {
    local module
    printf '%s\n' "# Written by csghub-appliance 00-base.sh: needed by k3s." "${MODULES[@]}" |
        install_if_changed - "$MODULES_FILE" 0644
    for module in "${MODULES[@]}"; do
        if [[ -d "/sys/module/$module" ]]; then
            echo "ok: kernel module $module already loaded"
        else
            modprobe "$module"
            echo "changed: loaded kernel module $module"
        fi
    done
}

sysctls() {
    local pair key want have
    printf '%s\n' "# Written by csghub-appliance 00-base.sh: k3s networking and inotify limits." \
        "${SYSCTLS[@]/=/ = }" | install_if_changed - "$SYSCTL_FILE" 0644
    for pair in "${SYSCTLS[@]}"; do
        key=${pair%%=*}
        want=${pair#*=}
        have=$(sysctl -n "$key")
        if [[ "$have" == "$want" ]]; then
            echo "ok: $key is already $want"
        else
            sysctl -q -w "$key=$want"
            echo "changed: $key $have -> $want"
        fi
    done
}

swap_off() {
    local active
    active=$(swapon --show --noheadings 2>/dev/null || true) # no swapon output: no swap to turn off
    if [[ -n "$active" ]]; then
        swapoff -a
        echo "changed: turned swap off"
    else
        echo "ok: no active swap"
    fi
    # Comment out swap entries so swap stays off after a reboot.
    if grep -Eq '^[^#[:space:]][^[:space:]]*[[:space:]]+[^[:space:]]+[[:space:]]+swap[[:space:]]' /etc/fstab 2>/dev/null; then
        sed -i -E 's|^([^#[:space:]][^[:space:]]*[[:space:]]+[^[:space:]]+[[:space:]]+swap[[:space:]].*)$|# disabled by csghub-appliance: \1|' /etc/fstab
        echo "changed: disabled swap entries in /etc/fstab"
    else
        echo "ok: no swap entries in /etc/fstab"
    fi
}

time_sync() {
    if systemctl is-enabled --quiet systemd-timesyncd.service 2>/dev/null; then
        echo "ok: systemd-timesyncd already enabled"
    else
        systemctl enable --quiet systemd-timesyncd.service
        echo "changed: enabled systemd-timesyncd"
    fi
    if systemctl is-active --quiet systemd-timesyncd.service; then
        echo "ok: systemd-timesyncd already running"
    else
        systemctl start systemd-timesyncd.service
        echo "changed: started systemd-timesyncd"
    fi
}

packages
kernel_modules
sysctls
swap_off
time_sync
