"""Facts about this host that decide how VMs run here (read-only probes, no side effects on VMs).

``detect_libvirt_driver()`` answers "does KVM really run a guest here?". ``/dev/kvm`` existing
is not enough: on some hosts (nested virtualisation without acceleration) it exists, but a
Debian guest hangs under ``-enable-kvm``; on another, root ran a tiny real-mode payload under KVM
while a real guest stopped at its first protected-mode ``iret`` (``KVM internal error``), and
libvirt's QEMU user could not open ``/dev/kvm`` at all. So, in order:

1. libvirt's QEMU user (``qemu.conf``, else ``libvirt-qemu``) must be able to open ``/dev/kvm``;
2. the faithful probe, when a base box is cached and libvirt answers: the box's own kernel and
   initramfs are booted through a transient libvirt domain of the same type, machine type and
   CPU mode the Vagrantfile gives, with ``rdinit=/usr/bin/poweroff``; KVM is chosen only when
   that guest reached userspace and powered itself off (its serial console says both);
3. otherwise the 512-byte payload under QEMU with ``-accel kvm`` and ``-accel tcg`` (it writes to
   QEMU's ``isa-debug-exit`` port, so QEMU exits with a known status): KVM only when it ran the
   payload promptly and not slower than emulation. This answer is replaced by the kernel probe's
   as soon as that can run.

The answer is cached per boot (keyed by the kernel's boot id). When a real boot stops under KVM
anyway, ``record_kvm_failure`` turns the cached answer into TCG for the rest of the boot.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.log import log
from appliance.providers.libvirt import libvirtd
from appliance.providers.libvirt.box import BoxKernel, box_kernel
from appliance.providers.libvirt.libvirtd import QEMU_LOG_DIR, has_stopped, parse_domstate
from appliance.run import run, which

# mov al, 0x31 ; out 0xf4, al ; hlt ; jmp $-1  -> QEMU exits with (0x31 << 1) | 1 = 99.
_PAYLOAD = bytes([0xB0, 0x31, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD]).ljust(510, b"\0") + b"\x55\xaa"
PAYLOAD_EXIT_STATUS = 99
PROBE_TIMEOUT = 15.0
# Hardware KVM starts and runs the payload in well under a second; anything this slow is emulated.
KVM_MAX_SECONDS = 3.0
CACHE_NAME = "libvirt-driver.json"
# Lines of a QEMU log that say why a guest stopped (QEMU 7.2: accel/kvm/kvm-all.c prints
# "KVM internal error. Suberror: %d"; every other error is prefixed with the program's name).
_QEMU_FAILURE = re.compile(r"qemu-system-\S+: .*|.*(?:error|failed|terminating on signal|could not).*", re.I)


@dataclass(frozen=True)
class ProbeRun:
    """One bounded QEMU run of the payload."""

    accel: str
    ran: bool
    seconds: float
    detail: str


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _probe_cache_dir() -> Path:
    for candidate in (Path("/run/csghub-appliance"), Path(os.environ.get("XDG_RUNTIME_DIR", "/nonexistent"))):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK):
            return candidate
    return Path(tempfile.gettempdir())


def run_payload(accel: str, *, timeout: float = PROBE_TIMEOUT, qemu: str = "qemu-system-x86_64") -> ProbeRun:
    """Boot the payload with ``-accel accel``; ``ran`` is true when QEMU exited with the payload's status."""
    with tempfile.TemporaryDirectory(prefix="csghub-kvm-probe-") as tmp:
        disk = Path(tmp) / "payload.img"
        disk.write_bytes(_PAYLOAD)
        started = time.monotonic()
        result = run(
            [
                qemu, "-accel", accel, "-display", "none", "-nodefaults", "-no-reboot", "-m", "16",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                "-drive", f"file={disk},format=raw,if=ide",
            ],
            check=False,
            timeout=timeout,
        )
        seconds = time.monotonic() - started
    if result.timed_out:
        return ProbeRun(accel, False, seconds, f"no result within {timeout:.0f} s (the guest hangs)")
    if result.returncode == PAYLOAD_EXIT_STATUS:
        return ProbeRun(accel, True, seconds, f"ran the test guest in {seconds:.1f} s")
    tail = " ".join(result.tail("stderr", 3)) or f"exit status {result.returncode}"
    return ProbeRun(accel, False, seconds, f"could not run the test guest: {tail}")


# -- the faithful probe: the base box's own kernel, booted by libvirt as the build VM will be ----------

# The box's initramfs (initramfs-tools with klibc) has /usr/bin/poweroff: run as PID 1 it powers the
# guest off at once. Reaching it proves the kernel ran in long mode with interrupts and reached userspace.
KERNEL_CMDLINE = "console=ttyS0 rdinit=/usr/bin/poweroff panic=-1"
USERSPACE_LINE = "Run /usr/bin/poweroff as init process"  # init/main.c: run_init_process
POWER_DOWN_LINE = "reboot: Power down"  # kernel/reboot.c: kernel_power_off
KERNEL_PROBE_TIMEOUT = 90.0  # TCG needs 10-20 s for this boot here; KVM well under 5 s
KERNEL_PROBE = "libvirt-kernel"


@dataclass(frozen=True)
class KernelBoot:
    """One boot of the box's kernel through a transient libvirt domain."""

    driver: str
    reached_userspace: bool
    seconds: float
    detail: str
    console: str = ""


def probe_domain_xml(name: str, driver: str, machine_type: str, vmlinuz: Path, initrd: Path, console: Path) -> str:
    """A transient domain as the Vagrantfile's would be for ``driver`` (type, machine, CPU mode), booting the
    kernel directly, its serial console in a file, gone when it powers off."""
    from xml.sax.saxutils import escape, quoteattr

    cpu = ("<cpu mode='host-passthrough'/>" if driver == "kvm"
           else "<cpu mode='custom'><model fallback='allow'>qemu64</model></cpu>")
    return f"""<domain type={quoteattr(driver)}>
  <name>{escape(name)}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine={quoteattr(machine_type)}>hvm</type>
    <kernel>{escape(str(vmlinuz))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(KERNEL_CMDLINE)}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  {cpu}
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>preserve</on_crash>
  <devices>
    <serial type='file'><source path={quoteattr(str(console))}/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def boot_box_kernel(driver: str, kernel: BoxKernel, *, uri: str = "qemu:///system", machine_type: str = "pc",
                    timeout: float = KERNEL_PROBE_TIMEOUT) -> KernelBoot:
    """Boot the box's kernel under libvirt with ``driver`` (``kvm``/``qemu``); did it reach userspace?

    libvirt starts QEMU as it will start the build VM: as its QEMU user, with the machine type
    and CPU mode the Vagrantfile gives. A domain that pauses or crashes (``KVM internal error``),
    or a QEMU that libvirt cannot start, is a failed boot with libvirt's reason.
    """
    import shutil

    name = f"csghub-kvm-probe-{os.getpid()}-{driver}"
    # Readable by libvirt's QEMU user (the cache lives under the user's home, which it cannot enter).
    with tempfile.TemporaryDirectory(prefix="csghub-kvm-probe-", dir="/var/tmp") as tmp:
        folder = Path(tmp)
        folder.chmod(0o755)
        vmlinuz, initrd, console = folder / "vmlinuz", folder / "initrd.img", folder / "console.log"
        shutil.copyfile(kernel.vmlinuz, vmlinuz)
        shutil.copyfile(kernel.initrd, initrd)
        xml = folder / "domain.xml"
        xml.write_text(probe_domain_xml(name, driver, machine_type, vmlinuz, initrd, console))
        started = time.monotonic()
        # libvirt itself may take a minute to start a domain on a loaded host (measured: 35-70 s here).
        created = run(["virsh", "-c", uri, "create", str(xml)], check=False, timeout=180)
        if not created.ok:
            why = "; ".join(qemu_failure_lines(created.stderr)) or " ".join(created.tail("stderr", 2)) or \
                ("no answer within 180 s" if created.timed_out else f"virsh exit status {created.returncode}")
            return KernelBoot(driver, False, time.monotonic() - started, f"libvirt could not start it: {why}")
        try:
            detail = _wait_for_power_off(uri, name, timeout)
        finally:
            run(["virsh", "-c", uri, "destroy", name], check=False, timeout=30)
        seconds = time.monotonic() - started
        text = console.read_text(errors="replace") if console.exists() else ""
    reached = USERSPACE_LINE in text and POWER_DOWN_LINE in text and not detail
    if reached:
        return KernelBoot(driver, True, seconds, f"booted the base box's kernel to userspace in {seconds:.1f} s", text)
    if not detail:
        detail = "it powered off without reaching userspace"
    return KernelBoot(driver, False, seconds, detail, text)


def _wait_for_power_off(uri: str, name: str, timeout: float) -> str:
    """"" once the transient domain is gone (it powered off), else why it is not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = run(["virsh", "-c", uri, "domstate", "--reason", name], check=False, timeout=30)
        if not state.ok:
            return ""  # gone: a transient domain disappears when it powers off
        status, reason = parse_domstate(state.stdout)
        if has_stopped(status, reason):
            why = "; ".join(domain_failure_lines(name) or [])
            return f"the guest stopped: {status} ({reason})" + (f": {why}" if why else "")
        time.sleep(0.5)
    return f"it did not power off within {timeout:.0f} s (the guest hangs)"


def decide_driver(kvm: ProbeRun | None, tcg: ProbeRun | None) -> tuple[str, str]:
    """Pick the libvirt driver from the two probe runs; the reason says why, with figures."""
    if kvm is None:
        return "qemu", "/dev/kvm is missing or not accessible"
    if not kvm.ran:
        return "qemu", f"KVM {kvm.detail}"
    if kvm.seconds > KVM_MAX_SECONDS and (tcg is None or not tcg.ran or kvm.seconds > tcg.seconds):
        tcg_part = f" against {tcg.seconds:.1f} s with emulation" if tcg is not None and tcg.ran else ""
        return "qemu", (
            f"KVM needed {kvm.seconds:.1f} s for a 512-byte test guest{tcg_part}: "
            "it is not hardware-accelerated here (real guests hang under it)"
        )
    return "kvm", f"KVM {kvm.detail}"


def detect_libvirt_driver(*, refresh: bool = False, cache_dir: Path | None = None, uri: str = "qemu:///system",
                          machine_type: str = "pc") -> tuple[str, str]:
    """``("kvm" | "qemu", reason)`` for libvirt driver ``auto``; cached for the current boot.

    Most faithful first: when a base box is cached and libvirt answers, the box's own kernel is
    booted through libvirt under KVM (its QEMU user, ``machine_type``, the CPU mode the
    Vagrantfile gives) and KVM is chosen only if it reached userspace. Otherwise the 512-byte
    payload is run (and the answer is probed again once the kernel probe can run).
    """
    cache = (cache_dir or _probe_cache_dir()) / CACHE_NAME
    current_boot = boot_id()
    kernel = _kernel_probe_inputs(uri)
    if not refresh and cache.exists():
        try:
            saved = json.loads(cache.read_text())
            weaker = saved.get("probe") == "payload" and kernel is not None  # upgrade to the kernel probe
            if saved.get("boot_id") == current_boot and saved.get("driver") in ("kvm", "qemu") and not weaker:
                return str(saved["driver"]), str(saved["reason"]) + " (probed earlier this boot)"
        except (OSError, ValueError):
            pass
    if which("qemu-system-x86_64") is None:
        return "qemu", "qemu-system-x86_64 is not installed, so KVM cannot be tested"
    access = libvirtd.kvm_access(libvirtd.qemu_user())
    if not access.allowed and os.path.exists("/dev/kvm"):
        # libvirt starts QEMU as this user: that root could run the payload would prove nothing.
        return "qemu", f"libvirt runs QEMU as {access.user}, which cannot open /dev/kvm ({access.detail})"
    kvm_usable = os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)
    if kernel is not None and kvm_usable:
        boot = boot_box_kernel("kvm", kernel, uri=uri, machine_type=machine_type)
        driver = "kvm" if boot.reached_userspace else "qemu"
        reason = f"KVM {boot.detail}" if boot.reached_userspace else f"under KVM the base box's kernel failed: " \
            f"{boot.detail}"
        probe = KERNEL_PROBE
    else:
        kvm = run_payload("kvm") if kvm_usable else None
        tcg = run_payload("tcg") if kvm is not None else None
        driver, reason = decide_driver(kvm, tcg)
        probe = "payload"
    try:
        cache.write_text(json.dumps({"boot_id": current_boot, "driver": driver, "reason": reason,
                                     "probe": probe}) + "\n")
    except OSError as exc:
        log.debug(f"cannot cache the KVM probe in {cache}: {exc}")
    return driver, reason


def _kernel_probe_inputs(uri: str) -> BoxKernel | None:
    """The box kernel, when the kernel probe can run here: a cached box, virsh, libvirt answering at ``uri``."""
    if which("virsh") is None:
        return None
    try:
        kernel = box_kernel()
    except (OSError, ApplianceError) as exc:
        log.debug(f"no base box kernel for the KVM probe: {exc}")
        return None
    if kernel is None or not run(["virsh", "-c", uri, "uri"], check=False, timeout=30).ok:
        return None
    return kernel


def domain_failure_lines(domain: str, log_dir: Path = QEMU_LOG_DIR) -> list[str] | None:
    """QEMU's failure lines in libvirt's log of ``domain``'s latest start (``<log_dir>/<domain>.log``;
    libvirt marks each start with ``: starting up``); None when there is no log to read."""
    try:
        text = (log_dir / f"{domain}.log").read_text(errors="replace")
    except OSError:
        return None
    return qemu_failure_lines(text.rsplit(": starting up ", 1)[-1])


def qemu_failure_lines(text: str, limit: int = 3) -> list[str]:
    """The lines of a QEMU log that say why the guest stopped (KVM internal error first)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    kvm = [ln for ln in lines if ln.startswith("KVM internal error")]
    if kvm:
        return kvm[-1:]
    return [ln for ln in lines if _QEMU_FAILURE.fullmatch(ln)][-limit:]


def record_kvm_failure(reason: str, *, cache_dir: Path | None = None) -> None:
    """A real guest stopped under KVM although the probe chose it: remember TCG for the rest of this boot.

    The probe's payload ran, but a full guest did not (``KVM internal error`` at its first
    protected-mode ``iret`` is one way): the next ``auto`` decision, by any task, is TCG.
    """
    cache = (cache_dir or _probe_cache_dir()) / CACHE_NAME
    record = {"boot_id": boot_id(), "driver": "qemu", "reason": f"a real guest stopped under KVM ({reason})",
              "probe": "guest-failure"}
    try:
        cache.write_text(json.dumps(record) + "\n")
    except OSError as exc:
        log.debug(f"cannot record the KVM failure in {cache}: {exc}")


def resolve_libvirt_driver(configured: str, *, uri: str = "qemu:///system", machine_type: str = "pc") -> str:
    """The driver to render: the configured one, or for ``auto`` the probe's answer, loudly."""
    if configured != "auto":
        return configured
    driver, reason = detect_libvirt_driver(uri=uri, machine_type=machine_type)
    if driver == "qemu":
        log.warning(f"libvirt driver auto -> qemu (TCG emulation, much slower than KVM): {reason}")
    else:
        log.info(f"libvirt driver auto -> kvm: {reason}")
    return driver
