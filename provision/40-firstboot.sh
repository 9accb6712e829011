#!/bin/bash
# Install the first-boot machinery: the service that gives each imported copy its own SSH
# host keys, machine-id, login password, cluster token and CSGHub credentials (secrets.sh) and
# detects its network; the console banner (/etc/issue, motd) with its timer; the readiness gate
# (csghub-ready and its service, run at every boot); csghub-status and csghub-reconfigure;
# and the login user `csghub` (no password until a copy's first boot makes one).
#
# The build VM itself is marked as done, so rebooting it during the build does not run the
# first-boot service; 90-seal.sh removes that mark.
# Inputs (environment): APPLIANCE_NAME, APPLIANCE_VERSION, CSGHUB_DOMAIN, CSGHUB_HTTP_PORT,
# K3S_NODE_IP, CSGHUB_EDITION (written to /etc/csghub-appliance for the first-boot tools), PROVISION_DIR.
# appliance: env=APPLIANCE_NAME,APPLIANCE_VERSION,CSGHUB_DOMAIN,CSGHUB_HTTP_PORT,K3S_NODE_IP,CSGHUB_GIT_SSH_PORT,CSGHUB_EDITION
# appliance: files=firstboot
# appliance: files=common
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=files/common/lib.sh
source "${PROVISION_DIR:-/var/tmp/csghub-provision}/files/common/lib.sh"

SRC="${PROVISION_DIR:-/var/tmp/csghub-provision}/files/firstboot"
LOGIN_USER=csghub
STATE=/var/lib/csghub-appliance
ETC=/etc/csghub-appliance
units_changed=no

if [[ ! -f "$SRC/lib.sh" ]]; then
    echo "error: support files missing: $SRC/lib.sh (the runner uploads provision/files/firstboot)" >&2
    exit 1
fi

install_if_changed "$SRC/lib.sh" /usr/local/lib/csghub-appliance/lib.sh 0644
install_if_changed "$SRC/secrets.sh" /usr/local/lib/csghub-appliance/secrets.sh 0644
install_if_changed "$SRC/csghub-firstboot" /usr/local/sbin/csghub-firstboot 0755
install_if_changed "$SRC/csghub-banner" /usr/local/sbin/csghub-banner 0755
install_if_changed "$SRC/csghub-reconfigure" /usr/local/sbin/csghub-reconfigure 0755
install_if_changed "$SRC/csghub-ready" /usr/local/sbin/csghub-ready 0755
install_if_changed "${SRC%/*}/common/readiness.sh" /usr/local/lib/csghub-appliance/readiness.sh 0644
install_if_changed "${SRC%/*}/common/lib.sh" /usr/local/lib/csghub-appliance/common.sh 0644
install_if_changed "$SRC/csghub-status" /usr/local/bin/csghub-status 0755
for unit in csghub-firstboot.service csghub-banner.service csghub-banner.timer csghub-ready.service; do
    install_if_changed "$SRC/$unit" "/etc/systemd/system/$unit" 0644
    [[ "$FILE_CHANGED" == no ]] || units_changed=yes
done

# Build-time facts the guest tools read (values quoted for bash).
env_tmp=$(mktemp)
{
    echo "# Written by provision/40-firstboot.sh at build time."
    printf 'APPLIANCE_PRODUCT=%q\n' "CSGHub appliance"
    printf 'APPLIANCE_NAME=%q\n' "${APPLIANCE_NAME:-csghub}"
    printf 'APPLIANCE_VERSION=%q\n' "${APPLIANCE_VERSION:-unknown}"
    printf 'CSGHUB_DOMAIN=%q\n' "${CSGHUB_DOMAIN:-csghub.localhost}"
    printf 'CSGHUB_HTTP_PORT=%q\n' "${CSGHUB_HTTP_PORT:-30080}"
    printf 'CSGHUB_GIT_SSH_PORT=%q\n' "${CSGHUB_GIT_SSH_PORT:-30022}"
    printf 'CSGHUB_EDITION=%q\n' "${CSGHUB_EDITION:-ce}"
    printf 'CSGHUB_NAMESPACE=%q\n' "${CSGHUB_NAMESPACE:-csghub}"
    printf 'CSGHUB_HELMCHART_NAME=%q\n' "${CSGHUB_HELMCHART_NAME:-csghub}"
    printf 'CSGHUB_HELMCHART_NAMESPACE=%q\n' "${CSGHUB_HELMCHART_NAMESPACE:-kube-system}"
    printf 'K3S_NODE_IP=%q\n' "${K3S_NODE_IP:-}"
} >"$env_tmp"
install_if_changed "$env_tmp" "$ETC/appliance.env" 0644
rm -f "$env_tmp"

# sshd: password logins for the copy's owner (keys are never baked in); root stays out.
if [[ -d /etc/ssh/sshd_config.d ]]; then
    install_if_changed "$SRC/sshd-csghub-appliance.conf" /etc/ssh/sshd_config.d/10-csghub-appliance.conf 0644
    if [[ "$FILE_CHANGED" == yes ]]; then
        # Validate now rather than find out on a copy that cannot be logged in to.
        if compgen -G '/etc/ssh/ssh_host_*_key' >/dev/null; then
            sshd -t
        fi
    fi
else
    echo "ok: no /etc/ssh/sshd_config.d (OpenSSH server not installed); no sshd settings to add"
fi

# The owner's login: exists in the image with a locked password; first boot sets one.
if getent passwd "$LOGIN_USER" >/dev/null; then
    echo "ok: user $LOGIN_USER exists"
else
    useradd --create-home --shell /bin/bash --comment "CSGHub appliance owner" "$LOGIN_USER"
    echo "changed: created user $LOGIN_USER (password locked until first boot)"
fi
if getent group sudo >/dev/null; then
    if id -nG "$LOGIN_USER" | tr ' ' '\n' | grep -qx sudo; then
        echo "ok: $LOGIN_USER may use sudo"
    else
        usermod -aG sudo "$LOGIN_USER"
        echo "changed: $LOGIN_USER may use sudo (with its password)"
    fi
else
    echo "ok: no sudo group in this image; $LOGIN_USER gets no sudo"
fi

# Units.
if [[ "$units_changed" == yes ]]; then
    systemctl daemon-reload
    echo "changed: systemd reloaded its units"
fi
to_enable=()
for unit in csghub-firstboot.service csghub-banner.service csghub-banner.timer csghub-ready.service; do
    if systemctl -q is-enabled "$unit" 2>/dev/null; then
        echo "ok: $unit enabled"
    else
        to_enable+=("$unit")
    fi
done
if ((${#to_enable[@]})); then
    # One call: each systemctl run reloads the unit files (seconds each under emulation).
    systemctl enable "${to_enable[@]}" 2>&1 | sed 's/^/  /'
    echo "changed: enabled ${to_enable[*]}"
fi

# This VM is the build, not a copy: keep the first-boot service from running on its reboots.
mkdir -p "$STATE"
if [[ -e "$STATE/firstboot.done" ]]; then
    echo "ok: build VM marked as not a copy ($STATE/firstboot.done)"
else
    echo "build VM (removed by 90-seal.sh)" >"$STATE/firstboot.done"
    echo "changed: marked the build VM as not a copy ($STATE/firstboot.done)"
fi
