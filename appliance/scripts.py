"""The provisioning scripts in ``provision/``: discovery and their declared properties.

A script is ``provision/NN-<name>.sh``; ``<name>`` is the step name used by ``--skip``,
``--only`` and ``provision.skip``. Header comments of the form ``# appliance: KEY[=VALUE]``
declare properties the runners honour:

- ``# appliance: reboot-after`` - the guest is rebooted after the script succeeds (the
  Paramiko runner waits for it to come back; the Vagrantfile uses ``reboot: true``).
- ``# appliance: timeout=SECONDS`` - default timeout for this step (config may override).
- ``# appliance: files=DIR`` - a directory directly under ``provision/files/`` the script needs (one
  folder name: no ``/``, no ``..``); it is uploaded to ``$PROVISION_DIR/files/DIR`` before the script runs.
- ``# appliance: needs=NEED[,NEED...]`` - what the script reads from the host (the vocabulary is
  ``appliance.guest.NEEDS``: ``k3s-binary``, ``k3s-images``, ``chart``, ``manifests``,
  ``image-set``). The host fetches and installs each need on the guest before the script runs, and
  only the script's own needs are hashed into its step marker, so a changed chart value reruns the
  steps that read the manifests, not the others. The host never asks which step needs what: a new
  step that declares a need gets it.
- ``# appliance: stack`` - the script installs part of the CSGHub stack: skipping it builds a VM
  without CSGHub (no CSGHub sizing minimum, no HTTP check at verify, no stack versions in the
  report).
- ``# appliance: final`` - the last step (seal): after it the build cannot log in.
- ``# appliance: env=NAME[,NAME...]`` - the guest variables (``guest_environment``) the script
  reads. It receives only those (and ``PROVISION_DIR``), and its step marker hashes only
  those, so a changed setting reruns only the steps that read it (and the steps after
  them). An unknown name is an error naming the script and the variable. No ``env=`` line:
  the script reads no setting.

Any other key, or a key with a value it does not take, is an error naming the script.

Scripts find their support files under ``$PROVISION_DIR`` (``/var/tmp/csghub-provision``),
which every step receives.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from appliance.errors import UsageError
from appliance.guest import NEEDS, variable_names

# The checkout's provision/ folder (appliance.config.PROJECT_ROOT / "provision"; computed here so
# that the steps' headers can be read without the settings model).
PROVISION_DIR = Path(__file__).resolve().parent.parent / "provision"
GUEST_PROVISION_DIR = "/var/tmp/csghub-provision"
_NAME = re.compile(r"^(\d{2})-([a-z0-9][a-z0-9-]*)\.sh$")
_HEADER = re.compile(r"^#\s*appliance:\s*([a-z-]+)(?:=(\S*))?\s*$")
_VARIABLE = re.compile(r"^[A-Z][A-Z0-9_]*$")
# files=DIR: one folder directly under provision/files (no "/", no "." or ".."): `files=..` would upload
# provision/ itself, `files=../..` the whole project.
_FILES_FOLDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# Header keys: those that stand alone, and those that take a value.
_FLAGS = ("final", "reboot-after", "stack")
_VALUED = ("env", "files", "needs", "timeout")
# Where the step's scripts and support files are on the guest: every step receives it.
PROVISION_DIR_VARIABLE = "PROVISION_DIR"


@cache
def guest_variable_names() -> frozenset[str]:
    """Every variable a step may declare with ``env=``: the guest environment's names (which do
    not depend on the values) and ``PROVISION_DIR``."""
    return variable_names() | {PROVISION_DIR_VARIABLE}


@dataclass(frozen=True)
class ProvisionScript:
    number: int
    name: str
    path: Path
    reboot_after: bool = False
    timeout: int | None = None
    files: tuple[str, ...] = field(default_factory=tuple)
    final: bool = False
    env: tuple[str, ...] = field(default_factory=tuple)
    needs: tuple[str, ...] = field(default_factory=tuple)
    stack: bool = False

    @property
    def filename(self) -> str:
        return self.path.name

    @property
    def uses_uploads(self) -> bool:
        """The host installs files on the guest for this step (it declares ``needs=``)."""
        return bool(self.needs)


def discover_scripts(directory: Path = PROVISION_DIR) -> list[ProvisionScript]:
    """Every ``NN-name.sh`` in ``directory``, in order, with its header properties.

    Raises ``UsageError`` for a header line it cannot take: an unknown key, a missing or stray
    value, an ``env=`` naming no guest variable, a ``needs=`` naming no need.
    """
    known = guest_variable_names()
    scripts = []
    for path in sorted(directory.glob("*.sh")):
        m = _NAME.match(path.name)
        if not m:
            continue
        flags: set[str] = set()
        timeout: int | None = None
        files: list[str] = []
        env: list[str] = []
        needs: list[str] = []
        for line in path.read_text(encoding="utf-8").splitlines()[:40]:
            h = _HEADER.match(line.strip())
            if not h:
                continue
            key, value = h.group(1), h.group(2)
            _check_header(path, key, value)
            if key in _FLAGS:
                flags.add(key)
            elif key == "timeout":
                timeout = int(value or "")
            elif key == "files":
                files.append(value or "")
            elif key == "env":
                env += _declared_names(path, key, value or "", known, "variable")
            elif key == "needs":
                needs += _declared_names(path, key, value or "", frozenset(NEEDS), "need")
        scripts.append(ProvisionScript(
            int(m.group(1)), m.group(2), path, reboot_after="reboot-after" in flags, timeout=timeout,
            files=tuple(files), final="final" in flags, env=tuple(sorted(set(env))),
            needs=tuple(sorted(set(needs))), stack="stack" in flags,
        ))
    return scripts


def _check_header(path: Path, key: str, value: str | None) -> None:
    """One ``# appliance: KEY[=VALUE]`` line: a known key, with a value exactly when it takes one."""
    if key in _FLAGS and value is None:
        return
    # An empty env=/needs= list gets its own message (_declared_names).
    if key in _VALUED and value is not None and (value or key in ("env", "needs")):
        if (key != "timeout" or value.isdigit()) and (key != "files" or _FILES_FOLDER.match(value)):
            return
    if key == "timeout" and value:
        problem = f"`timeout` takes a whole number of seconds, not {value!r}"
    elif key == "files" and value:
        problem = (f"`files` takes the name of one folder under provision/files (letters, digits, - and _; "
                   f"no / or ..), not {value!r}")
    elif key in _FLAGS:
        problem = f"`{key}` takes no value"
    elif key in _VALUED:
        problem = f"`{key}` needs a value (`# appliance: {key}=...`)"
    elif key == "uploads":
        problem = "`uploads` is gone: declare what the script reads with `needs=` (e.g. `needs=chart,manifests`)"
    else:
        problem = f"unknown key `{key}`"
    raise UsageError(
        f"{path.name}: header line `# appliance: {key}{'' if value is None else '=' + value}`: {problem}",
        hint=f"header keys: {', '.join(_FLAGS)} (alone) and {', '.join(k + '=' for k in _VALUED)} "
        "(docs/provisioning.md, \"Script headers\")",
    )


def _declared_names(path: Path, key: str, value: str, known: frozenset[str], kind: str) -> list[str]:
    """The names of one ``# appliance: env=A,B`` or ``needs=A,B`` line, each checked against ``known``."""
    names = [n.strip() for n in value.split(",")]
    example = "K3S_VERSION,K3S_NODE_IP" if key == "env" else "chart,manifests"
    if not value or any(not n for n in names):
        raise UsageError(
            f"{path.name}: `# appliance: {key}={value}` lists an empty {kind} name",
            hint=f"write the names comma-separated without spaces, e.g. `# appliance: {key}={example}`; "
            + ("a script that reads no setting has no env= line" if key == "env"
               else "a script that needs nothing from the host has no needs= line"),
        )
    for name in names:
        if name not in known or (key == "env" and not _VARIABLE.match(name)):
            described = "(appliance.guest: SETTING_VARIABLES, DERIVED_VARIABLES)" if key == "env" \
                else "(appliance.guest.NEEDS)"
            raise UsageError(
                f"{path.name}: `# appliance: {key}=` names {name!r}, which is not a "
                f"{'guest variable' if key == 'env' else kind}",
                hint=f"known: {', '.join(sorted(known))} {described}",
            )
    return names


def selected_scripts(
    skip: list[str], directory: Path = PROVISION_DIR, *, include_final: bool = True
) -> list[ProvisionScript]:
    """The scripts not skipped; ``include_final=False`` also leaves out the final (seal) step."""
    return [s for s in discover_scripts(directory) if s.name not in skip and (include_final or not s.final)]


def declared_needs(skip: Iterable[str], directory: Path = PROVISION_DIR) -> frozenset[str]:
    """What the steps that run (not in ``skip``; the final step too) need from the host."""
    skipped = set(skip)
    return frozenset(n for s in discover_scripts(directory) if s.name not in skipped for n in s.needs)


def final_steps(directory: Path = PROVISION_DIR) -> list[str]:
    """The steps that declare ``final`` (the seal): the build runs them last, in a stage of their own."""
    return [s.name for s in discover_scripts(directory) if s.final]


def seals(skip: Iterable[str], directory: Path = PROVISION_DIR) -> bool:
    """A build with these steps skipped seals the VM (a final step runs)."""
    return any(name not in set(skip) for name in final_steps(directory))


def stack_steps(directory: Path = PROVISION_DIR) -> list[str]:
    """The steps that declare ``stack``: skipping any of them builds a VM without CSGHub."""
    return [s.name for s in discover_scripts(directory) if s.stack]


def stack_enabled_for(skip: Iterable[str], directory: Path = PROVISION_DIR) -> bool:
    """The one rule: CSGHub is in the image unless a step that declares ``stack`` is skipped."""
    skipped = set(skip)
    return not any(name in skipped for name in stack_steps(directory))
