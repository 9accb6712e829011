#!/bin/bash
# Install CSGHub on k3s from the uploaded chart archive with k3s's helm-controller. First the
# images: the declared image set (images.txt, computed on the build host from the rendered chart)
# is imported from the archive the build host fetched by digest (images.tar; the guest never
# pulls), checked by name and digest and pinned so that image GC never drops it; any missing
# image fails the step by name. Then the chart goes to k3s's static file server, the HelmChart
# and the coredns-custom ConfigMap (both generated on the build host from the config: `invoke
# values`, appliance/manifests.py) to the auto-deploy directory. Then wait, bounded and with
# progress, until the readiness gate (provision/files/common/readiness.sh, the one every copy
# runs) says CSGHub works; fail listing any image the cluster runs that the set lacks; print the
# URL and where the credentials are.
#
# Inputs (environment): CSGHUB_CHART_VERSION, CSGHUB_DOMAIN, CSGHUB_HTTP_PORT, K3S_NODE_IP,
# CSGHUB_GIT_SSH_PORT, optional CSGHUB_READY_TIMEOUT (seconds, default 3600),
# CSGHUB_POLL_SECONDS (default 10), ARTIFACT_DIR, MANIFEST_DIR, IMAGE_ARCHIVE.
# appliance: env=CSGHUB_CHART_VERSION,CSGHUB_DOMAIN,CSGHUB_HTTP_PORT,K3S_NODE_IP,CSGHUB_GIT_SSH_PORT
# appliance: files=csghub
# appliance: files=common
# appliance: needs=chart,manifests,image-set
# appliance: stack
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

KC+=(--request-timeout=30s)

: "${CSGHUB_CHART_VERSION:?CSGHUB_CHART_VERSION is required (csghub.chart_version)}"
: "${CSGHUB_DOMAIN:?CSGHUB_DOMAIN is required (csghub.domain)}"
: "${CSGHUB_HTTP_PORT:?CSGHUB_HTTP_PORT is required (the http forward)}"
: "${K3S_NODE_IP:?K3S_NODE_IP is required (k3s.node_ip)}"
: "${CSGHUB_GIT_SSH_PORT:?CSGHUB_GIT_SSH_PORT is required (the git-ssh forward; the readiness gate checks it)}"
CHART="csghub-$CSGHUB_CHART_VERSION.tgz"
[[ -r "$LIB" ]] || die "missing $LIB (the runner uploads provision/files/csghub)"
# shellcheck source-path=SCRIPTDIR source=files/csghub/lib.sh
. "$LIB"
IMAGE_SET="$MANIFEST_DIR/images.txt"
IMAGE_ARCHIVE=${IMAGE_ARCHIVE:-/var/cache/csghub-appliance/images/images.tar}
for f in "$ARTIFACT_DIR/$CHART" "$MANIFEST_DIR/csghub.yaml" "$MANIFEST_DIR/coredns-custom.yaml" "$IMAGE_SET"; do
    [[ -s "$f" ]] || die "missing $f (the runner uploads the chart 'invoke fetch' cached and the generated manifests and image list)"
done
grep -qF "static/charts/$CHART" "$MANIFEST_DIR/csghub.yaml" ||
    die "$MANIFEST_DIR/csghub.yaml does not install $CHART: manifests and CSGHUB_CHART_VERSION disagree"
[[ -x /usr/local/bin/k3s ]] || die "k3s is not installed (the k3s step runs first)"
"${KC[@]}" get --raw /readyz >/dev/null 2>&1 || die "the k3s API server is not ready (systemctl status k3s)"

deadline=$((SECONDS + READY_TIMEOUT))

# The guest-side helpers (chart_base, coredns_custom_manifest) stay installed for
# csghub-reconfigure, which must redo the in-cluster DNS when a copy's domain changes.
install_if_changed "$LIB" /usr/local/lib/csghub-appliance/csghub.sh 0644

# --- images from the build host: the guest never pulls ----------------------------------------------
# images.txt is the image set the build host computed (appliance/images.py: the chart rendered with
# these values, walked structurally, plus the runtime images of appliance/data/images.yaml), one
# "NAME DIGEST" per line, NAME exactly as containerd stores it, DIGEST pinned by `invoke lock`.
# images.tar (appliance/imagecache.py) is that set fetched on the build host by digest: one OCI
# archive, each image named by io.containerd.image.name. Import it before the release starts (so no
# pod pulls), then check that the store holds every image of the set at its pinned digest, pin
# each (image GC never drops a pinned one), and fail naming any missing: nothing is pulled here.
stored_images() {
    /usr/local/bin/k3s ctr -n k8s.io images ls -q
}
declare -A pinned_digest=()
wanted=()
# shellcheck disable=SC2310  # read_image_set returns its verdict itself (`return 1`), set -e or not
image_lines=$(read_image_set "$IMAGE_SET") || die "$IMAGE_SET is malformed (see above; the build host writes it: appliance/images.py)"
while read -r name digest; do
    [[ -n "$name" ]] || continue
    wanted+=("$name")
    [[ -z "${digest:-}" ]] || pinned_digest[$name]=$digest
done <<<"$image_lines"
((${#wanted[@]} > 0)) || die "$IMAGE_SET lists no image (the build host writes it: appliance/images.py)"
have=$(stored_images | sort -u)
absent=()
for ref in "${wanted[@]}"; do
    grep -qxF "$ref" <<<"$have" || absent+=("$ref")
done
if ((${#absent[@]} > 0)) && [[ -s "$IMAGE_ARCHIVE" ]]; then
    echo "progress: importing ${#absent[@]} image(s) from $IMAGE_ARCHIVE"
    /usr/local/bin/k3s ctr -n k8s.io images import --platform linux/amd64 "$IMAGE_ARCHIVE" >/dev/null ||
        die "importing $IMAGE_ARCHIVE into containerd failed (see above)"
    echo "changed: imported the image set from $IMAGE_ARCHIVE"
fi
have=$(stored_images | sort -u)
pinned=$(/usr/local/bin/k3s ctr -n k8s.io images ls | awk 'NR > 1 && /io\.cri-containerd\.pinned=pinned/ { print $1 }')
missing=()
for ref in "${wanted[@]}"; do
    if grep -qxF "$ref" <<<"$have"; then
        if ! grep -qxF "$ref" <<<"$pinned"; then
            /usr/local/bin/k3s ctr -n k8s.io images label "$ref" io.cri-containerd.pinned=pinned >/dev/null
            echo "changed: pinned $ref"
        fi
    else
        missing+=("$ref")
    fi
done
if ((${#missing[@]} > 0)); then
    echo "missing images (the build host fetches them: \`invoke lock --images\`, \`invoke fetch\`; the guest never pulls):" >&2
    printf '  %s\n' "${missing[@]}" >&2
    die "${#missing[@]} of ${#wanted[@]} images of the declared set are not in the image store"
fi
# NAME DIGEST of every stored image of the set (ctr's table: REF TYPE DIGEST ...).
digests=$(/usr/local/bin/k3s ctr -n k8s.io images ls | awk 'NR > 1 { print $1, $3 }' | sort -u |
    awk 'NR == FNR { want[$0] = 1; next } ($1 in want)' <(printf '%s\n' "${wanted[@]}") -)
moved=()
for ref in "${!pinned_digest[@]}"; do
    have_digest=$(awk -v ref="$ref" '$1 == ref { print $2; exit }' <<<"$digests")
    [[ "$have_digest" == "${pinned_digest[$ref]}" ]] ||
        moved+=("$ref: stored ${have_digest:-nothing}, images.txt names ${pinned_digest[$ref]} (the version lock's pin or the digest this build resolved)")
done
if ((${#moved[@]} > 0)); then
    echo "images whose digest differs from the one the version lock pins:" >&2
    printf '  %s\n' "${moved[@]}" >&2
    die "${#moved[@]} image(s) differ from the version lock (\`invoke fetch\` on the build host, then build again)"
fi
echo "ok: all ${#wanted[@]} images of the declared set are stored and pinned"

# --- chart, DNS, release ---------------------------------------------------------------------
# k3s serves server/static/ at https://<api>/static/, which the HelmChart's chart URL names.
install_if_changed "$ARTIFACT_DIR/$CHART" "$K3S_DATA/server/static/charts/$CHART" 0644

install_if_changed "$MANIFEST_DIR/coredns-custom.yaml" "$K3S_DATA/server/manifests/coredns-custom.yaml" 0600
if [[ "$FILE_CHANGED" == yes ]]; then
    # CoreDNS reads the imported files at start: wait for the deploy controller to apply the
    # ConfigMap, then restart CoreDNS.
    until "${KC[@]}" -n kube-system get configmap coredns-custom -o jsonpath='{.data}' 2>/dev/null |
        grep -qF "$CSGHUB_DOMAIN"; do
        ((SECONDS < deadline)) || die "ConfigMap kube-system/coredns-custom was not applied (journalctl -u k3s)"
        sleep 2
    done
    "${KC[@]}" -n kube-system rollout restart deployment/coredns >/dev/null
    "${KC[@]}" -n kube-system rollout status deployment/coredns --timeout=300s >/dev/null ||
        die "CoreDNS did not come back after loading coredns-custom"
    echo "changed: CoreDNS resolves $CSGHUB_DOMAIN names to $K3S_NODE_IP inside the cluster"
fi

# Only CSGHub's own pods reach Redis, which has no password (appliance/manifests.py). The namespace
# comes with the release: k3s retries the file every 15 s until it exists.
if [[ -s "$MANIFEST_DIR/csghub-redis-policy.yaml" ]]; then
    install_if_changed "$MANIFEST_DIR/csghub-redis-policy.yaml" "$K3S_DATA/server/manifests/csghub-redis-policy.yaml" 0600
fi

release_changed_at=0
# Kept outside the auto-deploy folder for the copies: 90-seal.sh takes it out of that folder, and a
# copy's csghub-ready hands it back only after it created its own objects the chart looks up
# (ensure_release, provision/files/firstboot/lib.sh).
install_if_changed "$MANIFEST_DIR/csghub.yaml" /usr/local/share/csghub-appliance/csghub-helmchart.yaml 0600
install_if_changed "$MANIFEST_DIR/csghub.yaml" "$K3S_DATA/server/manifests/csghub.yaml" 0600
if [[ "$FILE_CHANGED" == yes ]]; then
    release_changed_at=$(date +%s)
    echo "changed: helm-controller installs or upgrades CSGHub $CSGHUB_CHART_VERSION"
fi

# The helm-controller runs `helm upgrade --install` in a Job; wait for the one that carries
# the current manifest (completed after our change).
echo "waiting for the Helm release (job kube-system/helm-install-csghub)"
while :; do
    job=$("${KC[@]}" -n kube-system get helmchart csghub -o jsonpath='{.status.jobName}' 2>/dev/null || true)
    failed=$("${KC[@]}" -n kube-system get helmchart csghub \
        -o jsonpath='{.status.conditions[?(@.type=="Failed")].status}' 2>/dev/null || true)
    if [[ "$failed" == True ]]; then
        "${KC[@]}" -n kube-system logs "job/${job:-helm-install-csghub}" --tail=40 >&2 || true
        die "the Helm install failed (HelmChart kube-system/csghub; logs above); fix and re-run the step"
    fi
    if [[ -n "$job" ]]; then
        job_state=$("${KC[@]}" -n kube-system get job "$job" \
            -o jsonpath='{.status.succeeded} {.status.completionTime}{"\n"}' 2>/dev/null || echo "0 -")
        read -r succeeded done_at <<<"$job_state"
        if [[ "${succeeded:-0}" -ge 1 && "$done_at" != - ]]; then
            done_epoch=$(date -d "$done_at" +%s)
            ((done_epoch < release_changed_at - 5)) || break
        fi
        if [[ "$("${KC[@]}" -n kube-system get job "$job" -o jsonpath='{.status.failed}' 2>/dev/null || true)" -ge 3 ]] 2>/dev/null; then
            "${KC[@]}" -n kube-system logs "job/$job" --tail=40 >&2 || true
            die "the Helm install job $job keeps failing (logs above)"
        fi
    fi
    ((SECONDS < deadline)) || die "the Helm release was not installed within ${READY_TIMEOUT} s (kubectl -n kube-system logs job/helm-install-csghub)"
    sleep 5
done
echo "ok: Helm release $NAMESPACE/csghub deployed (chart $CSGHUB_CHART_VERSION)"

# --- the readiness gate ----------------------------------------------------------------------
# The same gate every copy runs at each boot (csghub-ready): every Job of the release complete,
# every workload and KnativeServing ready, the portal and csghub-server's API through the gateway,
# the admin's sign-in through CSGHub's OAuth flow, a clone over SSH, the registry with this copy's
# credentials; it also points k3s at CSGHub's registry (registries.yaml, which 90-seal.sh removes
# again: the credentials are the build's).
GATE_RETRY_HINT="re-run the build (it resumes at the csghub step)"
# shellcheck source-path=SCRIPTDIR source=files/common/readiness.sh
. "${PROVISION_DIR:-/var/tmp/csghub-provision}/files/common/readiness.sh"
GATE_POLL_SECONDS=$POLL_SECONDS
READINESS_STATE=${CSGHUB_READINESS:-/run/csghub-appliance/readiness}
# A re-run of this step (the failure line says to re-run the build) starts the gate afresh: it
# forgets the Jobs an earlier run saw failed.
GATE_FAILED_JOBS=${READINESS_STATE%/*}/failed-jobs
rm -f "$GATE_FAILED_JOBS"
remaining=$((deadline - SECONDS))
((remaining > 0)) || remaining=1
readiness_gate "$CSGHUB_DOMAIN" "$remaining" "$READINESS_STATE"
if [[ "$GATE_VERDICT" != ready ]]; then
    "${KC[@]}" get pods -A --field-selector=status.phase!=Running,status.phase!=Succeeded >&2 || true
    die "CSGHub is not ready: $GATE_VERDICT"
fi
# What the clone probe made on CSGHub and could not delete would be in every copy made from this build.
if [[ -s "$GATE_GIT_LEFTOVERS" ]]; then
    leftovers=$(paste -sd ';' "$GATE_GIT_LEFTOVERS") || leftovers="(unreadable: $GATE_GIT_LEFTOVERS)"
    die "the readiness gate's clone probe could not delete from CSGHub (every copy would hold it): $leftovers"
fi
echo "ok: CSGHub is ready: jobs, workloads, Knative, portal, csghub-server's API, the admin's OAuth sign-in (and csghub-server's callback), a clone over SSH and the registry with this copy's credentials all answer"
login_host=$(gate_casdoor_host)

# --- no drift: every image the running cluster names is in the set ---------------------------------
# kube-system is k3s's own and comes from its pinned air-gap bundle.
not_kube_system=--field-selector=metadata.namespace!=kube-system
# Every image the cluster's objects name; fails when any query does: a drift check that cannot
# look must not pass.
live_refs=$(
    "${KC[@]}" get pods -A "$not_kube_system" -o jsonpath='{range .items[*]}{range .spec.initContainers[*]}{.image}{"\n"}{end}{range .spec.containers[*]}{.image}{"\n"}{end}{range .spec.ephemeralContainers[*]}{.image}{"\n"}{end}{end}' &&
        "${KC[@]}" get deployments,statefulsets,daemonsets,jobs -A "$not_kube_system" -o jsonpath='{range .items[*]}{range .spec.template.spec.initContainers[*]}{.image}{"\n"}{end}{range .spec.template.spec.containers[*]}{.image}{"\n"}{end}{end}' &&
        "${KC[@]}" get cronjobs -A "$not_kube_system" -o jsonpath='{range .items[*]}{range .spec.jobTemplate.spec.template.spec.initContainers[*]}{.image}{"\n"}{end}{range .spec.jobTemplate.spec.template.spec.containers[*]}{.image}{"\n"}{end}{end}'
) || die "cannot list the images the cluster's objects name (kubectl failed; see above)"
live_sorted=$(sort -u <<<"$live_refs")
wanted_list=$(printf '%s\n' "${wanted[@]}")
drift=()
while read -r ref; do
    [[ -n "$ref" ]] || continue
    name=$(normalize_image "$ref")
    grep -qxF "$name" <<<"$wanted_list" || drift+=("$name (as $ref)")
done <<<"$live_sorted"
if ((${#drift[@]} > 0)); then
    echo "images the cluster references that the declared image set lacks:" >&2
    printf '  %s\n' "${drift[@]}" >&2
    die "the declared image set is out of date: ${#drift[@]} image(s) the cluster runs are not in it (update appliance/data/images.yaml, or see why the render differs)"
fi
# NAME DIGEST per line, for build-report.json (the build host reads it back after this step).
mkdir -p "${IMAGES_LIST%/*}"
printf '%s\n' "$digests" >"$IMAGES_LIST.tmp"
mv "$IMAGES_LIST.tmp" "$IMAGES_LIST"
echo "ok: the cluster runs only images of the declared set (list with digests: $IMAGES_LIST)"

# --- where to go --------------------------------------------------------------------------------
echo "CSGHub: http://$CSGHUB_DOMAIN:$CSGHUB_HTTP_PORT/  (login service: http://$login_host:$CSGHUB_HTTP_PORT/)"
echo "credentials: sudo k3s kubectl -n $NAMESPACE get secret csghub-casdoor-init -o jsonpath='{.data.INIT_ADMIN_USER}' | base64 -d"
echo "             sudo k3s kubectl -n $NAMESPACE get secret csghub-casdoor-init -o jsonpath='{.data.INIT_ADMIN_PASSWORD}' | base64 -d"
