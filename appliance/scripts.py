"""The provisioning scripts in ``provision/``: discovery and their declared properties.

A script is ``provision/NN-<name>.sh``; ``<name>`` is the step name used by ``--skip``,
``--only`` and ``provision.skip``. Header comments of the form ``# appliance: KEY[=VALUE]``
declare properties the runners honour:

- ``# appliance: reboot-after`` - the guest is rebooted after the script succeeds (the
  Paramiko runner waits for it to come back; the Vagrantfile uses ``reboot: true``).
- ``# appliance: timeout=SECONDS`` - default timeout for this step (config may override).
- ``# appliance: files=DIR`` - a directory under ``provision/files/`` the script needs; it
  is uploaded to ``$PROVISION_DIR/files/DIR`` before the script runs.
- ``# appliance: uploads`` - the script reads the pinned artifacts and generated manifests
  (``appliance.artifacts.guest_uploads``): they are installed on the guest before it runs and
  their digests are part of its step marker, so a changed chart value re-runs it.
- ``# appliance: final`` - the last step (seal): after it the build cannot log in.
- ``# appliance: env=NAME[,NAME...]`` - the guest variables (``guest_environment``) the script
  reads. It receives only those (and ``PROVISION_DIR``), and its step marker hashes only
  those, so a changed setting reruns only the steps that read it (and the steps after
  them). An unknown name is an error naming the script and the variable. No ``env=`` line:
  the script reads no setting.

Scripts find their support files under ``$PROVISION_DIR`` (``/var/tmp/csghub-provision``),
which every step receives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from appliance.config import PROJECT_ROOT, ApplianceConfig, guest_environment
from appliance.errors import UsageError

PROVISION_DIR = PROJECT_ROOT / "provision"
GUEST_PROVISION_DIR = "/var/tmp/csghub-provision"
_NAME = re.compile(r"^(\d{2})-([a-z0-9][a-z0-9-]*)\.sh$")
_HEADER = re.compile(r"^#\s*appliance:\s*([a-z-]+)(?:=(\S*))?\s*$")
_VARIABLE = re.compile(r"^[A-Z][A-Z0-9_]*$")
# Where the step's scripts and support files are on the guest: every step receives it.
PROVISION_DIR_VARIABLE = "PROVISION_DIR"


@cache
def guest_variable_names() -> frozenset[str]:
    """Every variable a step may declare with ``env=``: the guest environment's names (which do
    not depend on the values) and ``PROVISION_DIR``."""
    return frozenset(guest_environment(ApplianceConfig())) | {PROVISION_DIR_VARIABLE}


@dataclass(frozen=True)
class ProvisionScript:
    number: int
    name: str
    path: Path
    reboot_after: bool = False
    timeout: int | None = None
    files: tuple[str, ...] = field(default_factory=tuple)
    uses_uploads: bool = False
    final: bool = False
    env: tuple[str, ...] = field(default_factory=tuple)

    @property
    def filename(self) -> str:
        return self.path.name


def discover_scripts(directory: Path = PROVISION_DIR) -> list[ProvisionScript]:
    """Every ``NN-name.sh`` in ``directory``, in order, with its header properties.

    Raises ``UsageError`` for an ``env=`` line that is empty or names an unknown variable.
    """
    known = guest_variable_names()
    scripts = []
    for path in sorted(directory.glob("*.sh")):
        m = _NAME.match(path.name)
        if not m:
            continue
        reboot, timeout, files, uploads, final = False, None, [], False, False
        env: list[str] = []
        for line in path.read_text(encoding="utf-8").splitlines()[:40]:
            h = _HEADER.match(line.strip())
            if not h:
                continue
            key, value = h.group(1), h.group(2)
            if key == "reboot-after":
                reboot = True
            elif key == "timeout" and value and value.isdigit():
                timeout = int(value)
            elif key == "files" and value:
                files.append(value)
            elif key == "uploads":
                uploads = True
            elif key == "final":
                final = True
            elif key == "env":
                env += _declared_variables(path, value or "", known)
        scripts.append(
            ProvisionScript(int(m.group(1)), m.group(2), path, reboot, timeout, tuple(files), uploads, final,
                            tuple(sorted(set(env))))
        )
    return scripts


def _declared_variables(path: Path, value: str, known: frozenset[str]) -> list[str]:
    """The names of one ``# appliance: env=A,B`` line, each checked against ``known``."""
    names = [n.strip() for n in value.split(",")]
    if not value or any(not n for n in names):
        raise UsageError(
            f"{path.name}: `# appliance: env={value}` lists an empty variable name",
            hint="write the names comma-separated without spaces, e.g. `# appliance: env=K3S_VERSION,K3S_NODE_IP`; "
            "a script that reads no setting has no env= line",
        )
    for name in names:
        if not _VARIABLE.match(name) or name not in known:
            raise UsageError(
                f"{path.name}: `# appliance: env=` names {name!r}, which is not a guest variable",
                hint=f"known variables: {', '.join(sorted(known))} (set by the config fields marked env)",
            )
    return names


def selected_scripts(
    skip: list[str], directory: Path = PROVISION_DIR, *, include_final: bool = True
) -> list[ProvisionScript]:
    """The scripts not skipped; ``include_final=False`` also leaves out the final (seal) step."""
    return [s for s in discover_scripts(directory) if s.name not in skip and (include_final or not s.final)]
