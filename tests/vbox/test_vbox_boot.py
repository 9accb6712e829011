"""verify-ova's VirtualBox boot path against the real VirtualBox: everything up to ``startvm``.

VirtualBox cannot start VMs here (no kernel driver), so the boot must end in a clear
prerequisite error, quickly, and leave no VM or file behind.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from appliance.errors import PrerequisiteMissing
from appliance.vboxchroot import VBoxSession
from appliance.verify import SSHLogin, verify_ova

pytestmark = pytest.mark.vbox


def test_virtualbox_boot_ends_in_a_clear_prerequisite_error(
        vbox: VBoxSession, vboxmanage_on_path: Path, built_ova: Path, tmp_path: Path) -> None:
    if Path("/dev/vboxdrv").exists():
        pytest.skip("this host has VirtualBox's kernel driver: the boot would really run")
    key = tmp_path / "id_ed25519"
    key.write_text("not used: the VM never starts here\n")
    work = tmp_path / "work"
    work.mkdir()
    before = vbox.manage("list", "vms").stdout
    started = time.monotonic()
    with pytest.raises(PrerequisiteMissing) as err:
        verify_ova(built_ova, login=SSHLogin(user="vagrant", key_file=key), boot_with="virtualbox",
                   work_dir=work, boot_timeout=600)
    assert time.monotonic() - started < 120  # an error, not a wait for the boot timeout
    message = str(err.value)
    assert message.startswith("VirtualBox could not start the verify VM: ")
    assert "startup" in message  # VirtualBox's own reason is passed on
    assert "vboxconfig" in message  # and what to do about it
    assert "--no-boot" in message
    # The temporary VM is unregistered and its files are gone.
    assert vbox.manage("list", "vms").stdout == before
    assert list(work.iterdir()) == []
