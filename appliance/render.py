"""Render stage: ``Vagrantfile.j2`` -> ``Vagrantfile``.

The same config gives byte-identical output. Every config value reaches Ruby as a
single-quoted literal (``rb``), so no value can inject Ruby code; environment values for
Vagrant's shell provisioner are additionally escaped for the double quotes Vagrant wraps
them in on the guest (``rb_shell_env``), so no value can inject shell code either.

Each step's shell provisioner runs the step under ``provision/files/common/run-step.sh``
with the variables the step declares and its marker, computed here by the same function
the SSH runner uses (``appliance.steps.step_inputs``): a VM provisioned by ``vagrant up``
carries the markers ``invoke provision`` expects. Callers render through
``appliance.vm.render``, which resolves libvirt driver ``auto`` and adds the uploads.
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

from appliance.config import PROJECT_ROOT, ApplianceConfig
from appliance.guest import guest_environment
from appliance.providers.registry import provider_for
from appliance.scripts import GUEST_PROVISION_DIR, PROVISION_DIR, PROVISION_DIR_VARIABLE, selected_scripts

TEMPLATE = PROJECT_ROOT / "Vagrantfile.j2"


@dataclass(frozen=True)
class Upload:
    """A host file the Vagrant path uploads before provisioning (what the steps' needs name)."""

    name: str  # unique file name in the guest's staging folder
    source: str
    destination: str
    sha256: str  # part of the markers of the steps that declare its need
    need: str  # the need it serves (appliance.guest.NEEDS)


@dataclass(frozen=True)
class VagrantStep:
    """One step's shell provisioner: its name, guest command and environment (inputs + marker)."""

    name: str
    command: str
    env: dict[str, str]
    reboot_after: bool


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
    # The provider block's inputs come from the provider (an unresolved `auto` provider is refused there).
    facts = provider_for(cfg).vagrantfile_inputs(libvirt_driver)
    context: dict[str, Any] = {
        "cfg": cfg,
        **facts,
        "provision_root": os.path.relpath(provision_dir.resolve(), output_dir.resolve()),
        "guest_dir": GUEST_PROVISION_DIR,
        "steps": vagrant_steps(cfg, provision_dir, uploads),
        "uploads": list(uploads),
        "install_uploads": _install_uploads_command(uploads),
        # The login user uploads the scripts (Vagrant's file provisioner): it owns the folder.
        "provision_dir_command": "install -d -m 0755 -o {user} {files} && chown -R {user} {guest}".format(
            user=shlex.quote(cfg.ssh.user), guest=shlex.quote(GUEST_PROVISION_DIR),
            files=shlex.quote(f"{GUEST_PROVISION_DIR}/files")),
    }
    return _environment().get_template(TEMPLATE.name).render(context)


def vagrant_steps(cfg: ApplianceConfig, provision_dir: Path, uploads: Sequence[Upload]) -> list[VagrantStep]:
    """The steps ``vagrant up`` runs, each with exactly what ``invoke provision`` would pass it.

    Sealing ends a VM's life as a build machine (its key is removed, it powers off): only
    ``invoke build-ova`` seals, right before it exports; a developer's ``vagrant up`` never does.
    """
    from appliance.steps import STEP_WRAPPER, digests_by_need, resolve_state_dir, step_environment, step_inputs

    env = {**guest_environment(cfg), PROVISION_DIR_VARIABLE: GUEST_PROVISION_DIR}
    digests = digests_by_need([(up.need, up.destination, up.sha256) for up in uploads])
    state_dir = resolve_state_dir(None)
    steps = []
    for script in selected_scripts(list(cfg.provision.skip), provision_dir, include_final=False):
        inputs = step_inputs(script, env, provision_dir, digests)
        command = shlex.join(
            ["bash", f"{GUEST_PROVISION_DIR}/{STEP_WRAPPER}", f"{GUEST_PROVISION_DIR}/{script.filename}"]
        )
        step_env = {**step_environment(script, env), **inputs.wrapper_env(state_dir)}
        steps.append(VagrantStep(script.name, command, step_env, script.reboot_after))
    return steps


def pinned_render_uploads(cfg: ApplianceConfig) -> list[Upload]:
    """What the steps ``vagrant up`` runs need from the host (``appliance.steps.pinned_uploads``), as
    the Vagrantfile uploads them; ``ArtifactError`` when the cache lacks one (``invoke fetch``)."""
    from appliance.digest import sha256_file
    from appliance.steps import pinned_uploads

    return [Upload(name=f"{i:02d}-{up.local.name}", source=str(up.local), destination=up.guest,
                   sha256=sha256_file(up.local), need=up.need)
            for i, up in enumerate(pinned_uploads(cfg))]


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
    (see ``appliance.providers.libvirt.hostprobe``); an unresolved ``auto`` is refused. Use
    ``appliance.vm.render``, which resolves it and adds the pinned uploads.
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
