"""Build state: what a build has done so far, kept in ``build/state.json``.

The configuration is frozen; everything that changes during a build lives here, in typed
fields (not a string-keyed bag). The file is rewritten atomically after every stage, so an
interrupted build resumes from what the file says.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.config import ApplianceConfig, public_dump
from appliance.digest import sha256_file
from appliance.errors import StateError, VMSealed
from appliance.guest import guest_environment
from appliance.inputs import describe, read_regular

STATE_VERSION = 1
MAX_STATE_BYTES = 16 << 20

# Settings that cannot change what is on the VM's disk: how the build reaches and sizes the VM,
# how long and how often it waits, where it keeps downloads and writes its outputs. Output
# settings the guest receives (output.name, output.version) still count: they reach the disk
# through the guest environment, which is hashed whole. Every other setting counts, so a new
# setting invalidates a sealed VM until someone decides here that it does not shape the disk.
NOT_DISK_CONTENT = (
    "output",
    "vm.cpus", "vm.memory_mb", "vm.boot_timeout", "vm.verify_timeout",
    "libvirt.driver", "libvirt.cpu_mode", "libvirt.machine_type", "libvirt.management_network_name",
    "libvirt.management_network_address", "libvirt.management_network_mode",
    "virtualbox",
    "network.forwarded_ports",
    "ssh.private_key", "ssh.connect_timeout", "ssh.connect_retries", "ssh.keepalive",
    "artifacts",
    "provision.step_timeout", "provision.timeouts", "provision.reconnect_attempts",
)
# Settings the export cannot see: they change neither the disk nor the OVF around it.
NOT_EXPORTED = (
    "vm.boot_timeout", "vm.verify_timeout",
    "libvirt.driver", "libvirt.cpu_mode", "libvirt.management_network_name",
    "libvirt.management_network_address", "libvirt.management_network_mode",
    "virtualbox.gui",
    "ssh.private_key", "ssh.connect_timeout", "ssh.connect_retries", "ssh.keepalive",
    "artifacts",
    "provision.step_timeout", "provision.timeouts", "provision.reconnect_attempts",
    "output.dir", "output.build_dir",
)


def _without(data: dict[str, Any], dotted: tuple[str, ...]) -> dict[str, Any]:
    for key in dotted:
        *parents, last = key.split(".")
        node: Any = data
        for part in parents:
            node = node[part]
        del node[last]  # KeyError here means a name above does not exist (tests check them all)
    return data


def _digest(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def config_digest(cfg: ApplianceConfig) -> str:
    """A digest of the settings that shape the VM's disk (what a sealed VM was built from).

    A timeout, a retry count, the cache folder or the output settings do not change it, so
    raising ``vm.boot_timeout`` after a timeout never invalidates a sealed VM; a version does.
    """
    data = _without(public_dump(cfg), NOT_DISK_CONTENT)
    return _digest({"settings": data, "guest_environment": guest_environment(cfg)})


def export_digest(cfg: ApplianceConfig) -> str:
    """A digest of everything the export writes: the disk's inputs, the OVF's settings, the EULA text.

    The export stage reruns whenever it changes, so a published OVA never carries an older
    product name, version or format than the configuration that published it.
    """
    data = _without(public_dump(cfg), NOT_EXPORTED)
    eula = ""
    if cfg.output.eula_file:
        try:
            eula = sha256_file(cfg.path(cfg.output.eula_file))
        except OSError:
            eula = "unreadable"  # the export itself reports the problem
    return _digest({"disk": config_digest(cfg), "settings": data, "eula_sha256": eula,
                    "ova_name": cfg.output.primary_ova.file_name(f"{cfg.output.name}-{cfg.appliance_version}")})


@dataclass
class BuildState:
    version: int = STATE_VERSION
    provider: str = ""
    vm_name: str = ""
    libvirt_driver: str = ""
    config_digest: str = ""
    export_digest: str = ""
    completed: list[str] = field(default_factory=list)
    # The seal step started: from then on the VM may have lost the build's access and secrets,
    # so it is never treated as unsealed again (only resealed while it still runs, or destroyed).
    seal_started: bool = False
    sealed: bool = False
    disk_image: str = ""
    staged_ova: str = ""
    staged_ova_sha256: str = ""
    # The formats beyond the first OVA (output.formats): {"format", "path", "sha256"} each, and
    # "sidecar" (its path, "" when none) for a disk format (appliance.export.disks).
    staged_formats: list[dict[str, str]] = field(default_factory=list)
    verified_sha256: str = ""
    verify_report: dict[str, Any] = field(default_factory=dict)  # what verify checked (schema run or not)
    # HMAC over (verified_sha256, export_digest, verify_report) under a key outside build/
    # (appliance.receipt): what a hand-written state.json cannot reproduce.
    verify_receipt: str = ""
    images: list[dict[str, str]] = field(default_factory=list)
    last_failure: str = ""
    updated: str = ""

    @classmethod
    def path_for(cls, build_dir: Path) -> Path:
        return build_dir / "state.json"

    @classmethod
    def load(cls, build_dir: Path) -> BuildState:
        """The saved state, or a fresh one when there is no file. Anything else odd is an error."""
        path = cls.path_for(build_dir)
        hint = (f"the file records whether the VM is sealed, so it is never guessed: restore or repair {path}, "
                "or run `invoke destroy` (removes the build VM and this file) and build again")
        try:
            raw = read_regular(path, MAX_STATE_BYTES)  # never the whole of a huge file; never a FIFO
            if len(raw) > MAX_STATE_BYTES:
                raise StateError(f"the build state {path} is larger than {MAX_STATE_BYTES} bytes; this tool "
                                 "writes a few kilobytes there", hint=hint)
            text = raw.decode("utf-8")
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise StateError(f"cannot read the build state {path}: {describe(exc)}", hint=hint) from None
        except UnicodeDecodeError as exc:
            raise StateError(f"cannot read the build state {path}: not UTF-8 ({exc.reason} at byte {exc.start})",
                             hint=hint) from None
        try:
            raw = json.loads(text, object_pairs_hook=_refuse_duplicate_fields)
        except ValueError as exc:
            raise StateError(f"the build state {path} is not valid JSON (truncated?): {exc}", hint=hint) from None
        except RecursionError:  # the decoder recurses per level: a deeply nested file must not be a traceback
            raise StateError(f"the build state {path} is not valid: nested too deeply for a state file",
                             hint=hint) from None
        problems = _check_state(raw)
        if problems:
            raise StateError(f"the build state {path} is not valid: {'; '.join(problems)}", hint=hint)
        return cls(**raw)

    def save(self, build_dir: Path) -> None:
        """Write the state atomically: a temporary file of our own in the same folder, then a rename."""
        build_dir.mkdir(parents=True, exist_ok=True)
        self.updated = datetime.now(UTC).isoformat(timespec="seconds")
        path = self.path_for(build_dir)
        fd, tmp = tempfile.mkstemp(dir=build_dir, prefix=".state.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @property
    def seal_begun(self) -> bool:
        """Sealed, or the seal step started: the VM must not be booted or provisioned again."""
        return self.sealed or self.seal_started

    def mark_done(self, stage: str) -> None:
        if stage not in self.completed:
            self.completed.append(stage)


def _refuse_duplicate_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; a file saying "sealed" twice is not guessed at.
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the field {key!r} appears twice in one object")
        seen[key] = value
    return seen


def _check_state(raw: object) -> list[str]:
    if not isinstance(raw, dict):
        return [f"it holds a {type(raw).__name__}, not an object"]
    types = {f.name: f.type for f in fields(BuildState)}
    problems = []
    if raw.get("version") != STATE_VERSION:
        problems.append(f"version is {raw.get('version')!r}, this tool reads version {STATE_VERSION}")
    for key, value in raw.items():
        kind = types.get(key)
        if kind is None:
            problems.append(f"unknown field {key!r}")
        elif not _is_of(value, str(kind)):
            problems.append(f"{key} is {value!r}, which is not of type {kind}")
    return problems


def _is_of(value: object, kind: str) -> bool:
    # json.loads gives only these shapes; bool is checked before int (True is an int in Python).
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "dict[str, Any]":  # a JSON object written by this tool (verify's report); keys are strings
        return isinstance(value, dict)
    if kind == "list[dict[str, str]]":
        return isinstance(value, list) and all(
            isinstance(v, dict) and all(isinstance(x, str) for x in v.values()) for v in value
        )
    return False


def refuse_if_sealed(cfg: ApplianceConfig, action: str) -> None:
    """Raise ``VMSealed`` when the build VM is sealed or its seal started: ``action`` would boot it."""
    state = BuildState.load(cfg.build_dir)
    if not state.seal_begun:
        return
    what = "is sealed" if state.sealed else "was being sealed when the seal step was interrupted"
    if state.sealed:
        way_out = "`invoke build-ova` exports the sealed VM as it is; `invoke destroy` removes it to start over"
    else:  # the build's pipeline reruns the seal only while the VM still runs (stage_up); never boots it
        way_out = ("`invoke build-ova` runs the seal step again while the VM still runs (it never boots it); "
                   "`invoke destroy` removes it to start over")
    raise VMSealed(
        f"refusing to {action}: the build VM {what}. Booting it would run the appliance's first boot inside "
        "the build VM, and an export after that would ship that boot's host keys and secrets in every copy",
        hint=way_out,
    )
