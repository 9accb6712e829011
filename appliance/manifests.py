"""Kubernetes manifests the csghub step drops into k3s's auto-deploy directory.

- ``csghub.yaml``: a ``HelmChart`` (helm.cattle.io/v1) for k3s's built-in helm-controller.
  We use the controller rather than the helm CLI because k3s already ships it (one binary
  fewer to pin, download and verify), it re-applies the release when the manifest changes,
  and it installs from a local file: the chart archive is placed in
  ``/var/lib/rancher/k3s/server/static/charts/`` and referenced as
  ``https://%{KUBERNETES_API}%/static/charts/<file>``, the way k3s installs its own bundled
  charts offline. (Inline ``chartContent`` would put the whole archive, subcharts and all, into
  one API object, close to the API server's request size limit.)
- ``csghub-redis-policy.yaml``: a NetworkPolicy that admits only CSGHub's own pods to Redis, which runs without a
  password (:func:`redis_policy_object`). On a copy k3s applies it once ``csghub-ready`` has made the namespace
  (until then the deploy controller retries it every 15 s).
- ``coredns-custom.yaml``: the ConfigMap k3s's CoreDNS imports (``*.server`` keys become
  extra server blocks). It makes CSGHub's external names resolve, inside the cluster, to the
  node address k3s is bound to, where the gateway's NodePorts answer: server-side calls to
  ``http://casdoor.csghub.localhost:30080`` then reach the gateway. Without it, pods would ask
  the upstream resolver, which has never heard of ``csghub.localhost``.

:func:`render_manifests` is the entry; :func:`write_manifests` puts them under the build
directory for upload (see ``appliance.needs.guest_uploads``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from appliance.config import ApplianceConfig
from appliance.files import write_atomic
from appliance.values import chart_hostnames, generate_values

RELEASE_NAME = "csghub"
RELEASE_NAMESPACE = "csghub"
GUEST_MANIFEST_DIR = "/var/cache/csghub-appliance/manifests"
STATIC_CHART_URL = "https://%{KUBERNETES_API}%/static/charts/"
HELM_TIMEOUT = "30m"  # pulling CSGHub's images on a first install takes long


def chart_file(cfg: ApplianceConfig) -> str:
    return f"csghub-{cfg.csghub.chart_version}.tgz"


def helmchart_object(cfg: ApplianceConfig, values: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "helm.cattle.io/v1",
        "kind": "HelmChart",
        "metadata": {
            "name": RELEASE_NAME,
            "namespace": "kube-system",
            "labels": {"app.kubernetes.io/managed-by": "csghub-appliance"},
        },
        "spec": {
            "chart": STATIC_CHART_URL + chart_file(cfg),
            "targetNamespace": RELEASE_NAMESPACE,
            "createNamespace": True,
            "timeout": HELM_TIMEOUT,
            # A failed install stays failed and visible (the csghub step reports it) instead of
            # being uninstalled and retried behind our back.
            "failurePolicy": "abort",
            "valuesContent": yaml.safe_dump(values, sort_keys=False, default_flow_style=False),
        },
    }


def _regex(name: str) -> str:
    return re.escape(name) + r"\.$"


def coredns_custom_object(cfg: ApplianceConfig, values: dict[str, Any]) -> dict[str, Any]:
    names = chart_hostnames(values)
    domain, base = names["domain"], names["base"]
    ip = cfg.k3s.node_ip
    if base == domain:
        # Everything CSGHub names (casdoor., minio., the public wildcard) lies under the domain.
        zones = [domain]
        matches = [r"(^|\.)" + _regex(domain)]
    else:
        # Sub-hosts sit directly under the base; the portal and public wildcard under the domain.
        zones = [base]
        matches = [r"^[^.]+\." + _regex(base), r"(^|\.)" + _regex(domain)]
    match_lines = "".join(f"        match {m}\n" for m in matches)
    server = (
        f"{' '.join(z + ':53' for z in zones)} {{\n"
        "    errors\n"
        "    template IN A {\n"
        f"{match_lines}"
        f'        answer "{{{{ .Name }}}} 60 IN A {ip}"\n'
        "        fallthrough\n"
        "    }\n"
        "    template IN AAAA {\n"
        f"{match_lines}"
        "        rcode NOERROR\n"
        "        fallthrough\n"
        "    }\n"
        "    forward . /etc/resolv.conf\n"
        "    cache 30\n"
        "}\n"
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "coredns-custom",
            "namespace": "kube-system",
            "labels": {"app.kubernetes.io/managed-by": "csghub-appliance"},
        },
        "data": {"csghub.server": server},
    }


# The labels chart 2.4.0 selects its Redis pods with (templates/redis/statefulset.yaml; held against a real render in
# tests/unit/test_manifests.py).
REDIS_POD_LABELS = {"app.kubernetes.io/service": "redis", "app.kubernetes.io/instance": RELEASE_NAME,
                    "app.kubernetes.io/name": "csghub"}


def redis_policy_object() -> dict[str, Any]:
    """A NetworkPolicy that lets only pods of CSGHub's own namespace reach Redis.

    Chart 2.4.0's Redis has no password (``redis.requirePass`` off: turning it on needs every consumer to pass it, and
    the ``csgship`` subchart's ``REDIS_URL`` has no place for one), and the users' Spaces run in the cluster too
    (namespace ``spaces``). k3s enforces NetworkPolicies (its embedded network policy controller), so only the
    server, xnet and AgenticHub pods beside Redis reach ``csghub-redis:6379``.
    """
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": "csghub-redis-clients",
            "namespace": RELEASE_NAMESPACE,
            "labels": {"app.kubernetes.io/managed-by": "csghub-appliance"},
        },
        "spec": {
            "podSelector": {"matchLabels": dict(REDIS_POD_LABELS)},
            "policyTypes": ["Ingress"],
            # An empty pod selector without a namespace selector: every pod of this namespace, no other.
            "ingress": [{"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": 6379}]}],
        },
    }


def render_manifests(cfg: ApplianceConfig) -> dict[str, dict[str, Any]]:
    """File name -> Kubernetes object, for ``/var/lib/rancher/k3s/server/manifests/``."""
    values = generate_values(cfg)
    manifests = {
        "csghub.yaml": helmchart_object(cfg, values),
        "coredns-custom.yaml": coredns_custom_object(cfg, values),
    }
    if ((values.get("global") or {}).get("redis") or {}).get("enabled", True):
        manifests["csghub-redis-policy.yaml"] = redis_policy_object()
    return manifests


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (values, Corefile) as literal blocks, so the files read well."""


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_BlockDumper.add_representer(str, _str)


def manifest_yaml(obj: dict[str, Any]) -> str:
    return yaml.dump(obj, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False)


def write_manifests(cfg: ApplianceConfig, directory: Path | None = None) -> list[tuple[Path, str]]:
    """Write the manifests (atomically) and return (host path, guest path) pairs to upload."""
    out_dir = directory or cfg.build_dir / "manifests"
    out_dir.mkdir(parents=True, exist_ok=True)
    uploads = []
    for name, obj in render_manifests(cfg).items():
        path = out_dir / name
        write_atomic(path, manifest_yaml(obj))
        uploads.append((path, f"{GUEST_MANIFEST_DIR}/{name}"))
    return uploads
