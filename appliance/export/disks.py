"""The appliance's disk on its own, for hypervisors that take a disk rather than an OVA: qcow2 and VHDX.

``convert_disk(ova, fmt, dest)`` reads the disk inside the verified OVA (its streamOptimized VMDK
member, in place: nothing is extracted) and writes it with ``qemu-img convert`` in ``fmt``, under a
temporary name in the destination folder, renamed into place only when complete. The disk is the
same bytes the OVA carries, sealed, so each copy made from it has its own first boot.

Per format (the ``kind="disk"`` records of ``appliance.formats``):

- **qcow2** (KVM/libvirt, Proxmox, OpenStack): version 3 (``compat=1.1``, read by every QEMU
  since 1.1) and compressed with zlib. The file is a download: compression makes it about the
  size of the OVA's VMDK instead of the guest's used bytes. Every reader takes compressed
  clusters (QEMU decompresses on read and writes new data uncompressed); Proxmox's ``qm
  importdisk`` and OpenStack's image conversion rewrite the disk into their storage anyway.
  zlib, not zstd: zstd-compressed qcow2 needs QEMU 5.1 or newer to read.
- **VHDX** (Hyper-V, Generation 1: the disk boots through its MBR and extlinux, BIOS only):
  dynamic (grows as the guest writes), with 1 MiB blocks, the block size Microsoft recommends
  for Linux guests on dynamic VHDX (the 32 MiB default would allocate a whole block for each
  scattered write). VHDX has no compression.

``disk_member(ova)`` names the VMDK inside the OVA and ``ova_disk_spec`` says it to qemu-img as a
``json:`` filename (the raw driver's ``offset``/``size`` window over the OVA file), so a convert or
compare reads the OVA's own bytes. ``appliance.verify_disk`` reads the result back with ``qemu-img
check`` and ``qemu-img compare`` against that same member, then boots it.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.digest import sha256_file
from appliance.errors import ExportError
from appliance.formats import FORMATS, DiskProfile, OutputFormat
from appliance.log import human_size, log
from appliance.run import run

if TYPE_CHECKING:  # pragma: no cover
    from appliance.config import ApplianceConfig


def disk_formats() -> dict[str, OutputFormat]:
    """The registered bare-disk formats (``kind="disk"`` in ``appliance.formats``), by name."""
    return {name: fmt for name, fmt in FORMATS.items() if fmt.kind == "disk"}


def disk_profile(fmt: OutputFormat) -> DiskProfile:
    if fmt.disk is None:
        raise ExportError(f"output format {fmt.name!r} is not a disk format")
    return fmt.disk


@dataclass(frozen=True)
class DiskResult:
    """A written disk: where it is, its format, digest, size and virtual size."""

    path: Path
    format: OutputFormat
    sha256: str
    size: int
    virtual_size: int


@dataclass(frozen=True)
class OvaDisk:
    """The VMDK member of an OVA: its name and where its bytes are in the OVA file."""

    ova: Path
    name: str
    offset: int
    size: int


def disk_member(ova: Path) -> OvaDisk:
    """The only ``.vmdk`` member of ``ova`` (one disk per appliance)."""
    try:
        with tarfile.open(ova, "r:") as tar:
            disks = [m for m in tar.getmembers() if m.isreg() and m.name.lower().endswith(".vmdk")]
    except (OSError, tarfile.TarError) as exc:
        raise ExportError(f"cannot read the disk of {ova}: {exc}") from None
    if len(disks) != 1:
        raise ExportError(f"{ova} holds {len(disks)} VMDK disks; a disk format is written from exactly one")
    return OvaDisk(ova, disks[0].name, disks[0].offset_data, disks[0].size)


def ova_disk_spec(disk: OvaDisk) -> str:
    """qemu-img's name for the VMDK inside the OVA: the vmdk driver over a raw window of the OVA file."""
    return "json:" + json.dumps({
        "driver": "vmdk",
        "file": {"driver": "raw", "offset": disk.offset, "size": disk.size,
                 "file": {"driver": "file", "filename": str(disk.ova.resolve())}},
    })


def format_for(name: str) -> OutputFormat:
    formats = disk_formats()
    try:
        return formats[name]
    except KeyError:
        raise ExportError(f"disk format {name!r}: allowed are {', '.join(formats)}") from None


def convert_argv(source: str, fmt: OutputFormat, target: Path) -> list[str]:
    """The ``qemu-img convert`` command that writes ``source`` (a VMDK) as ``fmt``."""
    disk = disk_profile(fmt)
    return ["qemu-img", "convert", "-f", "vmdk", "-O", disk.qemu_format, *(["-c"] if disk.compressed else []),
            *(["-o", ",".join(disk.qemu_options)] if disk.qemu_options else []), source, str(target)]


def virtual_size(path: Path, qemu_format: str) -> int:
    info = json.loads(run(["qemu-img", "info", "--output=json", "-f", qemu_format, str(path)]).stdout)
    return int(info["virtual-size"])


def convert_disk(ova: Path, fmt: OutputFormat, dest: Path) -> DiskResult:
    """Write the disk inside ``ova`` to ``dest`` as ``fmt``; the file appears only when complete."""
    disk = disk_member(ova)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with log.step(f"write {dest.name} ({fmt.name}, for {', '.join(fmt.hypervisors)}) from {disk.name}"):
            run(convert_argv(ova_disk_spec(disk), fmt, tmp), timeout=3600,
                hint="qemu-img (qemu-utils) writes the disk formats; is the disk folder full?")
            size = virtual_size(tmp, disk_profile(fmt).qemu_format)
            digest = sha256_file(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    result = DiskResult(dest, fmt, digest, dest.stat().st_size, size)
    log.info(f"{dest.name}: {human_size(result.size)} (virtual {human_size(size)})")
    return result


# -- the qcow2's sidecar: a libvirt domain ---------------------------------------------------------

LIBVIRT_IMAGE_DIR = "/var/lib/libvirt/images"


def libvirt_domain_xml(name: str, disk_file: str, *, cpus: int, memory_mb: int) -> str:
    """A libvirt domain for the qcow2 (``virsh define``), the hardware the verify boot proved.

    BIOS boot (the disk's MBR and extlinux: no UEFI loader), a virtio disk and NIC on libvirt's
    ``default`` network, a serial console (``virsh console`` shows the first boot's login line)
    and a VNC display. The disk is expected in libvirt's image folder; the docs say to copy it
    there, or to edit the ``source`` path. Every value goes through ElementTree (escaped).
    """
    import xml.etree.ElementTree as ET

    domain = ET.Element("domain", type="kvm")
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "memory", unit="MiB").text = str(memory_mb)
    ET.SubElement(domain, "vcpu").text = str(cpus)
    os_ = ET.SubElement(domain, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_, "boot", dev="hd")
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(domain, "cpu", mode="host-model")
    ET.SubElement(domain, "on_poweroff").text = "destroy"
    ET.SubElement(domain, "on_reboot").text = "restart"
    devices = ET.SubElement(domain, "devices")
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2", discard="unmap")
    ET.SubElement(disk, "source", file=f"{LIBVIRT_IMAGE_DIR}/{disk_file}")
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    nic = ET.SubElement(devices, "interface", type="network")
    ET.SubElement(nic, "source", network="default")
    ET.SubElement(nic, "model", type="virtio")
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    ET.SubElement(devices, "graphics", type="vnc", listen="127.0.0.1")
    # Entropy from the host: the first boot makes the copy's keys and passwords.
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"



# -- the build's export stage (appliance.export.extra) ----------------------------------------------


def sidecar_text(fmt: OutputFormat, stem: str, disk_file: str, *, cpus: int, memory_mb: int) -> str | None:
    """The sidecar file a disk format ships beside its disk (``DiskProfile.sidecar_suffix``), or None."""
    suffix = disk_profile(fmt).sidecar_suffix
    if suffix is None:
        return None
    if suffix == ".xml":
        return libvirt_domain_xml(stem, disk_file, cpus=cpus, memory_mb=memory_mb)
    raise ExportError(f"output format {fmt.name!r}: no writer for a {suffix!r} sidecar")


def write_disk_format(
    cfg: ApplianceConfig, fmt: OutputFormat, ova: Path, folder: Path
) -> tuple[DiskResult, Path | None]:
    """Write ``fmt`` from the disk inside ``ova`` into ``folder`` as ``<name>-<version><tag><suffix>``, and
    its sidecar (``<name>-<version><tag><sidecar_suffix>``) when the record has one; returns both."""
    stem = f"{cfg.output.name}-{cfg.appliance_version}"
    result = convert_disk(ova, fmt, folder / fmt.file_name(stem))
    text = sidecar_text(fmt, stem, result.path.name, cpus=cfg.vm.cpus, memory_mb=cfg.vm.memory_mb)
    if text is None:
        return result, None
    sidecar = folder / f"{stem}{fmt.tag}{disk_profile(fmt).sidecar_suffix}"
    sidecar.write_text(text, encoding="utf-8")
    sidecar.chmod(0o644)
    return result, sidecar
