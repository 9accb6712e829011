"""scripts/setup.sh decides per host: libvirt's system package where systemd runs, the tool's own preparation
elsewhere (its ``--plan`` prints the decision and changes nothing)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _plan(systemd_dir: Path) -> str:
    env = {**os.environ, "CSGHUB_SETUP_SYSTEMD_DIR": str(systemd_dir)}
    done = subprocess.run(["bash", "scripts/setup.sh", "--plan"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("systemd", [True, False])
def test_libvirt_comes_from_the_system_package_only_where_systemd_runs(systemd: bool, tmp_path: Path) -> None:
    marker = tmp_path / "run-systemd-system"
    if systemd:
        marker.mkdir()
    plan = _plan(marker)
    packages = plan.splitlines()[0].removeprefix("apt: ").split()
    assert {"libvirt-daemon", "libvirt-daemon-driver-qemu", "vagrant-libvirt", "dnsmasq-base"} <= set(packages)
    assert ("libvirt-daemon-system" in packages) is systemd
    assert ("libvirt: systemd" in plan) is systemd and ("prepared by the tool" in plan) is not systemd
