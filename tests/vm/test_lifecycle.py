"""The VM lifecycle on a real VM: base box -> render -> up -> SSH -> halt -> destroy, nothing left.

One boot (TCG, ~40-60 s plus the box upload into the pool), made under ``libvirt.driver=auto``
with the KVM probe's answer set to KVM (what this host's probe says): where KVM cannot run the
guest (this host), `up` removes it and boots it once more under TCG. The halted VM is then reported
and removed by the real ``invoke status`` / ``invoke destroy`` with its Vagrantfile gone. While the VM runs, the
"VM exists in another state" error is checked by pausing it with virsh, and the missing-box
error by a second config naming a box Vagrant does not have (no boot needed for either).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from appliance import vagrant, vm
from appliance.config import ApplianceConfig, public_dump
from appliance.errors import VagrantError
from appliance.providers.libvirt import hostprobe
from appliance.providers.libvirt.provider import domain_name
from appliance.providers.registry import provider_for
from appliance.ssh import RemoteSession

if TYPE_CHECKING:
    from tests.vm.conftest import LibvirtEnv

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parents[2]

UP_TIMEOUT = 900  # seconds for `vagrant up`, box upload included; TCG boots take ~40-60 s


def test_up_ssh_halt_destroy_leaves_nothing_behind(
    libvirt_env: LibvirtEnv, base_box: object, vm_config: Callable[..., ApplianceConfig], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The probe's answer, as on a host whose probe says KVM (this one's payload runs under KVM), kept in this
    # test's folder: under driver auto the Vagrantfile names KVM, and a guest KVM cannot run is booted again
    # under TCG (one boot serves this check and the lifecycle's).
    monkeypatch.setattr(hostprobe, "_probe_cache_dir", lambda: tmp_path)
    cache = tmp_path / hostprobe.CACHE_NAME
    cache.write_text(json.dumps({"boot_id": hostprobe.boot_id(), "driver": "kvm", "reason": "set by the test"}))
    cfg = vm_config("lifecycle", "libvirt.driver=auto")
    domain = domain_name(cfg)
    vagrantfile = vm.render(cfg, provider_for(cfg)).path
    assert vagrantfile == cfg.build_dir / "vm" / "Vagrantfile"
    text = vagrantfile.read_text()
    assert "config.vm.box = 'csghub/debian12'" in text
    assert "lv.driver = 'kvm'" in text  # the probe's (cached) answer
    assert f"lv.storage_pool_name = '{libvirt_env.pool}'" in text
    assert vm.status(cfg, provider_for(cfg)).state == "not_created"

    try:
        state = vm.up(cfg, provider_for(cfg), timeout=UP_TIMEOUT)
        assert state.running and state.provider == "libvirt"
        assert domain in libvirt_env.domains()
        driver = vm.rendered_driver(cfg, provider_for(cfg))
        if driver == "kvm":
            assert json.loads(cache.read_text())["driver"] == "kvm"  # KVM really runs guests on this host
        else:  # KVM could not run it: removed, booted again under TCG, and the probe now answers TCG
            assert driver == "qemu"
            recorded = json.loads(cache.read_text())
            assert recorded["driver"] == "qemu" and recorded["reason"].startswith("a real guest stopped under KVM")

        endpoint = vm.ssh_config(cfg, provider_for(cfg))
        assert endpoint.user == "vagrant"
        assert endpoint.host in _network_hosts(libvirt_env.network_cidr)
        assert endpoint.identity_files, "vagrant ssh-config listed no IdentityFile"
        assert all(p.name == "vagrant_ed25519" for p in endpoint.identity_files)
        with RemoteSession.from_config(cfg, endpoint) as session:
            result = session.run(
                ". /etc/os-release && echo codename=$VERSION_CODENAME && echo user=$(id -un) "
                "&& echo rootfs=$(findmnt -bno SIZE /) && systemctl is-active csghub-growroot ssh",
                sudo=False,
                timeout=120,
            )
            fields = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
            assert fields["codename"] == "bookworm"
            assert fields["user"] == "vagrant"
            # The box's 4 GB root grew to the 8 GB disk vagrant-libvirt gave the VM.
            assert int(fields["rootfs"]) > 7 * 1000**3
            assert result.stdout.splitlines()[-2:] == ["active", "active"]
            assert session.run("id -u", timeout=60).stdout.strip() == "0"  # passwordless sudo

        # A VM in a state `up` does not handle is refused with advice, not "resumed" blindly.
        libvirt_env.virsh("suspend", domain)
        try:
            with pytest.raises(VagrantError, match="state 'paused'") as err:
                vm.up(cfg, provider_for(cfg), timeout=UP_TIMEOUT)
            assert "invoke destroy" in str(err.value)
        finally:
            libvirt_env.virsh("resume", domain)

        assert vm.halt(cfg, provider_for(cfg)).stopped
        assert vm.status(cfg, provider_for(cfg)).state == "shutoff"

        # The Vagrantfile is gone (and no artifacts were ever fetched: rendering one again would need
        # them): `invoke status` and `invoke destroy` still report and remove the VM Vagrant recorded.
        vagrantfile.unlink()
        config_file = tmp_path / "appliance.yaml"
        config_file.write_text(yaml.safe_dump(public_dump(cfg), sort_keys=False))
        status = _invoke("status", config_file, tmp_path)
        assert status.stdout.strip().split("\t") == ["default", "shutoff", "libvirt"], status.stderr
        _invoke("destroy", config_file, tmp_path)
        assert domain not in libvirt_env.domains()
        assert not (cfg.build_dir / "vm" / "Vagrantfile").exists(), "nothing was rendered"
        assert _invoke("status", config_file, tmp_path).stdout.strip().split("\t")[1] == "not_created"
    finally:
        vm.destroy(cfg, provider_for(cfg))

    assert vm.status(cfg, provider_for(cfg)).state == "not_created"
    assert domain not in libvirt_env.domains()
    assert not [v for v in libvirt_env.volumes() if v.startswith(domain)], libvirt_env.volumes()
    assert libvirt_env.network not in libvirt_env.networks()
    # Only the base box's image stays in the pool (vagrant-libvirt shares it between VMs).
    assert all("vagrant_box_image" in v for v in libvirt_env.volumes())


def _invoke(task: str, config_file: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The real ``invoke TASK``, with an empty artifact cache."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "empty-cache"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "invoke", task, "--config", str(config_file), "--provider", "libvirt"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "invoke fetch" not in proc.stdout + proc.stderr
    return proc


def test_up_without_the_box_says_how_to_get_it(
    libvirt_env: LibvirtEnv, vm_config: Callable[..., ApplianceConfig]
) -> None:
    cfg = vm_config("nobox", "vm.box=csghub/no-such-box")
    with pytest.raises(VagrantError) as err:
        vm.up(cfg, provider_for(cfg), timeout=UP_TIMEOUT, render_first=True)
    assert "no box 'csghub/no-such-box'" in err.value.message
    assert err.value.hint is not None and "vagrant box add csghub/no-such-box" in err.value.hint
    assert domain_name(cfg) not in libvirt_env.domains()


def test_up_refuses_a_domain_of_the_same_name_from_outside_the_project(
    libvirt_env: LibvirtEnv, base_box: object, vm_config: Callable[..., ApplianceConfig], tmp_path: Path
) -> None:
    cfg = vm_config("squatter")
    domain = domain_name(cfg)
    xml = tmp_path / "squatter.xml"
    xml.write_text(
        f"<domain type='qemu'><name>{domain}</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64'>hvm</type></os></domain>"
    )
    libvirt_env.virsh("define", str(xml))
    try:
        with pytest.raises(VagrantError) as err:
            vm.up(cfg, provider_for(cfg), timeout=UP_TIMEOUT, render_first=True)
        assert f"a libvirt domain named '{domain}' already exists (shut off)" in err.value.message
        assert err.value.hint is not None and f"virsh undefine {domain}" in err.value.hint
    finally:
        libvirt_env.virsh("undefine", domain, check=False)
    assert domain not in libvirt_env.domains()


def test_up_that_runs_out_of_time_names_its_phase(
    libvirt_env: LibvirtEnv, base_box: object, vm_config: Callable[..., ApplianceConfig]
) -> None:
    # 25 s is past creating the domain; under TCG SSH usually answers later, but on a quiet
    # machine the guest can be up by then and Vagrant still busy (hostname, ...): every phase
    # Vagrant reports is a correct answer, as long as the error names one.
    cfg = vm_config("timeout")
    domain = domain_name(cfg)
    try:
        with pytest.raises(VagrantError) as err:
            vm.up(cfg, provider_for(cfg), timeout=25, render_first=True)
        message = err.value.message
        assert message.startswith("`vagrant up` failed (timed out after 25 s while ")
        phase = message.split(" while ", 1)[1].split(")", 1)[0]
        assert phase in {name for _, name in vagrant.PHASES} - {"provisioning"}, message
        assert err.value.hint is not None and "vm.boot_timeout" in err.value.hint
    finally:
        if vm.status(cfg, provider_for(cfg)).exists:
            vm.destroy(cfg, provider_for(cfg))
        # Killed mid-way, Vagrant may not have recorded the domain yet: remove it by name.
        if domain in libvirt_env.domains():
            libvirt_env.virsh("destroy", domain, check=False)
            libvirt_env.virsh("undefine", domain, "--remove-all-storage", check=False)
    assert domain not in libvirt_env.domains()


def _network_hosts(cidr: str) -> set[str]:
    import ipaddress

    return {str(h) for h in ipaddress.ip_network(cidr).hosts()}


def test_halt_and_destroy_of_a_vm_that_does_not_exist_change_nothing(
    libvirt_env: LibvirtEnv, vm_config: Callable[..., ApplianceConfig], tmp_path: Path
) -> None:
    cfg = vm_config("absent")
    assert vm.halt(cfg, provider_for(cfg)).state == "not_created"
    vm.destroy(cfg, provider_for(cfg))
    assert vm.status(cfg, provider_for(cfg)).state == "not_created"
