"""The formats in ``output.formats`` beyond the first OVA, written from the VM's disk after the export.

The provider's export writes the first OVA format (``OutputSettings.primary_ova``: VirtualBox's
exporter or our writer). Every other listed format is written here from the disk the export was
made from, by the writer its record's ``kind`` names: ``ova`` -> ``appliance.export.ova.write_ova``
with the record; ``disk`` -> (bare disk images register their writer here). A provider that does
not expose its disk (VirtualBox) cannot write them, and says so before anything is written.
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


def extra_formats(cfg: ApplianceConfig) -> tuple[OutputFormat, ...]:
    """``output.formats`` without the first OVA format (the provider's export writes that one)."""
    primary = cfg.output.primary_ova
    return tuple(fmt for fmt in cfg.output.output_formats if fmt is not primary)


def write_extra_formats(cfg: ApplianceConfig, disk: Path | None, dest_dir: Path,
                        provider: str) -> list[ExtraOutput]:
    """Write every extra format from ``disk`` into ``dest_dir``; ``[]`` when there is none."""
    extras = extra_formats(cfg)
    if not extras:
        return []
    if disk is None:
        raise ExportError(
            f"output.formats lists {', '.join(f.name for f in extras)}, written from the VM's disk, which the "
            f"{provider} provider's export does not expose",
            hint="build with --provider libvirt, or list only the first OVA format in output.formats",
        )
    stem = f"{cfg.output.name}-{cfg.appliance_version}"
    written = []
    for fmt in extras:
        dest = Path(dest_dir) / fmt.file_name(stem)
        if fmt.kind == "ova":
            result = write_ova(disk, cfg, dest, output_format=fmt)
            written.append(ExtraOutput(fmt.name, result.path, result.sha256))
        else:
            raise ExportError(f"output format {fmt.name!r} ({fmt.kind}) has no writer in the build yet")
    return written
