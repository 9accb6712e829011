"""The k3s and csghub steps at the boundaries reachable without k3s.

The pure functions of provision/30-csghub.sh (provision/files/csghub/lib.sh) run under bash
with canned input; both scripts run for real up to their input checks, which must refuse to
start (non-zero, a message naming what is missing) before they change anything. Running them
against a real k3s needs the k3s binary and images, which cannot be downloaded here: that
is the e2e test's job (tests/e2e/test_full_build.py).
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import shlex
from pathlib import Path

import pytest
import yaml

from appliance.config import PROJECT_ROOT, load_config
from appliance.manifests import manifest_yaml, render_manifests
from appliance.run import run

LIB = PROJECT_ROOT / "provision" / "files" / "csghub" / "lib.sh"
K3S_STEP = PROJECT_ROOT / "provision" / "20-k3s.sh"
CSGHUB_STEP = PROJECT_ROOT / "provision" / "30-csghub.sh"


def bash(snippet: str, stdin: str = "") -> str:
    result = run(["bash", "-c", f"set -euo pipefail; . {shlex.quote(str(LIB))}; {snippet}"],
                 input_text=stdin)
    return result.stdout


@pytest.mark.parametrize(
    ("ref", "stored"),
    [
        ("redis:7.4.9", "docker.io/library/redis:7.4.9"),
        ("opencsghq/csghub-server:v2.4.0-ce", "docker.io/opencsghq/csghub-server:v2.4.0-ce"),
        ("docker.io/envoyproxy/envoy:distroless-v1.37.0", "docker.io/envoyproxy/envoy:distroless-v1.37.0"),
        ("opencsg-registry.cn-beijing.cr.aliyuncs.com/opencsghq/postgres:15.18",
         "opencsg-registry.cn-beijing.cr.aliyuncs.com/opencsghq/postgres:15.18"),
        ("registry.local:5000/team/app", "registry.local:5000/team/app:latest"),
        ("nginx", "docker.io/library/nginx:latest"),
        ("gcr.io/x/y@sha256:" + "a" * 64, "gcr.io/x/y@sha256:" + "a" * 64),
        ("localhost/img:1", "localhost/img:1"),
    ],
)
def test_normalize_image(ref: str, stored: str) -> None:
    assert bash(f"normalize_image {shlex.quote(ref)}").strip() == stored


def test_workload_states() -> None:
    lines = (
        "Deployment csghub/csghub-portal 1 1\n"
        "Deployment csghub/csghub-server 1 \n"        # no ready replicas yet
        "StatefulSet csghub/csghub-postgresql 1 1\n"
        "Deployment csghub/scaled-down 0 \n"          # 0 wanted: ready
        "DaemonSet kube-system/svclb 1 0\n"
    )
    out = bash("workload_states", lines).splitlines()
    assert out == [
        "ready Deployment csghub/csghub-portal",
        "waiting Deployment csghub/csghub-server",
        "ready StatefulSet csghub/csghub-postgresql",
        "ready Deployment csghub/scaled-down",
        "waiting DaemonSet kube-system/svclb",
    ]


def test_release_images_from_a_helm_release_secret() -> None:
    manifest = (
        "---\nkind: Deployment\nspec:\n  template:\n    spec:\n      containers:\n"
        '        - image: "opencsghq/csghub-server:v2.4.0-ce"\n'
        "        - image: redis:7.4.9\n"
        "---\nkind: Job\n  image: opencsghq/psql:latest\n"
    )
    release = json.dumps({"name": "csghub", "manifest": manifest})
    # What `kubectl get secret sh.helm.release.v1.csghub.v1 -o jsonpath={.data.release}` gives:
    # base64 (Kubernetes) of base64 (Helm) of gzip of the JSON.
    secret_data = base64.b64encode(base64.b64encode(gzip.compress(release.encode()))).decode()
    out = bash("base64 -d | base64 -d | gzip -dc | release_images", secret_data).split()
    assert out == ["opencsghq/csghub-server:v2.4.0-ce", "redis:7.4.9", "opencsghq/psql:latest"]


def step(script: Path, env: dict[str, str]) -> tuple[int, str]:
    base = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    result = run(["bash", str(script)], env={**base, **env}, check=False)
    return result.returncode, result.stderr


def test_k3s_step_refuses_missing_inputs_before_changing_anything(tmp_path: Path) -> None:
    code, err = step(K3S_STEP, {"K3S_NODE_IP": "10.254.254.1"})
    assert code != 0 and "K3S_VERSION is required" in err
    code, err = step(K3S_STEP, {"K3S_VERSION": "v1.34.3+k3s1", "K3S_NODE_IP": "10.254.254"})
    assert code != 0 and "not an IPv4 address" in err
    code, err = step(K3S_STEP, {"K3S_VERSION": "v1.34.3+k3s1", "K3S_NODE_IP": "10.254.254.1",
                                "ARTIFACT_DIR": str(tmp_path), "PROVISION_DIR": str(PROJECT_ROOT / "provision")})
    assert code != 0 and f"missing {tmp_path}/k3s " in err and "invoke fetch" in err


def test_csghub_step_refuses_mismatched_manifests(tmp_path: Path) -> None:
    env = {"CSGHUB_CHART_VERSION": "2.4.0", "CSGHUB_DOMAIN": "csghub.localhost", "CSGHUB_HTTP_PORT": "30080",
           "K3S_NODE_IP": "10.254.254.1", "ARTIFACT_DIR": str(tmp_path), "MANIFEST_DIR": str(tmp_path),
           "PROVISION_DIR": str(PROJECT_ROOT / "provision")}
    code, err = step(CSGHUB_STEP, env)
    assert code != 0 and f"missing {tmp_path}/csghub-2.4.0.tgz" in err
    (tmp_path / "csghub-2.4.0.tgz").write_bytes(b"chart")
    # Manifests generated for another chart version than the step is told to install.
    for name, obj in render_manifests(load_config(None, ["csghub.chart_version=2.3.2"])).items():
        (tmp_path / name).write_text(manifest_yaml(obj))
    code, err = step(CSGHUB_STEP, env)
    assert code != 0 and "manifests and CSGHUB_CHART_VERSION disagree" in err
    # The matching manifests pass that check; the step then needs k3s.
    for name, obj in render_manifests(load_config(None, [])).items():
        (tmp_path / name).write_text(manifest_yaml(obj))
    code, err = step(CSGHUB_STEP, env)
    assert code != 0 and "disagree" not in err
    assert "k3s is not installed" in err or "API server is not ready" in err


@pytest.mark.parametrize(
    ("domain", "use_top"),
    [("csghub.localhost", False), ("csghub.192.168.56.10.nip.io", False), ("hub.example.com", False),
     ("hub.example.com", True), ("a.b.example.org", False)],
)
def test_guest_coredns_manifest_equals_the_build_time_one(domain: str, use_top: bool) -> None:
    """csghub-reconfigure can regenerate coredns-custom in the guest (no Python there)."""
    sets = [f"csghub.domain={domain}", "k3s.node_ip=10.254.254.1"]
    if use_top:
        sets.append("csghub.values={global: {gateway: {external: {useTop: true}}}}")
    cfg = load_config(None, sets)
    expected = render_manifests(cfg)["coredns-custom.yaml"]
    base = bash(f"chart_base {shlex.quote(domain)} {'true' if use_top else 'false'}").strip()
    text = bash(f"coredns_custom_manifest {shlex.quote(domain)} {shlex.quote(base)} 10.254.254.1")
    assert yaml.safe_load(text) == expected
