"""The OVF descriptor for the libvirt export path, written the way VirtualBox writes its own.

``ovf_descriptor(cfg, disk)`` returns the bytes of an ``.ovf`` file describing one virtual
system: CPUs and memory from ``cfg.vm``, a SATA (AHCI) controller holding the disk, one Intel
PRO/1000 NIC on NAT, and the product, annotation and licence sections from ``cfg.output``.
The layout follows what ``VBoxManage export`` produces (element and section order, namespace
prefixes, the Item fields and their alphabetical order, the Info texts), so VirtualBox imports
it as if it had written it (checked against VirtualBox 7.2 in the vbox test tier). The hardware
family, controller, NIC, network name and VirtualBox's own section come from the output format's
record (``appliance.formats``): the VMware OVA uses VMware's spellings (docs/formats.md).

NAT port forwards have no place in standard OVF: VirtualBox keeps them only in its own
``vbox:Machine`` section (a copy of its settings-file format). Without that section an
imported appliance has no forwards and the evaluator cannot reach the web UI, so we write a
small ``vbox:Machine`` (settings format 1.15, as in VirtualBox 5.x exports, which every later
VirtualBox imports) holding the hardware, the NAT forwards and the disk attachment. Other OVF
readers skip it (``ovf:required="false"``). ``include_vbox_machine=False`` leaves it out.

The output is deterministic: no timestamps, and the UUIDs are derived from the disk's
digest, so the same inputs give the same bytes.

``ovf_schema`` / ``schema_errors`` validate a descriptor against the DMTF schemas (the pinned,
verified cache folder ``appliance.artifacts.fetch_ovf_schemas`` makes), accepting ``vbox:Machine``
through a small extension schema.
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape

from appliance.errors import ExportError, PrerequisiteMissing
from appliance.formats import NS_OVF, SCHEMA_SET, OutputFormat, OvfFormat, OvfProfile, virtualbox_ova
from appliance.inputs import describe, open_regular

if TYPE_CHECKING:  # pragma: no cover
    from appliance.config import ApplianceConfig

NS_RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
NS_VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
# OVF 2.0 only. VirtualBox writes these two with a ".xsd" suffix, which no schema knows; we use
# the real namespace names so the descriptor validates (see docs/export.md).
NS_SASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData"
NS_EPASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_EthernetPortAllocationSettingData"
NS_XSI = "http://www.w3.org/2001/XMLSchema-instance"
NS_VBOX = "http://www.virtualbox.org/ovf/machine"
NS_VMW = "http://www.vmware.com/schema/ovf"
DISK_ID = "vmdisk1"
FILE_ID = "file1"
# CIM operating system id 96 is "Debian 64-Bit"; VirtualBox maps it to its own type Debian_64.
CIM_OS_DEBIAN_64 = "96"
VBOX_OS_TYPE = "Debian_64"
DEBIAN_DESCRIPTION = "Debian GNU/Linux 12 (64-bit)"
VBOX_SETTINGS_VERSION = "1.15-linux"
# Names the deterministic UUIDs (disk, machine) are derived from.
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/OpenCSGs/csghub/appliance")

_NIC_SUBTYPE = {"82540EM": "E1000", "82543GC": "E1000", "82545EM": "E1000", "virtio": ""}
_GRAPHICS = {"vmsvga": "VMSVGA", "vboxsvga": "VBoxSVGA", "vboxvga": "VBoxVGA", "none": "None"}
# XML 1.0 forbids these characters outright (even escaped).
_XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass(frozen=True)
class DiskFacts:
    """What the descriptor says about the disk: its name in the OVA, sizes and digest."""

    href: str
    file_size: int
    capacity: int
    sha256: str
    sha1: str = ""  # when the manifest names SHA-1 (OVF 1.x formats); the UUIDs derive from sha256

    @property
    def uuid(self) -> str:
        return str(uuid.uuid5(_UUID_NAMESPACE, f"disk:{self.sha256}"))


# -- a tiny XML tree that keeps prefixes and attribute order exactly as written ---------------


@dataclass
class _Node:
    tag: str
    attrs: list[tuple[str, str]] = field(default_factory=list)
    text: str | None = None
    children: list[_Node] = field(default_factory=list)

    def add(self, tag: str, text: str | int | None = None, **attrs: str) -> _Node:
        # Attribute names arrive as keyword arguments: "ovf_id" stands for "ovf:id".
        child = _Node(tag, [(k.replace("_", ":", 1) if ":" not in k else k, v) for k, v in attrs.items()],
                      None if text is None else str(text))
        self.children.append(child)
        return child

    def serialize(self, depth: int = 0) -> Iterator[str]:
        pad = "  " * depth
        attrs = "".join(f" {k}={_quote(v)}" for k, v in self.attrs)
        if self.children:
            yield f"{pad}<{self.tag}{attrs}>"
            for child in self.children:
                yield from child.serialize(depth + 1)
            yield f"{pad}</{self.tag}>"
        elif self.text is not None:
            yield f"{pad}<{self.tag}{attrs}>{escape(self.text)}</{self.tag}>"
        else:
            yield f"{pad}<{self.tag}{attrs}/>"


def _quote(value: str) -> str:
    return '"' + escape(value, {'"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"}) + '"'


def _check_text(what: str, text: str) -> str:
    bad = _XML_FORBIDDEN.search(text)
    if bad:
        raise ExportError(
            f"{what} contains the control character U+{ord(bad.group()):04X}, which XML cannot carry",
            hint="remove control characters (tabs and newlines are fine)",
        )
    return text


# -- the descriptor --------------------------------------------------------------------------


def output_format_for(
    cfg: ApplianceConfig, output_format: OutputFormat | None = None, ovf_format: OvfFormat | None = None
) -> OutputFormat:
    """The OVA format to write: ``output_format``, else the VirtualBox OVA of ``ovf_format``, else the
    configuration's first OVA format (``output.formats``)."""
    if output_format is not None:
        if output_format.ovf is None:
            raise ExportError(f"output format {output_format.name!r} is not an OVA format")
        return output_format
    if ovf_format is not None:
        if ovf_format not in NS_OVF:
            raise ExportError(f"unknown OVF format {ovf_format!r}", hint="use ovf10 or ovf20")
        return virtualbox_ova(ovf_format)
    return cfg.output.primary_ova


def ovf_descriptor(
    cfg: ApplianceConfig,
    disk: DiskFacts,
    *,
    output_format: OutputFormat | None = None,
    ovf_format: OvfFormat | None = None,
    include_vbox_machine: bool | None = None,
) -> bytes:
    """The ``.ovf`` for ``cfg`` and ``disk``: UTF-8 bytes, identical for identical inputs.

    ``output_format`` (a record of ``appliance.formats``) says how; ``ovf_format`` is short for the
    VirtualBox OVA of that OVF version; neither: the configuration's first OVA format.
    ``include_vbox_machine`` overrides the record's choice (tests).
    """
    profile: OvfProfile = output_format_for(cfg, output_format, ovf_format).ovf  # type: ignore[assignment]
    fmt = profile.version
    ovf2 = fmt == "ovf20"
    vbox = profile.vbox_machine if include_vbox_machine is None else include_vbox_machine
    eula = _eula_text(cfg)

    env = _Node("Envelope", [
        ("ovf:version", profile.version_text),
        ("xml:lang", "en-US"),
        ("xmlns", NS_OVF[fmt]),
        ("xmlns:ovf", NS_OVF[fmt]),
        ("xmlns:rasd", NS_RASD),
        ("xmlns:vssd", NS_VSSD),
        ("xmlns:xsi", NS_XSI),
    ])
    if profile.vbox_machine:
        env.attrs.append(("xmlns:vbox", NS_VBOX))
    if profile.vmware_os_type:
        env.attrs.append(("xmlns:vmw", NS_VMW))
    if ovf2:
        env.attrs += [("xmlns:epasd", NS_EPASD), ("xmlns:sasd", NS_SASD)]

    refs = env.add("References")
    refs.add("File", ovf_id=FILE_ID, ovf_href=disk.href, ovf_size=str(disk.file_size))

    disks = env.add("DiskSection")
    disks.add("Info", "List of the virtual disks used in the package")
    disk_attrs = {
        "ovf:capacity": str(disk.capacity),
        "ovf:diskId": DISK_ID,
        "ovf:fileRef": FILE_ID,
        "ovf:format": profile.disk_format_uri,
    }
    if profile.vbox_machine:
        disk_attrs["vbox:uuid"] = disk.uuid
    disks.add("Disk", **disk_attrs)

    nets = env.add("NetworkSection")
    nets.add("Info", "Logical networks used in the package")
    net = nets.add("Network", ovf_name=profile.network_name)
    net.add("Description", "Logical network used by this appliance.")

    name = cfg.vm.name
    vs = env.add("VirtualSystem", ovf_id=name)
    vs.add("Info", "A virtual machine")
    if profile.system_name:
        vs.add("Name", name)

    out = cfg.output
    # Like VirtualBox: the section only when something is set, and only the fields that are.
    product_fields = [("Product", _check_text("output.product", out.product)),
                      ("Vendor", _check_text("output.vendor", out.vendor)),
                      ("Version", cfg.appliance_version), ("ProductUrl", out.product_url),
                      ("VendorUrl", out.vendor_url)]
    if any(value for _, value in product_fields):
        product = vs.add("ProductSection")
        product.add("Info", "Meta-information about the installed software")
        for tag, value in product_fields:
            if value:
                product.add(tag, value)

    if out.description:
        annotation = vs.add("AnnotationSection")
        annotation.add("Info", "A human-readable annotation")
        annotation.add("Annotation", _check_text("output.description", out.description))

    if eula is not None:
        eula_section = vs.add("EulaSection")
        eula_section.add("Info", "License agreement for the virtual system")
        eula_section.add("License", eula)

    os_attrs = {"ovf:id": CIM_OS_DEBIAN_64}
    if profile.vmware_os_type:
        os_attrs["vmw:osType"] = profile.vmware_os_type
    os_section = vs.add("OperatingSystemSection", **os_attrs)
    os_section.add("Info", "The kind of installed guest operating system")
    if profile.vbox_machine:
        os_section.add("Description", VBOX_OS_TYPE)
        os_section.add("vbox:OSType", VBOX_OS_TYPE, ovf_required="false")
    else:
        os_section.add("Description", DEBIAN_DESCRIPTION)

    _virtual_hardware(vs.add("VirtualHardwareSection"), cfg, profile)

    if vbox:
        _vbox_machine(vs, cfg, disk)

    text = '<?xml version="1.0"?>\n' + "\n".join(env.serialize()) + "\n"
    return text.encode("utf-8")


def _eula_text(cfg: ApplianceConfig) -> str | None:
    if not cfg.output.eula_file:
        return None
    path = cfg.path(cfg.output.eula_file)
    try:
        with open_regular(path) as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise ExportError(f"output.eula_file {str(path)!r} does not exist",
                          hint="give a readable UTF-8 text file, or leave output.eula_file empty") from None
    except OSError as exc:
        raise ExportError(f"output.eula_file {str(path)!r} cannot be read: {describe(exc)}") from None
    except UnicodeDecodeError as exc:
        raise ExportError(f"output.eula_file {str(path)!r} cannot be read as UTF-8 text: {exc}") from None
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise ExportError(f"output.eula_file {str(path)!r} is empty",
                          hint="write the licence text into it, or leave output.eula_file empty")
    return _check_text("output.eula_file", text)


def _virtual_hardware(hw: _Node, cfg: ApplianceConfig, profile: OvfProfile) -> None:
    """Items as VirtualBox writes them: rasd fields in alphabetical order, InstanceIDs from 1.

    The hardware family, controller and NIC come from the format's record (``profile``).
    """
    ovf2 = profile.version == "ovf20"
    hw.add("Info", "Virtual hardware requirements for a virtual machine")
    system = hw.add("System")
    system.add("vssd:ElementName", "Virtual Hardware Family")
    system.add("vssd:InstanceID", "0")
    system.add("vssd:VirtualSystemIdentifier", cfg.vm.name)
    system.add("vssd:VirtualSystemType", profile.system_type)

    def item(element: str, prefix: str, fields: dict[str, str | int]) -> None:
        node = hw.add(element)
        for key in sorted(fields):
            node.add(f"{prefix}:{key}", fields[key])

    cpus, mem = cfg.vm.cpus, cfg.vm.memory_mb
    # VirtualBox 7 writes the plural for more than one CPU (older releases never did).
    cpu_caption = f"{cpus} virtual CPU" if cpus == 1 else f"{cpus} virtual CPUs"
    item("Item", "rasd", {"Caption": cpu_caption, "Description": "Number of virtual CPUs",
                          "ElementName": cpu_caption, "InstanceID": 1, "ResourceType": 3,
                          "VirtualQuantity": cpus})
    mem_caption = f"{mem} MB of memory"
    item("Item", "rasd", {"AllocationUnits": profile.memory_units, "Caption": mem_caption,
                          "Description": "Memory Size", "ElementName": mem_caption, "InstanceID": 2,
                          "ResourceType": 4, "VirtualQuantity": mem})
    ctl = profile.controller
    item("Item", "rasd", {"Address": 0, "Caption": ctl.element_name, "Description": ctl.description,
                          "ElementName": ctl.element_name, "InstanceID": 3, "ResourceSubType": ctl.subtype,
                          "ResourceType": ctl.resource_type})
    disk_fields: dict[str, str | int] = {
        "AddressOnParent": 0, "Caption": "disk1", "Description": "Disk Image", "ElementName": "disk1",
        "HostResource": f"ovf:/disk/{DISK_ID}", "InstanceID": 4, "Parent": 3, "ResourceType": 17,
    }
    nic_caption = f"Ethernet adapter on '{profile.network_name}'"
    nic_fields: dict[str, str | int] = {
        "AutomaticAllocation": "true", "Caption": nic_caption, "Connection": profile.network_name,
        "ElementName": nic_caption, "InstanceID": 5, "ResourceType": 10,
    }
    subtype = profile.nic.subtype if profile.nic.subtype is not None else _NIC_SUBTYPE[cfg.virtualbox.nic_type]
    if subtype:
        nic_fields["ResourceSubType"] = subtype
    if ovf2:
        # OVF 2.0 moves disks and NICs into their own item kinds; the schema wants the
        # EthernetPortItems before the StorageItems.
        item("EthernetPortItem", "epasd", nic_fields)
        item("StorageItem", "sasd", disk_fields)
    else:
        item("Item", "rasd", disk_fields)
        item("Item", "rasd", nic_fields)


def _vbox_machine(vs: _Node, cfg: ApplianceConfig, disk: DiskFacts) -> None:
    """VirtualBox's own settings for the VM: the only place NAT port forwards survive an import."""
    machine_uuid = uuid.uuid5(_UUID_NAMESPACE, f"machine:{cfg.vm.name}:{cfg.appliance_version}:{disk.sha256}")
    m = vs.add("vbox:Machine", **{
        "ovf:required": "false",
        "version": VBOX_SETTINGS_VERSION,
        "uuid": "{" + str(machine_uuid) + "}",
        "name": cfg.vm.name,
        "OSType": VBOX_OS_TYPE,
        "snapshotFolder": "Snapshots",
    })
    m.add("ovf:Info", "Complete VirtualBox machine configuration in VirtualBox format")
    hw = m.add("Hardware", version="2")
    cpu = hw.add("CPU", count=str(cfg.vm.cpus), hotplug="false")
    cpu.add("PAE", enabled="true")
    cpu.add("LongMode", enabled="true")
    hw.add("Memory", RAMSize=str(cfg.vm.memory_mb), PageFusion="false")
    # Below settings version 1.16 VirtualBox fills in its old defaults for what a section leaves
    # out: legacy paravirtualisation, an audio card, and remote display (VRDE) ON without
    # authentication on every host address. So each of them is said explicitly. "Default"
    # resolves to KVM for a Linux guest (paravirtualised clock).
    hw.add("Paravirt", provider="Default")
    hw.add("HID", Pointing="PS2Mouse", Keyboard="PS2Keyboard")
    hw.add("Chipset", type="PIIX3")
    boot = hw.add("Boot")
    boot.add("Order", position="1", device="HardDisk")
    for pos in (2, 3, 4):
        boot.add("Order", position=str(pos), device="None")
    hw.add("Display", controller=_GRAPHICS[cfg.virtualbox.graphics_controller], VRAMSize="16",
           monitorCount="1", accelerate3D="false", accelerate2DVideo="false")
    # Off; and should someone switch it on, it asks for credentials and listens on loopback only.
    vrde = hw.add("RemoteDisplay", enabled="false", authType="External")
    vrde_props = vrde.add("VRDEProperties")
    vrde_props.add("Property", name="TCP/Address", value="127.0.0.1")
    hw.add("Firmware", type="BIOS")
    bios = hw.add("BIOS")
    bios.add("ACPI", enabled="true")
    bios.add("IOAPIC", enabled="true")
    network = hw.add("Network")
    # No MACAddress: VirtualBox generates one on import (what `--options nomacs` exports).
    adapter = network.add("Adapter", slot="0", enabled="true", cable="true", speed="0",
                          type=cfg.virtualbox.nic_type)
    adapter.add("DisabledModes")
    nat = adapter.add("NAT")
    if not cfg.virtualbox.nat_localhost_reachable:
        # Settings before 1.19 default to "reachable"; only the opposite needs saying.
        nat.attrs.append(("localhost-reachable", "false"))
    nat.add("DNS", **{"pass-domain": "true", "use-proxy": "false", "use-host-resolver": "false"})
    nat.add("Alias", logging="false", **{"proxy-only": "false", "use-same-ports": "false"})
    # VirtualBox keeps rules in a map keyed by name and writes them sorted; proto 1 = TCP, 0 = UDP.
    for rule in sorted(cfg.network.forwarded_ports, key=lambda p: p.name):
        nat.add("Forwarding", name=rule.name, proto="1" if rule.protocol == "tcp" else "0",
                hostip=rule.host_ip, hostport=str(rule.host), guestport=str(rule.guest))
    hw.add("AudioAdapter", enabled="false", driver="Null", controller="HDA")
    hw.add("RTC", localOrUTC="UTC")
    controllers = m.add("StorageControllers")
    sata = controllers.add("StorageController", name="SATA", type="AHCI", PortCount="1",
                           useHostIOCache="false", Bootable="true")
    attached = sata.add("AttachedDevice", type="HardDisk", hotpluggable="false", port="0", device="0")
    attached.add("Image", uuid="{" + disk.uuid + "}")


# -- reading descriptors back ------------------------------------------------------------------


@dataclass(frozen=True)
class DescriptorFacts:
    """What verification needs from a descriptor: its format, file list and disks."""

    ovf_format: OvfFormat
    files: tuple[tuple[str, str, int | None], ...]  # (id, href, size or None)
    disks: tuple[tuple[str, str, int, str], ...]  # (diskId, fileRef, capacity in bytes, format URL)
    # Where VirtualBox's OVF reader could read this descriptor differently (see importer_ambiguities).
    ambiguities: tuple[str, ...] = ()


_UNITS = {"byte": 1, "kilobytes": 1 << 10, "megabytes": 1 << 20, "gigabytes": 1 << 30}
# Bounds for numbers read from an untrusted descriptor: no exponent, digit string or product
# beyond these is ever computed (a hostile "byte * 2^40000000000" must not exhaust memory).
MAX_DECIMAL_DIGITS = 20
MAX_UNIT_EXPONENT = 60
MAX_CAPACITY = 1 << 56  # 64 PiB, far above any disk VirtualBox or VMware creates
# Canonical decimal only: VirtualBox reads these numbers with RTStrToInt64Ex(..., base 0), which
# takes "0x10" as hex and "010" as octal (and refuses surrounding spaces); Python would read both
# as decimal. One reading for both means digits only, no leading zero, no sign, no spaces.
_DECIMAL = re.compile(f"0|[1-9][0-9]{{0,{MAX_DECIMAL_DIGITS - 1}}}")


def _bounded_int(what: str, text: str, limit: int) -> int:
    if not _DECIMAL.fullmatch(text):
        raise ValueError(f"{what} {text[:40]!r} is not a decimal number of at most {MAX_DECIMAL_DIGITS} digits "
                         "(digits only, no leading zero, sign or space)")
    value = int(text)
    if value > limit:
        raise ValueError(f"{what} {value} is larger than the allowed {limit}")
    return value


def _capacity_bytes(value: str, units: str | None) -> int:
    n = _bounded_int("disk capacity", value, MAX_CAPACITY)
    if not units:
        return n
    u = units.replace(" ", "").lower()
    m = re.fullmatch(r"byte\*2\^([0-9]{1,3})", u)
    if m:
        exponent = int(m.group(1))
        if exponent > MAX_UNIT_EXPONENT:
            raise ValueError(f"capacityAllocationUnits {units[:40]!r}: exponent above {MAX_UNIT_EXPONENT}")
        factor = 1 << exponent
    elif u in _UNITS:
        factor = _UNITS[u]
    else:
        raise ValueError(f"unknown capacityAllocationUnits {units[:40]!r} (allowed: 'byte', 'byte * 2^N' with "
                         f"N <= {MAX_UNIT_EXPONENT}, {', '.join(k for k in _UNITS if k != 'byte')})")
    if n * factor > MAX_CAPACITY:
        raise ValueError(f"disk capacity {n} x {units[:40]!r} is larger than the allowed {MAX_CAPACITY} bytes")
    return n * factor


def parse_xml(data: bytes) -> ET.Element:
    """Parse an untrusted descriptor: no DTD, hence no entity of any kind (billion laughs, external files)."""
    import defusedxml.ElementTree as SafeET
    from defusedxml import DefusedXmlException, DTDForbidden

    try:
        root: ET.Element = SafeET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except ET.ParseError as exc:
        raise ValueError(f"not well-formed XML: {exc}") from None
    except DTDForbidden:
        raise ValueError("refused XML: it declares a DTD (<!DOCTYPE ...>), whose entities can expand without "
                         "bound or read files; OVF descriptors need none") from None
    except DefusedXmlException as exc:
        raise ValueError(f"refused XML: {type(exc).__name__}; OVF descriptors need no DTD or entities") from None
    return root


def read_descriptor(data: bytes) -> DescriptorFacts:
    """Parse an ``.ovf``; raises ``ValueError`` naming what is missing or malformed."""
    root = parse_xml(data)
    fmt = next((k for k, ns in NS_OVF.items() if root.tag == f"{{{ns}}}Envelope"), None)
    if fmt is None:
        raise ValueError(f"root element is {root.tag}, not an OVF 1.x or 2.x Envelope")
    ns = NS_OVF[fmt]
    files = []
    for f in root.findall(f"{{{ns}}}References/{{{ns}}}File"):
        size = f.get(f"{{{ns}}}size")
        href = f.get(f"{{{ns}}}href", "")
        declared = _bounded_int(f"ovf:size of {href[:60]!r}", size, MAX_CAPACITY) if size is not None else None
        files.append((f.get(f"{{{ns}}}id", ""), href, declared))
    disks = []
    for d in root.findall(f"{{{ns}}}DiskSection/{{{ns}}}Disk"):
        cap = _capacity_bytes(d.get(f"{{{ns}}}capacity", "0"), d.get(f"{{{ns}}}capacityAllocationUnits"))
        populated = d.get(f"{{{ns}}}populatedSize")
        if populated is not None:
            _bounded_int("ovf:populatedSize", populated, MAX_CAPACITY)
        disks.append((d.get(f"{{{ns}}}diskId", ""), d.get(f"{{{ns}}}fileRef", ""), cap,
                      d.get(f"{{{ns}}}format", "")))
    return DescriptorFacts(fmt, tuple(files), tuple(disks),
                           tuple(importer_ambiguities(root, ns)))


# What VirtualBox 7.2's OVF reader (src/VBox/Main/xml/ovfreader.cpp, OVFReader::parse,
# LoopThruSections, HandleDiskSection; IPRT's xml.cpp ElementNode::findAttribute,
# findChildElement, findChildElementFromId) reads, and how: elements and attributes by their
# *local* name in any namespace, the first match winning; disks from every DiskSection it meets
# at the Envelope level and, recursively, inside VirtualSystemCollections (and OVF 0.9's
# <Section xsi:type="ovf:DiskSection_Type">); a Disk's file from the first References child
# whose "id" matches, File or not; duplicate diskIds overwrite (std::map, the last wins). Our
# reader takes ovf:-qualified names at fixed places. Wherever the two could pick differently the
# descriptor is refused; docs/export.md lists each rule.
_FILE_ATTRS = {"id", "href", "size"}
_DISK_ATTRS = {"diskId", "fileRef", "capacity", "capacityAllocationUnits", "format", "populatedSize"}
# Element names VirtualBox's reader acts on wherever it walks (Envelope's children and, through
# VirtualSystemCollection, theirs); only the places our reader reads are allowed.
_WATCHED = {"References", "DiskSection", "VirtualSystemCollection", "Section", "Content"}
_SECTION_PARENTS = {"Envelope", "VirtualSystem", "VirtualSystemCollection"}
MAX_AMBIGUITIES = 20


def _local(tag: str) -> tuple[str, str]:
    """(namespace, local name) of an ElementTree tag or attribute name."""
    if tag.startswith("{"):
        ns, _, local = tag[1:].partition("}")
        return ns, local
    return "", tag


def importer_ambiguities(root: ET.Element, ns: str) -> list[str]:
    """Every place where VirtualBox's OVF reader could read ``root`` differently from ours."""
    found: list[str] = []
    add = found.append
    ovf = f"{{{ns}}}"

    for parent in root.iter():
        for child in parent:
            if not isinstance(child.tag, str):
                continue  # comments, processing instructions
            cns, local = _local(child.tag)
            if local not in _WATCHED:
                continue
            at_top = parent is root
            if local in ("Section", "Content") and _local(parent.tag)[1] not in _SECTION_PARENTS:
                continue  # VirtualBox reads OVF 0.9 sections only in these
            if local in ("References", "DiskSection") and at_top and cns == ns:
                continue
            where = "the Envelope" if at_top else f"<{_local(parent.tag)[1]}>"
            if local == "VirtualSystemCollection":
                add(f"a VirtualSystemCollection (in {where}): VirtualBox imports the disks of every system in it; "
                    "an appliance OVA holds one VirtualSystem")
            elif local in ("Section", "Content"):
                add(f"an OVF 0.9 <{local}> element (in {where}): VirtualBox reads it by its type attribute")
            else:
                qualified = "outside the OVF namespace" if cns != ns else f"inside {where}"
                add(f"a {local} element {qualified}: VirtualBox reads every {local} it finds by its local name, "
                    "only Envelope/" + local + " in the OVF namespace is read the same way by both")
    references = [c for c in root if isinstance(c.tag, str) and _local(c.tag)[1] == "References"]
    if len(references) > 1:
        add(f"{len(references)} References elements: VirtualBox reads only the first")

    ids: set[str] = set()
    hrefs: dict[str, str] = {}
    for ref in references[:1]:
        for child in ref:
            if not isinstance(child.tag, str):
                continue
            if child.tag != f"{ovf}File":
                add(f"References holds <{_local(child.tag)[1]}>: VirtualBox looks a disk's file up among every "
                    "child of References by its id; only ovf:File is allowed")
                continue
            _attribute_problems(child, ns, _FILE_ATTRS, (), "File", add)
            fid, href = child.get(f"{ovf}id", ""), child.get(f"{ovf}href", "")
            if fid in ids:
                add(f"File id {fid[:80]!r} is used twice: VirtualBox takes the first, a last-wins reader the last")
            ids.add(fid)
            folded = href.casefold()
            if folded in hrefs:
                add(f"File href {href[:80]!r} is listed twice (VirtualBox compares member names without case)")
            hrefs[folded] = href

    disk_ids: set[str] = set()
    for section in root.findall(f"{ovf}DiskSection"):
        for child in section:
            if not isinstance(child.tag, str):
                continue
            cns, local = _local(child.tag)
            if local == "Disk" and cns != ns:
                add("a Disk element outside the OVF namespace: VirtualBox reads it as a disk")
                continue
            if child.tag != f"{ovf}Disk":
                continue
            _attribute_problems(child, ns, _DISK_ATTRS, (("uuid", NS_VBOX),), "Disk", add)
            disk_id = child.get(f"{ovf}diskId", "")
            if disk_id in disk_ids:
                add(f"disk id {disk_id[:80]!r} is used twice: VirtualBox keeps the last, which a first-wins reader "
                    "would not")
            disk_ids.add(disk_id)
    if len(found) > MAX_AMBIGUITIES:
        found[MAX_AMBIGUITIES:] = [f"... and {len(found) - MAX_AMBIGUITIES} more such places"]
    return found


def _attribute_problems(element: ET.Element, ns: str, allowed: set[str], extra: tuple[tuple[str, str], ...],
                        what: str, add: Callable[[str], None]) -> None:
    """Attributes VirtualBox could read in place of ours (same local name, other namespace) or that we ignore."""
    for name in element.attrib:
        ans, local = _local(name)
        if ans == ns and local in allowed:
            continue
        if (local, ans) in extra:
            continue
        prefix = {ns: "ovf:", NS_VBOX: "vbox:", "": ""}.get(ans, f"{{{ans}}}")
        shown = prefix + local
        if local in allowed:
            add(f"{what} attribute {shown[:120]!r} shadows ovf:{local}: VirtualBox reads attributes by local name, "
                "the first one winning")
        else:
            add(f"{what} attribute {shown[:120]!r} is not one both readers read the same way "
                f"(allowed: {', '.join('ovf:' + a for a in sorted(allowed))}"
                + "".join(f", {'vbox' if n == NS_VBOX else n}:{a}" for a, n in extra) + ")")


# -- schema validation ---------------------------------------------------------------------------


# Declares vbox:Machine as one more OVF Section whose content after Info is not checked: the
# DMTF schema has no wildcard where VirtualBox puts it (see ../shared/ovf/README.md).
_VBOX_EXTENSION = """<?xml version="1.0"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" xmlns:ovf="{ovf}"
    targetNamespace="http://www.virtualbox.org/ovf/machine" elementFormDefault="qualified">
  <xs:import namespace="{ovf}"/>
  <xs:element name="Machine" substitutionGroup="ovf:Section">
    <xs:complexType>
      <xs:complexContent>
        <xs:extension base="ovf:Section_Type">
          <xs:sequence>
            <xs:any namespace="##any" processContents="skip" minOccurs="0" maxOccurs="unbounded"/>
          </xs:sequence>
        </xs:extension>
      </xs:complexContent>
    </xs:complexType>
  </xs:element>
</xs:schema>
"""


@cache
def ovf_schema(ovf_format: OvfFormat, schema_dir: Path | None = None) -> Any:
    """The compiled schema for ``ovf10``/``ovf20`` (plus the vbox:Machine extension); cached.

    ``schema_dir`` holds ``ovf1/`` and ``ovf2/``: the verified cache folder of the pinned
    schemas (``appliance.artifacts.fetch_ovf_schemas``, ``invoke fetch``).
    """
    import xmlschema

    if schema_dir is None:
        raise PrerequisiteMissing(
            "no folder of DMTF OVF schemas was given",
            hint="`invoke fetch` puts the pinned schemas in the cache (appliance.artifacts.fetch_ovf_schemas)",
        )
    folder = (schema_dir / SCHEMA_SET[ovf_format]).resolve()
    main = next(folder.glob("dsp8023_*.xsd"))

    def to_local(uri: str) -> str:
        local = folder / uri.rsplit("/", 1)[-1]
        return local.as_uri() if uri.startswith("http") and local.exists() else uri

    ext = _VBOX_EXTENSION.format(ovf=NS_OVF[ovf_format])
    return xmlschema.XMLSchema10([str(main), ext], allow="local", uri_mapper=to_local, base_url=str(folder))


_VBOX_XSD_NAMESPACES = {NS_SASD + ".xsd": NS_SASD, NS_EPASD + ".xsd": NS_EPASD}
_ITEM_TAGS = ("Item", "StorageItem", "EthernetPortItem")


def _virtualbox_ovf20_repaired(root: ET.Element) -> bool:
    """Undo VirtualBox's three known OVF 2.0 deviations in place; False if ``root`` shows none of them.

    VirtualBox (up to 7.2 at least) writes the sasd/epasd namespaces with ".xsd" appended, no
    ElementName in any item, and the EthernetPortItem after the StorageItem. What VirtualBox
    itself writes must pass, so a descriptor carrying its ".xsd" namespace names is validated
    with exactly those three things repaired; anything else still counts.
    """
    renamed = False
    for el in root.iter():
        uri, _, name = el.tag[1:].partition("}") if el.tag.startswith("{") else ("", "", el.tag)
        if uri in _VBOX_XSD_NAMESPACES:
            el.tag = f"{{{_VBOX_XSD_NAMESPACES[uri]}}}{name}"
            renamed = True
    if not renamed:
        return False
    for hw in root.iter():
        items = [c for c in hw if c.tag.rpartition("}")[2] in _ITEM_TAGS]
        for item in items:
            fields = list(item)
            if not fields or any(f.tag.rpartition("}")[2] == "ElementName" for f in fields):
                continue
            ns = fields[0].tag[1:].partition("}")[0]
            caption = next((f.text for f in fields if f.tag.rpartition("}")[2] == "Caption"), "") or ""
            element_name = ET.Element(f"{{{ns}}}ElementName")
            element_name.text = caption
            position = next((i for i, f in enumerate(fields) if f.tag.rpartition("}")[2] > "ElementName"),
                            len(fields))
            item.insert(position, element_name)
        ports = [c for c in items if c.tag.rpartition("}")[2] == "EthernetPortItem"]
        storage = [c for c in items if c.tag.rpartition("}")[2] == "StorageItem"]
        if ports and storage:
            for port in ports:
                hw.remove(port)
            first = list(hw).index(storage[0])
            for offset, port in enumerate(ports):
                hw.insert(first + offset, port)
    return True


def schema_errors(data: bytes, schema_dir: Path | None = None, *, tolerated: list[str] | None = None,
                  limit: int = 1000) -> list[str]:
    """Every schema violation in the descriptor ``data`` (empty list: valid), at most ``limit``.

    An OVF 2.0 descriptor written by VirtualBox is checked with its known deviations repaired
    (see ``_virtualbox_ovf20_repaired``); ``tolerated``, when given, is told so (the verifier's
    report names it).
    """
    try:
        facts_format = read_descriptor(data).ovf_format
    except ValueError as exc:
        return [str(exc)]
    schema = ovf_schema(facts_format, schema_dir)
    root = parse_xml(data)
    if facts_format == "ovf20" and _virtualbox_ovf20_repaired(root) and tolerated is not None:
        tolerated.append("VirtualBox's known OVF 2.0 deviations repaired: sasd/epasd namespaces ending in "
                         "'.xsd', Items without ElementName, EthernetPortItem after StorageItem")
    # Bounded: a hostile descriptor can hold a million invalid elements.
    return [f"{e.path}: {e.reason}" for e in itertools.islice(schema.iter_errors(root), limit)]
