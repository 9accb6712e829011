"""verify-ova's VirtualBox boot path against the real VirtualBox: everything up to ``startvm``.

VirtualBox cannot start VMs here (no kernel driver), so the boot must end in a clear
prerequisite error, quickly, and leave no VM or file behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.errors import PrerequisiteMissing
from appliance.providers.virtualbox.chroot import VBoxSession
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


def test_the_verify_vm_carries_this_boots_nonce_in_its_oem_strings(
        vbox: VBoxSession, vboxmanage_on_path: Path, built_ova: Path,
        import_ova: Callable[..., dict[str, str]], vm_name: str, tmp_path: Path) -> None:
    """The first-boot proof on VirtualBox: the real VBoxManage takes the nonce as the VM's
    ``DmiOEMVBoxRev`` (the SMBIOS type 11 string the guest reads, as under QEMU), the OVA's own
    forwards give way to the check's loopback ones, and the console goes to a file."""
    from appliance.providers.virtualbox.boot import nonce_extradata_key, prepare_verify_vm
    from appliance.providers.virtualbox.export import nat_rules, vm_info
    from appliance.verify_boot import NONCE_OEM_KEY, new_boot_nonce

    info = import_ova(built_ova, vm_name)
    assert nat_rules(info), "the OVA brings forwards of its own"
    key = nonce_extradata_key(info)
    assert key == "VBoxInternal/Devices/pcbios/0/Config/DmiOEMVBoxRev"  # our OVA boots BIOS firmware
    nonce = new_boot_nonce()
    console = tmp_path / "console.log"
    ssh_port, http_port = prepare_verify_vm(vm_name, console, nonce, http_port=80)
    value = vbox.manage("getextradata", vm_name, key).stdout.strip()
    assert value == f"Value: string:{NONCE_OEM_KEY}={nonce}"
    after = vm_info(vm_name)
    rules = {(r.host_ip, r.host_port, r.guest_port) for r in nat_rules(after)}
    assert rules == {("127.0.0.1", ssh_port, 22), ("127.0.0.1", http_port, 80)}
    assert after["uartmode1"] == f"file,{console}"


def test_the_nonce_goes_to_the_efi_firmware_when_the_vm_boots_efi() -> None:
    from appliance.providers.virtualbox.boot import nonce_extradata_key

    assert nonce_extradata_key({"firmware": "EFI64"}) == "VBoxInternal/Devices/efi/0/Config/DmiOEMVBoxRev"
    assert nonce_extradata_key({"firmware": "BIOS"}) == "VBoxInternal/Devices/pcbios/0/Config/DmiOEMVBoxRev"
    assert nonce_extradata_key({}) == "VBoxInternal/Devices/pcbios/0/Config/DmiOEMVBoxRev"
