"""The host decisions that make libvirt usable: who may open /dev/kvm, who may start libvirtd, what to type.

Real files and users where the decision reads them (a device node stands in for /dev/kvm: a
file with the same owner, group and mode; users from this host's passwd); systemd and root are
the two facts switched by the test.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from appliance.providers.libvirt import libvirtd
from appliance.providers.libvirt.libvirtd import kvm_access, may_open_rw, may_start_daemons, qemu_user, start_hint


@pytest.mark.parametrize(("mode", "owner", "group", "uid", "groups", "allowed"), [
    (0o600, 0, 0, 0, {0}, True),           # root opens anything
    (0o600, 0, 0, 64055, {64055}, False),  # this host: /dev/kvm 0600 root, libvirt-qemu cannot
    (0o660, 0, 108, 64055, {64055}, False),  # a udev host, libvirt-qemu not in kvm (the documented useradd)
    (0o660, 0, 108, 64055, {64055, 108}, True),  # ... and in it (libvirt-daemon-system's postinst)
    (0o666, 0, 108, 1000, {1000}, True),
    (0o640, 0, 108, 64055, {108}, False),  # read-only for the group is not enough
])
def test_who_may_open_kvm(mode: int, owner: int, group: int, uid: int, groups: set[int], allowed: bool) -> None:
    assert may_open_rw(mode, owner, group, uid, groups) is allowed


def test_kvm_access_reads_the_device_and_the_user(tmp_path: Path) -> None:
    device = tmp_path / "kvm"
    device.write_text("")
    device.chmod(0o600)
    nobody = pwd.getpwnam("nobody")
    refused = kvm_access("nobody", device)
    assert not refused.allowed and "-rw-------" in refused.detail and "for root only here" in refused.fix
    os.chown(device, 0, nobody.pw_gid)
    device.chmod(0o660)
    assert kvm_access("nobody", device).allowed
    assert kvm_access("root", device).allowed
    missing = kvm_access("csghub-no-such-user", device)
    assert not missing.allowed and "scripts/setup.sh" in missing.fix
    assert "does not exist" in kvm_access("nobody", tmp_path / "absent").detail


def test_qemu_user_comes_from_qemu_conf(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    assert qemu_user(conf) == "libvirt-qemu"  # Debian's build default when there is no qemu.conf
    conf.write_text('# user = "nobody"\n\nuser = "root"\ngroup = "root"\n')
    assert qemu_user(conf) == "root"


@pytest.mark.parametrize(("systemd", "root", "uri", "why"), [
    (False, True, "qemu:///system", ""),
    (True, True, "qemu:///system", "systemd manages libvirtd"),
    (False, False, "qemu:///system", "needs root"),
    (False, True, "qemu:///session", "not the local system instance"),
])
def test_who_may_start_libvirtd(systemd: bool, root: bool, uri: str, why: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(libvirtd, "systemd_running", lambda: systemd)
    monkeypatch.setattr(libvirtd.os, "geteuid", lambda: 0 if root else 1000)
    monkeypatch.setattr(libvirtd, "which", lambda program: f"/usr/sbin/{program}")
    reason = may_start_daemons(uri)
    assert (why in reason and reason) if why else reason == ""


def test_the_hint_is_a_command_that_works_on_this_kind_of_host(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setattr(libvirtd, "which", lambda program: f"/usr/sbin/{program}")
    monkeypatch.setattr(libvirtd.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(libvirtd, "systemd_running", lambda: False)
    assert "sudo invoke up" in start_hint() and "sudo libvirtd -d" in start_hint()
    monkeypatch.setattr(libvirtd, "systemd_running", lambda: True)
    unit_exists = Path("/lib/systemd/system/libvirtd.service").exists()
    expected = "sudo systemctl start libvirtd" if unit_exists else "apt-get install --no-install-recommends " \
        "libvirt-daemon-system"
    assert expected in start_hint()
    monkeypatch.setattr(libvirtd, "which", lambda program: None)
    assert "scripts/setup.sh" in start_hint()
