"""The boot check: a fresh copy of a verified disk boots, proves it is its first boot, and answers.

``boot_check(disk, login=...)`` boots the disk (the OVA's VMDK, or a published qcow2 or VHDX:
``disk_format``) under QEMU (TCG) through a qcow2 overlay (the disk is only read), on the
hardware its target hypervisor gives it (``hardware``: see ``BOOT_HARDWARE``), with the serial
console captured to a file, and logs in over a loopback SSH forward:

- a sealed image (``ConsoleLogin``) is entered the way its owner would: with the one-time
  password its first boot prints on the serial console. The verifier hands the guest a fresh
  random **boot nonce** (SMBIOS OEM string ``csghub-appliance-boot-nonce=...``); the first-boot
  service records the nonce of the boot that started it and the banner prints it on the
  ``CSGHUB-APPLIANCE-LOGIN`` line (``firstboot=<nonce>``). A login line without this boot's
  nonce means the image's first boot already ran somewhere else (for example inside the build
  VM, whose keys and secrets every copy would then share): the image is refused.
- an unsealed image (``SSHLogin``) is entered with a key (tests, developer images).

HTTP is checked on a second forward when asked; in ``http_if_stack`` mode only when the image's
own ``CSGHUB-APPLIANCE-STATUS`` line says the stack is installed. Transient SSH errors while the
guest boots are retried quietly (one line, no paramiko traceback).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from appliance.errors import GuestStopped, PrerequisiteMissing, UsageError, VerifyError
from appliance.log import log
from appliance.providers.libvirt.hostprobe import detect_libvirt_driver, qemu_failure_lines, record_kvm_failure
from appliance.run import run, start_background, stop_processes, which

# The SMBIOS OEM string (type 11) that carries the boot nonce; read in the guest from
# /sys/firmware/dmi/entries/11-*/raw by csghub-firstboot.
NONCE_OEM_KEY = "csghub-appliance-boot-nonce"
# Paramiko logs a full traceback for a guest whose sshd is not up yet ("Error reading SSH
# protocol banner"); its transports log to this silenced channel instead.
_QUIET_SSH_LOG = "appliance.verify.paramiko"
# The copy's serial console is written by the image's own code: a flood must not fill the work
# folder or the verifier's memory. A real boot writes well under 1 MiB there.
MAX_CONSOLE_BYTES = 32 << 20
CONSOLE_TAIL_BYTES = 64 << 10
# The formats a boot check reads (the overlay's ``-F``): the OVA's disk and the published disks.
BOOT_DISK_FORMATS = ("vmdk", "qcow2", "vhdx")


@dataclass(frozen=True)
class BootHardware:
    """The disk controller and NIC a copy boots on, as QEMU devices: what its hypervisor gives it."""

    controller: tuple[str, ...]  # extra QEMU arguments that add the disk's controller
    disk_device: str  # the ``-device`` of the disk (its drive is ``disk0``)
    nic_device: str  # the ``-device`` model of the NIC
    why: str


BOOT_HARDWARE: dict[str, BootHardware] = {
    # The OVA: SATA (AHCI) and an Intel E1000, as its OVF describes (VirtualBox's hardware).
    "sata": BootHardware(("-device", "ahci,id=ahci"), "ide-hd,drive=disk0,bus=ahci.0", "e1000",
                         "SATA (AHCI) and an E1000, as the OVA describes"),
    # qcow2: what KVM gives a Linux guest by default (virt-install and OpenStack: virtio-blk;
    # Proxmox's Linux default is virtio-scsi, the same virtio drivers) and virtio-net.
    "virtio": BootHardware((), "virtio-blk-pci,drive=disk0", "virtio-net-pci",
                           "virtio disk and NIC, as KVM, Proxmox and OpenStack give them"),
    # VHDX: a Hyper-V Generation 1 VM boots from its IDE controller (PIIX, as QEMU's pc machine has);
    # its "Legacy Network Adapter" is a DEC 21140, QEMU's tulip. (Hyper-V's synthetic devices,
    # hv_storvsc and hv_netvsc, need VMBus, which QEMU does not offer: see docs/formats.md.)
    "ide": BootHardware((), "ide-hd,drive=disk0,bus=ide.0", "tulip",
                        "IDE disk and a DEC 21140 NIC, as a Hyper-V Generation 1 VM boots"),
}


@dataclass
class BootReport:
    """What the boot check saw."""

    seconds_to_ssh: float
    ready_output: str
    http_status: int | None = None
    first_boot_proved: bool = False
    stack: str | None = None  # the image's own status line: "installed", "absent", or None (no line)
    http_skipped: str = ""  # why HTTP was not checked, when it was not
    accelerator: str = ""  # what the copy ran under: kvm or tcg (QEMU boots; "" for VirtualBox)
    kvm_failure: str = ""  # why the copy was booted again under TCG, when KVM could not run it


@dataclass(frozen=True)
class SSHLogin:
    """Log in to a booted copy with a user and private key (an unsealed image: the base box's key)."""

    user: str
    key_file: Path


@dataclass(frozen=True)
class ConsoleLogin:
    """Log in as a sealed copy says on its serial console at first boot (docs/first-boot.md).

    The copy prints ``CSGHUB-APPLIANCE-LOGIN user=U password=P firstboot=NONCE`` and one
    ``CSGHUB-APPLIANCE-HOSTKEY TYPE SHA256:...`` line per host key. The verifier requires NONCE
    to be the one it gave this boot, and checks the host key it is offered against those lines
    before it sends the password.
    """


BootLogin = SSHLogin | ConsoleLogin
# Says whether the booted copy stopped running (``None``: it still runs); every wait checks it.
GuestWatch = Callable[[], GuestStopped | None]
_LOGIN_LINE = re.compile(r"^CSGHUB-APPLIANCE-LOGIN user=(\S+) password=(\S+)(?: firstboot=(\S+))?\s*$", re.M)
_HOSTKEY_LINE = re.compile(r"^CSGHUB-APPLIANCE-HOSTKEY (\S+) (SHA256:\S+)\s*$", re.M)
_STATUS_LINE = re.compile(r"^CSGHUB-APPLIANCE-STATUS stack=(\S+)", re.M)


def new_boot_nonce() -> str:
    """A fresh nonce for one boot: 128 random bits, hex (what csghub-firstboot accepts)."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class ConsoleCredentials:
    user: str
    password: str
    fingerprints: frozenset[str]
    first_boot_nonce: str | None  # the nonce of the boot that ran first boot, as the copy prints it


def console_credentials(text: str) -> ConsoleCredentials | None:
    """The last login line and every host-key fingerprint a copy printed, or None before first boot is done."""
    matches = list(_LOGIN_LINE.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    return ConsoleCredentials(last.group(1), last.group(2),
                              frozenset(m.group(2) for m in _HOSTKEY_LINE.finditer(text)), last.group(3))


def console_stack(text: str) -> str | None:
    """What the image's last ``CSGHUB-APPLIANCE-STATUS`` line says of the stack (None: no such line)."""
    matches = list(_STATUS_LINE.finditer(text))
    return matches[-1].group(1) if matches else None


def http_skip_reason(http_if_stack: bool, stack: str | None) -> str:
    """Why HTTP is not checked ("" when it is): only when the image itself says it has no stack."""
    if http_if_stack and stack is not None and stack != "installed":
        return f"the image's status line says stack={stack}"
    return ""


def host_key_fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` form (unpadded base64 of the key blob's SHA-256)."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def _quiet_paramiko() -> None:
    logger = logging.getLogger(_QUIET_SSH_LOG)
    logger.propagate = False
    logger.setLevel(logging.CRITICAL + 1)
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())


class _PasswordShell:
    """A password SSH session to a copy, opened only after its host key matched the console's."""

    def __init__(self, port: int, user: str, password: str, fingerprints: frozenset[str]) -> None:
        _quiet_paramiko()
        sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.transport = paramiko.Transport(sock)
        self.transport.set_log_channel(_QUIET_SSH_LOG)
        try:
            self.transport.start_client(timeout=30)
            offered = host_key_fingerprint(self.transport.get_remote_server_key())
            if offered not in fingerprints:
                raise VerifyError(
                    "the copy offered a host key its console did not announce; the password was not sent",
                    [f"offered {offered}", "announced " + (", ".join(sorted(fingerprints)) or "none")],
                )
            self.transport.auth_password(user, password)
        except BaseException:
            self.transport.close()
            raise

    def run(self, command: str, timeout: float) -> tuple[int, str]:
        chan = self.transport.open_session(timeout=30)
        chan.set_combine_stderr(True)
        chan.settimeout(timeout)
        chan.exec_command(command)
        out = b""
        while True:
            data = chan.recv(65536)
            if not data:
                break
            out += data
        return chan.recv_exit_status(), out.decode(errors="replace")

    def close(self) -> None:
        self.transport.close()


class _RetryNote:
    """Says once that the guest is not answering yet, then retries quietly."""

    def __init__(self) -> None:
        self.said = False

    def __call__(self, error: str) -> None:
        if not self.said:
            log.info(f"the copy is still booting ({error[:120]}); retrying quietly")
            self.said = True


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# QEMU's run states (qapi/run-state.json, QEMU 7.2) in which the guest still runs or is about to.
_RUNNING_STATES = {"running", "prelaunch", "inmigrate", "finish-migrate", "postmigrate", "restore-vm", "save-vm"}
class Qmp:
    """A minimal QMP client (docs/interop/qmp-spec.txt, QEMU 7.2): one connection per command.

    QEMU's QMP socket serves one client at a time; connecting per command leaves it free
    between our queries (for a person, or a test, who wants to ``stop`` the guest).
    """

    def __init__(self, path: Path, timeout: float = 5) -> None:
        self.path = path
        self.timeout = timeout

    def execute(self, command: str) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(str(self.path))
            reader = sock.makefile("rb")
            reader.readline()  # the greeting
            for name in ("qmp_capabilities", command):
                sock.sendall(json.dumps({"execute": name}).encode() + b"\n")
                while True:
                    line = reader.readline()
                    if not line:
                        raise OSError("QMP connection closed")
                    reply = dict(json.loads(line))
                    if "event" not in reply:  # events (STOP, RESUME...) may come before the answer
                        break
                if "error" in reply:
                    raise OSError(f"QMP {name}: {reply['error']}")
            return reply

    def status(self) -> str | None:
        """QEMU's run state (``running``, ``paused``, ``internal-error``...), or None when QMP does not answer."""
        try:
            return str(self.execute("query-status")["return"]["status"])
        except (OSError, ValueError, KeyError):
            return None


@dataclass
class QemuGuest:
    """A copy's QEMU, started by this tool: its process, QMP socket and log; ``check`` says if it stopped."""

    process: subprocess.Popen[bytes]
    qmp: Qmp
    log_file: Path
    accel: str
    console: Path
    started: float

    @property
    def pid(self) -> int:
        return self.process.pid

    def _why(self) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            text = ""
        return "; ".join(qemu_failure_lines(text)) or "QEMU's log says nothing more"

    def check(self) -> GuestStopped | None:
        """``GuestStopped`` naming the reason when the copy no longer runs (QEMU exited, paused, crashed)."""
        code = self.process.poll()
        if code is not None:
            what = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() \
                else f"exit status {code}"
            return self._stopped(f"QEMU (PID {self.pid}) exited ({what})")
        state = self.qmp.status()
        if state is not None and state not in _RUNNING_STATES:
            return self._stopped(f"QEMU reports the guest {state}")
        return None

    def _stopped(self, what: str) -> GuestStopped:
        after = time.monotonic() - self.started
        reason = self._why()
        return GuestStopped(
            f"the copy stopped running under {self.accel.upper()} after {after:.0f} s: {what}: {reason}",
            reason=reason, accelerator=self.accel,
            hint=("KVM does not run this guest here: set libvirt.driver=qemu (TCG), or `auto` to let the "
                  "tool fall back" if self.accel == "kvm" else f"see QEMU's log {self.log_file}"),
        )


def choose_accelerator(driver: str) -> tuple[str, str]:
    """``(kvm|tcg, why)`` for the verify boot from ``libvirt.driver``: ``kvm``, ``qemu`` or ``auto`` (the probe)."""
    if driver == "kvm":
        return "kvm", "libvirt.driver is kvm"
    if driver == "qemu":
        return "tcg", "libvirt.driver is qemu"
    probed, why = detect_libvirt_driver()
    return ("kvm" if probed == "kvm" else "tcg"), why


@contextmanager
def _qemu_vm(
    overlay: Path, forwards: dict[int, int], work: Path, cpus: int, memory_mb: int, nonce: str, accel: str,
    hardware: BootHardware = BOOT_HARDWARE["sata"], nic: str | None = None,
) -> Iterator[QemuGuest]:
    """Start QEMU (our child, stopped by its PID on every way out); yields the running guest.

    The user network is ``restrict=on``: the copy has no route out (its port forwards still
    work), so a pass proves it comes up offline.
    """
    qemu = which("qemu-system-x86_64")
    if qemu is None:
        raise PrerequisiteMissing("qemu-system-x86_64 is not installed",
                                  hint="apt-get install --no-install-recommends qemu-system-x86")
    cpu = "host" if accel == "kvm" else "max"
    console, qemu_log = work / "console.log", work / f"qemu-{accel}.log"
    # A unix socket's path must stay under 108 bytes: a short folder of its own, not the work folder.
    qmp_dir = Path(tempfile.mkdtemp(prefix="csghub-qmp-"))
    qmp_path = qmp_dir / "qmp.sock"
    console.unlink(missing_ok=True)  # a retry's console starts empty
    hostfwd = ",".join(f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in forwards.items())
    argv = [
        qemu, "-name", "verify-ova",
        "-machine", f"pc,accel={accel}", "-cpu", cpu, "-smp", str(cpus), "-m", str(memory_mb),
        "-display", "none", "-serial", f"file:{console}", "-monitor", "none",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
        # This boot's nonce, for the first-boot proof (read-only firmware data in the guest).
        "-smbios", f"type=11,value={NONCE_OEM_KEY}={nonce}",
        # The target hypervisor's disk controller and NIC (``nic``, when given: the NIC the OVA describes,
        # an Intel E1000 for VirtualBox, VMXNET3 for VMware): a guest that boots here has the drivers that
        # hardware needs.
        *hardware.controller,
        "-drive", f"if=none,id=disk0,file={overlay},format=qcow2",
        "-device", hardware.disk_device,
        "-netdev", f"user,id=net0,restrict=on,{hostfwd}", "-device", f"{nic or hardware.nic_device},netdev=net0",
    ]
    process = start_background(argv, qemu_log)
    guest = QemuGuest(process, Qmp(qmp_path), qemu_log, accel, console, time.monotonic())
    # For whoever watches this boot (tests): QEMU's PID and QMP socket.
    (work / "qemu.json").write_text(json.dumps({"pid": process.pid, "qmp": str(qmp_path)}) + "\n")
    try:
        yield guest
    finally:
        stop_processes([process.pid], 5)
        process.wait()
        shutil.rmtree(qmp_dir, ignore_errors=True)


def _check_console_size(console: Path) -> None:
    """Refuse a copy that floods its serial console (the boot stops when this raises)."""
    try:
        size = console.stat().st_size
    except OSError:
        return
    if size > MAX_CONSOLE_BYTES:
        raise VerifyError(f"the copy wrote more than {MAX_CONSOLE_BYTES >> 20} MiB to its serial console "
                          "(a normal boot writes well under 1 MiB); refused",
                          ["console tail:\n" + console_tail(console)])


def _read_console(console: Path) -> str:
    _check_console_size(console)
    try:
        return console.read_text(errors="replace")
    except OSError:
        return ""


def console_tail(console: Path, lines: int = 20) -> str:
    try:
        with console.open("rb") as f:  # only the end: the file may be a flood
            f.seek(max(0, console.stat().st_size - CONSOLE_TAIL_BYTES))
            text = f.read(CONSOLE_TAIL_BYTES).decode(errors="replace")
    except OSError:
        text = ""
    if not text:
        return "(no console output)"
    return "\n".join(f"    {ln}" for ln in text.splitlines()[-lines:])


def boot_check(
    disk: Path,
    *,
    login: BootLogin,
    http_port: int | None = None,
    http_host: str | None = None,
    http_path: str = "/",
    http_if_stack: bool = False,
    ready_command: str = "systemctl is-system-running --wait || true",
    cpus: int = 2,
    memory_mb: int = 2048,
    timeout: float = 900,
    work_dir: Path | None = None,
    nonce: str | None = None,
    overlay: Path | None = None,
    driver: str = "auto",
    disk_format: str = "vmdk",
    hardware: str = "sata",
    nic: str | None = None,
) -> BootReport:
    """Boot ``disk`` through a qcow2 overlay, wait for SSH, log in; check HTTP when ``http_port`` is set.

    ``http_port`` is the guest port (e.g. the CSGHub NodePort); it is forwarded from a free
    loopback port. ``http_host`` is the ``Host`` header to send: CSGHub's gateway routes by
    host name, so a request without the appliance's own name is answered 404. With
    ``http_if_stack`` the HTTP check is skipped when the image's status line says the stack is
    not installed. ``disk`` is only read; ``disk_format`` is its format as qemu-img names it (``vmdk``,
    ``qcow2``, ``vhdx``), never guessed from its bytes. ``hardware`` names its ``BOOT_HARDWARE``.
    ``nonce`` (default: a fresh one) is this boot's nonce.
    ``overlay``: boot this existing qcow2 overlay of ``disk`` instead of a fresh one (it keeps what
    the boot wrote: tests use it to boot one copy twice).

    ``driver`` is ``libvirt.driver``: ``kvm``, ``qemu`` (TCG) or ``auto`` (the host probe decides).
    ``nic`` is the QEMU NIC device (the format record's ``NicChoice.qemu_device``: ``e1000``, ``vmxnet3``);
    without it, the ``hardware``'s own NIC.
    A copy that stops running (QEMU exited, the guest paused or crashed) fails the check at once
    with QEMU's reason (``GuestStopped``); under ``auto``, a copy that stopped under KVM is booted
    once more under TCG, and the probe's cached answer is corrected for the rest of this host boot.
    """
    if isinstance(login, SSHLogin) and not login.key_file.is_file():
        raise UsageError(f"SSH key {str(login.key_file)!r} does not exist")
    if driver not in ("auto", "kvm", "qemu"):
        raise UsageError(f"libvirt.driver {driver!r}: allowed values are auto, kvm and qemu")
    if disk_format not in BOOT_DISK_FORMATS:
        raise UsageError(f"boot check: disk format {disk_format!r}: allowed are {', '.join(BOOT_DISK_FORMATS)}")
    if hardware not in BOOT_HARDWARE:
        raise UsageError(f"boot check: hardware {hardware!r}: allowed are {', '.join(BOOT_HARDWARE)}")
    nonce = nonce or new_boot_nonce()
    accel, why = choose_accelerator(driver)
    kvm_failure = ""
    with tempfile.TemporaryDirectory(prefix="boot-check-", dir=work_dir) as tmp:
        work = Path(tmp)
        while True:
            log.info(f"boot check under {accel.upper()} ({why})")
            try:
                report = _boot_once(disk, disk_format, BOOT_HARDWARE[hardware], work, overlay, accel,
                                    login=login, http_port=http_port, http_host=http_host, http_path=http_path,
                                    http_if_stack=http_if_stack, ready_command=ready_command, cpus=cpus,
                                    memory_mb=memory_mb, timeout=timeout, nonce=nonce, nic=nic)
                report.accelerator, report.kvm_failure = accel, kvm_failure
                return report
            except GuestStopped as exc:
                if not (driver == "auto" and accel == "kvm"):
                    raise
                record_kvm_failure(exc.reason)
                log.warning(f"KVM could not run the copy ({exc.reason}); booting it again under TCG emulation "
                            "(slower), and TCG is used for every boot on this host until it restarts")
                accel, why, kvm_failure = "tcg", "the KVM boot stopped", exc.reason


def _boot_once(
    disk: Path, disk_format: str, hardware: BootHardware, work: Path, overlay: Path | None, accel: str, *,
    login: BootLogin, http_port: int | None,
    http_host: str | None, http_path: str, http_if_stack: bool, ready_command: str, cpus: int, memory_mb: int,
    timeout: float, nonce: str, nic: str | None = None,
) -> BootReport:
    if overlay is None:
        overlay = work / "overlay.qcow2"
        overlay.unlink(missing_ok=True)  # a retry boots a fresh copy too
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", disk_format, "-b", str(disk.resolve()), str(overlay)])
    ssh_port = free_loopback_port()
    forwards = {ssh_port: 22}
    http_host_port = None
    if http_port is not None:
        http_host_port = free_loopback_port()
        forwards[http_host_port] = http_port
    started = time.monotonic()
    deadline = started + timeout
    log.info(f"booting on {hardware.why}" + (f" (NIC: {nic})" if nic and nic != hardware.nic_device else ""))
    with _qemu_vm(overlay, forwards, work, cpus, memory_mb, nonce, accel, hardware, nic) as guest:
        return check_booted_copy(ssh_port, http_host_port, guest.console, login=login, ready_command=ready_command,
                                 started=started, deadline=deadline, nonce=nonce, http_host=http_host,
                                 http_path=http_path, http_if_stack=http_if_stack, watch=guest.check)


def _raise_if_stopped(watch: GuestWatch | None) -> None:
    if watch is not None:
        stopped = watch()
        if stopped is not None:
            raise stopped


def check_booted_copy(
    ssh_port: int,
    http_host_port: int | None,
    console: Path,
    *,
    login: BootLogin,
    ready_command: str,
    started: float,
    deadline: float,
    nonce: str,
    http_host: str | None,
    http_path: str = "/",
    http_if_stack: bool = False,
    watch: GuestWatch | None = None,
) -> BootReport:
    """The checks on a started copy, whatever booted it (QEMU here, VirtualBox in ``vboxboot``): log in
    (a sealed copy's console login must carry ``nonce``: the first-boot proof), run the readiness
    command, then HTTP unless the copy's status line says it was built without the stack. ``watch``
    (when given) says whether the copy stopped running; every wait checks it, so a dead copy fails at once."""
    proved = False
    if isinstance(login, ConsoleLogin):
        seconds, ready_rc, ready_out = _console_login_check(ssh_port, console, ready_command, deadline, started, nonce,
                                                            watch=watch)
        proved = True
    else:
        seconds, ready_rc, ready_out = _key_login_check(ssh_port, login, console, ready_command, deadline, started,
                                                        watch=watch)
    if ready_rc != 0:
        raise VerifyError("logged in, but the readiness command failed",
                          [f"{ready_command!r} exited {ready_rc}: {ready_out.strip()[-500:]}",
                           "console tail:\n" + console_tail(console)])
    stack = console_stack(_read_console(console))
    report = BootReport(seconds_to_ssh=seconds, ready_output=ready_out.strip(), first_boot_proved=proved, stack=stack)
    if http_host_port is not None:
        skip = http_skip_reason(http_if_stack, stack)
        if skip:
            report.http_skipped = skip
            log.info(f"HTTP check skipped: {skip} (built without CSGHub)")
        else:
            report.http_status = wait_http(f"http://127.0.0.1:{http_host_port}{http_path}", deadline, http_host,
                                           console=console, watch=watch)
    return report


def _key_login_check(
    ssh_port: int, login: SSHLogin, console: Path, ready_command: str, deadline: float, started: float,
    watch: GuestWatch | None = None,
) -> tuple[float, int, str]:
    """Wait until OpenSSH logs in with the key, then run the readiness command."""
    ssh_argv = [
        "ssh", "-i", str(login.key_file), "-p", str(ssh_port),
        "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", f"{login.user}@127.0.0.1",
    ]
    note = _RetryNote()
    last_error = ""
    while True:
        _raise_if_stopped(watch)
        probe = run([*ssh_argv, "true"], check=False, timeout=60, watchdog=watch)
        if probe.ok:
            break
        last_error = " ".join(probe.tail("stderr", 2))
        if time.monotonic() > deadline:
            raise VerifyError(
                f"the copy did not accept SSH within {deadline - started:.0f} s",
                [f"last ssh error: {last_error}", "console tail:\n" + console_tail(console)],
            )
        note(last_error or f"ssh exit {probe.returncode}")
        time.sleep(3)
    seconds = time.monotonic() - started
    log.info(f"SSH answered after {seconds:.0f} s")
    ready = run([*ssh_argv, ready_command], check=False, timeout=max(30.0, deadline - time.monotonic()),
                watchdog=watch)
    return seconds, ready.returncode, ready.stdout + ready.stderr


def _console_login_check(
    ssh_port: int, console: Path, ready_command: str, deadline: float, started: float, nonce: str | None = None,
    watch: GuestWatch | None = None,
) -> tuple[float, int, str]:
    """Wait for this boot's login line on the console, log in with that password, run the readiness command.

    With ``nonce`` (the QEMU boot), the line must carry it: the first-boot proof. Without (the
    VirtualBox boot, which passes none yet), any login line is taken.
    """
    last_error = "no CSGHUB-APPLIANCE-LOGIN line on the serial console yet"
    note = _RetryNote()
    while True:
        _raise_if_stopped(watch)
        creds = console_credentials(_read_console(console))
        if creds is not None and nonce is not None and creds.first_boot_nonce != nonce:
            seen = creds.first_boot_nonce or "none"
            raise VerifyError(
                "this image's first boot already ran before this boot: its secrets would be shared by every copy",
                [f"the login line carries first-boot nonce {seen!r}, not this boot's {nonce!r}",
                 "a sealed image must reach its first boot only when a copy starts; rebuild it "
                 "(the build VM was booted after the seal?)",
                 "console tail:\n" + console_tail(console)],
            )
        if creds is not None:
            try:
                shell = _PasswordShell(ssh_port, creds.user, creds.password, creds.fingerprints)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                last_error = f"SSH as {creds.user}: {exc or type(exc).__name__}"
                note(last_error)
            else:
                try:
                    seconds = time.monotonic() - started
                    proof = " (first boot proved by this boot's nonce)" if nonce else ""
                    log.info(f"logged in as {creds.user} with the copy's first-boot password after {seconds:.0f} s"
                             + proof)
                    rc, out = shell.run(ready_command, max(30.0, deadline - time.monotonic()))
                    return seconds, rc, out
                finally:
                    shell.close()
        if time.monotonic() > deadline:
            raise VerifyError(
                f"could not log in to the copy within {deadline - started:.0f} s",
                [f"last error: {last_error}", "console tail:\n" + console_tail(console)],
            )
        time.sleep(3)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx is the answer itself; the copy's server never sends the verifier elsewhere


# The copy is untrusted: its answer must not make this host fetch other URLs (a redirect to an
# internal service), and a loopback check never goes through the host's proxy settings.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


def wait_http(url: str, deadline: float, host: str | None = None, *, console: Path | None = None,
              watch: GuestWatch | None = None) -> int:
    """Poll ``url`` (with ``Host: host``) until it answers 2xx/3xx; a stack still starting answers 404/5xx.

    Redirects are not followed (a 3xx counts as an answer). ``console``: the copy's serial
    console, checked for a flood while waiting.
    """
    last = ""
    headers = {"Host": host} if host else {}
    while time.monotonic() < deadline:
        _raise_if_stopped(watch)
        if console is not None:
            _check_console_size(console)
        request = urllib.request.Request(url, headers=headers)  # a loopback URL built here
        try:
            with _HTTP.open(request, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                return exc.code
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(max(0.0, min(5.0, deadline - time.monotonic())))
    shown = f"{url} (Host: {host})" if host else url
    raise VerifyError(f"no successful HTTP answer from {shown} before the deadline", [f"last answer: {last}"])

