"""VirtualBox's own VMDK readers accept what the parallel writer makes.

Two readers: the sequential one that ``VBoxManage import`` uses on the VMDK inside an OVA
(grains must come in LBA order, the grain directory is never looked at), and the random-access
one that opens a VMDK file (it finds the grain directory through the footer). Each time the
disk VirtualBox read is cloned to raw with ``VBoxManage clonemedium`` and compared with the
source by ``qemu-img compare``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig
from appliance.export.ova import write_ova
from appliance.export.vmdk import write_stream_vmdk
from appliance.providers.virtualbox.chroot import VBoxSession
from appliance.run import run
from tests.disks import write_awkward_disk

pytestmark = pytest.mark.vbox



@pytest.fixture(scope="module")
def awkward_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw disk of 100 MiB + 3 sectors (``tests.disks.write_awkward_disk``)."""
    return write_awkward_disk(tmp_path_factory.mktemp("vmdkwriter") / "awkward.raw")


def test_the_ova_imports_and_the_imported_disk_is_the_source(
    vbox: VBoxSession, awkward_disk: Path, make_cfg: Callable[..., ApplianceConfig],
    import_ova: Callable[..., dict[str, str]], vm_name: str, tmp_path: Path,
) -> None:
    result = write_ova(awkward_disk, make_cfg(), tmp_path / "awkward.ova")
    info = import_ova(result.path, vm_name)
    imported = info["SATA-0-0"]
    assert imported.endswith(".vmdk")
    clone = tmp_path / "imported.raw"
    vbox.manage("clonemedium", "disk", imported, str(clone), "--format", "RAW")
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(awkward_disk), str(clone)])


def test_virtualbox_opens_the_vmdk_file_itself(vbox: VBoxSession, awkward_disk: Path, tmp_path: Path) -> None:
    vmdk = tmp_path / "awkward.vmdk"
    with vmdk.open("wb") as f:
        write_stream_vmdk(awkward_disk, f, name=vmdk.name, workers=3)
    clone = tmp_path / "clone.raw"
    try:
        vbox.manage("clonemedium", "disk", str(vmdk), str(clone), "--format", "RAW")
    finally:
        vbox.manage("closemedium", "disk", str(vmdk), check=False)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(awkward_disk), str(clone)])
