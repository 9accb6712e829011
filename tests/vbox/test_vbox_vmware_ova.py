"""The VMware OVA (`vmware-ova`), imported by VirtualBox 7.2's own OVF reader and read back.

vSphere does not run here; VirtualBox's importer is the independent reader of VMware-style OVF 1.0
we can run (it reads VMware's `vmware.sata.ahci` controller and `vmx-NN` families). The assertions
are on what VirtualBox made of it (`showvminfo --machinereadable`) and on the disk it unpacked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig
from appliance.export.ova import write_ova
from appliance.formats import VMWARE_OVA
from appliance.providers.virtualbox.chroot import VBoxSession
from tests.vbox.conftest import assert_disk_reads_back

pytestmark = pytest.mark.vbox


def test_vmware_ova_imports_into_virtualbox_with_its_hardware_and_disk(
        vbox: VBoxSession, tmp_path: Path, small_disk: Path, make_cfg: Callable[..., ApplianceConfig],
        import_ova: Callable[..., dict[str, str]], vm_name: str) -> None:
    cfg = make_cfg("output.formats={vmware-ova}", "vm.cpus=3", "vm.memory_mb=3072")
    ova = write_ova(small_disk, cfg, tmp_path / VMWARE_OVA.file_name("csghub-test")).path
    info = import_ova(ova, vm_name)

    assert info["cpus"] == "3"
    assert info["memory"] == "3072"  # rasd:AllocationUnits "byte * 2^20", as VMware writes it
    assert info["ostype"] == "Debian (64-bit)"  # from the CIM id 96
    assert info["storagecontrollertype0"] == "IntelAhci"  # "vmware.sata.ahci" read as a SATA AHCI controller
    assert info["SATA-0-0"].endswith(".vmdk")
    assert info["nic1"] != "none" and info["nic2"] == "none"
    # VirtualBox has no VMXNET3: its importer gives the NIC its default Intel PRO/1000 MT Desktop (e1000 in Debian).
    assert info["nictype1"] == "82540EM"
    assert info["vrde"] == "off"

    # The same sealed disk as the VirtualBox OVA, byte for byte.
    assert_disk_reads_back(vbox, info, small_disk, tmp_path)
