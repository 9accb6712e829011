"""A VirtualBox VM whose Vagrant project lost its Vagrantfile is still reported and removed (appliance.vm).

Vagrant records the VM's UUID in ``.vagrant/machines/default/virtualbox/id``; with no Vagrantfile no
``vagrant`` command works there, so ``status`` and ``destroy`` ask VirtualBox itself (7.2, in the chroot).
"""

from __future__ import annotations

from pathlib import Path

from appliance import vm
from appliance.config import load_config
from appliance.providers.virtualbox.chroot import VBoxSession
from appliance.providers.virtualbox.export import vm_info
from appliance.providers.virtualbox.provider import VirtualBoxProvider


def test_status_and_destroy_without_a_vagrantfile(vbox: VBoxSession, vboxmanage_on_path: Path, vm_name: str,
                                                   tmp_path: Path) -> None:
    vbox.manage("createvm", "--name", vm_name, "--register", "--basefolder", str(tmp_path / "vms"))
    machine_id = vm_info(vm_name)["UUID"]
    cfg = load_config(None, [f"output.build_dir={tmp_path / 'build'}", "provision.skip=[k3s, csghub]"],
                      "virtualbox", cwd=tmp_path)
    provider = VirtualBoxProvider(cfg)
    record = vm.project_dir(cfg) / ".vagrant" / "machines" / "default" / "virtualbox"
    record.mkdir(parents=True)
    (record / "id").write_text(machine_id)
    try:
        assert vm.status(cfg, provider).state == "poweroff"
        vm.destroy(cfg, provider)
        assert provider.machine_state(machine_id) == "not_created"
        assert not record.exists() and not (tmp_path / "vms" / vm_name).exists()
        assert vm.status(cfg, provider).state == "not_created"
        assert not (vm.project_dir(cfg) / "Vagrantfile").exists()
    finally:
        vbox.manage("unregistervm", vm_name, "--delete", check=False)
