"""Each disk format boots to the first-boot proof: the sealed build's disk as qcow2 and as VHDX.

The sealed build VM is the session's ``sealed`` fixture (tests/vm/conftest.py; the one
``test_seal_firstboot`` boots its copies from): no VM is built here. Its halted disk (the qcow2
overlay the build ran on, as the libvirt export reads a domain's disk) goes through our OVA writer;
each format is written from the disk inside that OVA (``appliance.export.disks``) and verified
as the build's verify stage does (``appliance.verify_disk``): qemu-img info/check/compare against
the OVA's disk, then one fresh copy booted under QEMU on its hypervisor's hardware, logged in
with the one-time password its first boot printed beside this boot's nonce. QEMU has no Hyper-V VMBus: that
the sealed image's initramfs holds hv_vmbus/hv_storvsc/hv_netvsc (and the other formats' drivers) is read
from the image itself (debugfs, about 5 s).

Two boots under TCG. Measured on the 2-core host (load about 4): 126 s (qcow2) and 104 s (VHDX) per test,
convert, qemu-img checks and boot together, 3 s for the initramfs; with other VM tests running (load 15) 303 s
and 214 s. The OVA write adds about 40 s to the shared ``sealed`` fixture, which ``test_seal_firstboot``
builds anyway (alone, this module builds it: 210-390 s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance.config import load_config
from appliance.export.disks import convert_disk, disk_formats
from appliance.export.ova import write_ova
from appliance.formats import FORMATS
from appliance.verify_boot import ConsoleLogin
from appliance.verify_disk import verify_disk

pytestmark = pytest.mark.vm

# What the copy says about the hardware it booted on: the root filesystem's device and each NIC's driver.
HARDWARE_FACTS = ("systemctl is-system-running --wait; findmnt -no SOURCE /; "
                  "for n in /sys/class/net/*/device/driver; do basename \"$(readlink -f \"$n\")\"; done")
# (root device, NIC driver) a copy sees on each format's boot hardware (appliance.verify_boot.BOOT_HARDWARE).
EXPECTED_HARDWARE = {"qcow2": ("/dev/vda1", "virtio_net"), "vhdx": ("/dev/sda1", "tulip")}


@pytest.fixture(scope="module")
def sealed_ova(sealed: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    build_disk = sealed.work / "build.qcow2"
    assert build_disk.is_file(), "the sealed fixture's build disk moved"
    work = tmp_path_factory.mktemp("disk-formats")
    cfg = load_config(None, ["provision.skip={k3s,csghub}", "vm.cpus=2", "vm.memory_mb=1024"], "libvirt", cwd=work)
    return write_ova(build_disk, cfg, work / "sealed.ova").path


@pytest.mark.parametrize("name", sorted(disk_formats()))
def test_each_disk_format_boots_to_the_first_boot_proof(name: str, sealed_ova: Path, tmp_path: Path) -> None:
    fmt = FORMATS[name]
    written = convert_disk(sealed_ova, fmt, tmp_path / f"csghub{fmt.suffix}")
    before = written.path.stat().st_mtime_ns, written.sha256
    report = verify_disk(written.path, fmt, reference=sealed_ova, login=ConsoleLogin(), boot_timeout=900,
                         memory_mb=1024, driver="qemu", work_dir=tmp_path, ready_command=HARDWARE_FACTS)
    checks = dict(report.checks)
    assert checks["qemu-img compare"] == f"identical to the disk in {sealed_ova.name}"
    assert checks["first boot"] == "proved by this boot's nonce"
    assert report.boot is not None and report.boot.first_boot_proved and report.boot.stack == "absent"
    status, root, *nics = report.boot.ready_output.splitlines()
    assert status in ("running", "degraded")
    assert (root, nics) == (EXPECTED_HARDWARE[name][0], [EXPECTED_HARDWARE[name][1]])
    from appliance.digest import sha256_file

    assert (written.path.stat().st_mtime_ns, sha256_file(written.path)) == before  # the boot wrote to an overlay


# What QEMU cannot boot here (Hyper-V's VMBus devices): the sealed image's initramfs must hold their drivers, or a
# Hyper-V copy would not find its disk (hv_storvsc serves the IDE disk there). Plus every other controller a
# format's hypervisor gives.
INITRAMFS_MODULES = ("hv_vmbus.ko", "hv_storvsc.ko", "hv_netvsc.ko", "ata_piix.ko", "ahci.ko", "virtio_blk.ko",
                     "virtio_scsi.ko", "virtio_net.ko")


def _cpio_names(data: bytes) -> list[str]:
    """Member names of a newc cpio archive (what initramfs-tools writes)."""
    names, at = [], 0
    while data[at:at + 6] in (b"070701", b"070702"):
        name_size, file_size = int(data[at + 94:at + 102], 16), int(data[at + 54:at + 62], 16)
        name = data[at + 110:at + 110 + name_size - 1].decode(errors="replace")
        at = (at + 110 + name_size + 3) & ~3
        at = (at + file_size + 3) & ~3
        if name == "TRAILER!!!":
            break
        names.append(name)
    return names


def test_the_sealed_initramfs_holds_the_hyper_v_and_virtio_drivers(sealed: Any, tmp_path: Path) -> None:
    import shutil

    from appliance.image import PARTITION_OFFSET
    from appliance.run import run

    if shutil.which("debugfs") is None or shutil.which("zstd") is None:
        pytest.skip("debugfs (e2fsprogs) and zstd are needed to read the image's initramfs")
    raw = tmp_path / "sealed.raw"
    run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", str(sealed.sealed_vmdk), str(raw)], timeout=900)
    device = f"{raw}?offset={PARTITION_OFFSET}"
    listing = run(["debugfs", "-R", "ls -p /boot", device]).stdout
    initrds = sorted(f.split("/")[5] for f in listing.splitlines()
                     if f.count("/") >= 6 and f.split("/")[5].startswith("initrd.img-"))
    assert len(initrds) == 1, f"one kernel's initramfs expected in /boot: {initrds}"
    initrd, cpio = tmp_path / "initrd.img", tmp_path / "initrd.cpio"
    run(["debugfs", "-R", f"dump /boot/{initrds[0]} {initrd}", device])
    assert initrd.read_bytes()[:4] == b"\x28\xb5\x2f\xfd", "the initramfs is not zstd-compressed (Debian 12's way)"
    run(["zstd", "-q", "-f", "-d", "-o", str(cpio), str(initrd)])
    names = _cpio_names(cpio.read_bytes())
    modules = {name.rsplit("/", 1)[-1] for name in names if name.endswith(".ko")}
    assert set(INITRAMFS_MODULES) <= modules, sorted(set(INITRAMFS_MODULES) - modules)
