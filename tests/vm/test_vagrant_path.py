"""The developer's path on a real VM: `invoke render`, then plain `vagrant up`, then `invoke provision`.

`invoke render` (the real task, through the CLI) writes the project's Vagrantfile with libvirt
driver `auto` probed on this host; plain `vagrant up` (Vagrant's own provisioners, no code of
ours on the host) provisions base and firstboot (k3s and CSGHub are skipped: nothing can be
downloaded here). The step markers its wrapper leaves must be exactly those `invoke provision`
computes: it then finds every step done, changes nothing, and a changed setting reruns only
the steps that declare it. One TCG boot.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from appliance import vagrant, vm
from appliance.config import ApplianceConfig, public_dump
from appliance.providers.registry import provider_for
from appliance.run import run
from appliance.steps import DEFAULT_STATE_DIR, PlannedStep, ProvisionReport

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parents[2]
UP_TIMEOUT = 1200  # box upload, a TCG boot and the base and firstboot steps


def _plan(cfg: ApplianceConfig) -> dict[str, tuple[bool, str]]:
    steps = vm.provision(cfg, provider_for(cfg), list_plan=True)
    assert isinstance(steps, list)
    return {p.name: (p.run, p.reason) for p in steps if isinstance(p, PlannedStep)}


def test_render_then_plain_vagrant_up_leaves_the_markers_invoke_provision_expects(
    base_box: object, vm_config: Callable[..., ApplianceConfig], tmp_path: Path
) -> None:
    cfg = vm_config("vagrantpath", "libvirt.driver=auto")
    config_file = tmp_path / "appliance.yaml"
    config_file.write_text(yaml.safe_dump(public_dump(cfg), sort_keys=False))
    rendered = subprocess.run(
        [sys.executable, "-m", "invoke", "render", "--config", str(config_file), "--provider", "libvirt"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    project = vagrant.project_dir(cfg)
    text = (project / "Vagrantfile").read_text()
    # `auto` was probed, not guessed: on this host KVM hangs guests, and the render says qemu.
    driver = "kvm" if "lv.driver = 'kvm'" in text else "qemu"
    assert f"lv.driver = '{driver}'" in text
    assert "config.vm.provision 'k3s'" not in text and "config.vm.provision 'seal'" not in text

    try:
        env = {**vagrant.VAGRANT_ENV, **provider_for(cfg).vagrant_env()}
        up = run(["vagrant", "up", "--provider", "libvirt"], cwd=project, env=env, check=False, timeout=UP_TIMEOUT)
        assert up.ok, up.stdout[-4000:] + up.stderr[-4000:]
        assert "Running provisioner: base (shell)" in up.stdout and "Running provisioner: firstboot" in up.stdout

        endpoint = vm.ssh_config(cfg, provider_for(cfg))
        from appliance.ssh import RemoteSession

        with RemoteSession.from_config(cfg, endpoint) as session:
            listing = session.run(f"ls {DEFAULT_STATE_DIR}", timeout=60).stdout.split()
            assert listing == ["base.done", "firstboot.done"]
            marker = json.loads(session.run(f"cat {DEFAULT_STATE_DIR}/base.done", timeout=60).stdout)
        # The base step reads no setting; its inputs are its script and the shared helpers it declares (files=common).
        from appliance.scripts import discover_scripts
        from appliance.steps import support_files

        base = next(s for s in discover_scripts() if s.name == "base")
        helpers = {f"file:{relative}" for _, relative in support_files(base, base.path.parent)}
        assert helpers, "00-base.sh sources the shared shell helpers"
        assert marker["step"] == "base" and set(marker["inputs"]) == {"script", "env:PROVISION_DIR", *helpers}
        assert marker["seconds"] > 0 and marker["finished"].endswith("+00:00")

        plan = _plan(cfg)
        assert plan == {
            "base": (False, "done, inputs unchanged"),
            "k3s": (False, "skipped by configuration (provision.skip, --skip)"),
            "csghub": (False, "skipped by configuration (provision.skip, --skip)"),
            "firstboot": (False, "done, inputs unchanged"),
            "seal": (False, "final step (seals the VM): runs only when named with --only, as the seal stage does"),
        }
        report = vm.provision(cfg, provider_for(cfg))
        assert isinstance(report, ProvisionReport)
        assert {s.name: s.outcome for s in report.steps} == dict.fromkeys(plan, "skipped")

        # A changed setting reruns only the steps that declare it (and what follows them).
        changed_version = cfg.model_copy(update={"k3s": cfg.k3s.model_copy(update={"version": "v1.30.0+k3s1"})})
        assert not any(run_ for run_, _ in _plan(changed_version).values()), "no running step reads k3s.version"
        changed_domain = cfg.model_copy(update={"csghub": cfg.csghub.model_copy(update={"domain": "hub.test"})})
        plan = _plan(changed_domain)
        assert plan["base"] == (False, "done, inputs unchanged")
        assert plan["firstboot"] == (True, "inputs changed: env:CSGHUB_DOMAIN")
    finally:
        vm.destroy(cfg, provider_for(cfg))
