"""The VirtualBox base box (box.ovf + VMDK + metadata.json + Vagrantfile) imported by the real VirtualBox."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.basebox import KEY_NAME, add_box, installed_versions
from appliance.config import ApplianceConfig
from appliance.providers.registry import provider_for
from appliance.providers.virtualbox.box import VBOX_BOX_DISK
from appliance.providers.virtualbox.chroot import VBoxSession
from appliance.providers.virtualbox.export import nat_rules
from appliance.run import run

pytestmark = pytest.mark.vbox

DISK_GB = 16


@pytest.fixture(scope="module")
def vbox_box(tmp_path_factory: pytest.TempPathFactory, make_cfg: Callable[..., ApplianceConfig]) -> Path:
    """A VirtualBox box around a small raw disk (the real image takes minutes; the packaging is what is tested)."""
    work = tmp_path_factory.mktemp("vbox-box")
    raw = work / "disk.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "64M"])
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 0 1M", "-c", "write -P 0x17 60M 1M", str(raw)])
    key = work / KEY_NAME
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
    box = work / "debian12-virtualbox.box"
    cfg = make_cfg(f"vm.disk_gb={DISK_GB}").model_copy(update={"provider": "virtualbox"})
    provider_for(cfg).package_box(raw, box, key=key, info={"built_by": "test"})  # as `invoke base-box` asks it
    return box


def test_box_layout_is_vagrants_virtualbox_format(vbox_box: Path) -> None:
    with tarfile.open(vbox_box) as tar:
        names = set(tar.getnames())
        meta = tar.extractfile("metadata.json")
        assert meta is not None
        assert json.load(meta) == {"provider": "virtualbox"}
        key = tar.getmember(KEY_NAME)
        assert key.mode == 0o600
    assert {"box.ovf", VBOX_BOX_DISK, "metadata.json", "Vagrantfile", KEY_NAME} <= names


def test_box_ovf_imports_with_expected_hardware_and_disk_size(
        vbox: VBoxSession, vbox_box: Path, tmp_path: Path, vm_name: str) -> None:
    unpacked = tmp_path / "box"
    with tarfile.open(vbox_box) as tar:
        tar.extractall(unpacked, filter="data")
    # What Vagrant's VirtualBox provider does with a box: VBoxManage import <box dir>/box.ovf.
    done = vbox.manage("import", str(unpacked / "box.ovf"), "--vsys", "0", "--vmname", vm_name)
    assert "Successfully imported the appliance." in done.stdout
    try:
        from appliance.providers.virtualbox.export import parse_machinereadable

        info = parse_machinereadable(vbox.manage("showvminfo", vm_name, "--machinereadable").stdout)
        assert info["storagecontrollertype0"] == "IntelAhci" and info["SATA-0-0"].endswith(".vmdk")
        assert info["nic1"] == "nat" and info["nictype1"] == "82540EM"
        assert nat_rules(info) == []  # Vagrant adds its own forwards at `vagrant up`
        assert info["vrde"] == "off" and info["audio"] == "none" and info["effparavirtprovider"] == "kvm"
        assert info["firmware"] == "BIOS"
        medium = vbox.manage("showmediuminfo", "disk", info["SATA-ImageUUID-0-0"]).stdout
        capacity = re.search(r"^Capacity:\s+(\d+) MBytes", medium, re.M)
        assert capacity is not None, medium
        assert int(capacity.group(1)) == DISK_GB * 1024  # vm.disk_gb reached VirtualBox, no experimental flag
    finally:
        vbox.manage("unregistervm", vm_name, "--delete", check=False)


def test_vagrant_box_add_accepts_it(vbox_box: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("vagrant") is None:
        pytest.skip("vagrant is not installed")
    monkeypatch.setenv("VAGRANT_HOME", str(tmp_path / "vagrant.d"))  # passed through to Vagrant by appliance.run
    # The base-box task's own calls: a local catalog carrying the version, then `vagrant box list`.
    add_box(vbox_box, name="csghub-test/debian12", version="12.1.2", workdir=tmp_path, provider="virtualbox")
    assert installed_versions("csghub-test/debian12", "virtualbox") == ["12.1.2"]
    assert installed_versions("csghub-test/debian12", "libvirt") == []
    stored = list((tmp_path / "vagrant.d" / "boxes").rglob("box.ovf"))
    assert len(stored) == 1 and (stored[0].parent / VBOX_BOX_DISK).is_file()
