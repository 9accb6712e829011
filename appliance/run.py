"""Run host commands (vagrant, VBoxManage, qemu-img, ...) through one helper.

Argument lists only, never shell strings; a small explicit environment with a fixed
locale; stdin closed; output streamed and captured at once; every command logged
(shell-quoted) so a user can paste it; a failure raises ``CommandFailed`` carrying the
evidence, with hints for the common kinds of failure.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import CommandFailed, CommandTimedOut
from appliance.log import log

TAIL_LINES = 30

# Variables passed through from the caller's environment: what the tools need to find
# their config, state and display, nothing else.
_PASSTHROUGH = (
    "PATH", "HOME", "USER", "LOGNAME", "TMPDIR", "TERM",
    "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_RUNTIME_DIR",
    "VAGRANT_HOME", "VAGRANT_DEFAULT_PROVIDER", "VAGRANT_LOG", "VAGRANT_EXPERIMENTAL", "LIBVIRT_DEFAULT_URI",
    "VBOX_USER_HOME", "VBOX_INSTALL_PATH", "VBOX_MSI_INSTALL_PATH",
    "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
    # skopeo finds the user's registry credentials itself (containers-auth.json(5)); we never read them
    "REGISTRY_AUTH_FILE", "DOCKER_CONFIG",
)


@dataclass(frozen=True)
class CommandResult:
    """What a finished command did: its argv, exit status, output and duration."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration: float
    streamed: bool = False
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def command_line(self) -> str:
        return shlex.join(self.argv)

    def tail(self, stream: str = "stderr", lines: int = TAIL_LINES) -> list[str]:
        text = self.stderr if stream == "stderr" else self.stdout
        return text.splitlines()[-lines:]

    def describe_failure(self, reason: str | None = None) -> str:
        rc = self.returncode
        if self.timed_out:
            what = f"timed out after {self.duration:.0f} s"
        elif rc == 127:
            what = "exit 127: program not found"
        elif rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            what = f"killed by {name}"
        else:
            what = f"exit status {rc}"
        text = f"command failed ({what}): {self.command_line}"
        if reason:
            text += f"\n  {reason}"
        # Output the user already saw scrolling by is not repeated; hidden output is shown once.
        if not self.streamed:
            for stream in ("stderr", "stdout"):
                tail = self.tail(stream)
                if tail:
                    text += f"\n  last {len(tail)} lines of {stream}:\n" + "\n".join(f"    {ln}" for ln in tail)
        return text


def command_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a host command gets: a fixed locale plus the few variables tools need."""
    env = {k: os.environ[k] for k in _PASSTHROUGH if k in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env["LANG"] = "C.UTF-8"
    env["LC_ALL"] = "C.UTF-8"
    if extra:
        env.update(extra)
    return env


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    stream: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
    on_line: Callable[[str, str], None] | None = None,
    hint: str | None = None,
    input_text: str | None = None,
    watchdog: Callable[[], BaseException | None] | None = None,
    watch_every: float = 2.0,
) -> CommandResult:
    """Run ``argv`` and return its result; raise ``CommandFailed`` on failure unless ``check=False``.

    ``stream=True`` prints each output line as it arrives (and still captures it);
    ``on_line(stream_name, line)`` sees every line either way. ``env`` adds to the
    minimal environment from :func:`command_env`.

    ``watchdog`` is called every ``watch_every`` seconds while the command runs; when it returns
    an exception (something the command waits for can no longer happen, e.g. the VM it boots
    stopped), the command is interrupted as on Ctrl-C and that exception is raised.
    """
    args = tuple(os.fspath(a) for a in argv)
    log.debug("$ %s", shlex.join(args))
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=command_env(env),
            cwd=cwd,
            text=True,
            errors="replace",
        )
    except FileNotFoundError:
        result = CommandResult(args, 127, "", f"{args[0]}: command not found", 0.0)
        if check:
            raise CommandFailed(result, hint=hint or f"install {args[0]!r} (see `invoke doctor`)") from None
        return result

    chunks: dict[str, list[str]] = {"stdout": [], "stderr": []}

    def pump(name: str) -> None:
        pipe = proc.stdout if name == "stdout" else proc.stderr
        assert pipe is not None
        for line in pipe:
            chunks[name].append(line)
            stripped = line.rstrip("\n")
            if stream:
                log.output(stripped, stderr=(name == "stderr"))
            if on_line is not None:
                on_line(name, stripped)
        pipe.close()

    readers = [threading.Thread(target=pump, args=(n,), daemon=True) for n in ("stdout", "stderr")]
    for t in readers:
        t.start()
    if input_text is not None:
        assert proc.stdin is not None
        proc.stdin.write(input_text)
        proc.stdin.close()
    timed_out = False
    deadline = None if timeout is None else started + timeout
    try:
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            wait = remaining if watchdog is None else min(watch_every, remaining if remaining is not None else 1e9)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() >= deadline:
                    timed_out = True
                    proc.kill()
                    proc.wait()
                    break
            stop = watchdog() if watchdog is not None else None
            if stop is not None:
                _interrupt(proc)
                for t in readers:
                    t.join(timeout=5)
                raise stop
    except KeyboardInterrupt:
        # Give the child the same interrupt, let it finish cleanly, then pass the interrupt on.
        _interrupt(proc)
        raise
    for t in readers:
        t.join()
    result = CommandResult(
        args,
        proc.returncode,
        "".join(chunks["stdout"]),
        "".join(chunks["stderr"]),
        time.monotonic() - started,
        streamed=stream,
        timed_out=timed_out,
    )
    if timed_out and check:
        raise CommandTimedOut(result, hint=hint)
    if not result.ok and check:
        raise CommandFailed(result, hint=hint)
    return result


def _interrupt(proc: subprocess.Popen[str], grace: float = 30) -> None:
    """Interrupt a child as Ctrl-C would (SIGINT), give it ``grace`` seconds to finish cleanly, then kill it."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_background(argv: Sequence[str | os.PathLike[str]], output: Path,
                     env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a long-lived child (a VM's QEMU) with its stdout and stderr in ``output``; the caller owns it.

    The child gets its own session, so a terminal's Ctrl-C reaches only this tool, which stops
    the child by its PID (``stop_processes``) on every way out, Ctrl-C and SIGTERM included.
    """
    args = tuple(os.fspath(a) for a in argv)
    log.debug("$ %s &", shlex.join(args))
    with output.open("ab") as sink:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                env=command_env(env), start_new_session=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived (``timeout``, ``systemctl stop``, a closed terminal): handled as Ctrl-C."""


@contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise ``Terminated`` (a ``KeyboardInterrupt``) in the main thread.

    So every cleanup that runs on Ctrl-C runs on them too: the children this tool started are
    stopped by PID, and the build state is saved for resume. A second signal during that
    cleanup is ignored, so the cleanup is not itself cut short.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        if received:
            return
        received.append(signum)
        raise Terminated(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def which(program: str) -> str | None:
    """Where ``program`` is on PATH (including the sbin directories tools like libvirtd live in)."""
    import shutil

    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(program, path=path)


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process on this host (a zombie, already exited, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_processes(pids: Sequence[int], grace: float) -> None:
    """End processes this tool started (by PID, never by name): TERM, up to ``grace`` seconds, then KILL.

    A process already gone is fine; ``PermissionError`` (another user's process) reaches the caller.
    """
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(process_alive(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        if process_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
