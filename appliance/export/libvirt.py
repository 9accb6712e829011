"""Export, libvirt provider: the halted domain's disk becomes a VirtualBox-compatible OVA.

``export_libvirt(cfg, disk_path, dest_dir)`` writes ``<name>-<version>.ova`` (and its
``.sha256``) with our own OVA writer. ``find_domain_disk(uri, domain)`` finds the disk of a
domain through ``virsh domblklist`` (and ``virsh vol-path`` for pool volumes); pass
``domain=`` to ``export_libvirt`` to have it refuse a domain that is still running, since
copying a disk under a live guest gives a corrupt image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import ExportError
from appliance.export.ova import OvaResult, write_ova
from appliance.log import log
from appliance.run import run

if TYPE_CHECKING:  # pragma: no cover
    from appliance.config import ApplianceConfig


@dataclass(frozen=True)
class BlockDevice:
    """One row of ``virsh domblklist --details``."""

    type: str
    device: str
    target: str
    source: str


def parse_domblklist(text: str) -> list[BlockDevice]:
    """Rows of ``virsh domblklist --details`` output (header and rule lines skipped)."""
    rows: list[BlockDevice] = []
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        parts = ln.split(None, 3)
        if len(parts) < 4 or set(ln.strip()) == {"-"} or parts[:3] == ["Type", "Device", "Target"]:
            continue
        rows.append(BlockDevice(*parts))
    return rows


def find_domain_disk(uri: str, domain: str, *, pool: str | None = None) -> Path:
    """The file behind the domain's only hard disk (not CD-ROMs)."""
    result = run(["virsh", "-c", uri, "domblklist", domain, "--details"],
                 hint=f"does the libvirt domain {domain!r} exist on {uri}?")
    disks = [d for d in parse_domblklist(result.stdout) if d.device == "disk"]
    if len(disks) != 1:
        listed = ", ".join(f"{d.target}={d.source}" for d in disks) or "none"
        raise ExportError(
            f"domain {domain!r} has {len(disks)} hard disks ({listed}); the export expects exactly one"
        )
    source = disks[0].source
    if source.startswith("/"):
        return Path(source)
    if source == "-":
        raise ExportError(f"domain {domain!r}: disk {disks[0].target} has no source")
    # A pool volume given by name: ask libvirt for its path.
    argv = ["virsh", "-c", uri, "vol-path", source] + (["--pool", pool] if pool else [])
    return Path(run(argv).stdout.strip())


def domain_state(uri: str, domain: str) -> str:
    """``virsh domstate``: "running", "shut off", ..."""
    return run(["virsh", "-c", uri, "domstate", domain]).stdout.strip()


def export_libvirt(
    cfg: ApplianceConfig, disk_path: Path, dest_dir: Path, *, domain: str | None = None
) -> OvaResult:
    """Write ``dest_dir/<name>-<version>.ova`` from ``disk_path``; with ``domain``, check it is halted."""
    if domain is not None:
        state = domain_state(cfg.libvirt.uri, domain)
        if state != "shut off":
            raise ExportError(
                f"domain {domain!r} is {state!r}; export needs it shut off",
                hint="halt the VM first (vagrant halt), so the disk is consistent",
            )
    fmt = cfg.output.primary_ova
    dest = Path(dest_dir) / fmt.file_name(f"{cfg.output.name}-{cfg.appliance_version}")
    log.info(f"exporting {disk_path} to {dest} ({fmt.name})")
    return write_ova(Path(disk_path), cfg, dest, output_format=fmt)
