#!/bin/bash
# Stop k3s and every container it started, and release their mounts and network devices.
# k3s.service uses KillMode=process, so stopping the service leaves the pods running; sealing
# the image (provision/90-seal.sh) and maintenance need them gone.
set -euo pipefail

K3S_DATA=/var/lib/rancher/k3s

if systemctl -q is-active k3s.service 2>/dev/null; then
    systemctl stop k3s.service
fi

# The containerd shims k3s started run from its data directory; each one's process tree is
# one container (or pod sandbox). Kill the trees children first.
kill_tree() {
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        kill_tree "$child"
    done
    kill -9 "$1" 2>/dev/null || true
}
for exe in /proc/[0-9]*/exe; do
    target=$(readlink "$exe" 2>/dev/null) || continue
    case "$target" in
        "$K3S_DATA"/data/*/bin/containerd-shim-runc-v2)
            pid=${exe#/proc/}
            kill_tree "${pid%/exe}"
            ;;
        *) ;; # not a shim
    esac
done

# Unmount what the pods had mounted (volumes, secrets, overlay roots, network namespaces),
# deepest first.
awk '{print $2}' /proc/self/mounts |
    grep -E '^(/run/k3s/|/var/lib/kubelet/pods/|/run/netns/cni-)' |
    sort -r |
    while read -r mountpoint; do
        umount -l "$mountpoint" 2>/dev/null || true
    done
rm -rf /run/netns/cni-* 2>/dev/null || true

# The pods' veth ends went with their network namespaces; the bridge and VXLAN devices stay.
for dev in cni0 flannel.1 flannel-v6.1 kube-ipvs0; do
    ip link delete "$dev" 2>/dev/null || true
done
echo "k3s and its containers are stopped"
