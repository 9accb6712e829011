"""Fixtures for the VM tier: real VMs through Vagrant, vagrant-libvirt and QEMU (TCG here).

Fixtures other VM tests reuse:

``libvirt_env`` (session) -> ``LibvirtEnv``
    A running libvirtd at ``uri`` (``qemu:///system``), the session's own storage pool
    ``pool`` (a dir pool in ``pool_dir`` under /var/tmp) and the name and /24 of an isolated
    management network (``network``, ``network_cidr``) that no other network on the host
    uses. vagrant-libvirt creates that network on ``up`` and removes it on ``destroy``.
    When libvirtd/virtlogd are not running (no systemd here) the fixture starts them with
    ``virtlogd -d`` / ``libvirtd -d`` and pid files of its own, and only those PIDs are ever
    stopped: by the last pytest session using them (sessions register in /run/csghub-vmtest,
    so parallel test runs on one host do not pull libvirtd from under each other). A daemon
    that was already running is left alone. At the end the fixture also removes whatever
    this session's tests left behind: domains named ``<vm_prefix>*``, the network, the pool
    and its directory.
    To let libvirtd start on a host without libvirt-daemon-system (like this one) it first
    runs the product's own one-time preparation (``appliance.providers.libvirt.libvirtd.prepare_host``, what
    that package would make: /var/log/libvirt/qemu, the ``libvirt-qemu`` system user, which
    libvirtd 9 resolves even when qemu.conf names another user), and, only when no
    /etc/libvirt/qemu.conf exists, writes one that runs QEMU as root (removed again at the end).
    The whole tier is skipped, with the reason, when any of vagrant, the vagrant-libvirt
    plugin, libvirtd, virsh, qemu-system-x86_64 or dnsmasq (libvirt networks need it:
    dnsmasq-base) is missing, or when we are not root.

``base_box`` (session) -> ``appliance.basebox.BaseBox``
    ``invoke base-box``'s result: builds the box on the first run on a machine (~2 min),
    reuses the cached one afterwards (~3 s). ``.box_file``, ``.private_key``, ``.name``.
    On a machine whose cache holds no box and no key yet (CI's), a box that
    ``test_build_ova`` already built from nothing this session (offered through
    ``base_box_donors``) is copied in with its key first: the same inputs, so the same box, and
    the box is built once per CI run instead of twice.

``vm_config`` (function) -> ``make(name, *sets) -> ApplianceConfig``
    Config for a small test VM on the session's pool and network: libvirt, 2 CPUs, 1 GiB,
    8 GB disk, k3s/CSGHub steps skipped, no port forwards, boot timeout 300 s, build dir
    under the test's tmp_path. ``name`` becomes part of ``vm.name``
    (``csghub-vmtest-<session token>-<name>``, so parallel sessions never collide; use
    ``appliance.providers.libvirt.provider.domain_name(cfg)`` for the libvirt domain);
    extra ``--set`` expressions override anything. Boot it with ``appliance.vm.up(cfg,
    provider_for(cfg), render_first=True)`` and always ``vm.destroy(cfg, provider_for(cfg))`` in a
    ``finally`` (the session teardown
    removes leftovers anyway). Boots under TCG take ~40-60 s: keep them few.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.config import ApplianceConfig, load_config
from appliance.providers.libvirt.libvirtd import LIBVIRT_SOCKET, VIRTLOGD_SOCKET, socket_answers
from appliance.providers.registry import provider_for
from appliance.run import run, which

URI = "qemu:///system"
VM_PREFIX = "csghub-vmtest-"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
DAEMON_START_TIMEOUT = 30.0
# Shared by every pytest session on this host: who uses the daemons, who started them.
SHARED_STATE = Path("/run/csghub-vmtest")


@dataclass(frozen=True)
class LibvirtEnv:
    """What the session's VM tests share: libvirt's URI, their pool, their management network."""

    uri: str
    pool: str
    pool_dir: Path
    network: str
    network_cidr: str
    vm_prefix: str
    daemons: _Daemons | None = None

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
    """Starts virtlogd/libvirtd when they are not running; the last session using them stops them.

    State shared between pytest sessions lives in ``SHARED_STATE`` under a lock:
    ``sessions/<pid>`` (one file per live session, holding its management network's CIDR)
    and ``daemons.json`` (the PIDs a fixture started, and whether it wrote qemu.conf).
    """

    def __init__(self) -> None:
        SHARED_STATE.mkdir(parents=True, exist_ok=True)
        (SHARED_STATE / "sessions").mkdir(exist_ok=True)
        self.me = SHARED_STATE / "sessions" / str(os.getpid())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (SHARED_STATE / "lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _live_sessions(self) -> list[Path]:
        live = []
        for f in (SHARED_STATE / "sessions").iterdir():
            if f.name.isdigit() and Path(f"/proc/{f.name}").exists():
                live.append(f)
            else:
                f.unlink(missing_ok=True)
        return live

    def claim_network(self, choose: Callable[[list[str]], str]) -> str:
        """Pick a management network CIDR no other live session holds, and hold it."""
        with self._locked():
            reserved = [t for f in self._live_sessions() if f != self.me and (t := f.read_text().strip())]
            cidr = choose(reserved)
            self.me.write_text(cidr)
            return cidr

    def _start(self, program: str, sock: Path, started: list[list[object]]) -> None:
        from appliance.errors import PrerequisiteMissing
        from appliance.providers.libvirt.libvirtd import start_daemon

        try:
            started.append([program, start_daemon(program, sock, SHARED_STATE / f"{program}.pid",
                                                  DAEMON_START_TIMEOUT)])
        except PrerequisiteMissing as exc:
            pytest.skip(exc.message)

    def ensure_running(self) -> None:
        with self._locked():
            self.me.write_text("")
            if socket_answers(LIBVIRT_SOCKET):
                return
            state: dict[str, object] = {"started": [], "wrote_qemu_conf": False}
            # What libvirt-daemon-system would have set up (the product's own one-time preparation,
            # as `up` does it); libvirtd refuses to start without it.
            from appliance.providers.libvirt.libvirtd import prepare_host

            prepare_host()
            if not QEMU_CONF.exists():
                QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
                QEMU_CONF.write_text(
                    "# Written by csghub-appliance's VM test fixture (tests/vm/conftest.py), removed after it.\n"
                    'user = "root"\ngroup = "root"\nswtpm_user = "root"\nswtpm_group = "root"\n'
                )
                state["wrote_qemu_conf"] = True
            started: list[list[object]] = []
            state["started"] = started
            try:
                if not socket_answers(VIRTLOGD_SOCKET):
                    self._start("virtlogd", VIRTLOGD_SOCKET, started)
                self._start("libvirtd", LIBVIRT_SOCKET, started)
            finally:
                (SHARED_STATE / "daemons.json").write_text(json.dumps(state))

    def stop_for_the_product(self) -> str:
        """Stop the daemons so that the product starts them itself (a test "from nothing"); "" when done, else why
        not. Only daemons a VM-test fixture started, and only while no other session uses them."""
        with self._locked():
            others = [f.name for f in self._live_sessions() if f != self.me]
            if others:
                return f"another pytest session (PID {', '.join(others)}) uses libvirtd"
            state_file = SHARED_STATE / "daemons.json"
            state = json.loads(state_file.read_text()) if state_file.exists() else {}
            if not state.get("started"):
                return "libvirtd was not started by a VM-test fixture: it is someone else's to stop"
            for _program, pid in reversed(state["started"]):
                _stop_pid(int(pid))
            state["started"] = []
            state_file.write_text(json.dumps(state))
            return ""

    def adopt(self, started: list[list[object]]) -> None:
        """Record daemons the product started (``[[program, pid], ...]``) as started for the tests: the last
        session out stops them, as it stops the fixture's own."""
        with self._locked():
            state_file = SHARED_STATE / "daemons.json"
            state = json.loads(state_file.read_text()) if state_file.exists() else {"wrote_qemu_conf": False}
            state["started"] = list(state.get("started", [])) + started
            state_file.write_text(json.dumps(state))

    def release(self) -> None:
        """Unregister; the last live session stops the daemons a fixture started (by PID)."""
        with self._locked():
            self.me.unlink(missing_ok=True)
            state_file = SHARED_STATE / "daemons.json"
            if self._live_sessions() or not state_file.exists():
                return
            state = json.loads(state_file.read_text())
            for _program, pid in reversed(state.get("started", [])):
                _stop_pid(int(pid))
            if state.get("wrote_qemu_conf"):
                QEMU_CONF.unlink(missing_ok=True)
            state_file.unlink()


def _stop_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def _free_network(uri: str, reserved: list[str]) -> str:
    """A /24 in 192.168.200-250 that no host interface, libvirt network or other test session uses."""
    used: list[ipaddress.IPv4Network] = [ipaddress.ip_network(r) for r in reserved]
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
        if dom.startswith(env.vm_prefix):
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
    daemons = _Daemons()
    try:
        daemons.ensure_running()
        token = uuid.uuid4().hex[:6]
        # Under /var/tmp with an open mode: QEMU may run as libvirt-qemu and must reach the images.
        pool_dir = Path(tempfile.mkdtemp(prefix="csghub-vmtest-pool-", dir="/var/tmp"))
        pool_dir.chmod(0o755)
        cidr = daemons.claim_network(lambda reserved: _free_network(URI, reserved))
        env = LibvirtEnv(URI, f"csghub-vmtest-{token}", pool_dir, f"csghub-vmtest-{token}", cidr,
                         f"{VM_PREFIX}{token}-", daemons)
        env.virsh("pool-define-as", env.pool, "dir", "--target", str(pool_dir))
        env.virsh("pool-start", env.pool)
        try:
            yield env
        finally:
            _remove_leftovers(env)
    finally:
        daemons.release()


BOX_PROVIDER = "libvirt"  # the VM tier's boxes: basebox.py keeps each under its provider's name


@pytest.fixture(scope="session")
def base_box_donors() -> list[Path]:
    """Base-box cache folders (``$XDG_CACHE_HOME/csghub-appliance/basebox``) that tests of this session built
    from nothing; ``base_box`` may take its box from one of them instead of building it a second time."""
    return []


def _take_donated_box(donors: list[Path], cache: Path) -> None:
    """Copy a donor's libvirt box, its info and its key into ``cache`` when ``cache`` has neither box nor key.

    The key is an input of the box (its digest names the box file), so the pair is taken whole or not at all;
    ``build_base_box`` then finds the box for its inputs and only adds it to Vagrant, as on any later run.
    """
    from appliance.basebox import KEY_NAME

    cache.mkdir(parents=True, exist_ok=True)
    with (cache / "build.lock").open("w") as lock:  # build_base_box's lock: no build of this cache meanwhile
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cache / "keys" / KEY_NAME).exists() and not any((cache / BOX_PROVIDER).glob("*.box")):
            _copy_first_whole_box(donors, cache)


def _copy_first_whole_box(donors: list[Path], cache: Path) -> None:
    from appliance.basebox import KEY_NAME

    for donor in donors:
        key = donor / "keys" / KEY_NAME
        boxes = sorted((donor / BOX_PROVIDER).glob("*.box"))
        if not (key.is_file() and key.with_suffix(".pub").is_file() and len(boxes) == 1
                and boxes[0].with_suffix(".json").is_file()):
            continue
        (cache / BOX_PROVIDER).mkdir(parents=True, exist_ok=True)
        for box_part in (boxes[0], boxes[0].with_suffix(".json")):
            shutil.copy2(box_part, cache / BOX_PROVIDER / box_part.name)
        shutil.copytree(donor / "keys", cache / "keys")
        return


@pytest.fixture(scope="session")
def base_box(libvirt_env: LibvirtEnv, base_box_donors: list[Path], tmp_path_factory: pytest.TempPathFactory) -> object:
    from appliance.basebox import build_base_box, cache_dir
    from appliance.errors import PrerequisiteMissing

    cfg = load_config(None, [], "libvirt", cwd=tmp_path_factory.mktemp("basebox"))
    _take_donated_box(base_box_donors, cache_dir())
    try:
        return build_base_box(cfg, provider_for(cfg))
    except PrerequisiteMissing as exc:
        pytest.skip(f"cannot build the base box here: {exc}")


@pytest.fixture(scope="session")
def sealed(base_box: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One sealed build VM per session (tests/vm/test_seal_firstboot.py builds it): its copies boot in
    test_seal_firstboot, and its disk is published as each disk format in test_disk_formats_boot."""
    from tests.vm.test_seal_firstboot import build_sealed

    return build_sealed(base_box, tmp_path_factory)


@pytest.fixture
def vm_config(libvirt_env: LibvirtEnv, tmp_path: Path) -> Callable[..., ApplianceConfig]:
    def make(name: str, *sets: str) -> ApplianceConfig:
        return load_config(
            None,
            [
                f"vm.name={libvirt_env.vm_prefix}{name}",
                "vm.cpus=2",
                "vm.memory_mb=1024",
                "vm.disk_gb=8",
                "vm.boot_timeout=300",
                "vm.verify_timeout=600",  # a copy without the stack boots in about a minute; fail fast
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
