#!/usr/bin/env python3
"""Image delivery: one OCI archive of the set (each blob once) against one archive per image.

Makes ``--images`` images locally, each a shared base layer (``--base-mib`` of incompressible bytes)
plus an own layer (``--own-mib``), as a CSGHub set shares its base images; puts them into the blob
store shape ``appliance/imagecache.py`` keeps, then writes (a) one archive of the whole set
(``write_archive``, what the build uploads) and (b) one archive per image, and imports each into a
real containerd (``tests/containerd.py``: private socket, root) with ``ctr images import`` (unpacking,
as the csghub step does). Prints the sizes (blob store, one archive, sum of per-image archives) and
the import times (fastest of ``--runs``, fresh containerd each run).

Usage (root): python3 benchmarks/image_delivery.py [--images 10] [--base-mib 20] [--own-mib 4] [--runs 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.imagecache import write_archive
from tests.containerd import Containerd
from tests.registry import image_blobs, write_layout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--base-mib", type=int, default=20)
    parser.add_argument("--own-mib", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="image-delivery-") as tmp_name:
        tmp = Path(tmp_name)
        base = {"base.bin": os.urandom(args.base_mib << 20)}
        store = tmp / "store"
        names: list[tuple[str, str]] = []
        for i in range(args.images):
            manifest, blobs = image_blobs([base, {f"own{i}.bin": os.urandom(args.own_mib << 20)}])
            write_layout(store, manifest, blobs)
            names.append((f"docker.io/bench/image{i}:v1", manifest.digest))
        store_bytes = sum(f.stat().st_size for f in (store / "blobs" / "sha256").iterdir())
        one = tmp / "set.tar"
        one_bytes = write_archive(store, names, one)
        singles = [tmp / f"image{i}.tar" for i in range(len(names))]
        single_bytes = sum(write_archive(store, [image], path) for image, path in zip(names, singles, strict=True))
        print(f"{len(names)} images, base layer {args.base_mib} MiB shared, own layers {args.own_mib} MiB each")
        print(f"blob store:           {store_bytes / 2**20:8.1f} MiB")
        print(f"one archive (upload): {one_bytes / 2**20:8.1f} MiB")
        print(f"per-image archives:   {single_bytes / 2**20:8.1f} MiB  ({single_bytes / one_bytes:.2f}x)")
        timings: dict[str, float] = {}
        for run in range(args.runs):
            for label, archives in (("one archive", [one]), ("per-image archives", singles)):
                daemon = Containerd(tmp / f"containerd-{label.replace(' ', '-')}-{run}")
                daemon.base.mkdir()
                daemon.start()
                try:
                    started = time.monotonic()
                    for archive in archives:
                        daemon.ctr("images", "import", "--platform", "linux/amd64", str(archive))
                    took = time.monotonic() - started
                    assert sorted(daemon.names()) == sorted(name for name, _ in names)
                finally:
                    daemon.stop()
                timings[label] = min(timings.get(label, took), took)
        for label, took in timings.items():
            print(f"import, {label + ':':20s} {took:6.2f} s (fastest of {args.runs}; load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
