"""A copy's CSGHub release, installed, reconfigured and restarted the way the copy does it, by the real helm.

Each copy is a sandbox laid out as a sealed image (the chart archive in k3s's static folder, the build's manifests,
the HelmChart where 30-csghub.sh and 90-seal.sh leave it). Its first boot runs for real (``csghub_secrets`` and
``apply_access`` from provision/files/firstboot, in bash). Then the copy boots against tests/kubeapi.py, a small API
server that stores objects and answers the chart's ``lookup``s: k3s's deploy controller applies the auto-deploy
folder (tests/k3s_sim.py), csghub-ready's ``ensure_release`` creates the copy's objects with the real kubectl and
hands over the HelmChart, and the helm-controller runs the real helm 3.17 ``install`` with the HelmChart's and the
copy's HelmChartConfig values (NOTES.txt, hooks, lookups and the adoption of the pre-created objects all real).
Then ``csghub-reconfigure``'s change of address (new HelmChartConfig, the release's finished Jobs deleted, ``helm
upgrade``), then a k3s restart (the whole folder applied again, csghub-ready again).

After each: no error; every credential in the stored objects is the copy's own (secrets.env), consistent between
the Secret and the connection strings that carry it, never one of the chart's clock-derived values of the day; the
Casdoor certificate stored is the copy's; a restart leaves every object Helm owns as Helm left it. Two copies (one
community, one enterprise) share no credential.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.config import ApplianceConfig
from appliance.manifests import manifest_yaml, render_manifests
from tests.chart import CHART_DIR, kubectl_binary
from tests.k3s_sim import HelmController, HelmRun, deploy_folder
from tests.kubeapi import BY_GVK, KubeApi
from tests.unit.test_secrets import chart_derived_values, internal_api_secrets

ROOT = Path(__file__).resolve().parents[2]
FIRSTBOOT = ROOT / "provision" / "files" / "firstboot"
NAMESPACE = "csghub"
NODE_IP = "10.254.254.1"
SECRET = BY_GVK[("v1", "Secret")]
CONFIGMAP = BY_GVK[("v1", "ConfigMap")]

# (kind, object, key) -> the secrets.env name whose value it must hold (Secrets decoded): every credential the chart
# would otherwise derive from the clock, where the release stores it.
CREDENTIAL_FIELDS = {
    ("Secret", "csghub-postgresql", "POSTGRES_PASSWORD"): "POSTGRES_PASSWORD",
    ("Secret", "csghub-minio", "MINIO_ROOT_PASSWORD"): "MINIO_ROOT_PASSWORD",
    ("Secret", "csghub-nats", "NATS_PASSWORD"): "NATS_PASSWORD",
    ("Secret", "csghub-registry", "REGISTRY_PASSWORD"): "REGISTRY_PASSWORD",
    ("Secret", "csghub-gitaly", "GITALY_TOKEN"): "GITALY_TOKEN",
    ("Secret", "csghub-casdoor-init", "INIT_ADMIN_PASSWORD"): "CSGHUB_ADMIN_PASSWORD",
    ("Secret", "csghub-casdoor-init", "INIT_ADMIN_HTPASSWD"): "CSGHUB_ADMIN_HTPASSWD",
    ("Secret", "csghub-casdoor-init", "CASDOOR_ADMIN_CLIENT_ID"): "CASDOOR_ADMIN_CLIENT_ID",
    ("Secret", "csghub-casdoor-init", "CASDOOR_ADMIN_CLIENT_SECRET"): "CASDOOR_ADMIN_CLIENT_SECRET",
    ("ConfigMap", "csghub-core", "CSGHUB_PORTAL_STARHUB_API_KEY"): "HUB_API_TOKEN",
    ("ConfigMap", "csghub-core", "STARHUB_SERVER_API_TOKEN"): "HUB_API_TOKEN",
    ("ConfigMap", "csghub-core", "STARHUB_JWT_SIGNING_KEY"): "JWT_SIGNING_KEY",
    ("ConfigMap", "csghub-core", "STARHUB_SERVER_SPACE_SESSION_SECRET_KEY"): "SPACE_SESSION_SECRET_KEY",
    ("ConfigMap", "csghub-core", "STARHUB_SERVER_CASDOOR_CLIENT_ID"): "CASDOOR_CSGHUB_CLIENT_ID",
    ("ConfigMap", "csghub-core", "STARHUB_SERVER_CASDOOR_CLIENT_SECRET"): "CASDOOR_CSGHUB_CLIENT_SECRET",
    ("ConfigMap", "csghub-core", "OPENCSG_AGENT_AGENTHUB_SERVICE_TOKEN"): "AGENTICFLOW_TOKEN",
    ("ConfigMap", "csghub-core", "STARHUB_SERVER_XNET_API_KEY"): "HUB_API_TOKEN",
    ("ConfigMap", "csghub-xnet", "STARHUB_SERVER_API_TOKEN"): "HUB_API_TOKEN",
    ("ConfigMap", "csghub-xnet", "STARHUB_JWT_SIGNING_KEY"): "JWT_SIGNING_KEY",
    ("ConfigMap", "csghub-runner", "STARHUB_SERVER_API_TOKEN"): "HUB_API_TOKEN",
}
EE_ONLY_FIELDS = {("ConfigMap", "csghub-agenticflow", "FLOWS_ACCESS_TOKEN"): "AGENTICFLOW_TOKEN"}


@dataclass
class Copy:
    """One imported copy: its sandboxed files, its cluster, its k3s controllers."""

    edition: str
    work: Path
    api: KubeApi
    helm: HelmController
    kubectl: Path
    history: dict[str, list[HelmRun]] = field(default_factory=dict)
    snapshots: dict[str, dict[tuple[str, str, str], dict[str, Any]]] = field(default_factory=dict)

    @property
    def manifests(self) -> Path:
        return self.work / "manifests"

    @property
    def secrets_dir(self) -> Path:
        return self.work / "state" / "secrets"

    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.work / 'bin'}:{os.environ['PATH']}", "LANG": "C.UTF-8", "HOME": str(self.work),
                "CSGHUB_STATE": str(self.work / "state"), "CSGHUB_ETC": str(self.work / "etc"),
                "K3S_MANIFESTS": str(self.manifests), "K3S_STATIC_CHARTS": str(self.work / "static" / "charts"),
                "CSGHUB_HELMCHART_KEPT": str(self.work / "share" / "csghub-helmchart.yaml"),
                "CSGHUB_STACK_LIB": str(ROOT / "provision" / "files" / "csghub" / "lib.sh"),
                "CSGHUB_READINESS_LIB": str(ROOT / "provision" / "files" / "common" / "readiness.sh"),
                "K3S_REGISTRIES": str(self.work / "registries.yaml"), "GATE_HOSTS_FILE": str(self.work / "hosts"),
                "GATE_POLL_SECONDS": "1"}

    def bash(self, snippet: str, *, k3s_running: bool = False) -> subprocess.CompletedProcess[str]:
        """``snippet`` in the copy's shell: its libraries, its env file, k3s's kubectl talking to its cluster.

        With ``k3s_running`` (csghub-reconfigure on a running copy) systemd says k3s is active; what only a real
        k3s does is left to the caller: CoreDNS's restart, and the helm-controller's upgrade job, which the caller
        runs right after (``wait_helm_upgrade`` is the last thing the script waits for)."""
        prelude = (f". {FIRSTBOOT / 'lib.sh'}; . {FIRSTBOOT / 'secrets.sh'}; load_appliance_env; "
                   f". \"$CSGHUB_READINESS_LIB\"; KC=(k3s kubectl); stack_installed() {{ true; }}; ")
        if k3s_running:
            prelude += ("systemctl() { [[ \"$*\" == '-q is-active k3s.service' ]]; }; restart_coredns() { :; }; "
                        "wait_helm_upgrade() { :; }; ")
        else:
            prelude += "systemctl() { return 3; }; "
        return subprocess.run(["bash", "-c", f"set -euo pipefail; {prelude}{snippet}"], capture_output=True,
                              text=True, env=self.env(), timeout=300, check=False)

    def secrets(self) -> dict[str, str]:
        lines = (self.secrets_dir / "secrets.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))

    def credential_fields(self) -> dict[tuple[str, str, str], str]:
        return {**CREDENTIAL_FIELDS, **(EE_ONLY_FIELDS if self.edition == "ee" else {})}

    def data(self, kind: str, name: str) -> dict[str, str]:
        """The stored object's data, Secrets decoded."""
        obj = self.api.store.find(kind, NAMESPACE, name)
        assert obj is not None, f"{kind} {name} is not stored"
        data = obj.get("data") or {}
        if kind == "Secret":
            return {k: base64.b64decode(v).decode() for k, v in data.items()}
        return dict(data)

    def internal_api_secrets(self) -> dict[str, str]:
        """The internal API's key where Gitaly, gitlab-shell and csghub-server hold it, in the stored objects."""
        return internal_api_secrets([obj for obj in self.api.objects()
                                     if obj["metadata"].get("namespace") == NAMESPACE])

    def snapshot(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        out = {}
        for obj in self.api.objects():
            meta = obj["metadata"]
            body = {k: v for k, v in obj.items() if k not in ("metadata", "status")}
            body["labels"] = meta.get("labels") or {}
            out[(obj["kind"], meta.get("namespace", ""), meta["name"])] = body
        return out


def _sealed_image(work: Path, cfg: ApplianceConfig, edition: str, kubectl: Path) -> None:
    """The copy's disk as the build and seal leave it."""
    charts = work / "static" / "charts"
    charts.mkdir(parents=True)
    with tarfile.open(charts / "csghub-2.4.0.tgz", "w:gz") as tar:
        tar.add(CHART_DIR, arcname="csghub")
    manifests = render_manifests(cfg)
    (work / "manifests").mkdir()
    for name, obj in manifests.items():
        if name != "csghub.yaml":  # coredns-custom, the Redis policy
            (work / "manifests" / name).write_text(manifest_yaml(obj))
    (work / "share").mkdir()
    (work / "share" / "csghub-helmchart.yaml").write_text(manifest_yaml(manifests["csghub.yaml"]))
    if "ensure_release()" not in (FIRSTBOOT / "lib.sh").read_text():
        # Images before ensure_release kept the HelmChart in the auto-deploy folder.
        (work / "manifests" / "csghub.yaml").write_text(manifest_yaml(manifests["csghub.yaml"]))
    (work / "etc").mkdir()
    (work / "etc" / "appliance.env").write_text(
        f"CSGHUB_DOMAIN=csghub.localhost\nCSGHUB_HTTP_PORT=30080\nCSGHUB_NAMESPACE={NAMESPACE}\n"
        f"CSGHUB_HELMCHART_NAME=csghub\nCSGHUB_HELMCHART_NAMESPACE=kube-system\nK3S_NODE_IP={NODE_IP}\n"
        f"CSGHUB_EDITION={edition}\n")
    (work / "bin").mkdir()
    shim = work / "bin" / "k3s"
    shim.write_text("#!/bin/sh\n# k3s kubectl -> the real kubectl, on this copy's cluster\n"
                    f'[ "$1" = kubectl ] || exit 1\nshift\nexec {kubectl} --kubeconfig {work / "kubeconfig"} "$@"\n')
    shim.chmod(0o755)
    (work / "hosts").write_text("127.0.0.1 localhost\n")


def _boot(copy: Copy, stage: str) -> None:
    """A k3s start: the auto-deploy folder applied, csghub-ready's release step, the helm-controller."""
    first = deploy_folder(copy.api, copy.manifests)
    ready = copy.bash("if declare -F ensure_release >/dev/null; then ensure_release; fi")
    assert ready.returncode == 0, f"{stage}: csghub-ready's release step failed: {ready.stderr}"
    second = deploy_folder(copy.api, copy.manifests)
    # Before the copy's namespace exists k3s cannot apply the Redis policy; it retries every 15 s (here: the pass
    # after csghub-ready's step, which must apply everything).
    assert all('namespaces "csghub" not found' in e for e in first.errors), (stage, first.errors)
    assert not second.errors, (stage, second.errors)
    copy.history[stage] = copy.helm.sync()


def _install_copy(edition: str, work: Path, helm: Path, kubectl: Path, cfg: ApplianceConfig,
                  api: KubeApi) -> Copy:
    _sealed_image(work, cfg, edition, kubectl)
    copy = Copy(edition, work, api, HelmController(api, helm, work / "static" / "charts", work / "helm"), kubectl)
    first_boot = copy.bash("csghub_secrets && apply_access nat 10.0.2.15")
    assert first_boot.returncode == 0, first_boot.stderr
    _boot(copy, "install")
    copy.snapshots["install"] = copy.snapshot()
    # csghub-reconfigure --mode address on the running copy (apply_access: the release's finished Jobs deleted, as
    # their pod templates are immutable; the new domain in the HelmChartConfig), then the helm-controller's upgrade.
    reconfigure = copy.bash("apply_access address 192.168.56.10", k3s_running=True)
    assert reconfigure.returncode == 0, reconfigure.stderr
    _boot(copy, "reconfigure")
    copy.snapshots["reconfigure"] = copy.snapshot()
    _boot(copy, "restart")  # k3s restarted: the folder applied again, csghub-ready again
    copy.snapshots["restart"] = copy.snapshot()
    return copy


@pytest.fixture(scope="module")
def tools(helm_bin: Path) -> tuple[Path, Path]:
    kubectl = kubectl_binary()
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl not found: run scripts/install-helm.sh (or set APPLIANCE_KUBECTL)")
        pytest.skip("kubectl not found: run scripts/install-helm.sh (or set APPLIANCE_KUBECTL)")
    return helm_bin, kubectl


@pytest.fixture(scope="module")
def copies(tools: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory,
           make_cfg: Callable[..., ApplianceConfig]) -> Iterator[dict[str, Copy]]:
    helm, kubectl = tools
    out: dict[str, Copy] = {}
    apis = []
    try:
        for edition in ("ce", "ee"):
            work = tmp_path_factory.mktemp(f"copy-{edition}")
            api = KubeApi(work).__enter__()
            apis.append(api)
            cfg = make_cfg("provision.skip=[]", "vm.cpus=4", "vm.memory_mb=8192", f"csghub.edition={edition}",
                           f"k3s.node_ip={NODE_IP}")
            out[edition] = _install_copy(edition, work, helm, kubectl, cfg, api)
        yield out
    finally:
        for api in apis:
            api.__exit__(None, None, None)


EDITIONS = ["ce", "ee"]


@pytest.mark.parametrize("edition", EDITIONS)
def test_helm_installs_upgrades_and_survives_a_restart(copies: dict[str, Copy], edition: str) -> None:
    copy = copies[edition]
    install, reconfigure, restart = (copy.history[s] for s in ("install", "reconfigure", "restart"))
    assert [r.verb for r in install] == ["install"], install
    assert install[0].returncode == 0, install[0].stderr
    assert "CSGHub has been successfully installed" in install[0].stdout  # NOTES.txt rendered, with lookups
    assert [r.verb for r in reconfigure] == ["upgrade"] and reconfigure[0].returncode == 0, reconfigure[0].stderr
    assert restart == []  # nothing changed for the helm-controller: no new job
    core = copy.data("ConfigMap", "csghub-core")
    assert "192.168.56.10.nip.io" in json.dumps(core)  # the upgrade carried the new address
    # Only CSGHub's own namespace reaches Redis (applied by k3s from the folder once the namespace exists).
    policy = copy.api.store.find("NetworkPolicy", NAMESPACE, "csghub-redis-clients")
    assert policy is not None and policy["spec"]["policyTypes"] == ["Ingress"]


@pytest.mark.parametrize("edition", EDITIONS)
def test_stored_credentials_are_the_copys_own(copies: dict[str, Copy], edition: str) -> None:
    copy = copies[edition]
    secrets = copy.secrets()
    for (kind, name, key), var in copy.credential_fields().items():
        assert copy.data(kind, name).get(key) == secrets[var], (kind, name, key)
    # The connection strings carry the same passwords as the Secrets the databases start with.
    core = json.dumps(copy.data("ConfigMap", "csghub-core"))
    for var in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "NATS_PASSWORD", "GITALY_TOKEN"):
        assert secrets[var] in core, var
    # Casdoor's stored root password is the admin password's bcrypt, and its apps hold the copy's client ids.
    import bcrypt

    init_data = json.loads(copy.data("ConfigMap", "csghub-casdoor")["init_data.json"])
    root = next(u for u in init_data["users"] if u["name"] == "root")
    assert bcrypt.checkpw(secrets["CSGHUB_ADMIN_PASSWORD"].encode(), root["password"].encode())
    # Casdoor's RADIUS listener takes the copy's secret, not the chart's word "secret".
    app_conf = copy.data("ConfigMap", "csghub-casdoor")["app.conf"]
    assert f'radiusSecret = "{secrets["CASDOOR_RADIUS_SECRET"]}"' in app_conf
    # Gitaly and gitlab-shell sign their calls to csghub-server's internal API with the copy's key, and the server
    # checks them with the same one.
    assert copy.internal_api_secrets() == dict.fromkeys(copy.internal_api_secrets(), secrets["GITALY_JWT_SECRET"])
    apps = {a["name"]: a for a in init_data["applications"]}
    assert apps["CSGHub"]["clientId"] == secrets["CASDOOR_CSGHUB_CLIENT_ID"]
    assert apps["CSGHub"]["clientSecret"] == secrets["CASDOOR_CSGHUB_CLIENT_SECRET"]


@pytest.mark.parametrize("edition", EDITIONS)
def test_casdoor_certificate_stored_is_the_copys(copies: dict[str, Copy], edition: str) -> None:
    copy = copies[edition]
    certs = copy.data("Secret", "csghub-casdoor-certs")
    assert certs["tls.crt"] == (copy.secrets_dir / "casdoor-csghub.crt").read_text()
    assert certs["tls.key"] == (copy.secrets_dir / "casdoor-csghub.key").read_text()
    init_data = json.loads(copy.data("ConfigMap", "csghub-casdoor")["init_data.json"])
    stored = {c["name"]: c["certificate"] for c in init_data["certs"]}
    assert stored["csghub-cert"] == (copy.secrets_dir / "casdoor-csghub.crt").read_text()
    assert stored["csgship-cert"] == (copy.secrets_dir / "casdoor-csgship.crt").read_text()


_TOKEN = re.compile(r"[A-Za-z0-9+/=]{16,}")


def _tokens(copy: Copy) -> Iterator[tuple[str, str]]:
    for obj in copy.api.objects():
        if obj["kind"] not in ("Secret", "ConfigMap") or obj["metadata"].get("namespace") not in (NAMESPACE, "spaces"):
            continue
        for key, value in (obj.get("data") or {}).items():
            texts = [value]
            if obj["kind"] == "Secret":
                texts.append(base64.b64decode(value).decode(errors="replace"))
            for text in texts:
                for token in _TOKEN.findall(text):
                    yield f"{obj['kind']} {obj['metadata']['name']} {key}", token


def test_no_stored_value_is_clock_derived(copies: dict[str, Copy]) -> None:
    derived = chart_derived_values(datetime.now(UTC))
    for copy in copies.values():
        found = {where for where, token in _tokens(copy) if token in derived}
        assert not found, f"{copy.edition}: the chart's clock-derived credentials are stored in {sorted(found)}"


def test_two_copies_share_no_credential(copies: dict[str, Copy]) -> None:
    a, b = copies["ce"], copies["ee"]
    for (kind, name, key) in CREDENTIAL_FIELDS:
        assert a.data(kind, name)[key] != b.data(kind, name)[key], (kind, name, key)
    assert a.data("Secret", "csghub-casdoor-certs") != b.data("Secret", "csghub-casdoor-certs")
    # The internal API's key: each copy's own (the chart's and csghub-server's is "signing-key" everywhere).
    keys_a, keys_b = set(a.internal_api_secrets().values()), set(b.internal_api_secrets().values())
    assert len(keys_a) == len(keys_b) == 1 and not keys_a & keys_b and "signing-key" not in keys_a | keys_b
    tokens_a = {t for _, t in _tokens(a)}
    shared = {(where, t) for where, t in _tokens(b) if t in tokens_a and t in set(b.secrets().values())}
    assert not shared


@pytest.mark.parametrize("edition", EDITIONS)
def test_a_k3s_restart_changes_nothing_helm_owns(copies: dict[str, Copy], edition: str) -> None:
    copy = copies[edition]
    before, after = copy.snapshots["reconfigure"], copy.snapshots["restart"]
    owned = [key for key, body in before.items()
             if body["labels"].get("app.kubernetes.io/managed-by") == "Helm" and key[1] in (NAMESPACE, "spaces")]
    assert len(owned) > 50
    changed = [key for key in owned if after.get(key) != before[key]]
    assert not changed, f"a k3s restart changed what Helm owns: {changed}"
    # None of them is in the auto-deploy folder, where k3s would apply it again.
    in_folder = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"])
                 for p in copy.manifests.iterdir() for d in yaml.safe_load_all(p.read_text()) if d}
    assert not in_folder & set(owned)


@pytest.mark.parametrize("edition", EDITIONS)
def test_precreated_objects_are_only_what_the_chart_renders(copies: dict[str, Copy], edition: str) -> None:
    """Every object first boot created is one the release took over (no Helm-labelled orphans)."""
    copy = copies[edition]
    created = [w for w in copy.api.store.writes if w[0] == "create" and w[1] in ("Secret", "ConfigMap")]
    in_release = {(d["kind"], d["metadata"]["name"]) for d in _release_manifest(copy)}
    precreated = [d for d in yaml.safe_load_all((copy.secrets_dir / "precreated.yaml").read_text())
                  if d and d["kind"] != "Namespace"]
    assert precreated
    for obj in precreated:
        assert (obj["kind"], obj["metadata"]["name"]) in in_release, obj["metadata"]["name"]
    assert created


def _release_manifest(copy: Copy) -> list[dict[str, Any]]:
    proc = subprocess.run([str(copy.helm.helm), "get", "manifest", "csghub", "-n", NAMESPACE], capture_output=True,
                          text=True, check=True, timeout=120,
                          env={"KUBECONFIG": str(copy.api.kubeconfig), "HOME": str(copy.work / "helm"),
                               "PATH": os.environ["PATH"]})
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _holds(stored: Any, rendered: Any) -> bool:
    """``stored`` has every field ``rendered`` sets, with its value (the server may add fields of its own)."""
    if isinstance(rendered, dict):
        return isinstance(stored, dict) and all(_holds(stored.get(k), v) for k, v in rendered.items())
    if isinstance(rendered, list):
        return isinstance(stored, list) and len(stored) == len(rendered) and all(
            _holds(s, r) for s, r in zip(stored, rendered, strict=True))
    return bool(stored == rendered)


@pytest.mark.parametrize("edition", EDITIONS)
def test_stored_objects_are_what_helm_last_rendered(copies: dict[str, Copy], edition: str) -> None:
    """After install, upgrade (three-way patches) and restart, each object of the release holds exactly the fields
    of the release's last manifest: what a real apiserver converges to; it also holds the stand-in's patches to
    account (a wrong merge of containers, env or ports would show here)."""
    copy = copies[edition]
    manifest = _release_manifest(copy)
    assert len(manifest) > 100
    for rendered in manifest:
        meta = rendered["metadata"]
        stored = copy.api.store.find(rendered["kind"], meta.get("namespace", NAMESPACE if rendered["kind"] not in (
            "Namespace", "ClusterRole", "ClusterRoleBinding", "GatewayClass") else ""), meta["name"])
        assert stored is not None, (rendered["kind"], meta["name"])
        body = {k: v for k, v in rendered.items() if k not in ("metadata", "status")}
        if rendered["kind"] == "Secret" and "stringData" in body:
            body.pop("stringData")
        assert _holds(stored, body), (rendered["kind"], meta["name"])
        assert _holds(stored["metadata"], {k: meta[k] for k in ("labels", "annotations") if k in meta})


def _fresh_copy(tmp_path: Path, tools: tuple[Path, Path], cfg: ApplianceConfig, api: KubeApi) -> Copy:
    helm, kubectl = tools
    _sealed_image(tmp_path, cfg, "ce", kubectl)
    copy = Copy("ce", tmp_path, api, HelmController(api, helm, tmp_path / "static" / "charts", tmp_path / "helm"),
                kubectl)
    proc = copy.bash("csghub_secrets && apply_access nat 10.0.2.15")
    assert proc.returncode == 0, proc.stderr
    return copy


def test_the_release_waits_for_objects_that_hold_the_copys_credentials(
        tools: tuple[Path, Path], tmp_path: Path, make_cfg: Callable[..., ApplianceConfig]) -> None:
    """An object already there with other content (left from elsewhere) is not taken as the copy's: the HelmChart
    stays out of k3s's folder, so the release cannot install with anything but this copy's credentials."""
    cfg = make_cfg("provision.skip=[]", "vm.cpus=4", "vm.memory_mb=8192", f"k3s.node_ip={NODE_IP}")
    with KubeApi(tmp_path) as api:
        copy = _fresh_copy(tmp_path, tools, cfg, api)
        api.store.create(BY_GVK[("v1", "Namespace")], "", {"metadata": {"name": NAMESPACE}})
        api.store.create(CONFIGMAP, NAMESPACE, {"metadata": {"name": "csghub-core"},
                                                "data": {"STARHUB_JWT_SIGNING_KEY": "someone-elses"}})
        proc = copy.bash("ensure_release")
        assert proc.returncode == 1
        assert "differ from this copy's credentials" in proc.stderr
        assert not (copy.manifests / "csghub.yaml").exists()
        # Fixed (the stranger deleted), a rerun creates it and hands the HelmChart over.
        api.store.delete(CONFIGMAP, NAMESPACE, "csghub-core")
        proc = copy.bash("ensure_release")
        assert proc.returncode == 0, proc.stderr
        kept = (copy.work / "share" / "csghub-helmchart.yaml").read_text()
        assert (copy.manifests / "csghub.yaml").read_text() == kept
        assert copy.data("ConfigMap", "csghub-core")["STARHUB_JWT_SIGNING_KEY"] == copy.secrets()["JWT_SIGNING_KEY"]
        # Once handed over, a rerun touches nothing.
        writes = len(api.store.writes)
        proc = copy.bash("ensure_release")
        assert proc.returncode == 0 and len(api.store.writes) == writes


def test_no_release_without_a_cluster_answering(tools: tuple[Path, Path], tmp_path: Path,
                                                make_cfg: Callable[..., ApplianceConfig]) -> None:
    cfg = make_cfg("provision.skip=[]", "vm.cpus=4", "vm.memory_mb=8192", f"k3s.node_ip={NODE_IP}")
    api = KubeApi(tmp_path)  # never started: nothing listens
    copy = _fresh_copy(tmp_path, tools, cfg, api)
    api._server.server_close()
    proc = copy.bash("ensure_release")
    assert proc.returncode == 1 and "creating this copy's objects failed" in proc.stderr
    assert not (copy.manifests / "csghub.yaml").exists()


@pytest.mark.parametrize(("pod_started", "restarted"), [("2000-01-01T00:00:00Z", True),
                                                         ("2999-01-01T00:00:00Z", False)],
                         ids=["coredns-started-before-custom", "coredns-started-after"])
def test_coredns_is_restarted_when_it_started_before_its_custom_names(
        tools: tuple[Path, Path], tmp_path: Path, make_cfg: Callable[..., ApplianceConfig], pod_started: str,
        restarted: bool) -> None:
    """csghub-ready's coredns_follow_custom, with the real kubectl: a CoreDNS pod older than coredns-custom never
    read it (imports are read at start), so the Deployment is restarted (kubectl rollout restart's patch)."""
    cfg = make_cfg("provision.skip=[]", "vm.cpus=4", "vm.memory_mb=8192", f"k3s.node_ip={NODE_IP}")
    with KubeApi(tmp_path) as api:
        _sealed_image(tmp_path, cfg, "ce", tools[1])  # no first boot needed: CoreDNS is k3s's
        copy = Copy("ce", tmp_path, api, HelmController(api, tools[0], tmp_path / "static", tmp_path / "helm"),
                    tools[1])
        deployment = BY_GVK[("apps/v1", "Deployment")]
        api.store.create(deployment, "kube-system", {
            "metadata": {"name": "coredns"},
            "spec": {"selector": {"matchLabels": {"k8s-app": "kube-dns"}},
                     "template": {"metadata": {"labels": {"k8s-app": "kube-dns"}},
                                  "spec": {"containers": [{"name": "coredns", "image": "rancher/mirrored-coredns"}]}}}})
        api.store.create(BY_GVK[("v1", "Pod")], "kube-system", {
            "metadata": {"name": "coredns-abc", "labels": {"k8s-app": "kube-dns"}},
            "spec": {"containers": [{"name": "coredns", "image": "rancher/mirrored-coredns"}]},
            "status": {"phase": "Running", "startTime": pod_started}})
        deploy_folder(api, copy.manifests)  # coredns-custom from the folder, as k3s applies it
        assert api.store.find("ConfigMap", "kube-system", "coredns-custom") is not None
        proc = copy.bash("coredns_follow_custom")
        assert proc.returncode == 0, proc.stderr
        template = api.store.get(deployment, "kube-system", "coredns")["spec"]["template"]
        annotations = (template.get("metadata") or {}).get("annotations") or {}
        assert ("kubectl.kubernetes.io/restartedAt" in annotations) is restarted, (proc.stdout, annotations)
        assert ("changed: restarted CoreDNS" in proc.stdout) is restarted
        # The containers survive the strategic merge patch (merged by name, not replaced).
        assert template["spec"]["containers"] == [{"name": "coredns", "image": "rancher/mirrored-coredns"}]
