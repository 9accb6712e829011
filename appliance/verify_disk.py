"""Verify a published disk (qcow2, VHDX): read back by qemu-img, then a fresh copy's first boot.

``verify_disk(path, fmt, reference=ova)`` checks, each failure one line of the ``VerifyError`` it
raises:

- ``qemu-img info`` (the format given, never probed from the bytes): the file is that format,
  names no backing file and no external data file (either would make a reader open another file
  of the host), and its virtual size is the OVA disk's;
- ``qemu-img check``: the format's own consistency check (qcow2's refcounts and L1/L2 tables,
  VHDX's headers, log and BAT);
- ``qemu-img compare`` against the disk inside the verified OVA (read in place,
  ``appliance.export.disks.ova_disk_spec``): every guest-visible byte is the same;

then, with ``boot=True``, ``appliance.verify_boot.boot_check`` boots it on its hypervisor's
hardware (``DiskFormat.boot_hardware``) and proves the copy's first boot, as for the OVA.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.digest import sha256_file
from appliance.errors import VerifyError
from appliance.export.disks import disk_member, disk_profile, ova_disk_spec
from appliance.formats import FORMATS, OutputFormat
from appliance.log import log
from appliance.run import run
from appliance.verify_boot import BootLogin, BootReport, boot_check

if TYPE_CHECKING:  # pragma: no cover
    from appliance.config import ApplianceConfig


@dataclass
class DiskVerifyReport:
    """What was checked on one published disk, in order."""

    path: Path
    format: str
    checks: list[tuple[str, str]] = field(default_factory=list)
    boot: BootReport | None = None

    def as_dict(self) -> dict[str, object]:
        boot = None
        if self.boot is not None:
            boot = {"seconds_to_ssh": round(self.boot.seconds_to_ssh, 1), "ready": self.boot.ready_output,
                    "first_boot_proved": self.boot.first_boot_proved, "accelerator": self.boot.accelerator or None}
        return {"format": self.format, "checks": dict(self.checks), "boot": boot}


def check_disk(path: Path, fmt: OutputFormat, reference: Path) -> list[tuple[str, str]]:
    """qemu-img's reading of ``path`` as ``fmt``, compared with the disk inside the OVA ``reference``."""
    qemu_format = disk_profile(fmt).qemu_format
    findings: list[str] = []
    checks: list[tuple[str, str]] = []
    info_run = run(["qemu-img", "info", "--output=json", "-f", qemu_format, str(path)], check=False)
    if not info_run.ok:
        raise VerifyError(f"{path} is not a readable {fmt.name} disk",
                          [" ".join(info_run.tail("stderr", 3)) or f"qemu-img info exited {info_run.returncode}"])
    info = json.loads(info_run.stdout)
    if info.get("format") != qemu_format:
        findings.append(f"qemu-img reads it as {info.get('format')!r}, not {qemu_format!r}")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        findings.append(f"it names a backing file ({info.get('backing-filename')!r}); a published disk stands alone")
    data_file = (info.get("format-specific") or {}).get("data", {}).get("data-file")
    if data_file:
        findings.append(f"its data lives in another file ({data_file!r}); a published disk stands alone")
    source = ova_disk_spec(disk_member(reference))
    expected = json.loads(run(["qemu-img", "info", "--output=json", source]).stdout)["virtual-size"]
    if info.get("virtual-size") != expected:
        findings.append(f"virtual size {info.get('virtual-size')} bytes, the OVA's disk has {expected}")
    if findings:
        raise VerifyError(f"{path} failed verification", findings)
    checks.append(("qemu-img info", f"{qemu_format}, standalone, {expected} bytes virtual"))
    # qemu-img check: 0 = clean; 2 = corruptions, 3 = leaked clusters, 1/63 = could not check.
    checked = run(["qemu-img", "check", "-f", qemu_format, str(path)], check=False)
    if not checked.ok:
        raise VerifyError(f"{path} failed verification",
                          [f"qemu-img check exited {checked.returncode}: "
                           + " ".join(checked.tail("stdout", 3) + checked.tail("stderr", 3))])
    checks.append(("qemu-img check", "no errors"))
    # qemu-img compare: 0 = identical, 1 = different, 2 = could not compare.
    compared = run(["qemu-img", "compare", "-F", qemu_format, source, str(path)], check=False)
    if not compared.ok:
        raise VerifyError(f"{path} failed verification",
                          [f"qemu-img compare with the disk in {reference.name} exited {compared.returncode}: "
                           + " ".join(compared.tail("stdout", 2) + compared.tail("stderr", 2))])
    checks.append(("qemu-img compare", f"identical to the disk in {reference.name}"))
    return checks


def verify_disk(
    path: Path,
    fmt: OutputFormat,
    *,
    reference: Path,
    boot: bool = True,
    login: BootLogin | None = None,
    boot_timeout: float = 900,
    cpus: int = 2,
    memory_mb: int = 2048,
    driver: str = "auto",
    work_dir: Path | None = None,
    ready_command: str = "systemctl is-system-running --wait || true",
) -> DiskVerifyReport:
    """Check ``path`` against the OVA ``reference``, then (``boot``) boot a fresh copy to its first-boot proof."""
    report = DiskVerifyReport(path=path, format=fmt.name)
    with log.step(f"check {path.name} with qemu-img"):
        report.checks = check_disk(path, fmt, reference)
    log.success(f"{path.name}: qemu-img reads it whole, identical to the OVA's disk")
    if boot:
        if login is None:
            raise VerifyError(f"{path}: the boot check needs a login")
        with log.step(f"boot a fresh copy of {path.name} (the hardware of {', '.join(fmt.hypervisors)})"):
            disk = disk_profile(fmt)
            report.boot = boot_check(path, login=login, disk_format=disk.qemu_format, hardware=disk.boot_hardware,
                                     timeout=boot_timeout, cpus=cpus, memory_mb=memory_mb, driver=driver,
                                     work_dir=work_dir, ready_command=ready_command)
        report.checks.append(("first boot", "proved by this boot's nonce" if report.boot.first_boot_proved
                              else "not checked: an unsealed image entered with a key"))
        report.checks.append(("boot", "checked"))
    return report


def verify_staged_disk(
    cfg: ApplianceConfig, ova: Path, staged: dict[str, str], *, boot: bool = True
) -> dict[str, object]:
    """The verify stage's part for one staged disk format (``BuildState.staged_formats`` entry): checked
    against ``ova``'s disk and (``boot``) booted, as the configuration says (login, CPUs, memory, driver).

    Returns what verify saw, with the digests of the disk and its sidecar as they are now: the build
    state's receipt covers this report, and publish copies only these bytes.
    """
    from appliance.verify import boot_access

    login = boot_access(cfg, http=False)[0] if boot else None
    fmt = FORMATS[staged["format"]]
    path = Path(staged["path"])
    report = verify_disk(path, fmt, reference=ova, boot=boot, login=login, boot_timeout=cfg.vm.verify_timeout,
                         cpus=min(cfg.vm.cpus, os.cpu_count() or 1), memory_mb=cfg.vm.memory_mb,
                         driver=cfg.libvirt.driver)
    sidecar = Path(staged["sidecar"]) if staged.get("sidecar") else None
    return {
        "file": path.name, "sha256": sha256_file(path),
        "sidecar": sidecar.name if sidecar else None, "sidecar_sha256": sha256_file(sidecar) if sidecar else None,
        **report.as_dict(),
    }
