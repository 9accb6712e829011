"""vagrant-libvirt's `ssh -L` port forwards end with the VM: real ssh processes against the loopback sshd.

The forwards are started exactly as vagrant-libvirt starts them (forward_ports.rb: `ssh -n -L
HOST_IP:HOST_PORT:GUEST_IP:GUEST_PORT -N host` with its options) and recorded where it records
them, so ``forwards.clear`` meets the real thing.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sshd_server import SSHServer

from appliance.config import load_config
from appliance.providers.libvirt import forwards
from appliance.providers.libvirt.provider import LibvirtProvider


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _forward(sshd: SSHServer, host_port: int, guest_port: int, log: Path) -> subprocess.Popen[bytes]:
    argv = ["ssh", "-o", f"User={sshd.user}", "-o", f"Port={sshd.port}", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ExitOnForwardFailure=yes", "-o", "ControlMaster=no", "-o", "StrictHostKeyChecking=no",
            "-o", "PasswordAuthentication=no", "-o", "ForwardX11=no", "-o", "IdentitiesOnly=yes",
            "-o", f"IdentityFile=\"{sshd.ed25519_key}\"",
            "-n", "-L", f"127.0.0.1:{host_port}:127.0.0.1:{guest_port}", "-N", "127.0.0.1"]
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)


def test_clear_ends_this_vms_forwards_and_nothing_else(sshd: SSHServer, tmp_path: Path,
                                                        spawned: list[subprocess.Popen[bytes]]) -> None:
    http, git, foreign = _free_port(), _free_port(), _free_port()
    cfg = load_config(None, ["provider=libvirt", f"output.build_dir={tmp_path / 'build'}",
                             f"network.forwarded_ports[0].host={http}", f"network.forwarded_ports[1].host={git}"],
                      cwd=tmp_path)
    project = tmp_path / "build" / "vm"
    pids = forwards.pid_dir(project)
    pids.mkdir(parents=True)
    ours = [_forward(sshd, port, sshd.port, tmp_path / f"fw{port}.log") for port in (http, git)]
    other = _forward(sshd, foreign, sshd.port, tmp_path / "other.log")  # another VM's forward
    decoy = subprocess.Popen(["sleep", "300"])  # a PID reused by something that is not ssh
    spawned.extend([*ours, other, decoy])
    for proc, port in ((ours[0], http), (ours[1], git)):
        (pids / f"ssh_{port}.pid").write_text(f"{proc.pid}\n")
    (pids / f"ssh_{foreign}.pid").write_text(f"{other.pid}\n")  # recorded here, but not a forward of this config
    (pids / "ssh_40000.pid").write_text(f"{decoy.pid}\n")
    deadline = time.monotonic() + 20
    while not all(_listening(p) for p in (http, git, foreign)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_listening(p) for p in (http, git, foreign)), "the real ssh -L forwards did not come up"

    # As the halt stage and `vagrant.halt` ask for it: the libvirt provider's clean-up after a halt.
    LibvirtProvider(cfg).after_halt(project)

    for proc in ours:
        proc.wait(timeout=10)
    assert not _listening(http) and not _listening(git), "the host ports are free again"
    assert other.poll() is None and _listening(foreign), "a forward this config does not own is left alone"
    assert decoy.poll() is None, "a PID that is not an ssh forward is never signalled"
    assert not (pids / f"ssh_{http}.pid").exists() and not (pids / f"ssh_{git}.pid").exists()
    assert forwards.clear(cfg, project) == []


def test_forward_of_reads_vagrant_libvirts_command_line() -> None:
    argv = ["ssh", "-o", "User=vagrant", "-n", "-L", "127.0.0.1:30080:192.168.121.5:30080", "-N", "192.168.121.5"]
    assert forwards.forward_of(argv) == ("127.0.0.1", 30080)
    assert forwards.forward_of(["sudo", *argv]) == ("127.0.0.1", 30080)
    assert forwards.forward_of(["sleep", "-L", "127.0.0.1:1:2:3"]) is None
    assert forwards.forward_of(["ssh", "-N", "host"]) is None
