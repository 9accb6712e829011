"""The one Vagrantfile render (appliance.vagrant.render): probed driver, pinned uploads, step markers."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import vagrant, vm
from appliance.config import ApplianceConfig, load_config
from appliance.errors import ArtifactError
from appliance.guest import guest_environment
from appliance.needs import guest_uploads
from appliance.providers.libvirt import hostprobe
from appliance.providers.registry import provider_for
from appliance.scripts import GUEST_PROVISION_DIR, discover_scripts
from appliance.steps import digests_by_need, pinned_uploads, step_inputs


def _cfg(tmp_path: Path, *sets: str) -> ApplianceConfig:
    return load_config(None, [f"output.build_dir={tmp_path / 'build'}", f"artifacts.cache_dir={tmp_path / 'cache'}",
                              "libvirt.driver=auto", *sets], "libvirt", cwd=tmp_path)


@pytest.fixture
def probe_says_qemu(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The host probe's answer where /dev/kvm hangs guests (the real probe: test_vagrant_hostprobe.py)."""
    calls: list[str] = []

    def detect(**_: object) -> tuple[str, str]:
        calls.append("probe")
        return "qemu", "KVM needed 15.0 s for a 512-byte test guest"

    monkeypatch.setattr(hostprobe, "detect_libvirt_driver", detect)
    return calls


def _markers(text: str) -> dict[str, dict[str, object]]:
    found = re.findall(r"'APPLIANCE_STEP_MARKER' => '(\{.*\})',", text)
    return {m["step"]: m for m in (json.loads(f) for f in found)}


def test_missing_artifacts_are_refused_with_a_pointer_to_invoke_fetch(
    tmp_path: Path, probe_says_qemu: list[str]
) -> None:
    cfg = _cfg(tmp_path)
    with pytest.raises(ArtifactError) as err:
        vm.render(cfg, provider_for(cfg))
    assert "not in the artifact cache" in err.value.message and str(tmp_path / "cache") in err.value.message
    assert err.value.hint is not None and "invoke fetch" in err.value.hint
    assert not (vagrant.project_dir(cfg) / "Vagrantfile").exists(), "no Vagrantfile that fails at the k3s step"


def test_render_probes_auto_and_carries_uploads_and_the_runners_markers(
    tmp_path: Path, probe_says_qemu: list[str], helm_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    from appliance.artifacts import planned_artifacts
    from tests.chart import CHART_DIR

    cfg = _cfg(tmp_path)
    # The chart must be a real one: the render computes the image set of these values from it (a real helm).
    monkeypatch.setenv("APPLIANCE_HELM", str(helm_bin))
    for artifact in planned_artifacts(cfg):
        artifact.cache_path.parent.mkdir(parents=True, exist_ok=True)
        if artifact.group == "csghub_chart":
            subprocess.run([str(helm_bin), "package", str(CHART_DIR), "-d", str(artifact.cache_path.parent)],
                           check=True, capture_output=True)
    for local in (up.local for up in guest_uploads(cfg)):
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(b"artifact " + local.name.encode())
    rendered = vm.render(cfg, provider_for(cfg))
    assert rendered.path == vagrant.project_dir(cfg) / "Vagrantfile"
    assert rendered.libvirt_driver == "qemu" and probe_says_qemu == ["probe"]
    text = rendered.path.read_text()
    assert "lv.driver = 'qemu'" in text and "lv.cpu_model = 'qemu64'" in text

    uploads = pinned_uploads(cfg)
    assert uploads and all(f"destination: '{GUEST_PROVISION_DIR}/uploads/" in text for _ in uploads)
    digests = digests_by_need([(up.need, up.guest, hashlib.sha256(up.local.read_bytes()).hexdigest())
                               for up in uploads])
    markers = _markers(text)
    assert sorted(markers) == ["base", "csghub", "firstboot", "k3s"]  # never seal
    # Each marker is what the SSH runner computes for the same step (appliance.steps.step_inputs).
    env = {**guest_environment(cfg), "PROVISION_DIR": GUEST_PROVISION_DIR}
    for script in discover_scripts():
        if script.name in markers:
            expected = step_inputs(script, env, script.path.parent, digests)
            assert markers[script.name]["digest"] == expected.digest, script.name
            assert markers[script.name]["inputs"] == expected.inputs, script.name
    k3s_inputs = markers["k3s"]["inputs"]
    assert isinstance(k3s_inputs, dict)
    assert {k for k in k3s_inputs if k.startswith("env:")} == {
        "env:K3S_EXTRA_ARGS", "env:K3S_NODE_IP", "env:K3S_VERSION", "env:PROVISION_DIR"}
    # Each step hashes the files of its own needs only: a changed chart value (a manifest) reruns csghub, not k3s.
    assert sorted(k for k in k3s_inputs if k.startswith("upload:")) == [
        "upload:/var/cache/csghub-appliance/artifacts/k3s",
        "upload:/var/cache/csghub-appliance/artifacts/k3s-airgap-images-amd64.tar.zst"]
    csghub_inputs = markers["csghub"]["inputs"]
    assert isinstance(csghub_inputs, dict)
    assert "upload:/var/cache/csghub-appliance/manifests/csghub.yaml" in csghub_inputs
    assert "upload:/var/cache/csghub-appliance/manifests/images.txt" in csghub_inputs
    base_inputs = markers["base"]["inputs"]
    assert isinstance(base_inputs, dict) and not any(k.startswith("upload:") for k in base_inputs)


def test_render_to_another_place_and_a_configured_driver(tmp_path: Path, probe_says_qemu: list[str]) -> None:
    cfg = _cfg(tmp_path, "provision.skip={k3s,csghub}", "libvirt.driver=kvm")
    rendered = vm.render(cfg, provider_for(cfg), tmp_path / "elsewhere" / "Vagrantfile")
    assert rendered.path == tmp_path / "elsewhere" / "Vagrantfile"
    assert "lv.driver = 'kvm'" in rendered.path.read_text()
    assert probe_says_qemu == [], "a configured driver is not probed"
    assert "'uploads-install'" not in rendered.path.read_text()


def test_status_of_a_project_never_rendered_needs_no_vagrantfile(tmp_path: Path) -> None:
    cfg = load_config(None, [f"output.build_dir={tmp_path / 'build'}", "provider=virtualbox"], cwd=tmp_path)
    assert vm.status(cfg, provider_for(cfg)).state == "not_created"
    assert not (vagrant.project_dir(cfg) / "Vagrantfile").exists()


def test_invoke_render_without_artifacts_exits_cleanly_pointing_at_invoke_fetch(tmp_path: Path) -> None:
    """The real task, through the CLI: a clear refusal, no traceback, no Vagrantfile."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "invoke", "render", "--provider", "libvirt", "--set", "libvirt.driver=qemu",
         "--set", f"artifacts.cache_dir={tmp_path / 'cache'}", "--set", f"output.build_dir={tmp_path / 'build'}"],
        cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode != 0
    assert "not in the artifact cache" in done.stderr and "invoke fetch" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "build" / "vm" / "Vagrantfile").exists()
