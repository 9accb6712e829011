"""What k3s does with the auto-deploy folder and HelmCharts, against tests/kubeapi.py, driving the real helm.

- :func:`deploy_folder`: k3s's deploy controller (k3s-io/k3s ``pkg/deploy/controller.go``, the version pinned in
  appliance/data/versions.lock.yaml): at every start it reads every file of ``server/manifests`` in sorted path
  order, records it in an ``Addon`` (kube-system, named after the file's base name), and applies its objects with
  wrangler's apply (rancher/wrangler v3 ``pkg/apply``): an absent object is created; an existing one is patched
  three-way from the last applied content (kept in the ``objectset.rio.cattle.io/applied`` annotation), the file,
  and the live object, so every field the file sets is put back to the file's value and fields the file dropped
  are removed. A file that fails is reported and the loop goes on.
- :func:`helm_controller`: k3s's helm-controller and its job image (k3s-io/klipper-helm ``entry``): for each
  HelmChart whose spec or HelmChartConfig changed, the values files are the HelmChart's ``valuesContent`` then the
  HelmChartConfig's, and ``helm status`` decides: no release -> ``helm install``; deployed -> ``helm upgrade``;
  failed with ``failurePolicy: abort`` -> the job fails ("waiting for operator intervention").

Only the real k3s shows the rest: its controllers (Jobs and pods actually running), CoreDNS, the registry, events.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.kubeapi import BY_GVK, ApiError, Kind, KubeApi

APPLIED = "objectset.rio.cattle.io/applied"
CHART_URL_PREFIX = "https://%{KUBERNETES_API}%/static/charts/"


def _kind_of(api: KubeApi, obj: dict[str, Any]) -> Kind:
    api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    for known in api.store.kinds():
        if (known.group_version, known.kind) == (api_version, kind):
            return known
    raise ApiError(404, "NotFound", f"no matches for kind {kind!r} in version {api_version!r}")


def _encode_applied(obj: dict[str, Any]) -> str:
    return base64.b64encode(gzip.compress(json.dumps(obj, sort_keys=True).encode(), mtime=0)).decode()


def _decode_applied(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    loaded = json.loads(gzip.decompress(base64.b64decode(text)))
    return loaded if isinstance(loaded, dict) else {}


def three_way(original: Any, modified: Any, current: Any) -> Any:
    """The merge patch that takes ``current`` to ``modified`` for what ``modified`` sets, and deletes what
    ``original`` had and ``modified`` dropped (apimachinery's three-way patch, for maps; lists are replaced)."""
    patch: dict[str, Any] = {}
    original = original if isinstance(original, dict) else {}
    current = current if isinstance(current, dict) else {}
    for key in original:
        if key not in modified:
            patch[key] = None
    for key, value in modified.items():
        if isinstance(value, dict) and isinstance(current.get(key), dict):
            sub = three_way(original.get(key), value, current[key])
            if sub:
                patch[key] = sub
        elif current.get(key) != value:
            patch[key] = value
    return patch


@dataclass
class DeployResult:
    applied: list[str] = field(default_factory=list)  # "Kind namespace/name" per object applied
    errors: list[str] = field(default_factory=list)  # "file: error" per failed file


def deploy_folder(api: KubeApi, folder: Path) -> DeployResult:
    """One pass of k3s's deploy controller over ``folder`` (as at a k3s start: every file, forced)."""
    result = DeployResult()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.startswith(".") or path.suffix not in (".yaml", ".yml", ".json"):
            continue
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
            for obj in docs:
                _apply(api, obj)
                meta = obj.get("metadata", {})
                result.applied.append(f"{obj['kind']} {meta.get('namespace', '')}/{meta.get('name')}")
        except (ApiError, yaml.YAMLError, KeyError) as exc:
            result.errors.append(f"{path.name}: {exc}")
    return result


def _apply(api: KubeApi, desired: dict[str, Any]) -> None:
    kind = _kind_of(api, desired)
    meta = desired.get("metadata") or {}
    namespace = (meta.get("namespace") or "default") if kind.namespaced else ""
    stamped = json.loads(json.dumps(desired))
    stamped["metadata"].setdefault("annotations", {})[APPLIED] = _encode_applied(desired)
    try:
        live = api.store.get(kind, namespace, meta["name"])
    except ApiError as exc:
        if exc.code != 404:
            raise
        api.store.create(kind, namespace, stamped)
        return
    original = _decode_applied((live["metadata"].get("annotations") or {}).get(APPLIED))
    patch = three_way(original, stamped, live)
    if patch:
        api.store.patch(kind, namespace, meta["name"], "application/merge-patch+json", patch)


@dataclass
class HelmRun:
    verb: str
    returncode: int
    stdout: str
    stderr: str


class HelmController:
    """k3s's helm-controller for the HelmCharts in the store; the chart URL is served from ``static_charts``."""

    def __init__(self, api: KubeApi, helm: Path, static_charts: Path, workdir: Path) -> None:
        self.api, self.helm, self.static_charts, self.workdir = api, helm, static_charts, workdir
        self.done: dict[str, str] = {}  # HelmChart name -> the config hash its last job ran with
        self.runs: list[HelmRun] = []

    def _helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workdir),
               "KUBECONFIG": str(self.api.kubeconfig), "HELM_CACHE_HOME": str(self.workdir / "cache"),
               "HELM_CONFIG_HOME": str(self.workdir / "config"), "HELM_DATA_HOME": str(self.workdir / "data")}
        return subprocess.run([str(self.helm), *args], capture_output=True, text=True, env=env, timeout=600,
                              check=False)

    def sync(self) -> list[HelmRun]:
        """Run a job for every HelmChart whose spec or config changed; returns the runs of this pass."""
        runs = []
        charts = self.api.store.list(BY_GVK[("helm.cattle.io/v1", "HelmChart")], None)
        configs = {(c["metadata"]["namespace"], c["metadata"]["name"]): c
                   for c in self.api.store.list(BY_GVK[("helm.cattle.io/v1", "HelmChartConfig")], None)}
        for chart in charts:
            meta, spec = chart["metadata"], chart["spec"]
            config = configs.get((meta["namespace"], meta["name"]), {}).get("spec", {})
            values = [spec.get("valuesContent") or "", config.get("valuesContent") or ""]
            digest = hashlib.sha256(json.dumps([spec, values], sort_keys=True).encode()).hexdigest()
            if self.done.get(meta["name"]) == digest:
                continue
            run = self._job(meta["name"], spec, values)
            runs.append(run)
            self.runs.append(run)
            if run.returncode == 0:
                self.done[meta["name"]] = digest
        return runs

    def _job(self, name: str, spec: Mapping[str, Any], values: list[str]) -> HelmRun:
        config_dir = self.workdir / "config-values"
        config_dir.mkdir(parents=True, exist_ok=True)
        files = []
        for n, (label, text) in enumerate(zip(("01_HelmChart", "10_HelmChartConfig"), values, strict=True)):
            path = config_dir / f"values-{label}.yaml"
            path.write_text(text)
            if text.strip():
                files += ["--values", str(path)]
            del n
        chart_ref = str(spec["chart"])
        if not chart_ref.startswith(CHART_URL_PREFIX):
            raise AssertionError(f"HelmChart {name}: chart {chart_ref} is not from k3s's static folder")
        chart = self.static_charts / chart_ref.removeprefix(CHART_URL_PREFIX)
        namespace = spec.get("targetNamespace") or "default"
        status = self._helm("status", name, "--namespace", namespace, "--output", "json")
        state = json.loads(status.stdout)["info"]["status"] if status.returncode == 0 else ""
        common = [name, str(chart), "--namespace", namespace, "--timeout", str(spec.get("timeout") or "300s"), *files]
        if not state:
            verb, args = "install", ["install", *common] + (["--create-namespace"] if spec.get("createNamespace")
                                                             else [])
        elif state == "deployed":
            verb, args = "upgrade", ["upgrade", *common]
        elif spec.get("failurePolicy") == "abort":
            return HelmRun("abort", 1, "", f"Release status is '{state}' and failure policy is 'abort'; waiting for "
                                           "operator intervention")
        else:
            verb, args = "upgrade", ["upgrade", *common]
        proc = self._helm(*args)
        return HelmRun(verb, proc.returncode, proc.stdout, proc.stderr)
