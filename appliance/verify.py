"""Verify stage: prove an OVA is whole and well-formed, then that a fresh copy boots for the first time.

``verify_ova(path)`` treats the OVA as hostile. The structural check
(``appliance.verify_ova.check_structure``) turns every problem into one line of the
``VerifyError(reasons)`` it raises, never a traceback, writes only inside its temporary work
folder, and bounds memory, disk and time:

- tar: every header a valid ustar (or GNU) header for a regular file with a plain name, no PAX
  extended headers (VirtualBox refuses them), no links, devices or directories;
- order: the ``.ovf`` first, then exactly the ``References`` files in order, with the ``.mf``
  second (ovftool, our writer) or last (VirtualBox);
- manifest: one well-formed line per member, each digest matching (SHA1/SHA256/SHA512);
- descriptor: parsed without DTD or entities, numbers bounded, valid against the DMTF OVF
  schema (VirtualBox's ``vbox:Machine`` allowed), from the pinned, verified cache folder
  (``appliance.artifacts``); when they are not there the report says the check did not run, why,
  and that ``invoke fetch`` fetches them;
- one reading: the descriptor, manifest and member names leave no room for VirtualBox's OVF
  reader to take other files than ours (``appliance.export.ovf.importer_ambiguities``, docs/export.md);
- disks: each referenced VMDK is walked by ``appliance.verify_vmdk`` before anything else opens it
  (VirtualBox's marker reading and QEMU's grain-table reading must be one disk; the embedded
  descriptor names only the file itself), then ``qemu-img info``: streamOptimized, no other
  extents or parent; its virtual size equals the descriptor's capacity and its size ``ovf:size``.

Then, with ``boot=True``, ``appliance.verify_boot.boot_check`` boots the copied disk under QEMU
through a qcow2 overlay, proves that this boot is the copy's first boot (a sealed image), logs
in with the copy's own access and, when asked, checks HTTP.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import ApplianceConfig
from appliance.errors import UsageError, VerifyError
from appliance.inputs import describe, open_regular
from appliance.log import log
from appliance.verify_boot import BootLogin, BootReport, ConsoleLogin, SSHLogin, boot_check
from appliance.verify_ova import NO_SCHEMA_DIR, check_structure


@dataclass
class VerifyReport:
    """Every check run, in order, with its outcome (``checked``, or why it did not run)."""

    path: Path
    ovf_format: str | None = None
    members: list[str] = field(default_factory=list)
    disks: dict[str, int] = field(default_factory=dict)  # href -> virtual size
    checks: list[tuple[str, str]] = field(default_factory=list)
    boot: BootReport | None = None

    @property
    def schema_checked(self) -> bool:
        return dict(self.checks).get("OVF schema", "").startswith("checked")

    def as_dict(self) -> dict[str, object]:
        """For build-report.json: the checks and what the boot showed."""
        boot = None
        if self.boot is not None:
            boot = {"seconds_to_ssh": round(self.boot.seconds_to_ssh, 1), "ready": self.boot.ready_output,
                    "first_boot_proved": self.boot.first_boot_proved, "stack": self.boot.stack,
                    "http_status": self.boot.http_status, "http_skipped": self.boot.http_skipped or None,
                    "accelerator": self.boot.accelerator or None, "kvm_failure": self.boot.kvm_failure or None}
        return {"ovf_format": self.ovf_format, "checks": dict(self.checks), "boot": boot}


def _nic_of(cfg: ApplianceConfig | None) -> str:
    """The QEMU NIC of the configuration's first OVA format (its record's ``qemu_device``); E1000 without one."""
    if cfg is None or cfg.output.primary_ova.ovf is None:
        return "e1000"
    return cfg.output.primary_ova.ovf.nic.qemu_device


def verify_ova(
    path: Path,
    *,
    boot: bool = True,
    cfg: ApplianceConfig | None = None,
    schema_dir: Path | None = None,
    schema_missing: str = "",
    work_dir: Path | None = None,
    login: BootLogin | None = None,
    http_port: int | None = None,
    http_host: str | None = None,
    http_if_stack: bool = False,
    boot_timeout: float = 900,
    cpus: int = 2,
    memory_mb: int = 2048,
    boot_with: str = "qemu",
    driver: str = "auto",
    nic: str | None = None,
) -> VerifyReport:
    """Check ``path`` structurally (all failures at once), then boot a copy unless ``boot=False``.

    ``boot_with`` is ``qemu`` (the extracted disk under QEMU, no route out; ``driver`` as
    ``libvirt.driver``: ``kvm``, ``qemu`` for TCG, ``auto`` for KVM if it works, else TCG) or
    ``virtualbox`` (the OVA imported into a temporary VirtualBox VM, see
    ``appliance.vboxboot``). ``nic``: the QEMU NIC device of the boot (default: the one the
    configuration's first OVA format describes, ``e1000`` without a configuration).

    With ``cfg`` and no ``login``, the boot check's login and HTTP port come from the
    configuration (see :func:`boot_access`), and so do its CPUs (at most the host's) and memory.
    With ``http_if_stack`` the image's own status line decides whether HTTP is checked.

    Schemas: ``schema_dir``, else with ``cfg`` the verified cache folder (never fetched here: the
    build's fetch stage fetches them); without either the schema check does not run and the report
    gives ``schema_missing`` as the reason.
    """
    path = Path(path)
    if schema_dir is None and cfg is not None:
        from appliance.artifacts import cached_ovf_schemas

        schema_dir, schema_missing = cached_ovf_schemas(cfg)
    if boot and cfg is not None and login is None:
        login, cfg_http = boot_access(cfg)
        http_port = http_port if http_port is not None else cfg_http
        http_host = http_host or portal_host(cfg)
        boot_timeout = cfg.vm.verify_timeout
        cpus, memory_mb = min(cfg.vm.cpus, os.cpu_count() or 1), cfg.vm.memory_mb
        driver = cfg.libvirt.driver
        from appliance.providers import boot_backend_for

        boot_with = boot_backend_for(cfg)
    _require_regular_ova(path)
    if boot and login is None:
        raise UsageError("the boot check needs a login (user and private key); or skip it with --no-boot")
    report = VerifyReport(path=path)
    with tempfile.TemporaryDirectory(prefix="verify-ova-", dir=work_dir) as tmp:
        work = Path(tmp)
        with log.step(f"check the structure of {path.name}"):
            structure = check_structure(path, work, schema_dir, schema_missing=schema_missing or NO_SCHEMA_DIR)
        report.members, report.ovf_format = structure.members, structure.ovf_format
        report.disks, report.checks = structure.disks, structure.checks
        if structure.findings:
            count = f"{len(structure.findings)} problem" + ("s" if len(structure.findings) != 1 else "")
            raise VerifyError(f"{path} failed verification ({count})", structure.findings)
        what = "structure, manifest, schema and disks" if report.schema_checked else \
            "structure, manifest and disks (NOT the OVF schema)"
        log.success(f"{path.name}: {what} are sound")
        if boot:
            assert login is not None
            disks = structure.extracted
            if len(disks) != 1:
                raise VerifyError(f"{path}: boot check expects one disk, found {len(disks)}")
            with log.step(f"boot a fresh copy ({boot_with})"):
                if boot_with == "virtualbox":
                    from appliance.vboxboot import import_size, virtualbox_boot_check

                    # VirtualBox imports the OVA itself: the disk copied out for the structural
                    # check has served; what the import will write is measured from it, then it goes.
                    disk = next(iter(disks.values()))
                    need = import_size(disk)
                    disk.unlink()
                    report.boot = virtualbox_boot_check(path, login=login, http_port=http_port, http_host=http_host,
                                                        http_if_stack=http_if_stack, timeout=boot_timeout,
                                                        work_dir=work, cpus=cpus, memory_mb=memory_mb,
                                                        import_bytes=need)
                else:
                    report.boot = boot_check(next(iter(disks.values())), login=login, http_port=http_port,
                                             http_host=http_host, http_if_stack=http_if_stack,
                                             timeout=boot_timeout, work_dir=work, cpus=cpus, memory_mb=memory_mb,
                                             driver=driver, nic=nic or _nic_of(cfg))
            if report.boot.first_boot_proved:
                proof = "proved by this boot's nonce"
            else:
                proof = "not checked: an unsealed image entered with a key"
            report.checks.append(("first boot", proof))
            report.checks.append(("boot", "checked"))
            if http_port is not None:
                report.checks.append(("HTTP", f"HTTP {report.boot.http_status}" if report.boot.http_status
                                      else f"not checked: {report.boot.http_skipped}"))
    return report


def _require_regular_ova(path: Path) -> None:
    """Exit 2 at once for a missing OVA or one that is a FIFO, directory or device (never blocks)."""
    try:
        open_regular(path).close()
    except FileNotFoundError:
        raise UsageError(f"no OVA at {str(path)!r}") from None
    except OSError as exc:
        raise UsageError(f"cannot read the OVA {str(path)!r}: {describe(exc)}") from None


# -- from the command line -------------------------------------------------------------------------


def portal_host(cfg: ApplianceConfig) -> str:
    """The Host a browser on the VirtualBox host sends: the domain and the forwarded port."""
    forward = cfg.http_port()
    return f"{cfg.csghub.domain}:{forward.host}" if forward is not None else cfg.csghub.domain


def boot_access(
    cfg: ApplianceConfig, *, ssh_key: str | None = None, http: bool | None = None
) -> tuple[BootLogin, int | None]:
    """Login and guest HTTP port for the boot check, from the configuration.

    Login: with ``ssh_key``, ``cfg.ssh.user`` and that key. Otherwise a sealed image (the
    ``seal`` step is part of the build) is entered the way its owner would: with the first-boot
    password the copy prints on its console (``ConsoleLogin``); an unsealed one with
    ``ssh.private_key``, else the base box's build key. HTTP: the ``http`` forward's guest port
    when the stack is part of the build (``http=None``), or as forced by ``http``.
    """
    check_http = cfg.stack_enabled if http is None else http
    forward = cfg.http_port()
    http_port = forward.guest if (check_http and forward is not None) else None
    if not ssh_key and "seal" not in cfg.provision.skip:
        return ConsoleLogin(), http_port
    key = ssh_key or cfg.ssh.private_key
    if not key:
        from appliance.basebox import KEY_NAME, cache_dir

        key = str(cache_dir() / "keys" / KEY_NAME)
    key_file = Path(key).expanduser()
    if ssh_key:
        try:  # read later by Paramiko, which would block on a FIFO: refused now, at once
            open_regular(key_file).close()
        except FileNotFoundError:
            pass  # said later, with the fix ("does not exist")
        except OSError as exc:
            raise UsageError(f"cannot read the SSH key {str(key_file)!r}: {describe(exc)}") from None
    return SSHLogin(user=cfg.ssh.user, key_file=key_file), http_port


def verify_from_config(
    cfg: ApplianceConfig, path: Path, *, boot: bool = True, ssh_key: str | None = None, http: bool | None = None,
    fetch_schemas: bool = True,
) -> VerifyReport:
    """``invoke verify-ova``: :func:`verify_ova` with the access from the configuration, then a summary.

    Without ``http`` (neither ``--http`` nor ``--no-http``) the image's own status line decides:
    an image built without the stack is not asked for HTTP, whatever the local configuration.
    The pinned OVF schemas are fetched into the cache first when missing (unless ``fetch_schemas``
    is False: ``--no-fetch``); if that cannot be done the schema check does not run and the summary
    and report say why.
    """
    from appliance.artifacts import ensure_ovf_schemas
    from appliance.providers import boot_backend_for

    _require_regular_ova(path)
    login, http_port = boot_access(cfg, ssh_key=ssh_key, http=http) if boot else (None, None)
    schema_dir, schema_missing = ensure_ovf_schemas(cfg, fetch=fetch_schemas)
    report = verify_ova(path, boot=boot, login=login, http_port=http_port, http_host=portal_host(cfg),
                        schema_dir=schema_dir, schema_missing=schema_missing,
                        http_if_stack=http is None, boot_timeout=cfg.vm.verify_timeout,
                        cpus=min(cfg.vm.cpus, os.cpu_count() or 1), memory_mb=cfg.vm.memory_mb,
                        boot_with=boot_backend_for(cfg), driver=cfg.libvirt.driver)
    for name, outcome in report.checks:
        log.info(f"{name}: {outcome}")
    if report.boot:
        log.info(f"boot: SSH after {report.boot.seconds_to_ssh:.0f} s; ready: {report.boot.ready_output or '-'}"
                 + (f"; HTTP {report.boot.http_status}" if report.boot.http_status is not None else ""))
    schema = dict(report.checks).get("OVF schema", "")
    if report.schema_checked:
        log.success(f"{path} verified")
    else:
        log.warning(f"OVF schema validation did not run ({schema.removeprefix('not run: ')})")
        log.success(f"{path} verified, except for the OVF schema (see above)")
    return report
