"""A provider for pipeline tests: no hypervisor, every call recorded.

It keeps the ``Provider`` interface (tests/unit/test_providers.py runs the same conformance
checks against it and the real libvirt and VirtualBox providers). Its export writes a real OVA
with our own writer from a disk the test hands it (``export.libvirt.export_libvirt``), so the
stages after it get a real file; its box is a real tar with the box metadata.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from appliance.checks import Check
from appliance.config import ApplianceConfig
from appliance.providers.base import Exported, Provider


class FakeProvider(Provider):
    name = "fake"
    boot_backend = "qemu"

    def __init__(self, cfg: ApplianceConfig, *, disk: Path | None = None) -> None:
        super().__init__(cfg)
        self.disk = disk
        self.calls: list[tuple[str, object]] = []
        self.machines: dict[str, str] = {}  # machine id -> state, as the hypervisor would answer

    def host_checks(self) -> list[Check]:
        self.calls.append(("host_checks", None))
        return [Check("fake hypervisor", "ok", "nothing to check")]

    def resolve_driver(self) -> str | None:
        return None

    def vagrant_env(self) -> dict[str, str]:
        return {"CSGHUB_FAKE_PROVIDER": "1"}

    def check_reachable(self) -> None:
        self.calls.append(("check_reachable", None))

    def preflight(self) -> None:
        self.calls.append(("preflight", None))

    def before_create(self) -> None:
        self.calls.append(("before_create", None))

    def machine_state(self, machine_id: str) -> str:
        self.calls.append(("machine_state", machine_id))
        return self.machines.get(machine_id, "not_created")

    def remove_machine(self, machine_id: str, record: Path) -> None:
        self.calls.append(("remove_machine", machine_id))
        self.machines.pop(machine_id, None)

    def after_halt(self, project: Path) -> None:
        self.calls.append(("after_halt", project))

    def export(self, dest_dir: Path) -> Exported:
        from appliance.providers.libvirt.export import export_libvirt

        self.calls.append(("export", dest_dir))
        if self.disk is None:
            raise AssertionError("FakeProvider.export needs a disk: FakeProvider(cfg, disk=...)")
        return Exported(export_libvirt(self.cfg, self.disk, dest_dir), self.disk)

    def package_box(self, raw_disk: Path, box_file: Path, *, key: Path, info: dict[str, object]) -> None:
        self.calls.append(("package_box", box_file))
        with tarfile.open(box_file, "w") as tar:
            meta = box_file.with_suffix(".metadata.json")
            meta.write_text(json.dumps({"provider": self.name, **info}))
            tar.add(meta, arcname="metadata.json")
            tar.add(raw_disk, arcname="box.img")
            meta.unlink()
