"""Container images fetched on the build host, by digest, into one content-addressed cache.

The image set (:mod:`appliance.images`) is resolved and fetched here, never in the guest:

- :func:`lock_images` (``invoke lock --images``) asks each image's registry what its tag points to
  (``skopeo inspect --raw``), resolves a multi-arch index to its ``linux/amd64`` manifest, and pins
  that manifest's digest in the version lock (``images``); the index it was chosen from is recorded
  beside it (``image_indexes``).
- :func:`fetch_images` (``invoke fetch``) copies every pinned image with ``skopeo copy`` from
  ``docker://<registry>/<repo>@<digest>`` into one OCI layout (``<cache>/images/oci``): one blob
  store for all images, so a layer two images share is stored and transferred once. The manifest is
  kept as the registry served it (its sha256 must be the pinned digest, checked here), so the names
  and digests in the appliance are the registry's. An image whose manifest and blobs are all in the
  cache is not fetched again: a second fetch starts no skopeo at all.
- :func:`write_archive` writes the set as one OCI archive (``images.tar``) that the csghub step
  imports into k3s's containerd, each image named by ``io.containerd.image.name`` as the chart
  names it, whatever mirror served it.

skopeo (Debian's) speaks the registry protocol, token auth, TLS and proxies; it reads credentials
from the user's container auth file itself (``REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers/
auth.json``, ``~/.docker/config.json``): they never pass through this program.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config import ApplianceConfig
from appliance.digest import sha256_file
from appliance.errors import ApplianceError
from appliance.files import write_atomic
from appliance.log import human_size, log

PLATFORM = ("linux", "amd64")
LOCK_WORKERS = 4
FETCH_WORKERS = 4  # skopeo copies at once: enough to hide registry round trips, few enough for a laptop's link
GUEST_IMAGE_ARCHIVE = "/var/cache/csghub-appliance/images/images.tar"
MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"  # containerd's importer names an image by this annotation


class ImageFetchError(ApplianceError):
    """An image could not be resolved, fetched or verified."""


Runner = Callable[[Sequence[str]], bytes]


def _skopeo(argv: Sequence[str], *, what: str) -> bytes:
    """Run skopeo; its stdout. Credentials stay in the auth file skopeo reads itself."""
    from appliance.errors import CommandFailed
    from appliance.run import run, which

    if which("skopeo") is None:
        raise ImageFetchError("skopeo is not installed", hint="run `bash scripts/setup.sh` (Debian package skopeo)")
    try:
        result = run(["skopeo", *argv], stream=False, timeout=3600)
    except CommandFailed as exc:
        tail = " ".join(exc.result.tail("stderr", 3)) if exc.result else str(exc)
        raise ImageFetchError(f"{what}: skopeo failed: {tail[-600:]}") from None
    # run() decodes text: a manifest is JSON in UTF-8 and comes back byte for byte; one that would
    # not (a CR LF line end) fails its digest check and is refused, never accepted altered.
    return result.stdout.encode()


# -- names and sources ---------------------------------------------------------------------------


def split_name(name: str) -> tuple[str, str, str]:
    """``docker.io/library/redis:7`` -> (``docker.io``, ``library/redis``, ``:7``); ``...x@sha256:D`` ->
    (..., ``x``, ``@sha256:D``): a name as the image set lists it (containerd's)."""
    registry, _, rest = name.partition("/")
    repo, at, digest = rest.partition("@")
    if at:
        return registry, repo, "@" + digest
    repo, sep, tag = rest.rpartition(":")
    if not sep or "/" in tag or not repo:
        raise ImageFetchError(f"{name}: expected a name with a tag or a digest, as the image set lists it")
    return registry, repo, ":" + tag


def source_repository(cfg: ApplianceConfig, name: str) -> str:
    """Where ``name`` is fetched from: its registry, or the mirror ``images.mirrors`` sets for it."""
    registry, repo, _ = split_name(name)
    mirror = cfg.images.mirrors.get(registry)
    return f"{mirror}/{repo}" if mirror else f"{registry}/{repo}"


def _tls_args(cfg: ApplianceConfig, flag: str) -> list[str]:
    return [f"{flag}={cfg.path(cfg.images.ca_dir)}"] if cfg.images.ca_dir else []


# -- the lock: tag -> digest ----------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    name: str
    digest: str  # the linux/amd64 manifest
    index: str | None  # the multi-arch index it was chosen from


def _platform_manifest(name: str, raw: bytes) -> tuple[str, str | None]:
    doc = json.loads(raw)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    media = doc.get("mediaType") or ("application/vnd.oci.image.manifest.v1+json" if "config" in doc else "")
    if media in INDEX_TYPES or "manifests" in doc:
        for entry in doc.get("manifests") or []:
            platform = entry.get("platform") or {}
            if (platform.get("os"), platform.get("architecture")) == PLATFORM and not platform.get("variant"):
                return str(entry["digest"]), digest
        raise ImageFetchError(f"{name}: the registry's index {digest} has no {'/'.join(PLATFORM)} manifest")
    if media not in MANIFEST_TYPES:
        raise ImageFetchError(f"{name}: unsupported manifest type {media or '(none)'} (schema 1 images are refused)")
    return digest, None


def resolve_image(cfg: ApplianceConfig, name: str, skopeo: Runner | None = None) -> Resolved:
    """The ``linux/amd64`` manifest digest ``name``'s tag points to now."""
    _, _, tag = split_name(name)
    if tag.startswith("@"):
        # Named by digest (Knative's images): containerd stores it under that digest, index or not.
        return Resolved(name, tag[1:], None)
    run = skopeo or (lambda argv: _skopeo(argv, what=f"resolving {name}"))
    raw = run(["inspect", "--raw", *_tls_args(cfg, "--cert-dir"), f"docker://{source_repository(cfg, name)}{tag}"])
    try:
        digest, index = _platform_manifest(name, raw)
    except (ValueError, KeyError, AttributeError) as exc:
        raise ImageFetchError(f"{name}: the registry answered something that is not a manifest ({exc})") from None
    return Resolved(name, digest, index)


def resolve_images(cfg: ApplianceConfig, names: Sequence[str]) -> list[Resolved]:
    """Each name's current ``linux/amd64`` digest; read-only questions to the registries, several at once
    (a skopeo process each)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=LOCK_WORKERS) as pool:
        return list(pool.map(lambda name: resolve_image(cfg, name), names))


def lock_images(cfg: ApplianceConfig, names: Sequence[str], lock_path: Path | None = None) -> list[Resolved]:
    """Pin each name's current ``linux/amd64`` digest (and the index it came from) in the version lock."""
    from appliance.artifacts import LOCK_FILE, read_lock, write_lock

    path = lock_path or LOCK_FILE
    resolved = resolve_images(cfg, names)
    lock = read_lock(path)
    chart = cfg.csghub.chart_version
    pins = dict((lock.get("images") or {}).get(chart) or {})
    indexes = dict((lock.get("image_indexes") or {}).get(chart) or {})
    for r in resolved:
        pins[r.name] = r.digest
        if r.index:
            indexes[r.name] = {"index": r.index, "platform": "/".join(PLATFORM)}
        else:
            indexes.pop(r.name, None)
    lock.setdefault("images", {})[chart] = dict(sorted(pins.items()))
    lock.setdefault("image_indexes", {})[chart] = dict(sorted(indexes.items()))
    write_lock(lock, path)
    chosen = sum(1 for r in resolved if r.index)
    log.success(f"pinned {len(resolved)} image digests for linux/amd64 ({chosen} chosen from a multi-arch index)")
    return resolved


# -- the cache: one OCI layout ---------------------------------------------------------------------


def image_store(cfg: ApplianceConfig) -> Path:
    from appliance.artifacts import cache_dir

    return cache_dir(cfg) / "images" / "oci"


def _blob(store: Path, digest: str) -> Path:
    algorithm, _, hexd = digest.partition(":")
    return store / "blobs" / algorithm / hexd


def _read_index(store: Path) -> dict[str, Any]:
    path = store / "index.json"
    if not path.is_file():
        return {"schemaVersion": 2, "manifests": []}
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ImageFetchError(f"the image cache's {path} is unreadable ({exc})",
                              hint=f"delete {store} and run `invoke fetch` again") from None
    return index if isinstance(index, dict) else {"schemaVersion": 2, "manifests": []}


def _entries(store: Path) -> dict[str, dict[str, Any]]:
    return {str((m.get("annotations") or {}).get(REF_NAME)): m for m in _read_index(store).get("manifests") or []}


def _referenced(store: Path, manifest_digest: str) -> list[dict[str, Any]]:
    """The blobs an image needs: config and layers; for an index its linux/amd64 manifest and that one's."""
    raw = _blob(store, manifest_digest).read_bytes()
    doc = json.loads(raw)
    if "manifests" in doc:
        child = _platform_manifest(manifest_digest, raw)[0]
        entry = next(m for m in doc["manifests"] if m["digest"] == child)
        return [entry, *_referenced(store, child)]
    return [doc["config"], *(doc.get("layers") or [])]


def _verify_blob(store: Path, digest: str) -> bool:
    path = _blob(store, digest)
    return path.is_file() and "sha256:" + sha256_file(path) == digest


def cached(store: Path, name: str, digest: str) -> bool:
    """Whether the cache holds ``name`` at ``digest`` with every blob it references present."""
    entry = _entries(store).get(name)
    if not entry or entry.get("digest") != digest or not _blob(store, digest).is_file():
        return False
    try:
        return all(_blob(store, d["digest"]).is_file() for d in _referenced(store, digest))
    except (OSError, ValueError, KeyError):
        return False


@dataclass(frozen=True)
class CachedImage:
    name: str
    digest: str
    size: int  # manifest + config + layers, as stored
    fetched: bool  # False: already in the cache


def image_size(store: Path, digest: str) -> int:
    return _blob(store, digest).stat().st_size + sum(int(d["size"]) for d in _referenced(store, digest))


def staging_dir(store: Path) -> Path:
    """Where each image's copy is made before its blobs join the store (``<cache>/images/fetching``)."""
    return store.parent / "fetching"


@contextmanager
def _store_lock(store: Path) -> Iterator[None]:
    """Hold the store's lock (``flock`` on ``<store>/.lock``, and a thread lock for this process's workers)
    while its index changes or its blobs are added or dropped: another fetch (thread or process) then never
    reads a half-updated ``index.json``, nor drops a blob whose image is not listed yet."""
    import fcntl

    with _THREAD_LOCK:
        store.mkdir(parents=True, exist_ok=True)
        with open(store / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


_THREAD_LOCK = threading.Lock()


class _Claims:
    """The blobs the running copies are downloading: an image that needs one of them waits for that copy to
    finish and then takes the blob from the store, so that a layer several images share crosses the
    network once per fetch even when those images are fetched at the same time. Claims are taken all at
    once, after waiting, while holding none: no copy waits for one that waits for it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy: set[str] = set()

    @contextmanager
    def taking(self, store: Path, digests: Sequence[str]) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._busy.intersection(digests))
            mine = {d for d in digests if not _blob(store, d).is_file()}
            self._busy |= mine
        try:
            yield
        finally:
            with self._cond:
                self._busy -= mine
                self._cond.notify_all()


def _copy_manifest(cfg: ApplianceConfig, store: Path, name: str, source: str, raw: bytes, digest: str,
                   run: Runner, claims: _Claims) -> None:
    """skopeo copies one manifest's blobs into a layout of this image's own (checking each layer's digest as
    it writes it); the blobs the manifest names then move into the store by digest. The registry's manifest
    and config are kept as served.

    Why not straight into the store: skopeo's OCI layout writer keeps the layout's ``index.json`` as it read
    it when the copy started and writes it back whole when the copy ends, with no lock (containers/image v5
    ``oci/layout/oci_dest.go``: ``newImageDestination`` reads it, ``Commit`` writes it), so parallel copies
    into one layout can lose each other's entries. Each copy gets its own layout instead,
    seeded with hard links to the blobs the store already holds (skopeo reuses a blob whose file exists,
    ``TryReusingBlob``): a layer shared with an image fetched earlier is not downloaded again. The folder is
    named after the image, so an interrupted copy resumes with the blobs it finished.
    """
    doc = json.loads(raw)
    wanted = [doc["config"], *(doc.get("layers") or [])]
    with claims.taking(store, [d["digest"] for d in doc.get("layers") or []]):
        _copy_claimed(cfg, store, name, source, raw, digest, run, wanted)


def _copy_claimed(cfg: ApplianceConfig, store: Path, name: str, source: str, raw: bytes, digest: str,
                  run: Runner, wanted: list[dict[str, Any]]) -> None:
    doc = json.loads(raw)
    scratch = staging_dir(store) / hashlib.sha256(f"{name} {digest}".encode()).hexdigest()[:20]
    (scratch / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    for d in wanted:
        have, seed = _blob(store, d["digest"]), _blob(scratch, d["digest"])
        if have.is_file() and not seed.exists():
            try:
                os.link(have, seed)
            except OSError:
                pass  # another file system or no hard links: skopeo downloads it again
    run(["copy", "--quiet", *_tls_args(cfg, "--src-cert-dir"), source, f"oci:{scratch}:image"])
    # skopeo's OCI layout takes OCI manifests only: it converted a Docker v2 image, and with it the config
    # blob. Layers are the same bytes; the registry's own config is fetched as it is (checked after).
    config = doc["config"]
    if not _blob(scratch, config["digest"]).is_file() and not _blob(store, config["digest"]).is_file():
        write_atomic(_blob(scratch, config["digest"]),
                     run(["inspect", "--config", "--raw", *_tls_args(cfg, "--cert-dir"), source]))
    with _store_lock(store):
        (store / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        for d in wanted:
            found = _blob(scratch, d["digest"])
            if found.is_file() and not _blob(store, d["digest"]).is_file():
                os.replace(found, _blob(store, d["digest"]))
        write_atomic(_blob(store, digest), raw)
    shutil.rmtree(scratch, ignore_errors=True)


def _set_entry(store: Path, name: str, raw: bytes, digest: str) -> None:
    """Point ``name`` in the layout's index at the manifest the registry served (not skopeo's conversion)."""
    with _store_lock(store):
        _blob(store, digest).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(_blob(store, digest), raw)
        index = _read_index(store)
        media = json.loads(raw).get("mediaType") or "application/vnd.oci.image.manifest.v1+json"
        kept = [m for m in index.get("manifests") or [] if (m.get("annotations") or {}).get(REF_NAME) != name]
        kept.append({"mediaType": media, "digest": digest, "size": len(raw), "annotations": {REF_NAME: name}})
        index["manifests"] = sorted(kept, key=lambda m: m["annotations"][REF_NAME])
        index.setdefault("schemaVersion", 2)
        write_atomic(store / "index.json", json.dumps(index, indent=1) + "\n")
        layout = store / "oci-layout"
        if not layout.is_file():
            write_atomic(layout, '{"imageLayoutVersion":"1.0.0"}')


def fetch_image(cfg: ApplianceConfig, store: Path, name: str, digest: str, skopeo: Runner | None = None,
                claims: _Claims | None = None) -> CachedImage:
    """Fetch one pinned image into the cache (or find it there); every blob checked against its digest."""
    if cached(store, name, digest):
        return CachedImage(name, digest, image_size(store, digest), fetched=False)
    run = skopeo or (lambda argv: _skopeo(argv, what=f"fetching {name}"))
    claims = claims or _Claims()
    source = f"docker://{source_repository(cfg, name)}@{digest}"
    raw = run(["inspect", "--raw", *_tls_args(cfg, "--cert-dir"), source])
    served = "sha256:" + hashlib.sha256(raw).hexdigest()
    if served != digest:
        raise ImageFetchError(f"{name}: the registry served a manifest with digest {served} for the pinned {digest}",
                              hint=f"the registry ({source_repository(cfg, name)}) serves other bytes than the "
                                   "lock pins: check the mirror; if the image was rebuilt on purpose, "
                                   "`invoke lock --images`")
    try:
        platform_digest, index = _platform_manifest(name, raw)
    except ValueError:
        raise ImageFetchError(f"{name}: the pinned digest {digest} is not a manifest") from None
    store.mkdir(parents=True, exist_ok=True)
    if index:  # an image named by an index digest: the index, its linux/amd64 manifest and that one's blobs
        child_source = f"docker://{source_repository(cfg, name)}@{platform_digest}"
        child_raw = run(["inspect", "--raw", *_tls_args(cfg, "--cert-dir"), child_source])
        if "sha256:" + hashlib.sha256(child_raw).hexdigest() != platform_digest:
            raise ImageFetchError(f"{name}: the registry served other bytes for {platform_digest} (linux/amd64)")
        _copy_manifest(cfg, store, name, child_source, child_raw, platform_digest, run, claims)
        write_atomic(_blob(store, digest), raw)
    else:
        _copy_manifest(cfg, store, name, source, raw, digest, run, claims)
    _set_entry(store, name, raw, digest)
    bad = [d["digest"] for d in _referenced(store, digest) if not _verify_blob(store, d["digest"])]
    if bad:
        for d in bad:
            _blob(store, d).unlink(missing_ok=True)
        raise ImageFetchError(f"{name}: blob(s) {', '.join(bad)} in the cache do not match their digest (removed)",
                              hint="run `invoke fetch` again")
    return CachedImage(name, digest, image_size(store, digest), fetched=True)


def fetch_images(cfg: ApplianceConfig, pinned: Sequence[tuple[str, str | None]],
                 skopeo: Runner | None = None, *, workers: int = FETCH_WORKERS) -> list[CachedImage]:
    """Fetch the image set (``(name, digest)`` from ``images.txt``) into the cache; all must be pinned.

    Up to ``workers`` images at once (a skopeo process each, each into its own layout: see
    :func:`_copy_manifest`); the result is in the order of ``pinned``. When one image fails, the others
    already started finish (their blobs stay for the next run), none still queued starts, and the first
    failure is raised."""
    from concurrent.futures import ThreadPoolExecutor

    unpinned = [name for name, digest in pinned if not digest]
    if unpinned:
        raise ImageFetchError(f"{len(unpinned)} image(s) of the set have no digest in the version lock: "
                              f"{', '.join(unpinned[:5])}{' ...' if len(unpinned) > 5 else ''}",
                              hint="run `invoke lock --images` on a host that reaches the registries")
    store = image_store(cfg)
    started = time.monotonic()
    progress = {"done": 0, "bytes": 0}
    progress_lock = threading.Lock()
    claims = _Claims()
    # Set by the worker whose image failed, before it takes the next one: no queued image starts after it.
    failed = threading.Event()

    def one(item: tuple[str, str | None]) -> CachedImage | None:
        name, digest = item
        assert digest is not None
        if failed.is_set():
            return None  # not started: another image failed first
        try:
            image = fetch_image(cfg, store, name, digest, skopeo, claims)
        except BaseException:
            failed.set()
            raise
        with progress_lock:
            progress["done"] += 1
            progress["bytes"] += image.size
            verb = "fetched" if image.fetched else "cached"
            log.info(f"image {progress['done']}/{len(pinned)} {verb}: {name} ({human_size(image.size)}; "
                     f"{human_size(progress['bytes'])} so far)")
        return image

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(pinned) or 1))) as pool:
        futures = [pool.submit(one, item) for item in pinned]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]  # type: ignore[misc]
        done = [image for f in futures if (image := f.result()) is not None]
    fetched = [i for i in done if i.fetched]
    if fetched:
        with _store_lock(store):
            _drop_unreferenced(store)
    log.success(f"images: {len(done)} in the cache ({len(fetched)} fetched, {human_size(store_size(store, done))} "
                f"in the blob store, {human_size(sum(i.size for i in done))} as separate images) in "
                f"{time.monotonic() - started:.1f} s")
    return done


def store_size(store: Path, images: Sequence[CachedImage]) -> int:
    """Bytes of the distinct blobs the images use (shared layers counted once)."""
    blobs: dict[str, int] = {}
    for image in images:
        blobs[image.digest] = _blob(store, image.digest).stat().st_size
        for d in _referenced(store, image.digest):
            blobs[d["digest"]] = int(d["size"])
    return sum(blobs.values())


def _drop_unreferenced(store: Path) -> None:
    """Remove blobs no image of the index uses (skopeo's converted manifests and configs)."""
    keep: set[str] = set()
    for entry in _read_index(store).get("manifests") or []:
        keep.add(entry["digest"])
        try:
            keep |= {d["digest"] for d in _referenced(store, entry["digest"])}
        except (OSError, ValueError, KeyError):
            continue
    for path in (store / "blobs" / "sha256").iterdir():
        if f"sha256:{path.name}" not in keep:
            path.unlink(missing_ok=True)


def missing_images(cfg: ApplianceConfig, pinned: Sequence[tuple[str, str | None]]) -> list[str]:
    """Names of the set the cache lacks (unpinned ones included): for ``invoke doctor``."""
    store = image_store(cfg)
    return [name for name, digest in pinned if not digest or not cached(store, name, digest)]


# -- the archive the guest imports ---------------------------------------------------------------------


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def write_archive(store: Path, images: Sequence[tuple[str, str]], path: Path) -> int:
    """One OCI archive of ``images`` (``(name, digest)``), each blob once; its size in bytes.

    Each manifest is annotated with ``io.containerd.image.name`` = the name the chart uses, so that
    ``ctr images import`` (what k3s does with its agent images folder) stores it under that name.
    """
    manifests = []
    blobs: dict[str, None] = {}
    for name, digest in sorted(images):
        raw = _blob(store, digest).read_bytes()
        media = json.loads(raw).get("mediaType") or "application/vnd.oci.image.manifest.v1+json"
        manifests.append({"mediaType": media, "digest": digest, "size": len(raw),
                          "annotations": {CONTAINERD_NAME: name, REF_NAME: split_name(name)[2][1:]}})
        blobs[digest] = None
        for d in _referenced(store, digest):
            blobs[d["digest"]] = None
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    with tarfile.open(part, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add_bytes(tar, "index.json", json.dumps({"schemaVersion": 2, "manifests": manifests}).encode())
        for digest in blobs:
            info = tar.gettarinfo(str(_blob(store, digest)), arcname=f"blobs/sha256/{digest.split(':', 1)[1]}")
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(_blob(store, digest), "rb") as f:
                tar.addfile(info, f)
    os.replace(part, path)
    return path.stat().st_size


def build_archive(cfg: ApplianceConfig, pinned: Sequence[tuple[str, str | None]]) -> Path:
    """``build/images/images.tar`` from the cache, for upload; refuses when any image is not cached.

    Written again only when the set changed (``images.tar.set`` holds the set it was written for).
    """
    lacking = missing_images(cfg, pinned)
    if lacking:
        raise ImageFetchError(f"{len(lacking)} image(s) of the set are not in the image cache: "
                              f"{', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''}",
                              hint="run `invoke fetch` (after `invoke lock --images`)")
    path = cfg.build_dir / "images" / "images.tar"
    images = sorted((name, digest) for name, digest in pinned if digest)
    listing = "".join(f"{name} {digest}\n" for name, digest in images)
    record = path.with_name(path.name + ".set")
    if path.is_file() and record.is_file() and record.read_text(encoding="utf-8") == listing:
        return path
    record.unlink(missing_ok=True)
    size = write_archive(image_store(cfg), images, path)
    write_atomic(record, listing)
    log.info(f"image archive for the guest: {len(images)} images, {human_size(size)} ({path})")
    return path


# -- the stages' entries ------------------------------------------------------------------------------------


def declared_pins(cfg: ApplianceConfig) -> list[tuple[str, str | None]]:
    """``(name, pinned digest or None)`` of the image set the build wrote (``build/manifests/images.txt``)."""
    from appliance.images import parse_image_list

    path = cfg.build_dir / "manifests" / "images.txt"
    if not path.is_file():
        raise ImageFetchError(f"no image set at {path}", hint="run `invoke fetch` (it renders the chart and writes it)")
    return parse_image_list(path.read_text(encoding="utf-8"), str(path))


def lock_image_set(cfg: ApplianceConfig, lock_path: Path | None = None) -> list[Resolved]:
    """``invoke lock --images``: pin every image of the set, then write ``images.txt`` with the pins."""
    from appliance.images import write_build_image_list

    write_build_image_list(cfg, lock_path=lock_path)
    resolved = lock_images(cfg, [name for name, _ in declared_pins(cfg)], lock_path)
    write_build_image_list(cfg, lock_path=lock_path)
    return resolved


def resolve_unpinned(cfg: ApplianceConfig) -> int:
    """Give every image of the set that neither the version lock nor an earlier run of this build pins
    the digest its tag points to now, recorded in ``build/image-digests.json`` (never in the lock) and
    written into ``images.txt``; the number resolved. A build with an unpinned lock so still fetches,
    uploads and checks by digest, and a resumed build keeps the digests it started with."""
    from appliance.images import record_build_resolved_digests

    declared = declared_pins(cfg)
    unpinned = [name for name, digest in declared if not digest]
    if not unpinned:
        return 0
    log.warning(f"{len(unpinned)} image(s) of the set have no digest in the version lock: resolving their tags now "
                "for linux/amd64; this build records the digests (build/image-digests.json and the build report) "
                "but a rebuild may get others. `invoke lock --images` pins them for every build")
    resolved = resolve_images(cfg, unpinned)
    now = {r.name: r.digest for r in resolved}
    record_build_resolved_digests(cfg, now)
    # The same set, now with every digest (write_build_image_list adds them too when it runs again).
    text = "".join(f"{name} {digest or now[name]}\n" for name, digest in declared)
    write_atomic(cfg.build_dir / "manifests" / "images.txt", text)
    return len(resolved)


def fetch_image_set(cfg: ApplianceConfig, *, required: bool) -> list[CachedImage]:
    """Fetch the set ``images.txt`` lists. A build (``required``) resolves unpinned tags first
    (:func:`resolve_unpinned`); ``invoke fetch`` fetches what is pinned and says what is not."""
    if required:
        resolve_unpinned(cfg)
    pinned = declared_pins(cfg)
    unpinned = [name for name, digest in pinned if not digest]
    if not required and unpinned:
        log.warning(f"{len(unpinned)} of the {len(pinned)} images have no digest pinned yet: not fetched "
                    "(run `invoke lock --images` on a host that reaches the registries; a build resolves them)")
        pinned = [(name, digest) for name, digest in pinned if digest]
        if not pinned:
            return []
    return fetch_images(cfg, pinned)


def image_uploads(cfg: ApplianceConfig) -> list[tuple[Path, str]]:
    """The archive of the set for the csghub step, when every image is pinned and cached; else none (the
    step then fails naming what is missing: the guest never pulls)."""
    pinned = declared_pins(cfg)
    lacking = missing_images(cfg, pinned)
    if lacking:
        log.warning(f"{len(lacking)} of {len(pinned)} images are not in the image cache: the csghub step will name "
                    "them (run `invoke lock --images`, then `invoke fetch`)")
        return []
    return [(build_archive(cfg, pinned), GUEST_IMAGE_ARCHIVE)]


def report_images(cfg: ApplianceConfig, recorded: Sequence[dict[str, str]]) -> dict[str, Any]:
    """build-report.json's image section: every recorded image with its digest and size (as the cache
    holds it: manifest, config and compressed layers), the sum over images, and the bytes of the
    distinct blobs (shared layers once); a size is null for an image the cache does not hold."""
    store = image_store(cfg)
    listed: list[dict[str, Any]] = []
    present: list[CachedImage] = []
    for image in recorded:
        size = None
        if cached(store, image["name"], image["digest"]):
            size = image_size(store, image["digest"])
            present.append(CachedImage(image["name"], image["digest"], size, fetched=False))
        listed.append({"name": image["name"], "digest": image["digest"], "size_bytes": size})
    return {"count": len(listed), "images": listed,
            "total_bytes": sum(i.size for i in present), "distinct_blob_bytes": store_size(store, present),
            "sizes_known": len(present)}
