"""The artifact cache against a real HTTP server on loopback, laid out like the publishers.

The server (``http.server`` in a thread) serves a k3s release folder with its
``sha256sum-amd64.txt`` and a Helm chart repository with ``index.yaml``, honours ``Range``,
counts requests, and can be told to fail a path, cut a response short, or omit
``Content-Length``. The disk-full cases write into a 1 MiB tmpfs the test mounts (we run as
root in CI; elsewhere those two tests skip and say why).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from appliance.artifacts import LOCK_FILE, fetch_artifacts, planned_artifacts, read_lock
from appliance.config import ApplianceConfig, load_config
from appliance.errors import ArtifactError
from appliance.guest import NEEDS
from appliance.needs import guest_uploads
from appliance.run import run

K3S_VERSION = "v1.34.3+k3s1"
CHART_VERSION = "2.4.0"
K3S_DIR = f"/k3s-io/k3s/releases/download/{K3S_VERSION}"
BINARY = os.urandom(300_000)
BUNDLE = os.urandom(2_200_000)
CHART = os.urandom(150_000)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Publisher:
    """What the fake publisher serves and what it was asked."""

    root: Path
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)  # path -> HTTP status
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before hanging up
    no_length: set[str] = field(default_factory=set)
    base: str = ""

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]


def _handler(pub: Publisher) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            pub.requests.append((path, self.headers.get("Range")))
            if path in pub.fail:
                self.send_error(pub.fail[path], "injected failure")
                return
            file = pub.root / path.lstrip("/")
            if not file.is_file():
                self.send_error(404)
                return
            data = file.read_bytes()
            start, status = 0, 200
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            body = data[start:]
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            if path in pub.no_length:
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if path in pub.cut_after:
                self.wfile.write(body[: pub.cut_after.pop(path)])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@contextmanager
def serving(pub: Publisher, prefix: str = "") -> Iterator[Publisher]:
    """``pub`` behind a loopback HTTP server for the block; ``pub.base`` is its URL plus ``prefix``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(pub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    pub.base = f"http://127.0.0.1:{server.server_address[1]}{prefix}"
    try:
        yield pub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def publisher(tmp_path: Path) -> Iterator[Publisher]:
    root = tmp_path / "www"
    release = root / K3S_DIR.lstrip("/")
    release.mkdir(parents=True)
    (release / "k3s").write_bytes(BINARY)
    (release / "k3s-airgap-images-amd64.tar.zst").write_bytes(BUNDLE)
    (release / "sha256sum-amd64.txt").write_text(
        f"{sha(BINARY)}  k3s\n{sha(BUNDLE)}  k3s-airgap-images-amd64.tar.zst\n{'0' * 64}  k3s-arm64\n"
    )
    repo = root / "csghub"
    repo.mkdir()
    (repo / f"csghub-{CHART_VERSION}.tgz").write_bytes(CHART)
    (repo / "index.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "entries": {
                    "csghub": [
                        {"name": "csghub", "version": "2.3.2", "digest": "1" * 64, "urls": ["x.tgz"]},
                        {
                            "name": "csghub",
                            "version": CHART_VERSION,
                            "digest": sha(CHART),
                            "urls": [f"csghub-{CHART_VERSION}.tgz"],
                        },
                    ]
                },
            }
        )
    )
    with serving(Publisher(root)) as pub:
        yield pub


@pytest.fixture
def lock(tmp_path: Path) -> Path:
    path = tmp_path / "versions.lock.yaml"
    shutil.copyfile(LOCK_FILE, path)
    return path


def config(pub: Publisher, cache: Path, *extra: str) -> ApplianceConfig:
    return load_config(
        None,
        [
            f"artifacts.k3s_mirror={pub.base}/k3s-io/k3s/releases/download",
            f"artifacts.chart_repo={pub.base}/csghub",
            f"artifacts.cache_dir={cache}",
            *extra,
        ],
        cwd=cache.parent,
    )


def test_fresh_download_verifies_against_publisher_checksums(publisher: Publisher, tmp_path: Path,
                                                             lock: Path) -> None:
    cfg = config(publisher, tmp_path / "cache")
    results = fetch_artifacts(cfg, lock_path=lock)
    by_name = {r.artifact.name: r for r in results}
    assert by_name["k3s"].artifact.cache_path.read_bytes() == BINARY
    assert by_name["k3s-airgap-images-amd64.tar.zst"].sha256 == sha(BUNDLE)
    assert by_name[f"csghub-{CHART_VERSION}.tgz"].sha256 == sha(CHART)
    assert by_name["k3s"].source == "publisher's sha256sum-amd64.txt"
    assert "index.yaml" in by_name[f"csghub-{CHART_VERSION}.tgz"].source
    assert all(r.downloaded for r in results)
    # The '+' of the k3s tag travels as %2B, as GitHub needs.
    assert f"{K3S_DIR}/k3s" in publisher.paths()
    assert not list((tmp_path / "cache").rglob("*.part"))
    # The lock was not touched without --update-lock.
    assert read_lock(lock)["k3s"][K3S_VERSION]["k3s"] is None


def test_cache_hit_makes_no_request(publisher: Publisher, tmp_path: Path, lock: Path) -> None:
    cfg = config(publisher, tmp_path / "cache")
    fetch_artifacts(cfg, lock_path=lock)
    count = len(publisher.requests)
    again = fetch_artifacts(cfg, lock_path=lock)
    assert len(publisher.requests) == count
    assert not any(r.downloaded for r in again)


def test_corrupted_cache_file_is_downloaded_again(publisher: Publisher, tmp_path: Path, lock: Path) -> None:
    cfg = config(publisher, tmp_path / "cache")
    fetch_artifacts(cfg, lock_path=lock)
    chart = next(a for a in planned_artifacts(cfg) if a.group == "csghub_chart")
    chart.cache_path.write_bytes(b"tampered")
    results = fetch_artifacts(cfg, lock_path=lock)
    assert chart.cache_path.read_bytes() == CHART
    assert [r.artifact.name for r in results if r.downloaded] == [chart.name]


def test_interrupted_download_resumes_with_range(publisher: Publisher, tmp_path: Path, lock: Path) -> None:
    cfg = config(publisher, tmp_path / "cache")
    bundle_path = f"{K3S_DIR}/k3s-airgap-images-amd64.tar.zst"
    publisher.cut_after[bundle_path] = 1_000_000
    with pytest.raises(ArtifactError, match="interrupted") as err:
        fetch_artifacts(cfg, lock_path=lock)
    assert "resumes" in str(err.value)
    bundle = next(a for a in planned_artifacts(cfg) if a.name.endswith(".zst"))
    assert bundle.part_path.stat().st_size == 1_000_000
    assert not bundle.cache_path.exists()

    fetch_artifacts(cfg, lock_path=lock)
    ranges = [rng for path, rng in publisher.requests if path == bundle_path]
    assert ranges == [None, "bytes=1000000-"]
    assert bundle.cache_path.read_bytes() == BUNDLE
    assert not bundle.part_path.exists()


def test_digest_mismatch_against_lock_deletes_download(publisher: Publisher, tmp_path: Path,
                                                       lock: Path) -> None:
    data = read_lock(lock)
    data["k3s"][K3S_VERSION]["k3s"] = "ab" * 32
    lock.write_text(yaml.safe_dump(data))
    cfg = config(publisher, tmp_path / "cache")
    with pytest.raises(ArtifactError) as err:
        fetch_artifacts(cfg, lock_path=lock)
    msg = str(err.value)
    assert "sha256 mismatch for k3s " + K3S_VERSION in msg
    assert "expected " + "ab" * 32 + " (version lock)" in msg
    assert "actual   " + sha(BINARY) in msg
    binary = next(a for a in planned_artifacts(cfg) if a.name == "k3s")
    assert not binary.part_path.exists() and not binary.cache_path.exists()
    # With a pinned digest the publisher's checksum file is not consulted.
    assert f"{K3S_DIR}/sha256sum-amd64.txt" not in publisher.paths()


def test_digest_mismatch_against_publisher_checksum(publisher: Publisher, tmp_path: Path, lock: Path) -> None:
    (publisher.root / K3S_DIR.lstrip("/") / "k3s").write_bytes(b"not the released binary")
    with pytest.raises(ArtifactError, match=f"expected {sha(BINARY)} \\(publisher's sha256sum-amd64.txt\\)"):
        fetch_artifacts(config(publisher, tmp_path / "cache"), lock_path=lock)


def test_server_error_names_status_and_url(publisher: Publisher, tmp_path: Path, lock: Path) -> None:
    publisher.fail[f"/csghub/csghub-{CHART_VERSION}.tgz"] = 503
    with pytest.raises(ArtifactError) as err:
        fetch_artifacts(config(publisher, tmp_path / "cache"), lock_path=lock)
    msg = str(err.value)
    assert "503" in msg and f"{publisher.base}/csghub/csghub-{CHART_VERSION}.tgz" in msg
    assert "artifacts.chart_repo" in msg


def test_unknown_chart_version_in_index(publisher: Publisher, tmp_path: Path, lock: Path) -> None:
    cfg = config(publisher, tmp_path / "cache", "csghub.chart_version=9.9.9")
    with pytest.raises(ArtifactError, match=r"no csghub 9\.9\.9"):
        fetch_artifacts(cfg, lock_path=lock)


def test_unreachable_host_names_the_mirror_setting(tmp_path: Path, lock: Path) -> None:
    closed = Publisher(tmp_path, base="http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(ArtifactError) as err:
        fetch_artifacts(config(closed, tmp_path / "cache"), lock_path=lock)
    msg = str(err.value)
    assert "cannot reach 127.0.0.1:9" in msg and "artifacts.k3s_mirror" in msg


def test_update_lock_pins_digests_and_keeps_header(publisher: Publisher, tmp_path: Path, lock: Path) -> None:
    cfg = config(publisher, tmp_path / "cache")
    fetch_artifacts(cfg, update_lock=True, lock_path=lock)
    pinned = read_lock(lock)
    assert pinned["k3s"][K3S_VERSION] == {"k3s": sha(BINARY), "k3s-airgap-images-amd64.tar.zst": sha(BUNDLE)}
    assert pinned["csghub_chart"][CHART_VERSION] == {f"csghub-{CHART_VERSION}.tgz": sha(CHART)}
    assert lock.read_text().startswith("# Version lock")
    # Pinned and cached: verified against the lock, no request at all.
    count = len(publisher.requests)
    results = fetch_artifacts(cfg, lock_path=lock)
    assert len(publisher.requests) == count
    assert {r.source for r in results} == {"version lock"}


def test_guest_uploads_name_the_cached_files_and_manifests(tmp_path: Path) -> None:
    cfg = load_config(None, ["artifacts.cache_dir=/var/cache/x", f"output.build_dir={tmp_path / 'build'}"])
    listed = guest_uploads(cfg)
    uploads = {up.local: up.guest for up in listed}
    # Each file serves the need a step declares (`# appliance: needs=`), which decides who receives it.
    by_need = {up.need: sorted(Path(up.guest).name for up in listed if up.need == need) for need in NEEDS
               for up in listed if up.need == need}
    assert by_need == {"k3s-binary": ["k3s"], "k3s-images": ["k3s-airgap-images-amd64.tar.zst"],
                       "chart": ["csghub-2.4.0.tgz"], "image-set": ["images.txt"],
                       "manifests": ["coredns-custom.yaml", "csghub-redis-policy.yaml", "csghub.yaml"]}
    assert uploads[Path(f"/var/cache/x/k3s/{K3S_VERSION}/k3s")] == "/var/cache/csghub-appliance/artifacts/k3s"
    assert uploads[Path("/var/cache/x/charts/csghub-2.4.0.tgz")].endswith("/artifacts/csghub-2.4.0.tgz")
    manifest = tmp_path / "build" / "manifests" / "csghub.yaml"
    assert uploads[manifest] == "/var/cache/csghub-appliance/manifests/csghub.yaml"
    assert yaml.safe_load(manifest.read_text())["kind"] == "HelmChart"
    # The image set (appliance/images.py writes it before provisioning) travels with the manifests.
    images = tmp_path / "build" / "manifests" / "images.txt"
    assert uploads[images] == "/var/cache/csghub-appliance/manifests/images.txt"
    # Only CSGHub's own pods reach its password-less Redis (issue 19): the policy travels too.
    policy = tmp_path / "build" / "manifests" / "csghub-redis-policy.yaml"
    assert uploads[policy] == "/var/cache/csghub-appliance/manifests/csghub-redis-policy.yaml"
    assert yaml.safe_load(policy.read_text())["kind"] == "NetworkPolicy"
    assert len(uploads) == 7


def test_default_lock_names_the_default_versions() -> None:
    cfg = load_config(None, [])
    data = read_lock()
    assert cfg.k3s.version in data["k3s"]
    assert cfg.csghub.chart_version in data["csghub_chart"]


# -- disk full -------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    if not shutil.which("mount") or os.geteuid() != 0:
        pytest.skip("disk-full simulation mounts a 1 MiB tmpfs, which needs root")
    done = run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=False)
    if not done.ok:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        run(["umount", str(mount)], check=False)


def test_not_enough_space_is_refused_before_writing(publisher: Publisher, tiny_disk: Path,
                                                    lock: Path) -> None:
    with pytest.raises(ArtifactError) as err:
        fetch_artifacts(config(publisher, tiny_disk / "cache"), lock_path=lock)
    msg = str(err.value)
    assert "not enough disk space for k3s-airgap-images-amd64.tar.zst" in msg
    assert "2.1 MiB more" in msg and "free" in msg and "artifacts.cache_dir" in msg


def test_disk_full_while_writing(publisher: Publisher, tiny_disk: Path, lock: Path) -> None:
    # Without Content-Length the size is unknown up front: the write itself hits ENOSPC.
    publisher.no_length.add(f"{K3S_DIR}/k3s-airgap-images-amd64.tar.zst")
    with pytest.raises(ArtifactError) as err:
        fetch_artifacts(config(publisher, tiny_disk / "cache"), lock_path=lock)
    msg = str(err.value)
    assert "disk full while downloading k3s-airgap-images-amd64.tar.zst" in msg
    assert "free on that file system" in msg
    assert "resumes" in msg


def test_file_placed_by_hand_is_verified_not_downloaded(publisher: Publisher, tmp_path: Path, lock: Path) -> None:
    cfg = config(publisher, tmp_path / "cache")
    for artifact in planned_artifacts(cfg):
        source = publisher.root / urllib.parse.unquote(urllib.parse.urlsplit(artifact.url).path).lstrip("/")
        artifact.cache_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, artifact.cache_path)
    results = fetch_artifacts(cfg, lock_path=lock)
    assert not any(r.downloaded for r in results)
    # Only the publisher's checksum files were read, no artifact.
    assert sorted(set(publisher.paths())) == ["/csghub/index.yaml", f"{K3S_DIR}/sha256sum-amd64.txt"]


def test_skipped_steps_need_no_artifacts(tmp_path: Path, lock: Path) -> None:
    cfg = load_config(None, ["provision.skip=[k3s, csghub]", f"output.build_dir={tmp_path / 'build'}",
                             "artifacts.k3s_mirror=http://127.0.0.1:9", f"artifacts.cache_dir={tmp_path}"])
    assert guest_uploads(cfg) == []
    assert fetch_artifacts(cfg, lock_path=lock, needed_only=True) == []  # no request: port 9 is closed
    only_k3s = load_config(None, ["provision.skip=[csghub]", f"output.build_dir={tmp_path / 'build'}"])
    assert [Path(up.guest).name for up in guest_uploads(only_k3s)] == ["k3s", "k3s-airgap-images-amd64.tar.zst"]


def test_a_bundle_made_online_fetches_the_artifacts_with_the_network_cut(publisher: Publisher, tmp_path: Path,
                                                                         lock: Path) -> None:
    """`invoke fetch --bundle` on a host with the publisher; `--from-bundle` then the same fetch in a process whose
    network namespace is cut (unshare --net): every artifact verified from the cache, no request possible."""
    import json
    import subprocess
    import sys

    from appliance.bundle import write_bundle

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("cutting the network needs root and unshare(1)")
    online = config(publisher, tmp_path / "online")
    fetched = fetch_artifacts(online, lock_path=lock)
    bundle = tmp_path / "cache.bundle"
    write_bundle(online, bundle)
    requests = len(publisher.requests)
    script = (
        "import json\n"
        "from pathlib import Path\n"
        "from appliance.artifacts import fetch_artifacts\n"
        "from appliance.bundle import read_bundle\n"
        "from appliance.config import load_config\n"
        f"cfg = load_config(None, ['artifacts.k3s_mirror={publisher.base}/k3s-io/k3s/releases/download',\n"
        f"    'artifacts.chart_repo={publisher.base}/csghub', 'artifacts.cache_dir={tmp_path / 'offline'}'],\n"
        f"    cwd=Path('{tmp_path}'))\n"
        f"read_bundle(cfg, Path('{bundle}'))\n"
        f"results = fetch_artifacts(cfg, lock_path=Path('{lock}'))\n"
        "print(json.dumps([[r.artifact.name, r.sha256, r.downloaded] for r in results]))\n"
    )
    proc = subprocess.run(["unshare", "--net", sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 0, proc.stderr
    offline = json.loads(proc.stdout.splitlines()[-1])
    assert offline == [[r.artifact.name, r.sha256, False] for r in fetched]
    assert len(publisher.requests) == requests
