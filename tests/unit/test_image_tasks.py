"""The image path through the Invoke tasks, as a release engineer types them, against a real registry.

A copy of the project (``appliance/``, ``tasks.py``, ``provision/``) in a temporary folder, so that
``invoke lock --images`` writes that copy's version lock, never the repository's. Its ``appliance.yaml``
sends ``docker.io`` to one real ``docker-registry`` on loopback (TLS from a test CA, basic auth; the
credentials in an auth file named by ``REGISTRY_AUTH_FILE``, as skopeo reads it), takes k3s and the
chart from a loopback publisher (k3s: random bytes with their checksum file; the chart: the real chart
2.4.0 packaged by helm) and the OVF schemas from the loopback mirror of ../shared. The chart's runner
(Knative) is off, so the image set is 20 names, all by tag: a tiny stand-in image is pushed under each.

Each command runs as ``python -m invoke TASK`` in the copy; the tests read exit codes, outputs, the
lock, the cache, the registry's access log, and look for the password everywhere.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from appliance.config import load_config
from appliance.images import helm_template, image_set
from appliance.values import generate_values
from tests.chart import CHART_DIR, PROJECT_ROOT, helm_binary
from tests.registry import Registry, image_blobs, registry_missing, write_layout
from tests.unit.test_artifacts import K3S_DIR, Publisher, serving

K3S_VERSION = "v1.34.3+k3s1"
SETTINGS = ["provision.skip=[]", "vm.cpus=4", "vm.memory_mb=8192", "csghub.values.runner.enabled=false"]


@dataclass
class Project:
    root: Path  # the project copy: tasks.py, appliance/, provision/, appliance.yaml
    registry: Registry
    names: list[str]  # the image set
    tiny: str  # the stand-in's manifest digest
    password: str
    token: str
    env: dict[str, str]

    @property
    def lock(self) -> Path:
        return self.root / "appliance" / "data" / "versions.lock.yaml"

    def invoke(self, *args: str, net: bool = True, timeout: int = 300) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "invoke", *args]
        if not net:
            argv = ["unshare", "--net", *argv]
        return subprocess.run(argv, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)

    def registry_requests(self, since: int) -> list[str]:
        text = (self.registry.base / "registry.log").read_bytes()[since:].decode(errors="replace")
        return [line for line in text.splitlines() if '"GET /v2/' in line or '"HEAD /v2/' in line]


def _copy_project(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("appliance", "provision"):
        shutil.copytree(PROJECT_ROOT / part, dest / part, ignore=ignore)
    shutil.copy(PROJECT_ROOT / "tasks.py", dest / "tasks.py")
    return dest


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, ovf_schema_mirror: str) -> Iterator[Project]:
    why = registry_missing() or (None if helm_binary() else "helm not found (scripts/setup.sh installs it)")
    if why or not CHART_DIR.is_dir():
        if os.environ.get("CI"):
            pytest.fail(why or f"no chart at {CHART_DIR}")
        pytest.skip(why or f"no chart at {CHART_DIR}")
    helm = helm_binary()
    assert helm is not None
    base = tmp_path_factory.mktemp("image-tasks")
    root = _copy_project(base / "project")
    password = "pw-" + os.urandom(9).hex()
    registry = Registry(base / "registry", "builder", password)
    registry.base.mkdir()
    registry.start()
    try:
        # The publisher: k3s's release folder and a chart repository holding the real chart, packaged.
        www = base / "www"
        release = www / K3S_DIR.lstrip("/")
        release.mkdir(parents=True)
        sums = ""
        for name in ("k3s", "k3s-airgap-images-amd64.tar.zst"):
            data = os.urandom(50_000)
            (release / name).write_bytes(data)
            sums += f"{hashlib.sha256(data).hexdigest()}  {name}\n"
        (release / "sha256sum-amd64.txt").write_text(sums)
        (www / "csghub").mkdir()
        subprocess.run([str(helm), "package", str(CHART_DIR), "-d", str(www / "csghub")], check=True,
                       capture_output=True, timeout=120)
        chart = www / "csghub" / "csghub-2.4.0.tgz"
        (www / "csghub" / "index.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "entries": {"csghub": [
            {"name": "csghub", "version": "2.4.0", "digest": hashlib.sha256(chart.read_bytes()).hexdigest(),
             "urls": ["csghub-2.4.0.tgz"]}]}}))
        with serving(Publisher(www)) as pub:
            # The image set this configuration needs, as the tasks will compute it; a stand-in under every name.
            cfg = load_config(None, SETTINGS, "libvirt")
            objects = helm_template(helm, CHART_DIR, generate_values(cfg), k3s_version=cfg.k3s.version)
            names = [entry.name for entry in image_set(objects)]
            assert names and all("@" not in n and n.startswith("docker.io/") for n in names), names
            tiny, tiny_blobs = image_blobs([{"stand-in": b"tiny\n"}, {"etc/own": b"own layer\n"}])
            layout = write_layout(base / "tiny", tiny, tiny_blobs)
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(lambda n: registry.push_layout(layout, n.split("/", 1)[1]), names))
            (root / "appliance.yaml").write_text(yaml.safe_dump({
                "provider": "libvirt",
                "vm": {"cpus": 4, "memory_mb": 8192},
                "provision": {"skip": []},
                "output": {"build_dir": str(base / "build")},
                "artifacts": {"cache_dir": str(base / "cache"),
                              "k3s_mirror": f"{pub.base}/k3s-io/k3s/releases/download",
                              "chart_repo": f"{pub.base}/csghub", "ovf_schema_mirror": ovf_schema_mirror},
                "images": {"mirrors": {"docker.io": registry.host}, "ca_dir": str(registry.ca_dir)},
                "csghub": {"values": {"runner": {"enabled": False}}},
            }))
            token = base64.b64encode(f"builder:{password}".encode()).decode()
            auth = base / "home" / "auth.json"
            auth.parent.mkdir()
            auth.write_text(json.dumps({"auths": {registry.host: {"auth": token}}}))
            env = {**os.environ, "REGISTRY_AUTH_FILE": str(auth), "APPLIANCE_HELM": str(helm),
                   "PYTHONPATH": str(root), "COLUMNS": "300"}
            env.pop("CI", None)  # the tasks' output as a user sees it; CI only changes what tests skip
            yield Project(root, registry, names, tiny.digest, password, token, env)
    finally:
        registry.stop()


def _text(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def _assert_no_secret(project: Project, *roots: Path, outputs: str = "") -> None:
    for secret in (project.password, project.token):
        assert secret not in outputs
        for root in roots:
            files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
            for path in files:
                assert secret.encode() not in path.read_bytes(), path


def test_lock_fetch_doctor_bundle_and_an_offline_fetch_through_the_tasks(project: Project, tmp_path: Path) -> None:
    lock_before = (PROJECT_ROOT / "appliance" / "data" / "versions.lock.yaml").read_bytes()
    outputs = ""

    locked = project.invoke("lock", "--images")
    outputs += _text(locked)
    assert locked.returncode == 0, _text(locked)
    assert f"pinned {len(project.names)} image digests for linux/amd64" in _text(locked)
    pins = yaml.safe_load(project.lock.read_text())["images"]["2.4.0"]
    assert pins == {name: project.tiny for name in project.names}
    assert (PROJECT_ROOT / "appliance" / "data" / "versions.lock.yaml").read_bytes() == lock_before

    start = project.registry.log_size()
    fetched = project.invoke("fetch")
    outputs += _text(fetched)
    assert fetched.returncode == 0, _text(fetched)
    count = len(project.names)
    assert f"images: {count} in the cache ({count} fetched" in _text(fetched), _text(fetched)
    served = project.registry.blob_downloads(start)
    # One stand-in under every name: each layer crossed the network once, whatever the number of names. The
    # config blob (a few hundred bytes) is read once per image: skopeo always reads an image's config to copy
    # it (containers/image v5 copy/single.go, copyConfig: no reuse check for configs).
    layers = json.loads(project.registry.blob_file(project.tiny).read_bytes())["layers"]
    config = json.loads(project.registry.blob_file(project.tiny).read_bytes())["config"]["digest"]
    assert sorted(d for d in served if d != config) == sorted(layer["digest"] for layer in layers), served
    assert served.count(config) <= count
    cache = project.root.parent / "cache"
    build = project.root.parent / "build"
    images_txt = (build / "manifests" / "images.txt").read_text()
    assert images_txt == "".join(f"{name} {project.tiny}\n" for name in sorted(project.names))

    start = project.registry.log_size()
    again = project.invoke("fetch")
    outputs += _text(again)
    assert again.returncode == 0, _text(again)
    assert f"images: {count} in the cache (0 fetched" in _text(again)
    assert project.registry_requests(start) == []  # not one request: no skopeo was started

    doctor = project.invoke("doctor")
    outputs += _text(doctor)
    assert f"all {count} images of the set cached by digest" in _text(doctor), _text(doctor)

    bundle = tmp_path / "cache.bundle"
    bundled = project.invoke("fetch", "--bundle", str(bundle))
    outputs += _text(bundled)
    assert bundled.returncode == 0 and bundle.is_file(), _text(bundled)

    # The host without internet: another cache and build folder, and no network at all (unshare --net).
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("cutting the network needs root and unshare(1)")
    offline = ["--set", f"artifacts.cache_dir={tmp_path / 'offline-cache'}",
               "--set", f"output.build_dir={tmp_path / 'offline-build'}"]
    start = project.registry.log_size()
    carried = project.invoke("fetch", "--from-bundle", str(bundle), *offline, net=False)
    outputs += _text(carried)
    assert carried.returncode == 0, _text(carried)
    assert f"images: {count} in the cache (0 fetched" in _text(carried), _text(carried)
    doctor = project.invoke("doctor", *offline, net=False)
    outputs += _text(doctor)
    assert f"all {count} images of the set cached by digest" in _text(doctor), _text(doctor)
    assert project.registry_requests(start) == []

    _assert_no_secret(project, cache, build, project.lock, bundle, tmp_path / "offline-cache",
                      tmp_path / "offline-build", outputs=outputs)


def test_a_fetch_without_credentials_fails_naming_the_image_and_no_traceback(project: Project) -> None:
    env = {k: v for k, v in project.env.items() if k != "REGISTRY_AUTH_FILE"}
    proc = subprocess.run([sys.executable, "-m", "invoke", "lock", "--images"], cwd=project.root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "resolving docker.io/" in _text(proc) and "Traceback" not in _text(proc)
