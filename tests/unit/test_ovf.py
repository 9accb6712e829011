"""The OVF descriptor: valid against the DMTF schemas, and shaped like VirtualBox's own exports.

The samples in ../shared/ovf/samples are real VirtualBox exports; the tests compare ours with
them element by element: section order, the ResourceType set, the fields of each Item, the
attributes of the key elements, the namespace prefixes, and the vbox:Machine elements.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from appliance.config import ApplianceConfig
from appliance.errors import ExportError
from appliance.export.ovf import (
    NS_EPASD,
    NS_OVF,
    NS_RASD,
    NS_SASD,
    NS_VBOX,
    DiskFacts,
    ovf_descriptor,
    read_descriptor,
    schema_errors,
)

DISK = DiskFacts(href="csghub-1.0-disk001.vmdk", file_size=123_456_789, capacity=200 * 2**30, sha256="ab" * 32)
VBOX_OVF10_SAMPLES = [
    "virtualbox-ovf10-tsuru-packer.ovf",
    "virtualbox-ovf10-nxos-vagrant.ovf",
    "virtualbox-ovf10-vagrant-smartos-cpp.ovf",
]
VBOX_OVF20_SAMPLE = "virtualbox-ovf20-cot-ubuntu/ubuntu.2.0.ovf"
OVF1 = NS_OVF["ovf10"]


def local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def qname(tag: str) -> str:
    """'{ns}Name' -> 'prefix:Name' using VirtualBox's prefixes (ovf for both envelope versions)."""
    prefixes = {NS_OVF["ovf10"]: "ovf", NS_OVF["ovf20"]: "ovf", NS_RASD: "rasd", NS_VBOX: "vbox",
                NS_SASD: "sasd", NS_EPASD: "epasd", NS_SASD + ".xsd": "sasd", NS_EPASD + ".xsd": "epasd"}
    if tag.startswith("{"):
        ns, name = tag[1:].split("}")
        return f"{prefixes.get(ns, ns)}:{name}"
    return tag


def sample(samples: Path, name: str) -> ET.Element:
    return ET.parse(samples / name).getroot()


def ours(cfg: ApplianceConfig, **kw: object) -> ET.Element:
    return ET.fromstring(ovf_descriptor(cfg, DISK, **kw))  # type: ignore[arg-type]


def virtual_system(root: ET.Element) -> ET.Element:
    vs = next(c for c in root if local(c.tag) == "VirtualSystem")
    return vs


def items_by_type(root: ET.Element) -> dict[str, list[str]]:
    """ResourceType -> the local names of the Item's fields, in document order."""
    hw = next(c for c in virtual_system(root) if local(c.tag) == "VirtualHardwareSection")
    out: dict[str, list[str]] = {}
    for item in hw:
        if local(item.tag) not in ("Item", "StorageItem", "EthernetPortItem"):
            continue
        rtype = next(c.text for c in item if local(c.tag) == "ResourceType")
        assert rtype is not None
        out[rtype] = [local(c.tag) for c in item]
    return out


def declared_namespaces(data: bytes) -> dict[str, str]:
    head = re.search(rb"<Envelope[^>]*>", data)
    assert head
    return {p.decode(): u.decode() for p, u in re.findall(rb'xmlns(?::(\w+))?="([^"]+)"', head.group())}


# -- schema -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["ovf10", "ovf20"])
@pytest.mark.parametrize("vbox_machine", [True, False], ids=["with-vbox-machine", "standard-only"])
def test_descriptor_is_valid_against_the_dmtf_schema(
    fmt: str, vbox_machine: bool, make_cfg: Callable[..., ApplianceConfig], ovf_schema_dir: Path
) -> None:
    data = ovf_descriptor(make_cfg(), DISK, ovf_format=fmt, include_vbox_machine=vbox_machine)  # type: ignore[arg-type]
    assert schema_errors(data, ovf_schema_dir) == []
    assert read_descriptor(data).ovf_format == fmt


def test_schema_check_catches_a_broken_descriptor(
    make_cfg: Callable[..., ApplianceConfig], ovf_schema_dir: Path
) -> None:
    data = ovf_descriptor(make_cfg(), DISK)
    # The System element must come first in VirtualHardwareSection; move it after the Items.
    system = re.search(rb"\s*<System>.*?</System>", data, re.S)
    assert system
    broken = data.replace(system.group(), b"").replace(b"</VirtualHardwareSection>",
                                                       system.group() + b"</VirtualHardwareSection>")
    errors = schema_errors(broken, ovf_schema_dir)
    assert errors and any("System" in e for e in errors)


def test_virtualbox_samples_pass_our_schema_check(ovf_samples_dir: Path, ovf_schema_dir: Path) -> None:
    """The vbox:Machine extension accepts what VirtualBox itself writes (OVF 1.0)."""
    for name in VBOX_OVF10_SAMPLES:
        assert schema_errors((ovf_samples_dir / name).read_bytes(), ovf_schema_dir) == [], name


# -- determinism and content ---------------------------------------------------------------------


def test_same_inputs_give_the_same_bytes(make_cfg: Callable[..., ApplianceConfig]) -> None:
    cfg = make_cfg()
    assert ovf_descriptor(cfg, DISK) == ovf_descriptor(cfg, DISK)
    other = DiskFacts(DISK.href, DISK.file_size, DISK.capacity, "cd" * 32)
    assert ovf_descriptor(cfg, other) != ovf_descriptor(cfg, DISK)
    assert other.uuid != DISK.uuid


def test_hardware_product_and_disk_come_from_the_config(make_cfg: Callable[..., ApplianceConfig]) -> None:
    cfg = make_cfg("vm.cpus=3", "vm.memory_mb=3072", "output.version=9.8.7", "output.product=Hub",
                   "output.vendor=ACME", "vm.name=hub-vm", "output.description=Line one")
    root = ours(cfg)
    ns = {"o": OVF1, "rasd": NS_RASD}
    vs = virtual_system(root)
    assert vs.get(f"{{{OVF1}}}id") == "hub-vm"
    product = vs.find("o:ProductSection", ns)
    assert product is not None
    assert [(local(c.tag), c.text) for c in product] == [
        ("Info", "Meta-information about the installed software"),
        ("Product", "Hub"), ("Vendor", "ACME"), ("Version", "9.8.7"),
        ("ProductUrl", cfg.output.product_url), ("VendorUrl", cfg.output.vendor_url),
    ]
    assert vs.findtext("o:AnnotationSection/o:Annotation", namespaces=ns) == "Line one"
    quantities = {i.findtext("rasd:ResourceType", namespaces=ns): i.findtext("rasd:VirtualQuantity", namespaces=ns)
                  for i in vs.iterfind("o:VirtualHardwareSection/o:Item", ns)}
    assert quantities["3"] == "3" and quantities["4"] == "3072"
    disk = root.find("o:DiskSection/o:Disk", ns)
    assert disk is not None and disk.get(f"{{{OVF1}}}capacity") == str(200 * 2**30)
    file_ = root.find("o:References/o:File", ns)
    assert file_ is not None and file_.get(f"{{{OVF1}}}size") == "123456789"


def test_eula_section_when_a_licence_file_is_configured(
    make_cfg: Callable[..., ApplianceConfig], tmp_path: Path, ovf_schema_dir: Path
) -> None:
    eula = tmp_path / "EULA.txt"
    eula.write_text("Terms & conditions <apply>.\r\nSecond line.\n", encoding="utf-8")
    cfg = make_cfg(f"output.eula_file={eula}")
    data = ovf_descriptor(cfg, DISK)
    vs = virtual_system(ET.fromstring(data))
    assert [local(c.tag) for c in vs][:5] == [
        "Info", "ProductSection", "AnnotationSection", "EulaSection", "OperatingSystemSection"]
    assert vs.findtext(f"{{{OVF1}}}EulaSection/{{{OVF1}}}License") == "Terms & conditions <apply>.\nSecond line.\n"
    assert schema_errors(data, ovf_schema_dir) == []
    assert b"EulaSection" not in ovf_descriptor(make_cfg(), DISK)


def test_unusable_eula_or_text_is_refused_with_the_reason(
    make_cfg: Callable[..., ApplianceConfig], tmp_path: Path
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ExportError, match="is empty"):
        ovf_descriptor(make_cfg(f"output.eula_file={empty}"), DISK)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok\x00no")
    with pytest.raises(ExportError, match="U\\+0000"):
        ovf_descriptor(make_cfg(f"output.eula_file={binary}"), DISK)


# -- compared with VirtualBox's exports -------------------------------------------------------------


def test_envelope_sections_in_virtualbox_order(
    make_cfg: Callable[..., ApplianceConfig], ovf_samples_dir: Path
) -> None:
    root = ours(make_cfg())
    mine_top = [local(c.tag) for c in root]
    mine_vs = [qname(c.tag) for c in virtual_system(root)]
    for name in VBOX_OVF10_SAMPLES:
        theirs = sample(ovf_samples_dir, name)
        assert mine_top == [local(c.tag) for c in theirs], name
        theirs_vs = [qname(c.tag) for c in virtual_system(theirs)]
        # Sections the sample has appear in the same order in ours; the ones it lacks are the
        # product/annotation/licence sections, which VirtualBox writes right after Info.
        assert [t for t in mine_vs if t in theirs_vs] == theirs_vs, name
        extra = [t for t in mine_vs if t not in theirs_vs]
        assert extra == ["ovf:ProductSection", "ovf:AnnotationSection"]
        assert mine_vs.index("ovf:AnnotationSection") < mine_vs.index("ovf:OperatingSystemSection")


def test_items_match_virtualbox_field_by_field(
    make_cfg: Callable[..., ApplianceConfig], ovf_samples_dir: Path
) -> None:
    mine = items_by_type(ours(make_cfg()))
    # tsuru-packer is the sample with exactly our hardware: CPU, memory, SATA, NIC, disk.
    tsuru = items_by_type(sample(ovf_samples_dir, "virtualbox-ovf10-tsuru-packer.ovf"))
    assert set(mine) == set(tsuru) == {"3", "4", "20", "10", "17"}
    for rtype, fields in mine.items():
        assert fields == tsuru[rtype], f"ResourceType {rtype}"
        assert fields == sorted(fields), "VirtualBox (and VMware) want rasd fields sorted"
    nxos = items_by_type(sample(ovf_samples_dir, "virtualbox-ovf10-nxos-vagrant.ovf"))
    for rtype in mine:
        assert mine[rtype] == nxos[rtype], f"ResourceType {rtype} (nxos)"


def test_item_values_match_virtualbox(make_cfg: Callable[..., ApplianceConfig], ovf_samples_dir: Path) -> None:
    def values(root: ET.Element) -> dict[str, dict[str, str | None]]:
        hw = next(c for c in virtual_system(root) if local(c.tag) == "VirtualHardwareSection")
        out = {}
        for item in hw.iterfind(f"{{{OVF1}}}Item"):
            fields = {local(c.tag): c.text for c in item}
            out[str(fields["ResourceType"])] = fields
        return out

    mine = values(ours(make_cfg()))
    theirs = values(sample(ovf_samples_dir, "virtualbox-ovf10-tsuru-packer.ovf"))
    for rtype, keys in {"20": ["Address", "Caption", "Description", "ResourceSubType"],
                        "17": ["AddressOnParent", "Caption", "Description"],
                        "10": ["AutomaticAllocation", "Caption", "Connection", "ResourceSubType"],
                        "4": ["AllocationUnits", "Description"], "3": ["Description"]}.items():
        for key in keys:
            assert mine[rtype][key] == theirs[rtype][key], (rtype, key)
    # The samples' VirtualBox wrote "/disk/vmdisk1"; VirtualBox 7 writes the URI form, which
    # VMware and Proxmox require too (checked against VirtualBox 7.2's own export in tests/vbox).
    assert theirs["17"]["HostResource"] == "/disk/vmdisk1"
    assert mine["17"]["HostResource"] == "ovf:/disk/vmdisk1"
    # The disk's parent is the SATA controller, by InstanceID, as VirtualBox links them.
    assert mine["17"]["Parent"] == mine["20"]["InstanceID"]


def test_key_attributes_are_the_ones_virtualbox_writes(
    make_cfg: Callable[..., ApplianceConfig], ovf_samples_dir: Path
) -> None:
    def attrs(root: ET.Element, path: str) -> set[str]:
        el = root.find(path, {"o": OVF1})
        assert el is not None, path
        return {qname(a) for a in el.attrib}

    mine = ours(make_cfg())
    for name in VBOX_OVF10_SAMPLES:
        theirs = sample(ovf_samples_dir, name)
        for path in ("o:DiskSection/o:Disk", "o:NetworkSection/o:Network", "o:VirtualSystem",
                     "o:VirtualSystem/o:OperatingSystemSection"):
            assert attrs(mine, path) == attrs(theirs, path), (name, path)
        # File: VirtualBox writes id and href (older versions also size, which we write too).
        assert attrs(mine, "o:References/o:File") >= attrs(theirs, "o:References/o:File") - {"ovf:size"}
        assert mine.findtext("o:VirtualSystem/o:VirtualHardwareSection/o:System/{*}VirtualSystemType",
                             namespaces={"o": OVF1}) == "virtualbox-2.2"


def test_namespace_prefixes_as_virtualbox_declares_them(
    make_cfg: Callable[..., ApplianceConfig], ovf_samples_dir: Path
) -> None:
    mine = declared_namespaces(ovf_descriptor(make_cfg(), DISK))
    for name in VBOX_OVF10_SAMPLES:
        assert mine == declared_namespaces((ovf_samples_dir / name).read_bytes()), name
    mine2 = declared_namespaces(ovf_descriptor(make_cfg(), DISK, ovf_format="ovf20"))
    theirs2 = declared_namespaces((ovf_samples_dir / VBOX_OVF20_SAMPLE).read_bytes())
    assert mine2.keys() == theirs2.keys()
    # The one deliberate difference: VirtualBox appends ".xsd" to these two namespace names,
    # which makes its OVF 2.0 output invalid; ours are the real names.
    differing = {p for p in mine2 if mine2[p] != theirs2[p]}
    assert differing == {"sasd", "epasd"}
    assert all(theirs2[p] == mine2[p] + ".xsd" for p in differing)


def test_ovf20_uses_storage_and_ethernet_port_items(make_cfg: Callable[..., ApplianceConfig]) -> None:
    root = ET.fromstring(ovf_descriptor(make_cfg(), DISK, ovf_format="ovf20"))
    assert root.get(f"{{{NS_OVF['ovf20']}}}version") == "2.0"
    kinds = {rtype: fields for rtype, fields in items_by_type(root).items()}
    hw = next(c for c in virtual_system(root) if local(c.tag) == "VirtualHardwareSection")
    assert [local(c.tag) for c in hw][-2:] == ["EthernetPortItem", "StorageItem"]
    assert "ElementName" in kinds["17"] and "ElementName" in kinds["10"]


# -- vbox:Machine ----------------------------------------------------------------------------


def element_paths(el: ET.Element, prefix: str = "") -> dict[str, set[str]]:
    """'Hardware/CPU' -> attribute names, for every element under ``el``."""
    out: dict[str, set[str]] = {}
    for child in el:
        path = f"{prefix}/{local(child.tag)}" if prefix else local(child.tag)
        out.setdefault(path, set()).update(local(a) for a in child.attrib)
        for k, v in element_paths(child, path).items():
            out.setdefault(k, set()).update(v)
    return out


def test_vbox_machine_uses_only_what_virtualbox_exports_contain(
    make_cfg: Callable[..., ApplianceConfig], ovf_samples_dir: Path
) -> None:
    machine = virtual_system(ours(make_cfg())).find(f"{{{NS_VBOX}}}Machine")
    assert machine is not None
    known: dict[str, set[str]] = {}
    known_root: set[str] = set()
    for name in VBOX_OVF10_SAMPLES[:2]:
        m = virtual_system(sample(ovf_samples_dir, name)).find(f"{{{NS_VBOX}}}Machine")
        assert m is not None
        known_root |= {local(a) for a in m.attrib}
        for k, v in element_paths(m).items():
            known.setdefault(k, set()).update(v)
    assert {local(a) for a in machine.attrib} <= known_root
    # Display@controller selects VMSVGA (VirtualBox 5.2+), which the samples predate; a
    # Forwarding's hostip is written by VirtualBox's settings writer whenever a rule has one
    # (ConfigFileBase::buildNATForwardRulesMap), and the sample's rule listens on all addresses.
    allowed_new = {("Hardware/Display", "controller"), ("Hardware/Network/Adapter/NAT/Forwarding", "hostip")}
    # The remote display's listening address, for anyone who switches VRDE on after import:
    # VirtualBox's settings writer stores VRDE properties this way (the vbox tier imports it).
    new_paths = {"Hardware/RemoteDisplay/VRDEProperties", "Hardware/RemoteDisplay/VRDEProperties/Property"}
    for path, attributes in element_paths(machine).items():
        if path in new_paths:
            continue
        assert path in known, f"{path} does not occur in VirtualBox's exports"
        unknown = {(path, a) for a in attributes - known[path]} - allowed_new
        assert not unknown, unknown


def test_vbox_machine_holds_the_port_forwards_and_the_disk(make_cfg: Callable[..., ApplianceConfig]) -> None:
    cfg = make_cfg("network.forwarded_ports=[{name: web, guest: 80, host: 8080}, "
                   "{name: dns, guest: 53, host: 5353, protocol: udp, host_ip: 127.0.0.2}]")
    root = ours(cfg)
    machine = virtual_system(root).find(f"{{{NS_VBOX}}}Machine")
    assert machine is not None
    forwards = [f.attrib for f in machine.iter(f"{{{OVF1}}}Forwarding")]
    assert forwards == [  # sorted by name, as VirtualBox writes its rule map
        {"name": "dns", "proto": "0", "hostip": "127.0.0.2", "hostport": "5353", "guestport": "53"},
        {"name": "web", "proto": "1", "hostip": "127.0.0.1", "hostport": "8080", "guestport": "80"},
    ]
    adapter = next(machine.iter(f"{{{OVF1}}}Adapter"))
    assert adapter.get("type") == "82540EM" and "MACAddress" not in adapter.attrib
    image = next(machine.iter(f"{{{OVF1}}}Image"))
    disk = root.find(f"{{{OVF1}}}DiskSection/{{{OVF1}}}Disk")
    assert disk is not None
    # VirtualBox matches the attached image to the DiskSection entry by this UUID on import.
    assert image.get("uuid") == "{" + str(disk.get(f"{{{NS_VBOX}}}uuid")) + "}"
    cpu = next(machine.iter(f"{{{OVF1}}}CPU"))
    memory = next(machine.iter(f"{{{OVF1}}}Memory"))
    assert cpu.get("count") == "2" and memory.get("RAMSize") == "2048"


def test_samples_link_image_and_disk_the_same_way(ovf_samples_dir: Path) -> None:
    """Guards the assumption above against the real exports."""
    for name in VBOX_OVF10_SAMPLES[:2]:
        root = sample(ovf_samples_dir, name)
        disk = root.find(f"{{{OVF1}}}DiskSection/{{{OVF1}}}Disk")
        images = [i.get("uuid") for i in root.iter(f"{{{OVF1}}}Image")]
        assert disk is not None and "{" + str(disk.get(f"{{{NS_VBOX}}}uuid")) + "}" in images


def test_without_vbox_machine_there_is_no_virtualbox_section(make_cfg: Callable[..., ApplianceConfig]) -> None:
    data = ovf_descriptor(make_cfg(), DISK, include_vbox_machine=False)
    assert b"vbox:Machine" not in data and b"Forwarding" not in data


def test_empty_product_fields_are_left_out_as_virtualbox_does(make_cfg: Callable[..., ApplianceConfig]) -> None:
    data = ovf_descriptor(make_cfg('output.product=""', 'output.vendor=""'), DISK)
    product = virtual_system(ET.fromstring(data)).find(f"{{{OVF1}}}ProductSection")
    assert product is not None
    assert [local(c.tag) for c in product] == ["Info", "Version", "ProductUrl", "VendorUrl"]


@pytest.mark.parametrize("controller", ["vmsvga", "vboxsvga", "vboxvga", "none"])
def test_display_controller_is_a_value_virtualbox_reads(
    controller: str, make_cfg: Callable[..., ApplianceConfig]
) -> None:
    # VirtualBox's settings reader upper-cases Display/@controller and accepts exactly these
    # (MachineConfigFile::readHardware); anything else fails the whole import.
    root = ours(make_cfg(f"virtualbox.graphics_controller={controller}"))
    display = next(root.iter(f"{{{OVF1}}}Display"))
    assert str(display.get("controller")).upper() in {"VBOXVGA", "VMSVGA", "VBOXSVGA", "NONE"}
