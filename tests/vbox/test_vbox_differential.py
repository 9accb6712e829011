"""verify-ova against VirtualBox 7.2's real importer and QEMU, OVA by OVA (issue 21).

For every OVA of the hostile corpus (tests/unit/test_verify_hostile.py: its crafted archives,
its "two readers, two disks" descriptors and VMDKs, and the VirtualBox layouts it must accept):

- ``verify-ova --no-boot``'s structural check (with the DMTF schemas) decides;
- accepted: VirtualBox imports it, the imported disk is cloned to raw (``clonemedium --format
  RAW``) and must hold exactly what the verifier's own walk of the VMDK says it holds
  (``content_digest``); ``qemu-img convert`` of the checked copy must hold the same;
- refused: what VirtualBox does with it (refuses, or imports which disk) and, for a crafted
  VMDK, what ``qemu-img convert`` reads from it, are recorded (the table in docs/export.md).

A few archives are not handed to VirtualBox at all: sparse-file bombs and entity/nesting bombs
are bombs for any reader (3 GiB claimed, or XML that expands without bound), not questions of
reading one file two ways.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.providers.virtualbox.chroot import VBoxSession
from appliance.providers.virtualbox.export import parse_machinereadable
from appliance.verify_ova import check_structure
from appliance.verify_vmdk import raw_content_digest, walk_stream_vmdk
from tests.unit.conftest import ovf_schema_dir, ovf_schema_mirror  # noqa: F401 (fixtures)
from tests.unit.test_verify_hostile import (
    ACCEPT,
    CASES,
    EVIL,
    EVIL_GRAIN,
    GOOD_GRAIN,
    GRAIN,
    VMDK,
    VMDK_CASES,
    Parts,
    parts,  # noqa: F401 (fixture)
)

pytestmark = pytest.mark.vbox

NOT_FED = {"sparse-ovf-3GiB", "sparse-disk-1GiB", "sparse-pax-3GiB", "billion-laughs", "deep-nesting",
           "flat-tag-flood", "too-many-members"}
ALL = [(c[0], c[1]) for c in CASES if c[0] not in NOT_FED] + list(ACCEPT)
TABLE: dict[str, tuple[str, str, str]] = {}  # case -> (verifier, VirtualBox, qemu-img)


def digest_of(vmdk: bytes, tmp: Path, name: str) -> str:
    path = tmp / name
    path.write_bytes(vmdk)
    walk = walk_stream_vmdk(path, name)
    assert walk.problems == [], walk.problems
    return walk.content_digest


@pytest.fixture(scope="module")
def known(parts: Parts, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:  # noqa: F811
    """Content digests of the disks an OVA of the corpus could hand over: which one did a reader take?"""
    tmp = tmp_path_factory.mktemp("known")
    return {digest_of(parts.vmdk, tmp, VMDK): "the checked disk", digest_of(parts.evil, tmp, EVIL): "evil.vmdk"}


@pytest.fixture(scope="module", autouse=True)
def table_in_the_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    out = tmp_path_factory.getbasetemp() / "differential.md"
    lines = ["| OVA | verify-ova | VirtualBox 7.2 import | qemu-img convert |", "|---|---|---|---|"]
    lines += [f"| {case} | {v} | {b} | {q} |" for case, (v, b, q) in sorted(TABLE.items())]
    out.write_text("\n".join(lines) + "\n")
    print(f"\ndifferential table: {out}")


def what_is_in(raw: Path, size: int, known: dict[str, str]) -> str:
    """Which disk a raw image holds: a known one, or its first two grains (GOOD/EVIL/zeros)."""
    with raw.open("rb") as f:
        digest = raw_content_digest(f, size)
        if digest in known:
            return known[digest]
        f.seek(0)
        head = [f.read(GRAIN), f.read(GRAIN)]
    names = {GOOD_GRAIN: "GOOD", EVIL_GRAIN: "EVIL", bytes(GRAIN): "zeros"}
    return "grains " + ", ".join(names.get(g, "other") for g in head)


def import_and_read(vbox: VBoxSession, ova: Path, tmp: Path, name: str, known: dict[str, str]) -> str:
    """VirtualBox's verdict on ``ova``: its error, or which disk it imported."""
    done = vbox.manage("import", str(ova), "--vsys", "0", "--vmname", name, "--eula", "accept",
                       check=False, timeout=120)
    if "Successfully imported the appliance." not in done.stdout:
        # VBoxManage's first "error:" line is generic ("Appliance import failed"); the reason follows.
        errors = [ln.split("error:", 1)[-1].strip() for ln in (done.stderr + done.stdout).splitlines()
                  if "error:" in ln.lower() and "Details:" not in ln and "Context:" not in ln]
        reason = next((e for e in errors if not e.startswith("Appliance ")), errors[0] if errors else "")
        return "refused: " + (reason.replace(str(tmp) + "/", "")[:160] or f"exit {done.returncode}")
    try:
        info = parse_machinereadable(vbox.manage("showvminfo", name, "--machinereadable").stdout)
        disks = [v for k, v in sorted(info.items()) if v.endswith((".vmdk", ".vdi")) and "-ImageUUID" not in k]
        seen = []
        for n, disk in enumerate(disks):
            raw = tmp / f"{name}-{n}.raw"
            vbox.manage("clonemedium", "disk", disk, str(raw), "--format", "RAW")
            seen.append(what_is_in(raw, raw.stat().st_size, known))
            vbox.manage("closemedium", "disk", str(raw), "--delete", check=False)
        return "imported: " + ("; ".join(seen) or "no disk")
    finally:
        vbox.manage("unregistervm", name, "--delete", check=False)


def qemu_reads(vmdk: Path, tmp: Path, known: dict[str, str], size: int) -> str:
    raw = tmp / "qemu.raw"
    try:
        done = subprocess.run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", str(vmdk), str(raw)],
                              capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "hangs (killed after 20 s)"
    if done.returncode:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return "refused: " + last.replace(str(vmdk), vmdk.name).replace(str(tmp) + "/", "")[:160]
    return what_is_in(raw, size, known)


@pytest.mark.parametrize("case_id", [c[0] for c in ALL])
def test_verifier_accepts_only_what_virtualbox_and_qemu_import(
        case_id: str, parts: Parts, vbox: VBoxSession, ovf_schema_dir: Path,  # noqa: F811
        known: dict[str, str], tmp_path: Path) -> None:
    build = dict(ALL)[case_id]
    ova = build(parts, tmp_path / f"{case_id}.ova")
    work = tmp_path / "work"
    work.mkdir()
    started = time.monotonic()
    result = check_structure(ova, work, ovf_schema_dir)
    vm = f"diff-{case_id[:40]}-{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:6]}"
    if not result.findings:
        assert len(result.disk_content) == len(result.extracted) >= 1
        href, checked = next(iter(result.disk_content.items()))
        got = import_and_read(vbox, ova, tmp_path, vm, {checked: "the checked disk", **known})
        assert got == "imported: the checked disk", f"{case_id}: VirtualBox {got}"
        qemu = qemu_reads(result.extracted[href], tmp_path, {checked: "the checked disk"}, result.disks[href])
        assert qemu == "the checked disk", f"{case_id}: qemu-img read {qemu}"
        TABLE[case_id] = ("accepted", got, qemu)
    else:
        got = import_and_read(vbox, ova, tmp_path, vm, known)
        qemu = "-"
        if case_id in VMDK_CASES:
            disk = tmp_path / VMDK
            disk.write_bytes(VMDK_CASES[case_id]())
            qemu = qemu_reads(disk, tmp_path, known, 64 << 20)
        TABLE[case_id] = ("refused", got, qemu)
    shutil.rmtree(work, ignore_errors=True)
    print(f"{case_id}: {TABLE[case_id]} ({time.monotonic() - started:.1f} s)")
