"""The VMware OVA's disk boots on the hardware its descriptor names for vSphere: SATA AHCI and a VMXNET3
NIC (QEMU `-device vmxnet3`, the device the verify boot gives a `vmware-ova` copy). The disk is the
locally built base box, through our writer and back out of the OVA; the only route to the copy's sshd
is the VMXNET3 device (QEMU user network, `restrict=on`), and the guest itself says which kernel
driver runs its Ethernet interface: `vmxnet3`, Debian 12's own."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.export.ova import write_ova
from appliance.verify import SSHLogin, boot_check, verify_ova

pytestmark = pytest.mark.vm


def test_the_vmware_ova_disk_boots_and_its_nic_runs_on_debians_vmxnet3_driver(tmp_path: Path) -> None:
    from appliance.basebox import KEY_NAME, cache_dir

    boxes = sorted((cache_dir() / "libvirt").glob("*.box"), key=lambda p: p.stat().st_mtime)
    key = cache_dir() / "keys" / KEY_NAME
    if not boxes or not key.is_file():
        pytest.skip(f"no base box under {cache_dir()} (build it with `invoke base-box`)")
    with tarfile.open(boxes[-1]) as tar:
        tar.extract("box.img", tmp_path, filter="data")
    cfg = load_config(None, ["vm.cpus=2", "vm.memory_mb=2048", "provision.skip=[k3s, csghub]",
                             "output.formats={vmware-ova}"], "libvirt", cwd=tmp_path)
    ova = write_ova(tmp_path / "box.img", cfg, tmp_path / "out" / "basebox-vmware.ova").path
    verify_ova(ova, cfg=cfg, boot=False, work_dir=tmp_path)
    assert cfg.output.primary_ova.ovf is not None
    nic = cfg.output.primary_ova.ovf.nic.qemu_device
    assert nic == "vmxnet3"
    with tarfile.open(ova) as tar:
        tar.extract("basebox-vmware-disk001.vmdk", tmp_path, filter="data")
    report = boot_check(tmp_path / "basebox-vmware-disk001.vmdk", login=SSHLogin(cfg.ssh.user, key), nic=nic,
                        ready_command="basename \"$(readlink /sys/class/net/e*/device/driver)\"",
                        timeout=600, work_dir=tmp_path, driver="qemu")
    assert report.ready_output == "vmxnet3"
