"""A real OpenSSH server on a free loopback port (used by the ssh test tier and the benchmarks).

``make_server(dir)`` writes its own sshd_config, host key and authorized test keys
(Ed25519 and RSA) into ``dir``, starts ``/usr/sbin/sshd -D`` on 127.0.0.1, and ``stop()``
ends it by PID. The login user is the current user (root in CI, hence
``PermitRootLogin prohibit-password``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.ssh import RemoteSession, SSHEndpoint

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path, kind: str) -> None:
    args = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"appliance-test-{kind}", "-f", str(path)]
    if kind == "rsa":
        args[4:4] = ["-b", "3072"]
    subprocess.run(args, check=True, stdin=subprocess.DEVNULL)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    for child in _children(pid):
        out.append(child)
        out.extend(_descendants(child))
    return out


@dataclass
class SSHServer:
    """A running sshd and what a client needs to reach it."""

    directory: Path
    port: int
    user: str
    ed25519_key: Path
    rsa_key: Path
    host_key: Path
    process: subprocess.Popen[bytes] | None = None
    log_file: Path = field(init=False)
    _orphans: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log_file = self.directory / "sshd.log"

    @property
    def config_file(self) -> Path:
        return self.directory / "sshd_config"

    @property
    def known_hosts(self) -> Path:
        return self.directory / "known_hosts"

    def endpoint(self, *keys: Path) -> SSHEndpoint:
        return SSHEndpoint("127.0.0.1", self.port, self.user, keys or (self.ed25519_key,))

    def session(self, *keys: Path, known_hosts: Path | None = None, **kwargs: object) -> RemoteSession:
        opts: dict[str, object] = {"connect_timeout": 5, "connect_retries": 2, "retry_delay": (0.1, 0.3)}
        opts.update(kwargs)
        return RemoteSession(self.endpoint(*keys), known_hosts=known_hosts or self.known_hosts, **opts)  # type: ignore[arg-type]

    def write_config(self) -> None:
        authorized = self.directory / "authorized_keys"
        authorized.write_text(
            Path(str(self.ed25519_key) + ".pub").read_text() + Path(str(self.rsa_key) + ".pub").read_text()
        )
        authorized.chmod(0o600)
        self.config_file.write_text(
            "\n".join([
                f"Port {self.port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {self.host_key}",
                f"PidFile {self.directory / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "UseDNS no",
                "MaxStartups 100",
                "MaxSessions 50",
                "LogLevel VERBOSE",
                f"Subsystem sftp {SFTP_SERVER}",
                "",
            ])
        )

    def start(self) -> None:
        assert self.process is None
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege-separation directory sshd insists on
        self.write_config()
        self.process = subprocess.Popen(
            [SSHD, "-D", "-f", str(self.config_file), "-E", str(self.log_file)],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.process.returncode}: {self.log_file.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd did not start listening within 10 s")

    def stop(self) -> None:
        if self.process is None:
            return
        pid = self.process.pid
        for child in reversed(_descendants(pid)):
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._kill_orphans()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def connection_pids(self) -> list[int]:
        """The per-connection sshd children (one per open client connection)."""
        return _children(self.process.pid) if self.process is not None else []

    def drop_connections(self) -> int:
        """Kill every per-connection sshd process: the client sees its connection drop.

        What ran under them (the login shell, the command) loses its connection too and is
        killed a few seconds later, by PID. Not at once: a shell killed while it still reads
        the user's startup files can leave their locks behind (pyenv's rehash lock did).
        """
        victims: list[int] = []
        killed = 0
        for child in self.connection_pids():
            victims.extend(_descendants(child))
            try:
                os.kill(child, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        self._orphans.extend(victims)
        timer = threading.Timer(3.0, self._kill_orphans)
        timer.daemon = True
        timer.start()
        return killed

    def _kill_orphans(self) -> None:
        while self._orphans:
            pid = self._orphans.pop()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def new_host_key(self) -> None:
        """Replace the host key and restart: what a recreated VM on the same address looks like."""
        self.host_key.unlink()
        Path(str(self.host_key) + ".pub").unlink()
        _keygen(self.host_key, "ed25519")
        self.restart()


def make_server(directory: Path) -> SSHServer:
    if not Path(SSHD).exists() or shutil.which("ssh-keygen") is None:
        raise FileNotFoundError("OpenSSH server (openssh-server) is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    for kind in ("ed25519", "rsa"):
        _keygen(directory / f"client_{kind}", kind)
    _keygen(directory / "host_ed25519", "ed25519")
    server = SSHServer(
        directory=directory,
        port=_free_port(),
        user=pwd.getpwuid(os.getuid()).pw_name,
        ed25519_key=directory / "client_ed25519",
        rsa_key=directory / "client_rsa",
        host_key=directory / "host_ed25519",
    )
    server.start()
    return server


