"""The image set: real helm renders the real chart, a real containerd names the images.

- ``normalize_image`` (Python, appliance/images.py), ``normalize_image`` (bash, provision/files/csghub/lib.sh)
  and the k3s stand-in's image store (tests/data/fake_k3s.py) must all give the name a real containerd
  gives, for every reference shape the chart uses and for every image of the real chart's set.
- The set derived from the real render has the runtime images, no phantom, and does not change with the
  per-copy values first boot writes.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.config import PROJECT_ROOT, ApplianceConfig
from appliance.images import (
    ImageError,
    helm_template,
    image_list_text,
    image_set,
    normalize_image,
    rendered_images,
    runtime_images,
)
from appliance.values import generate_values
from tests.chart import CHART_DIR
from tests.containerd import Containerd, containerd_missing, docker_archive

LIB = PROJECT_ROOT / "provision" / "files" / "csghub" / "lib.sh"
FAKE_K3S = PROJECT_ROOT / "tests" / "data" / "fake_k3s.py"
DIGEST = "sha256:" + "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"

# Every shape of reference the chart and its operators use (issue 10), and the corner cases of the rule.
SHAPES = [
    "busybox:latest",
    "busybox",
    "docker.io/busybox:latest",
    "docker.io/redis:7.4.9",
    "opencsghq/x:v1",
    "docker.io/opencsghq/csghub-server:v2.4.0-ce",
    "registry.example:5000/a/b:tag",
    "registry.example/a/b/c:1.0",
    f"name@{DIGEST}",
    f"name2:tag@{DIGEST}",
    f"gcr.io/knative-releases/knative.dev/serving/cmd/queue@{DIGEST}",
    "localhost/x:1",
    "localhost:5000/q",
    "index.docker.io/z:1",
    "quay.io/argoproj/argoexec:v3.7.11",
]


def bash_normalize(refs: list[str]) -> list[str]:
    script = f". {shlex.quote(str(LIB))}; for r in " + " ".join(shlex.quote(r) for r in refs) + \
        '; do normalize_image "$r"; done'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    return out.splitlines()


# -- the real thing: containerd ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    why = containerd_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    daemon = Containerd(tmp_path_factory.mktemp("containerd"))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def stored_names(containerd: Containerd, tmp_path: Path, refs: list[str]) -> list[str]:
    """Import one Docker-format archive carrying ``refs`` as RepoTags; the names containerd stores."""
    before = set(containerd.names())
    containerd.import_archive(docker_archive(tmp_path / "image.tar", refs, payload=str(refs).encode()))
    return sorted(set(containerd.names()) - before)


def test_containerd_names_every_reference_shape_as_we_do(containerd: Containerd, tmp_path: Path) -> None:
    for ref in SHAPES:
        names = stored_names(containerd, tmp_path, [ref])
        expected = normalize_image(ref)
        # An image imported before under the same name shows no new entry: it must be there already.
        assert names == [expected] or (not names and expected in containerd.names()), (ref, names)
    assert bash_normalize(SHAPES) == [normalize_image(r) for r in SHAPES]


def test_a_tag_with_a_digest_is_dropped_by_containerd(containerd: Containerd, tmp_path: Path) -> None:
    ref = f"docker.io/opencsghq/tagged:v9@{DIGEST}"
    assert stored_names(containerd, tmp_path, [ref]) == [f"docker.io/opencsghq/tagged@{DIGEST}"]
    assert normalize_image(ref) == f"docker.io/opencsghq/tagged@{DIGEST}"


def test_the_k3s_stand_in_stores_images_as_containerd_does(containerd: Containerd, tmp_path: Path) -> None:
    """tests/data/fake_k3s.py's image store: `crictl pull REF` then `ctr images ls -q` == containerd's names."""
    state = tmp_path / "fake"
    state.mkdir()
    refs = [*SHAPES, "docker.io/opencsghq/only-in-fake:v1"]
    (state / "pullable").write_text("".join(f"{normalize_image(r)}\n" for r in refs))
    env = {**os.environ, "FAKE_K3S_STATE": str(state)}
    for ref in refs:
        subprocess.run(["python3", str(FAKE_K3S), "crictl", "pull", ref], env=env, check=True)
    fake = subprocess.run(["python3", str(FAKE_K3S), "ctr", "-n", "k8s.io", "images", "ls", "-q"], env=env,
                          capture_output=True, text=True, check=True).stdout.split()
    stored_names(containerd, tmp_path, refs)
    real = containerd.names()
    assert sorted(set(fake)) == sorted(set(fake) & set(real)), set(fake) - set(real)
    assert {normalize_image(r) for r in refs} == set(fake)


def test_containerd_stores_the_real_charts_image_set_under_our_names(
    containerd: Containerd, tmp_path: Path, chart_objects: list[dict[str, Any]]
) -> None:
    entries = image_set(chart_objects)
    refs = sorted({ref for e in entries for ref in e.references})
    stored_names(containerd, tmp_path, refs)
    real = set(containerd.names())
    missing = [e.name for e in entries if e.name not in real]
    assert missing == [], f"containerd stored these references under other names: {missing}"
    assert bash_normalize(refs) == [normalize_image(r) for r in refs]


# -- the rule itself -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref",
    ["", " busybox", "busy box", "Upper/x:1x:", "x@sha256:zz", "x:", "-x", "a//b", "repo/Name:1", "x:tag!"],
)
def test_a_malformed_reference_is_refused_naming_it(ref: str) -> None:
    with pytest.raises(ImageError) as info:
        normalize_image(ref)
    assert repr(ref) in str(info.value)


# -- structure, not text -------------------------------------------------------------------------------


def test_rendered_images_walks_every_pod_spec_and_custom_resource() -> None:
    pod = {"initContainers": [{"name": "i", "image": "init:1"}], "containers": [{"name": "c", "image": "main:1"}],
           "ephemeralContainers": [{"name": "e", "image": "debug:1"}]}
    objects = [
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "cj", "namespace": "n"},
         "spec": {"jobTemplate": {"spec": {"template": {"spec": pod}}}}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
         "spec": {"containers": [{"name": "c", "image": "pod:1"}]}},
        {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet", "metadata": {"name": "lws"},
         "spec": {"leaderWorkerTemplate": {"workerTemplate": {"spec": {"containers": [
             {"name": "w", "image": "worker:1"}]}}}}},
        {"apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "EnvoyProxy", "metadata": {"name": "ep"},
         "spec": {"provider": {"kubernetes": {"envoyDeployment": {"container": {"image": "envoy:custom"}}}}}},
        {"apiVersion": "operator.knative.dev/v1beta1", "kind": "KnativeServing", "metadata": {"name": "ks"},
         "spec": {"registry": {"override": {"queue-proxy": "mirror.example/queue:1"}}}},
        # Text that merely contains "image:" (Casdoor's init data has CSS like this) is not an image.
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"},
         "data": {"init_data.json": "background-image: url('x.png'); image: url"}},
    ]
    found = rendered_images(objects)
    assert set(found) == {"init:1", "main:1", "debug:1", "pod:1", "worker:1", "envoy:custom", "mirror.example/queue:1"}
    assert found["init:1"] == ["CronJob n/cj initContainers[i]"]


def test_runtime_declarations_follow_the_render_and_refuse_drift() -> None:
    decls = [
        {"configmap": "<release>-runner", "key": "KANIKO", "from": "runner"},
        {"image": "queue:1.22", "when_kind": "KnativeServing", "version": "1.22", "from": "knative"},
        {"image": "argoexec:v1", "when_configmap": "<release>-runner", "from": "argo"},
    ]
    runner = {"kind": "ConfigMap", "metadata": {"name": "rel-runner"}, "data": {"KANIKO": "kaniko:1"}}
    serving = {"kind": "KnativeServing", "metadata": {"name": "k"}, "spec": {"version": "1.22"}}
    assert runtime_images([], "rel", decls) == {}  # every component off
    assert set(runtime_images([runner, serving], "rel", decls)) == {"kaniko:1", "queue:1.22", "argoexec:v1"}
    with pytest.raises(ImageError, match="has no KANIKO"):
        runtime_images([{**runner, "data": {}}], "rel", decls)
    with pytest.raises(ImageError, match=r"asks for Knative Serving 1\.23"):
        runtime_images([{**serving, "spec": {"version": "1.23"}}], "rel", decls)


# -- the real chart, rendered by a real helm with our values ------------------------------------------------


@pytest.fixture(scope="module")
def chart_cfg(make_cfg: Callable[..., ApplianceConfig]) -> ApplianceConfig:
    return make_cfg("provision.skip=[]", "vm.cpus=4", "vm.memory_mb=8192")


@pytest.fixture(scope="module")
def chart_objects(helm_bin: Path, chart_cfg: ApplianceConfig) -> list[dict[str, Any]]:
    return helm_template(helm_bin, CHART_DIR, generate_values(chart_cfg), k3s_version=chart_cfg.k3s.version)


def test_the_real_charts_image_set(chart_objects: list[dict[str, Any]]) -> None:
    names = [e.name for e in image_set(chart_objects)]
    # Named as containerd stores them (issue 10, item 1).
    assert "docker.io/library/busybox:latest" in names
    assert "docker.io/library/redis:7.4.9" in names
    assert "docker.io/library/registry:2.8.3" in names
    assert "docker.io/library/nats:2.12.12" in names
    assert not any(n.startswith("docker.io/busybox") for n in names)
    # No phantom from Casdoor's CSS (item 2).
    assert not any("/url:" in n or n.endswith("/url") for n in names), names
    # Runtime images no pod template names (item 3).
    for wanted in ("docker.io/opencsghq/kaniko-executor:v1.24.0", "docker.io/opencsghq/git:2.52.0",
                   "docker.io/opencsghq/dataflow:v2.4.0-argo", "quay.io/argoproj/argoexec:v3.7.11",
                   "docker.io/envoyproxy/envoy:distroless-v1.37.5"):
        assert wanted in names
    assert any(n.startswith("gcr.io/knative-releases/knative.dev/serving/cmd/queue@sha256:") for n in names)
    # CronJob/Job init containers and hook Jobs are walked: the migration Job's image is there.
    assert "docker.io/opencsghq/csghub-server:v2.4.0-ce" in names
    assert names == sorted(set(names))


def test_per_copy_values_do_not_change_the_image_set(
    helm_bin: Path, chart_cfg: ApplianceConfig, chart_objects: list[dict[str, Any]]
) -> None:
    # What first boot's HelmChartConfig merges over the build's values (provision/files/firstboot/lib.sh).
    per_copy = {"global": {"gateway": {"external": {"domain": "csghub.192-168-56-10.example.org"}}}}
    copy_objects = helm_template(helm_bin, CHART_DIR, generate_values(chart_cfg), k3s_version=chart_cfg.k3s.version,
                                 extra_values=[per_copy])
    assert image_list_text(image_set(copy_objects)) == image_list_text(image_set(chart_objects))
