"""The project's OVA imported by the real VirtualBox 7.2 (its own OVF reader), settings read back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.providers.virtualbox.chroot import VBoxSession
from appliance.providers.virtualbox.export import nat_rules

pytestmark = pytest.mark.vbox


def test_chroot_runs_virtualbox_7(vbox: VBoxSession) -> None:
    assert vbox.manage("--version").stdout.startswith("7.")
    api = vbox.python("import vboxapi\nm = vboxapi.VirtualBoxManager(None, None)\n"
                      "print(m.getVirtualBox().version)").stdout.strip()
    assert api.startswith("7.")
    # The session's machine folder is private (never the shared chroot's /root).
    props = vbox.manage("list", "systemproperties").stdout
    assert f"Default machine folder:          {vbox.machine_folder}" in props


def test_tmp_path_visible_at_same_path(vbox: VBoxSession, tmp_path: Path) -> None:
    (tmp_path / "probe.txt").write_text("seen from the chroot\n")
    assert vbox.run("cat", str(tmp_path / "probe.txt")).stdout == "seen from the chroot\n"
    vbox.run("sh", "-c", f"echo written > {tmp_path}/back.txt")
    assert (tmp_path / "back.txt").read_text() == "written\n"


def test_wrapper_on_path_runs_real_vboxmanage(vboxmanage_on_path: Path) -> None:
    from appliance.run import run

    assert run(["VBoxManage", "--version"]).stdout.startswith("7.")


def test_our_ova_imports(vbox: VBoxSession, built_ova: Path,
                         import_ova: Callable[..., dict[str, str]], vm_name: str) -> None:
    info = import_ova(built_ova, vm_name)
    assert info["VMState"] == "poweroff"
    assert info["cpus"] == "2" and info["memory"] == "2048"
    assert info["storagecontrollertype0"] == "IntelAhci"
    assert info["SATA-0-0"].endswith(".vmdk")
    assert info["nic1"] == "nat"
    rules = nat_rules(info)
    assert rules and all(r.host_ip == "127.0.0.1" for r in rules)


def test_parser_reads_real_showvminfo_with_awkward_values(
        vbox: VBoxSession, built_ova: Path, import_ova: Callable[..., dict[str, str]], vm_name: str) -> None:
    """The showvminfo parser against VirtualBox's real printer (the unit tests' sample is hand-written)."""
    from appliance.providers.virtualbox.export import parse_machinereadable

    import_ova(built_ova, vm_name)
    description = 'CSGHub "build" VM\nsecond line, with a backslash \\ in it'
    vbox.manage("modifyvm", vm_name, "--description", description)
    vbox.manage("modifyvm", vm_name, "--natpf1", "with space,tcp,127.0.0.1,2222,,22")
    raw = vbox.manage("showvminfo", vm_name, "--machinereadable").stdout
    info = parse_machinereadable(raw)
    assert info["description"] == description
    assert info["GuestMemoryBalloon"] == "0"  # parsing went on after the multi-line value
    assert ("with space", "127.0.0.1", 2222, 22) in {(r.name, r.host_ip, r.host_port, r.guest_port)
                                                     for r in nat_rules(info)}
    # Every line of the real output is accounted for: a key=value pair, a continuation of a
    # multi-line value, or one of VirtualBox 7's indented headings.
    assert len(info) >= sum(1 for line in raw.splitlines() if "=" in line and not line.startswith(" ")) - 1
