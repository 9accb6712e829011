"""The boot check on a VirtualBox host: the copy VirtualBox itself would run, started headless.

``virtualbox_boot_check(ova, ...)`` imports the OVA into a temporary VM (its files in a
temporary folder), replaces the OVA's NAT forwards by SSH (and HTTP when asked) on free
loopback ports, sends the serial console to a file, starts the VM headless and then checks it
exactly as the QEMU boot check does (``appliance.verify_boot``: login with the key or the first-boot
password, readiness command, HTTP). The VM is powered off, unregistered and deleted at the end,
whatever happened.

The first-boot proof works as under QEMU: VirtualBox's firmware carries this boot's nonce in
its SMBIOS OEM strings (type 11), because the verify VM's ``DmiOEMVBoxRev`` (by default
``vboxRev_<revision>``) is set to ``csghub-appliance-boot-nonce=<nonce>``; the guest reads it from
``/sys/firmware/dmi/entries/11-*`` exactly as it reads QEMU's ``-smbios type=11``. (Read in
VirtualBox's DevFwCommon.cpp: the OEM strings table takes that config value whole; the DMI table
has room for it, 768 bytes.) No VirtualBox can boot here, so the setting is checked against the
real VBoxManage but the guest side only under QEMU.

VirtualBox's NAT has no "no route out" switch (QEMU's ``restrict=on``): this check proves the
copy boots and serves in VirtualBox; the offline proof is the QEMU boot check's.

A host where VirtualBox cannot start VMs (no kernel driver, as on the build hosts here) gets a
clear ``PrerequisiteMissing`` from ``startvm`` within ``start_timeout``, never a hang.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from appliance.errors import CommandFailed, ExportError, GuestStopped, PrerequisiteMissing, VerifyError
from appliance.log import human_size, log
from appliance.providers.virtualbox.export import nat_rules, unregister_and_delete, vboxmanage, vm_info
from appliance.run import run
from appliance.verify_boot import (
    NONCE_OEM_KEY,
    BootLogin,
    BootReport,
    check_booted_copy,
    console_tail,
    free_loopback_port,
    new_boot_nonce,
)

START_TIMEOUT = 180.0


def virtualbox_boot_check(
    ova: Path,
    *,
    login: BootLogin,
    http_port: int | None = None,
    http_host: str | None = None,
    http_if_stack: bool = False,
    ready_command: str = "systemctl is-system-running --wait || true",
    cpus: int = 2,
    memory_mb: int = 2048,
    timeout: float = 900,
    work_dir: Path | None = None,
    start_timeout: float = START_TIMEOUT,
    nonce: str | None = None,
    import_bytes: int | None = None,
) -> BootReport:
    """Import ``ova`` into a temporary VirtualBox VM, boot it headless, log in, check; always delete it.

    ``import_bytes``: what the imported disk takes (:func:`import_size`); the work folder must have
    that much room, checked before VirtualBox starts writing.
    """
    nonce = nonce or new_boot_nonce()
    vbm = vboxmanage()
    vm = f"csghub-verify-{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="vbox-boot-", dir=work_dir) as tmp:
        work = Path(tmp)
        console = work / "console.log"
        if import_bytes is not None:
            free = shutil.disk_usage(work).free
            if import_bytes + FREE_SPACE_MARGIN > free:
                raise VerifyError(f"VirtualBox's import of {ova.name} needs about {human_size(import_bytes)} in "
                                  f"{work}, which has {human_size(free)} free",
                                  ["point TMPDIR at a folder with room, or skip the boot with --no-boot"])
        try:
            imported = run([vbm, "import", str(ova.resolve()), "--vsys", "0", "--vmname", vm,
                            "--basefolder", str(work), "--cpus", str(cpus), "--memory", str(memory_mb),
                            "--eula", "accept"], timeout=1800, hint="can VirtualBox read the OVA?")
            # VBoxManage exits 0 even when it refuses an import: its own words decide.
            if "Successfully imported" not in imported.stdout:
                raise VerifyError(f"VirtualBox did not import {ova.name}",
                                  [(imported.stdout + imported.stderr).strip()[-800:]])
            ssh_port, http_host_port = prepare_verify_vm(vm, console, nonce, http_port=http_port)
            started = time.monotonic()
            with log.step(f"start {vm} headless in VirtualBox"):
                result = run([vbm, "startvm", vm, "--type", "headless"], check=False, timeout=start_timeout)
            if not result.ok:
                reason = next((ln.removeprefix("VBoxManage: error: ").strip()
                               for ln in result.stderr.splitlines() if "error:" in ln), "") or \
                    (" ".join(result.tail("stderr", 3)) or f"exit status {result.returncode}")
                raise PrerequisiteMissing(
                    f"VirtualBox could not start the verify VM: {reason}",
                    hint="VirtualBox must be able to run VMs here (kernel driver loaded: `VBoxManage list hostinfo`, "
                         "`sudo /sbin/vboxconfig`); or verify on a libvirt/QEMU host (`--provider libvirt`), "
                         "or skip the boot with --no-boot",
                )
            return check_booted_copy(ssh_port, http_host_port, console, login=login, ready_command=ready_command,
                                     started=started, deadline=started + timeout, nonce=nonce, http_host=http_host,
                                     http_if_stack=http_if_stack, watch=lambda: stopped_guest(vm, console))
        finally:
            # Waits until VirtualBox has released the VM's session (a VM that just powered off is
            # still locked for a moment), and says so when the VM is left registered.
            try:
                unregister_and_delete(vm)
            except ExportError as exc:
                log.error(f"{exc}" + (f"\n  hint: {exc.hint}" if exc.hint else ""))



FREE_SPACE_MARGIN = 512 << 20  # the VM's settings, logs and the console file


def import_size(vmdk: Path) -> int:
    """Bytes the disk takes once VirtualBox imports it (expanded, still sparse): the data it holds,
    as ``qemu-img measure`` counts it."""
    measured = run(["qemu-img", "measure", "--output=json", "-O", "qcow2", str(vmdk)], timeout=300)
    try:
        return int(json.loads(measured.stdout)["required"])
    except (ValueError, KeyError, TypeError):
        raise VerifyError(f"qemu-img measure printed no size for {vmdk.name}",
                          [measured.stdout.strip()[-300:]]) from None


# VBoxManage's short state names of a VM that is (still) coming up or running.
RUNNING_STATES = ("starting", "running")


def stopped_guest(vm: str, console: Path) -> GuestStopped | None:
    """The boot check's watch (``verify_boot.GuestWatch``): ``GuestStopped`` with VirtualBox's reason and
    the console's tail once ``vm`` no longer runs (an abort fails the check at once), else None."""
    reason = why_stopped(vm)
    if reason is None:
        return None
    tail = console_tail(console)
    return GuestStopped(f"the copy stopped while it was being checked: {reason}\nconsole tail:\n{tail}",
                        reason=reason, accelerator="virtualbox")


def why_stopped(vm: str) -> str | None:
    """Why ``vm`` no longer runs (its VMState, e.g. ``aborted`` after a crash), or None while it runs."""
    try:
        state = vm_info(vm).get("VMState", "unknown")
    except CommandFailed as exc:
        return f"VirtualBox no longer shows the VM: {str(exc).splitlines()[0]}"
    if state in RUNNING_STATES:
        return None
    crashed = " (the VM process crashed or was killed)" if state == "aborted" else ""
    return f"VirtualBox reports it {state!r}{crashed}"


def nonce_extradata_key(info: dict[str, str]) -> str:
    """The CFGM key of the OEM string that carries the nonce, for the VM's firmware (BIOS or EFI)."""
    device = "efi" if info.get("firmware", "BIOS").upper().startswith("EFI") else "pcbios"
    return f"VBoxInternal/Devices/{device}/0/Config/DmiOEMVBoxRev"


def prepare_verify_vm(vm: str, console: Path, nonce: str, *, http_port: int | None = None) -> tuple[int, int | None]:
    """Ready an imported VM for the boot check: only our loopback forwards (SSH, and HTTP when
    asked), the serial console into ``console``, and this boot's nonce in its SMBIOS OEM strings.
    Returns the host ports (SSH, HTTP or None)."""
    vbm = vboxmanage()
    info = vm_info(vm)
    for rule in nat_rules(info):
        run([vbm, "modifyvm", vm, "--natpf1", "delete", rule.name])
    ssh_port = free_loopback_port()
    run([vbm, "modifyvm", vm, "--natpf1", f"verify-ssh,tcp,127.0.0.1,{ssh_port},,22"])
    http_host_port = None
    if http_port is not None:
        http_host_port = free_loopback_port()
        run([vbm, "modifyvm", vm, "--natpf1", f"verify-http,tcp,127.0.0.1,{http_host_port},,{http_port}"])
    run([vbm, "modifyvm", vm, "--uart1", "0x3F8", "4", "--uartmode1", "file", str(console)])
    # "string:" keeps VirtualBox from reading the value as a number.
    run([vbm, "setextradata", vm, nonce_extradata_key(info), f"string:{NONCE_OEM_KEY}={nonce}"])
    return ssh_port, http_host_port
