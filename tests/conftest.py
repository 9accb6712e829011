"""Fixtures every tier shares: a small config and a small disk and OVA made from it by the real tools."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig, load_config
from appliance.run import run


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
