"""One exception tree for the whole tool.

Only ``tasks.py`` turns these into a process exit: each error carries the exit status it
should end the program with, and a message written for the person at the terminal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from appliance.run import CommandResult
    from appliance.ssh import RemoteResult


class ApplianceError(Exception):
    """Base of every error this tool raises on purpose. ``exit_code`` is what the CLI exits with."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in the configuration: where it came from, which key, what value, what is allowed."""

    source: str
    key: str
    message: str
    value: object = None
    has_value: bool = False

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        key = self.key or "(top level)"
        if self.has_value:
            return f"{where}{key} = {_as_yaml(self.value)}: {self.message}"
        return f"{where}{key}: {self.message}"


def _as_yaml(value: object) -> str:
    """A value as the user wrote it in YAML: ``~`` and ``yes`` show as null and true, not Python's None and True."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


class ConfigError(ApplianceError, ValueError):
    """The configuration is invalid. Carries every problem found, not just the first."""

    exit_code = 2

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        lines = [f"invalid configuration ({count} problem{'s' if count != 1 else ''}):"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class UsageError(ApplianceError, ValueError):
    """A command-line argument is wrong (not a config key)."""

    exit_code = 2


class PrerequisiteMissing(ApplianceError):
    """A host tool or service the build needs is not there. The hint says how to get it."""

    exit_code = 3


class CommandFailed(ApplianceError):
    """A host command exited non-zero, was killed, or could not be started."""

    def __init__(self, result: CommandResult, *, reason: str | None = None, hint: str | None = None) -> None:
        self.result = result
        super().__init__(result.describe_failure(reason), hint=hint)


class CommandTimedOut(CommandFailed):
    """A host command ran past its timeout and was killed."""


class VagrantError(ApplianceError):
    """Vagrant failed, or the VM is in a state the requested action cannot handle."""


class GuestStopped(ApplianceError):
    """A VM being booted stopped running: paused, crashed, or its QEMU exited (``reason`` says which and why).

    ``accelerator`` is what it ran under (``kvm`` or ``tcg``/``qemu``): with libvirt driver
    ``auto``, a guest that stopped under KVM is booted once more under TCG.
    """

    def __init__(self, message: str, *, reason: str, accelerator: str, hint: str | None = None) -> None:
        self.reason = reason
        self.accelerator = accelerator
        super().__init__(message, hint=hint)


class RemoteError(ApplianceError):
    """Connecting to the guest, or running something on it, failed."""


class RemoteCommandFailed(RemoteError):
    """A command on the guest exited non-zero or timed out. ``result`` is its ``RemoteResult``."""

    def __init__(self, result: RemoteResult, *, hint: str | None = None) -> None:
        self.result = result
        super().__init__(result.describe_failure(), hint=hint)


class ConnectionLost(RemoteError):
    """The SSH connection dropped while a command was running; whether it finished is unknown."""


class StepFailed(ApplianceError):
    """A provisioning step failed: names the step, its exit status, its last lines and its log file."""

    def __init__(
        self, step: str, message: str, *, log_path: str | None = None, hint: str | None = None
    ) -> None:
        self.step = step
        self.log_path = log_path
        super().__init__(message, hint=hint)


class ArtifactError(ApplianceError):
    """Downloading, verifying or caching a pinned artifact failed."""


class DigestMismatch(ArtifactError):
    """A download's bytes differ from its pinned digest: a mirror serves other bytes (never just "offline")."""


class ExportError(ApplianceError):
    """Turning the VM into an OVA failed."""


class VerifyError(ApplianceError):
    """An OVA failed verification. ``reasons`` lists every check that failed."""

    def __init__(self, message: str, reasons: Sequence[str] = (), *, hint: str | None = None) -> None:
        self.reasons = list(reasons)
        text = message if not self.reasons else message + "\n" + "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(text, hint=hint)


class Cancelled(ApplianceError):
    """The user pressed Ctrl-C. Cleanups have run; the message says how to resume."""

    exit_code = 130


class StateError(ApplianceError):
    """``build/state.json`` cannot be trusted (unreadable, truncated, wrong types): nothing is guessed.

    Exit status 2, as for any other hostile input (README: configuration, ``--set`` values and
    ``build/state.json``)."""

    exit_code = 2


class VMSealed(ApplianceError):
    """The build VM is sealed (or its seal was started): it must not be booted or provisioned again."""


class HostFileError(ApplianceError):
    """A file on the build host could not be written or read (disk full, permissions, I/O error)."""
