"""Facts about this host that decide how VMs run here (read-only probes, no side effects on VMs).

``detect_libvirt_driver()`` answers "does KVM really run a guest here?". ``/dev/kvm`` existing
is not enough: on some hosts (nested virtualisation without acceleration) it exists, but a
Debian guest hangs under ``-enable-kvm``. The probe boots a 512-byte payload under QEMU twice,
once with ``-accel kvm`` and once with ``-accel tcg``: the payload writes to QEMU's
``isa-debug-exit`` port, so QEMU exits with a known status as soon as the guest's first
instructions ran. KVM is chosen only when it ran the payload, within a bounded time, and
not slower than emulation. The answer is cached per boot (keyed by the kernel's boot id).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.log import log
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


def detect_libvirt_driver(*, refresh: bool = False, cache_dir: Path | None = None) -> tuple[str, str]:
    """``("kvm" | "qemu", reason)`` for libvirt driver ``auto``; cached for the current boot."""
    cache = (cache_dir or _probe_cache_dir()) / CACHE_NAME
    current_boot = boot_id()
    if not refresh and cache.exists():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("boot_id") == current_boot and saved.get("driver") in ("kvm", "qemu"):
                return str(saved["driver"]), str(saved["reason"]) + " (probed earlier this boot)"
        except (OSError, ValueError):
            pass
    if which("qemu-system-x86_64") is None:
        return "qemu", "qemu-system-x86_64 is not installed, so KVM cannot be tested"
    from appliance.libvirtd import kvm_access, qemu_user

    access = kvm_access(qemu_user())
    if not access.allowed and os.path.exists("/dev/kvm"):
        # libvirt starts QEMU as this user: that root could run the payload would prove nothing.
        return "qemu", f"libvirt runs QEMU as {access.user}, which cannot open /dev/kvm ({access.detail})"
    kvm_usable = os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)
    kvm = run_payload("kvm") if kvm_usable else None
    tcg = run_payload("tcg") if kvm is not None else None
    driver, reason = decide_driver(kvm, tcg)
    try:
        cache.write_text(json.dumps({"boot_id": current_boot, "driver": driver, "reason": reason}) + "\n")
    except OSError as exc:
        log.debug(f"cannot cache the KVM probe in {cache}: {exc}")
    return driver, reason


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
    record = {"boot_id": boot_id(), "driver": "qemu", "reason": f"a real guest stopped under KVM ({reason})"}
    try:
        cache.write_text(json.dumps(record) + "\n")
    except OSError as exc:
        log.debug(f"cannot record the KVM failure in {cache}: {exc}")


def resolve_libvirt_driver(configured: str) -> str:
    """The driver to render: the configured one, or for ``auto`` the probe's answer, loudly."""
    if configured != "auto":
        return configured
    driver, reason = detect_libvirt_driver()
    if driver == "qemu":
        log.warning(f"libvirt driver auto -> qemu (TCG emulation, much slower than KVM): {reason}")
    else:
        log.info(f"libvirt driver auto -> kvm: {reason}")
    return driver
