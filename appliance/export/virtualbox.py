"""Export, VirtualBox provider: VirtualBox writes the OVA itself, from the halted VM.

``export_virtualbox(cfg, vm, dest_dir)`` checks the VM's state (``VBoxManage showvminfo
--machinereadable``, parsed), makes its NAT forwards match the configuration (Vagrant adds an
``ssh`` forward the appliance should not ship), then exports with ``VBoxManage export`` (the one
path, tested against the real VirtualBox; why not pyvbox: docs/export.md): OVF 1.0 by default
or 2.0, manifest on, MAC addresses stripped except on NAT adapters, product, vendor, URLs,
version, description and licence from ``cfg.output``. The OVA lands under a temporary folder in
``dest_dir`` and is moved to its final name when complete, with its ``.sha256`` next to it.

The unit tests drive it through a small fake ``VBoxManage`` on PATH; the ``vbox`` tier runs it
against VirtualBox 7.2's real VBoxManage (tests/vbox/test_vbox_export.py). VirtualBox chooses
the manifest digest itself: SHA1 for OVF 1.0, SHA256 for OVF 2.0 (see docs/export.md for what
that means for vSphere).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.digest import sha256_file
from appliance.errors import CommandFailed, ExportError, PrerequisiteMissing
from appliance.export.ova import OvaResult
from appliance.export.ovf import DiskFacts, output_format_for, read_descriptor
from appliance.formats import OutputFormat, OvfFormat
from appliance.log import human_size, log
from appliance.run import CommandResult, run, which

if TYPE_CHECKING:  # pragma: no cover
    from appliance.config import ApplianceConfig

# States in which VirtualBox can export a machine (its disks are not in use).
EXPORTABLE_STATES = ("poweroff", "aborted")
# States that do not end by themselves: no point in waiting for them.
_RUNNING_STATES = ("running", "paused", "gurumeditation", "saved", "teleported")


# -- VBoxManage showvminfo --machinereadable --------------------------------------------------------


def _read_quoted(text: str, i: int) -> tuple[str, int]:
    """The quoted string starting at ``text[i] == '"'``; VBoxManage escapes only ``"`` and ``\\``."""
    out = []
    i += 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        elif ch == '"':
            return "".join(out), i + 1
        else:
            out.append(ch)  # newlines included: VBoxManage prints them raw (descriptions)
            i += 1
    raise ValueError("unterminated quoted value")


_NIC_KEY = re.compile(r"nic([0-9]+)")
_FORWARDING_KEY = re.compile(r"Forwarding\(([0-9]+)\)")


def parse_machinereadable(text: str) -> dict[str, str]:
    """``key="value"`` / ``"key"="value"`` / ``key=value`` lines into a dict (values unescaped).

    VBoxManage 7.2 numbers each adapter's NAT rules from 0 under the same key (``Forwarding(0)``
    after ``nic1=...``, again after ``nic2=...``): a rule is stored under ``Forwarding<N>(<k>)``,
    N being the adapter whose ``nicN`` line came last before it, so no adapter's rules overwrite another's.
    """
    info: dict[str, str] = {}
    adapter = 1
    i = 0
    while i < len(text):
        if text[i] in "\r\n":
            i += 1
            continue
        if text[i] == '"':
            key, i = _read_quoted(text, i)
        else:
            eq = text.find("=", i)
            nl = text.find("\n", i)
            if text[i] in " \t" and (eq < 0 or (0 <= nl < eq)):
                # VirtualBox 7 prints indented headings such as " rec_screen0" between the pairs.
                i = len(text) if nl < 0 else nl + 1
                continue
            if eq < 0 or (0 <= nl < eq):
                raise ValueError(f"line without '=': {text[i:nl if nl >= 0 else None]!r}")
            key, i = text[i:eq], eq
        if i >= len(text) or text[i] != "=":
            raise ValueError(f"expected '=' after {key!r}")
        i += 1
        if i < len(text) and text[i] == '"':
            value, i = _read_quoted(text, i)
        else:
            nl = text.find("\n", i)
            value, i = (text[i:], len(text)) if nl < 0 else (text[i:nl], nl)
        if nic := _NIC_KEY.fullmatch(key):
            adapter = int(nic.group(1))
        elif forwarding := _FORWARDING_KEY.fullmatch(key):
            key = f"Forwarding{adapter}({forwarding.group(1)})"
        info[key] = value
    return info


@dataclass(frozen=True)
class NatRule:
    """One ``ForwardingN`` entry: ``name,proto,hostip,hostport,guestip,guestport``."""

    name: str
    protocol: str
    host_ip: str
    host_port: int
    guest_ip: str
    guest_port: int


def nat_rules(info: dict[str, str], adapter: int = 1) -> list[NatRule]:
    """The NAT forwards of ``adapter`` (``Forwarding<adapter>(k)``, as :func:`parse_machinereadable` keys them)."""
    prefix = f"Forwarding{adapter}("
    rules = []
    for key, value in info.items():
        if key.startswith(prefix) and key.endswith(")"):
            name, proto, host_ip, host_port, guest_ip, guest_port = value.split(",")
            rules.append(NatRule(name, proto, host_ip, int(host_port or 0), guest_ip, int(guest_port or 0)))
    return rules


def vboxmanage() -> str:
    found = which("VBoxManage") or which("vboxmanage")
    if found is None:
        raise PrerequisiteMissing("VBoxManage is not installed",
                                  hint="install VirtualBox, or build with --provider libvirt")
    return found


def vm_info(vm: str) -> dict[str, str]:
    """``VBoxManage showvminfo VM --machinereadable``, parsed."""
    result = run([vboxmanage(), "showvminfo", vm, "--machinereadable"],
                 hint=f"is {vm!r} a VirtualBox VM? (VBoxManage list vms)")
    try:
        return parse_machinereadable(result.stdout)
    except ValueError as exc:
        raise ExportError(f"cannot parse `VBoxManage showvminfo {vm} --machinereadable`: {exc}") from None


# -- waiting for the VM's session to be released ---------------------------------------------------
#
# A VM that has just powered off is still locked while its VM process (VBoxHeadless) tears the
# session down; `unregistervm` then fails with "Cannot unregister the machine ... while it is
# locked" and `modifyvm` with "already locked for a session (or being unlocked)" (both
# VBOX_E_INVALID_OBJECT_STATE). `showvminfo --machinereadable` prints `SessionName="..."` while a
# named session (headless, GUI, a script's) holds the machine (VBoxManageInfo.cpp, VirtualBox
# 7.2: only when the session state is not Unlocked), and VMState is a transient state
# ("stopping", "saving", ...) while the VM process still runs. A session opened without a name
# shows neither, so a command refused for a lock is retried too, a bounded number of times.

# States in which no VM process runs (VBoxManage's short state names).
SETTLED_STATES = ("poweroff", "aborted", "saved", "teleported", "aborted-saved")
LOCK_WAIT = 120.0  # seconds a session may take to be released
LOCK_RETRIES = 6


def session_holder(info: dict[str, str]) -> str | None:
    """What still holds the VM (a named session or a VM process in a transient state), or None."""
    if info.get("SessionName"):
        return f"session {info['SessionName']!r}"
    state = info.get("VMState", "unknown")
    if state not in SETTLED_STATES:
        return f"VM state {state!r}"
    return None


def wait_unlocked(vm: str, timeout: float = LOCK_WAIT, poll: float = 1.0) -> dict[str, str]:
    """Poll ``showvminfo`` until no session holds ``vm`` and no VM process runs; its info then.

    Raises :class:`ExportError` naming the holder when it is still there after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    said = False
    while True:
        info = vm_info(vm)
        holder = session_holder(info)
        if holder is None:
            return info
        if time.monotonic() > deadline:
            raise ExportError(f"VirtualBox VM {vm!r} is still held ({holder}) after {timeout:.0f} s",
                              hint=f"close what uses it (VBoxManage showvminfo {vm}), or power it off: "
                                   f"VBoxManage controlvm {vm} poweroff")
        if not said:
            log.info(f"waiting for VirtualBox to release {vm} ({holder})")
            said = True
        time.sleep(poll)


def refused_for_lock(result: CommandResult) -> bool:
    """VBoxManage refused because another session holds the machine (VBOX_E_INVALID_OBJECT_STATE)."""
    return not result.ok and "locked" in result.stderr and "VBOX_E_INVALID_OBJECT_STATE" in result.stderr


def run_unlocked(argv: list[str], vm: str, *, timeout: float = 300, attempts: int = LOCK_RETRIES,
                 lock_wait: float = LOCK_WAIT, hint: str | None = None) -> CommandResult:
    """Run a VBoxManage command that locks ``vm`` once VirtualBox has released it; retry (bounded)
    while it is refused for a lock held by an unnamed session. Raises ``CommandFailed`` otherwise."""
    result: CommandResult | None = None
    for attempt in range(1, attempts + 1):
        wait_unlocked(vm, lock_wait)
        result = run(argv, check=False, timeout=timeout)
        if not refused_for_lock(result):
            break
        log.info(f"VirtualBox still holds {vm} (attempt {attempt}/{attempts}); retrying")
        time.sleep(min(2.0 * attempt, 10.0))
    assert result is not None
    if not result.ok:
        raise CommandFailed(result, hint=hint)
    return result


def not_registered(result: CommandResult) -> bool:
    """``showvminfo`` failed because VirtualBox knows no such VM ("Could not find a registered machine
    named ...", VBOX_E_OBJECT_NOT_FOUND), not for another reason."""
    return not result.ok and ("Could not find a registered machine" in result.stderr
                              or "VBOX_E_OBJECT_NOT_FOUND" in result.stderr)


def still_registered(vm: str) -> bool:
    """Whether VirtualBox still lists ``vm`` (``VBoxManage list vms``: ``"NAME" {UUID}`` lines)."""
    listed = run([vboxmanage(), "list", "vms"], check=False, timeout=60)
    return any(line.rsplit(" {", 1)[0] == f'"{vm}"' for line in listed.stdout.splitlines())


def unregister_and_delete(vm: str, *, lock_wait: float = LOCK_WAIT) -> None:
    """Power ``vm`` off if it runs, wait until its session is released, unregister it and delete its
    files. Raises :class:`ExportError` when it is still registered afterwards, naming the command."""
    vbm = vboxmanage()
    try:
        info = vm_info(vm)
    except CommandFailed as exc:
        if not_registered(exc.result):
            return  # never imported, or already gone
        # VBoxSVC not answering, say: the VM (tens of GB) may well be there; never a silent success.
        said = " ".join(exc.result.tail("stderr", 2)) or f"exit status {exc.result.returncode}"
        raise ExportError(f"cannot tell whether VirtualBox VM {vm!r} is still registered: "
                          f"VBoxManage showvminfo said: {said}",
                          hint=f"look (VBoxManage list vms) and remove it: "
                               f"VBoxManage unregistervm {vm} --delete") from None
    if info.get("VMState") not in SETTLED_STATES:
        run([vbm, "controlvm", vm, "poweroff"], check=False, timeout=120)
    try:
        run_unlocked([vbm, "unregistervm", vm, "--delete"], vm, lock_wait=lock_wait)
    except (CommandFailed, ExportError) as exc:
        if still_registered(vm):
            raise ExportError(f"VirtualBox VM {vm!r} is still registered: {str(exc).splitlines()[0]}",
                              hint=f"remove it by hand: VBoxManage unregistervm {vm} --delete") from None
        raise


# -- export ---------------------------------------------------------------------------------------


def _vbox_format(cfg: ApplianceConfig, ovf_format: OvfFormat | None) -> tuple[OutputFormat, str]:
    """The OVA format to export and its ``VBoxManage export`` flag (from the format's record)."""
    record = output_format_for(cfg, None, ovf_format)
    flag = record.ovf.vboxmanage_flag if record.ovf is not None else None
    if flag is None:
        raise ExportError(f"VirtualBox's exporter cannot write the {record.name} format",
                          hint="with provider virtualbox, list virtualbox-ova or virtualbox-ova-ovf20 first in "
                               "output.formats, or build with --provider libvirt")
    return record, flag


def export_argv(cfg: ApplianceConfig, vm: str, output: Path, ovf_format: OvfFormat | None = None) -> list[str]:
    """The ``VBoxManage export`` command line for ``vm`` -> ``output`` (flags per VBoxManage's manual)."""
    _, flag = _vbox_format(cfg, ovf_format)
    out = cfg.output
    argv = [
        vboxmanage(), "export", vm, f"--output={output}", flag,
        "--manifest", "--options=nomacsbutnat",
        "--vsys=0",
        f"--product={out.product}", f"--producturl={out.product_url}",
        f"--vendor={out.vendor}", f"--vendorurl={out.vendor_url}",
        f"--version={cfg.appliance_version}",
    ]
    if out.description:
        argv.append(f"--description={out.description}")
    if out.eula_file:
        argv.append(f"--eulafile={cfg.path(out.eula_file)}")
    return argv


def sync_nat_forwards(cfg: ApplianceConfig, vm: str, info: dict[str, str]) -> list[str]:
    """Remove NAT forwards the configuration does not list (e.g. Vagrant's ``ssh``); add missing ones.

    Returns the ``VBoxManage modifyvm`` changes made, for the log.
    """
    wanted = {p.name: p for p in cfg.network.forwarded_ports}
    have = {r.name: r for r in nat_rules(info)}
    changes = []
    for name, existing in sorted(have.items()):
        p = wanted.get(name)
        if p is None or (existing.protocol, existing.host_ip, existing.host_port, existing.guest_port) != (
            p.protocol, p.host_ip, p.host, p.guest
        ):
            run_unlocked([vboxmanage(), "modifyvm", vm, "--natpf1", "delete", name], vm)
            changes.append(f"deleted forward {name}")
    for name, p in sorted(wanted.items()):
        rule = have.get(name)
        if rule is None or (rule.protocol, rule.host_ip, rule.host_port, rule.guest_port) != (
            p.protocol, p.host_ip, p.host, p.guest
        ):
            run_unlocked([vboxmanage(), "modifyvm", vm, "--natpf1",
                          f"{name},{p.protocol},{p.host_ip},{p.host},,{p.guest}"], vm)
            changes.append(f"added forward {name}")
    return changes


def _ova_members(path: Path) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each member, via Python's tarfile (reads headers only)."""
    import tarfile

    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            yield m.name, m.offset_data, m.size


def _describe(path: Path, fmt: OvfFormat) -> OvaResult:
    members = list(_ova_members(path))
    by_name = {n: (off, size) for n, off, size in members}
    ovf_name = next((n for n, _, _ in members if n.endswith(".ovf")), None)
    if ovf_name is None:
        raise ExportError(f"VirtualBox wrote {path} without an .ovf descriptor")
    with path.open("rb") as f:
        off, size = by_name[ovf_name]
        f.seek(off)
        facts = read_descriptor(f.read(size))
        if not facts.disks:
            raise ExportError(f"VirtualBox's descriptor in {path} lists no disk")
        _, file_ref, capacity, _ = facts.disks[0]
        href = next(h for fid, h, _ in facts.files if fid == file_ref)
        off, size = by_name[href]
        f.seek(off)
        digest = hashlib.sha256()
        remaining = size
        while remaining:
            chunk = f.read(min(4 << 20, remaining))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    disk = DiskFacts(href=href, file_size=size, capacity=capacity, sha256=digest.hexdigest())
    ova_digest = sha256_file(path)
    sha_file = path.with_name(path.name + ".sha256")
    return OvaResult(path=path, sha256=ova_digest, size=path.stat().st_size, sha256_file=sha_file,
                     members=tuple(n for n, _, _ in members), disk=disk, ovf_format=fmt)


def export_virtualbox(
    cfg: ApplianceConfig, dest_dir: Path, *, vm: str | None = None, ovf_format: OvfFormat | None = None
) -> OvaResult:
    """Export the halted VirtualBox VM to ``dest_dir/<name>-<version>.ova`` (+ ``.sha256``).

    ``vm`` defaults to ``cfg.vm.name``, the name Vagrantfile.j2 gives the VirtualBox VM.
    """
    vm = vm or cfg.vm.name
    record, _ = _vbox_format(cfg, ovf_format)
    assert record.ovf is not None
    fmt: OvfFormat = record.ovf.version
    state = vm_info(vm).get("VMState", "unknown")
    if state not in _RUNNING_STATES:
        # A VM that has just powered itself off (the seal step) may still be held by its VM
        # process: the modifyvm calls below would be refused.
        info = wait_unlocked(vm)
        state = info.get("VMState", "unknown")
    if state not in EXPORTABLE_STATES:
        raise ExportError(f"VM {vm!r} is {state!r}; export needs it powered off",
                          hint="halt it first (vagrant halt)")
    for change in sync_nat_forwards(cfg, vm, info):
        log.info(f"NAT: {change}")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / record.file_name(f"{cfg.output.name}-{cfg.appliance_version}")
    # VirtualBox names the members after the output file, so the temporary OVA keeps the final
    # name inside a temporary folder, and is moved out when complete.
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=f".{final.name}.work-") as work:
        staged = Path(work) / final.name
        with log.step(f"export {vm} with VBoxManage ({fmt})"):
            run(export_argv(cfg, vm, staged, ovf_format=fmt), stream=True,
                hint="is the VM halted and its disk readable?")
        if not staged.is_file():
            raise ExportError(f"VirtualBox reported success but wrote no {staged.name}")
        result = _describe(staged, fmt)
        sha_staged = Path(work) / (final.name + ".sha256")
        sha_staged.write_text(f"{result.sha256}  {final.name}\n", encoding="ascii")
        os.replace(staged, final)
        os.replace(sha_staged, final.with_name(final.name + ".sha256"))
    log.success(f"wrote {final} ({human_size(result.size)})")
    return OvaResult(path=final, sha256=result.sha256, size=result.size,
                     sha256_file=final.with_name(final.name + ".sha256"), members=result.members,
                     disk=result.disk, ovf_format=fmt, output_format=record.name)
