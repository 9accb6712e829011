"""The boot check on a VirtualBox host: the copy VirtualBox itself would run, started headless.

``virtualbox_boot_check(ova, ...)`` imports the OVA into a temporary VM (its files in a
temporary folder), replaces the OVA's NAT forwards by SSH (and HTTP when asked) on free
loopback ports, sends the serial console to a file, starts the VM headless and then checks it
exactly as the QEMU boot check does (``appliance.verify_boot``: login with the key or the first-boot
password, readiness command, HTTP). The VM is powered off, unregistered and deleted at the end,
whatever happened.

VirtualBox's NAT has no "no route out" switch (QEMU's ``restrict=on``): this check proves the
copy boots and serves in VirtualBox; the offline proof is the QEMU boot check's.

A host where VirtualBox cannot start VMs (no kernel driver, as on the build hosts here) gets a
clear ``PrerequisiteMissing`` from ``startvm`` within ``start_timeout``, never a hang.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import PrerequisiteMissing, VerifyError
from appliance.export.virtualbox import nat_rules, vboxmanage, vm_info
from appliance.log import log
from appliance.run import run

if TYPE_CHECKING:  # pragma: no cover
    from appliance.verify_boot import BootLogin, BootReport

START_TIMEOUT = 180.0


def virtualbox_boot_check(
    ova: Path,
    *,
    login: BootLogin,
    http_port: int | None = None,
    http_host: str | None = None,
    ready_command: str = "systemctl is-system-running --wait || true",
    cpus: int = 2,
    memory_mb: int = 2048,
    timeout: float = 900,
    work_dir: Path | None = None,
    start_timeout: float = START_TIMEOUT,
) -> BootReport:
    """Import ``ova`` into a temporary VirtualBox VM, boot it headless, log in, check; always delete it."""
    from appliance.verify_boot import BootReport, ConsoleLogin, _console_login_check, _console_tail, _key_login_check
    from appliance.verify_boot import free_loopback_port as _free_loopback_port
    from appliance.verify_boot import wait_http as _wait_http

    vbm = vboxmanage()
    vm = f"csghub-verify-{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="vbox-boot-", dir=work_dir) as tmp:
        work = Path(tmp)
        console = work / "console.log"
        imported = run([vbm, "import", str(ova.resolve()), "--vsys", "0", "--vmname", vm,
                        "--basefolder", str(work), "--cpus", str(cpus), "--memory", str(memory_mb),
                        "--eula", "accept"], timeout=1800, hint="can VirtualBox read the OVA?")
        # VBoxManage exits 0 even when it refuses an import: its own words decide.
        if "Successfully imported" not in imported.stdout:
            raise VerifyError(f"VirtualBox did not import {ova.name}",
                              [(imported.stdout + imported.stderr).strip()[-800:]])
        try:
            for rule in nat_rules(vm_info(vm)):
                run([vbm, "modifyvm", vm, "--natpf1", "delete", rule.name])
            ssh_port = _free_loopback_port()
            run([vbm, "modifyvm", vm, "--natpf1", f"verify-ssh,tcp,127.0.0.1,{ssh_port},,22"])
            http_host_port = None
            if http_port is not None:
                http_host_port = _free_loopback_port()
                run([vbm, "modifyvm", vm, "--natpf1", f"verify-http,tcp,127.0.0.1,{http_host_port},,{http_port}"])
            run([vbm, "modifyvm", vm, "--uart1", "0x3F8", "4", "--uartmode1", "file", str(console)])
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
            deadline = started + timeout
            if isinstance(login, ConsoleLogin):
                seconds, ready_rc, ready_out = _console_login_check(ssh_port, console, ready_command, deadline,
                                                                    started)
            else:
                seconds, ready_rc, ready_out = _key_login_check(ssh_port, login, console, ready_command, deadline,
                                                                started)
            if ready_rc != 0:
                raise VerifyError("logged in, but the readiness command failed",
                                  [f"{ready_command!r} exited {ready_rc}: {ready_out.strip()[-500:]}",
                                   "console tail:\n" + _console_tail(console)])
            report = BootReport(seconds_to_ssh=seconds, ready_output=ready_out.strip())
            if http_host_port is not None:
                report.http_status = _wait_http(f"http://127.0.0.1:{http_host_port}/", deadline, http_host)
            return report
        finally:
            run([vbm, "controlvm", vm, "poweroff"], check=False, timeout=120)
            run([vbm, "unregistervm", vm, "--delete"], check=False, timeout=300)

