"""Preflight errors that need the real tools but no running service: libvirt unreachable, box missing.

The preflight before ``vagrant up`` and ``invoke doctor`` share one libvirt check
(``appliance.providers.libvirt.provider``): both are exercised here against the same unreachable socket.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import vagrant, vm
from appliance.config import load_config
from appliance.doctor import collect_checks
from appliance.errors import PrerequisiteMissing, VagrantError
from appliance.providers.libvirt.provider import domain_name
from appliance.providers.registry import provider_for
from appliance.run import which


@pytest.mark.skipif(which("virsh") is None, reason="virsh (libvirt-clients) is not installed")
def test_unreachable_libvirt_says_how_to_start_it(tmp_path: Path) -> None:
    cfg = load_config(None, [f"libvirt.uri=qemu+unix:///system?socket={tmp_path}/no-libvirt-sock"], "libvirt",
                      cwd=tmp_path)
    with pytest.raises(PrerequisiteMissing) as err:
        provider_for(cfg).check_reachable()
    assert err.value.message.startswith("libvirt: not reachable at qemu+unix:///system")
    assert err.value.hint is not None
    # Not the system instance: the hint names that instance rather than a daemon command for another one.
    assert f"start the libvirt instance qemu+unix:///system?socket={tmp_path}/no-libvirt-sock" in err.value.hint
    # The doctor shows the same check, with the same fix, as a failed row.
    (row,) = [c for c in collect_checks(cfg) if c.name == "libvirt"]
    assert row.verdict == "fail" and row.found == err.value.message.removeprefix("libvirt: ")
    assert row.fix == err.value.hint


@pytest.mark.skipif(which("virsh") is None, reason="virsh (libvirt-clients) is not installed")
def test_up_stops_at_the_preflight_before_touching_the_project(tmp_path: Path) -> None:
    cfg = load_config(None, [f"libvirt.uri=qemu+unix:///system?socket={tmp_path}/no-libvirt-sock",
                             f"output.build_dir={tmp_path / 'build'}"], "libvirt", cwd=tmp_path)
    with pytest.raises(PrerequisiteMissing, match="not reachable"):
        vm.up(cfg, provider_for(cfg))
    assert not vagrant.project_dir(cfg).exists()


@pytest.mark.skipif(which("vagrant") is None, reason="vagrant is not installed")
def test_a_missing_box_names_the_box_and_how_to_get_it(tmp_path: Path) -> None:
    cfg = load_config(None, ["vm.box=csghub/no-such-box", f"output.build_dir={tmp_path}"], "libvirt", cwd=tmp_path)
    with pytest.raises(VagrantError) as err:
        vm.check_box(cfg, "libvirt")
    assert "Vagrant has no box 'csghub/no-such-box' for provider libvirt" in err.value.message
    assert err.value.hint == "get it with `vagrant box add csghub/no-such-box --provider libvirt`"


@pytest.mark.skipif(which("vagrant") is None, reason="vagrant is not installed")
def test_the_default_box_points_at_invoke_base_box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty Vagrant home: no boxes at all, as on a fresh machine.
    monkeypatch.setenv("VAGRANT_HOME", str(tmp_path / "vagrant.d"))
    cfg = load_config(None, [f"output.build_dir={tmp_path}"], "libvirt", cwd=tmp_path)
    with pytest.raises(VagrantError) as err:
        vm.check_box(cfg, "libvirt")
    assert "(boxes here: none)" in err.value.message
    assert err.value.hint == "get it with `invoke base-box --provider libvirt`"


def test_the_domain_name_follows_the_vagrantfile_prefix(tmp_path: Path) -> None:
    cfg = load_config(None, ["vm.name=my-vm"], "libvirt", cwd=tmp_path)
    assert domain_name(cfg) == "my-vm_default"
    assert vagrant.project_dir(cfg) == cfg.build_dir / "vm"


@pytest.mark.skipif(which("vagrant") is None, reason="vagrant is not installed")
def test_the_wrapper_names_the_failed_command_with_vagrants_own_words(tmp_path: Path) -> None:
    # The real Vagrant, asked about a machine in a folder without a Vagrantfile.
    with pytest.raises(VagrantError) as err:
        vagrant.Vagrant(tmp_path).run("status", "--machine-readable", vagrant.MACHINE)
    assert err.value.message.startswith("`vagrant status` failed (exit status 1)")
    assert "Vagrantfile" in err.value.message  # the tail of Vagrant's stderr


@pytest.mark.skipif(which("vagrant") is None, reason="vagrant is not installed")
def test_the_wrapper_bounds_a_command_in_time(tmp_path: Path) -> None:
    with pytest.raises(VagrantError, match=r"`vagrant box list` failed \(timed out after 0 s\)"):
        vagrant.Vagrant(tmp_path).run("box", "list", "--machine-readable", timeout=0.2)


def test_without_vagrant_on_path_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vagrant, "which", lambda program: None)
    with pytest.raises(PrerequisiteMissing, match="vagrant is not installed") as err:
        vagrant.Vagrant()
    assert err.value.hint is not None and "apt-get install" in err.value.hint
