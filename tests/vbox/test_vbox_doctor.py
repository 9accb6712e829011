"""``invoke doctor`` for the VirtualBox provider against the real VBoxManage 7.2 and this host's Vagrant."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from appliance.checks import version_tuple as _version
from appliance.config import load_config
from appliance.doctor import collect_checks
from appliance.run import run

pytestmark = pytest.mark.vbox


def test_doctor_reads_real_versions_and_names_the_vagrant_to_install(vboxmanage_on_path: Path) -> None:
    if shutil.which("vagrant") is None:
        pytest.skip("vagrant is not installed")
    cfg = load_config(None, ["provider=virtualbox", "vm.box=debian/bookworm64"], cwd=Path("/"))
    checks = {c.name: c for c in collect_checks(cfg)}
    assert checks["VBoxManage"].verdict == "ok" and "7.2" in checks["VBoxManage"].found
    vagrant = _version(run(["vagrant", "--version"]).stdout)
    verdict = checks["Vagrant supports this VirtualBox"]
    if vagrant < (2, 4, 9):  # Debian's Vagrant here (2.3.4): it refuses VirtualBox 7.2
        assert verdict.verdict == "fail"
        assert "needs Vagrant >= 2.4.9" in verdict.found and "HashiCorp" in verdict.fix
    else:
        assert verdict.verdict == "ok"
