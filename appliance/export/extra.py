"""The formats in ``output.formats`` beyond the first OVA, written from the VM's disk after the export.

The provider's export writes the first OVA format (``OutputSettings.primary_ova``: VirtualBox's
exporter or our writer). Every other listed format is written here from the disk the export was
made from, by the writer its record's ``kind`` names: ``ova`` -> ``appliance.export.ova.write_ova``
with the record, from the VM's disk (a provider that does not expose its disk, VirtualBox, cannot
write them, and says so before anything is written); ``disk`` -> ``appliance.export.disks``, from
the disk inside the OVA just exported (the same sealed bytes, whatever the provider), with its
sidecar file when the record has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import ExportError
from appliance.export.ova import write_ova
from appliance.formats import OutputFormat

if TYPE_CHECKING:  # pragma: no cover
    from appliance.config import ApplianceConfig


@dataclass(frozen=True)
class ExtraOutput:
    """One written extra format: which, where, and its SHA256 (as published in ``<file>.sha256``)."""

    format: str
    path: Path
    sha256: str
    sidecar: Path | None = None  # a disk format's sidecar (the qcow2's libvirt domain), published beside it


def extra_formats(cfg: ApplianceConfig) -> tuple[OutputFormat, ...]:
    """``output.formats`` without the first OVA format (the provider's export writes that one)."""
    primary = cfg.output.primary_ova
    return tuple(fmt for fmt in cfg.output.output_formats if fmt is not primary)


def write_extra_formats(cfg: ApplianceConfig, disk: Path | None, dest_dir: Path,
                        provider: str, ova: Path | None = None) -> list[ExtraOutput]:
    """Write every extra format into ``dest_dir``: OVAs from ``disk``, disk formats from the disk inside
    ``ova`` (the OVA the export just wrote); ``[]`` when there is none."""
    extras = extra_formats(cfg)
    if not extras:
        return []
    from_disk = [f for f in extras if f.kind == "ova"]
    if from_disk and disk is None:
        raise ExportError(
            f"output.formats lists {', '.join(f.name for f in from_disk)}, written from the VM's disk, which the "
            f"{provider} provider's export does not expose",
            hint="build with --provider libvirt, or list only the first OVA format in output.formats",
        )
    if ova is None and any(f.kind == "disk" for f in extras):
        raise ExportError("the disk formats are written from the exported OVA's disk: no OVA was given")
    stem = f"{cfg.output.name}-{cfg.appliance_version}"
    written = []
    for fmt in extras:
        dest = Path(dest_dir) / fmt.file_name(stem)
        if fmt.kind == "ova":
            assert disk is not None
            result = write_ova(disk, cfg, dest, output_format=fmt)
            written.append(ExtraOutput(fmt.name, result.path, result.sha256))
        elif fmt.kind == "disk":
            from appliance.export.disks import write_disk_format

            assert ova is not None
            image, sidecar = write_disk_format(cfg, fmt, ova, Path(dest_dir))
            written.append(ExtraOutput(fmt.name, image.path, image.sha256, sidecar))
        else:
            raise ExportError(f"output format {fmt.name!r} ({fmt.kind}) has no writer in the build yet")
    return written
