#!/usr/bin/env python3
"""Image fetch: several images at once against one after the other, measured in the same run.

Starts a real registry on loopback (Debian's ``docker-registry``, TLS from a test CA: ``tests/registry.py``),
pushes ``--images`` images, each a shared base layer (``--base-mib`` of incompressible bytes) plus an own
layer (``--own-mib``), pins them (``lock_images``) and fetches the set into an empty cache with
``fetch_images`` twice per run: ``--workers`` at once, and one at a time (``workers=1``), the order
alternating between runs. Prints each time (fastest of ``--runs``), the ratio, and the bytes the registry
served for each (its access log), which must be the same: parallel copies must not download a shared
layer twice.

A loopback registry has no latency: the ratio measured here is what parallel skopeo processes save in
process start, TLS handshakes and hashing; against a registry on the internet the round trips add to it.

Usage: python3 benchmarks/image_fetch.py [--images 12] [--base-mib 8] [--own-mib 2] [--workers 4] [--runs 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.artifacts import LOCK_FILE, read_lock
from appliance.config import load_config
from appliance.imagecache import fetch_images, lock_images
from appliance.images import locked_image_digests
from appliance.log import log
from tests.registry import Registry, image_blobs, write_layout


def served_bytes(registry: Registry, since: int) -> int:
    """Bytes of the blobs the registry served (GET 200) after byte ``since`` of its log."""
    return sum(registry.blob_file(d).stat().st_size for d in registry.blob_downloads(since))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--base-mib", type=int, default=8)
    parser.add_argument("--own-mib", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    log.console.quiet = True
    with tempfile.TemporaryDirectory(prefix="image-fetch-") as tmp_name:
        tmp = Path(tmp_name)
        registry = Registry(tmp / "registry")
        registry.base.mkdir()
        registry.start()
        try:
            base = {"base.bin": os.urandom(args.base_mib << 20)}
            names = []
            for i in range(args.images):
                manifest, blobs = image_blobs([base, {f"own{i}.bin": os.urandom(args.own_mib << 20)}])
                registry.push_layout(write_layout(tmp / f"layout{i}", manifest, blobs), f"bench/image{i}:v1")
                names.append(f"docker.io/bench/image{i}:v1")
            lock = tmp / "versions.lock.yaml"
            shutil.copy(LOCK_FILE, lock)
            settings = [f"images.ca_dir={registry.ca_dir}", f'images.mirrors={{"docker.io": "{registry.host}"}}']
            cfg = load_config(None, [*settings, f"artifacts.cache_dir={tmp / 'pin'}"], "libvirt", cwd=tmp)
            lock_images(cfg, names, lock)
            pins = locked_image_digests(read_lock(lock), cfg.csghub.chart_version)
            pinned: list[tuple[str, str | None]] = [(n, pins[n]) for n in names]
            best: dict[int, float] = {}
            served: dict[int, int] = {}
            for run in range(args.runs):
                order = (args.workers, 1) if run % 2 == 0 else (1, args.workers)
                for workers in order:
                    cache = tmp / f"cache-{run}-{workers}"
                    cfg = load_config(None, [*settings, f"artifacts.cache_dir={cache}"], "libvirt", cwd=tmp)
                    since = registry.log_size()
                    started = time.monotonic()
                    images = fetch_images(cfg, pinned, workers=workers)
                    took = time.monotonic() - started
                    assert all(i.fetched for i in images)
                    best[workers] = min(best.get(workers, took), took)
                    served[workers] = served_bytes(registry, since)
                    shutil.rmtree(cache)
        finally:
            registry.stop()
    print(f"{args.images} images, base layer {args.base_mib} MiB shared, own layers {args.own_mib} MiB each; "
          f"loopback registry, fastest of {args.runs}")
    print(f"one at a time:    {best[1]:6.2f} s  ({served[1] / 2**20:.1f} MiB served)")
    many = args.workers
    print(f"{many} at once:        {best[many]:6.2f} s  ({served[many] / 2**20:.1f} MiB served)")
    print(f"parallel / serial: {best[args.workers] / best[1]:.2f}")


if __name__ == "__main__":
    main()
