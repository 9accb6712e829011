"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import PROJECT_ROOT, ApplianceConfig, load_config
from appliance.run import run

# -- OVF / OVA (export and verify tests) ------------------------------------------------------

SHARED = (PROJECT_ROOT / ".." / "shared").resolve()
OVF_SCHEMAS = SHARED / "ovf" / "schemas"
OVF_SAMPLES = SHARED / "ovf" / "samples"


@pytest.fixture(scope="session")
def ovf_schema_dir() -> Path:
    """The DMTF schemas in ../shared (a read-only copy next to the clone in CI)."""
    if not (OVF_SCHEMAS / "ovf1").is_dir():
        pytest.skip(f"OVF schemas not found at {OVF_SCHEMAS} (the shared reference data sits next to the clone)")
    return OVF_SCHEMAS


@pytest.fixture(scope="session")
def ovf_samples_dir() -> Path:
    if not OVF_SAMPLES.is_dir():
        pytest.skip(f"OVF samples not found at {OVF_SAMPLES} (the shared reference data sits next to the clone)")
    return OVF_SAMPLES


@pytest.fixture(scope="session")
def make_cfg(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., ApplianceConfig]:
    """A libvirt config for a small VM without the stack, isolated from any ./appliance.yaml."""
    cwd = tmp_path_factory.mktemp("cfg")

    def make(*sets: str) -> ApplianceConfig:
        base = ["vm.cpus=2", "vm.memory_mb=2048", "provision.skip=[k3s, csghub]"]
        return load_config(None, [*base, *sets], "libvirt", cwd=cwd)

    return make


@pytest.fixture(scope="session")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 MiB qcow2 with data in a few places and zeros elsewhere, made by qemu-img/qemu-io."""
    path = tmp_path_factory.mktemp("disk") / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 4M", "-c", "write -P 0x5c 40M 2M",
         "-c", "write -P 0x01 63M 512k", str(path)])
    return path


@pytest.fixture(scope="session")
def built_ova(tmp_path_factory: pytest.TempPathFactory, small_disk: Path,
              make_cfg: Callable[..., ApplianceConfig]) -> Path:
    """One OVA (OVF 1.0) from ``small_disk``, written once per session; copy before damaging it."""
    from appliance.export.ova import write_ova

    dest = tmp_path_factory.mktemp("ova") / "csghub-test.ova"
    return write_ova(small_disk, make_cfg(), dest).path


# -- the real CSGHub chart, rendered by a real helm ---------------------------------------------


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    """A real helm (scripts/install-helm.sh); in CI a missing one fails, elsewhere it skips with the fix."""
    import os

    from tests.chart import CHART_DIR, helm_binary

    helm = helm_binary()
    problem = None
    if helm is None:
        problem = "helm not found: run scripts/install-helm.sh (or set APPLIANCE_HELM)"
    elif not (CHART_DIR / "Chart.yaml").is_file():
        problem = f"the CSGHub chart is not at {CHART_DIR} (the shared reference data sits next to the clone)"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    assert helm is not None
    return helm
