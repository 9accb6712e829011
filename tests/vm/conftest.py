"""Fixtures for the VM tier: real VMs through Vagrant, vagrant-libvirt and QEMU (TCG here).

Fixtures other VM tests reuse:

``libvirt_env`` (session) -> ``LibvirtEnv``
    A running libvirtd at ``uri`` (``qemu:///system``), the session's own storage pool
    ``pool`` (a dir pool in ``pool_dir`` under /var/tmp) and the name and /24 of an isolated
    management network (``network``, ``network_cidr``) that no other network on the host
    uses. vagrant-libvirt creates that network on ``up`` and removes it on ``destroy``.
    When libvirtd/virtlogd are not running (no systemd here) the fixture starts them with
    ``virtlogd -d`` / ``libvirtd -d`` and pid files of its own and, at the end, stops only
    those PIDs. A daemon that was already running is left alone. At the end it also removes
    whatever a test left behind: domains named ``csghub-vmtest-*``, the network, the pool
    and its directory.
    To let libvirtd start on a host without libvirt-daemon-system (like this one) it first
    creates what that package would: /var/log/libvirt/qemu, the ``libvirt-qemu`` system user
    (libvirtd 9 resolves it even when qemu.conf names another user), and, only when no
    /etc/libvirt/qemu.conf exists, one that runs QEMU as root (removed again at the end).
    The whole tier is skipped, with the reason, when any of vagrant, the vagrant-libvirt
    plugin, libvirtd, virsh, qemu-system-x86_64 or dnsmasq (libvirt networks need it:
    dnsmasq-base) is missing, or when we are not root.

``base_box`` (session) -> ``appliance.basebox.BaseBox``
    ``invoke base-box``'s result: builds the box on the first run on a machine (~2 min),
    reuses the cached one afterwards (~3 s). ``.box_file``, ``.private_key``, ``.name``.

``vm_config`` (function) -> ``make(name, *sets) -> ApplianceConfig``
    Config for a small test VM on the session's pool and network: libvirt, 2 CPUs, 1 GiB,
    8 GB disk, k3s/CSGHub steps skipped, no port forwards, boot timeout 300 s, build dir
    under the test's tmp_path. ``name`` becomes part of ``vm.name`` (``csghub-vmtest-<name>``);
    extra ``--set`` expressions override anything. Boot it with ``appliance.vagrant.up(cfg,
    render_first=True)`` and always ``destroy(cfg)`` in a ``finally`` (the session teardown
    removes leftovers anyway). Boots under TCG take ~40-60 s: keep them few.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig, load_config
from appliance.run import run, which

URI = "qemu:///system"
VM_PREFIX = "csghub-vmtest-"
LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
DAEMON_START_TIMEOUT = 30.0


@dataclass(frozen=True)
class LibvirtEnv:
    """What the session's VM tests share: libvirt's URI, their pool, their management network."""

    uri: str
    pool: str
    pool_dir: Path
    network: str
    network_cidr: str

    def virsh(self, *args: str, check: bool = True) -> str:
        return run(["virsh", "-c", self.uri, *args], check=check, timeout=60).stdout

    def domains(self) -> list[str]:
        return _names(self.virsh("list", "--all", "--name"))

    def volumes(self) -> list[str]:
        out = self.virsh("vol-list", self.pool)
        return [ln.split()[0] for ln in out.splitlines()[2:] if ln.strip()]

    def networks(self) -> list[str]:
        return _names(self.virsh("net-list", "--all", "--name"))


def _names(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _socket_answers(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _missing_prerequisites() -> list[str]:
    missing = [
        f"{prog} ({pkg})"
        for prog, pkg in (
            ("vagrant", "vagrant"), ("virsh", "libvirt-clients"), ("libvirtd", "libvirt-daemon"),
            ("virtlogd", "libvirt-daemon"), ("qemu-system-x86_64", "qemu-system-x86"),
            ("qemu-img", "qemu-utils"), ("dnsmasq", "dnsmasq-base"),
        )
        if which(prog) is None
    ]
    if os.geteuid() != 0:
        missing.append("root (libvirt's system instance and the base-box build need it)")
    if which("vagrant") is not None:
        plugins = run(["vagrant", "plugin", "list"], check=False, timeout=120,
                      env={"VAGRANT_CHECKPOINT_DISABLE": "1"}).stdout
        if "vagrant-libvirt" not in plugins:
            missing.append("the vagrant-libvirt plugin (vagrant-libvirt)")
    return missing


class _Daemons:
    """Starts virtlogd/libvirtd when they are not running, and stops exactly those (by PID)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.started: list[tuple[str, int]] = []
        self.wrote_qemu_conf = False

    def _start(self, program: str, sock: Path) -> None:
        pid_file = self.state_dir / f"{program}.pid"
        run([program, "-d", "--pid-file", str(pid_file)], timeout=DAEMON_START_TIMEOUT)
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while time.monotonic() < deadline:
            if pid_file.exists() and _socket_answers(sock):
                self.started.append((program, int(pid_file.read_text().strip())))
                return
            time.sleep(0.2)
        log_file = Path("/var/log/libvirt") / f"{program}.log"
        tail = log_file.read_text(errors="replace").splitlines()[-5:] if log_file.exists() else []
        pytest.skip(f"{program} did not start within {DAEMON_START_TIMEOUT:.0f} s: " + " | ".join(tail))

    def ensure_running(self) -> None:
        if _socket_answers(LIBVIRT_SOCKET):
            return
        # What libvirt-daemon-system would have set up; libvirtd refuses to start without it.
        Path("/var/log/libvirt/qemu").mkdir(parents=True, exist_ok=True)
        if run(["getent", "passwd", "libvirt-qemu"], check=False).returncode != 0:
            run(["useradd", "--system", "--no-create-home", "--home-dir", "/var/lib/libvirt", "--user-group",
                 "--shell", "/usr/sbin/nologin", "libvirt-qemu"])
        if not QEMU_CONF.exists():
            QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
            QEMU_CONF.write_text(
                "# Written by csghub-appliance's VM test fixture (tests/vm/conftest.py), removed after it.\n"
                'user = "root"\ngroup = "root"\nswtpm_user = "root"\nswtpm_group = "root"\n'
            )
            self.wrote_qemu_conf = True
        if not _socket_answers(VIRTLOGD_SOCKET):
            self._start("virtlogd", VIRTLOGD_SOCKET)
        self._start("libvirtd", LIBVIRT_SOCKET)

    def stop(self) -> None:
        for _program, pid in reversed(self.started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
        if self.wrote_qemu_conf:
            QEMU_CONF.unlink(missing_ok=True)


def _free_network(uri: str) -> str:
    """A /24 in 192.168.200-250 that no host interface and no libvirt network uses."""
    used: list[ipaddress.IPv4Network] = []
    for line in run(["ip", "-o", "-4", "addr", "show"], check=False).stdout.splitlines():
        m = re.search(r"inet (\S+)", line)
        if m:
            used.append(ipaddress.ip_interface(m.group(1)).network)
    for name in _names(run(["virsh", "-c", uri, "net-list", "--all", "--name"], check=False).stdout):
        xml = run(["virsh", "-c", uri, "net-dumpxml", name], check=False).stdout
        for addr, prefix in re.findall(r"<ip address='([0-9.]+)' (?:netmask|prefix)='([0-9.]+)'", xml):
            used.append(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))
    for third in range(200, 251):
        candidate = ipaddress.ip_network(f"192.168.{third}.0/24")
        if not any(candidate.overlaps(u) for u in used):
            return str(candidate)
    pytest.skip("no free 192.168.200-250.0/24 for the test's management network")


def _remove_leftovers(env: LibvirtEnv) -> None:
    for dom in env.domains():
        if dom.startswith(VM_PREFIX):
            env.virsh("destroy", dom, check=False)
            env.virsh("undefine", dom, "--remove-all-storage", "--nvram", check=False)
    if env.network in env.networks():
        env.virsh("net-destroy", env.network, check=False)
        env.virsh("net-undefine", env.network, check=False)
    env.virsh("pool-destroy", env.pool, check=False)
    env.virsh("pool-delete", env.pool, check=False)
    env.virsh("pool-undefine", env.pool, check=False)
    shutil.rmtree(env.pool_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def libvirt_env() -> Iterator[LibvirtEnv]:
    missing = _missing_prerequisites()
    if missing:
        pytest.skip("the VM tier needs " + ", ".join(missing))
    state_dir = Path(tempfile.mkdtemp(prefix="csghub-vmtest-daemons-"))
    daemons = _Daemons(state_dir)
    try:
        daemons.ensure_running()
        token = uuid.uuid4().hex[:6]
        # Under /var/tmp with an open mode: QEMU may run as libvirt-qemu and must reach the images.
        pool_dir = Path(tempfile.mkdtemp(prefix="csghub-vmtest-pool-", dir="/var/tmp"))
        pool_dir.chmod(0o755)
        env = LibvirtEnv(URI, f"csghub-vmtest-{token}", pool_dir, f"csghub-vmtest-{token}", _free_network(URI))
        env.virsh("pool-define-as", env.pool, "dir", "--target", str(pool_dir))
        env.virsh("pool-start", env.pool)
        try:
            yield env
        finally:
            _remove_leftovers(env)
    finally:
        daemons.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def base_box(libvirt_env: LibvirtEnv, tmp_path_factory: pytest.TempPathFactory) -> object:
    from appliance.basebox import build_base_box
    from appliance.errors import PrerequisiteMissing

    cfg = load_config(None, [], "libvirt", cwd=tmp_path_factory.mktemp("basebox"))
    try:
        return build_base_box(cfg)
    except PrerequisiteMissing as exc:
        pytest.skip(f"cannot build the base box here: {exc}")


@pytest.fixture
def vm_config(libvirt_env: LibvirtEnv, tmp_path: Path) -> Callable[..., ApplianceConfig]:
    def make(name: str, *sets: str) -> ApplianceConfig:
        return load_config(
            None,
            [
                f"vm.name={VM_PREFIX}{name}",
                "vm.cpus=2",
                "vm.memory_mb=1024",
                "vm.disk_gb=8",
                "vm.boot_timeout=300",
                "provision.skip={k3s,csghub}",
                "network.forwarded_ports={}",
                f"libvirt.uri={libvirt_env.uri}",
                f"libvirt.storage_pool={libvirt_env.pool}",
                f"libvirt.management_network_name={libvirt_env.network}",
                f"libvirt.management_network_address={libvirt_env.network_cidr}",
                "libvirt.management_network_mode=none",
                f"output.build_dir={tmp_path / 'build'}",
                *sets,
            ],
            "libvirt",
            cwd=tmp_path,
        )

    return make
