#!/bin/bash
# Install k3s air-gap style from the uploaded, verified artifacts (no download in the guest):
# the binary to /usr/local/bin, the image bundle to the agent's images directory, our own
# systemd unit (no install script). Bind the node to an address the appliance owns: a dummy
# interface made by systemd-networkd on every boot, so an IP change after import never
# reaches the cluster (docs/networking.md). Disable what CSGHub's chart replaces. Wait,
# bounded, for the node and the core add-ons.
#
# Inputs (environment): K3S_VERSION, K3S_NODE_IP, K3S_EXTRA_ARGS (shell-quoted list),
# optional K3S_READY_TIMEOUT (seconds, default 600), ARTIFACT_DIR, PROVISION_DIR.
# appliance: env=K3S_VERSION,K3S_NODE_IP,K3S_EXTRA_ARGS
# appliance: files=k3s
# appliance: files=common
# appliance: needs=k3s-binary,k3s-images
# appliance: stack
# appliance: timeout=1200
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=files/common/lib.sh
source "${PROVISION_DIR:-/var/tmp/csghub-provision}/files/common/lib.sh"

ARTIFACT_DIR=${ARTIFACT_DIR:-/var/cache/csghub-appliance/artifacts}
SRC="${PROVISION_DIR:-/var/tmp/csghub-provision}/files/k3s"
K3S_DATA=/var/lib/rancher/k3s
DUMMY_IF=dummy-csghub
READY_TIMEOUT=${K3S_READY_TIMEOUT:-600}
restart_needed=no

: "${K3S_VERSION:?K3S_VERSION is required (k3s.version in the config)}"
: "${K3S_NODE_IP:?K3S_NODE_IP is required (k3s.node_ip in the config)}"
[[ "$K3S_NODE_IP" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "K3S_NODE_IP is not an IPv4 address: $K3S_NODE_IP"
for f in "$ARTIFACT_DIR/k3s" "$ARTIFACT_DIR/k3s-airgap-images-amd64.tar.zst" "$SRC/k3s.service" "$SRC/k3s-killall.sh"; do
    [[ -s "$f" ]] || die "missing $f (the runner uploads the artifacts 'invoke fetch' cached, and provision/files/k3s)"
done

# --- binary, tools, image bundle ---------------------------------------------------------
install_if_changed "$ARTIFACT_DIR/k3s" /usr/local/bin/k3s 0755
[[ "$FILE_CHANGED" == no ]] || restart_needed=yes
have_version=$(/usr/local/bin/k3s --version | awk 'NR == 1 {print $3}')
[[ "$have_version" == "$K3S_VERSION" ]] ||
    die "the uploaded k3s binary is $have_version, the config asks for $K3S_VERSION (run 'invoke fetch' again)"
for tool in kubectl crictl ctr; do
    link=$(readlink "/usr/local/bin/$tool" 2>/dev/null || true) # not a link: empty
    if [[ "$link" == k3s ]]; then
        echo "ok: /usr/local/bin/$tool -> k3s"
    elif [[ -e "/usr/local/bin/$tool" && ! -L "/usr/local/bin/$tool" ]]; then
        echo "ok: /usr/local/bin/$tool exists and is not ours; left alone (use 'k3s $tool')"
    else
        ln -sfn k3s "/usr/local/bin/$tool"
        echo "changed: /usr/local/bin/$tool -> k3s"
    fi
done
install_if_changed "$SRC/k3s-killall.sh" /usr/local/bin/k3s-killall.sh 0755
# k3s imports every archive in this directory at start, so the system images exist offline.
install_if_changed "$ARTIFACT_DIR/k3s-airgap-images-amd64.tar.zst" \
    "$K3S_DATA/agent/images/k3s-airgap-images-amd64.tar.zst" 0644
[[ "$FILE_CHANGED" == no ]] || restart_needed=yes

# --- the address the cluster is bound to ------------------------------------------------
networkd_changed=no
install_if_changed - "/etc/systemd/network/10-$DUMMY_IF.netdev" 0644 <<EOF
# Written by provision/20-k3s.sh: the interface k3s binds to (docs/networking.md).
[NetDev]
Name=$DUMMY_IF
Kind=dummy
EOF
[[ "$FILE_CHANGED" == no ]] || networkd_changed=yes
install_if_changed - "/etc/systemd/network/10-$DUMMY_IF.network" 0644 <<EOF
# Written by provision/20-k3s.sh. The route is a last-resort default: k3s needs one to start,
# and an offline import may have none. Any DHCP default route (lower metric) wins.
[Match]
Name=$DUMMY_IF

[Network]
Address=$K3S_NODE_IP/24
ConfigureWithoutCarrier=yes

[Route]
Gateway=${K3S_NODE_IP%.*}.254
GatewayOnLink=yes
Metric=4096
EOF
[[ "$FILE_CHANGED" == no ]] || networkd_changed=yes
# networkd must not remove routes and rules it did not make (the primary NIC may be managed
# by ifupdown or dhclient).
install_if_changed - /etc/systemd/networkd.conf.d/10-csghub-foreign-routes.conf 0644 <<'EOF'
[Network]
ManageForeignRoutes=no
ManageForeignRoutingPolicyRules=no
EOF
[[ "$FILE_CHANGED" == no ]] || networkd_changed=yes
if ! systemctl -q is-enabled systemd-networkd.service; then
    systemctl enable systemd-networkd.service >/dev/null 2>&1
    echo "changed: enabled systemd-networkd (it creates $DUMMY_IF on every boot)"
fi
if [[ "$networkd_changed" == yes ]] || ! systemctl -q is-active systemd-networkd.service; then
    systemctl restart systemd-networkd.service
    echo "changed: (re)started systemd-networkd"
fi
deadline=$((SECONDS + 60))
until ip -o -4 addr show dev "$DUMMY_IF" 2>/dev/null | grep -q " $K3S_NODE_IP/"; do
    ((SECONDS < deadline)) || die "$DUMMY_IF did not get $K3S_NODE_IP within 60 s (journalctl -u systemd-networkd)"
    sleep 1
done
echo "ok: $DUMMY_IF has $K3S_NODE_IP"
ip route show default | grep -q . || die "no default route even with the fallback on $DUMMY_IF"

# --- k3s configuration and unit ----------------------------------------------------------
install_if_changed - /etc/rancher/k3s/config.yaml 0600 <<EOF
# Written by provision/20-k3s.sh. Per-copy settings (the cluster token) are added on first
# boot in config.yaml.d/. Bound to the appliance's own address: see docs/networking.md.
node-name: csghub
node-ip: $K3S_NODE_IP
advertise-address: $K3S_NODE_IP
flannel-iface: $DUMMY_IF
# CSGHub's chart brings Envoy Gateway and exposes it as a NodePort service.
disable:
  - traefik
  - servicelb
write-kubeconfig-mode: "0600"
EOF
[[ "$FILE_CHANGED" == no ]] || restart_needed=yes
printf '# Written by provision/20-k3s.sh (k3s.node_ip, k3s.extra_args).\nK3S_NODE_IP=%s\nK3S_EXTRA_ARGS=%s\n' \
    "$K3S_NODE_IP" "${K3S_EXTRA_ARGS:-}" | install_if_changed - /etc/default/k3s 0600
[[ "$FILE_CHANGED" == no ]] || restart_needed=yes
install_if_changed "$SRC/k3s.service" /etc/systemd/system/k3s.service 0644
if [[ "$FILE_CHANGED" == yes ]]; then
    systemctl daemon-reload
    restart_needed=yes
fi
if ! systemctl -q is-enabled k3s.service; then
    systemctl enable k3s.service >/dev/null 2>&1
    echo "changed: enabled k3s.service"
fi
if ! systemctl -q is-active k3s.service; then
    echo "changed: starting k3s $K3S_VERSION"
    systemctl start k3s.service
elif [[ "$restart_needed" == yes ]]; then
    echo "changed: restarting k3s (binary, images or configuration changed)"
    systemctl restart k3s.service
else
    echo "ok: k3s.service running, nothing changed"
fi

# --- wait for the node and the core add-ons ------------------------------------------------
export KUBECONFIG=/etc/rancher/k3s/k3s.yaml
deadline=$((SECONDS + READY_TIMEOUT))

until "${KC[@]}" get --raw /readyz >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "the API server did not become ready within ${READY_TIMEOUT} s (journalctl -u k3s)"
    sleep 3
done
echo "ok: API server ready"
while :; do
    # Not registered yet (kubectl fails): not Ready either.
    ready=$("${KC[@]}" get node csghub -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null || true)
    [[ "$ready" != True ]] || break
    ((SECONDS < deadline)) || die "node csghub not Ready within ${READY_TIMEOUT} s (kubectl describe node csghub)"
    sleep 3
done
node_ip=$("${KC[@]}" get node csghub -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
[[ "$node_ip" == "$K3S_NODE_IP" ]] || die "node registered with $node_ip, expected $K3S_NODE_IP"
echo "ok: node csghub Ready at $node_ip"
# The add-ons CSGHub relies on: DNS, the local-path volume provisioner, metrics.
for deploy in coredns local-path-provisioner metrics-server; do
    until "${KC[@]}" -n kube-system get deployment "$deploy" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "kube-system/$deploy was not created within ${READY_TIMEOUT} s"
        sleep 3
    done
    remaining=$((deadline > SECONDS ? deadline - SECONDS : 1))
    if ! "${KC[@]}" -n kube-system rollout status "deployment/$deploy" --timeout="${remaining}s" >/dev/null; then
        "${KC[@]}" -n kube-system get pods -o wide >&2 || true
        die "kube-system/$deploy not available within ${READY_TIMEOUT} s"
    fi
    echo "ok: kube-system/$deploy available"
done
