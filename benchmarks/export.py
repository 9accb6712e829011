#!/usr/bin/env python3
"""OVA export: our writer against `qemu-img convert` + `sha256sum` + `tar` + `sha256sum`, same disk, same run.

Ours: ``appliance.export.ova.write_ova`` (streamOptimized VMDK by qemu-img, descriptor, SHA256
manifest, ustar archive hashed while written, ``.sha256`` file, atomic rename).

Baseline (the shell pipeline that makes the same artifact): ``qemu-img convert -O vmdk -o
subformat=streamOptimized``, ``sha256sum`` of the VMDK and the descriptor for the manifest,
``tar --format=ustar -cf`` of .ovf, .mf, .vmdk, then ``sha256sum`` of the OVA.

Both write into the same folder; runs alternate (baseline, ours, ours, baseline, ...) so the page
cache favours neither, and the fastest run of each is compared. Prints the time ratio (target <=
1.2) and the size ratio (target <= 1.0).

Disk: the newest base box image under the user's cache (``invoke base-box``), else a generated
qcow2 with a few hundred MiB of mixed data (random, text-like, zeros).

Usage: python3 benchmarks/export.py [--disk PATH] [--runs 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.config import load_config  # noqa: E402
from appliance.export.ova import write_ova  # noqa: E402
from appliance.export.ovf import DiskFacts, ovf_descriptor  # noqa: E402
from appliance.log import log  # noqa: E402
from appliance.run import run  # noqa: E402


def base_box_disk(work: Path) -> Path | None:
    from appliance.basebox import cache_dir

    boxes = sorted((cache_dir() / "libvirt").glob("*.box"), key=lambda p: p.stat().st_mtime)
    if not boxes:
        return None
    with tarfile.open(boxes[-1]) as tar:
        tar.extract("box.img", work, filter="data")
    return work / "box.img"


def generated_disk(work: Path) -> Path:
    """2 GiB virtual, ~320 MiB written: 96 MiB random, 160 MiB text-like, 64 MiB of a repeated pattern."""
    raw = work / "gen.raw"
    words = b"the quick brown fox jumps over the lazy dog csghub k3s helm chart model dataset " * 13
    with raw.open("wb") as f:
        f.truncate(2 << 30)
        f.seek(16 << 20)
        for _ in range(96):
            f.write(os.urandom(1 << 20))
        f.seek(512 << 20)
        block = (words * ((1 << 20) // len(words) + 1))[: 1 << 20]
        for i in range(160):
            f.write(block[i % 97:] + block[: i % 97])
        f.seek(1200 << 20)
        f.write(b"\xa5\x5a" * (32 << 20))
    disk = work / "gen.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)])
    raw.unlink()
    return disk


def baseline(disk: Path, fmt: str, out: Path, cfg: object) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    vmdk, ovf, mf, ova = out / "base-disk001.vmdk", out / "base.ovf", out / "base.mf", out / "base.ova"
    run(["qemu-img", "convert", "-f", fmt, "-O", "vmdk", "-o", "subformat=streamOptimized", str(disk), str(vmdk)])
    vmdk_sha = run(["sha256sum", str(vmdk)]).stdout.split()[0]
    info_size = int(run(["stat", "-c", "%s", str(vmdk)]).stdout)
    ovf.write_bytes(ovf_descriptor(cfg, DiskFacts(vmdk.name, info_size, 0, vmdk_sha)))  # type: ignore[arg-type]
    ovf_sha = run(["sha256sum", str(ovf)]).stdout.split()[0]
    mf.write_text(f"SHA256({ovf.name})= {ovf_sha}\nSHA256({vmdk.name})= {vmdk_sha}\n")
    run(["tar", "--format=ustar", "-cf", str(ova), "-C", str(out), ovf.name, mf.name, vmdk.name])
    (out / "base.ova.sha256").write_text(run(["sha256sum", str(ova)]).stdout)
    vmdk.unlink()
    return ova


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disk", type=Path, help="qcow2 or raw disk (default: base box, else generated)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    log.console.quiet = True  # keep the step log out of the figures

    with tempfile.TemporaryDirectory(prefix="bench-export-", dir=args.workdir) as tmp:
        work = Path(tmp)
        disk = args.disk or base_box_disk(work)
        source = "given" if args.disk else ("base box" if disk else "generated")
        if disk is None:
            disk = generated_disk(work)
        meta = json.loads(run(["qemu-img", "info", "--output=json", str(disk)]).stdout)
        fmt = meta["format"]
        cfg = load_config(None, ["vm.cpus=2", "vm.memory_mb=2048", "provision.skip=[k3s, csghub]"], "libvirt",
                          cwd=work)
        ours_t: list[float] = []
        base_t: list[float] = []
        ours_size = base_size = 0
        for i in range(args.runs):
            order = ("base", "ours") if i % 2 == 0 else ("ours", "base")
            for which in order:
                out = work / f"{which}-{i}"
                started = time.perf_counter()
                if which == "ours":
                    result = write_ova(disk, cfg, out / "ours.ova")
                    ours_t.append(time.perf_counter() - started)
                    ours_size = result.size
                else:
                    ova = baseline(disk, fmt, out, cfg)
                    base_t.append(time.perf_counter() - started)
                    base_size = ova.stat().st_size
                for p in sorted(out.iterdir()):
                    p.unlink()
                out.rmdir()

    print(f"disk: {source} ({fmt}, virtual {meta['virtual-size'] / 2**30:.1f} GiB, "
          f"allocated {meta.get('actual-size', 0) / 2**20:.0f} MiB); runs: {args.runs}")
    print(f"baseline qemu-img+sha256sum+tar+sha256sum: {min(base_t):7.2f} s  {base_size} bytes")
    print(f"ours     write_ova:                        {min(ours_t):7.2f} s  {ours_size} bytes")
    time_ratio, size_ratio = min(ours_t) / min(base_t), ours_size / base_size
    print(f"time ratio (ours/baseline): {time_ratio:.3f}  (target <= 1.2) {'OK' if time_ratio <= 1.2 else 'MISSED'}")
    print(f"size ratio (ours/baseline): {size_ratio:.5f} (target <= 1.0) {'OK' if size_ratio <= 1.0 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
