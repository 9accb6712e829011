"""The VirtualBox paths that change a VM right after it stopped, against a VM whose session the test holds open.

A VM that has just powered off is still locked while VirtualBox tears its session down; the real
VBoxManage then refuses ``unregistervm`` and ``modifyvm``. Here the test holds the session itself,
through VirtualBox's Python API (``vboxapi``'s ``IMachine.lockMachine``) in the chroot: that works
without the kernel driver (``VBoxManage startvm`` would not). A named session shows in
``showvminfo --machinereadable`` as ``SessionName``; an unnamed one shows nowhere, and only the
refusal tells. Both must be waited for.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig
from appliance.errors import ExportError
from appliance.providers.virtualbox.chroot import VBoxSession
from appliance.providers.virtualbox.export import export_virtualbox, nat_rules, unregister_and_delete, vm_info

pytestmark = pytest.mark.vbox

HOLD = """
import sys, time
from vboxapi import VirtualBoxManager
manager = VirtualBoxManager(None, None)
machine = manager.getVirtualBox().findMachine(sys.argv[1])
session = manager.getSessionObject()
if sys.argv[3]:
    session.name = sys.argv[3]
machine.lockMachine(session, manager.constants.LockType_Write)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
session.unlockMachine()
"""


@pytest.fixture
def hold_session(vbox: VBoxSession) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """``hold_session(vm, seconds, name="")``: a write lock on ``vm`` for ``seconds``, taken before it returns."""
    holders: list[subprocess.Popen[str]] = []

    def hold(vm: str, seconds: float, name: str = "") -> subprocess.Popen[str]:
        holder = subprocess.Popen(vbox.argv("python3", "-c", HOLD, vm, str(seconds), name),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        holders.append(holder)
        assert holder.stdout is not None
        line = holder.stdout.readline().strip()
        assert line == "locked", holder.stderr.read() if holder.stderr else line
        return holder

    yield hold
    for holder in holders:
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()  # by its own PID: the chroot's python (nsenter, chroot, env and sh exec it)
            holder.wait()


def _create_vm(vbox: VBoxSession, name: str, folder: Path) -> Path:
    vbox.manage("createvm", "--name", name, "--register", "--basefolder", str(folder))
    return folder / name


def test_unregister_waits_for_a_named_session_and_deletes(vbox: VBoxSession, vboxmanage_on_path: Path,
                                                          hold_session: Callable[..., subprocess.Popen[str]],
                                                          vm_name: str, tmp_path: Path) -> None:
    from appliance.providers.virtualbox.boot import why_stopped

    vm_dir = _create_vm(vbox, vm_name, tmp_path / "vms")
    assert why_stopped(vm_name) == "VirtualBox reports it 'poweroff'"  # the verify boot's watch: not running
    hold_session(vm_name, 4, "csghub-test")
    assert vm_info(vm_name).get("SessionName") == "csghub-test"
    # The race is real: VirtualBox refuses while the session is held.
    refused = vbox.manage("unregistervm", vm_name, "--delete", check=False)
    assert refused.returncode != 0 and "locked" in refused.stderr
    started = time.monotonic()
    unregister_and_delete(vm_name)
    assert time.monotonic() - started > 1  # it waited for the session to go
    assert f'"{vm_name}"' not in vbox.manage("list", "vms").stdout
    assert not vm_dir.exists()
    assert why_stopped(vm_name) is not None and why_stopped(vm_name).startswith("VirtualBox no longer shows the VM")


def test_a_vm_held_past_the_wait_is_reported_still_registered(vbox: VBoxSession, vboxmanage_on_path: Path,
                                                              hold_session: Callable[..., subprocess.Popen[str]],
                                                              vm_name: str, tmp_path: Path) -> None:
    _create_vm(vbox, vm_name, tmp_path / "vms")
    holder = hold_session(vm_name, 6, "csghub-test")
    with pytest.raises(ExportError) as err:
        unregister_and_delete(vm_name, lock_wait=1)
    assert f"VirtualBox VM {vm_name!r} is still registered" in str(err.value)
    assert "session 'csghub-test'" in str(err.value)
    assert f"VBoxManage unregistervm {vm_name} --delete" in (err.value.hint or "")
    holder.wait(timeout=60)
    unregister_and_delete(vm_name)
    assert f'"{vm_name}"' not in vbox.manage("list", "vms").stdout


def test_export_waits_for_an_unnamed_session(vbox: VBoxSession, vboxmanage_on_path: Path, built_ova: Path,
                                             hold_session: Callable[..., subprocess.Popen[str]], tmp_path: Path,
                                             make_cfg: Callable[..., ApplianceConfig],
                                             import_ova: Callable[..., dict[str, str]], vm_name: str) -> None:
    """The sealed VM powers itself off and the export's modifyvm comes right after: a session
    VirtualBox has not released yet (here one without a name: showvminfo shows nothing) is waited for."""
    cfg = make_cfg(f"vm.name={vm_name}").model_copy(update={"provider": "virtualbox"})
    import_ova(built_ova, vm_name)
    vbox.manage("modifyvm", vm_name, "--natpf1", "ssh,tcp,127.0.0.1,2222,,22")  # Vagrant's, to be removed
    hold_session(vm_name, 4)
    assert "SessionName" not in vm_info(vm_name)
    refused = vbox.manage("modifyvm", vm_name, "--natpf1", "delete", "ssh", check=False)
    assert refused.returncode != 0 and "already locked" in refused.stderr
    result = export_virtualbox(cfg, tmp_path / "dist")
    assert result.path.is_file()
    assert {r.name for r in nat_rules(vm_info(vm_name))} == {p.name for p in cfg.network.forwarded_ports}


def test_doctor_says_the_driver_is_missing_here(vboxmanage_on_path: Path) -> None:
    """`VBoxManage list hostinfo` answers without the driver; the check looks at the driver's device."""
    from appliance.providers.virtualbox.hostprobe import VBOXDRV
    from appliance.providers.virtualbox.provider import check_virtualbox

    if VBOXDRV.exists():
        pytest.skip(f"this host has VirtualBox's kernel driver ({VBOXDRV})")
    checks = {c.name: c for c in check_virtualbox()}
    driver = checks["VirtualBox kernel driver"]
    assert driver.verdict == "fail"
    assert driver.found.startswith("missing: /dev/vboxdrv does not exist")
    assert "vboxconfig" in driver.fix
