"""Seal and first boot on real VMs: every copy of a sealed image gets its own secrets.

One build VM (the base box's disk, from the ``base_box`` fixture, under a qcow2 overlay, QEMU TCG) runs the provisioning
steps through the real runner (``appliance.steps.provision``) with the k3s/CSGHub steps
skipped; its disk is exported (streamOptimized VMDK, as in the OVA) once before and once
after the ``seal`` step. Two copies of the sealed export then boot, each through its own
qcow2 overlay, with VirtualBox-like hardware (AHCI disk, e1000 NIC, user-mode NAT giving
10.0.2.15):

- copy A boots three times: first boot (with a verifier's boot nonce), then a reboot on which the
  first-boot service must not run, then through the verifier's own boot check with a new nonce,
  which must refuse it (its login line carries the first boot's nonce, not this boot's);
- copy B has its power cut in the middle of first boot (test-only SMBIOS hook, see
  ``test_hook_poweroff_at`` in csghub-firstboot), then boots again and must finish.

Six QEMU boots in all, one after the other (2 cores here), each bounded by a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko
import pytest

from appliance.config import ApplianceConfig, load_config
from appliance.run import run
from appliance.ssh import SSHEndpoint
from appliance.steps import ProvisionReport
from tests.chart import CHART_DIR

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parents[2]
GUEST_CHART = "/var/lib/rancher/k3s/server/static/charts/csghub-2.4.0.tgz"
GUEST_SECRETS = "/var/lib/csghub-appliance/secrets"
BOOT_TIMEOUT = 420  # seconds from QEMU start to the first-boot login line (TCG: ~60-120 s)
POWEROFF_TIMEOUT = 300
MEMORY_MB = 1024
LOGIN_LINE = re.compile(r"CSGHUB-APPLIANCE-LOGIN user=(\S+) password=(\S+)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Qemu:
    """One QEMU TCG guest, started and stopped by its PID; serial console captured to a file."""

    def __init__(self, disk: Path, serial_log: Path, *, virtio: bool, smbios: str | None = None) -> None:
        self.disk, self.serial_log = disk, serial_log
        self.ssh_port = _free_port()
        self.monitor = serial_log.with_suffix(".monitor")
        if virtio:  # the build VM: vagrant-libvirt's hardware, with discard so fstrim reaches the image
            drive = ["-drive", f"file={disk},format=qcow2,if=virtio,discard=unmap"]
            nic = "virtio-net-pci"
        else:  # copies: what VirtualBox gives an imported OVA (SATA disk, Intel PRO/1000)
            drive = ["-device", "ahci,id=ahci", "-drive", f"if=none,id=d0,file={disk},format=qcow2",
                     "-device", "ide-hd,drive=d0,bus=ahci.0"]
            nic = "e1000"
        self.argv = [
            "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-cpu", "max", "-smp", "2", "-m", str(MEMORY_MB),
            "-display", "none", "-serial", f"file:{serial_log}", "-monitor", f"unix:{self.monitor},server,nowait",
            *drive,
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22", "-device", f"{nic},netdev=n0",
        ]
        if smbios:
            self.argv += ["-smbios", f"type=11,value={smbios}"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Qemu:
        with self.serial_log.with_suffix(".qemu.err").open("wb") as err:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        self.started = time.monotonic()
        return self

    def console(self) -> str:
        return self.serial_log.read_text(errors="replace") if self.serial_log.exists() else ""

    def wait_console(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = pattern.search(self.console())
            if m:
                return m
            assert self.proc is not None
            if self.proc.poll() is not None:
                break
            time.sleep(2)
        raise AssertionError(f"no {pattern.pattern!r} on the serial console within {timeout:.0f} s; "
                             f"tail:\n{self.console()[-3000:]}")

    def wait_exit(self, timeout: float) -> float:
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the VM did not power off within {timeout:.0f} s; "
                                 f"tail:\n{self.console()[-3000:]}") from None
        return time.monotonic() - self.started

    def hmp(self, command: str) -> None:
        """A human-monitor command (stop, cont) over the monitor socket."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(self.monitor))
            s.recv(4096)
            s.sendall(command.encode() + b"\n")
            time.sleep(1)
            s.recv(4096)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@contextlib.contextmanager
def booted(qemu: Qemu) -> Iterator[Qemu]:
    qemu.start()
    try:
        yield qemu
    finally:
        qemu.kill()


class _Record(paramiko.MissingHostKeyPolicy):
    """Accept (a fresh copy's key is new by design) and remember the key offered."""

    def __init__(self) -> None:
        self.key: paramiko.PKey | None = None

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.key = key


@dataclass
class Login:
    client: paramiko.SSHClient
    host_key: str
    password: str

    def run(self, command: str, *, sudo: bool = False, check: bool = True) -> str:
        # sudo -S reads the one-time password from stdin: no TTY, as a verifier would do it.
        wire = f"sudo -S -p '' -- sh -c {shlex.quote(command)}" if sudo else command
        stdin, stdout, stderr = self.client.exec_command(wire, timeout=120)
        if sudo:
            stdin.write(self.password + "\n")
            stdin.flush()
        stdin.channel.shutdown_write()
        out = stdout.read().decode(errors="replace")
        err = stderr.read().decode(errors="replace")
        status = stdout.channel.recv_exit_status()
        if check and status != 0:
            raise AssertionError(f"{command!r} failed ({status}): {err or out}")
        return out


def password_login(port: int, user: str, password: str, timeout: float = 120) -> Login:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        policy = _Record()
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(policy)
        try:
            client.connect("127.0.0.1", port=port, username=user, password=password, look_for_keys=False,
                           allow_agent=False, timeout=15, banner_timeout=30, auth_timeout=30)
        except (paramiko.SSHException, OSError) as exc:
            last = exc
            client.close()
            time.sleep(3)
            continue
        assert policy.key is not None
        return Login(client, f"{policy.key.get_name()} {policy.key.get_base64()}", password)
    raise AssertionError(f"no SSH login as {user} within {timeout:.0f} s: {last}")


def key_login_refused(port: int, user: str, key_file: Path) -> str:
    """Try the build's key; return how the copy refused it (raises if it let us in)."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(_Record())
    try:
        client.connect("127.0.0.1", port=port, username=user, key_filename=str(key_file), look_for_keys=False,
                       allow_agent=False, timeout=15, banner_timeout=30, auth_timeout=30)
    except paramiko.AuthenticationException as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    raise AssertionError(f"the build's key still logs in as {user}")


# -- the build -----------------------------------------------------------------------------------


@dataclass
class SealedBuild:
    work: Path
    sealed_vmdk: Path
    unsealed_bytes: int
    sealed_bytes: int
    key: Path
    build_user: str
    build_machine_id: str
    build_host_key: str
    firstboot_rerun_outcome: str
    seal_log: str


@dataclass
class CopyFacts:
    boots: list[str] = field(default_factory=list)  # serial console of each boot
    password: str = ""
    host_key: str = ""
    machine_id: str = ""
    issue: str = ""
    motd: str = ""
    status: str = ""
    shadow_vagrant: str = ""
    leftovers: str = ""
    key_refusals: list[str] = field(default_factory=list)
    second_boot: dict[str, str] = field(default_factory=dict)
    power_cut_exit_seconds: float = 0.0
    reconfigure: list[tuple[str, str, str]] = field(default_factory=list)  # (arguments, output, status after)
    refused_boot: list[str] = field(default_factory=list)  # the verifier's boot check of a later boot: its reasons
    secret_modes: str = ""  # `stat -c '%a %U %n'` of the CSGHub credential files
    secret_sums: str = ""  # `sha256sum` of them
    secrets_env: str = ""
    admin_password: str = ""
    chart_patch: str = ""  # the patched archive's casdoor/secret.yaml


def _test_config(build_dir: Path, key: Path) -> ApplianceConfig:
    return load_config(None, [
        "provision.skip={k3s,csghub}", "vm.cpus=2", f"vm.memory_mb={MEMORY_MB}",
        f"ssh.private_key={key}", f"output.build_dir={build_dir}", "provision.step_timeout=1800",
    ], "libvirt", cwd=build_dir)


def _base_disk(base_box: Any, work: Path) -> tuple[Path, Path, str]:
    """The base box's disk (qcow2, from the box file of the ``base_box`` fixture) and the build's key."""
    disk = work / "base.qcow2"
    with tarfile.open(base_box.box_file) as tar:
        src = tar.extractfile(tar.getmember("box.img"))
        assert src is not None
        with src, disk.open("wb") as dst:
            shutil.copyfileobj(src, dst, 4 * 1024 * 1024)
    return disk, Path(base_box.private_key), load_config(None, [], "libvirt", cwd=work).ssh.user


def _stream_vmdk(source: Path, target: Path, *, force_share: bool) -> int:
    argv = ["qemu-img", "convert", "-f", "qcow2", "-O", "vmdk", "-o", "subformat=streamOptimized"]
    if force_share:  # the VM is paused, not stopped: QEMU still holds the image's lock
        argv.append("-U")
    run([*argv, str(source), str(target)], timeout=900)
    return target.stat().st_size


def build_sealed(base_box: Any, tmp_path_factory: pytest.TempPathFactory) -> SealedBuild:
    """The ``sealed`` fixture's build (tests/vm/conftest.py: once per session, shared with the disk-format boots)."""
    if shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None:
        pytest.skip("QEMU (qemu-system-x86, qemu-utils) is not installed")
    from appliance.steps import Options, provision

    work = tmp_path_factory.mktemp("seal-firstboot")
    base, key, user = _base_disk(base_box, work)
    build_disk = work / "build.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(build_disk)])
    cfg = _test_config(work / "build", key)
    vm = Qemu(build_disk, work / "build-serial.log", virtio=True)
    with booted(vm):
        # The base box's getty on the serial console: it booted (a clear failure if not).
        vm.wait_console(re.compile(r"login: "), BOOT_TIMEOUT)
        endpoint = SSHEndpoint("127.0.0.1", vm.ssh_port, user, (key,))
        # Everything but the seal, through the real runner (00-base if present, firstboot).
        report = provision(cfg, endpoint, Options(skip=("seal",)))
        assert _outcome(report, "firstboot") == "changed"
        # Idempotent: forced again, the step changes nothing.
        again = provision(cfg, endpoint, Options(only="firstboot", force=True))
        login = _key_login(vm.ssh_port, user, key)
        build_machine_id = login.run("cat /etc/machine-id").strip()
        build_host_key = login.host_key
        # Stand-in for the k3s/CSGHub steps (they cannot run here): the real chart archive where the csghub step
        # puts it, in k3s's static directory. First boot then makes every CSGHub credential and patches that
        # archive, exactly as on a full image.
        chart = work / "csghub-2.4.0.tgz"
        with tarfile.open(chart, "w:gz") as tar:
            tar.add(CHART_DIR, arcname="csghub")
        sftp = login.client.open_sftp()
        sftp.put(str(chart), "/var/tmp/csghub-2.4.0.tgz")
        sftp.close()
        login.run(f"sudo install -D -m 0644 /var/tmp/csghub-2.4.0.tgz {GUEST_CHART} && rm /var/tmp/csghub-2.4.0.tgz")
        # What a real build leaves behind besides the base box (00-base, k3s and csghub steps add
        # far more): a package in the download cache and the blocks of a deleted download.
        # Random bytes, so compression cannot hide them: only the seal can.
        login.run("sudo dd if=/dev/urandom of=/var/cache/apt/archives/build-residue_1_all.deb bs=1M count=48 "
                  "status=none && dd if=/dev/urandom of=/var/tmp/build-download bs=1M count=48 status=none "
                  "&& sync && rm /var/tmp/build-download && sync")
        login.client.close()
        # The same VM, unsealed: export its disk while it is paused.
        vm.hmp("stop")
        unsealed = _stream_vmdk(build_disk, work / "unsealed.vmdk", force_share=True)
        vm.hmp("cont")
        report = provision(cfg, endpoint, Options(only="seal"))
        assert _outcome(report, "seal") == "changed"
        # The seal powers the VM off by itself; nobody can log in to do it.
        vm.wait_exit(POWEROFF_TIMEOUT)
    sealed_vmdk = work / "sealed.vmdk"
    sealed_bytes = _stream_vmdk(build_disk, sealed_vmdk, force_share=False)
    seal_log = (work / "build" / "logs" / "90-seal.log")
    return SealedBuild(
        work=work, sealed_vmdk=sealed_vmdk, unsealed_bytes=unsealed, sealed_bytes=sealed_bytes, key=key,
        build_user=user, build_machine_id=build_machine_id, build_host_key=build_host_key,
        firstboot_rerun_outcome=_outcome(again, "firstboot"),
        seal_log=seal_log.read_text() if seal_log.exists() else "",
    )


def _outcome(report: ProvisionReport, step: str) -> str:
    return next(s.outcome for s in report.steps if s.name == step)


def _key_login(port: int, user: str, key: Path) -> Login:
    policy = _Record()
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(policy)
    client.connect("127.0.0.1", port=port, username=user, key_filename=str(key), look_for_keys=False,
                   allow_agent=False, timeout=30)
    assert policy.key is not None
    return Login(client, f"{policy.key.get_name()} {policy.key.get_base64()}", "")


def _overlay(build: SealedBuild, name: str) -> Path:
    disk = build.work / f"{name}.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "vmdk", "-b", str(build.sealed_vmdk), str(disk)])
    return disk


def _first_boot_facts(build: SealedBuild, vm: Qemu, facts: CopyFacts, *, reconfigure: bool = False) -> None:
    m = vm.wait_console(LOGIN_LINE, BOOT_TIMEOUT)
    user, facts.password = m.group(1), m.group(2)
    assert user == "csghub"
    login = password_login(vm.ssh_port, user, facts.password)
    with contextlib.closing(login.client):
        facts.host_key = login.host_key
        facts.machine_id = login.run("cat /etc/machine-id").strip()
        facts.issue = login.run("cat /etc/issue", sudo=True)
        facts.motd = login.run("cat /etc/motd")
        facts.status = login.run("csghub-status", sudo=True)
        facts.shadow_vagrant = login.run(f"passwd -S {build.build_user}", sudo=True)
        facts.leftovers = login.run(
            "ls -d /home/*/.ssh/authorized_keys /root/.ssh/authorized_keys /var/tmp/csghub-provision "
            "/etc/ssh/sshd_config.d/*vagrant* 2>/dev/null; true", sudo=True)
        for user_ in (build.build_user, "csghub"):
            facts.key_refusals.append(key_login_refused(vm.ssh_port, user_, build.key))
        files = f"{GUEST_SECRETS}/*"
        facts.secret_modes = login.run(f"stat -c '%a %U %n' {GUEST_SECRETS} {files}", sudo=True)
        facts.secret_sums = login.run(f"sha256sum {files}", sudo=True)
        facts.secrets_env = login.run(f"cat {GUEST_SECRETS}/secrets.env", sudo=True)
        facts.admin_password = login.run("csghub-status --admin-password", sudo=True).strip()
        facts.chart_patch = login.run(f"tar -xzOf {GUEST_CHART} csghub/templates/casdoor/secret.yaml", sudo=True)
        if reconfigure:
            # The owner pins a direct address (as after adding a bridged adapter), runs it again,
            # then goes back to automatic detection.
            for step in ("--mode address --address 10.0.2.15", "--mode address --address 10.0.2.15",
                         "--mode auto"):
                out = login.run(f"csghub-reconfigure {step}", sudo=True)
                facts.reconfigure.append((step, out, login.run("csghub-status", sudo=True)))
        login.run("systemctl poweroff", sudo=True, check=False)
    vm.wait_exit(POWEROFF_TIMEOUT)


FIRST_NONCE, LATER_NONCE = "1" * 32, "2" * 32  # boot nonces, as the verifier passes them (SMBIOS OEM string)


@pytest.fixture(scope="module")
def copy_a(sealed: SealedBuild) -> CopyFacts:
    from appliance.errors import VerifyError
    from appliance.verify_boot import NONCE_OEM_KEY, ConsoleLogin, boot_check

    facts = CopyFacts()
    disk = _overlay(sealed, "copy-a")
    first = Qemu(disk, sealed.work / "copy-a-boot1.log", virtio=False, smbios=f"{NONCE_OEM_KEY}={FIRST_NONCE}")
    with booted(first):
        _first_boot_facts(sealed, first, facts, reconfigure=True)
    facts.boots.append(first.console())
    second = Qemu(disk, sealed.work / "copy-a-boot2.log", virtio=False)
    with booted(second):
        m = second.wait_console(LOGIN_LINE, BOOT_TIMEOUT)
        login = password_login(second.ssh_port, m.group(1), m.group(2))
        with contextlib.closing(login.client):
            facts.second_boot = {
                "password": m.group(2),
                "host_key": login.host_key,
                "machine_id": login.run("cat /etc/machine-id").strip(),
                "condition": login.run("systemctl show -p ConditionResult -p ExecMainStartTimestamp "
                                       "csghub-firstboot.service", sudo=True),
                "journal": login.run("journalctl -b -u csghub-firstboot.service --no-pager -o cat", sudo=True),
            }
            login.run("systemctl poweroff", sudo=True, check=False)
        second.wait_exit(POWEROFF_TIMEOUT)
    facts.boots.append(second.console())
    # What the verifier sees of an image whose first boot already ran (a sealed build VM booted again): refused.
    try:
        boot_check(sealed.sealed_vmdk, login=ConsoleLogin(), overlay=disk, timeout=BOOT_TIMEOUT, memory_mb=MEMORY_MB,
                   work_dir=sealed.work, nonce=LATER_NONCE, driver="qemu")
    except VerifyError as err:
        facts.refused_boot = [err.message, *err.reasons]
    return facts


@pytest.fixture(scope="module")
def copy_b(sealed: SealedBuild, copy_a: CopyFacts) -> CopyFacts:
    facts = CopyFacts()
    disk = _overlay(sealed, "copy-b")
    # TEST-ONLY: the SMBIOS OEM string makes csghub-firstboot cut the power after the secrets.
    cut = Qemu(disk, sealed.work / "copy-b-boot1.log", virtio=False,
               smbios="csghub-appliance-test-poweroff-at=after-secrets")
    with booted(cut):
        facts.power_cut_exit_seconds = cut.wait_exit(BOOT_TIMEOUT)
    facts.boots.append(cut.console())
    second = Qemu(disk, sealed.work / "copy-b-boot2.log", virtio=False)
    with booted(second):
        _first_boot_facts(sealed, second, facts)
    facts.boots.append(second.console())
    return facts


# -- what must hold ------------------------------------------------------------------------------


def test_firstboot_step_is_idempotent(sealed: SealedBuild) -> None:
    assert sealed.firstboot_rerun_outcome == "no changes"


def test_sealed_export_is_smaller(sealed: SealedBuild, record_property: pytest.RecordProperty) -> None:
    record_property("unsealed_vmdk_bytes", sealed.unsealed_bytes)
    record_property("sealed_vmdk_bytes", sealed.sealed_bytes)
    print(f"\nexported disk (streamOptimized VMDK): unsealed {sealed.unsealed_bytes / 2**20:.1f} MiB, "
          f"sealed {sealed.sealed_bytes / 2**20:.1f} MiB")
    assert sealed.sealed_bytes < sealed.unsealed_bytes
    # Most of the residue (96 MiB of random bytes) is gone, not merely compressed.
    assert sealed.unsealed_bytes - sealed.sealed_bytes > 64 * 2**20


def test_seal_reports_what_it_did(sealed: SealedBuild) -> None:
    log = sealed.seal_log
    assert "ok: k3s not installed (stack steps skipped); no cluster state to reset" in log
    assert "changed: removed /etc/ssh/ssh_host_ed25519_key" in log
    assert "changed: emptied /etc/machine-id" in log
    assert re.search(r"changed: removed /home/\S+/\.ssh/authorized_keys", log)
    assert "changed: emptied the package cache (apt-get clean)" in log
    assert "trimmed (fstrim)" in log or "changed: zeroed the free space of /" in log
    assert "powers off" in log


def test_copies_have_their_own_secrets(sealed: SealedBuild, copy_a: CopyFacts, copy_b: CopyFacts) -> None:
    assert copy_a.host_key != copy_b.host_key
    assert sealed.build_host_key not in (copy_a.host_key, copy_b.host_key)
    assert re.fullmatch(r"[0-9a-f]{32}", copy_a.machine_id) and re.fullmatch(r"[0-9a-f]{32}", copy_b.machine_id)
    assert len({copy_a.machine_id, copy_b.machine_id, sealed.build_machine_id}) == 3
    assert copy_a.password and copy_b.password and copy_a.password != copy_b.password


def test_build_key_no_longer_works(copy_a: CopyFacts) -> None:
    assert len(copy_a.key_refusals) == 2  # the build user and csghub both refuse the key
    assert copy_a.leftovers.strip() == ""
    # The build user's password is locked ("L"), csghub is the way in.
    assert copy_a.shadow_vagrant.split()[1] == "L"


def test_banner_shows_url_status_and_login(copy_a: CopyFacts) -> None:
    for text in (copy_a.issue, copy_a.status):
        assert "CSGHub appliance" in text
        assert "CSGHub stack not installed in this image" in text
        assert "Network: nat, VM address 10.0.2.15" in text
        assert "http://csghub.localhost:30080" in text
        assert "user csghub" in text and copy_a.password in text
    # The motd is world-readable: no password there.
    assert "http://csghub.localhost:30080" in copy_a.motd and copy_a.password not in copy_a.motd
    assert "CSGHUB-APPLIANCE-STATUS stack=absent mode=nat url=http://csghub.localhost:30080" in copy_a.boots[0]


def test_first_boot_runs_once(copy_a: CopyFacts) -> None:
    first, second = copy_a.boots
    assert "CSGHUB-APPLIANCE-FIRSTBOOT started" in first and "CSGHUB-APPLIANCE-FIRSTBOOT finished" in first
    assert "CSGHUB-APPLIANCE-FIRSTBOOT" not in second
    facts = copy_a.second_boot
    assert "ConditionResult=no" in facts["condition"]
    assert "making this copy's own keys" not in facts["journal"]
    assert (facts["password"], facts["host_key"], facts["machine_id"]) == (
        copy_a.password, copy_a.host_key, copy_a.machine_id)


def test_a_later_boot_fails_the_verifiers_first_boot_proof(copy_a: CopyFacts) -> None:
    first, second = copy_a.boots
    assert f"firstboot={FIRST_NONCE}" in first  # the first boot recorded the nonce of the boot that ran it
    assert f"firstboot={FIRST_NONCE}" in second  # and a later boot still shows that one
    assert copy_a.refused_boot, "the verifier accepted a copy whose first boot had already run"
    assert "first boot already ran before this boot" in copy_a.refused_boot[0]
    assert f"first-boot nonce {FIRST_NONCE!r}, not this boot's {LATER_NONCE!r}" in copy_a.refused_boot[1]


def test_power_cut_mid_first_boot_is_finished_next_boot(copy_b: CopyFacts) -> None:
    cut, resumed = copy_b.boots
    assert "CSGHUB-APPLIANCE-FIRSTBOOT test-poweroff at=after-secrets" in cut
    assert "CSGHUB-APPLIANCE-FIRSTBOOT finished" not in cut and "CSGHUB-APPLIANCE-LOGIN" not in cut
    assert "CSGHUB-APPLIANCE-FIRSTBOOT started" in resumed and "CSGHUB-APPLIANCE-FIRSTBOOT finished" in resumed
    assert copy_b.password and "http://csghub.localhost:30080" in copy_b.issue


def test_reconfigure_follows_a_pinned_address_and_back(copy_a: CopyFacts) -> None:
    (_, out1, status1), (_, out2, _), (_, out3, status3) = copy_a.reconfigure
    assert "changed: access mode pinned to address (10.0.2.15)" in out1
    assert "domain csghub.10.0.2.15.nip.io" in out1
    assert "http://csghub.10.0.2.15.nip.io:30080" in status1 and "Network: address, VM address 10.0.2.15" in status1
    assert "changed:" not in out2  # the same request twice: nothing to do
    assert "changed: access mode pinned to auto" in out3
    assert "changed: access mode nat, address 10.0.2.15, domain csghub.localhost" in out3
    assert "http://csghub.localhost:30080" in status3


def _secret_values(env_text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in env_text.splitlines() if line and not line.startswith("#"))


def test_copies_have_their_own_csghub_credentials(copy_a: CopyFacts, copy_b: CopyFacts) -> None:
    sums = []
    for facts in (copy_a, copy_b):
        modes = [line.split(" ", 2) for line in facts.secret_modes.splitlines()]
        assert modes[0] == ["700", "root", GUEST_SECRETS]
        assert len(modes) == 8  # the folder, secrets.env, helm-values.yaml, two key pairs, precreated.yaml
        for mode, owner, path in modes[1:]:
            assert (mode, owner) == ("600", "root"), path
        sums.append({path: digest for digest, path in (line.split() for line in facts.secret_sums.splitlines())})
        # The admin password csghub-status shows is this copy's own (24 characters from /dev/urandom).
        assert facts.admin_password == _secret_values(facts.secrets_env)["CSGHUB_ADMIN_PASSWORD"]
        assert re.fullmatch(r"[A-Za-z0-9]{24}", facts.admin_password)
        # The chart in the image now signs with this copy's Casdoor key, not its fixed one.
        assert "applianceCerts" in facts.chart_patch and "LS0tLS1CRUdJTi" not in facts.chart_patch
    a, b = sums
    assert sorted(a) == sorted(b) and len(a) == 7
    for path in a:
        assert a[path] != b[path], path
    env_a, env_b = _secret_values(copy_a.secrets_env), _secret_values(copy_b.secrets_env)
    assert len(env_a) == 21 and "GITALY_JWT_SECRET" in env_a  # the internal-API key too (chart: "signing-key")
    for name, value in env_a.items():
        assert value != env_b[name], name


# -- the exported disk, read offline ---------------------------------------------------------------------------------


@dataclass
class OfflineDisk:
    """The sealed export's root filesystem, read with debugfs (read-only, never mounted) from a raw conversion."""

    raw: Path
    offset: int

    def debugfs(self, command: str) -> str:
        proc = subprocess.run(["debugfs", "-R", command, f"{self.raw}?offset={self.offset}"],
                              capture_output=True, text=True, timeout=300, check=False)
        return proc.stdout + proc.stderr

    def entries(self, path: str) -> list[tuple[str, int, int]]:
        """(name, mode, size) of each entry of directory ``path`` (`ls -p`: /inode/mode/uid/gid/name/size/)."""
        out = []
        for line in self.debugfs(f"ls -p {path}").splitlines():
            parts = line.split("/")
            if len(parts) >= 8 and parts[5] not in (".", "..", ""):
                out.append((parts[5], int(parts[2], 8), int(parts[6] or 0)))
        return out

    def exists(self, path: str) -> bool:
        return "File not found" not in self.debugfs(f"stat {path}")

    def files_under(self, path: str) -> list[tuple[str, int]]:
        """Every regular file below ``path``, with its size."""
        found = []
        for name, mode, size in self.entries(path):
            full = f"{path.rstrip('/')}/{name}"
            if mode & 0o170000 == 0o040000:
                found += self.files_under(full)
            elif mode & 0o170000 == 0o100000:
                found.append((full, size))
        return found


@pytest.fixture(scope="module")
def offline_disk(sealed: SealedBuild) -> OfflineDisk:
    if shutil.which("debugfs") is None:
        pytest.skip("debugfs (e2fsprogs) is not installed")
    raw = sealed.work / "sealed-offline.raw"
    # Read-only use of the export: qemu-img reads the VMDK, the raw copy is what debugfs opens (read-only too).
    run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", str(sealed.sealed_vmdk), str(raw)], timeout=900)
    with raw.open("rb") as f:
        mbr = f.read(512)
    assert mbr[510:512] == b"\x55\xaa", "no MBR on the exported disk"
    start_sector = int.from_bytes(mbr[446 + 8:446 + 12], "little")
    disk = OfflineDisk(raw, start_sector * 512)
    assert disk.exists("/etc/os-release"), disk.debugfs("stats")[:400]
    return disk


def test_exported_disk_has_no_seed_journal_or_logs(offline_disk: OfflineDisk, sealed: SealedBuild) -> None:
    # No random seed for systemd to credit at early boot (the same in every copy otherwise).
    assert not offline_disk.exists("/var/lib/systemd/random-seed")
    assert not offline_disk.exists("/var/lib/systemd/credential.secret")
    # The journal folder is empty: nothing of the build's, and no folder named after its machine-id.
    assert offline_disk.entries("/var/log/journal") == []
    assert not offline_disk.exists(f"/var/log/journal/{sealed.build_machine_id}")
    assert "Size: 0" in offline_disk.debugfs("stat /etc/machine-id")
    assert not offline_disk.exists("/var/lib/dbus/machine-id")
    written = [(path, size) for path, size in offline_disk.files_under("/var/log") if size > 0]
    assert written == [], written


def test_exported_disk_has_no_logins_keys_or_leases(offline_disk: OfflineDisk, sealed: SealedBuild) -> None:
    homes = ["/root"] + [f"/home/{name}" for name, _, _ in offline_disk.entries("/home")]
    assert f"/home/{sealed.build_user}" in homes
    for home in homes:
        names = {name for name, _, _ in offline_disk.entries(home)}
        assert not names & {".bash_history", ".lesshst", ".viminfo", ".python_history"}, home
        ssh = {name for name, _, _ in offline_disk.entries(f"{home}/.ssh")}
        assert not ssh & {"authorized_keys", "authorized_keys2"}, home
    assert [n for n, _, _ in offline_disk.entries("/etc/ssh") if n.startswith("ssh_host_")] == []
    assert [n for n, _, _ in offline_disk.entries("/var/lib/dhcp") if n.endswith(".leases")] == []
    assert offline_disk.entries("/var/lib/systemd/network") == []
    # No sudo rule for the (locked) build user, anywhere.
    for name, _, _ in offline_disk.entries("/etc/sudoers.d"):
        text = offline_disk.debugfs(f"cat /etc/sudoers.d/{name}")
        assert not re.search(rf"^\s*{sealed.build_user}\s", text, re.M), name
    assert not re.search(rf"^\s*{sealed.build_user}\s", offline_disk.debugfs("cat /etc/sudoers"), re.M)
    # No first-boot state: every copy makes its own.
    assert offline_disk.entries("/var/lib/csghub-appliance") == []
    assert not offline_disk.exists("/var/lib/rancher/k3s/server/manifests/csghub-appliance-secrets.yaml")
