"""The output formats, as data: one frozen record per format the build can write.

A record holds everything the code around it needs to know about a format, so that adding a
format means adding one record here (and its tests), not editing the writer, the manifest,
the verifier and the docs one by one:

- the OVA writer (``appliance.export.ovf`` / ``ova``) reads the OVF version and namespace, the
  hardware family, the controller and NIC items, the disk format URI, whether to write
  VirtualBox's ``vbox:Machine`` section and the manifest's digest from ``OutputFormat.ovf``;
- the VirtualBox exporter (``appliance.providers.virtualbox.export``) reads the ``VBoxManage export``
  flag (``OvfProfile.vboxmanage_flag``; formats VirtualBox cannot write have none);
- the verifier (``appliance.verify_ova``) reads ``OvfProfile.manifest_digests`` (what a manifest
  of this OVF version may hold) through ``manifest_digests_for``;
- the docs: the table and the import notes at the top of docs/formats.md are generated from
  ``title``, ``hypervisors``, ``how_to_import``, ``notes`` and the profiles (``invoke docs``;
  ``tests/unit/test_formats.py`` fails when the committed page is not current).

Two kinds of records:

- ``kind="ova"``: an OVA (tar of ``.ovf``, ``.mf``, streamOptimized VMDK); ``ovf`` says how.
- ``kind="disk"``: a bare disk image plus an optional sidecar file (e.g. a libvirt domain XML or
  a settings note); ``disk`` says how (``DiskProfile``: the ``qemu-img`` output format and its
  options, the sidecar's suffix). Such a format registers with ``register(OutputFormat(name=...,
  kind="disk", suffix=".qcow2", disk=DiskProfile(qemu_format="qcow2", ...), ...))``.

``output.formats`` (appliance.config) lists the names to build; its default is the VirtualBox
OVA alone. This module imports nothing from the rest of the package, so everything may use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

OvfFormat = Literal["ovf10", "ovf20"]  # the OVF version of a descriptor (1.x or 2.x envelope)
ManifestDigest = Literal["SHA1", "SHA256", "SHA512"]
FormatKind = Literal["ova", "disk"]

NS_OVF: dict[OvfFormat, str] = {
    "ovf10": "http://schemas.dmtf.org/ovf/envelope/1",
    "ovf20": "http://schemas.dmtf.org/ovf/envelope/2",
}
OVF_VERSION_TEXT: dict[OvfFormat, str] = {"ovf10": "1.0", "ovf20": "2.0"}
# Subfolder of the pinned DMTF schemas (appliance.artifacts.OVF_SCHEMA_SETS) for each version.
SCHEMA_SET: dict[OvfFormat, str] = {"ovf10": "ovf1", "ovf20": "ovf2"}
# What the DMTF spec asks of a manifest (DSP0243 1.1.0 clause 5.1: SHA-1 digests; 2.0.x: SHA-256,
# SHA-1 no longer listed), and what real readers take beyond it: VirtualBox reads SHA1, SHA256 and
# SHA512 in either version, VMware's ovftool writes SHA256 in OVF 1.0 packages by default.
MANIFEST_DIGESTS_READ: dict[OvfFormat, tuple[ManifestDigest, ...]] = {
    "ovf10": ("SHA1", "SHA256", "SHA512"),
    "ovf20": ("SHA1", "SHA256", "SHA512"),
}

STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"


@dataclass(frozen=True)
class ControllerChoice:
    """The disk controller item: CIM resource type and the subtype string importers map."""

    resource_type: int  # 20 = other storage device (SATA), 6 = parallel SCSI HBA
    subtype: str  # "AHCI" (VirtualBox), "vmware.sata.ahci" (VMware), "VirtualSCSI", "lsilogicsas"
    element_name: str  # rasd:ElementName / Caption, as the writing tool names it
    description: str
    guest_driver: str  # the Debian 12 kernel driver that runs it (docs)


@dataclass(frozen=True)
class NicChoice:
    """The NIC item's subtype; ``None``: VirtualBox's ``virtualbox.nic_type`` setting decides."""

    subtype: str | None
    guest_driver: str  # the Debian 12 kernel driver (docs)
    qemu_device: str = "e1000"  # the QEMU device the verify boot gives the copy: the NIC this format describes


@dataclass(frozen=True)
class OvfProfile:
    """How an OVA of this format is written and what a reader of it may expect."""

    version: OvfFormat
    manifest_digest: ManifestDigest  # the one the writer uses
    system_type: str  # vssd:VirtualSystemType, the "virtual hardware family"
    controller: ControllerChoice
    nic: NicChoice
    vbox_machine: bool  # write VirtualBox's own vbox:Machine section (NAT forwards, no VRDE/audio)
    disk_format_uri: str = STREAM_OPTIMIZED
    vboxmanage_flag: str | None = None  # `VBoxManage export` writes this format with it; None: it cannot
    vmware_os_type: str | None = None  # vmw:osType on the OperatingSystemSection (VMware readers)
    network_name: str = "NAT"  # the logical network the NIC is on (an importer maps it to one of its own)
    memory_units: str = "MegaBytes"  # rasd:AllocationUnits of the memory item, as the target's own exports say
    system_name: bool = False  # write VirtualSystem/Name (VMware's exports do; vSphere and virt-v2v read it)

    @property
    def namespace(self) -> str:
        return NS_OVF[self.version]

    @property
    def version_text(self) -> str:
        return OVF_VERSION_TEXT[self.version]

    @property
    def schema_set(self) -> str:
        return SCHEMA_SET[self.version]


@dataclass(frozen=True)
class DiskProfile:
    """How a bare-disk format is written: ``qemu-img convert -O <qemu_format> [-c] -o <options>``
    (``appliance.export.disks``), and what the verify boot gives it (``appliance.verify_boot``)."""

    qemu_format: str
    qemu_options: tuple[str, ...] = ()
    sidecar_suffix: str | None = None  # e.g. ".xml" for a libvirt domain, None: no sidecar
    compressed: bool = False  # qemu-img convert -c
    boot_hardware: str = "virtio"  # a name in appliance.verify_boot.BOOT_HARDWARE: its hypervisor's devices


@dataclass(frozen=True)
class OutputFormat:
    """One output format: what it is, who imports it, and how it is written."""

    name: str  # the spelling in `output.formats`
    kind: FormatKind
    suffix: str  # file suffix, ".ova", ".qcow2", ...
    tag: str  # between the stem and the suffix, so formats sharing a suffix get distinct files
    title: str  # docs/formats.md heading
    hypervisors: tuple[str, ...]  # who imports it (docs)
    how_to_import: str  # one paragraph for docs/formats.md
    ovf: OvfProfile | None = None  # kind "ova"
    disk: DiskProfile | None = None  # kind "disk"
    notes: tuple[str, ...] = field(default=())  # docs: further facts about the choices

    def __post_init__(self) -> None:
        if (self.kind == "ova") != (self.ovf is not None) or (self.kind == "disk") != (self.disk is not None):
            raise ValueError(f"format {self.name!r}: kind {self.kind!r} needs exactly its own profile")

    def file_name(self, stem: str) -> str:
        """The artifact's file name for ``<name>-<version>`` = ``stem``."""
        return f"{stem}{self.tag}{self.suffix}"


# -- the records -------------------------------------------------------------------------------

_VBOX_SATA = ControllerChoice(20, "AHCI", "sataController0", "SATA Controller", "ahci")
_VBOX_NIC = NicChoice(None, "e1000 or virtio_net")

VIRTUALBOX_OVA = OutputFormat(
    name="virtualbox-ova",
    kind="ova",
    suffix=".ova",
    tag="",
    title="VirtualBox OVA (OVF 1.0)",
    hypervisors=("VirtualBox 6.1 and later",),
    how_to_import="VirtualBox: File > Import Appliance, or `VBoxManage import <name>-<version>.ova`.",
    ovf=OvfProfile(
        version="ovf10", manifest_digest="SHA1", system_type="virtualbox-2.2", controller=_VBOX_SATA,
        nic=_VBOX_NIC, vbox_machine=True, vboxmanage_flag="--ovf10",
    ),
    notes=("SHA-1 manifest: what DSP0243 1.x prescribes and what `VBoxManage export --ovf10` writes.",),
)

VIRTUALBOX_OVA_OVF20 = OutputFormat(
    name="virtualbox-ova-ovf20",
    kind="ova",
    suffix=".ova",
    tag="-ovf20",
    title="VirtualBox OVA (OVF 2.0)",
    hypervisors=("VirtualBox 6.1 and later",),
    how_to_import="VirtualBox: File > Import Appliance, or `VBoxManage import <name>-<version>-ovf20.ova`.",
    ovf=OvfProfile(
        version="ovf20", manifest_digest="SHA256", system_type="virtualbox-2.2", controller=_VBOX_SATA,
        nic=_VBOX_NIC, vbox_machine=True, vboxmanage_flag="--ovf20",
    ),
    notes=("SHA-256 manifest: what DSP0243 2.0 prescribes and what `VBoxManage export --ovf20` writes.",),
)

# VMware vSphere (ESXi 6.7 and later), VMware Workstation/Fusion. Chosen from VMware's own OVF 1.0
# exports (../shared/ovf/samples/vmware-ovf10-*, ovftool 4.3) and what Debian 12's kernel drives:
# - OVF 1.0: vSphere's importer takes 1.0 (Workstation/Fusion refuse OVF 2.0 elements without --lax);
# - vmx-14: ESXi 6.7's hardware version, deployable on every ESXi from 6.7 up (a vmx-NN runs on its ESXi
#   and every later one); Debian 12 needs nothing newer (vmx-13/ESXi 6.5 would do too, but 6.5's vCenter
#   refuses SHA256 manifests, see below);
# - SATA AHCI (`vmware.sata.ahci`, as ovftool writes it): Debian's `ahci` driver, in every initramfs, the
#   same controller the VirtualBox OVA boots from; PVSCSI would need `vmw_pvscsi` in the initramfs and is
#   not read by VirtualBox's importer;
# - VMXNET3 (`VmxNet3`): Debian's `vmxnet3` driver (in the kernel since 2.6.32); the guest configures
#   every Ethernet interface by DHCP whatever its name, so the NIC's name (ens192 on ESXi) does not matter;
# - SHA256 manifest: vSphere 7 and later refuse SHA1 manifests; ESXi/vCenter 6.7 take SHA256 (ovftool 4.x
#   writes SHA256 by default).
VMWARE_OVA = OutputFormat(
    name="vmware-ova",
    kind="ova",
    suffix=".ova",
    tag="-vmware",
    title="VMware OVA (OVF 1.0, vmx-14)",
    hypervisors=("VMware vSphere/ESXi 6.7 and later", "VMware Workstation 15+ / Fusion 11+"),
    how_to_import=(
        "vSphere Client: right-click a host or cluster > Deploy OVF Template > Local file > "
        "`<name>-<version>-vmware.ova`, map the network `VM Network` to a port group; or "
        "`ovftool --net:\"VM Network=<port group>\" <name>-<version>-vmware.ova "
        "vi://<user>@<vcenter>/<datacenter>/host/<cluster>`. "
        "Workstation/Fusion: File > Open."
    ),
    ovf=OvfProfile(
        version="ovf10", manifest_digest="SHA256", system_type="vmx-14",
        controller=ControllerChoice(20, "vmware.sata.ahci", "sataController0", "SATA Controller", "ahci"),
        nic=NicChoice("VmxNet3", "vmxnet3", qemu_device="vmxnet3"), vbox_machine=False,
        vmware_os_type="debian10_64Guest",
        network_name="VM Network", memory_units="byte * 2^20", system_name=True,
    ),
    notes=(
        "Same sealed disk as the VirtualBox OVA: every imported copy makes its own secrets on its first boot.",
        "No NAT port forwards: the VM takes an address on its port group, so, as with bridged networking, build "
        "with `csghub.domain` set to a name that reaches that address (docs/networking.md): CSGHub sends the "
        "browser to the names it was installed with.",
        "SHA-256 manifest in an OVF 1.0 package (ovftool's default; vSphere 7+ refuses SHA-1). COT 2.2.1 checks "
        "every OVF 1.x manifest with SHA-1 whatever the line says, and logs the digests as 'tampered'.",
    ),
)

# Bare disks, written from the disk inside the verified OVA (appliance/export/disks.py; docs/formats.md
# says why each option).
QCOW2 = OutputFormat(
    name="qcow2",
    kind="disk",
    suffix=".qcow2",
    tag="",
    title="qcow2 disk (BIOS, virtio) and libvirt domain",
    hypervisors=("KVM/libvirt", "Proxmox VE", "OpenStack"),
    how_to_import="libvirt: `virsh define <name>-<version>.xml`; Proxmox: `qm importdisk`; OpenStack: "
                  "`openstack image create --disk-format qcow2` (docs/formats.md#qcow2).",
    disk=DiskProfile(qemu_format="qcow2", qemu_options=("compat=1.1", "compression_type=zlib"),
                     sidecar_suffix=".xml", compressed=True, boot_hardware="virtio"),
    notes=("qcow2 v3, zlib-compressed: a download about the OVA's size, readable by every QEMU since 1.1.",),
)

VHDX = OutputFormat(
    name="vhdx",
    kind="disk",
    suffix=".vhdx",
    tag="",
    title="VHDX disk (Hyper-V Generation 1)",
    hypervisors=("Hyper-V (Windows Server 2012 and later, Windows 8 and later)",),
    how_to_import="Hyper-V: `New-VM -Generation 1 -VHDPath <name>-<version>.vhdx`, Dynamic Memory off "
                  "(docs/formats.md#vhdx).",
    disk=DiskProfile(qemu_format="vhdx", qemu_options=("subformat=dynamic", "block_size=1M"),
                     boot_hardware="ide"),
    notes=("Dynamic, 1 MiB blocks (Microsoft's advice for Linux guests); Generation 1: the disk boots by BIOS.",),
)

FORMATS: dict[str, OutputFormat] = {}


def register(fmt: OutputFormat) -> OutputFormat:
    """Add ``fmt`` to the known formats (its name must be new); returns it."""
    if fmt.name in FORMATS:
        raise ValueError(f"output format {fmt.name!r} is registered twice")
    if any(other.file_name("x") == fmt.file_name("x") for other in FORMATS.values()):
        raise ValueError(f"output format {fmt.name!r} would write the same file name as another format")
    FORMATS[fmt.name] = fmt
    return fmt


for _record in (VIRTUALBOX_OVA, VIRTUALBOX_OVA_OVF20, VMWARE_OVA, QCOW2, VHDX):
    register(_record)

DEFAULT_FORMATS = (VIRTUALBOX_OVA.name,)


def get_format(name: str) -> OutputFormat:
    """The record named ``name``; ``KeyError`` with the allowed names otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown output format {name!r} (allowed: {', '.join(FORMATS)})") from None


def virtualbox_ova(version: OvfFormat) -> OutputFormat:
    """The VirtualBox OVA record of OVF ``version`` (``ovf10`` / ``ovf20``)."""
    return VIRTUALBOX_OVA if version == "ovf10" else VIRTUALBOX_OVA_OVF20


def manifest_digests_for(version: OvfFormat) -> tuple[ManifestDigest, ...]:
    """Digest names a manifest beside an OVF ``version`` descriptor may use (the verifier's rule)."""
    return MANIFEST_DIGESTS_READ[version]
