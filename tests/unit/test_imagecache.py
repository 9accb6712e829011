"""The image cache against a real registry (Debian's docker-registry, TLS from a test CA) and real containerd.

Images are made here, tiny: an OCI image and a Docker v2 one sharing a base layer, and a multi-arch index.
Every name is a ``docker.io/...`` name fetched through an ``images.mirrors`` rewrite to the loopback registry,
so the names stay the chart's while the bytes come from the mirror.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.artifacts import LOCK_FILE, read_lock
from appliance.config import ApplianceConfig, load_config
from appliance.imagecache import (
    ImageFetchError,
    fetch_images,
    image_store,
    lock_images,
    missing_images,
    report_images,
    write_archive,
)
from appliance.images import helm_template, image_set, locked_image_digests
from appliance.values import generate_values
from tests.chart import CHART_DIR
from tests.containerd import Containerd
from tests.registry import Registry, image_blobs, multi_arch_blobs, registry_missing, write_layout

SHARED = {"base/os-release": b"ID=tiny\n"}
PORTAL = "docker.io/opencsghq/portal:v1"  # OCI manifest, layers: shared + own
REDIS = "docker.io/library/redis:7"  # Docker v2 schema 2, layers: shared + own
TOOL = "docker.io/multi/tool:1"  # multi-arch index (amd64 + arm64)


def by_index(facts: dict[str, Any]) -> str:
    """The multi-arch image named by its index digest, as the chart names Knative's images."""
    return f"docker.io/multi/tool@{facts['index']}"


def _skip_unless_tools() -> None:
    why = registry_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


def _start(base: Path, user: str | None = None, password: str | None = None) -> Registry:
    _skip_unless_tools()
    base.mkdir(parents=True, exist_ok=True)
    registry = Registry(base, user, password)
    registry.start()
    return registry


def _fill(registry: Registry, work: Path) -> dict[str, Any]:
    """Push the three test images; returns facts the tests check against."""
    portal, portal_blobs = image_blobs([SHARED, {"portal/index.html": b"<h1>portal</h1>\n"}])
    redis, redis_blobs = image_blobs([SHARED, {"usr/bin/redis": b"redis\n"}])
    index, index_blobs, amd64 = multi_arch_blobs([{"tool": b"tool\n"}])
    registry.push_layout(write_layout(work / "portal", portal, portal_blobs), "opencsghq/portal:v1")
    registry.push_layout(write_layout(work / "redis", redis, redis_blobs), "library/redis:7", docker_v2=True)
    registry.push_layout(write_layout(work / "tool", index, index_blobs), "multi/tool:1", all_images=True)
    return {"portal": portal.digest, "index": index.digest, "amd64": amd64.digest, "shared_layer": portal_blobs[2]}


def _cfg(tmp: Path, registry: Registry, **extra: str) -> ApplianceConfig:
    sets = [f"artifacts.cache_dir={tmp / 'cache'}", f"images.ca_dir={registry.ca_dir}",
            f'images.mirrors={{"docker.io": "{registry.host}"}}', f"output.build_dir={tmp / 'build'}"]
    return load_config(None, sets + [f"{k}={v}" for k, v in extra.items()], "libvirt", cwd=tmp)


def _lock(tmp: Path) -> Path:
    path = tmp / "versions.lock.yaml"
    shutil.copy(LOCK_FILE, path)
    return path


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, dict[str, Any]]]:
    base = tmp_path_factory.mktemp("registry")
    reg = _start(base / "reg")
    try:
        yield reg, _fill(reg, base / "images")
    finally:
        reg.stop()


def _pins(cfg: ApplianceConfig, lock_path: Path, *extra: str) -> list[tuple[str, str | None]]:
    pins = locked_image_digests(read_lock(lock_path), cfg.csghub.chart_version)
    return [(name, pins.get(name)) for name in (PORTAL, REDIS, TOOL, *extra)]


def test_lock_pins_fetch_shares_layers_and_a_second_fetch_transfers_nothing(
        tmp_path: Path, registry: tuple[Registry, dict[str, Any]]) -> None:
    reg, facts = registry
    cfg = _cfg(tmp_path, reg)
    lock_path = _lock(tmp_path)
    lock_images(cfg, [PORTAL, REDIS, TOOL, by_index(facts)], lock_path)
    lock = read_lock(lock_path)
    pinned = _pins(cfg, lock_path, by_index(facts))
    assert dict(pinned)[PORTAL] == facts["portal"]
    assert dict(pinned)[TOOL] == facts["amd64"]  # the index resolved to linux/amd64 ...
    assert lock["image_indexes"][cfg.csghub.chart_version][TOOL] == {"index": facts["index"],
                                                                     "platform": "linux/amd64"}  # ... and recorded
    assert dict(pinned)[by_index(facts)] == facts["index"]  # named by digest: that digest
    assert missing_images(cfg, pinned) == [PORTAL, REDIS, TOOL, by_index(facts)]

    images = fetch_images(cfg, pinned)
    assert [(i.name, i.digest, i.fetched) for i in images] == [(n, d, True) for n, d in pinned]
    store = image_store(cfg)
    index = json.loads((store / "index.json").read_text())
    stored = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in index["manifests"]}
    assert {n: m["digest"] for n, m in stored.items()} == dict(pinned)  # the registry's manifests, as served
    assert stored[REDIS]["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    shared = facts["shared_layer"].digest
    assert (store / "blobs" / "sha256" / shared.split(":")[1]).is_file()
    blob_files = list((store / "blobs" / "sha256").iterdir())
    referenced = set()
    manifests = [m["digest"] for m in index["manifests"]]
    while manifests:
        digest = manifests.pop()
        referenced.add(digest)
        doc = json.loads((store / "blobs" / "sha256" / digest.split(":")[1]).read_bytes())
        if "manifests" in doc:  # the index: only its linux/amd64 manifest is kept
            manifests += [m["digest"] for m in doc["manifests"] if m["platform"]["architecture"] == "amd64"]
        else:
            referenced |= {doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])}
    assert sorted(f.name for f in blob_files) == sorted(d.split(":")[1] for d in referenced)  # each blob once
    assert missing_images(cfg, pinned) == []
    report = report_images(cfg, [{"name": n, "digest": str(d)} for n, d in pinned])
    sizes = {i["name"]: i["size_bytes"] for i in report["images"]}
    assert sizes == {i.name: i.size for i in images} and all(sizes.values())
    assert report["total_bytes"] == sum(sizes.values())
    assert report["distinct_blob_bytes"] == sum(f.stat().st_size for f in blob_files) < report["total_bytes"]

    def no_network(argv: Any) -> bytes:
        raise AssertionError(f"a second fetch ran skopeo {argv}")

    again = fetch_images(cfg, pinned, skopeo=no_network)
    assert [i.fetched for i in again] == [False] * 4


def test_a_registry_serving_other_bytes_is_refused_naming_the_image(tmp_path: Path) -> None:
    reg = _start(tmp_path / "reg")
    try:
        facts = _fill(reg, tmp_path / "images")
        cfg = _cfg(tmp_path, reg)
        lock_path = _lock(tmp_path)
        lock_images(cfg, [PORTAL], lock_path)
        # The registry's stored layer changes under the same digest (same length: only the bytes differ).
        layer = reg.blob_file(facts["shared_layer"].digest)
        layer.write_bytes(bytes(b ^ 0xFF for b in layer.read_bytes()))
        with pytest.raises(ImageFetchError, match=f"fetching {PORTAL}"):
            fetch_images(cfg, _pins(cfg, lock_path)[:1])
        # A manifest that is not the pinned one (the tag was pushed again) is refused before any blob moves.
        other, other_blobs = image_blobs([{"x": b"other\n"}])
        reg.push_layout(write_layout(tmp_path / "other", other, other_blobs), "opencsghq/portal:v1")
        manifest = reg.blob_file(facts["portal"])
        manifest.write_bytes(reg.blob_file(other.digest).read_bytes())
        with pytest.raises(ImageFetchError, match=f"{PORTAL}: the registry served a manifest with digest "
                                                  f"{other.digest} for the pinned {facts['portal']}"):
            fetch_images(cfg, _pins(cfg, lock_path)[:1])
        assert missing_images(cfg, _pins(cfg, lock_path)[:1]) == [PORTAL]
    finally:
        reg.stop()


def test_credentials_come_from_the_auth_file_and_appear_nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    password = "s3cret-" + os.urandom(6).hex()
    reg = _start(tmp_path / "reg", "builder", password)
    try:
        _fill(reg, tmp_path / "images")
        cfg = _cfg(tmp_path, reg)
        lock_path = _lock(tmp_path)
        with pytest.raises(ImageFetchError, match=f"resolving {PORTAL}"):  # no credentials: refused
            lock_images(cfg, [PORTAL], lock_path)
        auth = tmp_path / "home" / "auth.json"
        auth.parent.mkdir()
        import base64

        token = base64.b64encode(f"builder:{password}".encode()).decode()
        auth.write_text(json.dumps({"auths": {reg.host: {"auth": token}}}))
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
        lock_images(cfg, [PORTAL, REDIS], lock_path)
        fetch_images(cfg, _pins(cfg, lock_path)[:2])
        write_archive(image_store(cfg), [(n, d) for n, d in _pins(cfg, lock_path)[:2] if d], tmp_path / "out.tar")
    finally:
        reg.stop()
    out, err = capfd.readouterr()
    for secret in (password, token):
        assert secret not in out + err
        for root in (tmp_path / "cache", tmp_path / "out.tar", lock_path):
            files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
            assert files
            for path in files:
                assert secret.encode() not in path.read_bytes(), path


def _archive_of_a_set(tmp_path: Path, registry: tuple[Registry, dict[str, Any]]
                      ) -> tuple[ApplianceConfig, list[tuple[str, str]], Path]:
    """Lock and fetch four images (one named by its multi-arch index) and write the archive the build uploads."""
    reg, facts = registry
    cfg = _cfg(tmp_path, reg)
    lock_path = _lock(tmp_path)
    lock_images(cfg, [PORTAL, REDIS, TOOL, by_index(facts)], lock_path)
    pinned = [(n, d) for n, d in _pins(cfg, lock_path, by_index(facts)) if d]
    fetch_images(cfg, pinned)
    archive = tmp_path / "images.tar"
    write_archive(image_store(cfg), pinned, archive)
    return cfg, pinned, archive


def test_the_archive_imported_into_containerd_holds_exactly_the_set(
        tmp_path: Path, registry: tuple[Registry, dict[str, Any]], containerd: Containerd) -> None:
    _, pinned, archive = _archive_of_a_set(tmp_path, registry)
    started = time.monotonic()
    # What the csghub step runs (k3s ctr), unpacking.
    containerd.ctr("images", "import", "--platform", "linux/amd64", str(archive))
    took = time.monotonic() - started
    listed = containerd.ctr("images", "ls").stdout.splitlines()[1:]
    got = sorted((line.split()[0], line.split()[2]) for line in listed)
    assert got == sorted(pinned), got
    print(f"import of {len(pinned)} images ({archive.stat().st_size} B) took {took:.2f} s")


@pytest.fixture(scope="module")
def chart_names(helm_bin: Path) -> list[str]:
    cfg = load_config(None, ["provision.skip=[]", "vm.cpus=4", "vm.memory_mb=8192"], "libvirt")
    objects = helm_template(helm_bin, CHART_DIR, generate_values(cfg), k3s_version=cfg.k3s.version)
    return [entry.name for entry in image_set(objects)]


def test_the_real_charts_image_set_goes_through_lock_and_fetch(tmp_path: Path, chart_names: list[str]) -> None:
    """Every name of chart 2.4.0's set through lock -> fetch, each a tiny stand-in pushed under that name.

    Knative's images are named by digest; a stand-in cannot have those digests, so for them the test shows
    that the lock pins the name's own digest and that a registry without those bytes is refused by name.
    """
    reg = _start(tmp_path / "reg")
    try:
        tiny, tiny_blobs = image_blobs([{"stand-in": b"tiny\n"}])
        layout = write_layout(tmp_path / "tiny", tiny, tiny_blobs)
        registries = sorted({name.split("/", 1)[0] for name in chart_names})
        mirrors = {host: f"{reg.host}/{host.replace(':', '-')}" for host in registries}
        by_tag = [name for name in chart_names if "@" not in name]
        by_digest = [name for name in chart_names if "@" in name]
        from concurrent.futures import ThreadPoolExecutor

        def push(name: str) -> None:
            host, path = name.split("/", 1)
            reg.push_layout(layout, f"{mirrors[host].split('/', 1)[1]}/{path}")

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(push, by_tag))
        cfg = load_config(None, [f"artifacts.cache_dir={tmp_path / 'cache'}", f"images.ca_dir={reg.ca_dir}",
                                 f"images.mirrors={json.dumps(mirrors)}"], "libvirt", cwd=tmp_path)
        lock_path = _lock(tmp_path)
        lock_images(cfg, chart_names, lock_path)
        pins = locked_image_digests(read_lock(lock_path), cfg.csghub.chart_version)
        assert sorted(pins) == sorted(chart_names)
        assert all(pins[name] == tiny.digest for name in by_tag)
        assert all(pins[name] == name.split("@", 1)[1] for name in by_digest)
        pinned = [(name, pins[name]) for name in by_tag]
        images = fetch_images(cfg, pinned)
        assert len(images) == len(by_tag) >= 20
        assert missing_images(cfg, [(name, pins.get(name)) for name in chart_names]) == by_digest
        # One tiny layer, one config, one manifest, stored once for all the names.
        assert len(list((image_store(cfg) / "blobs" / "sha256").iterdir())) == 3
        with pytest.raises(ImageFetchError, match=f"fetching {by_digest[0]}"):
            fetch_images(cfg, [(by_digest[0], pins[by_digest[0]])])
    finally:
        reg.stop()


def test_after_a_failed_image_no_queued_image_is_fetched(tmp_path: Path) -> None:
    """Two workers: the first image fails while the second is being fetched (it then fails too); the two
    queued behind them never reach the registry, and the first failure is the one raised."""
    import threading

    cfg = load_config(None, [f"artifacts.cache_dir={tmp_path}"], "libvirt", cwd=tmp_path)
    names = [f"docker.io/q/img{i}:1" for i in range(4)]
    pinned: list[tuple[str, str | None]] = [(n, "sha256:" + f"{i}" * 64) for i, n in enumerate(names)]
    asked: list[str] = []
    second_started, first_failed = threading.Event(), threading.Event()

    def registry_down(argv: list[str]) -> bytes:
        image = argv[-1].split("/q/")[1].split("@")[0]
        asked.append(image)
        if image == "img0":
            second_started.wait(30)  # fails while img1 is being fetched
            first_failed.set()
            raise ImageFetchError("img0: the link dropped (test)")
        second_started.set()
        first_failed.wait(30)
        raise ImageFetchError(f"{image}: the link dropped too (test)")

    with pytest.raises(ImageFetchError, match="img0: the link dropped"):
        fetch_images(cfg, pinned, skopeo=registry_down, workers=2)
    assert sorted(asked) == ["img0", "img1"]


def test_an_unpinned_set_is_refused_before_any_fetch(tmp_path: Path) -> None:
    cfg = load_config(None, [f"artifacts.cache_dir={tmp_path}"], "libvirt", cwd=tmp_path)
    with pytest.raises(ImageFetchError, match=r"1 image.*no digest in the version lock: docker\.io/library/redis:7"):
        fetch_images(cfg, [(REDIS, None)], skopeo=lambda argv: subprocess.check_output(["false"]))


def test_a_bundle_carries_the_cache_to_a_host_without_network(
        tmp_path: Path, registry: tuple[Registry, dict[str, Any]]) -> None:
    """fetch -> --bundle on the "online" host; --from-bundle in a process whose network namespace has no
    interface but loopback-down (unshare -n): the set is cached, a fetch transfers nothing; a damaged
    bundle is refused naming the file, and nothing of it reaches the cache."""
    from appliance.bundle import BundleError, read_bundle, write_bundle

    reg, facts = registry
    online = _cfg(tmp_path / "online", reg)
    lock_path = _lock(tmp_path)
    names = [PORTAL, REDIS, by_index(facts)]
    lock_images(online, names, lock_path)
    pinned = _pins(online, lock_path, by_index(facts))
    pinned = [p for p in pinned if p[0] in names]
    fetch_images(online, pinned)
    bundle = tmp_path / "cache.bundle"
    write_bundle(online, bundle)

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("cutting the network needs root and unshare(1)")
    offline_dir = tmp_path / "offline"
    script = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from appliance.config import load_config\n"
        "from appliance.bundle import read_bundle\n"
        "from appliance.imagecache import fetch_images, missing_images\n"
        f"cfg = load_config(None, ['artifacts.cache_dir={offline_dir / 'cache'}'], 'libvirt', cwd=Path('{tmp_path}'))\n"
        f"read_bundle(cfg, Path('{bundle}'))\n"
        f"pinned = {pinned!r}\n"
        "assert missing_images(cfg, pinned) == []\n"
        "def no_network(argv): raise SystemExit(f'skopeo {argv} ran offline')\n"
        "print(json.dumps([i.fetched for i in fetch_images(cfg, pinned, skopeo=no_network)]))\n"
    )
    proc = subprocess.run(["unshare", "--net", sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == [False] * len(pinned)

    # A damaged copy: one blob's bytes changed inside the bundle.
    import tarfile

    damaged = tmp_path / "damaged.bundle"
    with tarfile.open(bundle) as src, tarfile.open(damaged, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src:
            data = src.extractfile(member)
            content = data.read() if data else None
            if content is not None and member.name.endswith(facts["shared_layer"].digest.split(":")[1]):
                content = bytes([content[0] ^ 1]) + content[1:]
            dst.addfile(member, io.BytesIO(content) if content is not None else None)
    fresh = load_config(None, [f"artifacts.cache_dir={tmp_path / 'fresh'}"], "libvirt", cwd=tmp_path)
    with pytest.raises(BundleError, match=f"{facts['shared_layer'].digest.split(':')[1]} does not match its sha256"):
        read_bundle(fresh, damaged)
    assert not (tmp_path / "fresh" / "images").exists()


def test_doctor_says_what_is_cached_and_what_is_missing(
        tmp_path: Path, registry: tuple[Registry, dict[str, Any]]) -> None:
    from appliance.doctor import check_image_cache
    from appliance.images import ImageEntry, write_image_list

    reg, _ = registry
    cfg = _cfg(tmp_path, reg, **{"provision.skip": "[]"})
    assert [(c.verdict, c.found) for c in check_image_cache(cfg)] == [("warn", "image set not computed yet")]
    lock_path = _lock(tmp_path)
    lock_images(cfg, [PORTAL, REDIS], lock_path)
    pins = {n: str(d) for n, d in _pins(cfg, lock_path)[:2]}
    write_image_list([ImageEntry(n, (n,)) for n in (PORTAL, REDIS, TOOL)], cfg.build_dir / "manifests", pins)
    fetch_images(cfg, [(PORTAL, pins[PORTAL])])
    (check,) = check_image_cache(cfg)
    assert (check.verdict, check.found) == ("warn", f"1 of 3 cached; missing: {REDIS}, {TOOL}")
    assert check.fix == "invoke lock --images, then invoke fetch"  # TOOL has no pin
    write_image_list([ImageEntry(PORTAL, (PORTAL,))], cfg.build_dir / "manifests", pins)
    (check,) = check_image_cache(cfg)
    assert (check.verdict, check.found) == ("ok", "all 1 images of the set cached by digest")


def test_an_interrupted_fetch_resumes_at_the_missing_blobs(
        tmp_path: Path, registry: tuple[Registry, dict[str, Any]]) -> None:
    """The registry's access log shows what each fetch downloaded: after an interruption that left the shared base
    layer in the cache but not the image's own layer, only the own layer (and nothing twice) is downloaded."""
    reg, facts = registry
    cfg = _cfg(tmp_path, reg)
    lock_path = _lock(tmp_path)
    lock_images(cfg, [PORTAL, REDIS], lock_path)
    portal_digest, redis_digest = (d for _, d in _pins(cfg, lock_path)[:2])
    assert portal_digest and redis_digest
    start = reg.log_size()
    fetch_images(cfg, [(PORTAL, portal_digest)])
    shared = facts["shared_layer"].digest
    first = reg.blob_downloads(start)
    assert shared in first and len(first) == len(set(first))
    # REDIS shares the base layer: "interrupted" = its copy never finished, the base layer is cached already.
    start = reg.log_size()
    fetch_images(cfg, [(PORTAL, portal_digest), (REDIS, redis_digest)])
    second = reg.blob_downloads(start)
    redis_manifest = json.loads((image_store(cfg) / "blobs" / "sha256" / redis_digest.split(":")[1]).read_bytes())
    own = [layer["digest"] for layer in redis_manifest["layers"] if layer["digest"] != shared]
    assert shared not in second and set(own) <= set(second), second
    # An own layer removed from the cache (a blob that never completed) is the only layer fetched again.
    (image_store(cfg) / "blobs" / "sha256" / own[0].split(":")[1]).unlink()
    start = reg.log_size()
    again = fetch_images(cfg, [(PORTAL, portal_digest), (REDIS, redis_digest)])
    assert [i.fetched for i in again] == [False, True]
    assert [d for d in reg.blob_downloads(start) if d != redis_manifest["config"]["digest"]] == [own[0]]


@pytest.mark.parametrize("evil", ["cache/../escaped", "/etc/escaped", "cache/link", "cache/unlisted"])
def test_a_hostile_bundle_is_refused_and_nothing_lands(tmp_path: Path, evil: str) -> None:
    import tarfile

    from appliance.bundle import BundleError, read_bundle

    listed = {"format": 1, "files": [{"path": "escaped" if "escaped" in evil else "ok", "size": 1,
                                      "sha256": "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"}]}
    bundle = tmp_path / "evil.bundle"
    with tarfile.open(bundle, "w") as tar:
        raw = json.dumps(listed).encode()
        info = tarfile.TarInfo("bundle.json")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
        info = tarfile.TarInfo(evil)
        if evil == "cache/link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 1
            tar.addfile(info, io.BytesIO(b"a"))
    cfg = load_config(None, [f"artifacts.cache_dir={tmp_path / 'cache'}"], "libvirt", cwd=tmp_path)
    with pytest.raises(BundleError, match=r"refusing member|is not listed|is not a bundle index"):
        read_bundle(cfg, bundle)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "cache" / "link").exists()
    assert not list((tmp_path / "cache").rglob("*")) if (tmp_path / "cache").exists() else True


def test_the_build_uploads_the_archive_only_when_the_whole_set_is_cached(
        tmp_path: Path, registry: tuple[Registry, dict[str, Any]]) -> None:
    from appliance.imagecache import GUEST_IMAGE_ARCHIVE, image_uploads
    from appliance.images import ImageEntry, write_image_list

    reg, _ = registry
    cfg = _cfg(tmp_path, reg)
    lock_path = _lock(tmp_path)
    lock_images(cfg, [PORTAL, REDIS], lock_path)
    pins = {n: str(d) for n, d in _pins(cfg, lock_path)[:2]}
    write_image_list([ImageEntry(n, (n,)) for n in pins], cfg.build_dir / "manifests", pins)
    fetch_images(cfg, [(PORTAL, pins[PORTAL])])
    assert image_uploads(cfg) == []  # REDIS is not cached: the csghub step will name it
    fetch_images(cfg, list(pins.items()))
    ((archive, guest),) = image_uploads(cfg)
    assert guest == GUEST_IMAGE_ARCHIVE
    import tarfile

    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        index = json.load(member)
    named = {(m["annotations"]["io.containerd.image.name"], m["digest"]) for m in index["manifests"]}
    assert named == set(pins.items())
    written = archive.stat().st_mtime_ns
    assert image_uploads(cfg) == [(archive, guest)] and archive.stat().st_mtime_ns == written  # unchanged set: kept


def test_a_build_resolves_tags_the_lock_does_not_pin_and_keeps_them_on_resume(
        tmp_path: Path, registry: tuple[Registry, dict[str, Any]]) -> None:
    """The repository's lock pins no image yet: a build must still fetch by digest (not stop, not pull
    in the guest), record what it resolved outside the lock, and keep those digests when resumed."""
    from appliance.imagecache import fetch_image_set
    from appliance.images import build_resolved_digests

    reg, facts = registry
    cfg = _cfg(tmp_path, reg)
    listed = cfg.build_dir / "manifests" / "images.txt"
    listed.parent.mkdir(parents=True)
    listed.write_text(f"{PORTAL}\n{TOOL}\n")
    lock_before = LOCK_FILE.read_bytes()

    images = fetch_image_set(cfg, required=True)
    assert {(i.name, i.digest) for i in images} == {(PORTAL, facts["portal"]), (TOOL, facts["amd64"])}
    assert listed.read_text() == f"{PORTAL} {facts['portal']}\n{TOOL} {facts['amd64']}\n"
    assert build_resolved_digests(cfg) == {PORTAL: facts["portal"], TOOL: facts["amd64"]}
    assert LOCK_FILE.read_bytes() == lock_before  # recorded for this build, never pinned behind the user's back

    # Resumed: the tag moved meanwhile, but this build keeps the digest it started with.
    other, other_blobs = image_blobs([{"portal/index.html": b"<h1>re-pushed</h1>\n"}])
    reg.push_layout(write_layout(tmp_path / "moved", other, other_blobs), "opencsghq/portal:v1")
    try:
        from appliance.imagecache import resolve_unpinned
        from appliance.images import ImageEntry, image_list_text

        # As write_build_image_list writes the set again on resume: the lock's pins, then this build's.
        pins = build_resolved_digests(cfg)
        listed.write_text(image_list_text([ImageEntry(PORTAL, (PORTAL,)), ImageEntry(TOOL, (TOOL,))], pins))
        assert resolve_unpinned(cfg) == 0
        assert {(i.name, i.digest, i.fetched) for i in fetch_image_set(cfg, required=True)} == {
            (PORTAL, facts["portal"], False), (TOOL, facts["amd64"], False)}
    finally:  # the module's registry serves the original again for the other tests
        portal, portal_blobs = image_blobs([SHARED, {"portal/index.html": b"<h1>portal</h1>\n"}])
        reg.push_layout(write_layout(tmp_path / "back", portal, portal_blobs), "opencsghq/portal:v1")


@pytest.mark.parametrize("content", ["[]", "{\"2.4.0\": {\"x\": \"sha256:12\"}}", "{\"2.4.0\": {\"a b\": 1}}", "{"])
def test_a_damaged_build_digest_record_is_refused_naming_the_file(tmp_path: Path, content: str) -> None:
    from appliance.images import ImageError, build_digests_path, build_resolved_digests

    cfg = load_config(None, [f"output.build_dir={tmp_path / 'build'}"], "libvirt", cwd=tmp_path)
    path = build_digests_path(cfg)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(ImageError, match=r"image-digests\.json"):
        build_resolved_digests(cfg)


def test_a_parallel_fetch_stores_every_image_and_downloads_each_layer_once_and_resumes(
        tmp_path: Path, registry: tuple[Registry, dict[str, Any]]) -> None:
    """Six images sharing a base layer, fetched four at a time into the one store: every image listed with
    its blobs verified, the shared layer and each own layer downloaded once (the registry's access log),
    the config blobs once per image at most; an image whose copy fails leaves the others cached, and the
    next fetch downloads only what that image still lacks."""
    from appliance.imagecache import _skopeo, staging_dir

    reg, facts = registry
    names = [f"docker.io/par/img{i}:1" for i in range(6)]
    own_layers = {}
    for i, name in enumerate(names):
        manifest, blobs = image_blobs([SHARED, {f"own/{i}": f"image {i}\n".encode()}])
        reg.push_layout(write_layout(tmp_path / f"img{i}", manifest, blobs), f"par/img{i}:1")
        own_layers[name] = blobs[3].digest
    cfg = _cfg(tmp_path, reg)
    lock_path = _lock(tmp_path)
    lock_images(cfg, names, lock_path)
    pins = locked_image_digests(read_lock(lock_path), cfg.csghub.chart_version)
    pinned: list[tuple[str, str | None]] = [(n, pins[n]) for n in names]

    failing = names[5]  # the last: every other image has started when it fails (none queued is started after)

    def copy_fails_for_one(argv: Any) -> bytes:
        if argv[0] == "copy" and "/par/img5@" in " ".join(argv):
            raise ImageFetchError(f"fetching {failing}: the link dropped (test)")
        return _skopeo(argv, what="test")

    start = reg.log_size()
    with pytest.raises(ImageFetchError, match="the link dropped"):
        fetch_images(cfg, pinned, skopeo=copy_fails_for_one, workers=4)
    first = reg.blob_downloads(start)
    assert missing_images(cfg, pinned) == [failing]
    shared = facts["shared_layer"].digest
    assert first.count(shared) == 1, first
    assert sorted(d for d in first if d in own_layers.values()) == sorted(
        d for n, d in own_layers.items() if n != failing)  # each once; the failed image's never

    start = reg.log_size()
    again = fetch_images(cfg, pinned, workers=4)
    assert [(i.name, i.fetched) for i in again] == [(n, n == failing) for n in names]
    second = reg.blob_downloads(start)
    assert [d for d in second if d == shared or d in own_layers.values()] == [own_layers[failing]]
    store = image_store(cfg)
    index = json.loads((store / "index.json").read_text())
    assert sorted(m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]) == sorted(names)
    for path in (store / "blobs" / "sha256").iterdir():
        import hashlib

        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name  # no blob torn by a parallel writer
    assert not list(staging_dir(store).glob("*/blobs/sha256/*"))  # the finished copies' folders are gone


CONTAINERD2_DIR = Path(os.environ.get("APPLIANCE_CONTAINERD2_DIR")
                       or "/var/cache/csghub-appliance/containerd2/root/usr/bin")


def test_the_archive_imported_into_containerd_2_as_k3s_ships_it(
        tmp_path: Path, registry: tuple[Registry, dict[str, Any]]) -> None:
    """k3s v1.3x embeds containerd 2.x; Debian 12's is 1.6. scripts/install-containerd2.sh unpacks Debian
    sid's containerd 2.x (no install, no chroot): our archive, with an image named by its multi-arch index
    whose arm64 manifest the archive does not carry, imported as the csghub step imports it
    (``k3s ctr images import --platform linux/amd64``, provision/30-csghub.sh), gives exactly the set's names
    and digests; imported with every platform (as k3s imports its agent images folder:
    pkg/agent/containerd/containerd.go, ``WithAllPlatforms(true)``) it is refused, which is why the build
    uploads the archive for the step to import rather than into that folder."""
    if not (CONTAINERD2_DIR / "containerd").is_file():
        why = f"no containerd 2.x at {CONTAINERD2_DIR} (scripts/install-containerd2.sh unpacks Debian sid's)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    cfg, pinned, archive = _archive_of_a_set(tmp_path, registry)
    daemon = Containerd(tmp_path / "containerd2", CONTAINERD2_DIR)
    daemon.base.mkdir()
    daemon.start()
    try:
        assert daemon.version().startswith("2."), daemon.version()
        daemon.ctr("images", "import", "--platform", "linux/amd64", str(archive))
        listed = daemon.ctr("images", "ls").stdout.splitlines()[1:]
        assert sorted((line.split()[0], line.split()[2]) for line in listed) == sorted(pinned)
        daemon.ctr("images", "rm", *daemon.names())
        index = json.loads((image_store(cfg) / "blobs" / "sha256" / registry[1]["index"].split(":")[1]).read_bytes())
        (arm64,) = [m["digest"] for m in index["manifests"] if m["platform"]["architecture"] == "arm64"]
        every = daemon.ctr("images", "import", "--all-platforms", str(archive), check=False)
        assert every.returncode != 0 and f"{arm64}: not found" in every.stderr, every.stderr
        assert daemon.names() == []
    finally:
        daemon.stop()
