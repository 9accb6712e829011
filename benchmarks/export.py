#!/usr/bin/env python3
"""OVA export: the parallel VMDK writer against qemu-img (and VirtualBox), same disk, same run.

Two comparisons, each run alternately so the page cache and the other users of the machine
favour neither side:

1. **The VMDK alone.** Ours: ``appliance.export.vmdk.write_stream_vmdk`` (grains compressed
   on every core, hashed as written). Baselines: ``qemu-img convert -O vmdk -o
   subformat=streamOptimized`` (what the project used to wrap) and, where the VirtualBox
   chroot of the ``vbox`` test tier exists, VirtualBox 7.2's ``VBoxManage convertfromraw
   --format VMDK --variant Stream`` (fed the raw image, converted before the clock starts).
   Targets: time <= 0.55x of each, size <= 1.0x.
2. **The whole OVA.** Ours: ``write_ova`` (VMDK streamed into the tar, one read to hash the
   OVA). Baseline: the shell pipeline that makes the same artifact: ``qemu-img convert``,
   ``sha256sum`` of the VMDK and the descriptor, ``tar --format=ustar``, ``sha256sum`` of the OVA.

Each figure is the fastest of ``--runs``; wall time and CPU time (user + system, all threads and
child processes) are both printed, and the load average before and after, because the machine
is shared: wall-time ratios are only meaningful when the load stayed below the core count.

Disk (default): 8 GiB virtual, an ext4 filesystem made with ``mke2fs -d`` from about 2.2 GB of
real files (hard links to /usr/bin, /usr/share, /usr/include, /usr/lib in that order), as qcow2.
``--make-disk PATH`` only builds that disk (to reuse it with ``--disk PATH``).

Usage: python3 benchmarks/export.py [--disk PATH] [--runs 2] [--workers 0,1] [--level 6]
                                    [--only vmdk|ova] [--workdir DIR] [--make-disk PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.config import load_config  # noqa: E402
from appliance.errors import ApplianceError  # noqa: E402
from appliance.export.ova import write_ova  # noqa: E402
from appliance.export.ovf import DiskFacts, ovf_descriptor  # noqa: E402
from appliance.export.vmdk import default_workers, source_layout, write_stream_vmdk  # noqa: E402
from appliance.log import log  # noqa: E402
from appliance.run import run  # noqa: E402

if TYPE_CHECKING:
    from appliance.providers.virtualbox.chroot import VBoxSession

FILE_SOURCES = ("/usr/bin", "/usr/share", "/usr/include", "/usr/lib")


def make_realistic_disk(dest: Path, *, virtual_gib: int = 8, real_bytes: int = 2_200_000_000) -> Path:
    """qcow2 of ``virtual_gib`` GiB holding an ext4 filesystem with ``real_bytes`` of files from /usr."""
    with tempfile.TemporaryDirectory(prefix="bench-disk-", dir=dest.parent) as tmp:
        stage = Path(tmp) / "stage"
        used = 0
        for top in FILE_SOURCES:
            for root, dirs, files in os.walk(top):
                dirs.sort()
                for name in sorted(files):
                    src = os.path.join(root, name)
                    if os.path.islink(src) or not os.path.isfile(src):
                        continue
                    size = os.path.getsize(src)
                    if used + size > real_bytes:
                        continue
                    target = stage / os.path.relpath(root, "/")
                    target.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(src, target / name)  # same bytes, no copy (same filesystem)
                    except OSError:
                        continue
                    used += size
        raw = Path(tmp) / "disk.raw"
        with raw.open("wb") as f:
            f.truncate(virtual_gib << 30)
        run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(stage), str(raw)])
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(dest)])
    print(f"made {dest}: {virtual_gib} GiB virtual, {used / 1e9:.2f} GB of files from {', '.join(FILE_SOURCES)}")
    return dest


def measured(action: Callable[[], int]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process and its children, bytes written) of ``action``."""
    before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    size = action()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before, strict=True))
    return wall, cpu, size


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disk", type=Path, help="qcow2 or raw disk (default: a realistic one, made now)")
    parser.add_argument("--make-disk", type=Path, help="only make the realistic disk at this path")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--workers", default="0", help="comma list of worker counts for ours (0: every core)")
    parser.add_argument("--level", type=int, default=6, help="zlib level for ours")
    parser.add_argument("--only", choices=("vmdk", "ova"), help="run one comparison only")
    parser.add_argument("--no-vbox", action="store_true", help="skip the VirtualBox baseline")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    log.console.quiet = True  # keep the step log out of the figures

    if args.make_disk:
        make_realistic_disk(args.make_disk.resolve())
        return 0
    worker_counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-export-", dir=args.workdir) as tmp:
        work = Path(tmp)
        disk = args.disk.resolve() if args.disk else make_realistic_disk(work / "disk.qcow2")
        meta = json.loads(run(["qemu-img", "info", "--output=json", str(disk)]).stdout)
        fmt = meta["format"]
        layout = source_layout(disk)
        print(f"disk: {disk.name} ({fmt}, virtual {meta['virtual-size'] / 2**30:.1f} GiB, "
              f"{layout.data_bytes / 2**20:.0f} MiB allocated); cores available: {default_workers()}; "
              f"level {args.level}; runs: {args.runs}; load before: {load()}")
        results: dict[str, list[tuple[float, float, int]]] = {}

        def record(label: str, action: Callable[[], int]) -> None:
            results.setdefault(label, []).append(measured(action))

        def ours_vmdk(workers: int) -> Callable[[], int]:
            def go() -> int:
                out = work / "ours.vmdk"
                with out.open("wb", buffering=4 << 20) as f:
                    size = write_stream_vmdk(disk, f, name=out.name, level=args.level, workers=workers).size
                out.unlink()
                return size
            return go

        def qemu_vmdk() -> int:
            out = work / "qemu.vmdk"
            run(["qemu-img", "convert", "-f", fmt, "-O", "vmdk", "-o", "subformat=streamOptimized",
                 str(disk), str(out)])
            size = out.stat().st_size
            out.unlink()
            return size

        vbox = None
        raw_copy = work / "disk.raw"
        if args.only != "ova" and not args.no_vbox:
            vbox = start_vbox(work)
            if vbox is not None and fmt != "raw":
                run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(disk), str(raw_copy)])

        def vbox_vmdk() -> int:
            assert vbox is not None
            out = work / "vbox.vmdk"
            vbox.manage("convertfromraw", str(raw_copy if fmt != "raw" else disk), str(out),
                        "--format", "VMDK", "--variant", "Stream", timeout=3600)
            size = out.stat().st_size
            vbox.manage("closemedium", "disk", str(out), check=False)
            out.unlink()
            return size

        cfg = load_config(None, ["vm.cpus=2", "vm.memory_mb=2048", "provision.skip=[k3s, csghub]",
                                 f"output.vmdk_compression_level={args.level}"], "libvirt", cwd=work)

        def ours_ova() -> int:
            result = write_ova(disk, cfg, work / "ours" / "ours.ova")
            for p in (work / "ours").iterdir():
                p.unlink()
            return result.size

        def pipeline_ova() -> int:
            return baseline_pipeline(disk, fmt, work / "base", cfg)

        try:
            for i in range(args.runs):
                plan: list[tuple[str, Callable[[], int]]] = []
                if args.only != "ova":
                    plan += [(f"ours vmdk, workers={w or default_workers()}", ours_vmdk(w)) for w in worker_counts]
                    plan.append(("qemu-img convert streamOptimized", qemu_vmdk))
                    if vbox is not None:
                        plan.append(("VBoxManage convertfromraw Stream", vbox_vmdk))
                if args.only != "vmdk":
                    plan += [("ours write_ova", ours_ova), ("qemu-img+sha256sum+tar+sha256sum", pipeline_ova)]
                for label, action in (plan if i % 2 == 0 else plan[::-1]):
                    record(label, action)
        finally:
            if vbox is not None:
                vbox.stop()

    print(f"load after: {load()}")
    best = {label: min(runs) for label, runs in results.items()}
    for label, (wall, cpu, size) in best.items():
        print(f"  {label:40} {wall:8.1f} s wall {cpu:8.1f} s CPU {size / 2**20:9.1f} MiB")
    for ours_label in [k for k in best if k.startswith("ours vmdk")]:
        for base_label in ("qemu-img convert streamOptimized", "VBoxManage convertfromraw Stream"):
            if base_label in best:
                report(ours_label, base_label, best, target=0.55)
    if "ours write_ova" in best:
        report("ours write_ova", "qemu-img+sha256sum+tar+sha256sum", best, target=0.55)
    return 0


def report(ours: str, base: str, best: dict[str, tuple[float, float, int]], *, target: float) -> None:
    (ow, oc, osz), (bw, bc, bsz) = best[ours], best[base]
    time_ratio, size_ratio = ow / bw, osz / bsz
    verdict = "OK" if time_ratio <= target and size_ratio <= 1.0 else "MISSED"
    print(f"{ours} vs {base}: time ratio {time_ratio:.3f} (target <= {target}), CPU ratio {oc / bc:.3f}, "
          f"size ratio {size_ratio:.4f} (target <= 1.0) {verdict}")


def start_vbox(work: Path) -> VBoxSession | None:
    """A VirtualBox session in the ``vbox`` tier's chroot, or None (said why) where it cannot run."""
    try:
        from appliance.providers.virtualbox.chroot import VBoxSession, ensure_chroot

        session = VBoxSession(ensure_chroot(), work / "vbox-session", [work])
        session.start()
        return session
    except (ApplianceError, OSError, ImportError) as exc:
        print(f"VirtualBox baseline skipped: {exc}")
        return None


def baseline_pipeline(disk: Path, fmt: str, out: Path, cfg: object) -> int:
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
    size = ova.stat().st_size
    for p in out.iterdir():
        p.unlink()
    return size


if __name__ == "__main__":
    sys.exit(main())
