"""Raw disks with awkward shapes, shared by the VMDK writer's tests and benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

from appliance.export.vmdk import GRAIN, SECTOR

MiB = 1 << 20


def write_awkward_disk(path: Path) -> Path:
    """A raw disk of 100 MiB + 3 sectors: holes, written zeros, random and text data, data in the last sector."""
    size = 100 * MiB + 3 * SECTOR
    with path.open("wb") as f:
        f.truncate(size)
        f.seek(MiB)
        f.write(os.urandom(3 * MiB))
        f.seek(10 * MiB)
        f.write(bytes(4 * MiB))  # allocated zeros
        f.seek(40 * MiB + 12345)
        f.write(b"csghub appliance " * 40000)
        for g in range(600):  # one byte in every grain across a grain-table boundary
            f.seek(60 * MiB + g * GRAIN + 7)
            f.write(b"\x5a")
        f.seek(size - 9)
        f.write(b"LASTBYTES")
    return path
