"""Our descriptor against VirtualBox's own: ``VBoxManage export`` of the VM imported from our OVA.

VirtualBox's exporter is the reference for what VirtualBox itself would ship. Both descriptors
are flattened into ``path -> value`` (items keyed by ResourceType, not by position), and every
difference must be one listed, with its reason, in ``EXPECTED`` (also in docs/export.md). A new
difference, or one that disappeared, fails the test. The ``vbox:Machine`` sections differ in
form (settings 1.15 against 1.19) and are compared by effect: both OVAs are imported and the
VMs' settings must be the same.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from appliance.config import ApplianceConfig
from appliance.export.ova import write_ova
from appliance.export.virtualbox import export_argv
from appliance.vboxchroot import VBoxSession

pytestmark = pytest.mark.vbox

NS_VBOX = "http://www.virtualbox.org/ovf/machine"


def local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def flatten(data: bytes) -> dict[str, str]:
    """The standard OVF part of a descriptor as ``path -> value``; vbox:Machine left out."""
    root = ET.fromstring(data)
    out: dict[str, str] = {}
    for prefix, uri in re.findall(rb'xmlns:?([A-Za-z]*)="([^"]*)"', data.split(b">", 2)[1]):
        out[f"xmlns:{prefix.decode()}"] = uri.decode()

    def walk(el: ET.Element, path: str) -> None:
        for name, value in el.attrib.items():
            out[f"{path}@{local(name)}"] = value
        text = (el.text or "").strip()
        if text:
            out[path] = text
        for child in el:
            if child.tag == f"{{{NS_VBOX}}}Machine":
                continue
            tag = local(child.tag)
            if tag in ("Item", "StorageItem", "EthernetPortItem"):
                rtype = next(c.text for c in child if local(c.tag) == "ResourceType")
                walk(child, f"{path}/{tag}[{rtype}]")
            else:
                walk(child, f"{path}/{tag}")

    walk(root, "Envelope")
    return out


def member(ova: Path, suffix: str) -> tuple[str, bytes]:
    with tarfile.open(ova) as tar:
        m = next(m for m in tar.getmembers() if m.name.endswith(suffix))
        f = tar.extractfile(m)
        assert f is not None
        return m.name, f.read()


# Every difference between our descriptor and VirtualBox 7.2's export of the VM imported from it.
# "path": (ours, VirtualBox's) with None for "absent". Values that depend on the run (UUIDs, names,
# sizes) are normalised before comparing: see normalise().
_HW = "Envelope/VirtualSystem/VirtualHardwareSection"
_ALWAYS: dict[str, tuple[str | None, str | None]] = {
    # Our File says its size, so a reader can refuse a short archive before reading the disk.
    "Envelope/References/File@size": ("<size>", None),
}
EXPECTED: dict[str, dict[str, tuple[str | None, str | None]]] = {
    "ovf10": dict(_ALWAYS),
    "ovf20": {
        **_ALWAYS,
        # VirtualBox appends ".xsd" to these two namespace names; no schema knows those names,
        # so its OVF 2.0 descriptors fail validation. Ours use the real names.
        "xmlns:epasd": ("http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_EthernetPortAllocationSettingData",
                        "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_EthernetPortAllocationSettingData"
                        ".xsd"),
        "xmlns:sasd": ("http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData",
                       "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData.xsd"),
        # OVF 2.0's schema requires ElementName on every item; VirtualBox's 2.0 writer leaves it out.
        f"{_HW}/Item[3]/ElementName": ("4 virtual CPUs", None),
        f"{_HW}/Item[4]/ElementName": ("2048 MB of memory", None),
        f"{_HW}/Item[20]/ElementName": ("sataController0", None),
        f"{_HW}/StorageItem[17]/ElementName": ("disk1", None),
        f"{_HW}/EthernetPortItem[10]/ElementName": ("Ethernet adapter on 'NAT'", None),
    },
}


def normalise(flat: dict[str, str]) -> dict[str, str]:
    """Run-dependent values replaced by placeholders (the VMDKs differ: each writer compresses its own)."""
    out = {}
    for k, v in flat.items():
        if k.endswith("Disk@uuid"):
            v = "<uuid>"
        elif k.endswith("File@size"):
            v = "<size>"
        elif k.endswith("File@href"):
            v = "<disk href>"
        out[k] = v
    return out


@pytest.mark.parametrize(("fmt", "cpus"), [("ovf10", 2), ("ovf20", 4), ("ovf10", 1)])
def test_descriptor_matches_virtualboxs_own_export(
        fmt: str, cpus: int, vbox: VBoxSession, vboxmanage_on_path: Path, tmp_path: Path, small_disk: Path,
        make_cfg: Callable[..., ApplianceConfig], import_ova: Callable[..., dict[str, str]], vm_name: str) -> None:
    eula = tmp_path / "EULA.txt"
    eula.write_text("Licence text.\nSecond line.\n")
    formats = "output.formats={virtualbox-ova" + ("" if fmt == "ovf10" else "-ovf20") + "}"
    cfg = make_cfg(f"vm.name={vm_name}", formats, f"output.eula_file={eula}",
                   f"vm.cpus={cpus}", "provision.skip=[k3s, csghub]")
    ours = write_ova(small_disk, cfg, tmp_path / "ours" / "csghub.ova").path
    mine_info = import_ova(ours, vm_name, "--eula", "accept")
    theirs = tmp_path / "theirs" / "csghub.ova"
    theirs.parent.mkdir()
    vbox.manage(*export_argv(cfg, vm_name, theirs, fmt)[1:])  # type: ignore[arg-type]

    mine = normalise(flatten(member(ours, ".ovf")[1]))
    vb = normalise(flatten(member(theirs, ".ovf")[1]))
    diff = {k: (mine.get(k), vb.get(k)) for k in sorted(set(mine) | set(vb)) if mine.get(k) != vb.get(k)}
    assert diff == EXPECTED[fmt]

    # vbox:Machine by effect: VirtualBox's re-export imports to the same settings as ours.
    theirs_info = import_ova(theirs, f"{vm_name}-re", "--eula", "accept")
    volatile = re.compile(r"^(name|UUID|hardwareuuid|CfgFile|SnapFldr|LogFldr|NvramFile|VMStateChangeTime|"
                          r"macaddress\d|SATA-ImageUUID-.*|SATA-\d+-\d+|rec_screen_dest_filename)$")
    a = {k: v for k, v in mine_info.items() if not volatile.match(k)}
    b = {k: v for k, v in theirs_info.items() if not volatile.match(k)}
    assert {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)} == {}
