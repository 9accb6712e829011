"""The VMware/vSphere OVA (`vmware-ova` in appliance/formats.py): descriptor, manifest, verifier.

What vSphere itself would say cannot be run here; the descriptor is held to the DMTF OVF 1.x schema
and to the conventions of VMware's own exports (ovftool 4.3 and govmomi samples in ../shared/ovf),
VirtualBox 7.2 imports it in the vbox tier (tests/vbox/test_vbox_vmware_ova.py), COT reads it
(tests/unit/test_cot.py).
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig
from appliance.errors import VerifyError
from appliance.export.ova import write_ova
from appliance.export.ovf import NS_VBOX, DiskFacts, ovf_descriptor, schema_errors
from appliance.formats import VMWARE_OVA
from appliance.verify import verify_ova

DISK = DiskFacts(href="csghub-1.0-vmware-disk001.vmdk", file_size=123_456, capacity=200 * 2**30, sha256="ab" * 32)
VMWARE_SAMPLES = ["vmware-ovf10-govmomi-photon5.ovf", "vmware-ovf10-govmomi-ttylinux/ttylinux-pc_i486-16.1.ovf"]


@pytest.fixture(scope="module")
def vmware_ova(tmp_path_factory: pytest.TempPathFactory, small_disk: Path,
               make_cfg: Callable[..., ApplianceConfig]) -> Path:
    dest = tmp_path_factory.mktemp("vmware") / VMWARE_OVA.file_name("csghub-test")
    return write_ova(small_disk, make_cfg("output.formats={vmware-ova}"), dest).path


def _descriptor(make_cfg: Callable[..., ApplianceConfig]) -> bytes:
    return ovf_descriptor(make_cfg("output.formats={vmware-ova}"), DISK)


def test_descriptor_is_valid_ovf_1_0_without_any_virtualbox_part(
        make_cfg: Callable[..., ApplianceConfig], ovf_schema_dir: Path) -> None:
    data = _descriptor(make_cfg)
    assert schema_errors(data, ovf_schema_dir) == []
    assert b'ovf:version="1.0"' in data and b"http://schemas.dmtf.org/ovf/envelope/1" in data
    assert NS_VBOX.encode() not in data and b"vbox:" not in data


def test_hardware_is_spelled_as_vmwares_own_exports_spell_it(
        make_cfg: Callable[..., ApplianceConfig], ovf_samples_dir: Path) -> None:
    data = _descriptor(make_cfg).decode()
    samples = "".join((ovf_samples_dir / name).read_text() for name in VMWARE_SAMPLES)
    assert "<vssd:VirtualSystemType>vmx-14</vssd:VirtualSystemType>" in data
    assert re.search(r"<vssd:VirtualSystemType>vmx-\d\d</vssd:VirtualSystemType>", samples)
    # Each value we write for the controller, the NIC and the memory unit is one VMware writes itself.
    for value in ("<rasd:ResourceSubType>vmware.sata.ahci</rasd:ResourceSubType>",
                  "<rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>",
                  "<rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>",
                  "<rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>",
                  'xmlns:vmw="http://www.vmware.com/schema/ovf"'):
        assert value in data, value
        assert value in samples, value
    assert 'vmw:osType="debian10_64Guest"' in data
    assert "<Name>csghub-appliance</Name>" in data and re.search(r"<Name>[^<]+</Name>", samples)
    assert '<Network ovf:name="VM Network">' in data and "<rasd:Connection>VM Network</rasd:Connection>" in data


def test_the_ova_carries_a_sha256_manifest_and_the_same_disk(vmware_ova: Path, small_disk: Path) -> None:
    assert vmware_ova.name == "csghub-test-vmware.ova"
    with tarfile.open(vmware_ova) as tar:
        names = tar.getnames()
        assert names == ["csghub-test-vmware.ovf", "csghub-test-vmware.mf", "csghub-test-vmware-disk001.vmdk"]
        members = {n: tar.extractfile(n).read() for n in names}  # type: ignore[union-attr]
    lines = members["csghub-test-vmware.mf"].decode().splitlines()
    assert lines == [f"SHA256({n})= {hashlib.sha256(members[n]).hexdigest()}" for n in (names[0], names[2])]


def test_verify_ova_accepts_it(vmware_ova: Path, ovf_schema_dir: Path) -> None:
    report = verify_ova(vmware_ova, boot=False, schema_dir=ovf_schema_dir)
    assert report.ovf_format == "ovf10"
    assert dict(report.checks)["manifest digests"] == "checked"


def test_a_flipped_byte_in_its_disk_is_refused(vmware_ova: Path, tmp_path: Path, ovf_schema_dir: Path) -> None:
    copy = tmp_path / vmware_ova.name
    data = bytearray(vmware_ova.read_bytes())
    with tarfile.open(vmware_ova) as tar:
        disk = tar.getmember("csghub-test-vmware-disk001.vmdk")
    data[disk.offset_data + disk.size // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(VerifyError) as err:
        verify_ova(copy, boot=False, schema_dir=ovf_schema_dir)
    assert ("csghub-test-vmware-disk001.vmdk: SHA256 digest differs from the manifest (damaged or altered)"
            in err.value.reasons)
