"""Generated Kubernetes manifests are valid objects and say what the values and docs say.

Built-in kinds are checked with kubernetes-validate against the Kubernetes release k3s runs;
the HelmChart custom resource against a JSON schema of helm-controller's documented fields
(tests/data/helmchart.v1.schema.json: unknown fields, wrong types and bad enums fail).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from appliance.config import PROJECT_ROOT, ApplianceConfig, load_config
from appliance.manifests import manifest_yaml, render_manifests, write_manifests
from appliance.values import generate_values

HELMCHART_SCHEMA = json.loads((PROJECT_ROOT / "tests" / "data" / "helmchart.v1.schema.json").read_text())
VARIANTS = [
    [],
    ["csghub.domain=csghub.192.168.56.10.nip.io", "k3s.node_ip=10.200.0.1"],
    ["csghub.edition=ee", "csghub.image_registry=opencsg-registry.cn-beijing.cr.aliyuncs.com"],
    ["csghub.domain=hub.example.com", "csghub.chart_version=2.3.2"],
]


def kube_version(cfg_version: str) -> str:
    m = re.match(r"^v(\d+)\.(\d+)\.", cfg_version)
    assert m
    return f"{m.group(1)}.{m.group(2)}.0"


@pytest.mark.parametrize("sets", VARIANTS, ids=lambda s: ",".join(s) or "default")
def test_manifests_are_valid_objects(sets: list[str]) -> None:
    cfg = load_config(None, sets)
    manifests = render_manifests(cfg)
    for name, obj in manifests.items():
        # Round-trip through the text that lands in the guest.
        again = yaml.safe_load(manifest_yaml(obj))
        assert again == obj, name
        if obj["apiVersion"] == "helm.cattle.io/v1":
            jsonschema.Draft7Validator(HELMCHART_SCHEMA).validate(again)
        else:
            kubernetes_validate.validate(again, kube_version(cfg.k3s.version), strict=True)


def test_helmchart_installs_the_uploaded_chart_with_the_generated_values() -> None:
    cfg = load_config(None, [])
    chart = render_manifests(cfg)["csghub.yaml"]
    spec = chart["spec"]
    assert chart["metadata"]["namespace"] == "kube-system"  # where helm-controller looks
    assert spec["chart"] == "https://%{KUBERNETES_API}%/static/charts/csghub-2.4.0.tgz"
    assert spec["targetNamespace"] == "csghub" and spec["createNamespace"] is True
    assert yaml.safe_load(spec["valuesContent"]) == generate_values(cfg)
    assert "chartContent" not in spec and "repo" not in spec  # nothing to download in the guest


def test_schema_rejects_what_helm_controller_would() -> None:
    chart: dict[str, Any] = render_manifests(load_config(None, []))["csghub.yaml"]
    validator = jsonschema.Draft7Validator(HELMCHART_SCHEMA)
    for broken in ({"failurePolicy": "retry"}, {"valuesContent": {"a": 1}}, {"timeout": "30 minutes"},
                   {"chartURL": "x"}):
        bad = {**chart, "spec": {**chart["spec"], **broken}}
        assert list(validator.iter_errors(bad)), broken


def corefile_zones(server: str) -> list[str]:
    head = server.splitlines()[0]
    assert head.endswith("{")
    return [z.removesuffix(":53") for z in head[:-1].split()]


@pytest.mark.parametrize(
    ("domain", "zones", "resolved", "not_resolved"),
    [
        ("csghub.localhost", ["csghub.localhost"],
         ["csghub.localhost", "casdoor.csghub.localhost", "minio.csghub.localhost", "a-space.csghub.csghub.localhost"],
         []),
        ("csghub.192.168.56.10.nip.io", ["192.168.56.10.nip.io"],
         ["csghub.192.168.56.10.nip.io", "casdoor.192.168.56.10.nip.io", "x.csghub.192.168.56.10.nip.io"],
         ["a.b.192.168.56.10.nip.io"]),
    ],
)
def test_coredns_answers_the_chart_names_with_the_node_ip(
    domain: str, zones: list[str], resolved: list[str], not_resolved: list[str]
) -> None:
    cfg = load_config(None, [f"csghub.domain={domain}", "k3s.node_ip=10.254.254.1"])
    cm = render_manifests(cfg)["coredns-custom.yaml"]
    assert cm["metadata"] == {
        "name": "coredns-custom", "namespace": "kube-system",
        "labels": {"app.kubernetes.io/managed-by": "csghub-appliance"},
    }
    (key, server), = cm["data"].items()
    assert key.endswith(".server")  # k3s's Corefile imports /etc/coredns/custom/*.server
    assert corefile_zones(server) == zones
    assert server.count("{") == server.count("}")
    assert 'answer "{{ .Name }} 60 IN A 10.254.254.1"' in server
    assert "forward . /etc/resolv.conf" in server
    a_block = server.split("template IN A {", 1)[1].split("}", 1)[0]
    patterns = [line.split(None, 1)[1] for line in a_block.splitlines() if line.strip().startswith("match ")]
    # CoreDNS matches regexes against the FQDN (trailing dot); Go's RE2 and Python agree on these.
    def answered(name: str) -> bool:
        return any(re.search(p, name + ".") for p in patterns)
    assert all(answered(n) for n in resolved), resolved
    assert not any(answered(n) for n in not_resolved), not_resolved


def test_write_manifests_writes_files_for_upload(tmp_path: Path) -> None:
    cfg = load_config(None, [])
    uploads = write_manifests(cfg, tmp_path)
    assert sorted(g for _, g in uploads) == [
        "/var/cache/csghub-appliance/manifests/coredns-custom.yaml",
        "/var/cache/csghub-appliance/manifests/csghub-redis-policy.yaml",
        "/var/cache/csghub-appliance/manifests/csghub.yaml",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coredns-custom.yaml", "csghub-redis-policy.yaml",
                                                          "csghub.yaml"]


@pytest.mark.parametrize("edition", ["ce", "ee"])
def test_redis_policy_selects_the_charts_redis_and_admits_its_clients(
        edition: str, helm_bin: Path, make_cfg: Callable[..., ApplianceConfig]) -> None:
    """Against a real render: the policy selects exactly the pods of the Redis StatefulSet (and its Service), and
    every workload that connects to csghub-redis runs in the namespace it admits; the users' Spaces do not."""
    from tests.chart import render_chart_once

    cfg = make_cfg("provision.skip=[]", "vm.cpus=4", "vm.memory_mb=8192", f"csghub.edition={edition}")
    policy = render_manifests(cfg)["csghub-redis-policy.yaml"]
    objects = render_chart_once(helm_bin, generate_values(cfg))
    selector = policy["spec"]["podSelector"]["matchLabels"]

    def selected(labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    pods = {(o["kind"], o["metadata"]["name"]): o["spec"]["template"]["metadata"].get("labels") or {}
            for o in objects if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")}
    assert [k for k, labels in pods.items() if selected(labels)] == [("StatefulSet", "csghub-redis")]
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "csghub-redis")
    assert service["spec"]["selector"] == selector
    clients = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")
               and "csghub-redis" in json.dumps(o) and o["metadata"]["name"] != "csghub-redis"]
    assert {"csghub-server", "csghub-xnet"} <= {o["metadata"]["name"] for o in clients}
    for client in clients:
        assert client["metadata"]["namespace"] == policy["metadata"]["namespace"], client["metadata"]["name"]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": 6379}]}]
    # Configured clients (ConfigMaps) name it too, only in that namespace.
    assert all(o["metadata"]["namespace"] == "csghub" for o in objects
               if o["kind"] == "ConfigMap" and "csghub-redis" in json.dumps(o))
