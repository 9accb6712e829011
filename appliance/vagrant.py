"""The Vagrant command line, run one way and read one way; it knows no provider.

``Vagrant.run`` builds the argv and runs it through ``appliance.run.run`` (lines streamed and
captured, a timeout, the child interrupted with the caller on Ctrl-C, every command logged under
``--debug``); a failure becomes a ``VagrantError`` naming the command with the tail of its stderr
and a hint (generic ones here; the caller adds its provider's through ``hint``). python-vagrant's
public API can do none of the three (no timeout, stderr not captured, only ``up`` streams, through
a generator that must be consumed), so it is not used (docs/architecture.md).

Output is read with one parser of ``--machine-readable`` lines (``status``, ``box list``,
``plugin list``), and ``vagrant ssh-config`` with ``paramiko.SSHConfig``, which keeps every
``IdentityFile`` line. What the build does with Vagrant (render, up, halt, destroy: the VM's
lifecycle, for a given provider) is ``appliance.vm``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import paramiko

from appliance.config import ApplianceConfig
from appliance.errors import CommandFailed, GuestStopped, PrerequisiteMissing, VagrantError
from appliance.log import log
from appliance.run import CommandResult, run, which
from appliance.ssh import SSHEndpoint

VAGRANT_ENV = {
    # Nothing beyond the Debian archive is reachable from build hosts like ours: no phoning home.
    "VAGRANT_CHECKPOINT_DISABLE": "1",
    "VAGRANT_BOX_UPDATE_CHECK_DISABLE": "1",
    "VAGRANT_NO_COLOR": "1",
}
MACHINE = "default"
# The oldest Vagrant this tool drives (a provider may need a newer one: providers.virtualbox.hostprobe).
MIN_VAGRANT = (2, 2, 19)
# States in which `vagrant up` (re)starts the machine.
STARTABLE_STATES = {"not_created", "poweroff", "shutoff", "running"}
# Time beyond vm.boot_timeout that `up` may take: uploading the box image, creating the domain.
UP_MARGIN_SECONDS = 600
STDERR_TAIL = 15
# Bound for the quick queries (status, ssh-config, box and plugin lists): Vagrant starts in seconds.
QUERY_TIMEOUT = 300
# What a failed command's output means for one provider: (output, phase) -> hint or None.
FailureHint = Callable[[str, "str | None", bool], "str | None"]


# -- parsing (pure functions, unit-tested on captured output) ---------------------------------------


@dataclass(frozen=True)
class MachineReadableLine:
    """One ``timestamp,target,type,data...`` line of Vagrant's ``--machine-readable`` output."""

    timestamp: str
    target: str
    kind: str
    data: tuple[str, ...]


def _unescape(value: str) -> str:
    return value.replace("%!(VAGRANT_COMMA)", ",").replace("\\n", "\n").replace("\\r", "\r")


def parse_machine_readable(text: str) -> list[MachineReadableLine]:
    """Parse ``--machine-readable`` output; lines that are not in that format are skipped."""
    lines: list[MachineReadableLine] = []
    for raw in text.splitlines():
        parts = raw.split(",")
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        lines.append(MachineReadableLine(parts[0], parts[1], parts[2], tuple(_unescape(p) for p in parts[3:])))
    return lines


@dataclass(frozen=True)
class MachineState:
    """A machine as ``vagrant status`` reports it. ``state`` is the provider's own word."""

    name: str
    state: str
    provider: str

    @property
    def exists(self) -> bool:
        return self.state != "not_created"

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def stopped(self) -> bool:
        return self.state in ("poweroff", "shutoff")


def parse_status(text: str) -> list[MachineState]:
    """Machines from ``vagrant status --machine-readable``; an ``error-exit`` line raises ``VagrantError``."""
    states: dict[str, dict[str, str]] = {}
    for line in parse_machine_readable(text):
        if line.kind == "error-exit":
            raise VagrantError(f"vagrant status failed: {' '.join(line.data[1:]) or line.data[0]}")
        if line.target and line.kind in ("provider-name", "state"):
            states.setdefault(line.target, {})[line.kind] = line.data[0] if line.data else ""
    return [MachineState(n, v.get("state", "unknown"), v.get("provider-name", "")) for n, v in states.items()]


@dataclass(frozen=True)
class Box:
    """One box of ``vagrant box list --machine-readable``."""

    name: str
    provider: str
    version: str


def parse_box_list(text: str) -> list[Box]:
    """Boxes from ``vagrant box list --machine-readable`` (``box-name``, then its provider and version)."""
    boxes: list[Box] = []
    name = provider = ""
    for line in parse_machine_readable(text):
        value = line.data[0] if line.data else ""
        if line.kind == "box-name":
            name, provider = value, ""
        elif line.kind == "box-provider":
            provider = value
        elif line.kind == "box-version" and name:
            boxes.append(Box(name, provider, value))
    return boxes


def parse_plugin_list(text: str) -> dict[str, str]:
    """``{plugin: version}`` from ``vagrant plugin list --machine-readable``."""
    plugins: dict[str, str] = {}
    for line in parse_machine_readable(text):
        if line.kind == "plugin-name" and line.data:
            plugins[line.data[0]] = ""
        elif line.kind == "plugin-version" and line.target in plugins and line.data:
            plugins[line.target] = line.data[0]
    return plugins


def parse_ssh_config(text: str, host: str = "default") -> SSHEndpoint:
    """The ``Host`` block for ``host`` in ``vagrant ssh-config`` output, read by ``paramiko.SSHConfig``.

    Every ``IdentityFile`` line is kept, in order (python-vagrant's parser kept only the last).
    """
    parsed = paramiko.SSHConfig.from_text(text)
    if host not in parsed.get_hostnames():
        raise VagrantError(f"`vagrant ssh-config` printed no Host block for {host!r}",
                           hint="is the VM running? `invoke status`")
    block = parsed.lookup(host)
    user = block.get("user", "")
    # paramiko fills in the Host name when HostName is missing: Vagrant always prints one.
    if "hostname" not in _keys(text) or not user:
        raise VagrantError(f"`vagrant ssh-config` gave no HostName or User for {host!r}")
    try:
        port = int(block.get("port", "22"))
    except ValueError:
        raise VagrantError(f"`vagrant ssh-config` gave port {block.get('port')!r} for {host!r}") from None
    return SSHEndpoint(host=block["hostname"], port=port, user=user,
                       identity_files=tuple(Path(p) for p in block.get("identityfile", [])))


def _keys(text: str) -> set[str]:
    return {ln.split(None, 1)[0].split("=", 1)[0].lower() for ln in text.splitlines() if ln.strip()}


# Lines of `vagrant up` output (Vagrant 2.3, vagrant-libvirt 0.11) that start a phase.
PHASES: tuple[tuple[str, str], ...] = (
    ("Uploading base box image as volume", "uploading the box image"),
    ("Creating image (snapshot of base box volume)", "creating the disk"),
    ("Creating domain with the following settings", "creating domain"),
    ("Starting domain", "starting domain"),
    ("Waiting for domain to get an IP address", "waiting for IP"),
    ("Waiting for SSH to become available", "waiting for SSH"),
    ("Waiting for machine to boot", "waiting for SSH"),
    ("Machine booted and ready", "booted"),
    ("Machine is booted and ready for use", "booted"),
    ("Running provisioner", "provisioning"),
)


def detect_phase(line: str, current: str) -> str:
    """The phase ``vagrant up`` is in after printing ``line`` (unchanged when the line says nothing)."""
    for marker, phase in PHASES:
        if marker in line:
            return phase
    return current


# -- running Vagrant ------------------------------------------------------------------------------


class Vagrant:
    """The one way this tool runs Vagrant: argv through ``appliance.run.run``, in one project directory.

    ``root`` is the Vagrant project (``None``: commands that need none, such as ``box add``);
    ``env`` adds to :data:`VAGRANT_ENV` (the provider's variables); ``hint`` says what a failure's
    output (stderr and stdout) means beyond the generic hints, given the phase and whether it timed out
    (the provider's).
    """

    def __init__(self, root: Path | None = None, env: Mapping[str, str] | None = None,
                 hint: FailureHint | None = None) -> None:
        executable = which("vagrant")
        if executable is None:
            raise PrerequisiteMissing("vagrant is not installed",
                                      hint="apt-get install -y --no-install-recommends vagrant")
        self.executable = executable
        self.root = root
        self.env = {**VAGRANT_ENV, **(env or {})}
        self.hint = hint

    def run(self, *args: str, show: bool = False, timeout: float | None = QUERY_TIMEOUT,
            on_line: Callable[[str, str], None] | None = None,
            phase: Callable[[], str] | None = None,
            watchdog: Callable[[], GuestStopped | None] | None = None) -> CommandResult:
        """Run ``vagrant ARGS``; ``show`` prints its output (``Progress: N%`` thinned); a failure or
        timeout raises ``VagrantError`` (``phase`` names what it was doing, for the message).
        ``watchdog``: see ``appliance.run.run`` (``up`` passes the provider's check of the booting VM)."""
        progress = ProgressThrottle()

        def each_line(stream: str, line: str) -> None:
            text = strip_ansi(line)
            if show and progress.wants(text):
                log.output(text, stderr=(stream == "stderr"))
            if on_line is not None:
                on_line(stream, text)

        try:
            return run([self.executable, *args], cwd=self.root, env=self.env, on_line=each_line, timeout=timeout,
                       watchdog=watchdog, watch_every=3.0)
        except CommandFailed as exc:
            # Named as a user would say it: `vagrant box add`, `vagrant up` (no flags, machine or paths).
            words = [a for a in args[:2] if not a.startswith("-") and a != MACHINE and "/" not in a]
            raise _failure(" ".join(words), exc, phase=phase() if phase else None, hint=self.hint) from None


def plugins() -> dict[str, str]:
    """Vagrant's installed plugins and their versions."""
    return parse_plugin_list(Vagrant().run("plugin", "list", "--machine-readable").stdout)


def box_list() -> list[Box]:
    """The boxes Vagrant has (``vagrant box list``)."""
    return parse_box_list(Vagrant().run("box", "list", "--machine-readable").stdout)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PROGRESS = re.compile(r"Progress:\s*(\d+)%")


def strip_ansi(line: str) -> str:
    return _ANSI.sub("", line).replace("\r", "")


class ProgressThrottle:
    """Lets through every line except repeated ``Progress: N%`` updates: one per 10 % step."""

    def __init__(self) -> None:
        self.shown = -1

    def wants(self, line: str) -> bool:
        m = _PROGRESS.search(line)
        if not m:
            return True
        step = int(m.group(1)) // 10
        if step == self.shown:
            return False
        self.shown = step
        return True


def project_dir(cfg: ApplianceConfig) -> Path:
    """The build's Vagrant project directory (Vagrantfile and Vagrant's ``.vagrant`` state)."""
    return cfg.build_dir / "vm"


_BACKTRACE_FRAME = re.compile(r"^\s+from /\S+:\d+:in ")


def _failure(subcommand: str, exc: CommandFailed, *, phase: str | None = None,
             hint: FailureHint | None = None) -> VagrantError:
    """A ``VagrantError`` naming the Vagrant command and showing the tail of its stderr, with a hint."""
    result = exc.result
    stderr = result.stderr + "\n" + result.stdout
    # Vagrant's Ruby backtraces bury the one line that says what went wrong: leave the frames out.
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not _BACKTRACE_FRAME.match(ln)]
    source = "stderr"
    if not lines:
        source = "error report"
        # With --machine-readable, Vagrant reports its error on stdout, as an `error-exit` line.
        for line in parse_machine_readable(result.stdout):
            if line.kind == "error-exit":
                lines += [ln for ln in " ".join(line.data[1:] or line.data).splitlines() if ln.strip()]
    tail = lines[-STDERR_TAIL:]
    if result.timed_out:
        what = f"timed out after {result.duration:.0f} s" + (f" while {phase}" if phase else "")
    else:
        what = f"exit status {result.returncode}" + (f" while {phase}" if phase else "")
    message = f"`vagrant {subcommand}` failed ({what})"
    if tail:
        message += f"\n  last lines of its {source}:\n" + "\n".join(f"    {ln}" for ln in tail)
    said = ((hint(stderr, phase, result.timed_out) if hint else None)
            or _hint_for(stderr, phase, timed_out=result.timed_out))
    return VagrantError(message, hint=said)


def _hint_for(output: str, phase: str | None, *, timed_out: bool) -> str | None:
    if re.search(r"box '[^']+' could not be found|could not be found or\s+could not be accessed", output):
        return "build and add the base box first: `invoke base-box`"
    if timed_out or "Timed out while waiting for the machine to boot" in output:
        return "raise vm.boot_timeout, or `invoke destroy` and retry"
    return None
