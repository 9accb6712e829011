"""`vagrant up` through vagrant-libvirt notices a guest that stopped running, in seconds.

A domain suspended while Vagrant waits for its address (`virsh suspend`, as libvirt pauses a
guest after a ``KVM internal error``) fails `up` with the domain's state and libvirt's reason,
well within a minute instead of at vm.boot_timeout. (A guest KVM cannot run, booted again under
TCG by ``libvirt.driver=auto``: test_lifecycle.py, in its boot.) And the KVM probe's own boot (the
base box's kernel through a transient libvirt domain) agrees with what libvirt does: its choice,
booted the same way, reaches userspace. One kernel boot, plus a domain that is stopped early.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance import vm
from appliance.config import ApplianceConfig
from appliance.errors import GuestStopped
from appliance.providers.libvirt import hostprobe, libvirtd
from appliance.providers.libvirt.provider import domain_name
from appliance.providers.registry import provider_for
from appliance.run import run

pytestmark = pytest.mark.vm
URI = "qemu:///system"


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
            vm.up(cfg, provider_for(cfg), render_first=True)
        failed = time.monotonic()
        suspender.join()
        assert suspended, "the domain never ran"
        assert failed - suspended[0] < 60
        assert f"the libvirt domain {domain} stopped running under qemu: paused (user)" in err.value.message
    finally:
        suspender.join()
        vm.destroy(cfg, provider_for(cfg))


def test_the_probes_choice_boots_the_box_kernel_to_userspace_through_libvirt(
    base_box: object, libvirt_env: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.providers.libvirt.box import box_kernel

    monkeypatch.setattr(hostprobe, "_probe_cache_dir", lambda: tmp_path)
    driver, why = hostprobe.detect_libvirt_driver(refresh=True, uri=URI)
    access = libvirtd.kvm_access(libvirtd.qemu_user())
    if access.allowed:
        assert "the base box's kernel" in why, why  # the faithful probe ran, not the payload
        assert json.loads((tmp_path / hostprobe.CACHE_NAME).read_text())["probe"] == hostprobe.KERNEL_PROBE
    else:
        # libvirt's QEMU user cannot open /dev/kvm (here: 0600 root, and no qemu.conf naming root): TCG, said why.
        assert driver == "qemu" and f"libvirt runs QEMU as {access.user}, which cannot open /dev/kvm" in why
    kernel = box_kernel()
    assert kernel is not None
    boot = hostprobe.boot_box_kernel(driver, kernel, uri=URI)
    assert boot.reached_userspace, f"{driver}: {boot.detail}\n{boot.console[-2000:]}"
    assert hostprobe.USERSPACE_LINE in boot.console and hostprobe.POWER_DOWN_LINE in boot.console
