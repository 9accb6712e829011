"""Verify stage: prove an OVA is whole and well-formed, then that a fresh copy boots.

``verify_ova(path)`` runs every structural check and collects every failure into one
``VerifyError(reasons)``:

- tar: every header a valid ustar (or GNU) header for a regular file, no PAX extended headers
  (VirtualBox refuses them), no paths, a proper end-of-archive;
- order: the ``.ovf`` first, its ``.mf`` right after it, then exactly the ``References`` files,
  in that order;
- manifest: one well-formed line per member, each digest matching (SHA1/SHA256/SHA512);
- descriptor: valid against the DMTF OVF schema (VirtualBox's ``vbox:Machine`` allowed);
- disks: each referenced VMDK is streamOptimized by ``qemu-img info``, its virtual size equals
  the descriptor's capacity and its file size the descriptor's ``ovf:size``.

The archive is read once: hashing and extracting the disks happen in the same pass. Then, with
``boot=True``, ``boot_check`` boots the extracted disk under QEMU through a qcow2 overlay (the
OVA and the extracted VMDK are never written), waits for SSH on a loopback forward, logs in
with the copy's own access and, when asked, checks HTTP on a second forward.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import signal
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from appliance.config import ApplianceConfig
from appliance.errors import PrerequisiteMissing, UsageError, VerifyError
from appliance.export.ovf import STREAM_OPTIMIZED, find_schema_dir, read_descriptor, schema_errors
from appliance.log import log
from appliance.run import run, which

BLOCK = 512
CHUNK = 4 << 20
# "SHA256(name)= hex" (OpenSSL, ours) and "SHA1 (name) = hex" (VirtualBox's own exports).
_MANIFEST_LINE = re.compile(r"^(SHA1|SHA256|SHA512) ?\((.+)\) ?= ([0-9a-fA-F]+)$")
_HASHES = {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}


@dataclass(frozen=True)
class TarMember:
    name: str
    size: int
    data_offset: int
    kind: str  # "ustar" or "gnu"


@dataclass
class BootReport:
    """What the boot check saw."""

    seconds_to_ssh: float
    ready_output: str
    http_status: int | None = None


@dataclass
class VerifyReport:
    """Every check run, in order, with its outcome (``ok`` or why it was not checked)."""

    path: Path
    ovf_format: str | None = None
    members: list[str] = field(default_factory=list)
    disks: dict[str, int] = field(default_factory=dict)  # href -> virtual size
    checks: list[tuple[str, str]] = field(default_factory=list)
    boot: BootReport | None = None


# -- tar reading ----------------------------------------------------------------------------------


def _number(field_bytes: bytes) -> int:
    if field_bytes[:1] and field_bytes[0] & 0x80:
        # base-256: bit 7 of the first byte flags it; bit 6 would be the sign (never valid here).
        if field_bytes[0] & 0x40:
            raise ValueError("negative base-256 number")
        return int.from_bytes(bytes([field_bytes[0] & 0x3F]) + field_bytes[1:], "big")
    text = field_bytes.replace(b"\0", b" ").strip()
    return int(text, 8) if text else 0


def scan_tar(f: io.BufferedReader, file_size: int, reasons: list[str]) -> list[TarMember]:
    """Walk the tar headers (seeking over the data); append every format problem to ``reasons``."""
    members: list[TarMember] = []
    offset = 0
    while True:
        f.seek(offset)
        header = f.read(BLOCK)
        if not header and offset == file_size and members:
            return members  # ends right after a member, without end-of-archive blocks: VirtualBox does that
        if len(header) < BLOCK:
            reasons.append(f"tar: archive ends at byte {offset} without an end-of-archive marker (truncated?)")
            return members
        if header == b"\0" * BLOCK:
            return members
        where = f"tar header at byte {offset}"
        stored = header[148:156]
        summed = sum(header[:148]) + 8 * 32 + sum(header[156:])
        try:
            if _number(stored) != summed:
                reasons.append(f"{where}: checksum mismatch (damaged header)")
                return members
        except ValueError:
            reasons.append(f"{where}: unreadable checksum field (damaged header)")
            return members
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        magic, version, typeflag = header[257:263], header[263:265], header[156:157]
        if magic == b"ustar\0" and version == b"00":
            kind = "ustar"
        elif magic == b"ustar " and version == b" \0":
            kind = "gnu"
        else:
            kind = "v7"
            reasons.append(f"tar member {name!r}: not a ustar header (magic {magic!r}); OVA needs ustar")
        try:
            size = _number(header[124:136])
        except ValueError as exc:
            reasons.append(f"tar member {name!r}: bad size field ({exc})")
            return members
        if typeflag in (b"x", b"g"):
            reasons.append(f"tar member {name!r}: PAX extended header, which VirtualBox cannot import")
        elif typeflag in (b"L", b"K"):
            reasons.append(f"tar member {name!r}: GNU long-name header; OVA member names must fit ustar")
        elif typeflag not in (b"0", b"\0"):
            reasons.append(f"tar member {name!r}: type {typeflag!r} is not a regular file")
        elif "/" in name:
            reasons.append(f"tar member {name!r}: OVA members must not have a directory part")
        data_offset = offset + BLOCK
        if data_offset + size > file_size:
            reasons.append(f"tar member {name!r}: its {size} bytes run past the archive's end (truncated)")
            members.append(TarMember(name, size, data_offset, kind))
            return members
        members.append(TarMember(name, size, data_offset, kind))
        offset = data_offset + size + (-size % BLOCK)


def _copy_and_hash(f: io.BufferedReader, member: TarMember, algorithms: set[str], out: Path | None) -> dict[str, str]:
    hashers = {a: hashlib.new(_HASHES[a]) for a in algorithms}
    f.seek(member.data_offset)
    remaining = member.size
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with (out.open("wb") if out else open(os.devnull, "wb")) as sink:
        while remaining:
            n = f.readinto(view[: min(CHUNK, remaining)])
            if not n:
                break
            for h in hashers.values():
                h.update(view[:n])
            if out:
                sink.write(view[:n])
            remaining -= n
    return {a: h.hexdigest() for a, h in hashers.items()}


def parse_manifest(text: str, reasons: list[str]) -> dict[str, tuple[str, str]]:
    """``{file name: (algorithm, hex digest)}`` from a manifest; malformed lines go to ``reasons``."""
    entries: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _MANIFEST_LINE.match(line.strip())
        if not m:
            reasons.append(f"manifest line {number} is not 'SHA256(name)= hex': {line[:80]!r}")
            continue
        algo, name, digest = m.groups()
        if len(digest) != hashlib.new(_HASHES[algo]).digest_size * 2:
            reasons.append(f"manifest line {number}: {algo} digest of {name!r} has the wrong length")
        if name in entries:
            reasons.append(f"manifest lists {name!r} twice")
        entries[name] = (algo, digest.lower())
    return entries


# -- structural verification ---------------------------------------------------------------------


def _check_structure(path: Path, work: Path, report: VerifyReport, reasons: list[str],
                     schema_dir: Path | None) -> dict[str, Path]:
    """All structural checks; returns the extracted disks (href -> file in ``work``)."""
    file_size = path.stat().st_size
    extracted: dict[str, Path] = {}
    with path.open("rb") as f:
        members = scan_tar(f, file_size, reasons)
        report.members = [m.name for m in members]
        by_name: dict[str, TarMember] = {}
        for m in members:
            if m.name in by_name:
                reasons.append(f"tar member {m.name!r} appears twice")
            by_name.setdefault(m.name, m)
        report.checks.append(("tar format", "checked"))
        if not members:
            reasons.append("the archive holds no members")
            return extracted
        first = members[0]
        if not first.name.endswith(".ovf"):
            reasons.append(f"first member is {first.name!r}; an OVA must start with its .ovf descriptor")
            ovf_member = next((m for m in members if m.name.endswith(".ovf")), None)
            if ovf_member is None:
                reasons.append("no .ovf descriptor in the archive")
                return extracted
        else:
            ovf_member = first
        f.seek(ovf_member.data_offset)
        ovf_bytes = f.read(ovf_member.size)

        mf_name = ovf_member.name[:-4] + ".mf"
        # The manifest follows the .ovf (ours) or ends the archive (VirtualBox's own exports).
        mf_last = len(members) > 2 and members[-1].name == mf_name
        if not mf_last and (len(members) < 2 or members[1].name != mf_name):
            found = members[1].name if len(members) > 1 else "nothing"
            reasons.append(f"second member is {found!r}; expected the manifest {mf_name!r} after the .ovf")

        try:
            facts = read_descriptor(ovf_bytes)
        except ValueError as exc:
            reasons.append(f"descriptor {ovf_member.name}: {exc}")
            facts = None
        if facts is not None:
            report.ovf_format = facts.ovf_format
            hrefs = [href for _, href, _ in facts.files]
            expected = [ovf_member.name, *hrefs, mf_name] if mf_last else [ovf_member.name, mf_name, *hrefs]
            actual = [m.name for m in members]
            for name in hrefs:
                if name not in by_name:
                    reasons.append(f"{name!r} is listed in References but missing from the archive")
            for name in actual:
                if name not in expected:
                    reasons.append(f"tar member {name!r} is not listed in the descriptor's References")
            want = [n for n in expected if n in by_name]
            got = [n for n in actual if n in expected]
            if got != want:
                reasons.append(f"members are out of order: {got}; expected {want}")
            report.checks.append(("member order", "checked"))

            # Schema
            sd = schema_dir or find_schema_dir()
            if sd is None:
                log.warning("OVF schemas not found: schema validation skipped (set APPLIANCE_OVF_SCHEMAS)")
                report.checks.append(("OVF schema", "not checked: schemas not found"))
            else:
                errors = schema_errors(ovf_bytes, sd)
                reasons += [f"descriptor {ovf_member.name} breaks the OVF schema: {e}" for e in errors]
                report.checks.append(("OVF schema", "checked"))

        # Manifest
        manifest: dict[str, tuple[str, str]] = {}
        if mf_name in by_name:
            mf = by_name[mf_name]
            f.seek(mf.data_offset)
            try:
                manifest = parse_manifest(f.read(mf.size).decode("utf-8"), reasons)
            except UnicodeDecodeError:
                reasons.append(f"manifest {mf_name} is not text")
        else:
            reasons.append(f"no manifest {mf_name!r} in the archive")
        for name in by_name:
            if name != mf_name and manifest and name not in manifest:
                reasons.append(f"tar member {name!r} has no digest in the manifest")
        for name in manifest:
            if name not in by_name:
                reasons.append(f"manifest lists {name!r}, which is not in the archive")

        disk_hrefs = set()
        if facts is not None:
            file_by_id = {fid: (href, size) for fid, href, size in facts.files}
            for disk_id, file_ref, capacity, fmt in facts.disks:
                href, declared_size = file_by_id.get(file_ref, ("", None))
                if not href:
                    reasons.append(f"disk {disk_id!r} refers to file id {file_ref!r}, which References lacks")
                    continue
                if fmt != STREAM_OPTIMIZED:
                    reasons.append(f"disk {disk_id!r} declares format {fmt!r}, not streamOptimized VMDK")
                member = by_name.get(href)
                if member and declared_size is not None and declared_size != member.size:
                    reasons.append(f"{href}: descriptor says {declared_size} bytes, archive holds {member.size}")
                report.disks[href] = capacity
                disk_hrefs.add(href)

        # One pass over the data: digests of every member, disks copied out on the way.
        for m in members:
            algos = {manifest[m.name][0]} if m.name in manifest else set()
            out = work / m.name if m.name in disk_hrefs else None
            if not algos and out is None:
                continue  # nothing to hash or keep (already reported as unlisted)
            digests = _copy_and_hash(f, m, algos, out)
            if out is not None:
                extracted[m.name] = out
            if m.name in manifest:
                algo, listed = manifest[m.name]
                if digests[algo] != listed:
                    reasons.append(f"{m.name}: {algo} digest differs from the manifest (damaged or altered)")
        report.checks.append(("manifest digests", "checked"))
    return extracted


def _check_disk(href: str, vmdk: Path, capacity: int, reasons: list[str]) -> None:
    result = run(["qemu-img", "info", "--output=json", "-f", "vmdk", str(vmdk)], check=False)
    if not result.ok:
        reasons.append(f"{href}: qemu-img cannot read it as VMDK: {' '.join(result.tail('stderr', 3))}")
        return
    info = json.loads(result.stdout)
    create_type = info.get("format-specific", {}).get("data", {}).get("create-type")
    if create_type != "streamOptimized":
        reasons.append(f"{href}: VMDK subformat is {create_type!r}, not streamOptimized")
    if info.get("virtual-size") != capacity:
        reasons.append(f"{href}: virtual size {info.get('virtual-size')} differs from the descriptor's "
                       f"capacity {capacity}")


def verify_ova(
    path: Path,
    *,
    boot: bool = True,
    cfg: ApplianceConfig | None = None,
    schema_dir: Path | None = None,
    work_dir: Path | None = None,
    login: BootLogin | None = None,
    http_port: int | None = None,
    http_host: str | None = None,
    boot_timeout: float = 900,
    cpus: int = 2,
    memory_mb: int = 2048,
) -> VerifyReport:
    """Check ``path`` structurally (all failures at once), then boot a copy unless ``boot=False``.

    With ``cfg`` and no ``login``, the boot check's login and HTTP port come from the
    configuration (see :func:`boot_access`), and so do its CPUs (at most the host's) and memory.
    """
    path = Path(path)
    if boot and cfg is not None and login is None:
        login, cfg_http = boot_access(cfg)
        http_port = http_port if http_port is not None else cfg_http
        http_host = http_host or portal_host(cfg)
        boot_timeout = cfg.vm.boot_timeout
        cpus, memory_mb = min(cfg.vm.cpus, os.cpu_count() or 1), cfg.vm.memory_mb
    if not path.is_file():
        raise UsageError(f"no OVA at {str(path)!r}")
    if boot and login is None:
        raise UsageError("the boot check needs a login (user and private key); or skip it with --no-boot")
    report = VerifyReport(path=path)
    reasons: list[str] = []
    with tempfile.TemporaryDirectory(prefix="verify-ova-", dir=work_dir) as tmp:
        work = Path(tmp)
        with log.step(f"check the structure of {path.name}"):
            disks = _check_structure(path, work, report, reasons, schema_dir)
            for href, vmdk in disks.items():
                _check_disk(href, vmdk, report.disks[href], reasons)
            report.checks.append(("disk format and size", "checked"))
        if reasons:
            count = f"{len(reasons)} problem" + ("s" if len(reasons) != 1 else "")
            raise VerifyError(f"{path} failed verification ({count})", reasons)
        log.success(f"{path.name}: structure, manifest, schema and disks are sound")
        if boot:
            assert login is not None
            if len(disks) != 1:
                raise VerifyError(f"{path}: boot check expects one disk, found {len(disks)}")
            with log.step("boot a fresh copy"):
                report.boot = boot_check(next(iter(disks.values())), login=login, http_port=http_port,
                                         http_host=http_host,
                                         timeout=boot_timeout, work_dir=work, cpus=cpus, memory_mb=memory_mb)
            report.checks.append(("boot", "checked"))
    return report


# -- boot check ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SSHLogin:
    """Log in to a booted copy with a user and private key (an unsealed image: the base box's key)."""

    user: str
    key_file: Path


@dataclass(frozen=True)
class ConsoleLogin:
    """Log in as a sealed copy says on its serial console at first boot (docs/first-boot.md).

    The copy prints ``CSGHUB-APPLIANCE-LOGIN user=U password=P`` and one
    ``CSGHUB-APPLIANCE-HOSTKEY TYPE SHA256:...`` line per host key. The verifier checks the
    host key it is offered against those lines before it sends the password.
    """


BootLogin = SSHLogin | ConsoleLogin
_LOGIN_LINE = re.compile(r"^CSGHUB-APPLIANCE-LOGIN user=(\S+) password=(\S+)\s*$", re.M)
_HOSTKEY_LINE = re.compile(r"^CSGHUB-APPLIANCE-HOSTKEY (\S+) (SHA256:\S+)\s*$", re.M)


def console_credentials(text: str) -> tuple[str, str, frozenset[str]] | None:
    """The last login line and every host-key fingerprint a copy printed, or None before first boot is done."""
    matches = list(_LOGIN_LINE.finditer(text))
    if not matches:
        return None
    user, password = matches[-1].group(1), matches[-1].group(2)
    return user, password, frozenset(m.group(2) for m in _HOSTKEY_LINE.finditer(text))


def host_key_fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` form (unpadded base64 of the key blob's SHA-256)."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


class _PasswordShell:
    """A password SSH session to a copy, opened only after its host key matched the console's."""

    def __init__(self, port: int, user: str, password: str, fingerprints: frozenset[str]) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.transport = paramiko.Transport(sock)
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


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _qemu_vm(
    overlay: Path, forwards: dict[int, int], work: Path, cpus: int, memory_mb: int
) -> Iterator[Path]:
    """Start QEMU (TCG, daemonized, stopped by its PID on exit); yields the serial console log."""
    qemu = which("qemu-system-x86_64")
    if qemu is None:
        raise PrerequisiteMissing("qemu-system-x86_64 is not installed",
                                  hint="apt-get install --no-install-recommends qemu-system-x86")
    pidfile, console = work / "qemu.pid", work / "console.log"
    hostfwd = ",".join(f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in forwards.items())
    argv = [
        qemu, "-daemonize", "-pidfile", str(pidfile), "-name", "verify-ova",
        # TCG: hardware KVM hangs guests on these hosts (see DESIGN.md).
        "-machine", "pc,accel=tcg", "-cpu", "max", "-smp", str(cpus), "-m", str(memory_mb),
        "-display", "none", "-serial", f"file:{console}", "-monitor", "none",
        # SATA (AHCI) and an Intel E1000, as the OVA describes: a guest that boots here has the
        # drivers VirtualBox's hardware needs.
        "-device", "ahci,id=ahci",
        "-drive", f"if=none,id=disk0,file={overlay},format=qcow2",
        "-device", "ide-hd,drive=disk0,bus=ahci.0",
        "-netdev", f"user,id=net0,{hostfwd}", "-device", "e1000,netdev=net0",
    ]
    run(argv, timeout=60, hint="QEMU could not start the VM")
    pid = int(pidfile.read_text().strip())
    try:
        yield console
    finally:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)


def _console_tail(console: Path, lines: int = 20) -> str:
    try:
        text = console.read_text(errors="replace")
    except OSError:
        return "(no console output)"
    return "\n".join(f"    {ln}" for ln in text.splitlines()[-lines:])


def boot_check(
    vmdk: Path,
    *,
    login: BootLogin,
    http_port: int | None = None,
    http_host: str | None = None,
    http_path: str = "/",
    ready_command: str = "systemctl is-system-running --wait || true",
    cpus: int = 2,
    memory_mb: int = 2048,
    timeout: float = 900,
    work_dir: Path | None = None,
) -> BootReport:
    """Boot ``vmdk`` through a qcow2 overlay, wait for SSH, log in; check HTTP when ``http_port`` is set.

    ``http_port`` is the guest port (e.g. the CSGHub NodePort); it is forwarded from a free
    loopback port. ``http_host`` is the ``Host`` header to send: CSGHub's gateway routes by
    host name, so a request without the appliance's own name is answered 404. ``vmdk`` is only read.
    """
    if isinstance(login, SSHLogin) and not login.key_file.is_file():
        raise UsageError(f"SSH key {str(login.key_file)!r} does not exist")
    with tempfile.TemporaryDirectory(prefix="boot-check-", dir=work_dir) as tmp:
        work = Path(tmp)
        overlay = work / "overlay.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "vmdk", "-b", str(vmdk.resolve()),
             str(overlay)])
        ssh_port = _free_loopback_port()
        forwards = {ssh_port: 22}
        http_host_port = None
        if http_port is not None:
            http_host_port = _free_loopback_port()
            forwards[http_host_port] = http_port
        started = time.monotonic()
        deadline = started + timeout
        with _qemu_vm(overlay, forwards, work, cpus, memory_mb) as console:
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
                report.http_status = _wait_http(f"http://127.0.0.1:{http_host_port}{http_path}", deadline, http_host)
        return report


def _key_login_check(
    ssh_port: int, login: SSHLogin, console: Path, ready_command: str, deadline: float, started: float
) -> tuple[float, int, str]:
    """Wait until OpenSSH logs in with the key, then run the readiness command."""
    ssh_argv = [
        "ssh", "-i", str(login.key_file), "-p", str(ssh_port),
        "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", f"{login.user}@127.0.0.1",
    ]
    last_error = ""
    while True:
        probe = run([*ssh_argv, "true"], check=False, timeout=60)
        if probe.ok:
            break
        last_error = " ".join(probe.tail("stderr", 2))
        if time.monotonic() > deadline:
            raise VerifyError(
                f"the copy did not accept SSH within {deadline - started:.0f} s",
                [f"last ssh error: {last_error}", "console tail:\n" + _console_tail(console)],
            )
        time.sleep(3)
    seconds = time.monotonic() - started
    log.info(f"SSH answered after {seconds:.0f} s")
    ready = run([*ssh_argv, ready_command], check=False, timeout=max(30.0, deadline - time.monotonic()))
    return seconds, ready.returncode, ready.stdout + ready.stderr


def _console_login_check(
    ssh_port: int, console: Path, ready_command: str, deadline: float, started: float
) -> tuple[float, int, str]:
    """Wait for the copy's login line on its console, log in with that password, run the readiness command."""
    last_error = "no CSGHUB-APPLIANCE-LOGIN line on the serial console yet"
    while True:
        try:
            text = console.read_text(errors="replace")
        except OSError:
            text = ""
        creds = console_credentials(text)
        if creds is not None:
            user, password, fingerprints = creds
            try:
                shell = _PasswordShell(ssh_port, user, password, fingerprints)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                last_error = f"SSH as {user}: {exc or type(exc).__name__}"
            else:
                try:
                    seconds = time.monotonic() - started
                    log.info(f"logged in as {user} with the copy's first-boot password after {seconds:.0f} s")
                    rc, out = shell.run(ready_command, max(30.0, deadline - time.monotonic()))
                    return seconds, rc, out
                finally:
                    shell.close()
        if time.monotonic() > deadline:
            raise VerifyError(
                f"could not log in to the copy within {deadline - started:.0f} s",
                [f"last error: {last_error}", "console tail:\n" + _console_tail(console)],
            )
        time.sleep(3)


def _wait_http(url: str, deadline: float, host: str | None = None) -> int:
    """Poll ``url`` (with ``Host: host``) until it answers 2xx/3xx; a stack still starting answers 404/5xx."""
    last = ""
    headers = {"Host": host} if host else {}
    while time.monotonic() < deadline:
        request = urllib.request.Request(url, headers=headers)  # a loopback URL built here
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:  # redirects are followed
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(max(0.0, min(5.0, deadline - time.monotonic())))
    shown = f"{url} (Host: {host})" if host else url
    raise VerifyError(f"no successful HTTP answer from {shown} before the deadline", [f"last answer: {last}"])


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
    return SSHLogin(user=cfg.ssh.user, key_file=Path(key).expanduser()), http_port


def verify_from_config(
    cfg: ApplianceConfig, path: Path, *, boot: bool = True, ssh_key: str | None = None, http: bool | None = None
) -> VerifyReport:
    """``invoke verify-ova``: :func:`verify_ova` with the access from the configuration, then a summary."""
    login, http_port = boot_access(cfg, ssh_key=ssh_key, http=http) if boot else (None, None)
    report = verify_ova(path, boot=boot, login=login, http_port=http_port, http_host=portal_host(cfg),
                        boot_timeout=cfg.vm.boot_timeout,
                        cpus=min(cfg.vm.cpus, os.cpu_count() or 1), memory_mb=cfg.vm.memory_mb)
    for name, outcome in report.checks:
        log.info(f"{name}: {outcome}")
    if report.boot:
        log.info(f"boot: SSH after {report.boot.seconds_to_ssh:.0f} s; ready: {report.boot.ready_output or '-'}"
                 + (f"; HTTP {report.boot.http_status}" if report.boot.http_status is not None else ""))
    log.success(f"{path} verified")
    return report
