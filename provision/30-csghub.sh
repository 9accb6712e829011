#!/bin/bash
# Install CSGHub on k3s from the uploaded chart archive with k3s's helm-controller: the chart
# goes to k3s's static file server, the HelmChart and the coredns-custom ConfigMap (both
# generated on the build host from the config: `invoke values`, appliance/manifests.py) to
# the auto-deploy directory. Then wait, bounded and with progress, until every workload is
# ready; check over HTTP that the portal and the login service answer through the gateway's
# NodePort; make sure every image the release references is in the guest's image store
# (pulled now, while the build has internet; pinned so that image GC never drops it) and fail
# listing any that is missing; print the URL and where the credentials are.
#
# Inputs (environment): CSGHUB_CHART_VERSION, CSGHUB_DOMAIN, CSGHUB_HTTP_PORT, K3S_NODE_IP,
# optional CSGHUB_READY_TIMEOUT (seconds, default 3600), CSGHUB_POLL_SECONDS (default 10),
# ARTIFACT_DIR, MANIFEST_DIR.
# appliance: env=CSGHUB_CHART_VERSION,CSGHUB_DOMAIN,CSGHUB_HTTP_PORT,K3S_NODE_IP
# appliance: files=csghub
# appliance: files=common
# appliance: uploads
# appliance: timeout=5400
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=files/common/lib.sh
source "${PROVISION_DIR:-/var/tmp/csghub-provision}/files/common/lib.sh"

ARTIFACT_DIR=${ARTIFACT_DIR:-/var/cache/csghub-appliance/artifacts}
MANIFEST_DIR=${MANIFEST_DIR:-/var/cache/csghub-appliance/manifests}
K3S_DATA=/var/lib/rancher/k3s
# Kept in the sealed image (first-boot state under /var/lib/csghub-appliance is not).
IMAGES_LIST=/usr/local/share/csghub-appliance/images.txt
NAMESPACE=csghub
READY_TIMEOUT=${CSGHUB_READY_TIMEOUT:-3600}
POLL_SECONDS=${CSGHUB_POLL_SECONDS:-10}
export KUBECONFIG=/etc/rancher/k3s/k3s.yaml
LIB="${PROVISION_DIR:-/var/tmp/csghub-provision}/files/csghub/lib.sh"

die() {
    echo "error: $*" >&2
    exit 1
}
kc() { /usr/local/bin/k3s kubectl --request-timeout=30s "$@"; }

: "${CSGHUB_CHART_VERSION:?CSGHUB_CHART_VERSION is required (csghub.chart_version)}"
: "${CSGHUB_DOMAIN:?CSGHUB_DOMAIN is required (csghub.domain)}"
: "${CSGHUB_HTTP_PORT:?CSGHUB_HTTP_PORT is required (the http forward)}"
: "${K3S_NODE_IP:?K3S_NODE_IP is required (k3s.node_ip)}"
CHART="csghub-$CSGHUB_CHART_VERSION.tgz"
[[ -r "$LIB" ]] || die "missing $LIB (the runner uploads provision/files/csghub)"
# shellcheck source-path=SCRIPTDIR source=files/csghub/lib.sh
. "$LIB"
for f in "$ARTIFACT_DIR/$CHART" "$MANIFEST_DIR/csghub.yaml" "$MANIFEST_DIR/coredns-custom.yaml"; do
    [[ -s "$f" ]] || die "missing $f (the runner uploads the chart 'invoke fetch' cached and the generated manifests)"
done
grep -qF "static/charts/$CHART" "$MANIFEST_DIR/csghub.yaml" ||
    die "$MANIFEST_DIR/csghub.yaml does not install $CHART: manifests and CSGHUB_CHART_VERSION disagree"
[[ -x /usr/local/bin/k3s ]] || die "k3s is not installed (the k3s step runs first)"
kc get --raw /readyz >/dev/null 2>&1 || die "the k3s API server is not ready (systemctl status k3s)"

deadline=$((SECONDS + READY_TIMEOUT))
expired() { ((SECONDS >= deadline)); }

# The guest-side helpers (chart_base, coredns_custom_manifest) stay installed for
# csghub-reconfigure, which must redo the in-cluster DNS when a copy's domain changes.
install_if_changed "$LIB" /usr/local/lib/csghub-appliance/csghub.sh 0644 || true

# --- chart, DNS, release ---------------------------------------------------------------------
# k3s serves server/static/ at https://<api>/static/, which the HelmChart's chart URL names.
install_if_changed "$ARTIFACT_DIR/$CHART" "$K3S_DATA/server/static/charts/$CHART" 0644 || true

if install_if_changed "$MANIFEST_DIR/coredns-custom.yaml" "$K3S_DATA/server/manifests/coredns-custom.yaml" 0600; then
    # CoreDNS reads the imported files at start: wait for the deploy controller to apply the
    # ConfigMap, then restart CoreDNS.
    until kc -n kube-system get configmap coredns-custom -o jsonpath='{.data}' 2>/dev/null |
        grep -qF "$CSGHUB_DOMAIN"; do
        expired && die "ConfigMap kube-system/coredns-custom was not applied (journalctl -u k3s)"
        sleep 2
    done
    kc -n kube-system rollout restart deployment/coredns >/dev/null
    kc -n kube-system rollout status deployment/coredns --timeout=300s >/dev/null ||
        die "CoreDNS did not come back after loading coredns-custom"
    echo "changed: CoreDNS resolves $CSGHUB_DOMAIN names to $K3S_NODE_IP inside the cluster"
fi

release_changed_at=0
if install_if_changed "$MANIFEST_DIR/csghub.yaml" "$K3S_DATA/server/manifests/csghub.yaml" 0600; then
    release_changed_at=$(date +%s)
    echo "changed: helm-controller installs or upgrades CSGHub $CSGHUB_CHART_VERSION"
fi

# The helm-controller runs `helm upgrade --install` in a Job; wait for the one that carries
# the current manifest (completed after our change).
echo "waiting for the Helm release (job kube-system/helm-install-csghub)"
while :; do
    job=$(kc -n kube-system get helmchart csghub -o jsonpath='{.status.jobName}' 2>/dev/null || true)
    failed=$(kc -n kube-system get helmchart csghub \
        -o jsonpath='{.status.conditions[?(@.type=="Failed")].status}' 2>/dev/null || true)
    if [[ "$failed" == True ]]; then
        kc -n kube-system logs "job/${job:-helm-install-csghub}" --tail=40 >&2 || true
        die "the Helm install failed (HelmChart kube-system/csghub; logs above); fix and re-run the step"
    fi
    if [[ -n "$job" ]]; then
        read -r succeeded done_at < <(kc -n kube-system get job "$job" \
            -o jsonpath='{.status.succeeded} {.status.completionTime}{"\n"}' 2>/dev/null || echo "0 -")
        if [[ "${succeeded:-0}" -ge 1 && "$done_at" != - ]] &&
            (($(date -d "$done_at" +%s) >= release_changed_at - 5)); then
            break
        fi
        if [[ "$(kc -n kube-system get job "$job" -o jsonpath='{.status.failed}' 2>/dev/null || true)" -ge 3 ]] 2>/dev/null; then
            kc -n kube-system logs "job/$job" --tail=40 >&2 || true
            die "the Helm install job $job keeps failing (logs above)"
        fi
    fi
    expired && die "the Helm release was not installed within ${READY_TIMEOUT} s (kubectl -n kube-system logs job/helm-install-csghub)"
    sleep 5
done
echo "ok: Helm release $NAMESPACE/csghub deployed (chart $CSGHUB_CHART_VERSION)"

# --- every workload ready ------------------------------------------------------------------
# One line per Deployment/StatefulSet/DaemonSet: "KIND NS/NAME WANTED READY".
workload_lines() {
    kc get deployments,statefulsets -A -o jsonpath='{range .items[*]}{.kind} {.metadata.namespace}/{.metadata.name} {.spec.replicas} {.status.readyReplicas}{"\n"}{end}'
    kc get daemonsets -A -o jsonpath='{range .items[*]}{.kind} {.metadata.namespace}/{.metadata.name} {.status.desiredNumberScheduled} {.status.numberReady}{"\n"}{end}'
}
last_report=""
last_time=0
while :; do
    states=$(workload_lines 2>/dev/null | workload_states || true)
    total=$(grep -c . <<<"$states" || true)
    ready=$(grep -c '^ready ' <<<"$states" || true)
    report="$ready/$total"
    if [[ "$report" != "$last_report" ]] || ((SECONDS - last_time >= 60)); then
        echo "progress: $ready/$total workloads ready"
        last_report=$report
        last_time=$SECONDS
    fi
    if ((total > 0 && ready == total)); then
        break
    fi
    if expired; then
        echo "not ready:" >&2
        grep '^waiting ' <<<"$states" | sed 's/^waiting /  /' >&2 || true
        kc get pods -A --field-selector=status.phase!=Running,status.phase!=Succeeded >&2 || true
        die "not every workload was ready within ${READY_TIMEOUT} s"
    fi
    sleep "$POLL_SECONDS"
done
echo "ok: all $total workloads ready"

# --- HTTP through the gateway's NodePort -----------------------------------------------------
# http_status HOST: the status code the gateway gives for http://HOST:PORT/ (Host header as a
# browser sends it), reached on the node address like the NAT forward reaches it.
http_status() {
    # shellcheck disable=SC2016  # the inner script expands its own positional parameters
    timeout 15 bash -c '
        exec 3<>"/dev/tcp/$1/$2"
        printf "GET / HTTP/1.1\r\nHost: %s:%s\r\nUser-Agent: csghub-appliance-check\r\nConnection: close\r\n\r\n" "$3" "$2" >&3
        read -r _ code _ <&3
        echo "$code"
    ' _ "$K3S_NODE_IP" "$CSGHUB_HTTP_PORT" "$1" 2>/dev/null || echo 000
}
login_host=$(kc -n "$NAMESPACE" get httproutes -o jsonpath='{range .items[*]}{range .spec.hostnames[*]}{@}{"\n"}{end}{end}' |
    grep -m1 '^casdoor\.' || true)
[[ -n "$login_host" ]] || die "no HTTPRoute for the login service (casdoor.*) in namespace $NAMESPACE"
for host in "$CSGHUB_DOMAIN" "$login_host"; do
    until code=$(http_status "$host") && [[ "$code" =~ ^[23] ]]; do
        expired && die "http://$host:$CSGHUB_HTTP_PORT/ answered $code through the gateway, not 2xx/3xx"
        sleep 5
    done
    echo "ok: http://$host:$CSGHUB_HTTP_PORT/ answers $code"
done

# --- offline readiness: every referenced image is in the image store -----------------------------
referenced_images() {
    kc get pods -A -o jsonpath='{range .items[*]}{range .spec.initContainers[*]}{.image}{"\n"}{end}{range .spec.containers[*]}{.image}{"\n"}{end}{end}'
    kc get deployments,statefulsets,daemonsets,jobs -A -o jsonpath='{range .items[*]}{range .spec.template.spec.initContainers[*]}{.image}{"\n"}{end}{range .spec.template.spec.containers[*]}{.image}{"\n"}{end}{end}'
    kc get cronjobs -A -o jsonpath='{range .items[*]}{range .spec.jobTemplate.spec.template.spec.containers[*]}{.image}{"\n"}{end}{end}'
    # The release's own manifest also names images of hook Jobs that ran and were deleted.
    kc -n "$NAMESPACE" get secrets -l owner=helm,name=csghub,status=deployed \
        -o jsonpath='{.items[0].data.release}' | base64 -d | base64 -d | gzip -dc | release_images
}
stored_images() {
    /usr/local/bin/k3s ctr -n k8s.io images ls -q
}
mkdir -p "${IMAGES_LIST%/*}"
mapfile -t wanted < <(referenced_images 2>/dev/null | grep -v '^$' | while read -r ref; do normalize_image "$ref"; done | sort -u)
((${#wanted[@]} > 0)) || die "found no image references in the cluster; is the release installed?"
have=$(stored_images | sort -u)
for ref in "${wanted[@]}"; do
    if ! grep -qxF "$ref" <<<"$have"; then
        # Referenced but never run yet (hook or cron images): pull it now, while there is internet.
        if /usr/local/bin/k3s crictl pull "$ref" >/dev/null 2>&1; then
            echo "changed: pulled $ref"
        fi
    fi
done
have=$(stored_images | sort -u)
missing=()
for ref in "${wanted[@]}"; do
    if grep -qxF "$ref" <<<"$have"; then
        # Pinned images are never removed by the kubelet's image garbage collection.
        if ! /usr/local/bin/k3s ctr -n k8s.io images ls "name==$ref" | grep -q 'io.cri-containerd.pinned=pinned'; then
            /usr/local/bin/k3s ctr -n k8s.io images label "$ref" io.cri-containerd.pinned=pinned >/dev/null
            echo "changed: pinned $ref"
        fi
    else
        missing+=("$ref")
    fi
done
printf '%s\n' "${wanted[@]}" >"$IMAGES_LIST.tmp"
mv "$IMAGES_LIST.tmp" "$IMAGES_LIST"
if ((${#missing[@]} > 0)); then
    echo "missing images (the appliance would need the internet to start them):" >&2
    printf '  %s\n' "${missing[@]}" >&2
    die "${#missing[@]} of ${#wanted[@]} referenced images are not in the image store"
fi
echo "ok: all ${#wanted[@]} images the release references are stored and pinned (list: $IMAGES_LIST)"

# --- where to go --------------------------------------------------------------------------------
echo "CSGHub: http://$CSGHUB_DOMAIN:$CSGHUB_HTTP_PORT/  (login service: http://$login_host:$CSGHUB_HTTP_PORT/)"
echo "credentials: sudo k3s kubectl -n $NAMESPACE get secret csghub-casdoor-init -o jsonpath='{.data.INIT_ADMIN_USER}' | base64 -d"
echo "             sudo k3s kubectl -n $NAMESPACE get secret csghub-casdoor-init -o jsonpath='{.data.INIT_ADMIN_PASSWORD}' | base64 -d"
