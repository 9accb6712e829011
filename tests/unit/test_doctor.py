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
    assert "VBoxManage" in names and "qemu-img (for verify-ova)" in names


# (Vagrant, VirtualBox) -> verdict; from Vagrant's CHANGELOG and Debian's packages (see doctor.py).
VERSION_CASES = [
    ((2, 3, 4), (7, 2, 22), "fail", "2.4.9"),     # Debian 12's Vagrant and sid's VirtualBox: refused here
    ((2, 3, 7), (7, 1, 6), "fail", "2.4.2"),      # sid's Vagrant declares Breaks: virtualbox (>= 7.1)
    ((2, 3, 4), (7, 0, 20), "ok", ""),
    ((2, 3, 1), (7, 0, 0), "fail", "2.3.2"),
    ((2, 4, 2), (7, 1, 0), "ok", ""),
    ((2, 4, 8), (7, 2, 0), "fail", "2.4.9"),
    ((2, 4, 9), (7, 2, 4), "ok", ""),
    ((2, 4, 9), (6, 1, 50), "ok", ""),
    ((2, 4, 9), (7, 3, 0), "warn", "7.3"),        # newer than any line this tool knows
    ((2, 4, 9), (5, 2, 44), "fail", "VirtualBox 7"),
    ((2, 4, 9), (), "warn", ""),
]


@pytest.mark.parametrize(("vagrant", "vbox", "verdict", "mentions"), VERSION_CASES)
def test_vagrant_virtualbox_versions(vagrant: tuple[int, ...], vbox: tuple[int, ...], verdict: str,
                                     mentions: str) -> None:
    from appliance.providers.virtualbox.hostprobe import vagrant_drives_virtualbox

    check = vagrant_drives_virtualbox(vagrant, vbox)
    assert check.verdict == verdict, check
    assert mentions in check.found + check.fix
    if verdict == "fail" and vbox[:2] >= (7, 0):
        assert "HashiCorp" in check.fix
