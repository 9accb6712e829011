"""`vagrant up` through vagrant-libvirt notices a guest that stopped running, in seconds.

A domain suspended while Vagrant waits for its address (`virsh suspend`, as libvirt pauses a
guest after a ``KVM internal error``) fails `up` with the domain's state and libvirt's reason,
well within a minute instead of at vm.boot_timeout. Under ``libvirt.driver=auto`` with the
probe's answer set to KVM (what this host's probe says), a guest KVM cannot run here is removed
and booted once more under TCG. One TCG boot in all, plus a domain that is stopped early.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance import hostprobe, vagrant
from appliance.config import ApplianceConfig
from appliance.errors import GuestStopped
from appliance.providers.libvirt import domain_name
from appliance.run import run

pytestmark = pytest.mark.vm


def test_a_suspended_domain_fails_up_within_a_minute(base_box: object, vm_config: Callable[..., ApplianceConfig],
                                                     libvirt_env: object) -> None:
    cfg = vm_config("paused", "libvirt.driver=qemu")
    domain = domain_name(cfg)
    suspended: list[float] = []

    def suspend_when_running() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            state = run(["virsh", "-c", cfg.libvirt.uri, "domstate", domain], check=False, timeout=30).stdout
            if state.strip() == "running":
                run(["virsh", "-c", cfg.libvirt.uri, "suspend", domain], timeout=30)
                suspended.append(time.monotonic())
                return
            time.sleep(0.5)

    suspender = threading.Thread(target=suspend_when_running)
    suspender.start()
    try:
        with pytest.raises(GuestStopped) as err:
            vagrant.up(cfg, render_first=True)
        failed = time.monotonic()
        suspender.join()
        assert suspended, "the domain never ran"
        assert failed - suspended[0] < 60
        assert f"the libvirt domain {domain} stopped running under qemu: paused (user)" in err.value.message
    finally:
        suspender.join()
        vagrant.destroy(cfg)


def test_auto_boots_again_under_tcg_when_kvm_cannot_run_the_guest(
    base_box: object, vm_config: Callable[..., ApplianceConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hostprobe, "_probe_cache_dir", lambda: tmp_path)
    cache = tmp_path / hostprobe.CACHE_NAME
    cache.write_text(json.dumps({"boot_id": hostprobe.boot_id(), "driver": "kvm", "reason": "set by the test"}))
    cfg = vm_config("fallback", "libvirt.driver=auto")
    try:
        started = time.monotonic()
        assert vagrant.up(cfg, render_first=True).running
        driver = vagrant.rendered_driver(cfg)
        if driver == "kvm":
            assert json.loads(cache.read_text())["driver"] == "kvm"  # KVM really runs guests on this host
        else:
            assert driver == "qemu"
            recorded = json.loads(cache.read_text())
            assert recorded["driver"] == "qemu" and recorded["reason"].startswith("a real guest stopped under KVM")
        print(f"up with driver {driver} in {time.monotonic() - started:.0f} s")
    finally:
        vagrant.destroy(cfg)
