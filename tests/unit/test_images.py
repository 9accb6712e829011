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
import yaml

from appliance.config import PROJECT_ROOT, ApplianceConfig
from appliance.images import (
    ImageEntry,
    ImageError,
    helm_template,
    image_list_text,
    image_set,
    normalize_image,
    parse_image_list,
    parse_stored_images,
    read_image_list,
    rendered_images,
    runtime_images,
    unrecorded,
    write_build_image_list,
)
from appliance.values import generate_values
from tests.chart import CHART_DIR
from tests.containerd import Containerd, docker_archive

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


def test_an_upper_case_first_component_is_refused_like_containerd_does(containerd: Containerd, tmp_path: Path) -> None:
    result = containerd.ctr("images", "import", "--no-unpack",
                            str(docker_archive(tmp_path / "upper.tar", ["Upper/x:1"])), check=False)
    assert result.returncode != 0 and "must be lowercase" in result.stderr
    with pytest.raises(ImageError, match="Upper"):
        normalize_image("Upper/x:1")


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
    ["", " busybox", "busy box", "Upper/x:1", "x@sha256:zz", "x:", "-x", "a//b", "repo/Name:1", "x:tag!"],
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


def test_the_build_writes_the_same_set_from_the_chart_archive(
    helm_bin: Path, chart_cfg: ApplianceConfig, chart_objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    """One source of truth: what the build uploads (images.txt, from the cached archive) is what the tests derive."""
    charts = tmp_path / "cache" / "charts"
    charts.mkdir(parents=True)
    subprocess.run([str(helm_bin), "package", str(CHART_DIR), "-d", str(charts)], check=True, capture_output=True)
    cfg = chart_cfg.model_copy(update={
        "artifacts": chart_cfg.artifacts.model_copy(update={"cache_dir": str(tmp_path / "cache")}),
        "output": chart_cfg.output.model_copy(update={"build_dir": str(tmp_path / "build")}),
    })
    path = write_build_image_list(cfg, helm=helm_bin)
    assert path == cfg.build_dir / "manifests" / "images.txt"
    assert path.read_text() == image_list_text(image_set(chart_objects))


def test_the_build_refuses_to_compute_the_set_without_the_chart(chart_cfg: ApplianceConfig, tmp_path: Path) -> None:
    cfg = chart_cfg.model_copy(update={
        "artifacts": chart_cfg.artifacts.model_copy(update={"cache_dir": str(tmp_path / "empty")})})
    with pytest.raises(ImageError, match="not in the cache") as info:
        write_build_image_list(cfg, helm=Path("/bin/false"))
    assert "invoke fetch" in str(info.value)


# -- the pinned helm of the build host ---------------------------------------------------------------------


@pytest.fixture
def helm_publisher(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """get.helm.sh's layout on loopback: the release tarball (a tiny stand-in binary) and its .sha256sum."""
    import hashlib
    import io
    import tarfile
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    root = tmp_path / "www"
    root.mkdir()
    binary = b"#!/bin/sh\necho 'version.BuildInfo{Version:\"v3.17.3\"}'\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("linux-amd64/helm")
        info.size, info.mode = len(binary), 0o755
        tar.addfile(info, io.BytesIO(binary))
    name = "helm-v3.17.3-linux-amd64.tar.gz"
    (root / name).write_bytes(buf.getvalue())
    (root / f"{name}.sha256sum").write_text(f"{hashlib.sha256(buf.getvalue()).hexdigest()}  {name}\n")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", binary
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_fetch_helm_verifies_and_unpacks_the_pinned_release(
    helm_publisher: tuple[str, bytes], make_cfg: Callable[..., ApplianceConfig], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    from appliance.artifacts import LOCK_FILE, fetch_helm, read_lock
    from appliance.errors import ArtifactError

    monkeypatch.delenv("APPLIANCE_HELM", raising=False)
    base, binary = helm_publisher
    lock = tmp_path / "lock.yaml"
    shutil.copyfile(LOCK_FILE, lock)
    cfg = make_cfg(f"artifacts.helm_mirror={base}", f"artifacts.cache_dir={tmp_path / 'cache'}")
    helm = fetch_helm(cfg, update_lock=True, lock_path=lock)
    assert helm.read_bytes() == binary and os.access(helm, os.X_OK)
    assert "v3.17.3" in subprocess.run([str(helm), "version"], capture_output=True, text=True, check=True).stdout
    assert read_lock(lock)["helm"]["v3.17.3"]["helm-v3.17.3-linux-amd64.tar.gz"] is not None
    # A lock that pins other bytes refuses the cached tarball and the download alike.
    data = read_lock(lock)
    data["helm"]["v3.17.3"]["helm-v3.17.3-linux-amd64.tar.gz"] = "0" * 64
    lock.write_text(yaml.safe_dump(data))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        fetch_helm(cfg, lock_path=lock)
    # $APPLIANCE_HELM is used as given, and must be an executable.
    monkeypatch.setenv("APPLIANCE_HELM", str(tmp_path / "nothing"))
    with pytest.raises(ArtifactError, match="not an executable"):
        fetch_helm(cfg, lock_path=lock)


# -- images.txt: one reading on the host, its mirror on the guest ---------------------------------------------

PIN = "sha256:" + "e" * 64
IMAGE_LISTS = [
    "docker.io/library/busybox:latest\n",
    f"docker.io/library/busybox:latest\n\ndocker.io/library/redis:7.4.9 {PIN}\n",
    f"docker.io/library/redis:7.4.9 {PIN}",  # no final newline
    "",
    # Refused, each naming its line:
    f"a\nb {PIN} extra\n",
    "a sha256:short\n",
    f"a SHA256:{'E' * 64}\n",
    f"a  {PIN}\n",
    f"a\t{PIN}\n",
    " a\n",
    "a \n",
    "a\r\n",
    "caf\u00e9:1\n",
    "a\na\n",
    f"a\nb\na {PIN}\n",
    "a\nb\x00c\n",  # bash's `read` drops a NUL without a word
]


def bash_read_image_set(path: Path) -> tuple[int, list[str], str]:
    proc = subprocess.run(["bash", "-c", f'. {shlex.quote(str(LIB))}; read_image_set "$1"', "_", str(path)],
                          capture_output=True, text=True, errors="surrogateescape", check=False,
                          env={"PATH": os.environ["PATH"]})
    return proc.returncode, proc.stdout.splitlines(), proc.stderr


@pytest.mark.parametrize("text", IMAGE_LISTS)
def test_host_and_guest_read_images_txt_alike(text: str, tmp_path: Path) -> None:
    """parse_image_list (host) and read_image_set (guest, lib.sh) accept and refuse the same lines."""
    path = tmp_path / "images.txt"
    path.write_bytes(text.encode())
    rc, lines, err = bash_read_image_set(path)
    try:
        entries = parse_image_list(text, str(path))
    except ImageError as exc:
        line = str(exc).split(" line ", 1)[1].split(" ", 1)[0]
        assert rc == 1 and f"{path} line {line} " in err, (str(exc), err)
        return
    assert rc == 0, err
    assert [" ".join(filter(None, entry)) for entry in entries] == lines
    assert entries == [(ln.split(" ")[0], ln.split(" ")[1] if " " in ln else None) for ln in lines]


def test_an_images_txt_that_is_not_utf8_is_refused_by_line_on_host_and_guest(tmp_path: Path) -> None:
    path = tmp_path / "images.txt"
    path.write_bytes(b"docker.io/library/busybox:latest\ncaf\xe9:1\n")
    with pytest.raises(ImageError) as err:
        read_image_list(path)
    assert f"{path} line 2 is not" in str(err.value)
    rc, _, guest_err = bash_read_image_set(path)
    assert rc == 1 and f"{path} line 2 is not" in guest_err


def test_images_txt_as_the_build_writes_it_reads_back_with_its_pins() -> None:
    entries = [ImageEntry("docker.io/library/busybox:latest", ("busybox",)),
               ImageEntry("docker.io/library/redis:7.4.9", ("redis:7.4.9",))]
    text = image_list_text(entries, {"docker.io/library/redis:7.4.9": PIN})
    assert parse_image_list(text) == [("docker.io/library/busybox:latest", None),
                                      ("docker.io/library/redis:7.4.9", PIN)]


# -- the guest's record, read back for the build report ------------------------------------------------------


def test_the_guests_record_parses_and_refuses_garbage() -> None:
    digest = "sha256:" + "a" * 64
    text = f"docker.io/library/redis:7.4.9 {digest}\n\ndocker.io/library/busybox:latest {digest}\n"
    assert parse_stored_images(text) == [
        {"name": "docker.io/library/busybox:latest", "digest": digest},
        {"name": "docker.io/library/redis:7.4.9", "digest": digest},
    ]
    with pytest.raises(ImageError, match="line 1 is not `NAME sha256:DIGEST`"):
        parse_stored_images("docker.io/library/redis:7.4.9 sha256:short\n")
    assert unrecorded(["a", "b"], [{"name": "a", "digest": digest}]) == ["b"]


def test_invoke_lock_pins_recorded_digests_and_the_list_carries_them(
    make_cfg: Callable[..., ApplianceConfig], tmp_path: Path
) -> None:
    import shutil

    from appliance.artifacts import LOCK_FILE, read_lock
    from appliance.images import ImageEntry, locked_image_digests, pin_image_digests

    lock = tmp_path / "lock.yaml"
    shutil.copyfile(LOCK_FILE, lock)
    cfg = make_cfg()
    digest = "sha256:" + "d" * 64
    stored = [{"name": "docker.io/library/redis:7.4.9", "digest": digest}]
    assert pin_image_digests(cfg, stored, lock) == 1
    assert pin_image_digests(cfg, stored, lock) == 0  # already pinned: nothing rewritten
    pins = locked_image_digests(read_lock(lock), cfg.csghub.chart_version)
    assert pins == {"docker.io/library/redis:7.4.9": digest}
    assert lock.read_text().startswith("# Version lock")  # the header survives
    entries = [ImageEntry("docker.io/library/busybox:latest", ("busybox",)),
               ImageEntry("docker.io/library/redis:7.4.9", ("redis:7.4.9",))]
    assert image_list_text(entries, pins).splitlines() == [
        "docker.io/library/busybox:latest", f"docker.io/library/redis:7.4.9 {digest}"]
    with pytest.raises(ImageError, match="malformed digest"):
        locked_image_digests({"images": {"2.4.0": {"x": "sha256:nope"}}}, "2.4.0")


def test_provisioning_uploads_the_image_set_of_the_values_it_installs(
    helm_bin: Path, chart_cfg: ApplianceConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pinned_uploads` (right before the steps run) writes images.txt for these values and uploads it."""
    from appliance.artifacts import planned_artifacts
    from appliance.steps import pinned_uploads

    monkeypatch.setenv("APPLIANCE_HELM", str(helm_bin))
    cfg = chart_cfg.model_copy(update={
        "artifacts": chart_cfg.artifacts.model_copy(update={"cache_dir": str(tmp_path / "cache")}),
        "output": chart_cfg.output.model_copy(update={"build_dir": str(tmp_path / "build")}),
    })
    for artifact in planned_artifacts(cfg):
        artifact.cache_path.parent.mkdir(parents=True, exist_ok=True)
        if artifact.group == "csghub_chart":
            subprocess.run([str(helm_bin), "package", str(CHART_DIR), "-d", str(artifact.cache_path.parent)],
                           check=True, capture_output=True)
        else:
            artifact.cache_path.write_bytes(b"stand-in")
    uploads = {up.local: up.guest for up in pinned_uploads(cfg)}
    images = cfg.build_dir / "manifests" / "images.txt"
    assert uploads[images] == "/var/cache/csghub-appliance/manifests/images.txt"
    assert "docker.io/library/busybox:latest\n" in images.read_text()


def test_declared_images_match_the_subchart_versions_the_chart_pins(helm_bin: Path, tmp_path: Path) -> None:
    import io
    import tarfile

    from appliance.images import chart_dependencies, check_declared_versions

    check_declared_versions(CHART_DIR)  # the real chart 2.4.0: gateway-helm 1.7.5, knative-operator 1.22.1, argo 0.47.5
    subprocess.run([str(helm_bin), "package", str(CHART_DIR), "-d", str(tmp_path)], check=True, capture_output=True)
    check_declared_versions(tmp_path / "csghub-2.4.0.tgz")

    # A packaged chart whose subcharts are nested archives (as `helm dependency build` leaves them),
    # pinning another knative-operator than the one the declared Knative images were read for.
    def tgz(members: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    runner = tgz({"runner/Chart.yaml": b"name: runner\ndependencies:\n- {name: knative-operator, version: 1.23.0}\n"
                                       b"- {name: argo-workflows, version: 0.47.5}\n"})
    chart = tmp_path / "other.tgz"
    top = b"name: csghub\ndependencies:\n- {name: gateway-helm, version: 1.7.5}\n"
    chart.write_bytes(tgz({"csghub/Chart.yaml": top, "csghub/charts/runner-2.4.0.tgz": runner}))
    assert chart_dependencies(chart)["knative-operator"] == {"1.23.0"}
    with pytest.raises(ImageError) as info:
        check_declared_versions(chart)
    assert "declared for knative-operator 1.22.1, the chart pins 1.23.0" in str(info.value)
    assert "gateway-helm" not in str(info.value)
