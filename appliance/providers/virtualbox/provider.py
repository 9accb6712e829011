"""VirtualBox: what the evaluators have. Vagrant's built-in provider drives it.

Host checks: VBoxManage, its kernel driver, whether this Vagrant drives this VirtualBox line,
and qemu-img (``verify-ova`` reads the exported disk with it on every host). No driver to
resolve, no preflight beyond Vagrant's own. VirtualBox exports the VM itself
(``appliance.providers.virtualbox.export``) and the verify stage boots the OVA in VirtualBox
(``appliance.providers.virtualbox.boot``). The base box is Vagrant's VirtualBox format with our own OVF.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from appliance.checks import Check, command_version, tool_check
from appliance.errors import CommandFailed
from appliance.providers.base import Exported, Provider
from appliance.providers.virtualbox.box import package_virtualbox_box
from appliance.providers.virtualbox.export import export_virtualbox, not_registered, unregister_and_delete, vm_info
from appliance.providers.virtualbox.hostprobe import VBOXDRV, vagrant_drives_virtualbox, vbox_driver_missing


def check_virtualbox() -> list[Check]:
    checks = [tool_check("VBoxManage", "VBoxManage", "install VirtualBox 7: https://www.virtualbox.org/wiki/Downloads")]
    if checks[0].verdict == "ok":
        missing = vbox_driver_missing()
        present = f"{VBOXDRV} present" if sys.platform.startswith("linux") else "loaded"
        checks.append(Check("VirtualBox kernel driver", "fail" if missing else "ok", missing or present,
                            "load the vboxdrv module (sudo /sbin/vboxconfig) and check Secure Boot" if missing else ""))
        vagrant = command_version(["vagrant", "--version"])
        if vagrant:
            checks.append(vagrant_drives_virtualbox(vagrant, command_version(["VBoxManage", "--version"])))
    # verify-ova reads the exported disk with qemu-img, on every host.
    checks.append(tool_check("qemu-img (for verify-ova)", "qemu-img",
                             "apt-get install --no-install-recommends qemu-utils (macOS: brew install qemu)"))
    return checks


class VirtualBoxProvider(Provider):
    name = "virtualbox"
    boot_backend = "virtualbox"

    def host_checks(self) -> list[Check]:
        return check_virtualbox()

    def resolve_driver(self) -> str | None:
        return None

    def export(self, dest_dir: Path) -> Exported:
        return Exported(export_virtualbox(self.cfg, dest_dir))

    def box_digest(self, image_digest: str) -> str:
        cfg = self.cfg
        extra = {"provider": self.name, "disk_gb": cfg.vm.disk_gb, "nic": cfg.virtualbox.nic_type,
                 "graphics": cfg.virtualbox.graphics_controller,
                 "localhost": cfg.virtualbox.nat_localhost_reachable}
        return hashlib.sha256(json.dumps([image_digest, extra], sort_keys=True).encode()).hexdigest()

    def package_box(self, raw_disk: Path, box_file: Path, *, key: Path, info: dict[str, object]) -> None:
        package_virtualbox_box(raw_disk, box_file, key=key, info=info, cfg=self.cfg,
                               disk_bytes=self.cfg.vm.disk_gb * 1024**3)

    def machine_state(self, machine_id: str) -> str:
        try:
            info = vm_info(machine_id)
        except CommandFailed as exc:
            if not_registered(exc.result):
                return "not_created"
            raise
        return info.get("VMState", "unknown")

    def remove_machine(self, machine_id: str, record: Path) -> None:
        unregister_and_delete(machine_id)
