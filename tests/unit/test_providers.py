"""The provider seam: ``provider_for`` picks by name, and every provider keeps the same interface.

The conformance checks run against the real libvirt and VirtualBox providers and the pipeline
tests' FakeProvider, for everything that needs no VM: host checks, driver and Vagrantfile
inputs, the Vagrant environment, the clean-up after a halt of a project with nothing running,
the box's cache key. The stage tests below then use the fake instead of patching functions.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance import vagrant
from appliance.checks import Check
from appliance.config import ApplianceConfig, load_config
from appliance.errors import UsageError
from appliance.pipeline import BuildContext, BuildOptions, stage_export, stage_halt
from appliance.providers.base import Provider
from appliance.providers.libvirt.provider import LibvirtProvider
from appliance.providers.registry import PROVIDERS, boot_backend_for, provider_for
from appliance.providers.virtualbox.provider import VirtualBoxProvider
from appliance.render import render_text
from appliance.state import BuildState
from tests.fake_provider import FakeProvider


def _cfg(tmp_path: Path, provider: str, *sets: str) -> ApplianceConfig:
    return load_config(None, [f"output.build_dir={tmp_path / 'build'}", f"output.dir={tmp_path / 'dist'}",
                              "provision.skip=[k3s, csghub]", *sets], provider, cwd=tmp_path)


def test_provider_for_picks_by_name_and_refuses_auto(tmp_path: Path) -> None:
    assert isinstance(provider_for(_cfg(tmp_path, "libvirt")), LibvirtProvider)
    assert isinstance(provider_for(_cfg(tmp_path, "virtualbox")), VirtualBoxProvider)
    with pytest.raises(UsageError, match="provider 'auto' is not resolved"):
        provider_for(_cfg(tmp_path, "auto"))
    assert sorted(PROVIDERS) == ["libvirt", "virtualbox"]


def test_boot_backend_follows_the_provider_and_auto_boots_under_qemu(tmp_path: Path) -> None:
    assert boot_backend_for(_cfg(tmp_path, "virtualbox")) == "virtualbox"
    assert boot_backend_for(_cfg(tmp_path, "libvirt")) == "qemu"
    assert boot_backend_for(_cfg(tmp_path, "auto")) == "qemu"


MAKERS: dict[str, Callable[[Path], Provider]] = {
    # libvirt.driver=qemu: the conformance run does not depend on the KVM probe.
    "libvirt": lambda tmp: LibvirtProvider(_cfg(tmp, "libvirt", "libvirt.driver=qemu")),
    "virtualbox": lambda tmp: VirtualBoxProvider(_cfg(tmp, "virtualbox")),
    "fake": lambda tmp: FakeProvider(_cfg(tmp, "libvirt", "libvirt.driver=qemu")),
}


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_every_provider_keeps_the_interface(kind: str, tmp_path: Path) -> None:
    provider = MAKERS[kind](tmp_path)
    assert isinstance(provider, Provider) and provider.name
    assert provider.boot_backend in ("qemu", "virtualbox")
    checks = provider.host_checks()
    assert checks and all(isinstance(c, Check) and c.verdict in ("ok", "warn", "fail") for c in checks)
    assert all(c.fix for c in checks if c.verdict == "fail"), "a failed check says how to fix it"
    env = provider.vagrant_env()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    driver = provider.resolve_driver()
    assert driver in (None, "kvm", "qemu")
    inputs = provider.vagrantfile_inputs(driver)
    assert inputs["provider"] == provider.name
    assert set(inputs) == {"provider", "libvirt_driver", "cpu_mode"}
    project = tmp_path / "project"
    project.mkdir()
    provider.after_halt(project)  # nothing ran in this project: nothing to end, no error
    assert list(project.iterdir()) == []
    digest = provider.box_digest("ab" * 32)
    assert re.fullmatch(r"[0-9a-f]{64}", digest) and digest == provider.box_digest("ab" * 32)


def test_the_libvirt_provider_renders_what_it_resolves(tmp_path: Path) -> None:
    provider = LibvirtProvider(_cfg(tmp_path, "libvirt", "libvirt.driver=qemu"))
    assert provider.resolve_driver() == "qemu"
    assert provider.vagrant_env() == {"LIBVIRT_DEFAULT_URI": provider.cfg.libvirt.uri}
    text = render_text(provider.cfg, output_dir=tmp_path)
    assert "lv.driver = 'qemu'" in text and "lv.cpu_mode = 'custom'" in text
    with pytest.raises(UsageError, match="cannot render libvirt driver 'auto'"):
        LibvirtProvider(_cfg(tmp_path, "libvirt")).vagrantfile_inputs(None)


# -- stages that ask the provider, with the fake ---------------------------------------------------


def _note(outcome: object) -> str:
    """A stage's note, whether the stage returns it as text or as an outcome object carrying ``note``."""
    return outcome if isinstance(outcome, str) else str(getattr(outcome, "note", ""))


def _ctx(tmp_path: Path, provider: FakeProvider, state: BuildState) -> BuildContext:
    ctx = BuildContext(cfg=provider.cfg, options=BuildOptions(), state=state)
    ctx.provider = provider
    return ctx


def test_halt_of_a_sealed_vm_releases_what_vagrant_would_have(tmp_path: Path) -> None:
    # The sealed VM powered itself off (here: it never ran), so Vagrant's halt did not run and the
    # provider's clean-up (vagrant-libvirt's port forwards) is the stage's to do.
    fake = FakeProvider(_cfg(tmp_path, "libvirt"))
    note = _note(stage_halt(_ctx(tmp_path, fake, BuildState(sealed=True))))
    assert note == "the sealed VM powered itself off"
    # No Vagrantfile and no machine recorded: the state needs no question to the hypervisor.
    assert fake.calls == [("after_halt", vagrant.project_dir(fake.cfg))]


def test_halt_of_a_vm_that_is_off_cleans_up_too(tmp_path: Path) -> None:
    fake = FakeProvider(_cfg(tmp_path, "libvirt"))
    stage_halt(_ctx(tmp_path, fake, BuildState()))
    assert ("after_halt", vagrant.project_dir(fake.cfg)) in fake.calls


def test_export_records_the_ova_and_the_disk_the_provider_names(tmp_path: Path, small_disk: Path) -> None:
    fake = FakeProvider(_cfg(tmp_path, "libvirt"), disk=small_disk)
    ctx = _ctx(tmp_path, fake, BuildState(sealed=True))
    note = _note(stage_export(ctx))
    staged = Path(ctx.state.staged_ova)
    assert staged.parent == ctx.staging_dir and staged.name == ctx.ova_name and staged.is_file()
    assert note.startswith(staged.name)
    assert ctx.state.disk_image == str(small_disk)
    assert len(ctx.state.staged_ova_sha256) == 64
    assert [c[0] for c in fake.calls] == ["export"]


def test_no_code_outside_the_providers_branches_on_the_providers_name() -> None:
    # The seam holds only while nobody goes around it: `cfg.provider == "libvirt"` belongs in
    # appliance/providers/ (config.py resolving `auto` is the one other reader of the name).
    root = Path(__file__).resolve().parents[2]
    branch = re.compile(r"provider\s*(==|!=)|provider\s+(not\s+)?in\s*\(")
    offenders = [
        f"{path.relative_to(root)}:{number}: {line.strip()}"
        for path in [*sorted((root / "appliance").rglob("*.py")), root / "tasks.py"]
        if "providers" not in path.parts and path.name != "config.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if branch.search(line)
    ]
    assert offenders == []


def _fake_vboxmanage(tmp_path: Path) -> Path:
    """A folder holding an executable named VBoxManage: all ``detect_provider`` looks for."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / "VBoxManage"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    return bin_dir


def test_auto_resolved_to_virtualbox_refuses_other_ovas_at_once(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``provider: auto`` on a VirtualBox host meets the rule an explicit ``provider: virtualbox`` meets, through
    ``config_from_flags``, the function every build task (build-ova, doctor, config) calls first."""
    from appliance.errors import ConfigError
    from tasks import config_from_flags

    sets = [f"output.build_dir={tmp_path / 'build'}", f"output.dir={tmp_path / 'dist'}",
            "output.formats=[vmware-ova]"]
    monkeypatch.chdir(tmp_path)  # no appliance.yaml read from the project
    monkeypatch.setenv("PATH", str(_fake_vboxmanage(tmp_path)))
    with pytest.raises(ConfigError) as info:
        config_from_flags(None, sets, None)
    with pytest.raises(ConfigError) as explicit:
        load_config(None, sets, "virtualbox", cwd=tmp_path)
    lines = str(info.value).splitlines()
    assert len(lines) == 2 and info.value.exit_code == 2
    assert lines[1].startswith("  - provider auto -> virtualbox (VBoxManage found at ")
    assert lines[1].endswith(str(explicit.value).splitlines()[1].split("output.formats = ", 1)[1])
    # The VirtualBox OVA with a disk format beside it is still fine; and without VirtualBox, libvirt builds all.
    assert config_from_flags(None, [*sets[:2], "output.formats=[virtualbox-ova,qcow2]"], None).provider == "virtualbox"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert config_from_flags(None, sets, None).provider == "libvirt"
