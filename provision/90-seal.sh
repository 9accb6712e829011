#!/bin/bash
# Seal the VM for export: remove everything that belongs to this machine or to the build, so
# that each imported copy makes its own on first boot (csghub-firstboot), and zero the free
# space so the exported disk compresses.
#
# Always the last step. Afterwards the build can no longer log in (its key and every baked-in
# password are gone) and the VM powers itself off a few seconds after this script exits:
# the runner must not reconnect, it waits for the VM to stop and exports its disk.
# appliance: final
# appliance: timeout=3600
set -euo pipefail

PROVISION_DIR=${PROVISION_DIR:-/var/tmp/csghub-provision}
# SEAL_POWEROFF=no leaves the VM running (for inspection); anything else powers it off.
SEAL_POWEROFF=${SEAL_POWEROFF:-yes}
K3S_DATA=/var/lib/rancher/k3s
STATE=/var/lib/csghub-appliance
LOGIN_USER=csghub

# remove PATH...: delete what exists, one "changed:" line per path; "ok:" when nothing did.
remove() {
    local what=$1 p found=no
    shift
    for p in "$@"; do
        if [[ -e "$p" || -L "$p" ]]; then
            rm -rf -- "$p"
            echo "changed: removed $p"
            found=yes
        fi
    done
    [[ "$found" == yes ]] || echo "ok: no $what to remove"
}

# --- k3s and CSGHub: keep images, chart and manifests; drop this cluster's identity and data ---
seal_stack() {
    if [[ ! -x /usr/local/bin/k3s ]]; then
        echo "ok: k3s not installed (stack steps skipped); no cluster state to reset"
        return 0
    fi
    if systemctl -q is-active k3s.service; then
        systemctl stop k3s.service
        echo "changed: stopped k3s"
    fi
    if [[ -x /usr/local/bin/k3s-killall.sh ]] && { pgrep -x containerd-shim-runc-v2 >/dev/null || pgrep -f '^/var/lib/rancher/k3s/data/.*/containerd' >/dev/null; }; then
        # Stops the pods' containers and unmounts their volumes (secrets, PVCs).
        /usr/local/bin/k3s-killall.sh >/dev/null 2>&1 || true
        echo "changed: stopped every container (k3s-killall.sh)"
    fi
    systemctl -q is-enabled k3s.service 2>/dev/null && echo "ok: k3s.service stays enabled (starts after first boot)"
    # Server identity: datastore (every Secret, the Helm release), CA and certificates, tokens.
    local server=$K3S_DATA/server p
    for p in "$server"/*; do
        [[ -e "$p" ]] || continue
        case "${p##*/}" in
            manifests | static) ;; # the HelmChart manifests and the chart archive: bring CSGHub up offline
            *) remove "k3s server state" "$p" ;;
        esac
    done
    remove "per-copy Helm values" "$server/manifests/csghub-appliance-instance.yaml" \
        "$server/manifests/csghub-appliance-secrets.yaml"
    # A copy installs CSGHub only after it created its own credentials' objects: csghub-ready
    # puts the HelmChart back from the copy 30-csghub.sh kept (ensure_release).
    if [[ -s /usr/local/share/csghub-appliance/csghub-helmchart.yaml ]]; then
        remove "HelmChart in the auto-deploy folder" "$server/manifests/csghub.yaml"
    else
        echo "ok: no kept HelmChart (CSGHub step skipped); auto-deploy folder left as it is"
    fi
    # Agent identity: certificates, kubeconfigs, node password. Images stay (agent/images is
    # the air-gap bundle, agent/containerd the unpacked image store).
    remove "k3s agent certificates" "$K3S_DATA"/agent/*.crt "$K3S_DATA"/agent/*.key "$K3S_DATA"/agent/*.kubeconfig \
        "$K3S_DATA"/agent/pod-manifests "$K3S_DATA"/agent/etc/k3s-agent-load-balancer.json \
        "$K3S_DATA"/agent/etc/k3s-api-server-agent-load-balancer.json
    remove "node password or kubeconfig" /etc/rancher/node/password /etc/rancher/k3s/k3s.yaml \
        /etc/rancher/k3s/config.yaml.d/50-csghub-instance.yaml
    # The build's registry credentials; csghub-ready writes the copy's own.
    remove "registry credentials" /etc/rancher/k3s/registries.yaml
    if [[ -f /etc/rancher/k3s/config.yaml ]] && grep -Eq '^(agent-)?token:' /etc/rancher/k3s/config.yaml; then
        sed -i -E '/^(agent-)?token:/d' /etc/rancher/k3s/config.yaml
        echo "changed: removed the build's token from /etc/rancher/k3s/config.yaml"
    fi
    # CSGHub's data (PostgreSQL, MinIO, Gitaly, registry...) lives in PVCs: this copy starts empty.
    remove "PVC data" "$K3S_DATA"/storage/* /var/lib/kubelet/pods/* /var/lib/cni/*
    remove "pod logs" /var/log/pods/* /var/log/containers/*
    # The runner's uploads (k3s binary, image bundle, chart, generated manifests, the image set's
    # archive) were copied or imported into place by the k3s and csghub steps: these are second
    # copies, build-only (the archive alone is as large as the whole image store).
    remove "uploaded build artifacts" /var/cache/csghub-appliance/artifacts /var/cache/csghub-appliance/manifests \
        /var/cache/csghub-appliance/images
}

# --- per-copy appliance state -------------------------------------------------------------
seal_appliance_state() {
    remove "first-boot state" "$STATE"/* /etc/csghub-appliance/access.conf
    local entry hash
    if getent passwd "$LOGIN_USER" >/dev/null; then
        # A build that ran csghub-firstboot by hand must not leave its password behind.
        entry=$(getent shadow "$LOGIN_USER")
        hash=${entry#*:}
        hash=${hash%%:*}
        if [[ "$hash" != '!' ]]; then
            usermod -p '!' "$LOGIN_USER"
            echo "changed: $LOGIN_USER has no password until a copy's first boot"
        else
            echo "ok: $LOGIN_USER has no password until first boot"
        fi
    fi
}

# --- logins: no key, no password from the build survives ----------------------------------
seal_logins() {
    local user hash home
    while IFS=: read -r user hash _; do
        # An empty field is a password-less login; anything not starting with ! or * is a hash.
        if [[ -z "$hash" || ( "$hash" != '!'* && "$hash" != '*'* ) ]]; then
            usermod -p '!' "$user"
            echo "changed: locked the password of $user (it came from the build)"
        fi
    done </etc/shadow
    echo "ok: no account has a usable password"
    local homes=() accounts
    accounts=$(getent passwd)
    while IFS=: read -r _ _ _ _ _ home _; do
        [[ -d "$home/.ssh" && " ${homes[*]} " != *" $home "* ]] && homes+=("$home")
    done <<<"$accounts"
    for home in "${homes[@]}"; do
        # The build's key and Vagrant's (insecure or replaced) key both live here.
        remove "authorized keys in $home" "$home/.ssh/authorized_keys" "$home/.ssh/authorized_keys2"
    done
    remove "SSH host keys" /etc/ssh/ssh_host_*
}

# --- identity of the machine ------------------------------------------------------------------
seal_machine_identity() {
    if [[ -s /etc/machine-id ]]; then
        # Empty (not absent): systemd then makes a new id at boot and treats it as first boot.
        : >/etc/machine-id
        echo "changed: emptied /etc/machine-id"
    else
        echo "ok: /etc/machine-id already empty"
    fi
    remove "D-Bus machine-id" /var/lib/dbus/machine-id
    # systemd-random-seed.service saves a new seed (marked creditable) when it stops, i.e. at the
    # poweroff after this step: every copy would credit the same seed at its early boot. Stopped
    # now, it saves now (removed below) and has nothing left to do at the poweroff.
    if systemctl -q is-active systemd-random-seed.service 2>/dev/null; then
        systemctl stop systemd-random-seed.service
        echo "changed: stopped systemd-random-seed.service (it would save a seed at the poweroff)"
    fi
    remove "random seed or credential secret" /var/lib/systemd/random-seed /var/lib/systemd/credential.secret
    remove "DHCP leases" /var/lib/dhcp/*.leases /var/lib/NetworkManager/*.lease /var/lib/systemd/network/*
}

# --- network config pinned to a MAC or interface name ---------------------------------------
# VirtualBox gives imported NICs new MACs and another NIC model (other names): such config
# would leave a copy without network.
seal_network() {
    local f pinned=no
    for f in /etc/systemd/network/*.network /etc/systemd/network/*.link; do
        [[ -f "$f" ]] || continue
        if grep -Eq '^[[:space:]]*(MACAddress|PermanentMACAddress)=' "$f" ||
            grep -Eq '^[[:space:]]*Name=[[:space:]]*(eth|en|wl)[a-z0-9]*[[:space:]]*$' "$f"; then
            rm -f -- "$f"
            echo "changed: removed $f (pinned to a MAC address or interface name)"
            pinned=yes
        fi
    done
    [[ "$pinned" == yes ]] || echo "ok: no systemd-networkd config pinned to a MAC or interface name"
    remove "udev persistent net rules" /etc/udev/rules.d/70-persistent-net.rules
    if [[ -f /etc/network/interfaces ]] && grep -Eq '^[[:space:]]*iface[[:space:]]+(eth|en|wl)' /etc/network/interfaces; then
        sed -i -E 's/^([[:space:]]*(auto|allow-hotplug|iface)[[:space:]]+(eth|en|wl)[a-z0-9]*.*)$/# disabled by seal: \1/' \
            /etc/network/interfaces
        echo "changed: disabled interface-name stanzas in /etc/network/interfaces"
    fi
    if ! grep -lsE '^[[:space:]]*Name=.*(en\*|eth\*|e\*)' /etc/systemd/network/*.network >/dev/null &&
        [[ -d /etc/systemd/network ]]; then
        printf '%s\n' "# Written by 90-seal.sh: DHCP on every Ethernet NIC, whatever its name or MAC." \
            "[Match]" "Name=en* eth*" "" "[Network]" "DHCP=ipv4" >/etc/systemd/network/80-csghub-dhcp.network
        echo "changed: DHCP on any en*/eth* NIC (/etc/systemd/network/80-csghub-dhcp.network)"
    else
        echo "ok: a name-pattern DHCP network config exists"
    fi
}

# --- caches, logs, history, temporary files ----------------------------------------------------
seal_clutter() {
    if compgen -G '/var/cache/apt/archives/*.deb' >/dev/null || compgen -G '/var/cache/apt/*.bin' >/dev/null; then
        apt-get clean
        echo "changed: emptied the package cache (apt-get clean)"
    else
        echo "ok: package cache already empty"
    fi
    remove "apt lists" /var/lib/apt/lists/*_Packages /var/lib/apt/lists/*_Release /var/lib/apt/lists/*_InRelease \
        /var/lib/apt/lists/*_Sources /var/lib/apt/lists/*Translation-* /var/lib/apt/lists/*.lz4
    remove "cache files" /var/cache/debconf/*-old /root/.cache /home/*/.cache /var/cache/man/*
    remove "shell history" /root/.bash_history /home/*/.bash_history /root/.lesshst /home/*/.lesshst \
        /root/.viminfo /home/*/.viminfo /root/.wget-hsts /home/*/.wget-hsts /root/.python_history
    local t tmp_files=()
    for t in /tmp/* /tmp/.[!.]* /var/tmp/* /var/tmp/.[!.]* /var/crash/*; do
        # The provisioning directory holds this running script; it goes last (below).
        [[ -e "$t" && "$t" != "$PROVISION_DIR" ]] && tmp_files+=("$t")
    done
    remove "temporary files" "${tmp_files[@]}"
    remove "rotated logs" /var/log/*.gz /var/log/*.xz /var/log/*.[0-9] /var/log/*/*.gz /var/log/*/*.xz \
        /var/log/*/*.[0-9] /var/log/installer
    local f emptied=0 found
    # A file, not a process substitution: find's failure must end the step.
    found=$(mktemp)
    find /var/log -path /var/log/journal -prune -o -type f -size +0 -print0 >"$found"
    while IFS= read -r -d '' f; do
        : >"$f"
        emptied=$((emptied + 1))
    done <"$found"
    rm -f "$found"
    if ((emptied)); then
        echo "changed: emptied $emptied log file(s) under /var/log"
    else
        echo "ok: log files under /var/log already empty"
    fi
    if [[ -d /var/log/journal ]]; then
        # journald writes to /run from here on (the build's last lines stay out of the image);
        # its folder under /var/log/journal is named after the build's machine-id.
        journalctl --relinquish-var >/dev/null 2>&1 || true
        remove "the build's journal" /var/log/journal/*
    fi
}

# --- the build user's rights ------------------------------------------------------------------
# Its password is locked and its keys are gone, but a NOPASSWD rule would still be a standing
# grant in every copy (and a way in for anyone who unlocks the account).
seal_build_user_rights() {
    local users=(vagrant) user f found=no
    [[ -n "${SUDO_USER:-}" && "$SUDO_USER" != root && "$SUDO_USER" != vagrant ]] && users+=("$SUDO_USER")
    for user in "${users[@]}"; do
        for f in /etc/sudoers.d/*; do
            [[ -f "$f" ]] || continue
            if grep -Eq "^[[:space:]]*${user}[[:space:]]" "$f"; then
                rm -f -- "$f"
                echo "changed: removed $f (sudo rule for the build user $user)"
                found=yes
            fi
        done
        if grep -Eq "^[[:space:]]*${user}[[:space:]]" /etc/sudoers 2>/dev/null; then
            sed -i -E "/^[[:space:]]*${user}[[:space:]]/d" /etc/sudoers
            echo "changed: removed the build user $user's rule from /etc/sudoers"
            found=yes
        fi
    done
    [[ "$found" == yes ]] || echo "ok: no sudo rule for the build user"
}

# --- what the shutdown after the seal would write -----------------------------------------------
# The poweroff that follows this step still writes: wtmp records (sessions ending, the
# shutdown), a DHCP lease on release, and, were it active, the random seed and the journal. A
# transient unit (it lives in /run, not in the image) is stopped during that shutdown after all
# of them, while the disk is still writable, and removes what they wrote.
arm_shutdown_scrub() {
    local script=/run/csghub-seal-scrub.sh
    cat >"$script" <<'SCRUB'
#!/bin/bash
# Written by 90-seal.sh; runs when the sealed VM shuts down (transient unit csghub-seal-scrub).
rm -f /var/lib/systemd/random-seed /var/lib/systemd/credential.secret
rm -rf /var/log/journal/* /var/lib/systemd/network/*
rm -f /var/lib/dhcp/*.leases /var/lib/NetworkManager/*.lease
find /var/log -type f -size +0 -exec truncate -s 0 {} +
rm -f /root/.bash_history /home/*/.bash_history
sync
SCRUB
    chmod 0700 "$script"
    if systemctl -q is-active csghub-seal-scrub.service 2>/dev/null; then
        echo "ok: shutdown scrub already armed"
        return 0
    fi
    systemd-run --quiet --unit=csghub-seal-scrub --service-type=oneshot --property=RemainAfterExit=yes \
        --property=DefaultDependencies=no --property=Conflicts=shutdown.target \
        --property="Before=shutdown.target systemd-random-seed.service systemd-journal-flush.service systemd-update-utmp.service ssh.service systemd-user-sessions.service systemd-logind.service networking.service systemd-networkd.service" \
        --property=After=local-fs.target \
        --property="ExecStop=/bin/bash $script" /bin/true
    echo "changed: armed csghub-seal-scrub: the shutdown after the seal leaves no seed, log or lease behind"
}

# --- free space: trimmed or zeroed, so the exported disk holds only live data -----------------
zero_free_space() {
    local mount out boot_device root_device
    sync
    for mount in / /boot; do
        mountpoint -q "$mount" || continue
        if [[ "$mount" == /boot ]]; then
            boot_device=$(stat -c %d /boot)
            root_device=$(stat -c %d /)
            [[ "$boot_device" != "$root_device" ]] || continue
        fi
        if out=$(fstrim --verbose "$mount" 2>&1); then
            echo "changed: $out (fstrim)"
            continue
        fi
        # No discard (a disk without TRIM, or a hypervisor that ignores it): fill the free
        # space with zeros, which qemu-img and VBoxManage leave out of a streamOptimized VMDK.
        echo "ok: fstrim $mount not possible (${out##*: }); zero-filling instead"
        dd if=/dev/zero of="$mount/.seal-zero" bs=4M status=none 2>/dev/null || true
        sync
        rm -f "$mount/.seal-zero"
        sync
        echo "changed: zeroed the free space of $mount"
    done
}

seal_stack
seal_appliance_state
seal_machine_identity
seal_network
seal_clutter
seal_logins
seal_build_user_rights
arm_shutdown_scrub
# The runner's upload directory (scripts, step markers) is the build's, not the appliance's.
remove "provisioning files" "$PROVISION_DIR"
zero_free_space
if [[ "$SEAL_POWEROFF" == no ]]; then
    echo "ok: SEAL_POWEROFF=no: the VM stays up (nobody can log in with the build's key any more)"
else
    systemd-run --quiet --on-active=5 --unit=csghub-seal-poweroff systemctl poweroff
    echo "changed: sealed; the VM powers off in 5 s (export its disk then; do not reconnect)"
fi
