"""A remote session on the guest over SSH (Paramiko), shaped like Fabric's ``Connection``.

- Connects lazily, on first use, with bounded retries and random jitter while the guest
  boots (or reboots). Keepalives are on: Paramiko leaves them off by default.
- Host keys live in a known_hosts file of this build (``build/known_hosts``), not the
  user's. The first key a VM shows is recorded; a different key on a later connect is
  refused with a message saying why and how to fix it. The VM lifecycle calls
  :func:`forget_host_key` after it creates or destroys the VM.
- ``run()`` never allocates a PTY, passes environment variables as shell-quoted exports,
  drains stdout and stderr line by line before reading the exit status, enforces a
  per-command timeout on the guest (and on the host as a backstop), and raises
  ``RemoteCommandFailed`` unless ``check=False``.
- Low-level failures (authentication, host key, refused, timeout, dropped connection)
  become ``RemoteError`` messages a person can act on.
"""

from __future__ import annotations

import codecs
import logging
import os
import random
import re
import secrets
import select
import shlex
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import paramiko

from appliance.errors import ConnectionLost, RemoteCommandFailed, RemoteError
from appliance.log import log

if TYPE_CHECKING:  # pragma: no cover
    from appliance.config import ApplianceConfig

TAIL_LINES = 30
# Bigger windows and packets than Paramiko's defaults: uploads of multi-GiB bundles are
# bound by round trips and per-packet overhead, not by the cipher.
WINDOW_SIZE = 64 * 1024 * 1024
MAX_PACKET_SIZE = 256 * 1024
# Seconds the host waits past a command's own timeout before it gives up on the channel.
TIMEOUT_GRACE = 15
# `timeout` on the guest sends TERM, then KILL this many seconds later.
KILL_AFTER = 10
# AES-GCM first: one pass for encryption and integrity (AES-NI through `cryptography`),
# where Paramiko's default (aes128-ctr + HMAC) costs a second pass per packet.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
# Seconds an SFTP request may wait for the guest's answer: a dead link or a wedged server ends
# an upload (and the close that waits for pipelined acknowledgements) instead of hanging it.
SFTP_IDLE_TIMEOUT = 120
# Seconds a stopped step's processes get between TERM and KILL.
STOP_GRACE = 5
# The variable that marks every process of one grouped run (see ``wrap_command``).
GROUP_TOKEN_VAR = "CSGHUB_APPLIANCE_RUN"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
REBOOT_COMMAND = "systemctl reboot || reboot"

LineHandler = Callable[[str, str], None]


@dataclass(frozen=True)
class RunGroup:
    """Where a grouped run records its process group, and the token its processes carry."""

    pid_file: str
    token: str


# Shell function: the PIDs of the run's session ($sid) that carry its token ($token). /proc
# only: the minimal guest has no procps. Field 6 of /proc/PID/stat is the session; the command
# name before it may hold spaces, so fields are counted after its closing parenthesis. A whole
# session rather than a process group: `timeout` and bash make groups of their own inside it.
_RUN_MEMBERS = (
    "members() { for d in /proc/[0-9]*; do "
    "read -r st < \"$d/stat\" 2>/dev/null || continue; set -- ${st##*) }; "
    "[ \"$4\" = \"$sid\" ] || continue; "
    "tr '\\0' '\\n' < \"$d/environ\" 2>/dev/null | grep -qx \"@VAR@=$token\" && echo \"${d#/proc/}\"; "
    "done; }"
)


@dataclass(frozen=True)
class SSHEndpoint:
    """Where and as whom to connect: what ``vagrant ssh-config`` reports for a VM.

    ``identity_files`` keeps every key Vagrant lists (in order), not just the last one.
    """

    host: str
    port: int
    user: str
    identity_files: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("SSH endpoint needs a host")
        if not 1 <= int(self.port) <= 65535:
            raise ValueError(f"SSH port {self.port!r} is out of range (1-65535)")
        object.__setattr__(self, "port", int(self.port))
        object.__setattr__(self, "identity_files", tuple(Path(p).expanduser() for p in self.identity_files))

    @property
    def known_hosts_name(self) -> str:
        """The name this endpoint has in a known_hosts file (OpenSSH's ``[host]:port`` form)."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


@dataclass(frozen=True)
class RemoteResult:
    """What a finished remote command did."""

    command: str
    exit_status: int
    stdout: str
    stderr: str
    duration: float
    timed_out: bool = False
    streamed: bool = False
    timeout: float | None = None
    lines: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def ok(self) -> bool:
        return self.exit_status == 0 and not self.timed_out

    def tail(self, lines: int = TAIL_LINES) -> list[str]:
        """The last lines of both streams, interleaved in arrival order."""
        return [line for _, line in self.lines[-lines:]]

    def describe_failure(self) -> str:
        if self.timed_out:
            what = f"timed out after {self.timeout or self.duration:.0f} s"
        elif self.exit_status == 127:
            what = "exit 127: program not found on the guest"
        elif self.exit_status < 0:
            what = "killed by a signal or no exit status"
        else:
            what = f"exit status {self.exit_status}"
        text = f"remote command failed ({what}): {self.command}"
        if not self.streamed:
            tail = self.tail()
            if tail:
                text += f"\n  last {len(tail)} lines of output:\n" + "\n".join(f"    {ln}" for ln in tail)
        return text


def known_hosts_path(cfg: ApplianceConfig) -> Path:
    """The known_hosts file of this build: one VM per build directory."""
    return cfg.build_dir / "known_hosts"


def forget_host_key(known_hosts: Path, endpoint: SSHEndpoint | None = None) -> bool:
    """Drop the recorded host key of ``endpoint`` (all keys when None); True if something was removed.

    Call it after creating or destroying the VM: the next connect records the new key.
    """
    if not known_hosts.exists():
        return False
    if endpoint is None:
        known_hosts.unlink()
        return True
    keys = paramiko.HostKeys(str(known_hosts))
    name = endpoint.known_hosts_name
    if name not in keys:
        return False
    del keys[name]
    _save_host_keys(keys, known_hosts)
    return True


PARAMIKO_LOG = "appliance.ssh.paramiko"


def _quiet_paramiko_log() -> str:
    """The log channel of the build's SSH transports: silent.

    Paramiko's transport thread logs a failed banner read (a guest whose sshd is not up yet
    accepts the connection and closes it) as a full traceback at ERROR level; the retry loop in
    ``RemoteSession.open`` reports every failed attempt itself, in one line.
    """
    logger = logging.getLogger(PARAMIKO_LOG)
    logger.propagate = False
    logger.setLevel(logging.CRITICAL + 1)
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return PARAMIKO_LOG


def _save_host_keys(keys: paramiko.HostKeys, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary file of our own (mkstemp), never a fixed name a planted symlink could redirect.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        keys.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fingerprint(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"


class _RecordNewHostKey(paramiko.MissingHostKeyPolicy):
    """Trust on first use, scoped to this build's known_hosts: record the key a fresh VM shows."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        keys = client.get_host_keys()
        keys.add(hostname, key.get_name(), key)
        _save_host_keys(keys, self.path)
        log.info(f"recorded host key of {hostname} ({_fingerprint(key)}) in {self.path}")


def env_exports(env: Mapping[str, str]) -> str:
    """``export NAME='value' ...;`` with every value shell-quoted, so hostile values stay inert."""
    parts = []
    for name, value in env.items():
        if not _ENV_NAME.match(name):
            raise RemoteError(
                f"invalid environment variable name {name!r}: "
                "use letters, digits and '_' (not starting with a digit)"
            )
        parts.append(f"{name}={shlex.quote(str(value))}")
    return f"export {' '.join(parts)}; " if parts else ""


class _LineSplitter:
    """Turns a byte stream into complete text lines (UTF-8, invalid bytes replaced)."""

    def __init__(self, name: str, emit: Callable[[str, str], None]) -> None:
        self.name = name
        self.emit = emit
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""
        self.chunks: list[str] = []

    def feed(self, data: bytes, final: bool = False) -> None:
        text = self.decoder.decode(data, final=final)
        self.chunks.append(text)
        self.pending += text
        *complete, self.pending = self.pending.split("\n")
        for line in complete:
            self.emit(self.name, line.rstrip("\r"))
        if final and self.pending:
            self.emit(self.name, self.pending.rstrip("\r"))
            self.pending = ""

    @property
    def text(self) -> str:
        return "".join(self.chunks)


class RemoteSession:
    """An SSH session to one guest. Use as a context manager; connects on first use."""

    def __init__(
        self,
        endpoint: SSHEndpoint,
        *,
        known_hosts: Path,
        connect_timeout: float = 30,
        connect_retries: int = 20,
        keepalive: int = 15,
        retry_delay: tuple[float, float] = (1.0, 3.0),
        boot_id_path: str = BOOT_ID_PATH,
        ciphers: tuple[str, ...] = PREFERRED_CIPHERS,
        reboot_command: str = REBOOT_COMMAND,
    ) -> None:
        self.endpoint = endpoint
        self.known_hosts = known_hosts
        self.connect_timeout = connect_timeout
        self.connect_retries = connect_retries
        self.keepalive = keepalive
        self.retry_delay = retry_delay
        self.boot_id_path = boot_id_path
        self.ciphers = ciphers
        self.reboot_command = reboot_command
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None

    @classmethod
    def from_config(cls, cfg: ApplianceConfig, endpoint: SSHEndpoint) -> RemoteSession:
        """A session using the ``ssh`` settings; ``ssh.private_key``, when set, is tried first."""
        if cfg.ssh.private_key:
            keys = (Path(cfg.ssh.private_key).expanduser(), *endpoint.identity_files)
            endpoint = SSHEndpoint(endpoint.host, endpoint.port, endpoint.user, keys)
        return cls(
            endpoint,
            known_hosts=known_hosts_path(cfg),
            connect_timeout=cfg.ssh.connect_timeout,
            connect_retries=cfg.ssh.connect_retries,
            keepalive=cfg.ssh.keepalive,
        )

    # -- connection ---------------------------------------------------------------------

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def is_connected(self) -> bool:
        transport = self._client.get_transport() if self._client is not None else None
        return transport is not None and transport.is_active()

    def link_lost(self, grace: float = 2.0) -> bool:
        """After an I/O error: did the connection itself drop (rather than the operation fail)?

        Paramiko's reader thread notices a dead socket only a moment after a writer does, so a
        failure seen mid-transfer is checked again for up to ``grace`` seconds and with one
        keepalive packet (which fails on a dead link) before it is blamed on the guest.
        """
        deadline = time.monotonic() + grace
        while self.is_connected and time.monotonic() < deadline:
            transport = self._client.get_transport() if self._client is not None else None
            try:
                if transport is not None:
                    transport.send_ignore()
            except (OSError, EOFError, paramiko.SSHException):
                return True
            time.sleep(0.1)
        return not self.is_connected

    @property
    def transport(self) -> paramiko.Transport:
        self.open()
        assert self._client is not None
        transport = self._client.get_transport()
        if transport is None:  # pragma: no cover - open() guarantees one
            raise ConnectionLost(f"no SSH transport to {self.endpoint}")
        return transport

    @property
    def runs_as_root(self) -> bool:
        return self.endpoint.user == "root"

    def open(self, *, attempts: int | None = None) -> None:
        """Connect unless connected; retry refused/timed-out/reset connections with jitter."""
        if self.is_connected:
            return
        self.close()
        self._check_identity_files()
        tries = (self.connect_retries if attempts is None else attempts) + 1
        last: Exception | None = None
        for attempt in range(1, tries + 1):
            try:
                self._client = self._connect_once()
                return
            except paramiko.BadHostKeyException as exc:
                raise self._host_key_error(exc) from None
            except paramiko.AuthenticationException as exc:
                if "timeout" in str(exc).lower() and attempt < tries:
                    # A guest that is booting or shutting down can accept the connection and then
                    # stall; that is not a wrong key. Retry like a refused connection.
                    last = exc
                    time.sleep(random.uniform(*self.retry_delay))
                    continue
                keys = ", ".join(str(p) for p in self.endpoint.identity_files) or "(default keys)"
                raise RemoteError(
                    f"SSH authentication as {self.endpoint.user!r} on "
                    f"{self.endpoint.host}:{self.endpoint.port} failed with {keys}: {exc}",
                    hint="check ssh.user and ssh.private_key; "
                    "`vagrant ssh-config` shows the user and key Vagrant uses",
                ) from None
            except (OSError, EOFError, paramiko.SSHException) as exc:
                last = exc
                if attempt < tries:
                    low, high = self.retry_delay
                    delay = random.uniform(low, high) * min(attempt, 4)
                    if attempt == 1:  # one line for the wait; each retry after it only under --debug
                        log.info(f"ssh {self.endpoint}: not answering yet ({_reason(exc)}); retrying up to "
                                 f"{tries - 1} times")
                    log.debug(f"ssh {self.endpoint}: attempt {attempt}/{tries} failed ({_reason(exc)}); "
                              f"retrying in {delay:.1f} s")
                    time.sleep(delay)
        assert last is not None
        raise RemoteError(
            f"cannot connect to {self.endpoint} after {tries} attempt{'s' if tries != 1 else ''}: "
            f"{_reason(last)}",
            hint="is the VM running (`vagrant status`)? "
            "A booting guest may need more time: raise ssh.connect_retries",
        )

    def _check_identity_files(self) -> None:
        for path in self.endpoint.identity_files:
            try:
                paramiko.PKey.from_path(path)
            except FileNotFoundError:
                raise RemoteError(f"SSH private key {path} does not exist",
                                  hint="set ssh.private_key, or check `vagrant ssh-config`") from None
            except (OSError, paramiko.SSHException, ValueError) as exc:
                raise RemoteError(
                    f"cannot use SSH private key {path}: {exc}",
                    hint="give an unencrypted Ed25519, ECDSA or RSA key in OpenSSH or PEM format",
                ) from None

    def _connect_once(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        if self.known_hosts.exists():
            client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(_RecordNewHostKey(self.known_hosts))

        def transport_factory(sock: socket.socket, **kwargs: Any) -> paramiko.Transport:
            transport = paramiko.Transport(
                sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET_SIZE, **kwargs
            )
            options = transport.get_security_options()
            supported = tuple(options.ciphers)
            preferred = tuple(c for c in self.ciphers if c in supported)
            options.ciphers = preferred + tuple(c for c in supported if c not in preferred)
            transport.set_log_channel(_quiet_paramiko_log())
            return transport

        files = [str(p) for p in self.endpoint.identity_files]
        try:
            client.connect(
                self.endpoint.host,
                port=self.endpoint.port,
                username=self.endpoint.user,
                key_filename=files or None,  # type: ignore[arg-type]  # Paramiko takes a list too
                allow_agent=False,
                look_for_keys=not files,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                transport_factory=transport_factory,  # type: ignore[arg-type]
            )
        except BaseException:
            client.close()
            raise
        transport = client.get_transport()
        if transport is not None and self.keepalive:
            transport.set_keepalive(self.keepalive)
        log.debug(f"ssh: connected to {self.endpoint}")
        return client

    def _host_key_error(self, exc: paramiko.BadHostKeyException) -> RemoteError:
        name = self.endpoint.known_hosts_name
        return RemoteError(
            f"the host key of {name} changed: it shows {_fingerprint(exc.key)}, but this build recorded "
            f"{_fingerprint(exc.expected_key)} in {self.known_hosts}. Either the VM was recreated behind "
            "our back or something else now answers on that address; refusing to connect",
            hint=(
                f"if you recreated the VM yourself, forget the old key: ssh-keygen -f {self.known_hosts} -R "
                f"{shlex.quote(name)} (or delete {self.known_hosts})"
            ),
        )

    def close(self) -> None:
        if self._sftp is not None:
            try:
                self._sftp.close()
            except (OSError, EOFError, paramiko.SSHException):
                pass
            self._sftp = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def reconnect(self, *, attempts: int | None = None) -> None:
        self.close()
        self.open(attempts=attempts)

    def sftp(self) -> paramiko.SFTPClient:
        """The session's SFTP client (opened once, closed with the session)."""
        if self._sftp is not None and self.is_connected:
            channel = self._sftp.get_channel()
            if channel is not None and not channel.closed:
                return self._sftp
            self._sftp = None  # an upload abandoned it mid-stream: open a fresh one
        try:
            sftp = paramiko.SFTPClient.from_transport(
                self.transport, window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET_SIZE
            )
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise ConnectionLost(f"cannot open SFTP on {self.endpoint}: {_reason(exc)}") from None
        if sftp is None:  # pragma: no cover - Paramiko returns None only on a closed transport
            raise ConnectionLost(f"cannot open SFTP on {self.endpoint}")
        channel = sftp.get_channel()
        if channel is not None:
            channel.settimeout(SFTP_IDLE_TIMEOUT)
        self._sftp = sftp
        return sftp

    # -- commands -----------------------------------------------------------------------

    def wrap_command(
        self,
        command: str,
        *,
        env: Mapping[str, str] | None = None,
        sudo: bool = True,
        timeout: float | None = None,
        group: RunGroup | None = None,
    ) -> str:
        """The exact command line sent to the guest: exports, then ``command``, under sudo and `timeout`.

        With ``group`` the command runs in a session of its own (``setsid``): its leader writes
        the session id and the run's token into ``group.pid_file`` (and removes it when the run
        ends by itself) and exports the token, so :meth:`stop_group` can end every process of
        this run, and only those.
        """
        script = env_exports(env or {}) + command
        argv: list[str] = []
        if sudo and not self.runs_as_root:
            # -n: never prompt (no PTY to answer on); -H: root's HOME for tools that care.
            argv += ["sudo", "-n", "-H", "--"]
        inner: list[str] = []
        if timeout:
            inner += ["timeout", "--kill-after", str(KILL_AFTER), str(max(1, round(timeout)))]
        inner += ["/bin/sh", "-c", script]
        if group is None:
            argv += inner
        else:
            pid_file = shlex.quote(group.pid_file)
            # The leader's PID is the session id; it stays to remove the record when the run ends
            # on its own (an interrupted run leaves it for stop_group to find).
            leader = (f"umask 077; echo \"$$ {group.token}\" > {pid_file} || exit 125; "
                      f"export {GROUP_TOKEN_VAR}={group.token}; {shlex.join(inner)}; rc=$?; "
                      f"rm -f {pid_file}; exit $rc")
            # -w: wait and pass on the exit status (setsid forks when it is a group leader already).
            argv += ["setsid", "-w", "/bin/sh", "-c", leader]
        return shlex.join(argv)

    def stop_group(self, pid_file: str, *, sudo: bool = True, grace: float = STOP_GRACE) -> bool:
        """End every process of the grouped run recorded in ``pid_file`` (TERM, then KILL).

        Only processes of the recorded session that carry the run's token are signalled, so a
        stale file never hits processes that reused the number. Returns whether any was
        running. Bounded in time: ``grace`` seconds plus one round trip.
        """
        f = shlex.quote(pid_file)
        members = _RUN_MEMBERS.replace("@VAR@", GROUP_TOKEN_VAR)
        script = (
            f"[ -f {f} ] || exit 3; read -r sid token < {f} || exit 3; "
            "case \"$sid$token\" in *[!0-9a-f]*|'') rm -f " + f + "; exit 3;; esac; "
            f"{members}; pids=$(members); [ -n \"$pids\" ] || {{ rm -f {f}; exit 3; }}; "
            # TERM again on every round: a process may have forked since the last listing.
            f"i=0; while [ -n \"$pids\" ] && [ $i -lt {max(1, round(grace * 5))} ]; do "
            "kill -TERM $pids 2>/dev/null; sleep 0.2; i=$((i+1)); pids=$(members); done; "
            "[ -z \"$pids\" ] || kill -KILL $pids 2>/dev/null; "
            f"rm -f {f}; exit 0"
        )
        result = self.run(script, sudo=sudo, timeout=grace + 30, check=False)
        return result.exit_status == 0

    def run(
        self,
        command: str,
        *,
        env: Mapping[str, str] | None = None,
        sudo: bool = True,
        timeout: float | None = None,
        on_line: LineHandler | None = None,
        check: bool = True,
        stream: bool = False,
        hint: str | None = None,
        group_file: str | None = None,
    ) -> RemoteResult:
        """Run ``command`` (a shell command line) on the guest and return its result.

        ``on_line(stream, line)`` sees each stdout/stderr line as it arrives; ``stream=True``
        also prints it. Raises ``RemoteCommandFailed`` on a non-zero exit or timeout unless
        ``check=False``, and ``ConnectionLost`` when the connection drops mid-command.
        With ``group_file`` (a guest path only root can write) the command runs in its own
        session, recorded there; Ctrl-C then ends its whole process tree on the guest, not just
        the channel, before ``KeyboardInterrupt`` goes on.
        """
        group = RunGroup(group_file, secrets.token_hex(16)) if group_file else None
        wire = self.wrap_command(command, env=env, sudo=sudo, timeout=timeout, group=group)
        log.debug(f"ssh {self.endpoint}$ {command}")
        lines: list[tuple[str, str]] = []

        def emit(name: str, line: str) -> None:
            lines.append((name, line))
            if stream:
                log.output(line, stderr=(name == "stderr"))
            if on_line is not None:
                on_line(name, line)

        started = time.monotonic()
        try:
            transport = self.transport
            channel = transport.open_session(timeout=self.connect_timeout)
            channel.exec_command(wire)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self.close()
            raise ConnectionLost(f"lost the connection to {self.endpoint} before running {command!r}: "
                                 f"{_reason(exc)}") from None
        out, err = _LineSplitter("stdout", emit), _LineSplitter("stderr", emit)
        deadline = started + timeout + KILL_AFTER + TIMEOUT_GRACE if timeout else None
        host_timed_out = False
        try:
            host_timed_out = _pump(channel, transport, out, err, deadline)
        except KeyboardInterrupt:
            channel.close()
            if group is not None:
                self._stop_after_interrupt(group, sudo)
            raise
        except (OSError, EOFError, paramiko.SSHException):
            pass  # judged below: a channel without an exit status means a lost connection
        # Paramiko marks a channel "status ready" when it closes for any reason. A real ending
        # brings an exit status, or (killed by a signal) at least the server's EOF first.
        lost = channel.exit_status == -1 and (not channel.eof_received or not transport.is_active())
        if not host_timed_out and (lost or not channel.exit_status_ready()):
            channel.close()
            self.close()
            raise ConnectionLost(
                f"the connection to {self.endpoint} dropped while running {command!r} "
                f"(after {time.monotonic() - started:.1f} s); the command may or may not have finished"
            )
        status = -1 if host_timed_out else channel.recv_exit_status()
        channel.close()
        duration = time.monotonic() - started
        # `timeout` exits 124 (TERM) or 137 (KILL) when the limit hit; our own deadline is the backstop.
        timed_out = host_timed_out or (
            timeout is not None and status in (124, 137) and duration >= timeout - 1
        )
        result = RemoteResult(
            command=command,
            exit_status=status,
            stdout=out.text,
            stderr=err.text,
            duration=duration,
            timed_out=timed_out,
            streamed=stream,
            timeout=timeout,
            lines=tuple(lines),
        )
        if check and not result.ok:
            raise RemoteCommandFailed(result, hint=hint)
        return result

    def _stop_after_interrupt(self, group: RunGroup, sudo: bool) -> None:
        try:
            if self.stop_group(group.pid_file, sudo=sudo):
                log.warning(f"stopped the interrupted command's processes on {self.endpoint.host}")
        except (RemoteError, OSError, EOFError, paramiko.SSHException) as exc:
            log.warning(f"could not stop the interrupted command on {self.endpoint.host}: {exc}; the next run "
                        "stops it before it starts")

    def boot_id(self) -> str:
        """The guest kernel's boot id: changes on every boot, so a reboot is observable."""
        return self.run(f"cat {shlex.quote(self.boot_id_path)}", sudo=False, timeout=30).stdout.strip()

    def reboot(self, *, timeout: float = 600) -> None:
        """Reboot the guest and wait until it is back (its boot id changed), then reconnect."""
        before = self.boot_id()
        command = self.reboot_command
        # Detached and delayed, so this command returns before sshd goes away.
        self.run(f"nohup sh -c {shlex.quote('sleep 1; ' + command)} >/dev/null 2>&1 </dev/null &", timeout=30)
        self.close()
        deadline = time.monotonic() + timeout
        log.info(f"rebooting {self.endpoint.host}; waiting for it to come back")
        last = "no answer yet"
        while time.monotonic() < deadline:
            time.sleep(random.uniform(*self.retry_delay))
            try:
                self.open(attempts=0)
                after = self.boot_id()
            except RemoteError as exc:
                # Going down and coming up, sshd refuses, resets or stalls logins: keep waiting.
                # A changed host key is no such phase: refuse at once.
                self.close()
                if "host key" in exc.message:
                    raise
                last = exc.message
                continue
            if after and after != before:
                log.info(f"{self.endpoint.host} is back (boot id {after[:8]}…)")
                return
            self.close()  # still the old boot: the reboot has not happened yet
        raise RemoteError(
            f"{self.endpoint.host} did not come back from a reboot within {timeout:.0f} s (last: {last})",
            hint="look at the VM console (virt-viewer / VirtualBox window) for a boot problem",
        )


def _pump(
    channel: paramiko.Channel,
    transport: paramiko.Transport,
    out: _LineSplitter,
    err: _LineSplitter,
    deadline: float | None,
) -> bool:
    """Drain both streams until EOF and an exit status; True if the host-side deadline hit first."""
    fd = channel.fileno()
    while True:
        drained = False
        while channel.recv_ready():
            out.feed(channel.recv(65536))
            drained = True
        while channel.recv_stderr_ready():
            err.feed(channel.recv_stderr(65536))
            drained = True
        # OpenSSH may send the exit status before the last output: done only at EOF (or at the
        # channel's close, which comes last), and only once both buffers are empty.
        finished = channel.closed or (channel.eof_received and channel.exit_status_ready())
        if (finished or not transport.is_active()) and not channel.recv_ready() and not channel.recv_stderr_ready():
            out.feed(b"", final=True)
            err.feed(b"", final=True)
            return False
        if deadline is not None and time.monotonic() > deadline:
            channel.close()
            out.feed(b"", final=True)
            err.feed(b"", final=True)
            return True
        if not drained:
            select.select([fd], [], [], 0.25)
            # The pipe stays readable until a buffer is read; reading happens at the loop top.


def _reason(exc: BaseException) -> str:
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        return "connection refused"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by peer"
    if isinstance(exc, EOFError):
        return "the server closed the connection"
    text = str(exc) or type(exc).__name__
    # Paramiko glues the cause onto its banner message ("...banner[Errno 104] Connection reset by peer"
    # when the guest resets the connection rather than closing it): keep the two apart.
    banner = "Error reading SSH protocol banner"
    if text.startswith(banner) and len(text) > len(banner):
        return f"{banner}: {text[len(banner):].strip()}"
    return text

