"""The step runner on a real libvirt VM (one boot shared by this module's tests).

The VM runs the real ``provision/00-base.sh`` plus two small steps of the test's own: one
that declares and records an input (``env=K3S_VERSION``), one that declares ``reboot-after``.
The tests run in file order: first provisioning (with a real reboot), a rerun that skips
everything, 00-base.sh run again by name (no ``changed:`` lines), a changed input (rerunning
the step that declares it and the one after it, not base), and a changed middle step.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance import vm as lifecycle
from appliance.config import PROJECT_ROOT, ApplianceConfig, load_config
from appliance.providers.registry import provider_for
from appliance.scripts import GUEST_PROVISION_DIR
from appliance.ssh import RemoteSession
from appliance.steps import DEFAULT_STATE_DIR, Options, Provisioner

pytestmark = pytest.mark.vm

UP_TIMEOUT = 900
REBOOT_TIMEOUT = 600

PROBE = """#!/usr/bin/env bash
# Test step: records the input it was given.
# appliance: env=K3S_VERSION
set -euo pipefail
if [[ "$(cat /var/tmp/probe.k3s 2>/dev/null)" == "$K3S_VERSION" ]]; then
    echo "ok: probe already records $K3S_VERSION"
else
    printf '%s' "$K3S_VERSION" > /var/tmp/probe.k3s
    echo "changed: probe records $K3S_VERSION"
fi
echo "$K3S_VERSION" >> /var/tmp/probe.runs
"""
REBOOT = """#!/usr/bin/env bash
# Test step: asks the runner for a reboot afterwards.
# appliance: reboot-after
set -euo pipefail
cat /proc/sys/kernel/random/boot_id >> /var/tmp/reboot.runs
echo "changed: reboot requested"
"""


@dataclass
class ProvisionedVM:
    make_cfg: Callable[..., ApplianceConfig]
    session: RemoteSession
    scripts: Path

    def provisioner(self, *sets: str) -> Provisioner:
        return Provisioner(self.make_cfg(*sets), self.session, directory=self.scripts, reboot_timeout=REBOOT_TIMEOUT)

    def run(self, *sets: str, **options: object) -> dict[str, str]:
        report = self.provisioner(*sets).run(Options(**options))  # type: ignore[arg-type]
        return {s.name: s.outcome for s in report.steps}

    def guest(self, command: str) -> str:
        return self.session.run(command, timeout=120).stdout


@pytest.fixture(scope="module")
def vm(libvirt_env: Any, base_box: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProvisionedVM]:
    tmp = tmp_path_factory.mktemp("provision-vm")

    def make_cfg(*sets: str) -> ApplianceConfig:
        # The settings of conftest's vm_config (a per-test fixture), for a VM this module shares.
        return load_config(
            None,
            [
                f"vm.name={libvirt_env.vm_prefix}provision",
                "vm.cpus=2",
                "vm.memory_mb=1024",
                "vm.disk_gb=8",
                "vm.boot_timeout=300",
                "provision.skip={k3s,csghub}",
                "network.forwarded_ports={}",
                f"libvirt.uri={libvirt_env.uri}",
                f"libvirt.storage_pool={libvirt_env.pool}",
                f"libvirt.management_network_name={libvirt_env.network}",
                f"libvirt.management_network_address={libvirt_env.network_cidr}",
                "libvirt.management_network_mode=none",
                f"output.build_dir={tmp / 'build'}",
                *sets,
            ],
            "libvirt",
            cwd=tmp,
        )

    scripts = tmp / "provision"
    scripts.mkdir()
    shutil.copy(PROJECT_ROOT / "provision" / "00-base.sh", scripts / "00-base.sh")
    # 00-base.sh declares files=common (the shared helpers it sources).
    shutil.copytree(PROJECT_ROOT / "provision" / "files" / "common", scripts / "files" / "common")
    (scripts / "10-probe.sh").write_text(PROBE)
    (scripts / "20-reboot.sh").write_text(REBOOT)
    cfg = make_cfg()
    try:
        lifecycle.up(cfg, provider_for(cfg), timeout=UP_TIMEOUT, render_first=True)
        endpoint = lifecycle.ssh_config(cfg, provider_for(cfg))
        with RemoteSession.from_config(cfg, endpoint) as session:
            yield ProvisionedVM(make_cfg, session, scripts)
    finally:
        lifecycle.destroy(cfg, provider_for(cfg))


def test_first_provisioning_applies_base_settings_and_survives_a_reboot(vm: ProvisionedVM) -> None:
    boot_before = vm.session.boot_id()
    assert vm.run() == {"base": "changed", "probe": "changed", "reboot": "changed"}
    assert vm.session.boot_id() != boot_before, "the reboot-after step did not reboot the guest"
    # What 00-base.sh set must hold after the reboot: modules and sysctls come back at boot.
    assert vm.guest("ls -d /sys/module/br_netfilter /sys/module/overlay").split() == [
        "/sys/module/br_netfilter", "/sys/module/overlay"
    ]
    values = vm.guest(
        "sysctl -n net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables fs.inotify.max_user_instances "
        "fs.inotify.max_user_watches"
    ).split()
    assert values == ["1", "1", "8192", "524288"]
    assert vm.guest("swapon --show --noheadings") == ""
    assert vm.guest("systemctl is-active systemd-timesyncd").strip() == "active"
    markers = vm.guest(f"ls {DEFAULT_STATE_DIR}").split()
    assert markers == ["base.done", "probe.done", "reboot.done"]
    assert vm.guest(f"ls {GUEST_PROVISION_DIR}").split() == ["00-base.sh", "10-probe.sh", "20-reboot.sh", "files"]
    common = vm.guest(f"ls {GUEST_PROVISION_DIR}/files/common").split()
    assert {"run-step.sh", "lib.sh"} <= set(common), common  # the marker writer and the shared shell helpers
    log = vm.make_cfg().build_dir / "logs" / "00-base.log"
    assert "changed: wrote /etc/sysctl.d/60-csghub-appliance.conf" in log.read_text()


def test_rerun_skips_every_step_quickly(vm: ProvisionedVM) -> None:
    vm.session.run("true")  # the connection is up: what follows is the no-op cost itself
    provisioner = vm.provisioner()
    started = time.monotonic()
    report = provisioner.run(Options())
    elapsed = time.monotonic() - started
    assert [s.outcome for s in report.steps] == ["skipped"] * 3
    assert all(s.reason == "done, inputs unchanged" for s in report.steps)
    print(f"\nno-op provision on a provisioned VM, connection up: {elapsed:.2f} s")


def test_base_step_run_again_changes_nothing(vm: ProvisionedVM) -> None:
    report = vm.provisioner().run(Options(only="base"))
    base = report.steps[0]
    assert base.outcome == "no changes", base.changes
    text = (vm.make_cfg().build_dir / "logs" / "00-base.log").read_text()
    assert "changed:" not in text
    assert "ok: packages" in text and "ok: no active swap" in text


def test_changed_input_reruns_the_steps_that_declare_it(vm: ProvisionedVM) -> None:
    boot_before = vm.session.boot_id()
    # Only probe declares K3S_VERSION: base keeps its marker; reboot follows probe, which reran.
    plan = {p.name: (p.run, p.reason) for p in vm.provisioner("k3s.version=v1.30.0+k3s1").plan(Options())}
    assert plan == {
        "base": (False, "done, inputs unchanged"),
        "probe": (True, "inputs changed: env:K3S_VERSION"),
        "reboot": (True, "follows probe, which runs"),
    }
    outcomes = vm.run("k3s.version=v1.30.0+k3s1")
    assert outcomes == {"base": "skipped", "probe": "changed", "reboot": "changed"}
    assert vm.guest("cat /var/tmp/probe.k3s") == "v1.30.0+k3s1"
    assert vm.session.boot_id() != boot_before


def test_changed_middle_step_reruns_it_and_the_later_ones_only(vm: ProvisionedVM) -> None:
    (vm.scripts / "10-probe.sh").write_text(PROBE + "# edited\n")
    plan = {p.name: (p.run, p.reason) for p in vm.provisioner("k3s.version=v1.30.0+k3s1").plan(Options())}
    assert plan == {
        "base": (False, "done, inputs unchanged"),
        "probe": (True, "inputs changed: script"),
        "reboot": (True, "follows probe, which runs"),
    }
    runs_before = len(vm.guest("cat /var/tmp/probe.runs").split())
    outcomes = vm.run("k3s.version=v1.30.0+k3s1")
    assert outcomes == {"base": "skipped", "probe": "no changes", "reboot": "changed"}
    assert len(vm.guest("cat /var/tmp/probe.runs").split()) == runs_before + 1
