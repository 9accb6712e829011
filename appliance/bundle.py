"""One file that carries the whole download cache to a build host without internet.

``invoke fetch --bundle FILE`` (on a host with internet, after fetching) writes the cache folder
(artifacts, helm, OVF schemas, the image blob store) as a tar with ``bundle.json`` first: every
file's path, size and sha256. ``invoke fetch --from-bundle FILE`` reads it into the cache of the
host without internet: member names are checked (relative, no ``..``, regular files and folders
only), every file must match its size and sha256 in ``bundle.json``, every image blob must hash to
its own name, and only then does a file take its place in the cache. ``bundle.json`` guards the
copy (a truncated or damaged file); the version lock guards the content: the build checks the
artifacts against the lock's sha256 and the images against its digests, as it does for downloads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

from appliance.artifacts import cache_dir
from appliance.config import ApplianceConfig
from appliance.digest import sha256_file
from appliance.errors import ApplianceError
from appliance.log import human_size, log

INDEX = "bundle.json"
FORMAT = 1


class BundleError(ApplianceError):
    """A bundle that cannot be written or read as it is."""


def _files(root: Path) -> list[Path]:
    """The cache's finished files: no ``.part``, no bundle staging, no image copy still under way
    (``images/fetching``: its blobs join the store only when the image is complete)."""
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not p.is_symlink() and not p.name.endswith(".part") and ".bundle-" not in str(p)
                  and p.relative_to(root).parts[:2] != ("images", "fetching") and p.name != ".lock")


def write_bundle(cfg: ApplianceConfig, path: Path) -> int:
    """Write the cache as one bundle; the number of files."""
    root = cache_dir(cfg)
    files = _files(root) if root.is_dir() else []
    if not files:
        raise BundleError(f"the cache {root} is empty", hint="run `invoke fetch` first")
    entries = [{"path": f.relative_to(root).as_posix(), "size": f.stat().st_size, "sha256": sha256_file(f)}
               for f in files]
    index = json.dumps({"format": FORMAT, "files": entries}, indent=1).encode()
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(part, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(INDEX)
        info.size = len(index)
        import io

        tar.addfile(info, io.BytesIO(index))
        for f, entry in zip(files, entries, strict=True):
            member = tar.gettarinfo(str(f), arcname=f"cache/{entry['path']}")
            member.uid = member.gid = 0
            member.uname = member.gname = ""
            with f.open("rb") as data:
                tar.addfile(member, data)
    os.replace(part, path)
    log.success(f"bundle {path}: {len(files)} files, {human_size(path.stat().st_size)}")
    return len(files)


def _safe_relative(name: str) -> str | None:
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        return None
    return pure.as_posix()


def read_bundle(cfg: ApplianceConfig, path: Path) -> int:
    """Verify a bundle and place its files in the cache; the number of files. Nothing moves unless all match."""
    root = cache_dir(cfg)
    staging = root / ".bundle-staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with tarfile.open(path, "r:") as tar:
            first = tar.next()
            if first is None or first.name != INDEX or not first.isfile():
                raise BundleError(f"{path} is not a bundle: its first member is not {INDEX}",
                                  hint="write one with `invoke fetch --bundle FILE`")
            data = tar.extractfile(first)
            assert data is not None
            declared = _read_index(path, data.read())
            seen: set[str] = set()
            for member in tar:
                if member.offset == first.offset:
                    continue  # the index itself (iteration starts at the beginning again)
                name = _safe_relative(member.name)
                if member.isdir():
                    continue
                if name is None or not name.startswith("cache/") or not member.isfile():
                    raise BundleError(f"{path}: refusing member {member.name!r} (only regular files under cache/)")
                rel = name[len("cache/"):]
                entry = declared.get(rel)
                if entry is None:
                    raise BundleError(f"{path}: {rel} is not listed in {INDEX}")
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                digest = hashlib.sha256()
                with target.open("wb") as out:
                    while chunk := source.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                if member.size != entry["size"] or digest.hexdigest() != entry["sha256"]:
                    raise BundleError(f"{path}: {rel} does not match its sha256 in {INDEX} (the copy is damaged)")
                if "/blobs/sha256/" in f"/{rel}" and PurePosixPath(rel).name != digest.hexdigest():
                    raise BundleError(f"{path}: the image blob {rel} does not hash to its name")
                seen.add(rel)
            lacking = sorted(set(declared) - seen)
            if lacking:
                raise BundleError(f"{path}: {len(lacking)} file(s) listed in {INDEX} are missing, e.g. {lacking[0]}")
    except (OSError, tarfile.TarError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise BundleError(f"cannot read the bundle {path}: {exc}") from None
    except BundleError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for rel in sorted(seen):
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, target)
    shutil.rmtree(staging, ignore_errors=True)
    log.success(f"bundle {path}: {len(seen)} files verified and placed in the cache {root}")
    return len(seen)


def _read_index(path: Path, raw: bytes) -> dict[str, dict[str, Any]]:
    try:
        doc = json.loads(raw)
        files = {str(e["path"]): {"size": int(e["size"]), "sha256": str(e["sha256"])} for e in doc["files"]}
        ok = doc.get("format") == FORMAT and all(_safe_relative(p) == p for p in files)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise BundleError(f"{path}: {INDEX} is not a bundle index of format {FORMAT}")
    return files
