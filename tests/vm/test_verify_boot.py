"""verify_ova's boot check, for real: an OVA made from the locally built base box boots under QEMU.

The disk goes through our OVA writer, is extracted by the verifier, and boots through a qcow2
overlay on the SATA (AHCI) controller and the E1000 NIC the OVF describes; SSH answers on a
loopback forward and the base box's build key logs in. One boot (about 35-55 s under TCG), plus
a short refused boot of a disk that holds no OS.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.errors import VerifyError
from appliance.export.ova import write_ova
from appliance.verify import SSHLogin, boot_check, verify_ova

pytestmark = pytest.mark.vm


def _base_box() -> tuple[Path, Path]:
    from appliance.basebox import KEY_NAME, cache_dir

    boxes = sorted((cache_dir() / "libvirt").glob("*.box"), key=lambda p: p.stat().st_mtime)
    key = cache_dir() / "keys" / KEY_NAME
    if not boxes or not key.is_file():
        pytest.skip(f"no base box under {cache_dir()} (build it with `invoke base-box`)")
    return boxes[-1], key


def test_ova_from_the_base_box_boots_and_accepts_ssh(tmp_path: Path) -> None:
    box, key = _base_box()
    with tarfile.open(box) as tar:
        tar.extract("box.img", tmp_path, filter="data")
    cfg = load_config(None, ["vm.cpus=2", "vm.memory_mb=2048", "provision.skip=[k3s, csghub]"], "libvirt",
                      cwd=tmp_path)
    ova = write_ova(tmp_path / "box.img", cfg, tmp_path / "out" / "basebox.ova").path
    before = ova.read_bytes()
    report = verify_ova(ova, boot=True, login=SSHLogin(cfg.ssh.user, key), boot_timeout=300, work_dir=tmp_path)
    assert report.boot is not None
    assert report.boot.ready_output in ("running", "degraded")
    assert ova.read_bytes() == before  # the OVA was only read


def test_a_disk_without_an_os_is_refused_with_the_console_tail(tmp_path: Path, small_disk_no_os: Path) -> None:
    _, key = _base_box()
    with pytest.raises(VerifyError) as err:
        boot_check(small_disk_no_os, login=SSHLogin("vagrant", key), timeout=20, memory_mb=256, work_dir=tmp_path)
    assert "did not accept SSH within 20 s" in err.value.message
    assert any(r.startswith("console tail:") for r in err.value.reasons)


@pytest.fixture
def small_disk_no_os(tmp_path: Path) -> Path:
    from appliance.run import run

    vmdk = tmp_path / "empty.vmdk"
    run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", str(vmdk), "16M"])
    return vmdk
