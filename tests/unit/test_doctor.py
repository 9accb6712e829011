"""`invoke doctor` against this host's real tools, with PATH narrowed to make pieces go missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.doctor import collect_checks, run_doctor
from appliance.errors import PrerequisiteMissing


def _cfg(*sets: str):  # type: ignore[no-untyped-def]
    return load_config(None, ["provider=libvirt", "libvirt.driver=qemu", *sets], cwd=Path("/"))


def test_missing_tools_fail_with_install_commands(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH; sbin dirs still searched by which()
    checks = {c.name: c for c in collect_checks(_cfg())}
    assert checks["vagrant"].verdict == "fail"
    assert "apt-get install" in checks["vagrant"].fix and "vagrant" in checks["vagrant"].fix


def test_vm_larger_than_host_memory_fails(tmp_path: Path) -> None:
    checks = {c.name: c for c in collect_checks(_cfg("vm.memory_mb=1048576", "output.build_dir=" + str(tmp_path)))}
    assert checks["memory"].verdict == "fail"
    assert "1048576 MiB" in checks["memory"].found
    with pytest.raises(PrerequisiteMissing) as info:
        run_doctor(_cfg("vm.memory_mb=1048576"))
    assert info.value.exit_code == 3 and "memory" in str(info.value)


def test_virtualbox_provider_checks_vboxmanage(tmp_path: Path) -> None:
    cfg = load_config(None, ["provider=virtualbox"], cwd=Path("/"))
    names = [c.name for c in collect_checks(cfg)]
    assert "VBoxManage" in names and "qemu-img" not in names
