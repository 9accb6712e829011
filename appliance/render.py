"""Render stage: ``Vagrantfile.j2`` -> ``Vagrantfile``.

The same config gives byte-identical output. Every config value reaches Ruby as a
single-quoted literal (``rb``), so no value can inject Ruby code; environment values for
Vagrant's shell provisioner are additionally escaped for the double quotes Vagrant wraps
them in on the guest (``rb_shell_env``), so no value can inject shell code either.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from appliance.config import PROJECT_ROOT, ApplianceConfig, guest_environment
from appliance.errors import UsageError
from appliance.scripts import GUEST_PROVISION_DIR, PROVISION_DIR, selected_scripts

TEMPLATE = PROJECT_ROOT / "Vagrantfile.j2"


@dataclass(frozen=True)
class Upload:
    """A host file the Vagrant path uploads before provisioning (pinned artifacts)."""

    name: str  # unique file name in the guest's staging folder
    source: str
    destination: str


def ruby_literal(value: object) -> str:
    """A Ruby single-quoted string literal: only ``\\`` and ``'`` are special inside it."""
    text = str(value)
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def vagrant_shell_env_literal(value: object) -> str:
    """A Ruby literal for a shell-provisioner ``env`` value that stays inert on the guest.

    Vagrant 2.x builds ``KEY="value"`` (quote_and_escape in its shell provisioner), only
    escaping ``"``. Inside double quotes the shell still expands ``$``, backquotes and
    ``\\``; escaping those three first makes the guest receive the value byte for byte.
    """
    text = str(value)
    for ch in ("\\", "$", "`"):
        text = text.replace(ch, "\\" + ch)
    return ruby_literal(text)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE.parent)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # output is Ruby, escaped by the rb filters
    )
    env.filters["rb"] = ruby_literal
    env.filters["rb_shell_env"] = vagrant_shell_env_literal
    return env


def render_text(
    cfg: ApplianceConfig,
    *,
    output_dir: Path,
    libvirt_driver: str | None = None,
    uploads: Sequence[Upload] = (),
    provision_dir: Path = PROVISION_DIR,
) -> str:
    """The Vagrantfile text for ``cfg`` as it would be written into ``output_dir``."""
    if cfg.provider not in ("virtualbox", "libvirt"):
        raise UsageError(
            f"cannot render for provider {cfg.provider!r}: resolve 'auto' first (virtualbox or libvirt)"
        )
    driver = libvirt_driver or cfg.libvirt.driver
    if driver == "auto":
        driver = "kvm"
    cpu_mode = cfg.libvirt.cpu_mode
    if cpu_mode == "auto":
        cpu_mode = "host-passthrough" if driver == "kvm" else "custom"
    project_root = os.path.relpath(PROJECT_ROOT, output_dir.resolve())
    env = dict(guest_environment(cfg))
    env["PROVISION_DIR"] = GUEST_PROVISION_DIR
    context: dict[str, Any] = {
        "cfg": cfg,
        "provider": cfg.provider,
        "libvirt_driver": driver,
        "cpu_mode": cpu_mode,
        "project_root": project_root,
        "guest_dir": GUEST_PROVISION_DIR,
        # Sealing ends a VM's life as a build machine (its key is removed, it powers off): only
        # `invoke build-ova` seals, right before it exports; a developer's `vagrant up` never does.
        "scripts": selected_scripts(list(cfg.provision.skip), provision_dir, include_final=False),
        "env": dict(sorted(env.items())),
        "uploads": list(uploads),
        "install_uploads": _install_uploads_command(uploads),
    }
    return _environment().get_template(TEMPLATE.name).render(context)


def _install_uploads_command(uploads: Sequence[Upload]) -> str:
    """The guest command that moves staged uploads to their root-owned destinations (quoted)."""
    staged = f"{GUEST_PROVISION_DIR}/uploads"
    return " && ".join(
        f"install -D -m 0644 {shlex.quote(staged + '/' + up.name)} {shlex.quote(up.destination)}" for up in uploads
    )


def render_vagrantfile(
    cfg: ApplianceConfig,
    output: str | Path = "Vagrantfile",
    *,
    libvirt_driver: str | None = None,
    uploads: Sequence[Upload] = (),
) -> Path:
    """Write the Vagrantfile for ``cfg`` to ``output`` (atomically) and return its path.

    ``libvirt_driver`` is the resolved driver when ``cfg.libvirt.driver`` is ``auto``
    (see ``appliance.hostprobe``); without it ``auto`` renders as ``kvm``.
    """
    path = Path(output)
    if path.is_dir():
        path = path / "Vagrantfile"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render_text(cfg, output_dir=path.parent, libvirt_driver=libvirt_driver, uploads=uploads)
    # A temporary file of our own in the target folder (never a fixed name a symlink could sit on),
    # renamed over the target: readers see the old file or the new one, never half of one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a Vagrantfile holds no secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def dump_yaml(data: Any) -> str:
    """YAML for people: block style, keys in declaration order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
